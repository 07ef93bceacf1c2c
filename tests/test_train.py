"""The training loop: learning, precisions, gradient accumulation, and exact resume after kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from slmforge.config import ModelConfig
from slmforge.data.pack import iter_documents, pack_tokens
from slmforge.errors import SlmforgeError
from slmforge.model import LlamaModel
from slmforge.modeldir import ModelDir
from slmforge.tokenizer import train_tokenizer
from slmforge.train.loop import TrainConfig, lr_at, plot_loss_curve, read_metrics, train
from slmforge.train.pretrain import PretrainConfig, pretrain

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
needs_data = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not present")

TINY = dict(vocab_size=320, hidden_size=32, intermediate_size=86, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
# threads=1: runs in parallel processes stay fast on 2 cores, and every run uses the same kernels
FAST = dict(batch_size=4, seq_len=32, lr=3e-3, min_lr=3e-4, warmup_steps=5, threads=1, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer (saved to a folder) and a packed slice of tiny Shakespeare."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    root = tmp_path_factory.mktemp("corpus")
    src = root / "shakespeare.txt"
    src.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    tok = train_tokenizer(iter_documents(src), vocab_size=320)
    tok.save(root / "tok")
    pack_tokens(src, tok, root / "packed", val_fraction=0.05, progress=False)
    return root, tok


def test_lr_schedules():
    cos = TrainConfig(max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cos) == pytest.approx(0.1) and lr_at(9, cos) == pytest.approx(1.0)
    assert lr_at(55, cos) == pytest.approx(0.55) and lr_at(99, cos) == pytest.approx(0.1, abs=1e-3)
    wsd = TrainConfig(max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd")
    assert lr_at(50, wsd) == lr_at(79, wsd) == 1.0
    assert lr_at(89, wsd) == pytest.approx(0.55) and lr_at(99, wsd) == pytest.approx(0.1)
    const = TrainConfig(max_steps=100, lr=1.0, warmup_steps=0, schedule="constant")
    assert lr_at(0, const) == lr_at(99, const) == 1.0
    with pytest.raises(SlmforgeError, match="schedule"):
        TrainConfig(schedule="linear")


@needs_data
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_loss_goes_down(tmp_path, corpus, precision):
    root, tok = corpus
    cfg = PretrainConfig(max_steps=60, eval_every=30, eval_batches=4, log_every=5, ckpt_every=0, precision=precision,
                         **FAST)
    model_dir = pretrain(root / "packed", tmp_path, ModelConfig(**TINY), tok, cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(5, 61, 5))
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0]
    md = ModelDir.open(model_dir)
    assert md.meta["stage"] == "pretrain" and md.meta["train"]["precision"] == precision
    assert md.meta["metrics"]["val_loss"] == vals[1] and md.meta["metrics"]["train_tokens"] == 60 * 4 * 32
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    # The saved model reproduces the final val loss.
    from slmforge.data.pack import TokenShards

    m = md.load_model()
    val = TokenShards(root / "packed", "val")
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        losses = [m(x, y)[1].double() for x, y in val.iter_eval_batches(4, 32, 4)]
    assert float(sum(losses) / len(losses)) == pytest.approx(vals[1], rel=1e-6)


def test_grad_accumulation_matches_big_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 320, (6, 8, 33), generator=g)  # 6 steps of batch 8

    def big(i):
        return data[i, :, :-1], data[i, :, 1:]

    def halves(i):  # micro-batch i = step * 2 + micro
        b = data[i // 2, (i % 2) * 4:(i % 2) * 4 + 4]
        return b[:, :-1], b[:, 1:]

    models = []
    for name, fn, bs, accum in (("big", big, 8, 1), ("accum", halves, 4, 2)):
        m = LlamaModel(ModelConfig(**TINY))
        m.reset_parameters(seed=0)
        cfg = TrainConfig(max_steps=6, batch_size=bs, grad_accum=accum, seq_len=32, warmup_steps=2, lr=1e-2,
                          precision="fp32", log_every=1, ckpt_every=0, threads=1, progress=False)
        res = train(m, fn, cfg, tmp_path / name)
        assert res.tokens == 6 * 8 * 32
        models.append((m, [r["loss"] for r in res.history], [r["grad_norm"] for r in res.history]))
    (m1, l1, n1), (m2, l2, n2) = models
    assert l1 == pytest.approx(l2, rel=1e-5) and n1 == pytest.approx(n2, rel=1e-4)
    for (k, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5, msg=k)


def test_clipping_matches_torch_and_a_full_disk_or_a_killed_write_leaves_no_temp(tmp_path, monkeypatch):
    import errno

    from slmforge.train import loop

    torch.manual_seed(0)
    a, b = LlamaModel(ModelConfig(**TINY)), LlamaModel(ModelConfig(**TINY))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 320, (2, 16))
    for m in (a, b):
        (m(x, x)[1] * 50).backward()
    ours = loop.clip_grad_norm(a, 1.0)
    theirs = torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5) and ours.item() > 1
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8)

    ckpt = tmp_path / "checkpoints" / "last.pt"
    loop.save_checkpoint(ckpt, {"step": 1})
    stale = ckpt.with_name(".last.pt.12345.tmp")  # what a SIGKILL mid-write leaves
    stale.write_bytes(b"x" * 100)
    loop.remove_stale_checkpoint_temps(ckpt.parent)
    assert not stale.exists() and ckpt.is_file()

    def full_disk(state, f):  # what torch.save does on a full disk: a RuntimeError raised while handling ENOSPC
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1018880 vs 1018768")  # noqa: B904

    monkeypatch.setattr(loop.torch, "save", full_disk)
    with pytest.raises(SlmforgeError, match=r"last.pt: cannot write the checkpoint \(No space left on device\)"):
        loop.save_checkpoint(ckpt, {"step": 2, "w": torch.zeros(1000)})
    assert torch.load(ckpt, weights_only=False)["step"] == 1  # the previous one is kept
    assert [p.name for p in ckpt.parent.iterdir()] == ["last.pt"]


def test_custom_loss_and_masked_targets(tmp_path):
    """Finetune passes -100-masked targets; distill passes its own loss_fn."""
    m = LlamaModel(ModelConfig(**TINY))
    calls = []

    def get_batch(i):
        x = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(i))
        y = x.roll(-1, 1)
        y[:, :8] = -100
        return x, y

    def loss_fn(model, batch):
        calls.append(1)
        return model(batch[0], batch[1])[1] * 2

    cfg = TrainConfig(max_steps=3, batch_size=2, seq_len=16, log_every=1, eval_every=2, ckpt_every=0,
                      threads=1, progress=False)
    evals = []
    res = train(m, get_batch, cfg, tmp_path, eval_batches=lambda: [get_batch(99)], loss_fn=loss_fn,
                on_eval=lambda step, v: evals.append(step))
    assert evals == [2, 3] and len(calls) == 3 + 2 and res.val_loss is not None


def test_plot_and_resume_of_finished_run(tmp_path):
    m = LlamaModel(ModelConfig(**TINY))
    cfg = TrainConfig(max_steps=4, batch_size=2, seq_len=16, log_every=1, ckpt_every=2, threads=1, progress=False)

    def get_batch(i):
        x = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(i))
        return x[:, :-1], x[:, 1:]

    first = train(m, get_batch, cfg, tmp_path)
    again = train(LlamaModel(ModelConfig(**TINY)), get_batch, cfg, tmp_path)  # resumes at step 4: no-op
    assert again.resumed_from == 4 and again.loss == first.loss and again.history == []
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(SlmforgeError, match="does not match this model"):
        train(LlamaModel(ModelConfig(**{**TINY, "hidden_size": 64})), get_batch, cfg, tmp_path)
    fresh = train(LlamaModel(ModelConfig(**TINY)), get_batch, cfg, tmp_path, resume=False)
    assert fresh.resumed_from is None and len(fresh.history) == 4


def _random_batches(i):
    x = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(i))
    return x[:, :-1], x[:, 1:]


def test_time_budget_is_timed_by_train_itself_and_kept_on_resume(tmp_path, monkeypatch):
    """max_minutes: train() times its own steps (at lr 0: the weights and the RNG are as if it had not) and
    one evaluation, and fixes max_steps; a resumed run reads the plan back instead of timing again."""
    import slmforge.train.loop as loop

    cfg = TrainConfig(max_steps=10_000, max_minutes=0.05, warmup_fraction=0.1, batch_size=2, seq_len=16,
                      eval_every=5, log_every=1, ckpt_every=0, threads=1, progress=False, precision="fp32")
    evals = []
    res = train(LlamaModel(ModelConfig(**TINY)), _random_batches, cfg, tmp_path / "budget",
                eval_batches=lambda: [_random_batches(99)], on_eval=lambda step, v: evals.append(step))
    plan = res.plan
    assert plan["max_steps"] == res.step < 10_000 and plan["step_s"] > 0 and plan["eval_s"] > 0
    assert plan["warmup_steps"] == max(1, int(plan["planned_steps"] * 0.1 + 1e-9))  # the first plan's share
    assert evals[0] == 0  # the timed evaluation, then the real ones
    monkeypatch.setattr(loop, "BUDGET_PROBE_STEPS", 0)  # a second timing would fail (quantiles of nothing)
    again = train(LlamaModel(ModelConfig(**TINY)), _random_batches, cfg, tmp_path / "budget")
    assert again.resumed_from == res.step and again.plan == plan


def test_time_budget_is_planned_again_when_the_steps_slow_down(tmp_path):
    """The probe's steps are fast and the real ones 10x slower (as when fine-tuning batches grow or another job
    starts): the plan is made again from the real steps' wall time, and the run ends within its budget."""
    calls = []

    def slowing_batches(i):
        calls.append(i)
        if len(calls) > 8:  # after the probe's 8 steps
            time.sleep(0.02)
        return _random_batches(i)

    budget_s = 3.0
    cfg = TrainConfig(max_steps=10_000, max_minutes=budget_s / 60, batch_size=2, seq_len=16, eval_every=0,
                      log_every=10, ckpt_every=0, threads=1, progress=False, precision="fp32")
    t0 = time.time()
    res = train(LlamaModel(ModelConfig(**TINY)), slowing_batches, cfg, tmp_path, eval_batches=lambda: [_random_batches(99)])
    wall = time.time() - t0
    plan = res.plan
    assert res.step == plan["max_steps"] < plan["planned_steps"] / 3  # the probe planned far too many steps
    assert plan["replans"] and plan["replans"][0]["s_per_step"] > 5 * plan["step_s"]
    assert wall < budget_s * 1.25, (wall, plan)
    again = train(LlamaModel(ModelConfig(**TINY)), _random_batches, cfg, tmp_path)  # the re-plan is kept
    assert again.resumed_from == res.step and again.plan == plan


def test_budget_probe_leaves_the_run_unchanged(tmp_path):
    """The timed steps run at learning rate 0 and their AdamW state and RNG draws are put back: the run
    trains exactly what the same run without a budget trains, given the same step count."""
    base = dict(batch_size=2, seq_len=16, warmup_steps=2, log_every=1, ckpt_every=0, threads=1, progress=False,
                precision="fp32")
    weights, losses = [], []
    for name, extra in (("budget", {"max_steps": 6, "max_minutes": 1000.0}), ("plain", {"max_steps": 6})):
        m = LlamaModel(ModelConfig(**TINY))
        m.reset_parameters(seed=0)
        res = train(m, _random_batches, TrainConfig(**base, **extra), tmp_path / name)
        assert res.step == 6
        weights.append(m.state_dict())
        losses.append([r["loss"] for r in res.history])
    assert losses[0] == losses[1]
    for k, a in weights[0].items():
        torch.testing.assert_close(a, weights[1][k], rtol=0, atol=0, msg=k)


def test_resume_refuses_a_changed_schedule_unless_forced(tmp_path):
    cfg = TrainConfig(max_steps=4, batch_size=2, seq_len=16, log_every=1, ckpt_every=2, threads=1, progress=False)
    train(LlamaModel(ModelConfig(**TINY)), _random_batches, cfg, tmp_path)
    for changed in ({"lr": 5e-4}, {"batch_size": 3}, {"seed": 1}, {"max_steps": 8}, {"schedule": "wsd"}):
        with pytest.raises(SlmforgeError, match=f"other settings \\({next(iter(changed))}"):
            train(LlamaModel(ModelConfig(**TINY)), _random_batches, TrainConfig(**{**cfg.__dict__, **changed}), tmp_path)
    # settings that do not change what is trained may change; force_resume takes the rest
    train(LlamaModel(ModelConfig(**TINY)), _random_batches, TrainConfig(**{**cfg.__dict__, "log_every": 2}), tmp_path)
    forced = train(LlamaModel(ModelConfig(**TINY)), _random_batches,
                   TrainConfig(**{**cfg.__dict__, "max_steps": 6, "force_resume": True}), tmp_path)
    assert forced.resumed_from == 4 and forced.step == 6


def test_crash_then_resume_truncates_metrics_and_matches(tmp_path):
    """A crash mid-run (no signal, no final checkpoint): resume drops the rows after the checkpoint."""

    def get_batch(i):
        x = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(i))
        return x[:, :-1], x[:, 1:]

    def crashing(i):
        if i == 4:
            raise RuntimeError("disk on fire")
        return get_batch(i)

    def model():
        m = LlamaModel(ModelConfig(**TINY))
        m.reset_parameters(seed=0)
        return m

    cfg = TrainConfig(max_steps=6, batch_size=2, seq_len=16, warmup_steps=2, log_every=1, ckpt_every=3,
                      threads=1, progress=False)
    ref = train(model(), get_batch, cfg, tmp_path / "ref")
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(model(), crashing, cfg, tmp_path / "run")
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a row torn by the crash
    res = train(model(), get_batch, cfg, tmp_path / "run")
    assert res.resumed_from == 3  # the checkpoint; rows 4 and the torn 5 were dropped and redone
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref.history]


@needs_data
def test_tokenizer_mismatch_is_an_error(tmp_path, corpus):
    root, _ = corpus
    other = train_tokenizer(["something else entirely"] * 50, vocab_size=300)
    with pytest.raises(SlmforgeError, match="packed with a different tokenizer"):
        pretrain(root / "packed", tmp_path, ModelConfig(**TINY), other, PretrainConfig(**FAST))


# --- exact resume ----------------------------------------------------------------------------------------

RUN_SCRIPT = textwrap.dedent("""
    import sys, time
    from slmforge.config import ModelConfig
    from slmforge.data import pack
    from slmforge.tokenizer import Tokenizer
    from slmforge.train.pretrain import PretrainConfig, pretrain

    root, out, slow = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if slow:  # slow the run down so the test can kill it mid-way; batches stay the same
        _orig = pack.TokenShards.get_batch
        def _slow(self, *a, **k):
            time.sleep(slow)
            return _orig(self, *a, **k)
        pack.TokenShards.get_batch = _slow
    cfg = PretrainConfig(max_steps=40, log_every=1, eval_every=10, eval_batches=2, ckpt_every=10,
                      precision="bf16", **{FAST!r})
    pretrain(root + "/packed", out, ModelConfig(**{TINY!r}), Tokenizer.from_dir(root + "/tok"), cfg)
""").replace("{FAST!r}", repr(FAST)).replace("{TINY!r}", repr(TINY))


def _start(script: Path, root: Path, out: Path, slow: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(script), str(root), str(out), str(slow)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = read_metrics(out / "metrics.jsonl")
        if rows and rows[-1]["step"] >= step and (out / "checkpoints" / "last.pt").is_file():
            return
        assert proc.poll() is None, f"run ended early: {proc.communicate()[1][-2000:]}"
        time.sleep(0.01)
    raise AssertionError(f"no step {step} within {timeout}s")


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _ckpt_step(out: Path) -> int:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"]


@needs_data
def test_resume_after_kill_is_bit_identical(tmp_path, corpus):
    root, _ = corpus
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    ref, killed, termed = tmp_path / "ref", tmp_path / "killed", tmp_path / "termed"

    # Three runs side by side: the reference goes straight through, one gets kill -9, one SIGTERM.
    p_ref = _start(script, root, ref, 0)
    p_kill = _start(script, root, killed, 0.03)
    p_term = _start(script, root, termed, 0.03)

    _wait_for_step(p_kill, killed, 13)
    p_kill.kill()  # SIGKILL: no chance to save anything
    p_kill.wait()
    _wait_for_step(p_term, termed, 7)
    p_term.send_signal(signal.SIGTERM)
    rc_term, err_term = _finish(p_term)
    assert rc_term != 0 and "interrupted at step" in err_term, err_term[-2000:]

    ck_kill = _ckpt_step(killed)
    rows_killed = read_metrics(killed / "metrics.jsonl")
    assert rows_killed[-1]["step"] > ck_kill and ck_kill < 40, "the kill should land between checkpoints"
    ck_term = _ckpt_step(termed)
    assert ck_term == read_metrics(termed / "metrics.jsonl")[-1]["step"] < 40  # saved at the stop step

    resumed = [_start(script, root, killed, 0), _start(script, root, termed, 0)]
    for p in [p_ref, *resumed]:
        rc, err = _finish(p)
        assert rc == 0, err[-3000:]

    ref_rows = read_metrics(ref / "metrics.jsonl")
    assert [r["step"] for r in ref_rows] == list(range(1, 41))
    for out in (killed, termed):
        rows = read_metrics(out / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(1, 41))  # no duplicates, no gaps
        assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]  # bit-identical floats
        assert [r.get("val_loss") for r in rows] == [r.get("val_loss") for r in ref_rows]
        assert [r["tokens"] for r in rows] == [r["tokens"] for r in ref_rows]
        assert (out / "model" / "model.safetensors").read_bytes() == (ref / "model" / "model.safetensors").read_bytes()


@needs_data
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_ddp_two_processes_on_cpu(tmp_path, corpus):
    root, _ = corpus
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT.replace("max_steps=40", "max_steps=6").replace("ckpt_every=10", "ckpt_every=3")
                      .replace("eval_every=10", "eval_every=3"))
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(root), str(tmp_path / "o"), "0"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(tmp_path / "o" / "metrics.jsonl")
    assert [x["step"] for x in rows] == list(range(1, 7))  # rank 0 alone writes
    assert rows[-1]["tokens"] == 6 * 2 * FAST["batch_size"] * FAST["seq_len"]  # both ranks counted
    assert sum("val_loss" in x for x in rows) == 2
    md = ModelDir.open(tmp_path / "o" / "model")
    assert md.meta["metrics"]["train_tokens"] == rows[-1]["tokens"]


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    from slmforge.train import loop

    assert loop.resolve_precision("fp32", "cpu") == "fp32" and loop.resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: False)  # an AVX2 CPU: emulated bf16 is ~100x slower
    assert loop.resolve_precision("auto", "cpu") == "fp32"
    assert PretrainConfig(max_steps=1).train_config(10_000).precision == ("bf16" if torch.cuda.is_available()
                                                                           and torch.cuda.is_bf16_supported()
                                                                           else "fp32")
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: True)
    assert loop.resolve_precision("auto", "cpu") == "bf16"
    # this machine's answer agrees with its CPU flags
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    monkeypatch.undo()
    assert loop.cpu_has_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
