"""Kill the real CLI at chosen points of a stage, resume it, and compare with an uninterrupted run.

Shared by tests/test_crash_resume.py (one kill per stage, small) and benchmarks/crash_resume.py (several
kills per stage, SIGTERM and SIGINT too). A Stage knows its command, how far a run has got (read from the
files it writes, so the harness needs no hooks in slmforge), the temp files a write in progress leaves, and
what "the result" is: what an interrupted-and-resumed run must reproduce exactly.

Each run is started in its own session (process group), so that a SIGKILL takes down a stage's worker
processes with it, as a machine crash or the OOM killer of a container would, and SIGINT goes to the whole
group, as Ctrl-C in a terminal does; SIGTERM goes to the main process only, as `kill PID` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACTIONS = ("kill", "kill-mid-write", "kill-final-write", "sigterm", "sigint")


@dataclass
class Stage:
    name: str
    argv: list[str]                          # slmforge arguments
    out: Path                                # the output (a folder, or synth's JSONL file)
    progress: Callable[[float], float]       # fraction done, from files written since a run started at t
    temp_globs: tuple[str, ...]              # relative to out_dir: files a write in progress leaves
    result: Callable[[], dict]               # what an interrupted run must reproduce
    env: dict = field(default_factory=dict)
    writing: Callable[[], bool] | None = None  # a write in progress (default: a temp file exists)
    final_globs: tuple[str, ...] = ()        # temp files of the writes after the last unit (the model, a report)
    measure: str = ""                        # what `progress` is a share of

    @property
    def out_dir(self) -> Path:
        return self.out if self.out.suffix != ".jsonl" else self.out.parent

    def temp_files(self) -> list[str]:
        return sorted({str(p.relative_to(self.out_dir)) for g in self.temp_globs for p in self.out_dir.glob(g)})

    def in_write(self) -> bool:
        return self.writing() if self.writing is not None else bool(self.temp_files())


# ------------------------------------------------------------------------------------------------ runs


def start(stage: Stage, log: Path) -> subprocess.Popen:
    """`python -m slmforge ARGS` in a new session; stderr (and stdout) to `log`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", **stage.env}
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "slmforge", *stage.argv], cwd=stage.out_dir.parent, env=env,
                                stdout=f, stderr=f, start_new_session=True)


def run_to_end(stage: Stage, log: Path, timeout: float = 600) -> tuple[int, float, str]:
    """Run the stage's command until it exits: (exit code, seconds, the log's last lines)."""
    t0 = time.perf_counter()
    proc = start(stage, log)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    return rc, time.perf_counter() - t0, tail(log)


def tail(log: Path, lines: int = 3) -> str:
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


def interrupt(stage: Stage, target: float, action: str, log: Path, rng: random.Random,
              timeout: float = 300) -> dict:
    """Start (resume) the stage and interrupt it once `target` of the work is done.

    kill            SIGKILL to the process group a random 0-50 ms after the target is reached
    kill-mid-write  SIGKILL as soon as a temp file of a write in progress appears after the target
                    (a checkpoint, a shard; falls back to a plain kill when none appears within 3 s)
    kill-final-write  SIGKILL once the work is done (target 1) and one of stage.final_globs appears: the
                    model directory or the report being written
    sigterm/sigint  the signal, then wait for the process to exit on its own
    Returns what happened: when, how far the run had got, whether a write was cut, the exit."""
    assert action in ACTIONS, action
    t0 = time.time()
    base = stage.progress(t0)  # what earlier runs left: wait for this run's own progress past the target
    old_temps = set(stage.temp_files())  # left by earlier kills: not this run's
    proc = start(stage, log)
    seen = 0.0
    while proc.poll() is None and ((seen := stage.progress(t0)) < target or seen <= base):
        time.sleep(0.003)
    if proc.poll() is not None:  # the run finished (or failed) before the target: nothing interrupted
        return {"action": action, "target": round(target, 3), "finished_first": True, "rc": proc.returncode,
                "log": tail(log)}
    mid_write = False
    if action == "kill-mid-write":
        deadline = time.time() + 3
        while proc.poll() is None and time.time() < deadline and not (mid_write := stage.in_write()):
            pass  # no sleep: checkpoint and shard writes take milliseconds
    elif action == "kill-final-write":
        deadline = time.time() + 30
        while proc.poll() is None and time.time() < deadline and \
                not (mid_write := any(next(stage.out_dir.glob(g), None) for g in stage.final_globs)):
            pass
    elif action == "kill":
        time.sleep(rng.uniform(0, 0.05))
    at_s, at = round(time.time() - t0, 3), stage.progress(t0)
    if action.startswith("kill"):
        _signal_group(proc, signal.SIGKILL)
    elif action == "sigint":
        _signal_group(proc, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:  # a signal that did not stop the run is a failure; do not hang
        _signal_group(proc, signal.SIGKILL)
        rc = proc.wait()
    temps = stage.temp_files()
    cut_line = stage.out.suffix == ".jsonl" and stage.out.is_file() and _ends_mid_line(stage.out)
    return {"action": action, "target": round(target, 3), "at_s": at_s, "progress": round(max(at, seen), 3),
            "cut_write": bool(mid_write or set(temps) - old_temps or cut_line), "temp_files_left": temps, "rc": rc,
            "traceback": "Traceback" in log.read_text(encoding="utf-8", errors="replace"), "log": tail(log)}


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # it had just exited
        pass


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def clean_exit(ev: dict) -> bool:
    """A SIGTERM/SIGINT run exited by itself, with one line that says the run can be resumed."""
    last = (ev.get("log", "").splitlines() or [""])[-1]
    return (ev.get("rc") or 0) > 0 and not ev.get("traceback") and "resume" in last


def differences(ref: dict, got: dict) -> list[str]:
    """What differs between two results (empty when identical), one readable line per key."""
    out = []
    for key in sorted(set(ref) | set(got)):
        a, b = ref.get(key), got.get(key)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            out.append(f"{key}: {len(a)} vs {len(b)} entries, first difference at index {first}: "
                       f"{a[first] if first < len(a) else None} vs {b[first] if first < len(b) else None}")
        elif isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            out.append(f"{key}: differs in {', '.join(map(str, keys[:5]))}{' ...' if len(keys) > 5 else ''}")
        else:
            out.append(f"{key}: {a} vs {b}")
    return out


# ------------------------------------------------------------------------------------------------ inputs


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_inputs(work: Path, stories: int = 1500) -> Path:
    """The offline inputs every stage needs, under work/inputs: a story corpus, a tokenizer, the corpus packed,
    prompt/completion rows for fine-tuning. Built in this process (not timed, not interrupted)."""
    from slmforge.data.pack import pack_tokens
    from slmforge.data.synth import synthesize
    from slmforge.tokenizer import train_tokenizer

    inp = work / "inputs"
    if (inp / "done").is_file():
        return inp
    inp.mkdir(parents=True, exist_ok=True)
    corpus = inp / "corpus.jsonl"
    synthesize("stories", stories, corpus, seed=0, progress=False)
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    tok = train_tokenizer(texts, vocab_size=512)
    tok.save(inp / "tok")
    pack_tokens(corpus, tok, inp / "packed", val_fraction=0.05, progress=False)
    with open(inp / "ft.jsonl", "w", encoding="utf-8") as f:
        for text in texts[:400]:
            first, _, rest = text.partition(". ")
            f.write(json.dumps({"prompt": first + ".", "completion": " " + (rest or "The end.")[:80]}) + "\n")
    (inp / "done").write_text("")
    return inp


# ------------------------------------------------------------------------------------------------ stages

# fp32 and one thread: every run of a command does the same arithmetic, whatever the machine's bf16 support
TRAIN_FLAGS = ["--batch-size", "8", "--seq-len", "64", "--log-every", "1", "--threads", "1", "--no-progress",
               "--precision", "fp32"]
TRAIN_TEMPS = ("checkpoints/.*.tmp", ".model.*.tmp", ".*.tmp.png", ".*.tmp")
TRAIN_FINAL = (".model.*.tmp/model.safetensors",)  # the model directory being written, after the last step


def _trainer_progress(out: Path, steps: int) -> Callable[[float], float]:
    def progress(since: float) -> float:
        metrics = out / "metrics.jsonl"
        try:  # rows from before this run started are the previous run's (a resume first cuts them back)
            if metrics.stat().st_mtime < since:
                return 0.0
            lines = metrics.read_bytes().splitlines()
        except OSError:
            return 0.0
        for line in reversed(lines):
            try:
                return json.loads(line)["step"] / steps
            except (ValueError, KeyError):
                continue  # a row cut by the kill
        return 0.0
    return progress


def _trainer_result(out: Path, extra: Callable[[], dict] | None = None) -> Callable[[], dict]:
    def result() -> dict:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        res = {"model.safetensors sha256": sha256(out / "model" / "model.safetensors"),
               "metrics steps": [r["step"] for r in rows],
               "metrics losses": [r["loss"] for r in rows],
               "metrics val losses": [r.get("val_loss") for r in rows]}
        return res | (extra() if extra else {})
    return result


def make_pretrain(inp: Path, out: Path, steps: int = 200, ckpt_every: int = 20) -> Stage:
    argv = ["pretrain", "--data", str(inp / "packed"), "--tokenizer", str(inp / "tok"), "--out", str(out),
            "--preset", "200k", "--ctx", "128", "--steps", str(steps), "--eval-every", str(steps // 4),
            "--eval-batches", "4", "--ckpt-every", str(ckpt_every), *TRAIN_FLAGS]
    return Stage("pretrain", argv, out, _trainer_progress(out, steps), TRAIN_TEMPS, _trainer_result(out),
                 final_globs=TRAIN_FINAL, measure=f"training steps done, of {steps}")


def make_finetune(inp: Path, base: Path, out: Path, steps: int = 150, ckpt_every: int = 20) -> Stage:
    """Full fine-tune with residual dropout (the RNG state must resume too), keeping the best val loss."""
    argv = ["finetune", "--model", str(base), "--data", str(inp / "ft.jsonl"), "--out", str(out),
            "--max-steps", str(steps), "--eval-every", str(max(1, steps // 6)), "--ckpt-every", str(ckpt_every),
            "--lr", "1e-3", "--dropout", "0.1", *TRAIN_FLAGS]

    def summary() -> dict:
        m = json.loads((out / "finetune.json").read_text(encoding="utf-8"))["metrics"]
        return {"finetune.json best_step, val_loss": [m["best_step"], m["val_loss"]]}

    return Stage("finetune", argv, out, _trainer_progress(out, steps), TRAIN_TEMPS, _trainer_result(out, summary),
                 final_globs=TRAIN_FINAL, measure=f"training steps done, of {steps}")


def make_distill(inp: Path, teacher: Path, out: Path, steps: int = 150, ckpt_every: int = 20) -> Stage:
    """LM distillation into a fresh student, the teacher's top-k logits cached on disk as training reads them."""
    argv = ["distill", "pretrain", "--teacher", str(teacher), "--data", str(inp / "packed"), "--out", str(out),
            "--preset", "200k", "--ctx", "128", "--steps", str(steps), "--eval-every", str(steps // 3),
            "--eval-batches", "4", "--ckpt-every", str(ckpt_every), "--top-k", "16", "--cache",
            str(out / "topk-cache"), *TRAIN_FLAGS]

    def cache() -> dict:
        return {f"topk-cache/{p.name} sha256": sha256(p) for p in sorted((out / "topk-cache").iterdir())}

    return Stage("distill", argv, out, _trainer_progress(out, steps), TRAIN_TEMPS, _trainer_result(out, cache),
                 final_globs=TRAIN_FINAL, measure=f"training steps done, of {steps}")


def make_synth(out: Path, n: int = 15_000, ref_bytes: int | None = None) -> Stage:
    """Offline stories, appended a batch of whole rows at a time. Progress: bytes written, against the
    reference file's size (ref_bytes; before it is known, ~1.4 kB a story)."""
    argv = ["synth", "stories", "--n", str(n), "--out", str(out), "--seed", "3"]
    total = ref_bytes or n * 1400

    def progress(since: float) -> float:
        try:
            return out.stat().st_size / total
        except OSError:
            return 0.0

    def result() -> dict:
        stats = json.loads(Path(f"{out}.stats.json").read_text(encoding="utf-8"))
        return {f"{out.name} sha256": sha256(out), "stats complete": stats["complete"]}

    stage = Stage("synth", argv, out, progress, (f".{out.name}.stats.json.*.tmp",), result,
                  measure=f"bytes written, of the reference file's {total:,}")
    stage.writing = lambda: out.is_file() and _ends_mid_line(out)  # rows are appended: a batch half on disk
    return stage


def make_curate(inp: Path, out: Path, synth_n: int = 6000, shard_docs: int = 250, workers: int = 2,
                ref: dict | None = None, config: Path | None = None) -> Stage:
    """Synthesize, ingest the synthetic stories with the corpus (whose stories they repeat: dedup has work),
    then dedup and quality filter, shard by shard. Progress is read from the synth file and the shard markers,
    weighted by `ref` (the reference run's sizes: synth bytes, shards per stage). The config (JSON, which is
    YAML) is written to `config` (default: beside `out`)."""
    config = config or out.parent / f"{out.name}.yaml"
    config.write_text(json.dumps({
        "inputs": [str(inp / "corpus.jsonl")], "synth": {"recipe": "stories", "n": synth_n, "seed": 0},
        "workers": workers, "shard_docs": shard_docs, "stages": [{"dedup": {}}, {"quality": {}}]}))
    argv = ["data", "curate", str(config), "--out", str(out)]
    ref = ref or {"synth_bytes": synth_n * 1400, "stage_shards": 2 * (synth_n + 1500) // shard_docs}

    def progress(since: float) -> float:
        synth = out / "synth" / "stories.jsonl"
        s = min(1.0, synth.stat().st_size / ref["synth_bytes"]) if synth.is_file() else 0.0
        source = 1.0 if (out / "00-source.done").is_file() else 0.0
        shards = len(list(out.glob("0[1-9]-*/part-*.stats.json"))) / max(1, ref["stage_shards"])
        return 0.25 * s + 0.15 * source + 0.6 * shards  # roughly the share of a run's time in each part

    def result() -> dict:
        # documents name their source file, which lies under `out` for the synthetic ones: compare them with
        # that folder's name taken out (the reference ran in another folder)
        files = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes().replace(str(out).encode(), b"OUT")).hexdigest()
                 for p in sorted(out.rglob("*.jsonl")) if not any(part.startswith(".") for part in p.relative_to(out).parts)}
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        funnel = [[s["stage"], s["in"]["docs"], s["out"]["docs"], s["reasons"]] for s in report["stages"]]
        return {"jsonl files sha256": files, "report stages": funnel,
                "final": os.readlink(out / "final") if (out / "final").is_symlink() else None}

    return Stage("curate", argv, out, progress, ("*/.*.tmp", ".*.tmp", "00-source/.partial/.*.tmp"), result,
                 final_globs=(".report.*.tmp", ".funnel.png.tmp"),
                 measure=f"0.25 x synth bytes (of {ref['synth_bytes']:,}) + 0.15 x source ingested + 0.6 x stage "
                         f"shards written (of {ref['stage_shards']})")


def curate_reference_sizes(out: Path) -> dict:
    """The sizes make_curate's progress is measured against, from a finished run."""
    return {"synth_bytes": (out / "synth" / "stories.jsonl").stat().st_size,
            "stage_shards": len(list(out.glob("0[1-9]-*/part-*.stats.json")))}


def interruption_plan(n_kills: int, rng: random.Random, signals: tuple[str, ...] = ("sigterm", "sigint"),
                      lo: float = 0.03, hi: float = 0.95) -> list[tuple[float, str]]:
    """Targets spread over the run (one drawn in each of n equal slices of [lo, hi]), in increasing order,
    with actions: kills alternating between plain and mid-write, and each signal at a random slot. (A stage
    with final writes gets one more kill, at target 1: see interrupt.)"""
    n = n_kills + len(signals)
    width = (hi - lo) / n
    targets = [lo + (i + rng.random()) * width for i in range(n)]
    kills = ["kill-mid-write" if i % 2 else "kill" for i in range(n_kills)]
    actions = list(kills)
    for sig in signals:
        actions.insert(rng.randrange(len(actions) + 1), sig)
    return list(zip(targets, actions, strict=True))
