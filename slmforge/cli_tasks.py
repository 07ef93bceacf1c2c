"""CLI commands for task work: `slmforge task-data`, `predict`, `eval-task` and `run` (recipes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml

from slmforge.errors import SlmforgeError


def _options(pairs: list[str] | None) -> dict:
    out = {}
    for p in pairs or []:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise SlmforgeError(f"--option {p!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)  # 500 -> int, 0.5 -> float, fr -> str
    return out


def task_data(
    name: Annotated[str, typer.Argument(help="sst2, multi30k, wmt_biomed, translation_domain, pubmedqa, hdfs, "
                                             "inspec, dialogsum, or text (a corpus as pretraining rows: "
                                             "--option 'files=[tinyshakespeare/input.txt]').")],
    out: Annotated[Path, typer.Option(help="Folder to write train/val/test JSONL and stats.json into.")],
    data: Annotated[Path | None, typer.Option(help="The source data folder (default $SLMFORGE_DATA, else ../shared/data).")] = None,
    seed: Annotated[int, typer.Option(help="Split seed.")] = 0,
    option: Annotated[list[str] | None, typer.Option(help="Loader option KEY=VALUE (repeatable).")] = None,
) -> None:
    """Turn a real task data set into slmforge task JSONL (seeded, deterministic splits)."""
    from slmforge.data.tasks import prepare, resolve_data_dir

    stats = prepare(name, resolve_data_dir(data), out, seed, **_options(option))
    counts = stats.get("counts") or {k: v.get("counts") for k, v in stats.items() if isinstance(v, dict)}
    typer.echo(f"wrote {out} · {json.dumps(counts)}")
    from slmforge.data.tasks import describe_overlap, overlap_of

    for split, o in overlap_of(stats).items():
        typer.echo(f"overlap {split}: {describe_overlap(o)}")


def predict(
    model: Annotated[Path, typer.Argument(help="Model directory.")],
    input: Annotated[Path, typer.Option("--input", help="Task JSONL (text, prompt, messages or events rows).")],
    out: Annotated[Path, typer.Option(help="Predictions JSONL to write.")],
    task: Annotated[str, typer.Option(help="classify, generate, deeplog or extract (keyphrases, a tagger).")] = "generate",
    labels: Annotated[str | None, typer.Option(help="classify with a plain LM: comma-separated labels.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="generate: most new tokens.")] = 64,
    stop: Annotated[list[str] | None, typer.Option(help="generate: stop string (repeatable).")] = None,
    batch: Annotated[int, typer.Option(help="Rows per batch.")] = 16,
    top_g: Annotated[int, typer.Option(help="deeplog: an event outside the top g guesses is anomalous.")] = 9,
    top_k: Annotated[int, typer.Option(help="extract: keyphrases per row.")] = 10,
    limit: Annotated[int | None, typer.Option(help="Only the first N rows.")] = None,
    beams: Annotated[int, typer.Option(help="generate: beam search with this many beams (1: greedy).")] = 1,
    length_penalty: Annotated[float, typer.Option(
        help="generate with beams: a finished output's log-probability is divided by length**this.")] = 1.0,
) -> None:
    """Batch inference over a JSONL file: {"id", "prediction", ...reference fields} per row."""
    from slmforge.infer.predict import predict_file

    s = predict_file(model, task, input, out, labels=labels.split(",") if labels else None, max_tokens=max_tokens,
                     stop=stop or (), batch_size=batch, top_g=top_g, top_k=top_k, limit=limit, progress=True,
                     beams=beams, length_penalty=length_penalty)
    typer.echo(f"wrote {s['rows']} predictions to {out} in {s['seconds']:.1f} s ({s['rows_per_s']:.1f} rows/s)")


def eval_task(
    task: Annotated[str, typer.Argument(help="classification, binary, translation, summarization, qa, keyphrase.")],
    predictions: Annotated[Path, typer.Argument(help="Predictions JSONL (slmforge predict).")],
    refs: Annotated[Path | None, typer.Option(help="References JSONL (default: the prediction rows' own fields).")] = None,
    labels: Annotated[str | None, typer.Option(help="classification: comma-separated label set.")] = None,
    positive: Annotated[str, typer.Option(help="binary: the positive label.")] = "anomalous",
    ks: Annotated[str, typer.Option(help="keyphrase: cutoffs, comma-separated.")] = "5,10",
    tokenize: Annotated[str | None, typer.Option(help="translation: sacrebleu tokeniser (13a, intl, zh, ...).")] = None,
    pred_field: Annotated[str, typer.Option(help="Field holding the prediction.")] = "prediction",
    ref_field: Annotated[str | None, typer.Option(help="Field holding the reference.")] = None,
    out: Annotated[Path | None, typer.Option(help="Metrics JSON to write (default PREDICTIONS.metrics.json).")] = None,
) -> None:
    """Score predictions against references; prints a table and writes the metrics as JSON."""
    from rich.console import Console
    from rich.table import Table

    from slmforge.evaluate.tasks import evaluate_predictions
    from slmforge.io import check_out_file, write_json

    try:
        cutoffs = [int(k) for k in ks.split(",") if k.strip()]
    except ValueError:
        raise SlmforgeError(f"--ks {ks!r}: expected comma-separated integers") from None
    out = out or predictions.with_name(predictions.name.removesuffix(".jsonl") + ".metrics.json")
    check_out_file(out)  # before the table is printed, not after
    m = evaluate_predictions(task, predictions, refs, pred_field=pred_field, ref_field=ref_field,
                             labels=labels.split(",") if labels else None, positive=positive, ks=cutoffs,
                             tokenize=tokenize)
    table = Table(title=f"{m['task']} · {predictions}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in m.items():
        if isinstance(v, float):
            table.add_row(k, f"{v:.2f}")
        elif isinstance(v, int) and not isinstance(v, bool):
            table.add_row(k, f"{v:,}")
    Console().print(table)
    write_json(out, m)
    typer.echo(f"wrote {out}")


def run(
    recipe: Annotated[str, typer.Argument(help="A recipe YAML, or a bundled recipe name (sst2, hdfs-logs, ...).")],
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<name>); re-running resumes.")] = None,
    data: Annotated[Path | None, typer.Option(help="The source data folder (default $SLMFORGE_DATA, else ../shared/data).")] = None,
    minutes_scale: Annotated[float, typer.Option(help="Multiply every training time budget.")] = 1.0,
    variant: Annotated[list[str] | None, typer.Option(help="Run only this variant (repeatable).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field: pretrain.max_minutes=5 "
                                                             "(a YAML value; repeatable).")] = None,
) -> None:
    """Run a task recipe: data -> tokenizer -> pretrain -> fine-tune variants -> predict -> eval -> report."""
    from slmforge.recipes import load_recipe, run_recipe
    from slmforge.stage_config import yaml_value

    overrides = {}
    for item in set_ or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SlmforgeError(f"--set {item!r}: expected FIELD=VALUE, e.g. pretrain.max_minutes=5")
        overrides[key.strip()] = yaml_value(value)
    run_recipe(load_recipe(recipe, overrides), out, data, minutes_scale, variant)
