"""LoRA vs full fine-tuning of a small pretrained model on SST-2 sentiment (classifier head).

    python benchmarks/lora_vs_full.py            # ~9 minutes on 1 CPU thread (--steps 150: about half)

The model is llama2.c's stories260K (imported; pretrained on TinyStories only, so movie reviews are new to
it). Each configuration trains for the same steps on the same SST-2 examples, in its own process so peak
RSS is its own, and is scored on the same held-out examples (rows of train.tsv not used for training;
SST-2's test labels are not public). Reported: trainable parameters, peak RSS up to the end of training
and its growth over the process after imports and setup ("+ training"), training tokens/s (padded
tokens, eval excluded) and held-out accuracy of the best evaluation's weights.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RUNS = {  # name -> (mode, lr, lora targets)
    "full": ("full", 1e-3, None),
    "lora q,v r8": ("lora", 3e-3, "q_proj,v_proj"),
    "lora all r8": ("lora", 3e-3, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
}


def split_sst2(src: Path, out: Path, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, Path]:
    with open(src, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    random.Random(seed).shuffle(rows)
    parts, start = {}, 0
    for name, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        p = out / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"text": r["text"].strip(), "label": r["label"]}) + "\n"
                             for r in rows[start:start + n]))
        parts[name], start = p, start + n
    return parts


def run_one(args: argparse.Namespace) -> None:
    """One configuration, in this (fresh) process; prints a JSON line."""
    import peft  # noqa: F401 - imported by every run, so the runs' RSS differ only by what training holds
    import torch

    from slmforge.train.finetune import FinetuneConfig, finetune
    from slmforge.train.heads import predict_labels
    from slmforge.train.rows import read_records

    torch.set_num_threads(args.threads)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mode, lr, targets = RUNS[args.run]
    cfg = FinetuneConfig(task="classify", head="classifier", mode=mode, lora_r=8, lora_alpha=16,
                         lora_dropout=0.05, **({"lora_targets": targets.split(",")} if targets else {}),
                         max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=lr,
                         weight_decay=0.0, eval_every=args.steps // 4, ckpt_every=0, threads=args.threads,
                         progress=False, seed=0)
    s = finetune(args.model, args.data / "train.jsonl", args.out, cfg, val_path=args.data / "val.jsonl",
                 resume=False)
    rss_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak up to the end of training
    test = [r for _, r in read_records(args.data / "test.jsonl")]
    pred_dir = args.out / ("model" if mode == "full" else "merged")
    if mode == "lora":
        from slmforge.train.heads import merge_lora

        merge_lora(args.model, args.out / "adapter", pred_dir)
    preds = predict_labels(pred_dir, [r["text"] for r in test], batch_size=64)
    acc = sum(p == r["label"] for p, r in zip(preds, test, strict=True)) / len(test)
    m = s["metrics"]
    print(json.dumps({"run": args.run, "mode": mode, "lr": lr, "lora_targets": targets,
                      "trainable_params": m["trainable_params"], "total_params": m["total_params"],
                      "trainable_pct": m["trainable_pct"], "tokens_per_s": m["tokens_per_s"],
                      "train_time_s": m["train_time_s"], "val_accuracy": m["val_accuracy"], "best_step": m["best_step"],
                      "test_accuracy": acc, "rss_before_mb": round(rss_before, 1),
                      "peak_rss_train_mb": round(rss_train, 1),
                      "train_memory_mb": round(rss_train - rss_before, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--train", type=int, default=9600, help="training examples (steps x batch = one epoch)")
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lora_vs_full.json")
    ap.add_argument("--run", help=argparse.SUPPRESS)  # internal: one configuration in a child process
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        args.out = Path(args.out)
        return run_one(args)

    from rich.console import Console
    from rich.table import Table

    from slmforge.convert.llama2c import import_llama2c

    sst2, s260k = DATA / "sst2" / "train.tsv", DATA / "tinystories" / "stories260K.bin"
    for p in (sst2, s260k):
        if not p.is_file():
            raise SystemExit(f"{p}: missing; this benchmark needs ../shared/data")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = import_llama2c(s260k, DATA / "tinystories" / "tok512.bin", tmp / "stories260K")
        split_sst2(sst2, tmp, args.train, args.val, args.test)
        for name in RUNS:
            cmd = [sys.executable, __file__, "--run", name, "--model", str(model), "--data", str(tmp),
                   "--out", str(tmp / name.replace(" ", "_").replace(",", "")), "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{name}: done", file=sys.stderr)

    full = results[0]
    table = Table(title=f"SST-2, stories260K + classifier head, {args.steps} steps x {args.batch_size}, "
                        f"{args.threads} thread(s)")
    for col in ("run", "trainable", "peak RSS MB", "+ training MB", "tokens/s", "val acc", f"test acc (n={args.test})", "vs full"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in results:
        table.add_row(r["run"], f"{r['trainable_params']:,} ({r['trainable_pct']:.2f}%)", f"{r['peak_rss_train_mb']:.0f}", f"{r['train_memory_mb']:.0f}",
                      f"{r['tokens_per_s']:,.0f}", f"{r['val_accuracy']:.3f}", f"{r['test_accuracy']:.3f}",
                      f"{r['test_accuracy'] - full['test_accuracy']:+.3f}")
    Console().print(table)
    out = {"benchmark": "lora_vs_full", "dataset": "SST-2 (rows of train.tsv; disjoint train/val/test)",
           "model": "stories260K (llama2.c, imported)", "head": "classifier (last token)",
           "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "n_train": args.train,
           "n_val": args.val, "n_test": args.test, "threads": args.threads, "precision": "bf16 autocast",
           "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
