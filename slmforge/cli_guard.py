"""`slmforge guard train|eval`: the guard's classifiers (slmforge/safety/classifier.py), for `serve --guard`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmforge.errors import SlmforgeError

guard_app = typer.Typer(no_args_is_help=True, help="Train and evaluate the guard's classifiers (harmful requests, "
                                                   "harmful compliance) for `slmforge serve --guard`.")

Data = Annotated[Path, typer.Option(help="The shared data folder (redteam/, routing/, medical/, summarization/, "
                                         "sst2/).")]
Benign = Annotated[Path | None, typer.Option(help="Benign-but-risky-looking probes (JSONL/CSV) among the request "
                                                  "negatives, split by behaviour like the rest (default: "
                                                  "slmforge/safety/data/benign.jsonl when there is one).")]


def _benign(kind: str, benign: Path | None) -> Path | None:
    if kind != "request":
        if benign is not None:
            raise SlmforgeError("--benign is for --kind request (it holds requests, not replies)")
        return None
    if benign is not None:
        return benign
    from slmforge.safety.probes import BENIGN_FILE

    return Path(BENIGN_FILE) if Path(BENIGN_FILE).is_file() else None


def _fractions(text: str) -> tuple[float, ...]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) <= 0:
        raise SlmforgeError(f"--split {text}: expected three positive fractions TRAIN,VAL,TEST (e.g. 0.6,0.2,0.2)")
    return parts


def _table(report: dict) -> str:
    lines = [f"{'held out':<16} {'n':>5} {'flagged':>8} {'rate':>7}  95% CI"]
    for name, e in report["pooled"].items():
        lines.append(f"{name:<16} {e['n']:>5} {e['flagged']:>8} {e['rate']:>7.1%}  "
                     f"[{e['ci95'][0]:.1%}, {e['ci95'][1]:.1%}]")
    return "\n".join(lines)


@guard_app.command("train")
def guard_train(
    kind: Annotated[str, typer.Option(help="request (is this request harmful?: the input guard) or response "
                                           "(does this reply comply with a harmful request?: the output guard).")],
    out: Annotated[Path, typer.Option(help="Classifier folder to write (classifier.json, arrays.safetensors, "
                                           "vocab.json) and its metrics.json.")],
    data: Data = Path("../shared/data"),
    benign: Benign = None,
    target_rate: Annotated[float, typer.Option(help="The threshold is the lowest at which at most this share of "
                                                    "each validation benign set is flagged.")] = 0.03,
    split: Annotated[str, typer.Option(help="Train, validation and test shares, by behaviour.")] = "0.6,0.2,0.2",
    seed: Annotated[int, typer.Option(help="Seed of the split and the samples of the benign sources.")] = 0,
) -> None:
    """Train a guard classifier split by behaviour (C, class weight and threshold chosen on validation), score
    the held-out test split once, write the classifier and metrics.json."""
    from slmforge.io import check_out_dir, write_json
    from slmforge.safety.classifier import describe, make_data, save_classifier, train_and_test

    fractions = _fractions(split)
    benign = _benign(kind, benign)
    check_out_dir(out)
    rows = make_data(kind, data, benign, seed)
    clf, report = train_and_test(kind, rows, seed, fractions, target_rate)
    clf.info.update({"data": str(data), "benign": str(benign) if benign else None})
    save_classifier(clf, out)
    write_json(Path(out) / "metrics.json", {"kind": kind, "data": str(data), "benign": str(benign) if benign
                                            else None, **report})
    typer.echo(_table(report["test"]))
    typer.echo(f"wrote {out} · {describe(clf)}")


@guard_app.command("eval")
def guard_eval(
    classifier: Annotated[Path, typer.Argument(help="Classifier folder (slmforge guard train).")],
    data: Annotated[Path | None, typer.Option(help="Score the held-out test split of this data folder, made as "
                                                   "at training (the classifier's kind, seed and split).")] = None,
    benign: Benign = None,
    probes: Annotated[list[Path] | None, typer.Option(
        "--probes", help="Probe files (JSONL/CSV, slmforge redteam probes): the share flagged per suite and "
        "category. Repeatable.")] = None,
    threshold: Annotated[float | None, typer.Option(help="Score at this threshold instead of the "
                                                         "classifier's.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures here as JSON.")] = None,
) -> None:
    """Flag rates of a classifier on its held-out test split (--data) or on probe files (--probes), with
    bootstrap 95% CIs."""
    from slmforge.io import check_out_file, write_json
    from slmforge.safety.classifier import evaluate as evaluate_rows
    from slmforge.safety.classifier import load_classifier, make_data, probe_rates, split_groups

    if data is None and not probes:
        raise SlmforgeError("guard eval: give --data (the held-out split) or --probes FILE")
    if json_out:
        check_out_file(json_out)
    clf = load_classifier(classifier)
    if threshold is not None:
        if not 0 <= threshold <= 1:
            raise SlmforgeError(f"--threshold {threshold}: must be in [0, 1]")
        clf.threshold = threshold
    result: dict = {"classifier": str(classifier), "kind": clf.kind, "threshold": clf.threshold}
    if data is not None:
        seed = int(clf.info.get("seed", 0))
        fractions = tuple(clf.info.get("fractions") or (0.6, 0.2, 0.2))
        rows = make_data(clf.kind, data, _benign(clf.kind, benign), seed)
        test = split_groups(rows, fractions, seed)[2]
        result["test"] = evaluate_rows(clf, test)
        typer.echo(_table(result["test"]))
    if probes:
        from slmforge.safety.probes import read_probes

        result["probes"] = {}
        for path in probes:
            rates = probe_rates(clf, read_probes(path))
            result["probes"][str(path)] = rates
            typer.echo(f"{path}:")
            for name, e in rates.items():
                typer.echo(f"  {name:<32} {e['n']:>5} {e['flagged']:>6} {e['rate']:>7.1%}  "
                           f"[{e['ci95'][0]:.1%}, {e['ci95'][1]:.1%}]")
    if json_out:
        write_json(json_out, result)
        typer.echo(f"wrote {json_out}")
