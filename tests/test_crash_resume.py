"""Crash safety of the CLI stages: kill -9, SIGTERM and SIGINT, then resume to the uninterrupted result; a full
disk, a read-only, an unwritable output and a file in the output's path as one `error:` line and no
half-written file.

The kills run the real `slmforge` commands in subprocesses (tests/crash_harness.py); the trainer core's own
kill test is in test_train.py, and benchmarks/crash_resume.py kills each stage many more times. The disk
conditions need no root: each run gets a private mount namespace (`unshare`) with a tiny or a read-only tmpfs
as its output, or an identity without the root's override of file permissions; where the kernel forbids user
namespaces those tests skip.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import crash_harness as ch
import pytest

from conftest import run_cli

# Small runs: one kill each costs a few seconds of CPU. The references start in the background as soon as the
# inputs exist, so they run while the kills of earlier tests do (2 cores).
STEPS, CKPT = 30, 10


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Inputs (a story corpus, tokenizer, packed tokens, fine-tuning rows) and a random 200k model with their
    tokenizer: the base model to fine-tune and the teacher to distil."""
    from slmforge.config import preset
    from slmforge.model import LlamaModel
    from slmforge.modeldir import save_model_dir
    from slmforge.tokenizer import Tokenizer

    work = tmp_path_factory.mktemp("crash")
    inp = ch.make_inputs(work, stories=400)
    tok = Tokenizer.from_dir(inp / "tok")
    model = LlamaModel(preset("200k", vocab_size=tok.vocab_size, max_position_embeddings=128))
    model.reset_parameters(seed=0)
    save_model_dir(work / "base", model, tok, {"stage": "test"})
    return work


def stages(work: Path, kind: str) -> dict[str, ch.Stage]:
    inp = work / "inputs"
    synth = work / f"synth-{kind}"
    synth.mkdir(exist_ok=True)
    return {
        "finetune": ch.make_finetune(inp, work / "base", work / f"finetune-{kind}", STEPS, CKPT),
        "distill": ch.make_distill(inp, work / "base", work / f"distill-{kind}", STEPS, CKPT),
        "synth": ch.make_synth(synth / "stories.jsonl", n=3000, ref_bytes=3000 * 1420),
        # one worker: the pool's stop and kill are the benchmark's (its spawn start costs seconds here)
        "curate": ch.make_curate(inp, work / f"curate-{kind}", synth_n=1000, shard_docs=100, workers=1,
                                 ref={"synth_bytes": 1000 * 1420, "stage_shards": 28}),
    }


@pytest.fixture(scope="module")
def references(work):
    """Every stage's uninterrupted run, started at once in the background; a test waits for its own."""
    procs = {name: (stage, ch.start(stage, work / f"{name}-ref.log")) for name, stage in stages(work, "ref").items()}
    yield procs
    for _, proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def kill_and_resume(work: Path, references: dict, name: str, plan: list[tuple[float, str]]) -> list[dict]:
    """Interrupt the stage as `plan` says, resuming after each, finish it, and check it equals the reference."""
    stage = stages(work, "crash")[name]
    events = [ch.interrupt(stage, target, action, work / f"{name}-crash-{i}.log", random.Random(i))
              for i, (target, action) in enumerate(plan)]
    rc, _, last = ch.run_to_end(stage, work / f"{name}-crash-final.log")
    assert rc == 0, last
    for ev in events:
        assert not ev.get("finished_first"), f"the {ev['action']} came too late: {ev}"
        if ev["action"] in ("sigterm", "sigint"):
            assert ch.clean_exit(ev), ev
    ref, proc = references[name]
    assert proc.wait(300) == 0, ch.tail(work / f"{name}-ref.log")
    assert ch.differences(ref.result(), stage.result()) == []
    return events


def test_finetune_killed_while_writing_its_model_resumes_identically(work, references):
    """(A kill mid-run is test_train's and the distill test's: the same trainer core.)"""
    events = kill_and_resume(work, references, "finetune", [(1.0, "kill-final-write")])
    assert events[0]["cut_write"], "the kill should land while model/ is written"
    # the staging folder of the killed save is removed by the next save
    assert not [f for f in stages(work, "crash")["finetune"].temp_files() if f.startswith(".model.")]


def test_distill_with_a_topk_cache_killed_in_a_checkpoint_write_resumes_identically(work, references):
    events = kill_and_resume(work, references, "distill", [(0.5, "kill-mid-write")])
    assert events[0]["cut_write"], "the kill should land while a checkpoint is written"


def test_synth_sigterm_stops_after_a_whole_batch_and_a_kill_mid_write_is_cut_back(work, references):
    events = kill_and_resume(work, references, "synth", [(0.3, "sigterm"), (0.6, "kill-mid-write")])
    assert "whole rows only" in events[0]["log"] and "run the same command again to resume" in events[0]["log"]


def test_curate_sigint_stops_between_shards_and_a_kill_in_a_shard_write_resumes(work, references):
    events = kill_and_resume(work, references, "curate", [(0.55, "sigint"), (0.8, "kill-mid-write")])
    assert "shards written" in events[0]["log"]
    assert not stages(work, "crash")["curate"].temp_files()  # the killed write's temp file is gone too


# ------------------------------------------------------------------------------------------ disk and paths


def _user_namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True)
    return probe.returncode == 0


needs_userns = pytest.mark.skipif(not _user_namespaces(), reason="unshare cannot make a user + mount namespace here")


def stage_argv(work: Path, name: str, out: Path) -> list[str]:
    """The stage's command line writing to `out` (a folder; synth writes out/stories.jsonl)."""
    inp = work / "inputs"
    if name == "pretrain":
        return ch.make_pretrain(inp, out, STEPS, CKPT).argv
    if name == "finetune":
        return ch.make_finetune(inp, work / "base", out, STEPS, CKPT).argv
    if name == "distill":
        return ch.make_distill(inp, work / "base", out, STEPS, CKPT).argv
    if name == "synth":
        return ch.make_synth(out / "stories.jsonl", n=3000).argv
    return ch.make_curate(inp, out, synth_n=1000, shard_docs=100, workers=1,
                          config=work / f"curate-{out.parent.name}.yaml").argv


STAGE_NAMES = ("pretrain", "finetune", "distill", "synth", "curate")


def run_in_namespace(setup: str, argv: list[str], mnt: Path, keep: Path, unshare: list[str]) -> tuple[int, str]:
    """`setup` (shell, e.g. a mount on `mnt`), then `python -m slmforge ARGV`, in a new namespace; what the run
    left under `mnt` is copied to `keep` (the namespace's mounts vanish with it). Returns (exit code, stderr)."""
    keep.mkdir(parents=True)
    script = (f"{setup} || exit 99\n{shlex.join([sys.executable, '-m', 'slmforge', *argv])}\nrc=$?\n"
              f"cp -a {shlex.quote(str(mnt))}/. {shlex.quote(str(keep))}/ 2>/dev/null\nexit $rc")
    env = {**os.environ, "PYTHONPATH": str(ch.REPO), "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([*unshare, "sh", "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 99, f"setup failed: {p.stderr}"
    return p.returncode, p.stderr


def assert_one_error_line(rc: int, err: str, names: str, reason: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and "━" not in ln and not ln.startswith(("·", "curate ->"))]
    assert rc == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert lines and lines[-1].startswith("error: "), err[-3000:]
    assert names in lines[-1] and reason in lines[-1], lines[-1]
    return lines[-1]


def assert_nothing_half_written(root: Path) -> None:
    """No temp file of an unfinished write; every JSONL output ends in a whole line (metrics.jsonl may end in a
    torn row: the trainer drops it on resume); a checkpoint or model that exists loads."""
    import torch
    from safetensors.torch import load_file

    temps = [p for p in root.rglob(".*") if ".tmp" in p.name]
    assert not temps, temps
    for p in root.rglob("*.jsonl"):
        data = p.read_bytes()
        if p.name != "metrics.jsonl":
            assert not data or data.endswith(b"\n"), p
            for line in data.splitlines():
                json.loads(line)
    for p in root.rglob("*.pt"):
        torch.load(p, weights_only=False)
    for p in root.rglob("model.safetensors"):
        load_file(p)


@needs_userns
def test_disk_full_is_one_error_line_naming_the_output_and_nothing_is_half_written(work, tmp_path):
    """A 1 MB tmpfs: the first checkpoint (2.6 MB) or a synth batch does not fit; curate gets 2.5 MB, where its
    synthetic stories fit (synth's own case is the synth stage's) and the source shards do not."""
    cases = [(name, "2500k" if name == "curate" else "1m") for name in STAGE_NAMES]

    def run(case: tuple[str, str]) -> tuple[Path, int, str, Path]:
        name, size = case
        mnt, keep = tmp_path / f"mnt-{name}-{size}", tmp_path / f"keep-{name}-{size}"
        mnt.mkdir()
        rc, err = run_in_namespace(f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mnt))}",
                                   stage_argv(work, name, mnt / "out"), mnt, keep, ["unshare", "-rm"])
        return mnt, rc, err, keep

    with ThreadPoolExecutor(2) as pool:
        for mnt, rc, err, keep in pool.map(run, cases):
            assert_one_error_line(rc, err, str(mnt / "out"), "No space left on device")
            assert_nothing_half_written(keep)


@needs_userns
def test_read_only_output_is_one_error_line_naming_it(work, tmp_path):
    """One stage per kind of writer: the trainer core, rows appended, shards (the others fail the same way, at
    their output folder)."""

    def run(name: str) -> tuple[str, int, str]:
        mnt = tmp_path / f"mnt-{name}"
        mnt.mkdir()
        rc, err = run_in_namespace(f"mount -t tmpfs -o ro tmpfs {shlex.quote(str(mnt))}",
                                   stage_argv(work, name, mnt / "out"), mnt, tmp_path / f"keep-{name}",
                                   ["unshare", "-rm"])
        return name, rc, err

    with ThreadPoolExecutor(2) as pool:
        for name, rc, err in pool.map(run, ("pretrain", "synth", "curate")):
            assert_one_error_line(rc, err, str(tmp_path / f"mnt-{name}" / "out"), "Read-only file system")


@needs_userns
def test_unwritable_output_is_one_error_line_naming_it(work, tmp_path):
    """A folder the user may not write to. Root's permission override does not reach files outside its own user
    namespace, so the run gets one (mapped to the same user, without the override)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    rc, err = run_in_namespace("true", stage_argv(work, "synth", locked / "out"), locked, tmp_path / "keep",
                               ["unshare", "--user", "--map-user=1000", "--map-group=1000"])
    assert_one_error_line(rc, err, str(locked / "out"), "Permission denied")


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_a_file_in_the_outputs_path_is_one_error_line_naming_it(work, tmp_path, capsys, monkeypatch, name):
    (tmp_path / "file").write_text("not a folder")
    rc, _, err = run_cli(capsys, monkeypatch, *stage_argv(work, name, tmp_path / "file" / "out"))
    assert_one_error_line(rc, err, str(tmp_path / "file"), "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_os_errors_behind_library_wrappers_are_the_users_and_others_are_bugs():
    import errno

    from safetensors import SafetensorError

    from slmforge.errors import os_error_behind

    try:  # torch.save on a full disk: a RuntimeError raised while handling the OSError
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0") from None
    except RuntimeError as e:
        wrapped = e
    assert wrapped.__cause__ is None and os_error_behind(wrapped).errno == errno.ENOSPC
    found = os_error_behind(SafetensorError("Error while serializing: I/O error: No space left on device "
                                            "(os error 28)"))
    assert found.errno == errno.ENOSPC and found.strerror == "No space left on device"
    assert os_error_behind(OSError(errno.EBADF, "Bad file descriptor")) is None  # a bug: keeps its traceback
    assert os_error_behind(ValueError("x")) is None
