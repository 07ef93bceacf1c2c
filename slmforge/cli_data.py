"""`slmforge data ...` and `slmforge synth ...`: the data system's commands (see slmforge/data/).

The single-stage commands (dedup, filter, decontam) are one-stage curate runs, so they write the same
layout and report as `slmforge data curate`: OUT/00-source, OUT/01-<stage>/part-*.jsonl (kept),
removed-*.jsonl (with `removed_by`), OUT/final -> the last stage, OUT/report.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(no_args_is_help=True, help="Ingest, deduplicate, filter, decontaminate and curate text.")

Inputs = Annotated[list[str], typer.Argument(help="Files or folders: .txt, .jsonl, .csv, .tsv, .parquet, "
                                                  "HF datasets dirs (.gz too).")]
TextField = Annotated[str, typer.Option(help="Field / column holding the text.")]
Split = Annotated[str, typer.Option(help="Plain text: one document per paragraph, line or file.")]
Workers = Annotated[int, typer.Option(help="Processes for the per-document work.")]
OnError = Annotated[str, typer.Option(help="Broken input lines: fail (default) or skip (counted).")]


def _curate_one(inputs: list[str], out: Path, stage: dict, text_field: str, split: str, workers: int,
                on_error: str, executor: str = "local") -> None:
    from slmforge.data.curate import CurateConfig, curate

    report = curate(CurateConfig(out=str(out), inputs=list(inputs), text_field=text_field, split=split,
                                 stages=[stage], workers=workers, on_error=on_error, executor=executor))
    last = report["stages"][-1]
    typer.echo(f"wrote {out}/final · {last['in']['docs']:,} -> {last['out']['docs']:,} documents · "
               f"reasons {last['reasons'] or '{}'} · report {out}/report.md")


@data_app.command("ingest")
def data_ingest(
    inputs: Inputs,
    out: Annotated[Path, typer.Option(help="Output folder of part-*.jsonl shards and stats.json.")],
    text_field: TextField = "text",
    split: Split = "paragraph",
    normalize: Annotated[str, typer.Option(help="Unicode normal form: NFC, NFKC or none.")] = "NFC",
    on_error: OnError = "fail",
    shard_docs: Annotated[int, typer.Option(help="Documents per output shard.")] = 50_000,
) -> None:
    """Read any supported input into normalised JSONL shards (streaming, metadata kept)."""
    from slmforge.data.ingest import ingest

    s = ingest(inputs, out, shard_docs=shard_docs, text_field=text_field, split=split, normalize=normalize,
               on_error=on_error)
    typer.echo(f"wrote {out} · {s.files} files · {s.docs:,} documents · {s.bytes / 1e6:.1f} MB · "
               f"{s.empty:,} empty · {s.skipped:,} skipped")


@data_app.command("dedup")
def data_dedup(
    inputs: Inputs,
    out: Annotated[Path, typer.Option(help="Output folder.")],
    threshold: Annotated[float, typer.Option(help="MinHash Jaccard threshold for near-duplicates.")] = 0.8,
    ngram: Annotated[int, typer.Option(help="Word n-gram shingle size.")] = 5,
    num_perm: Annotated[int, typer.Option(help="MinHash permutations.")] = 128,
    exact: Annotated[bool, typer.Option(help="Remove exact duplicates (normalised text).")] = True,
    near: Annotated[bool, typer.Option(help="Remove near-duplicates (MinHash LSH).")] = True,
    text_field: TextField = "text",
    split: Split = "paragraph",
    workers: Workers = 1,
    on_error: OnError = "fail",
) -> None:
    """Exact and MinHash-LSH near-duplicate removal; the first document of each cluster is kept."""
    stage = {"dedup": {"threshold": threshold, "ngram": ngram, "num_perm": num_perm, "exact": exact, "near": near}}
    _curate_one(inputs, out, stage, text_field, split, workers, on_error)


@data_app.command("decontam")
def data_decontam(
    inputs: Inputs,
    out: Annotated[Path, typer.Option(help="Output folder.")],
    eval: Annotated[list[str], typer.Option("--eval", help="Evaluation set file (repeatable).")],
    n: Annotated[int, typer.Option(help="Shared word n-gram length that marks contamination.")] = 13,
    eval_text_field: Annotated[str, typer.Option(help="Field / column of the evaluation texts.")] = "text",
    text_field: TextField = "text",
    split: Split = "paragraph",
    workers: Workers = 1,
    on_error: OnError = "fail",
) -> None:
    """Drop documents sharing a long n-gram with any evaluation set."""
    stage = {"decontam": {"eval": list(eval), "n": n, "text_field": eval_text_field}}
    _curate_one(inputs, out, stage, text_field, split, workers, on_error)


@data_app.command("curate")
def data_curate(
    config: Annotated[Path, typer.Argument(help="Curate config (YAML): inputs/synth, stages, workers.")],
    out: Annotated[str | None, typer.Option(help="Output folder (default: the config's).")] = None,
    workers: Annotated[int | None, typer.Option(help="Processes (default: the config's).")] = None,
    executor: Annotated[str | None, typer.Option(help="local or datatrove (default: the config's).")] = None,
) -> None:
    """The whole chain (source -> dedup/quality/decontam/edu) with a report; re-run to resume."""
    from slmforge.data.curate import curate, load_curate_config

    cfg = load_curate_config(config, out=out, workers=workers, executor=executor)
    report = curate(cfg)
    first, last = report["stages"][0], report["stages"][-1]
    typer.echo(f"wrote {cfg.out}/final · {first['out']['docs']:,} -> {last['out']['docs']:,} documents · "
               f"{report['seconds']:.1f} s · report {cfg.out}/report.md")
