"""The docs/tasks.md figures from recipe runs: one compact JSON and a Markdown table.

    slmforge run sst2 --out runs/recipes/sst2 --data ../shared/data     # ...and the other recipes
    python benchmarks/recipe_table.py runs/recipes --out benchmarks/results/recipes.json
    python benchmarks/recipe_table.py runs/recipes --out benchmarks/results/task_quality.json --merge  # re-run rows

Reads every runs/recipes/<name>/report.json (and its timings), keeps what the docs cite — data counts, the
loader's overlap report, per variant the val and test figure, steps, params, train seconds, which variant
validation chose — and prints the summary table of docs/tasks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def summarize(report: dict) -> dict:
    """The part of a recipe report the docs cite."""
    overlap = {name: {k: v for k, v in o.items() if k != "examples"} for name, o in report["data"]["overlap"].items()}
    pre = report.get("pretrain") or {}
    return {
        "recipe": report["recipe"], "metric": report["metric"], "chosen_variant": report["chosen_variant"],
        "chosen_on": report["chosen_on"], "counts": report["data"]["counts"], "overlap": overlap,
        "pretrain": {k: pre.get(k) for k in ("params", "steps", "corpus_tokens", "val_loss", "train_time_s")}
        if pre else None,
        "variants": [{k: v.get(k) for k in ("variant", "init", "mode", "head", "params", "trainable_params", "steps",
                                             "finetune_s", "total_train_s", "val_metric", "metric", "top_g")}
                     | {"test_metrics": v["metrics"]} for v in report["variants"]],
        "timings_s": report["timings_s"], "wall_s": round(sum(report["timings_s"].values()), 1),
        "peak_rss_mib": report.get("peak_rss_mib"), "minutes_scale": report["minutes_scale"],
        "extras": report.get("extras") or {},
    }


def val_curve(metrics: Path) -> list[dict]:
    """The chosen variant's evaluations: step, val loss and any val metric (the learning curve the docs cite)."""
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()
             if k == "step" or k.startswith("val_")} for r in rows if "val_loss" in r]


def fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def table(rows: list[dict]) -> str:
    lines = ["| recipe | wall | variant: val → test | chosen on val | params | test of chosen | metric |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = "; ".join(f"{v['variant']} {fmt(v['val_metric'])} → {fmt(v['metric'])}" for v in r["variants"])
        chosen = next(v for v in r["variants"] if v["variant"] == r["chosen_variant"])
        params = f"{chosen['params'] / 1e6:.2f}M" if chosen.get("params") else "–"
        lines.append(f"| {r['recipe']} | {r['wall_s'] / 60:.1f} min | {cells} | {r['chosen_variant']} | {params} | "
                     f"**{fmt(chosen['metric'])}** | {r['metric']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, help="folder holding one run folder per recipe")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/recipes.json"))
    ap.add_argument("--merge", action="store_true", help="keep --out's rows of recipes not run here")
    args = ap.parse_args()
    rows = []
    for p in sorted(args.runs.glob("*/report.json")):
        row = summarize(json.loads(p.read_text()))
        row["measured_on"] = time.strftime("%Y-%m-%d", time.gmtime(p.stat().st_mtime))
        row["val_curve"] = val_curve(p.parent / "variants" / row["chosen_variant"] / "metrics.jsonl")
        rows.append(row)
    if not rows:
        raise SystemExit(f"error: {args.runs}: no */report.json (run the recipes first)")
    if args.merge and args.out.is_file():
        new = {r["recipe"] for r in rows}
        rows = sorted([r for r in json.loads(args.out.read_text()) if r["recipe"] not in new] + rows,
                      key=lambda r: r["recipe"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(args.out)
    print(table(rows))


if __name__ == "__main__":
    main()
