"""One process against two under torchrun (gloo, CPU), on the same global batch: the loss curves must agree
within 1e-4 over 50 steps, with DDP and with FSDP2; then a 2-process FSDP run is killed (SIGKILL) after its
step-25 checkpoint and resumed on one process, and must end on the same curve.

    .venv/bin/python benchmarks/distributed.py        # -> benchmarks/results/distributed.json

Real text (TinyStories valid, ../shared/data), the 1m preset (d128, 4 layers), 50 steps of 16 x 128 tokens,
fp32, one thread per process. Every run is the real CLI: `slmforge pretrain` (under torchrun for 2).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEXT = REPO.parent / "shared" / "data" / "tinystories" / "tinystories_valid_part1.txt"
WORK = REPO / "runs" / "bench_distributed"
OUT = REPO / "benchmarks" / "results" / "distributed.json"
STEPS = 50
ARGS = ["--preset", "1m", "--steps", str(STEPS), "--batch-size", "8", "--global-batch-size", "16", "--seq-len", "128",
        "--precision", "fp32", "--threads", "1", "--log-every", "1", "--eval-every", "25", "--eval-batches", "4",
        "--ckpt-every", "25", "--lr", "2e-3", "--warmup", "5"]


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r


def pretrain_cmd(out: Path, procs: int, *extra: str) -> list[str]:
    base = ["pretrain", "--data", str(WORK / "packed"), "--tokenizer", str(WORK / "tok"), "--out", str(out), *ARGS,
            "--no-progress", *extra]
    if procs == 1:
        return [str(BIN / "slmforge"), *base]
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(procs), "--no-python",
            str(BIN / "slmforge"), *base]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def compare(a: Path, b: Path) -> dict:
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, STEPS + 1))
    return {"max_abs_loss_diff": max(abs(x["loss"] - y["loss"]) for x, y in zip(ra, rb, strict=True)),
            "max_abs_val_loss_diff": max(abs(x["val_loss"] - y["val_loss"]) for x, y in zip(ra, rb, strict=True)
                                         if "val_loss" in x),
            "final_loss": [ra[-1]["loss"], rb[-1]["loss"]]}


def processes_running(marker: str) -> list[int]:
    """PIDs whose command line contains marker."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def timed(cmd: list[str]) -> float:
    t0 = time.time()
    sh(cmd)
    return round(time.time() - t0, 2)


def main() -> None:
    if not TEXT.is_file():
        sys.exit(f"{TEXT} not present")
    WORK.mkdir(parents=True, exist_ok=True)
    slm = str(BIN / "slmforge")
    if not (WORK / "packed" / "index.json").is_file():
        sh([slm, "tokenizer", "train", str(TEXT), "--out", str(WORK / "tok"), "--vocab-size", "2048"])
        sh([slm, "pack", str(TEXT), "--tokenizer", str(WORK / "tok"), "--out", str(WORK / "packed")])
    runs = {name: WORK / name for name in ("one", "ddp2", "fsdp2", "fsdp2_killed")}
    wall = {"one": timed(pretrain_cmd(runs["one"], 1, "--no-resume")),
            "ddp2": timed(pretrain_cmd(runs["ddp2"], 2, "--no-resume")),
            "fsdp2": timed(pretrain_cmd(runs["fsdp2"], 2, "--fsdp", "--no-resume"))}

    # SIGKILL torchrun and its workers once step 30 is logged (the checkpoint is step 25's). The workers are
    # not in torchrun's process group: they are found by the run folder on their command line.
    killed = runs["fsdp2_killed"]
    shutil.rmtree(killed, ignore_errors=True)  # no old metrics to mistake for this run's
    p = subprocess.Popen(pretrain_cmd(killed, 2, "--fsdp", "--no-resume"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while p.poll() is None:
        if (killed / "metrics.jsonl").is_file() and len(rows(killed)) >= 30:
            for pid in processes_running(str(killed)):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    p.wait()
    while processes_running(str(killed)):
        time.sleep(0.05)
    killed_at = len(rows(killed))
    assert killed_at < STEPS, "the run ended before it was killed"
    resumed = sh(pretrain_cmd(killed, 1, "--progress"))  # 1 process x 2 micro-steps: the same global batch

    result = {
        "command": "python benchmarks/distributed.py",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads_per_process": 1},
        "setup": {"data": str(TEXT.relative_to(REPO.parent)), "preset": "1m", "steps": STEPS,
                  "global_batch": "16 x 128 tokens", "precision": "fp32", "backend": "gloo"},
        "one_vs_ddp2": compare(runs["one"], runs["ddp2"]),
        "one_vs_fsdp2": compare(runs["one"], runs["fsdp2"]),
        "fsdp2_killed_resumed_on_one_vs_fsdp2": {
            **compare(runs["fsdp2"], killed), "killed_after_step": killed_at,
            "resumed_from": 25, "resume_message": next((ln for ln in resumed.stderr.splitlines() if "saved by" in ln), None)},
        "wall_s": wall,
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
