"""The CLI end to end on tiny data, and its promise for bad input: one `error:` line, exit 1, no partial
outputs."""

import json
import os
import subprocess
import sys

import pytest

from conftest import small_corpus


def run(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tests share 2 cores; oversubscription is very slow
    return subprocess.run([sys.executable, "-m", "slmforge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def assert_user_error(r, *needles):
    assert r.returncode == 1, r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    p = d / "corpus.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in small_corpus(400)) + "\n")
    return p


def test_tokenizer_pack_pretrain_generate(tmp_path, corpus):
    r = run("tokenizer", "train", corpus, "--out", tmp_path / "tok", "--vocab-size", 300)
    assert r.returncode == 0, r.stderr
    assert "bytes/token" in r.stdout
    r = run("pack", corpus, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "packed", "--val-fraction", 0.05)
    assert r.returncode == 0, r.stderr
    r = run("pretrain", "--data", tmp_path / "packed", "--tokenizer", tmp_path / "tok", "--out", tmp_path / "run",
            "--preset", "200k", "--steps", 30, "--batch-size", 8, "--seq-len", 64, "--eval-every", 15, "--lr", 3e-3)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "run" / "model" / "slmforge.json").read_text())
    assert meta["stage"] == "pretrain" and meta["metrics"]["val_loss"] < 4.5  # ln(300) = 5.7 at init
    r = run("generate", tmp_path / "run" / "model", "Tom", "-n", 20, "--seed", 1)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Tom") and len(r.stdout) > 10
    r = run("info", tmp_path / "run" / "model")
    assert json.loads(r.stdout)["params"] == meta["params"]


def test_missing_input_file(tmp_path):
    assert_user_error(run("tokenizer", "train", tmp_path / "nope.txt", "--out", tmp_path / "tok"), "nope.txt")
    assert not (tmp_path / "tok").exists()


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    assert_user_error(run("tokenizer", "train", tmp_path / "empty.txt", "--out", tmp_path / "tok"), "empty")
    assert not (tmp_path / "tok").exists()


def test_vocab_too_small(tmp_path, corpus):
    assert_user_error(run("tokenizer", "train", corpus, "--out", tmp_path / "tok", "--vocab-size", 50), "too small")
    assert not (tmp_path / "tok").exists()


def test_non_utf8_input(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine line\n\xff\xfe broken\n")
    assert_user_error(run("tokenizer", "train", tmp_path / "bad.txt", "--out", tmp_path / "tok"), "bad.txt", "UTF-8")
    assert not (tmp_path / "tok").exists()


def test_broken_jsonl_line_in_pack(tmp_path, corpus, tiny_tokenizer):
    tiny_tokenizer.save(tmp_path / "tok")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    assert_user_error(run("pack", bad, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "p"), "bad.jsonl:2")
    assert not (tmp_path / "p" / "index.json").exists()


def test_unknown_preset(tmp_path, corpus, tiny_tokenizer):
    tiny_tokenizer.save(tmp_path / "tok")
    assert run("pack", corpus, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "p").returncode == 0
    r = run("pretrain", "--data", tmp_path / "p", "--tokenizer", tmp_path / "tok", "--out", tmp_path / "run",
            "--preset", "7x")
    assert_user_error(r, "unknown preset")
    assert not (tmp_path / "run").exists()


def test_corrupt_safetensors(tiny_model_dir):
    p = tiny_model_dir / "model.safetensors"
    p.write_bytes(b"\x00" * 64)
    assert_user_error(run("generate", tiny_model_dir, "hi"), "model.safetensors")


def test_missing_model_dir(tmp_path):
    assert_user_error(run("generate", tmp_path / "nothing", "hi"), "nothing")
