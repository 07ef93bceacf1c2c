"""CLI commands for fine-tuning and model conversion: `slmforge finetune`, `import hf`, `merge-lora`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmforge.errors import SlmforgeError
from slmforge.stage_config import options_from
from slmforge.train.finetune import FinetuneConfig


@options_from(FinetuneConfig)
def finetune(
    cfg: FinetuneConfig,
    model: Annotated[Path, typer.Option(help="Model directory to start from (ours, imported llama2.c or HF).")],
    data: Annotated[Path, typer.Option(help="Training data: JSONL, CSV or TSV.")],
    out: Annotated[Path, typer.Option(help="Run folder: metrics, checkpoints, model/ (and adapter/ for LoRA).")],
    val: Annotated[Path | None, typer.Option(help="Validation data (default: --val-fraction of train).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from out/checkpoints/last.pt if present.")] = True,
) -> None:
    """Fine-tune a model directory on task data (full or LoRA), keeping the best evaluation's weights."""
    from slmforge.train.finetune import finetune as run_finetune

    summary = run_finetune(model, data, out, cfg, val_path=val, resume=resume)
    if not summary:  # a rank other than 0 under torchrun: rank 0 reports
        return
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
    from slmforge.convert.hf import import_hf

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


def ensemble_cmd(
    members: Annotated[list[Path], typer.Argument(help="Two or more fine-tuned tagger directories (finetune --task tag).")],
    out: Annotated[Path, typer.Option(help="The ensemble model directory to write.")],
) -> None:
    """One model directory whose taggers' O/B/I probabilities `predict --task extract` averages."""
    from slmforge.train.heads import save_tagger_ensemble

    typer.echo(f"wrote {save_tagger_ensemble(members, out)} · {len(members)} taggers")
