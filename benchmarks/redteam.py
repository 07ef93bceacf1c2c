"""An unguarded model against the same model behind `slmforge serve --guard`, scanned on held-out behaviours.

    slmforge run support-chat-safety --out runs/recipes/support-chat-safety --data ../shared/data
    python benchmarks/redteam.py          # → benchmarks/results/redteam.json

The model is the support-chat-safety recipe's `plain` variant (support conversations only, no refusals). The
guard is trained here with `slmforge guard train`'s defaults (request and response classifiers, split by
behaviour 60/20/20, seed 0). The probes are the recipe's runs/.../data/redteam_probes.jsonl: the harmful
behaviours (AdvBench, HarmBench val) of the guard's test part, plain and 200 of their jailbreak copies, and the
benign-but-risky-looking probes of its test part — neither the guard nor the safety fine-tune saw them. Both
servers are `slmforge serve` processes on 127.0.0.1 (one thread each), scanned through their OpenAI URL by
`slmforge redteam scan` (one greedy reply of at most 48 tokens a probe): attack success per suite and per
category with 95% bootstrap CIs over behaviours. The recipe's own scans of `plain` and `safety` (safety
fine-tuning, no guard) are read from its report and put beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from slmforge.io import write_json
from slmforge.safety.scan import ScanConfig, scan

ROOT = Path(__file__).resolve().parents[1]
SLMFORGE = [sys.executable, "-m", "slmforge"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: Path, port: int, guard: Path | None, log: Path) -> subprocess.Popen:
    cmd = [*SLMFORGE, "serve", f"plain={model}", "--host", "127.0.0.1", "--port", str(port), "--no-compile",
           "--threads", "1"]
    if guard:
        cmd += ["--guard", str(guard)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if json.loads(r.read())["ready"]:
                    return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"error: the server exited; see {log}") from None
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"error: the server did not come up; see {log}")


def table(summary: dict) -> dict:
    return {"suites": {s: {k: row[k] for k in ("metric", "rate", "ci", "probes", "behaviors", "refusal_rate",
                                                 "errors")} for s, row in summary["suites"].items()},
            "categories": {s: {c: {"rate": row["rate"], "ci": row["ci"], "probes": row["probes"]}
                               for c, row in cats.items()} for s, cats in summary["categories"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe-run", type=Path, default=ROOT / "runs/recipes/support-chat-safety")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data")
    ap.add_argument("--work", type=Path, default=ROOT / "runs/redteam")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/redteam.json")
    args = ap.parse_args()
    run, work = args.recipe_run, args.work
    model, probes = run / "variants/plain/model", run / "data/redteam_probes.jsonl"
    if not (model / "model.safetensors").is_file() or not probes.is_file():
        raise SystemExit(f"error: {run}: run the support-chat-safety recipe first (see the docstring)")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for kind in ("request", "response"):  # the guard's classifiers, as `slmforge guard train` makes them
        if not (work / kind / "classifier.json").is_file():
            subprocess.run([*SLMFORGE, "guard", "train", "--kind", kind, "--data", str(args.data),
                            "--out", str(work / kind)], check=True)
    guard = work / "guard.yaml"
    guard.write_text("input:\n  classifier: request\noutput:\n  classifier: response\n")
    results = {}
    for name, cfg in (("unguarded", None), ("guarded", guard)):
        port = free_port()
        shutil.rmtree(work / f"scan-{name}", ignore_errors=True)  # a fresh scan: the server's port is new
        proc = serve(model, port, cfg, work / f"serve-{name}.log")
        try:
            t = time.time()
            summary = scan(ScanConfig(target=f"openai:http://127.0.0.1:{port}/v1#plain", probes=[str(probes)],
                                      out=str(work / f"scan-{name}"), n=1, temperature=0.0, max_tokens=48,
                                      concurrency=4, progress=False))
            results[name] = {**table(summary), "seconds": round(time.time() - t, 1)}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    report = json.loads((run / "report.json").read_text())
    results["recipe_scans"] = report["extras"].get("redteam")  # plain and safety, scanned as model dirs
    write_json(args.out, {
        "script": "benchmarks/redteam.py", "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "model": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else str(model),
        "probes": str(probes), "guard": guard.read_text(), "wall_s": round(time.time() - t0, 1), **results})
    for name in ("unguarded", "guarded"):
        for s, row in results[name]["suites"].items():
            lo, hi = row["ci"]
            print(f"{name:<10} {s:<10} {row['metric']:<20} {100 * row['rate']:5.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
                  f"  probes {row['probes']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
