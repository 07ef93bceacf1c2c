"""Validation loss of an imported llama2.c model, by the procedure of ../shared/data/SOURCES.md.

    python benchmarks/llama2c_val_loss.py                # imports stories260K + tok512, then measures

Procedure (the reference figures were measured this way with llama2.c's own model.py and run.c's
tokenizer): paragraphs of tinystories_valid_part1.txt split on blank lines (stripped, empty ones
dropped), each encoded separately with the sentencepiece dummy-prefix space, BOS (id 1) before each
paragraph starting with 'Once upon', the first 800 paragraphs concatenated, then non-overlapping
windows of T tokens (inputs ids[iT:(i+1)T], targets shifted by one), mean cross-entropy over all.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from slmforge.convert.llama2c import import_llama2c
from slmforge.modeldir import ModelDir
from slmforge.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tinystories"
REFERENCE = {512: 1.321, 256: 1.351}  # llama2.c model.py on the same 800 paragraphs (SOURCES.md)
PUBLISHED = 1.297  # llama2.c README, whole TinyStories validation split


def read_paragraphs(path: Path, n: int) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()][:n]


def encode_paragraphs(tok: Tokenizer, paras: list[str]) -> list[int]:
    ids: list[int] = []
    for p, enc in zip(paras, tok.encode_batch(paras), strict=True):
        if p.startswith("Once upon"):  # a story start: llama2.c's pretokenizer puts BOS before each story
            ids.append(tok.bos_id)
        ids += enc
    return ids


@torch.no_grad()
def val_loss(model, ids: list[int], T: int, batch_size: int = 16) -> tuple[float, int]:
    """Mean next-token loss over non-overlapping windows of T inputs; returns (loss, n_windows)."""
    n = (len(ids) - 1) // T
    data = torch.tensor(ids[:n * T + 1])
    x = data[:-1].view(n, T)
    y = data[1:].view(n, T)
    total = 0.0
    for i in range(0, n, batch_size):
        _, loss = model(x[i:i + batch_size], y[i:i + batch_size])
        total += loss.item() * len(x[i:i + batch_size])  # equal-length windows: mean of means is exact
    return total / n, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-bin", type=Path, default=DATA / "stories260K.bin")
    ap.add_argument("--tokenizer-bin", type=Path, default=DATA / "tok512.bin")
    ap.add_argument("--text", type=Path, default=DATA / "tinystories_valid_part1.txt")
    ap.add_argument("--paragraphs", type=int, default=800)
    ap.add_argument("--windows", type=int, nargs="+", default=[512, 256])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "llama2c_val_loss.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = import_llama2c(args.model_bin, args.tokenizer_bin, Path(tmp) / "model")
        import_s = time.perf_counter() - t0
        md = ModelDir.open(out)
        model, tok = md.load_model(), md.load_tokenizer()
    paras = read_paragraphs(args.text, args.paragraphs)
    ids = encode_paragraphs(tok, paras)

    rows = []
    for T in args.windows:
        t0 = time.perf_counter()
        loss, n = val_loss(model, ids, T)
        rows.append({"window": T, "windows": n, "tokens_scored": n * T, "loss": loss,
                     "reference": REFERENCE.get(T), "seconds": time.perf_counter() - t0})

    print(f"stories260K ({md.config.n_params:,} params), {len(paras)} paragraphs, {len(ids):,} tokens, "
          f"import {import_s:.2f}s")
    print(f"{'window':>6} {'windows':>7} {'ours':>8} {'reference':>9} {'diff':>8} {'seconds':>7}")
    for r in rows:
        ref = r["reference"]
        diff = f"{r['loss'] - ref:+.4f}" if ref is not None else "-"
        print(f"{r['window']:>6} {r['windows']:>7} {r['loss']:>8.4f} {ref if ref else '-':>9} {diff:>8} "
              f"{r['seconds']:>7.2f}")
    print(f"published (whole validation split): {PUBLISHED}")

    result = {"model_bin": str(args.model_bin), "tokenizer_bin": str(args.tokenizer_bin), "text": str(args.text),
              "paragraphs": len(paras), "tokens": len(ids), "params": md.config.n_params, "rows": rows,
              "published_whole_split": PUBLISHED, "torch": torch.__version__, "threads": args.threads,
              "machine": platform.machine(), "import_seconds": import_s}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
