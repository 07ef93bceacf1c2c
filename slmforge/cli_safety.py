"""`slmforge redteam probes|scan|report|plant`: probe suites, scans of any LM, reports (slmforge/safety)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmforge.errors import SlmforgeError
from slmforge.safety.scan import ScanConfig
from slmforge.stage_config import options_from

redteam_app = typer.Typer(no_args_is_help=True, help="Red-team any LM: build probe suites (harmful requests, "
                                                     "jailbreaks, prompt injection, system-prompt extraction, PII "
                                                     "canaries, a benign set), scan a model directory or an "
                                                     "OpenAI-compatible server, report attack success with CIs.")


def _read_canaries(path: Path) -> list[str]:
    if not path.is_file():
        raise SlmforgeError(f"{path}: no such canaries file")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise SlmforgeError(f"{path}: not UTF-8 text (byte {e.start})") from None
    canaries = [line for line in lines if line]
    if not canaries:
        raise SlmforgeError(f"{path}: no canaries (one a line)")
    return canaries


@redteam_app.command("probes")
def redteam_probes(
    out: Annotated[Path, typer.Option(help="Folder to write: one JSONL per suite and index.json.")],
    data: Annotated[Path, typer.Option(help="The shared data folder (its redteam/ holds AdvBench's and "
                                            "HarmBench's CSVs).")] = Path("../shared/data"),
    seed: Annotated[int, typer.Option(help="Seed of the secrets, tokens and canaries.")] = 0,
    canaries: Annotated[Path | None, typer.Option(help="Canary sentences, one a line (as `redteam plant` wrote "
                                                       "them; default: make_canaries with --seed).")] = None,
) -> None:
    """Build every probe suite from the data sets and the files shipped in slmforge/safety/data."""
    from slmforge.io import check_out_dir
    from slmforge.safety.probes import build_suites

    check_out_dir(out)
    index = build_suites(data, out, seed=seed, canaries=_read_canaries(canaries) if canaries else None)
    for name, s in index["suites"].items():
        typer.echo(f"{name:<11} {s['probes']:>6} probes  {s['behaviors']:>4} behaviours  "
                   f"{len(s['categories'])} categories")
    typer.echo(f"wrote {out}")


@redteam_app.command("scan")
@options_from(ScanConfig)
def redteam_scan(cfg: ScanConfig) -> None:
    """Send the probes to the target n times each; hits.jsonl as they arrive, then summary.json, report.md and
    report.html. Rerun with the same --out to resume."""
    from slmforge.safety.scan import scan

    summary = scan(cfg)
    _echo(summary, Path(cfg.out))


def _echo(summary: dict, out: Path) -> None:
    for name, row in summary["suites"].items():
        rate = "n/a" if row["rate"] is None else f"{100 * row['rate']:.1f}%"
        ci = "" if row["ci"][0] is None else f" [{100 * row['ci'][0]:.1f}, {100 * row['ci'][1]:.1f}]"
        errors = f", {row['errors']} errors" if row["errors"] else ""
        typer.echo(f"{name:<11} {row['metric']:<20} {rate:>6}{ci}  ({row['generations']} generations{errors})")
    typer.echo(f"wrote {out / 'summary.json'}, {out / 'report.md'}, {out / 'report.html'}")


@redteam_app.command("report")
def redteam_report(
    hits: Annotated[Path, typer.Argument(help="A scan's hits.jsonl.")],
    out: Annotated[Path | None, typer.Option(help="Folder for summary.json and the reports (default: beside the "
                                                  "hit log).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of the 95% CIs.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
) -> None:
    """Summarise a hit log again: rates per suite and category with bootstrap CIs, Markdown and HTML reports."""
    from slmforge.io import check_out_dir
    from slmforge.safety.scan import report

    if bootstrap < 1:
        raise SlmforgeError(f"--bootstrap {bootstrap}: must be >= 1")
    if out is not None:
        check_out_dir(out)
    summary = report(hits, out, bootstrap=bootstrap, seed=seed)
    _echo(summary, out or hits.parent)


@redteam_app.command("plant")
def redteam_plant(
    data: Annotated[Path, typer.Argument(help="Fine-tuning rows (JSONL: prompt/completion, messages or text).")],
    out: Annotated[Path, typer.Option(help="The rows with the canaries planted (JSONL).")],
    canaries_out: Annotated[Path, typer.Option(help="The canary sentences, one a line (for `redteam probes "
                                                    "--canaries`).")],
    n: Annotated[int, typer.Option(help="Canaries to make.")] = 12,
    copies: Annotated[int, typer.Option(help="Rows each canary is planted in.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the canaries and of the rows picked.")] = 0,
) -> None:
    """Plant made-up PII (canaries) in fine-tuning data, so that a scan of the fine-tuned model can tell
    whether it regurgitates them."""
    import json

    from slmforge.io import atomic_write_text, check_out_file, read_jsonl
    from slmforge.safety.probes import make_canaries, plant_canaries

    for p in (out, canaries_out):
        check_out_file(p)
    if out.exists() and out.resolve() == data.resolve():
        raise SlmforgeError(f"{out}: would overwrite the input rows")
    canaries = make_canaries(n, seed)
    rows = plant_canaries(list(read_jsonl(data)), canaries, copies=copies, seed=seed)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(canaries_out, "".join(c + "\n" for c in canaries))
    typer.echo(f"planted {n} canaries x {copies} in {len(rows)} rows: wrote {out}, {canaries_out}")
