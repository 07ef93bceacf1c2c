#!/usr/bin/env python
"""The quickstart as `make demo` runs it, timed, with its summary kept as a committed result.

    python benchmarks/quickstart_demo.py              # the teacher path (needs stories260K in ../shared/data)
    python benchmarks/quickstart_demo.py --template   # the offline template generator, the quickstart's defaults
                                                      # (judged on the same real text)

The teacher path is the Makefile's command: stories260K imported into runs/stories260K, 3,000 stories
sampled from it, a 1,024-token BPE, 5 training minutes, judged on the TinyStories validation text beside
stories260K. Each run starts from an empty --work folder (the quickstart resumes finished stages, which
would time nothing). Writes the quickstart's report.json (the recipe runner's: pretraining metrics, the judge's
bits per byte and samples; runs before the quickstart became a recipe kept its summary.json), the wall time of the whole
command and the machine's load before it to benchmarks/results/quickstart[_template].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TS = REPO.parent / "shared" / "data" / "tinystories"
SLMFORGE = Path(sys.executable).with_name("slmforge")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--template", action="store_true", help="the template generator (no teacher), all defaults")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-quickstart")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out = args.work / ("template" if args.template else "teacher")
    dest = args.json or REPO / "benchmarks" / "results" / ("quickstart_template.json" if args.template
                                                           else "quickstart.json")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(SLMFORGE), "quickstart", "--out", str(out)]
    teacher = REPO / "runs" / "stories260K"
    if (TS / "stories260K.bin").is_file() and not (teacher / "model.safetensors").is_file():
        subprocess.run([str(SLMFORGE), "import", "llama2c", str(TS / "stories260K.bin"), str(TS / "tok512.bin"),
                        str(teacher)], check=True)
    if not args.template:
        if not (TS / "stories260K.bin").is_file():
            sys.exit(f"error: {TS / 'stories260K.bin'} not found (run with --template)")
        cmd += ["--teacher", str(teacher), "--stories", "3000", "--vocab-size", "1024", "--minutes", "5"]
    if (TS / "tinystories_valid_part1.txt").is_file():  # both paths are judged on real text (the template
        cmd += ["--judge-text", str(TS / "tinystories_valid_part1.txt")]  # path's README figure is this one)
        if (teacher / "model.safetensors").is_file():
            cmd += ["--reference", str(teacher)]
    load_before = os.getloadavg()[0]
    t = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t
    summary = json.loads((out / "report.json").read_text())
    result = {"command": " ".join(Path(c).name if c == str(SLMFORGE) else os.path.relpath(c, REPO)
                                  if c.startswith(str(REPO)) else c for c in cmd),
              "wall_s": round(wall, 1), "load_avg_1m_before": load_before, "cpus": os.cpu_count(),
              "machine": platform.machine(), "summary": summary}
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{wall:.0f} s wall; wrote {dest}")


if __name__ == "__main__":
    main()
