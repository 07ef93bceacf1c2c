"""CLI commands for fine-tuning and model conversion: `slmforge finetune`, `import hf`, `merge-lora`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmforge.errors import SlmforgeError


def finetune(
    model: Annotated[Path, typer.Option(help="Model directory to start from (ours, imported llama2.c or HF).")],
    data: Annotated[Path, typer.Option(help="Training data: JSONL, CSV or TSV.")],
    out: Annotated[Path, typer.Option(help="Run folder: metrics, checkpoints, model/ (and adapter/ for LoRA).")],
    task: Annotated[str, typer.Option(help="lm (prompt/completion), chat (messages), classify (text/label) or tag "
                                           "(text/phrases: an O/B/I keyphrase tagger).")] = "lm",
    val: Annotated[Path | None, typer.Option(help="Validation data (default: --val-fraction of train).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of train held out when --val is not given.")] = 0.1,
    mode: Annotated[str, typer.Option(help="full or lora.")] = "full",
    head: Annotated[str, typer.Option(help="classify: generative (label as completion) or classifier.")] = "generative",
    labels: Annotated[str | None, typer.Option(help="classify: comma-separated label set (default: from train).")] = None,
    class_weights: Annotated[str, typer.Option(help="classify, head classifier: none or balanced (n/(k*count)).")] = "none",
    select_metric: Annotated[str, typer.Option(help="classify: val metric that picks the kept weights: accuracy or "
                                                    "macro_f1.")] = "accuracy",
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha (scale alpha/r).")] = 16,
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
    lora_targets: Annotated[str, typer.Option(help="Comma-separated linear layers to adapt.")] = "q_proj,v_proj",
    merge: Annotated[bool, typer.Option(help="LoRA: also write the merged model to out/model.")] = False,
    base_dtype: Annotated[str, typer.Option(help="LoRA: frozen base weights in float32 or bfloat16 (half the "
                                                 "memory; needs --precision bf16).")] = "float32",
    epochs: Annotated[float, typer.Option(help="Passes over the training data (when --steps is not given).")] = 3.0,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides --epochs).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 2e-5 full, 1e-3 LoRA).")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 16,
    grad_accum: Annotated[int, typer.Option(help="Micro-steps per optimizer step.")] = 1,
    seq_len: Annotated[int, typer.Option(help="Most tokens per example (longer ones keep their answer).")] = 256,
    warmup: Annotated[int | None, typer.Option(help="Warmup steps (default 5% of steps).")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    eval_every: Annotated[int, typer.Option(help="Steps between evaluations (0: at the end only).")] = 100,
    patience: Annotated[int, typer.Option(help="Stop after this many evaluations without improvement (0: off).")] = 0,
    ckpt_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 100,
    precision: Annotated[str, typer.Option(help="bf16 (autocast) or fp32.")] = "bf16",
    dtype: Annotated[str, typer.Option(help="Weights of the written model: float32 or bfloat16.")] = "float32",
    seed: Annotated[int, typer.Option(help="Seed for data order and adapter/head init.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue from out/checkpoints/last.pt if present.")] = True,
) -> None:
    """Fine-tune a model directory on task data (full or LoRA), keeping the best evaluation's weights."""
    import math

    from slmforge.train.finetune import FinetuneConfig, read_records
    from slmforge.train.finetune import finetune as run_finetune
    from slmforge.train.loop import TrainConfig

    cfg = FinetuneConfig(task=task, mode=mode, head=head, labels=labels.split(",") if labels else None,
                         class_weights=class_weights, select_metric=select_metric,
                         lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         lora_targets=[t.strip() for t in lora_targets.split(",") if t.strip()],
                         val_fraction=0.0 if val else val_fraction, merge=merge, dtype=dtype,
                         base_dtype=base_dtype)
    if steps is None:
        n_train = len(read_records(data)) * (1 if val else 1 - val_fraction)
        steps = max(1, math.ceil(epochs * n_train / (batch_size * grad_accum)))
    peak = lr if lr is not None else (1e-3 if mode == "lora" else 2e-5)
    tcfg = TrainConfig(max_steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=peak,
                       min_lr=peak / 10, warmup_steps=max(steps // 20, 1) if warmup is None else warmup,
                       weight_decay=weight_decay, precision=precision, eval_every=eval_every, ckpt_every=ckpt_every,
                       patience=patience, best_metric=None if patience == 0 else cfg.best_metric[0],
                       best_mode=cfg.best_metric[1], seed=seed, device=device)
    summary = run_finetune(model, data, out, cfg, tcfg, val_path=val, resume=resume)
    m = summary["metrics"]
    parts = [f"{m['trainable_params']:,} trainable params ({m['trainable_pct']:.2f}%)", f"{m['steps']} steps"]
    if m.get("val_loss") is not None:
        parts.append(f"val loss {m['val_loss']:.4f}")
    if m.get("val_accuracy") is not None:
        parts.append(f"val accuracy {m['val_accuracy']:.3f}")
    if m.get("val_macro_f1") is not None:
        parts.append(f"val macro-F1 {m['val_macro_f1']:.3f}")
    if m.get("val_tag_f1") is not None:
        parts.append(f"val tag F1 {m['val_tag_f1']:.3f}")
    if m.get("stopped_early"):
        parts.append(f"stopped early, best step {m['best_step']}")
    typer.echo(f"wrote {', '.join(summary['outputs'].values())} · " + " · ".join(parts))


def import_hf_cmd(
    src: Annotated[str, typer.Argument(help="Local HF directory (Llama, Qwen2, SmolLM), or a hub id in the local cache.")],
    out_dir: Annotated[Path, typer.Argument(help="Model directory to write.")],
    dtype: Annotated[str, typer.Option(help="Weights to write: float32 or bfloat16.")] = "float32",
) -> None:
    """Convert a local Hugging Face Llama/Qwen2/SmolLM model directory into a slmforge model directory."""
    from slmforge.hf_import import import_hf

    typer.echo(f"wrote {import_hf(src, out_dir, dtype=dtype)}")


def merge_lora_cmd(
    model_dir: Annotated[Path, typer.Argument(help="The base model directory the adapter was trained on.")],
    adapter_dir: Annotated[Path, typer.Argument(help="The LoRA adapter (out/adapter of a finetune run).")],
    out_dir: Annotated[Path, typer.Argument(help="Merged model directory to write.")],
    dtype: Annotated[str, typer.Option(help="Weights to write: float32 or bfloat16.")] = "float32",
) -> None:
    """Fold a LoRA adapter into its base model: a plain model directory transformers loads as is."""
    from slmforge.train.finetune import merge_lora

    if not adapter_dir.is_dir():
        raise SlmforgeError(f"{adapter_dir}: no such adapter directory")
    typer.echo(f"wrote {merge_lora(model_dir, adapter_dir, out_dir, dtype=dtype)}")
