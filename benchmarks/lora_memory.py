"""Where LoRA pays: training memory and step time, full fine-tuning vs LoRA, as the model grows.

    python benchmarks/lora_memory.py                       # 15m, 135m, 360m; ~6 minutes on 2 threads
    python benchmarks/lora_memory.py --presets 135m --steps 3 --runs "full;lora q,v r8"

benchmarks/lora_vs_full.py measures LoRA's quality gap on a 260K model, where activations dominate and
LoRA saves nothing. This one measures the other side: randomly initialised models of the preset shapes
(SmolLM-135M and -360M shapes included; no weights are needed to measure memory and time), trained by the
trainer core (AdamW, bf16 autocast, fp32 weights and optimizer state) for a few steps on a fixed LM batch.
Each configuration runs in its own process. Reported: trainable parameters, peak resident memory once the
model is built ("model MB"; the fp32 weights, also for a bf16 base, which is converted after loading), the
process's peak resident memory by the end of training ("peak MB": weights, gradients, optimizer state,
activations) and seconds per optimizer step after the first.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
RUNS = {  # name -> (mode, lora targets, rank, frozen projections in bf16)
    "full": ("full", None, 0, False),
    "lora q,v r8": ("lora", "q_proj,v_proj", 8, False),
    "lora all r16": ("lora", ALL_LINEAR, 16, False),
    "lora all r16, bf16 base": ("lora", ALL_LINEAR, 16, True),  # finetune --base-dtype bfloat16
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(args: argparse.Namespace) -> None:
    """One (preset, configuration) in this fresh process; prints a JSON line."""
    import peft  # noqa: F401 - every run imports it, so RSS differs only by what the model and training hold
    import torch

    from slmforge.config import preset
    from slmforge.model import LlamaModel
    from slmforge.train.finetune import FinetuneConfig
    from slmforge.train.heads import count_params, lm_loss, trainable_model
    from slmforge.train.loop import TrainConfig, train

    torch.set_num_threads(args.threads)
    mode, targets, r, bf16_base = RUNS[args.run]
    cfg = preset(args.preset, max_position_embeddings=max(args.seq_len, 256))
    model = LlamaModel(cfg)
    model.reset_parameters(seed=0)
    ft_cfg = FinetuneConfig(mode=mode, **({"lora_r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
                                          "lora_targets": targets.split(","),
                                          "base_dtype": "bfloat16" if bf16_base else "float32"}
                                         if mode == "lora" else {}))
    model, _ = trainable_model(model, ft_cfg, None, "bf16")
    trainable, total = count_params(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=g)
    batch = {"x": x[:, :-1], "y": x[:, 1:]}
    rss_model = _rss_mb()  # model built (fp32 weights), nothing trained yet
    step_times: list[float] = []

    def get_batch(i: int) -> dict:
        step_times.append(time.perf_counter())
        return batch

    tcfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-4,
                       min_lr=1e-5, warmup_steps=0, eval_every=0, ckpt_every=0, threads=args.threads,
                       progress=False, log_every=1)
    train(model, get_batch, tcfg, args.out, None, loss_fn=lm_loss, resume=False)
    gaps = [b - a for a, b in zip(step_times[1:], step_times[2:], strict=False)]  # after the first step (allocations)
    print(json.dumps({"preset": args.preset, "run": args.run, "trainable_params": trainable, "total_params": total,
                      "trainable_pct": round(100 * trainable / total, 3), "model_mb": round(rss_model, 1),
                      "peak_mb": round(_rss_mb(), 1), "train_mb": round(_rss_mb() - rss_model, 1),
                      "s_per_step": round(sum(gaps) / len(gaps), 3) if gaps else None}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="15m,135m,360m")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default=";".join(RUNS), help="configurations separated by ; (full first)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lora_memory.json")
    ap.add_argument("--run", help=argparse.SUPPRESS)  # internal: one configuration in a child process
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        return run_one(args)

    from rich.console import Console
    from rich.table import Table

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in args.presets.split(","):
            for name in args.runs.split(";"):
                cmd = [sys.executable, __file__, "--run", name, "--preset", p, "--out", str(Path(tmp) / f"{p}-{name}"),
                       "--steps", str(args.steps + 1), "--batch-size", str(args.batch_size),
                       "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{p} {name} failed:\n{proc.stderr[-3000:]}")
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"{p} {name}: done", file=sys.stderr)

    table = Table(title=f"training memory and time, batch {args.batch_size} x {args.seq_len} tokens, bf16 autocast, "
                        f"{args.threads} thread(s)")
    for col in ("model", "run", "trainable", "model MB", "peak MB", "vs full", "s/step", "vs full"):
        table.add_column(col, justify="left" if col in ("model", "run") else "right")
    full = {}
    for r in results:
        if r["run"] == "full":
            full[r["preset"]] = r
        f = full[r["preset"]]
        table.add_row(r["preset"], r["run"], f"{r['trainable_params']:,} ({r['trainable_pct']:.2f}%)",
                      f"{r['model_mb']:,.0f}", f"{r['peak_mb']:,.0f}", f"{r['peak_mb'] / f['peak_mb']:.2f}x",
                      f"{r['s_per_step']:.2f}", f"{r['s_per_step'] / f['s_per_step']:.2f}x")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "lora_memory", "batch_size": args.batch_size,
                                    "seq_len": args.seq_len, "steps_timed": args.steps, "threads": args.threads,
                                    "precision": "bf16 autocast, fp32 weights and AdamW state",
                                    "machine": platform.machine(), "python": platform.python_version(),
                                    "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
