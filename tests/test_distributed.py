"""torchrun on CPU (gloo): 2 processes train like 1 on the same global batch, with DDP and with FSDP2; a
2-process checkpoint resumes on 1 process; fine-tuning runs under torchrun and rank 0 alone writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slmforge.modeldir import ModelDir
from slmforge.train.loop import read_metrics

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason="no torchrun beside this Python")

TINY = dict(vocab_size=320, hidden_size=32, intermediate_size=86, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
STEPS = 50
# fp32 and one thread: the runs differ only in how the global batch's gradients are summed
RUN = dict(max_steps=STEPS, batch_size=4, global_batch_size=8, seq_len=32, lr=3e-3, min_lr=3e-4, warmup_steps=5,
           log_every=1, eval_every=25, eval_batches=3, ckpt_every=25, precision="fp32", threads=1, progress=False)

# argv: data root, out dir, JSON of PretrainConfig overrides; STOP_AT=N makes every rank fail when step N
# starts (after step N-1's checkpoint), as a crash would.
PRETRAIN_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from slmforge.config import ModelConfig
    from slmforge.data import pack
    from slmforge.tokenizer import Tokenizer
    from slmforge.train.pretrain import PretrainConfig, pretrain

    root, out, over = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    stop_at = int(os.environ.get("STOP_AT", 0))
    if stop_at:
        _orig = pack.TokenShards.get_batch
        def _crash(self, i, *a, **k):
            if i >= (stop_at - 1) * 2:  # global batch = 2 micro-batches
                os._exit(3)
            return _orig(self, i, *a, **k)
        pack.TokenShards.get_batch = _crash
    pretrain(root + "/packed", out, ModelConfig(**TINY), Tokenizer.from_dir(root + "/tok"), PretrainConfig(**over),
             teacher=os.environ.get("TEACHER"))
""").replace("TINY", repr(TINY))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from slmforge.data.pack import iter_documents, pack_tokens
    from slmforge.tokenizer import train_tokenizer

    src_text = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
    root = tmp_path_factory.mktemp("dist")
    src = root / "text.txt"
    if src_text.is_file():
        src.write_text(src_text.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    else:  # any text will do: the runs are compared with each other
        src.write_text("\n\n".join(f"Story {i}: the {i % 7} cats sat on {i % 5} mats and sang." for i in range(3000)))
    tok = train_tokenizer(iter_documents(src), vocab_size=320)
    tok.save(root / "tok")
    pack_tokens(src, tok, root / "packed", val_fraction=0.05, progress=False)
    (root / "run.py").write_text(PRETRAIN_SCRIPT)
    return root


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _pretrain(root: Path, out: Path, procs: int, stop_at: int = 0, teacher: Path | None = None,
              **over) -> subprocess.CompletedProcess:
    args = [str(root / "run.py"), str(root), str(out), json.dumps({**RUN, **over})]
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(procs), *args] if procs > 1 else [sys.executable, *args]
    env = _env(**({"STOP_AT": str(stop_at)} if stop_at else {}), **({"TEACHER": str(teacher)} if teacher else {}))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _ok(r: subprocess.CompletedProcess) -> None:
    errors = [line for line in r.stderr.splitlines() if "Error" in line and "elastic" not in line]
    assert r.returncode == 0, "\n".join(errors[-10:]) + "\n" + r.stderr[-3000:]


def _close(a: list[dict], b: list[dict], key: str, tol: float = 1e-4) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    worst = max(abs(x[key] - y[key]) for x, y in zip(a, b, strict=True) if key in x)
    assert worst <= tol, f"{key} differs by {worst:.2e}"


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "o"
    _ok(_pretrain(corpus, out, 1))
    return out


@pytest.fixture(scope="module")
def two_fsdp(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_fsdp") / "o"
    _ok(_pretrain(corpus, out, 2, fsdp=True))
    return out


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_train_like_one_on_the_same_global_batch(corpus, single, two_fsdp, tmp_path, fsdp):
    out = two_fsdp
    if not fsdp:
        out = tmp_path / "o"
        _ok(_pretrain(corpus, out, 2))
    one, two = read_metrics(single / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))  # rank 0 alone writes
    _close(one, two, "loss")  # 1 process x 2 micro-steps == 2 processes x 1, over all 50 steps
    _close(one, two, "val_loss")
    assert two[-1]["tokens"] == one[-1]["tokens"] == STEPS * 8 * 32
    a, b = load_file(single / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()  # FSDP's sharded weights come back as the plain model's
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    md = ModelDir.open(out / "model")
    assert md.meta["train"]["grad_accum"] == 1 and md.meta["train"]["fsdp"] == fsdp


def test_a_two_process_checkpoint_resumes_on_one_process(corpus, two_fsdp, tmp_path):
    full, crashed = two_fsdp, tmp_path / "crashed"
    r = _pretrain(corpus, crashed, 2, stop_at=31, fsdp=True)  # dies at step 31: the checkpoint is step 25's
    assert r.returncode != 0
    assert torch.load(crashed / "checkpoints" / "last.pt", weights_only=False)["world_size"] == 2
    r = _pretrain(corpus, crashed, 1, progress=True)  # same global batch: 1 process x 2 micro-steps, unsharded
    _ok(r)
    assert "resuming from" in r.stderr and "saved by 2 processes, now 1" in r.stderr
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(crashed / "metrics.jsonl")
    assert [x["step"] for x in b] == list(range(1, STEPS + 1))  # the rows after the checkpoint were replaced
    _close(a, b, "loss")
    _close(a, b, "val_loss")


def test_another_global_batch_on_another_world_size_is_refused(corpus, tmp_path):
    out = tmp_path / "o"
    _ok(_pretrain(corpus, out, 2, max_steps=2, global_batch_size=None, ckpt_every=1))
    r = _pretrain(corpus, out, 1, max_steps=2, global_batch_size=None, ckpt_every=1)  # 4 per step, was 8
    assert r.returncode != 0
    assert "SlmforgeError" in r.stderr and "global batch changed from 4 x 1 x 2 to 4 x 1 x 1" in r.stderr


def test_distillation_under_torchrun_matches_one_process(corpus, single, tmp_path):
    over = dict(max_steps=10, eval_every=5, ckpt_every=5)
    _ok(_pretrain(corpus, tmp_path / "one", 1, teacher=single / "model", **over))
    _ok(_pretrain(corpus, tmp_path / "two", 2, teacher=single / "model", **over))
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    _close(one, two, "loss")
    assert ModelDir.open(tmp_path / "two" / "model").meta["stage"] == "distill"


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_finetune_under_torchrun_writes_once_and_matches_one_process(corpus, single, tmp_path, fsdp):
    rows = [{"text": f"{w} is {lab}", "label": lab} for i in range(40)
            for w, lab in [(f"good {i}", "pos"), (f"bad {i}", "neg")]]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    slm = str(Path(sys.executable).parent / "slmforge")
    args = ["finetune", "--model", str(single / "model"), "--data", str(data), "--task", "classify",
            "--head", "classifier", "--max-steps", "12", "--batch-size", "4", "--global-batch-size", "8",
            "--seq-len", "16", "--eval-every", "6", "--precision", "fp32", "--threads", "1", "--no-progress"]
    r1 = subprocess.run([slm, *args, "--out", str(tmp_path / "one")], env=_env(), capture_output=True, text=True,
                        timeout=300)
    _ok(r1)
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "--no-python", slm, *args,
           "--out", str(tmp_path / "two"), *(["--fsdp"] if fsdp else [])]
    r2 = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    _ok(r2)
    assert r2.stdout.count("wrote ") == 1  # rank 0 reports and writes
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    _close(one, two, "loss")
    _close(one, two, "val_accuracy")
    md = ModelDir.open(tmp_path / "two" / "model")
    assert md.meta["finetune"]["fsdp"] == fsdp and md.meta["metrics"]["steps"] == 12
