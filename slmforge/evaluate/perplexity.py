"""A tokenizer-agnostic judge: loss per token and bits per byte of a model on real text.

    report = judge("runs/quickstart/pretrain/model", ["../shared/data/tinystories/tinystories_valid_part1.txt"])
    report["files"][0]["bits_per_byte"]

Loss per token depends on the tokenizer (a 512-token vocabulary has an easier guess per token than a
4096-token one, but needs more tokens), so two models with different tokenizers cannot be compared by it.
Bits per byte can: the total negative log-likelihood of the text in bits, over the text's UTF-8 bytes,

    bits/byte = sum of NLL (nats) over every predicted token / (ln 2 * UTF-8 bytes of the documents)

Each document is scored on its own, starting from BOS when the tokenizer has one (as the models were
trained), so every token of the document is predicted (without BOS the first token cannot be, and its
bytes are counted all the same: such a model is not flattered). A document longer than the model's context
is scored in windows of the context that slide by half a context: each token is predicted exactly once,
with at least half a context before it. The end-of-text token is not scored: models that never learned one
(llama2.c's) are not penalised for it.

Inputs: .txt (documents separated by blank lines) or .jsonl (one object a line with a "text" field).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slmforge.errors import SlmforgeError
from slmforge.io import parse_json


def read_documents(path: str | Path, max_docs: int | None = None, text_field: str = "text") -> list[str]:
    """The documents of a .txt (blank-line separated) or .jsonl file; errors name file:line."""
    path = Path(path)
    if not path.is_file():
        raise SlmforgeError(f"{path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SlmforgeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    docs: list[str] = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = parse_json(line, where=False)
            except ValueError as e:
                raise SlmforgeError(f"{path}:{lineno}: invalid JSON ({e})") from None
            text = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise SlmforgeError(f"{path}:{lineno}: no string field {text_field!r}")
            if text.strip():
                docs.append(text.strip())
    else:
        para: list[str] = []
        for line in [*lines, ""]:  # a trailing blank line ends the last document
            if line.strip():
                para.append(line.rstrip())
            elif para:
                docs.append("\n".join(para).strip())
                para = []
    if not docs:
        raise SlmforgeError(f"{path}:1: no documents (the file is empty)")
    return docs[:max_docs] if max_docs else docs


def windows(ids: list[int], ctx: int) -> list[tuple[list[int], int]]:
    """(window of up to ctx + 1 ids, how many of its last targets to score) so that every target
    ids[1:] is scored exactly once; windows after the first overlap by half a context."""
    if len(ids) <= ctx + 1:
        return [(ids, len(ids) - 1)]
    out, stride = [], max(ctx // 2, 1)
    out.append((ids[:ctx + 1], ctx))
    scored = ctx  # targets ids[1..scored] done
    while scored < len(ids) - 1:
        end = min(scored + stride, len(ids) - 1)  # score targets up to ids[end]
        start = max(0, end - ctx)  # the window's inputs ids[start:end], its targets ids[start+1:end+1]
        out.append((ids[start:end + 1], end - scored))
        scored = end
    return out


@torch.inference_mode()
def score_documents(model, tokenizer, docs: list[str], batch_size: int = 16,
                    max_tokens_per_batch: int = 16_384) -> dict:
    """Total NLL (nats), predicted tokens and UTF-8 bytes of `docs` under `model` (our LlamaModel)."""
    ctx = model.config.max_position_embeddings
    device = model.model.embed_tokens.weight.device
    ids_per_doc = tokenizer.encode_batch(docs, bos=True)
    work = [w for ids in ids_per_doc for w in windows(ids, ctx) if w[1] > 0]
    work.sort(key=lambda w: len(w[0]))  # similar lengths together: little padding
    nll, n_tokens, i = 0.0, 0, 0
    while i < len(work):
        # as many windows as fit both limits; the longest of a batch is its last
        j = i + 1
        while j < len(work) and j - i < batch_size and (j + 1 - i) * len(work[j][0]) <= max_tokens_per_batch:
            j += 1
        batch = work[i:j]
        T = max(len(w) for w, _ in batch) - 1
        x = torch.zeros(len(batch), T, dtype=torch.long)
        y = torch.full((len(batch), T), -100, dtype=torch.long)  # -100: not scored (padding, context only)
        for r, (w, n_score) in enumerate(batch):
            t = torch.tensor(w)
            x[r, :len(w) - 1] = t[:-1]
            y[r, len(w) - 1 - n_score:len(w) - 1] = t[len(w) - n_score:]
        # right padding under a causal mask changes no real position's logits
        logits, _ = model(x.to(device))
        nll += float(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum",
                                     ignore_index=-100))
        n_tokens += int((y != -100).sum())
        i = j
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return {"docs": len(docs), "tokens": n_tokens, "bytes": n_bytes, "nll_nats": nll,
            "loss_per_token": nll / max(n_tokens, 1), "bits_per_byte": nll / (math.log(2) * max(n_bytes, 1)),
            "bytes_per_token": n_bytes / max(n_tokens, 1)}


def judge(model_dir: str | Path, files: list[str | Path], max_docs: int | None = None,
          batch_size: int = 16, device: str | None = None) -> dict:
    """Score one model directory on each file: {"model", "params", "vocab_size", "files": [...]}."""
    from slmforge.modeldir import ModelDir

    docs_per_file = [(str(f), read_documents(f, max_docs)) for f in files]  # bad input fails before loading
    md = ModelDir.open(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = md.load_model(device).eval(), md.load_tokenizer()
    results = []
    for name, docs in docs_per_file:
        t = time.perf_counter()
        r = score_documents(model, tok, docs, batch_size=batch_size)
        results.append({"file": name, **r, "seconds": round(time.perf_counter() - t, 2)})
    return {"model": str(model_dir), "params": md.config.n_params, "vocab_size": md.config.vocab_size,
            "ctx": md.config.max_position_embeddings, "bos": tok.bos_id is not None, "files": results}


def format_table(reports: list[dict]) -> str:
    """A small fixed-width table: one row per (model, file)."""
    head = f"{'model':<44} {'file':<32} {'docs':>5} {'tokens':>8} {'loss/tok':>8} {'bits/byte':>9}"
    rows = [head, "-" * len(head)]
    for rep in reports:
        for f in rep["files"]:
            rows.append(f"{_tail(rep['model'], 44):<44} {_tail(f['file'], 32):<32} {f['docs']:>5} "
                        f"{f['tokens']:>8} {f['loss_per_token']:>8.4f} {f['bits_per_byte']:>9.4f}")
    return "\n".join(rows)


def _tail(s: str, n: int) -> str:
    return s if len(s) <= n else "…" + s[-(n - 1):]
