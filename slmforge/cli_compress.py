"""CLI commands that make a model smaller: `slmforge distill pretrain|finetune|generate`, `prune`, `quantize`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmforge.compress.prune import PruneConfig
from slmforge.compress.quantize import QuantizeConfig
from slmforge.errors import SlmforgeError
from slmforge.stage_config import options_from
from slmforge.train.distill import SeqDistillConfig
from slmforge.train.finetune import FinetuneConfig
from slmforge.train.kd import DistillConfig
from slmforge.train.pretrain import PretrainConfig

distill_app = typer.Typer(no_args_is_help=True, help="Train a student with a teacher's output distribution "
                                                     "(knowledge distillation), or on its answers (generate).")


@distill_app.command("pretrain")
@options_from(DistillConfig, name="kd")
@options_from(PretrainConfig)
def distill_pretrain(
    cfg: PretrainConfig,
    kd: DistillConfig,
    teacher: Annotated[Path, typer.Option(help="Teacher model directory (same tokenizer as the data).")],
    data: Annotated[Path, typer.Option(help="Packed token folder (slmforge pack).")],
    out: Annotated[Path, typer.Option(help="Run folder: metrics, checkpoints, model/.")],
    preset: Annotated[str | None, typer.Option(help="Student size preset (a fresh student).")] = None,
    init: Annotated[Path | None, typer.Option(help="Student model directory to start from (e.g. a pruned model "
                                                   "to heal).")] = None,
    ctx: Annotated[int | None, typer.Option(help="Context length of a preset student (default: the teacher's).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from out/checkpoints/last.pt if present.")] = True,
) -> None:
    """Language-model distillation on packed tokens: a fresh student (--preset) or an existing one (--init)."""
    from slmforge.config import preset as make_preset
    from slmforge.modeldir import ModelDir
    from slmforge.train.pretrain import pretrain as run_pretrain

    if (preset is None) == (init is None):
        raise SlmforgeError("distill pretrain: give the student as --preset (fresh) or --init (a model directory)")
    t = ModelDir.open(teacher)
    tok = t.load_tokenizer()
    model_cfg = None
    if preset is not None:
        model_cfg = make_preset(preset, vocab_size=tok.vocab_size,
                                max_position_embeddings=ctx or t.config.max_position_embeddings)
    model_dir = run_pretrain(data, out, model_cfg, tok, cfg, resume=resume, init=init, teacher=teacher, kd=kd)
    typer.echo(f"wrote {model_dir}")


@distill_app.command("finetune")
@options_from(DistillConfig, name="kd")
@options_from(FinetuneConfig)
def distill_finetune(
    cfg: FinetuneConfig,
    kd: DistillConfig,
    teacher: Annotated[Path, typer.Option(help="Teacher model directory: fine-tuned for the same task (a classifier "
                                               "or tagger head for those), same tokenizer as the student.")],
    model: Annotated[Path, typer.Option(help="Student model directory to start from.")],
    data: Annotated[Path, typer.Option(help="Training data: JSONL, CSV or TSV, as for finetune.")],
    out: Annotated[Path, typer.Option(help="Run folder: metrics, checkpoints, model/.")],
    val: Annotated[Path | None, typer.Option(help="Validation data (default: --val-fraction of train).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from out/checkpoints/last.pt if present.")] = True,
) -> None:
    """Task distillation: fine-tune a student on task data with the teacher's outputs in the loss."""
    from slmforge.train.finetune import finetune as run_finetune

    summary = run_finetune(model, data, out, cfg, val_path=val, resume=resume, teacher=teacher, kd=kd)
    if not summary:  # a rank other than 0 under torchrun: rank 0 reports
        return
    m = summary["metrics"]
    parts = [f"{m['total_params']:,} params (teacher {summary['distill']['teacher_params']:,})", f"{m['steps']} steps"]
    for name in ("val_loss", "val_accuracy", "val_macro_f1", "val_tag_f1"):
        if m.get(name) is not None:
            parts.append(f"{name.replace('_', ' ')} {m[name]:.4f}")
    typer.echo(f"wrote {', '.join(summary['outputs'].values())} · " + " · ".join(parts))


@distill_app.command("generate")
@options_from(SeqDistillConfig)
def distill_generate(cfg: SeqDistillConfig) -> None:
    """Sequence-level distillation: the teacher (any LM spec, any tokenizer) answers each prompt; the answers are
    written as rows for `slmforge finetune` (prompt/completion, chat messages, or text/label with --labels).
    Re-running resumes."""
    from slmforge.train.distill import generate_targets

    s = generate_targets(cfg)
    typer.echo(f"wrote {cfg.out} · {s['rows']:,} rows ({s['generated']:,} new, {s['skipped']:,} already there, "
               f"{s['failed']:,} failed, {s['empty']:,} empty, {s['dropped']:,} naming no label) · "
               f"{s['seconds']:,.1f} s · next: slmforge finetune --task {s['task']} --data {cfg.out} ...")


@options_from(QuantizeConfig)
def quantize(
    cfg: QuantizeConfig,
    model: Annotated[Path, typer.Argument(help="Model directory to quantize.")],
    out: Annotated[Path, typer.Argument(help="Quantized model directory to write.")],
) -> None:
    """Weight-only int8 (per channel) or int4 (groups of 32) for CPU decoding; serve, generate and predict load
    the result like any model directory, and `export gguf --type q8_0|q4_0` writes the same weights for llama.cpp."""
    from slmforge.compress.quantize import QUANT_FILE, quantize_dir

    path = quantize_dir(model, out, cfg)
    size = (path / QUANT_FILE).stat().st_size
    typer.echo(f"wrote {path} ({cfg.bits}-bit weights: {size / 1e6:.2f} MB in {QUANT_FILE})")


@options_from(PruneConfig)
def prune(
    cfg: PruneConfig,
    model: Annotated[Path, typer.Argument(help="Model directory to prune.")],
    out: Annotated[Path, typer.Argument(help="Pruned model directory to write.")],
    data: Annotated[Path, typer.Option(help="Packed tokens (same tokenizer) to rank structures on.")],
) -> None:
    """Structured pruning (MLP neurons, kv groups, embedding channels, layers) by activation importance; heal the
    result with `slmforge distill pretrain --init OUT --teacher MODEL`."""
    from slmforge.compress.prune import prune_dir
    from slmforge.modeldir import ModelDir

    path = prune_dir(model, data, out, cfg)
    p = ModelDir.open(path).meta["prune"]
    typer.echo(f"wrote {path} ({p['params']:,} params, {p['params_pct']}% of the original)")


def compress_cmd(
    model: Annotated[Path, typer.Argument(help="Model directory to compress (the teacher of the healing run).")],
    data: Annotated[Path, typer.Option(help="Packed tokens (same tokenizer): calibration and healing data.")],
    out: Annotated[Path, typer.Option(help="Folder for the stages' model directories and the report.")],
    recipe: Annotated[str | None, typer.Option(help="A compress recipe: a YAML path or a bundled name "
                                                    "(prune-heal-int8, int4). Default: prune-heal-int8.")] = None,
    judge_text: Annotated[list[Path] | None, typer.Option(help="Real text files for bits/byte (repeatable).")] = None,
) -> None:
    """Prune -> heal by distillation from the original -> quantize, each stage resumable, then the compression
    report (report.md / .json / .png): params, weights on disk, peak memory, decode tok/s x1 and x16, bits/byte."""
    from slmforge.compress.pipeline import compress, load_compress_recipe, report_markdown

    cfg = load_compress_recipe(recipe or "prune-heal-int8")
    report = compress(model, data, out, cfg, judge_text or [])
    typer.echo(report_markdown(report))
    typer.echo(f"wrote {out / 'report.md'}, report.json, report.png")
