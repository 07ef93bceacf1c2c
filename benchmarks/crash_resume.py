#!/usr/bin/env python
"""Crash safety, measured: each stage's real CLI command killed at random points, resumed, and compared
with an uninterrupted run of the same command.

For each stage (pretrain, finetune, distill pretrain with a top-k logit cache, data curate, synth) the
command first runs straight through (the reference). Then the same command runs into a fresh output and
is interrupted --kills times with SIGKILL (to its whole process group: workers die too) and once each
with SIGTERM and SIGINT, re-running the same command after each interruption; a last re-run finishes
it. The interruption points are seeded and spread over the run (one drawn in each of equal slices of
the work, read from the files the stage writes: training steps, synth bytes, curation shards); every
other kill waits for a write in progress (a temp file of a checkpoint, a model directory or a shard
appearing) and kills it there. A SIGTERM or SIGINT run must exit by itself, without a traceback, with
one line saying it can be resumed.

"The result" that must be identical: the model's weights (model.safetensors bytes) and every metrics row's
step, training loss and validation loss (finetune: also the kept best step and its val loss; distill: also
the top-k cache files); synth's JSONL bytes; curate's every JSONL file (shards, removed documents, the
synthetic stories) and the report's per-stage document counts and removal reasons. Timings and speeds
differ by nature and are not compared.

A stage with writes after its last unit of work gets one more kill there: the trainers while model/ is
written, curate while its report is. Tiny sizes (a 200k-parameter model, 150-200 steps, 15k offline stories,
curation of 7,500 documents in shards of 250 with 2 worker processes) so the whole benchmark takes about three
minutes on 2 cores:

    python benchmarks/crash_resume.py                    # all stages, 5 kills each
    python benchmarks/crash_resume.py --stages synth,curate --kills 8 --seed 1

Writes benchmarks/results/crash_resume.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from train_throughput import machine_info  # benchmarks/ is on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the kill/resume harness is test code
import crash_harness as ch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("pretrain", "finetune", "distill", "curate", "synth")


def build_stage(name: str, work: Path, out: Path, ref: Path | None) -> ch.Stage:
    """Stage `name` writing to `out`; `ref` is its finished reference run (None while making it)."""
    inp = work / "inputs"
    teacher = work / "pretrain-ref" / "model"  # the pretrain reference: base model and teacher
    if name == "pretrain":
        return ch.make_pretrain(inp, out)
    if name == "finetune":
        return ch.make_finetune(inp, teacher, out)
    if name == "distill":
        return ch.make_distill(inp, teacher, out)
    if name == "curate":
        return ch.make_curate(inp, out, ref=ch.curate_reference_sizes(ref) if ref else None)
    return ch.make_synth(out, ref_bytes=ref.stat().st_size if ref else None)


def out_path(work: Path, name: str, kind: str) -> Path:
    return work / f"{name}-{kind}" / "stories.jsonl" if name == "synth" else work / f"{name}-{kind}"


def run_stage(name: str, work: Path, n_kills: int, rng: random.Random, console: Console) -> dict:
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    ref_out = out_path(work, name, "ref")
    ref_out.parent.mkdir(parents=True, exist_ok=True)
    ref_stage = build_stage(name, work, ref_out, None)
    rc, ref_s, last = ch.run_to_end(ref_stage, logs / f"{name}-ref.log")
    if rc != 0:
        raise SystemExit(f"{name}: the reference run failed (exit {rc}):\n{last}")
    reference = ref_stage.result()

    out = out_path(work, name, "crash")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = build_stage(name, work, out, ref_out)
    events, t0 = [], time.perf_counter()
    plan = ch.interruption_plan(n_kills, rng)
    if stage.final_globs:  # and one more kill, in the writes after the last unit of work (the model, the report)
        plan.append((1.0, "kill-final-write"))
    for i, (target, action) in enumerate(plan):
        ev = ch.interrupt(stage, target, action, logs / f"{name}-crash-{i}.log", rng)
        if action in ("sigterm", "sigint"):
            ev["clean_exit"] = ch.clean_exit(ev)
        events.append(ev)
        console.print(f"  {name}: {action:14s} at {ev.get('progress', ev['target']):.0%} "
                      f"(rc {ev['rc']}{', cut a write' if ev.get('cut_write') else ''}) {ev['log'][-120:]!r}")
        if ev.get("finished_first") and ev["rc"] != 0:
            break  # a resume that fails by itself: reported below
    rc, _, last = ch.run_to_end(stage, logs / f"{name}-crash-final.log")
    crash_s = time.perf_counter() - t0
    diffs = ch.differences(reference, stage.result()) if rc == 0 else [f"the final resume failed: {last}"]
    kills = [e for e in events if e["action"].startswith("kill") and not e.get("finished_first")]
    signals = [e for e in events if e["action"] in ("sigterm", "sigint")]
    return {
        "command": "slmforge " + " ".join(ref_stage.argv),
        "progress_measure": stage.measure,
        "reference_s": round(ref_s, 2),
        "interrupted_total_s": round(crash_s, 2),
        "interruptions": events,
        "kills": len(kills),
        "kills_cutting_a_write": sum(e["cut_write"] for e in kills),
        "signals_clean": all(e.get("clean_exit") for e in signals) and len(signals) == 2,
        "resumed_ok": rc == 0 and not any(e.get("finished_first") and e["rc"] != 0 for e in events),
        "identical": rc == 0 and not diffs,
        "differences": diffs,
        "temp_files_left_at_end": stage.temp_files(),
    }


def print_table(console: Console, results: dict) -> None:
    table = Table(title="Kill -9 / SIGTERM / SIGINT and resume vs an uninterrupted run")
    for col in ("stage", "kills", "cut a write", "kill points (progress)", "SIGTERM/INT clean", "resumed",
                "identical", "ref s", "interrupted s", "temp files left"):
        table.add_column(col, justify="left" if col in ("stage", "kill points (progress)") else "right")
    for name, r in results.items():
        points = ", ".join(f"{e['progress']:.0%}" for e in r["interruptions"]
                           if e["action"].startswith("kill") and "progress" in e)
        table.add_row(name, str(r["kills"]), str(r["kills_cutting_a_write"]), points,
                      "yes" if r["signals_clean"] else "NO", "yes" if r["resumed_ok"] else "NO",
                      "yes" if r["identical"] else "NO: " + "; ".join(r["differences"])[:80],
                      f"{r['reference_s']:.1f}", f"{r['interrupted_total_s']:.1f}", str(len(r["temp_files_left_at_end"])))
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated, from " + ", ".join(STAGES))
    ap.add_argument("--kills", type=int, default=5, help="SIGKILLs per stage (SIGTERM and SIGINT come on top)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="keep the runs here (default: a temp folder, removed)")
    ap.add_argument("--out", type=Path, default=RESULTS / "crash_resume.json")
    args = ap.parse_args()
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in names if s not in STAGES]
    if bad:
        ap.error(f"unknown stage {bad[0]!r}")
    if {"finetune", "distill"} & set(names) and "pretrain" not in names:
        names.insert(0, "pretrain")  # its reference model is their base model and teacher

    console = Console(width=max(Console().width, 150))  # the table has many columns
    work = args.workdir or Path(tempfile.mkdtemp(prefix="crash_resume."))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        ch.make_inputs(work)
        rng = random.Random(args.seed)
        results = {}
        for name in names:
            console.print(f"[bold]{name}")
            results[name] = run_stage(name, work, args.kills, rng, console)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(console, results)
    report = {"machine": machine_info(), "seed": args.seed, "kills_per_stage": args.kills,
              "total_s": round(time.perf_counter() - t0, 1), "stages": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2).replace(str(work), "$WORK") + "\n")  # (a temp folder)
    console.print(f"wrote {args.out} ({report['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
