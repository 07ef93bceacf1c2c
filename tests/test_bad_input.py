"""Bad input found by a hostile probe (issue 11): each gives ONE `error:` line naming the file, field or
option, exit 1, no traceback, no hang, and nothing half-written or left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli as slm
from conftest import small_corpus
from slmforge.errors import SlmforgeError

try:  # the stub is moving from the package to tests/
    from openai_stub import serve_stub
except ImportError:
    from slmforge.openai_stub import serve_stub

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def slm_subprocess(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """For what used to hang: a real process with a deadline."""
    return subprocess.run([sys.executable, "-m", "slmforge", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def one_error(rc: int, err: str, *needles: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip() and x.startswith("error:")]
    assert rc == 1, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def rows_file(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps({"id": i, "prompt": t[:30]}) + "\n" for i, t in enumerate(small_corpus(3))))
    return p


@pytest.fixture()
def corpus_file(tmp_path):
    p = tmp_path / "corpus.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in small_corpus(40)))
    return p


def edit_config(model_dir: Path, **fields) -> None:
    p = model_dir / "config.json"
    cfg = json.loads(p.read_text())
    cfg.update(fields)
    p.write_text(json.dumps(cfg))


# ------------------------------------------------------------------------------------------------ hangs


def test_predict_batch_zero_is_an_error_not_a_hang(tiny_model_dir, rows_file, tmp_path):
    r = slm_subprocess("predict", tiny_model_dir, "--input", rows_file, "--out", tmp_path / "p.jsonl",
                       "--batch", 0, "-n", 4)
    one_error(r.returncode, r.stderr, "--batch 0")
    assert not (tmp_path / "p.jsonl").exists()


def test_eval_ppl_batch_size_zero_is_rejected(capsys, monkeypatch, tiny_model_dir, corpus_file):
    # it was taken as "one window per forward" without a word
    rc, _, err = slm(capsys, monkeypatch, "eval", "ppl", tiny_model_dir, corpus_file, "--batch-size", 0)
    one_error(rc, err, "--batch-size 0")


def test_synth_concurrency_zero_is_an_error(tmp_path):
    with serve_stub(reply=lambda body: "Once upon a time.") as stub:
        r = slm_subprocess("synth", "stories", "--n", 3, "--out", tmp_path / "s.jsonl",
                           "--teacher", f"openai:{stub.url}#stub", "--concurrency", 0, timeout=60)
    one_error(r.returncode, r.stderr, "--concurrency 0")
    assert not (tmp_path / "s.jsonl").exists() and not stub.requests


def test_openai_lm_rejects_impossible_settings():
    from slmforge.lm import OpenAILM

    for kw, needle in (({"concurrency": 0}, "concurrency"), ({"max_retries": -1}, "max_retries"),
                       ({"requests_per_minute": -5}, "requests_per_minute")):
        with pytest.raises(SlmforgeError, match=needle):
            OpenAILM("http://127.0.0.1:9/v1", "m", **kw)


# ------------------------------------------------------------------------------------ silent wrong results


def test_predict_negative_limit_is_rejected(capsys, monkeypatch, tiny_model_dir, rows_file, tmp_path):
    # a negative limit used to slice from the end: --limit -1 quietly dropped the last row
    rc, _, err = slm(capsys, monkeypatch, "predict", tiny_model_dir, "--input", rows_file, "--out",
                     tmp_path / "p.jsonl", "--limit", -1, "-n", 4)
    one_error(rc, err, "--limit -1")
    assert not (tmp_path / "p.jsonl").exists()


def test_eval_ppl_max_docs_zero_is_rejected(capsys, monkeypatch, tiny_model_dir, corpus_file):
    rc, _, err = slm(capsys, monkeypatch, "eval", "ppl", tiny_model_dir, corpus_file, "--max-docs", 0)
    one_error(rc, err, "--max-docs 0")


def test_synth_fails_when_every_request_failed(capsys, monkeypatch, tmp_path):
    with serve_stub(fail_if=lambda body: 400) as stub:
        rc, _, err = slm(capsys, monkeypatch, "synth", "stories", "--n", 4, "--out", tmp_path / "s.jsonl",
                         "--teacher", f"openai:{stub.url}#stub", "--max-retries", 0)
    line = one_error(rc, err, "all 4 teacher requests failed", "HTTP 400")
    assert "stub says 400" in line
    stats = json.loads((tmp_path / "s.jsonl.stats.json").read_text())
    assert stats["failed"] == 4 and not stats["complete"]


def test_generate_samples_zero_is_rejected(capsys, monkeypatch, tiny_model_dir):
    rc, out, err = slm(capsys, monkeypatch, "generate", tiny_model_dir, "hi", "--samples", 0)
    one_error(rc, err, "--samples 0")
    assert out == ""


def test_generate_beyond_the_context_is_an_error(capsys, monkeypatch, tiny_model_dir):
    # max_position_embeddings 4: the engine used to drop the prompt's start (BOS too) and say nothing
    edit_config(tiny_model_dir, max_position_embeddings=4)
    rc, out, err = slm(capsys, monkeypatch, "generate", tiny_model_dir, "Tom saw", "-n", 3)
    one_error(rc, err, "context of 4 tokens", "max_position_embeddings")
    assert out == ""


def test_model_config_needs_a_positive_context(tiny_model_dir):
    from slmforge.modeldir import ModelDir

    edit_config(tiny_model_dir, max_position_embeddings=0)
    with pytest.raises(SlmforgeError, match=r"config.json: max_position_embeddings must be positive"):
        ModelDir.open(tiny_model_dir)


def test_annotate_passes_max_chars_on(capsys, monkeypatch, tmp_path):
    # --max-chars (and --retry-failed) were accepted and never passed to annotate()
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "a", "text": "alpha " * 50 + "OMEGA"}) + "\n")
    with serve_stub(reply=lambda body: "Educational score: 3") as stub:
        rc, _, err = slm(capsys, monkeypatch, "data", "annotate", docs, "--teacher", f"openai:{stub.url}#stub",
                         "--out", tmp_path / "labels.jsonl", "--max-chars", 20)
    assert rc == 0, err
    prompt = stub.requests[0]["messages"][-1]["content"]
    assert "alpha alpha" in prompt and "OMEGA" not in prompt


# ------------------------------------------------------------------------------------------- tracebacks


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("hidden_size", "192", "hidden_size: expected an integer, got '192'"),
    ("hidden_size", None, "hidden_size: expected an integer, got null"),
    ("rope_theta", "abc", "rope_theta: expected a number, got 'abc'"),
    ("tie_word_embeddings", 1, "tie_word_embeddings: expected true or false, got 1"),
])
def test_config_json_wrong_types_in_generate(capsys, monkeypatch, tiny_model_dir, field, value, needle):
    edit_config(tiny_model_dir, **{field: value})
    rc, _, err = slm(capsys, monkeypatch, "generate", tiny_model_dir, "hi", "-n", 3)
    one_error(rc, err, f"{tiny_model_dir / 'config.json'}: {needle}")


def test_config_json_wrong_types_in_import_hf(capsys, monkeypatch, tiny_model_dir, tmp_path):
    edit_config(tiny_model_dir, hidden_size="192")
    rc, _, err = slm(capsys, monkeypatch, "import", "hf", tiny_model_dir, tmp_path / "out")
    one_error(rc, err, "config.json: hidden_size: expected an integer, got '192'")
    assert not (tmp_path / "out").exists()


def test_model_dir_open_checks_types(tiny_model_dir):
    # the path chat and serve open a model by
    from slmforge.modeldir import ModelDir

    edit_config(tiny_model_dir, num_attention_heads=None)
    with pytest.raises(SlmforgeError, match=r"config.json: num_attention_heads: expected an integer, got null"):
        ModelDir.open(tiny_model_dir)
    edit_config(tiny_model_dir, num_attention_heads=4, rope_parameters="x")
    with pytest.raises(SlmforgeError, match=r"config.json: rope_parameters: expected a mapping"):
        ModelDir.open(tiny_model_dir)


def test_curate_yaml_wrong_type_at_the_top(capsys, monkeypatch, tmp_path, corpus_file):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {tmp_path / 'cur'}\ninputs: [{corpus_file}]\nworkers: \"2\"\n")
    rc, _, err = slm(capsys, monkeypatch, "data", "curate", cfg)
    one_error(rc, err, f"{cfg}:3: workers: expected an integer, got '2'")
    assert not (tmp_path / "cur").exists()


def test_curate_yaml_wrong_stage_option_fails_before_ingest(capsys, monkeypatch, tmp_path, corpus_file):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {tmp_path / 'cur'}\ninputs: [{corpus_file}]\nstages:\n  - quality: {{}}\n"
                   f"  - dedup:\n      threshold: high\n")
    rc, _, err = slm(capsys, monkeypatch, "data", "curate", cfg)
    one_error(rc, err, f"{cfg}:6: stages[1].dedup.threshold: expected a number, got 'high'")
    assert not (tmp_path / "cur").exists()  # ingest did not run first


def test_curate_yaml_unknown_option_and_missing_eval_file(capsys, monkeypatch, tmp_path, corpus_file):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {tmp_path / 'cur'}\ninputs: [{corpus_file}]\nstages:\n  - dedup: {{}}\n"
                   f"  - quality: {{min_wrds: 3}}\n")
    rc, _, err = slm(capsys, monkeypatch, "data", "curate", cfg)
    one_error(rc, err, f"{cfg}:5: stages[1].quality: unknown option 'min_wrds'")
    cfg.write_text(f"out: {tmp_path / 'cur'}\ninputs: [{corpus_file}]\nstages:\n"
                   f"  - decontam: {{eval: [{tmp_path / 'nope.tsv'}]}}\n")
    rc, _, err = slm(capsys, monkeypatch, "data", "curate", cfg)
    one_error(rc, err, f"{cfg}:4: stages[0].decontam.eval[0]", "no such file")
    assert not (tmp_path / "cur").exists()


def test_generate_unknown_dtype(capsys, monkeypatch, tiny_model_dir):
    rc, _, err = slm(capsys, monkeypatch, "generate", tiny_model_dir, "hi", "--dtype", "int3")
    one_error(rc, err, "--dtype int3", "float32 or bfloat16")


def test_eval_task_unknown_sacrebleu_tokenizer(capsys, monkeypatch, tmp_path):
    p = tmp_path / "tr.jsonl"
    p.write_text(json.dumps({"prediction": "a cat", "completion": "a cat"}) + "\n")
    rc, out, err = slm(capsys, monkeypatch, "eval-task", "translation", p, "--tokenize", "nope")
    one_error(rc, err, "--tokenize 'nope'", "13a")
    assert not (tmp_path / "tr.metrics.json").exists()


@pytest.mark.parametrize("command", ["pack", "ingest", "tokenizer"])
def test_out_folder_that_is_a_file(capsys, monkeypatch, tmp_path, corpus_file, tiny_model_dir, command):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    args = {"pack": ["pack", corpus_file, "--tokenizer", tiny_model_dir, "--out", afile],
            "ingest": ["data", "ingest", corpus_file, "--out", afile],
            "tokenizer": ["tokenizer", "train", corpus_file, "--out", afile, "--vocab-size", 300]}[command]
    rc, _, err = slm(capsys, monkeypatch, *args)
    one_error(rc, err, f"{afile}: exists and is not a directory")
    assert afile.read_text() == "keep me"


@pytest.mark.parametrize("command", ["ingest", "pack", "ppl"])
def test_non_utf8_input_names_file_and_place(capsys, monkeypatch, tmp_path, tiny_model_dir, command):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "\xff broken"}\n')
    out = tmp_path / "out"
    args = {"ingest": ["data", "ingest", bad, "--out", out],
            "pack": ["pack", bad, "--tokenizer", tiny_model_dir, "--out", out],
            "ppl": ["eval", "ppl", tiny_model_dir, bad]}[command]
    rc, _, err = slm(capsys, monkeypatch, *args)
    line = one_error(rc, err, "bad.jsonl", "UTF-8")
    assert "bad.jsonl:2" in line or "at byte" in line
    assert not out.exists()  # and no empty output folder left behind


# ---------------------------------------------------------------- temp names, late checks, leftover dirs


def test_write_error_names_the_users_path_not_a_temp_file(capsys, monkeypatch, tmp_path):
    p = tmp_path / "cl.jsonl"
    p.write_text(json.dumps({"prediction": "a", "label": "a"}) + "\n")
    (tmp_path / "adir").mkdir()
    rc, out, err = slm(capsys, monkeypatch, "eval-task", "classification", p, "--out", tmp_path / "adir")
    line = one_error(rc, err, str(tmp_path / "adir"))
    assert ".tmp" not in line
    assert "accuracy" not in out  # checked before the table was printed, not after


def test_atomic_write_errors_name_the_path(tmp_path):
    from slmforge.io import atomic_write_text

    (tmp_path / "d").mkdir()
    with pytest.raises(SlmforgeError, match=r"d: is a directory") as e:
        atomic_write_text(tmp_path / "d", "x")
    assert ".tmp" not in str(e.value)
    (tmp_path / "f").write_text("")
    with pytest.raises(SlmforgeError) as e:
        atomic_write_text(tmp_path / "f" / "x.json", "x")  # a file where the folder should be
    assert ".tmp" not in str(e.value) and "x.json" in str(e.value)
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_predict_out_folder_is_checked_before_the_work(capsys, monkeypatch, tiny_model_dir, rows_file, tmp_path):
    (tmp_path / "adir").mkdir()
    rc, out, err = slm(capsys, monkeypatch, "predict", tiny_model_dir, "--input", rows_file, "--out",
                       tmp_path / "adir", "-n", 4)
    line = one_error(rc, err, str(tmp_path / "adir"), "is a directory")
    assert ".tmp" not in line and "generating" not in out + err


def test_failed_pack_leaves_no_empty_folder(capsys, monkeypatch, tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    rc, _, err = slm(capsys, monkeypatch, "pack", bad, "--tokenizer", tiny_model_dir, "--out", tmp_path / "p")
    one_error(rc, err, "bad.jsonl:2")
    assert not (tmp_path / "p").exists()


def test_failed_curate_leaves_no_folder(capsys, monkeypatch, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {tmp_path / 'cur'}\ninputs: [{tmp_path / 'nope.jsonl'}]\n")
    rc, _, err = slm(capsys, monkeypatch, "data", "curate", cfg)
    one_error(rc, err, "nope.jsonl")
    assert not (tmp_path / "cur").exists()


def test_failed_curate_stage_removes_the_folder_it_made(tmp_path, corpus_file, monkeypatch):
    from slmforge.data import curate as curate_mod

    def broken(*a, **k):
        raise SlmforgeError("ingest broke")

    monkeypatch.setattr("slmforge.data.ingest.ingest", broken)
    cfg = curate_mod.CurateConfig(out=str(tmp_path / "cur"), inputs=[str(corpus_file)])
    with pytest.raises(SlmforgeError, match="ingest broke"):
        curate_mod.curate(cfg)
    assert not (tmp_path / "cur").exists()


# ------------------------------------------------------------------------------------------- durability


def test_model_files_are_fsynced_before_the_rename(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    from slmforge import io
    from slmforge.modeldir import save_model_dir

    synced = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    renamed_after = {}

    def replace(src, dst):
        renamed_after.setdefault(Path(dst).name, len(synced))
        real_replace(src, dst)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to map file descriptors to paths")
    monkeypatch.setattr(io.os, "fsync", fsync)
    monkeypatch.setattr(io.os, "replace", replace)
    out = save_model_dir(tmp_path / "m", tiny_model, tiny_tokenizer)
    names = {Path(p).name for p in synced[:renamed_after["m"]]}
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= names
    assert str(tmp_path) in synced[renamed_after["m"]:]  # and the parent folder after the rename
    assert (out / "model.safetensors").is_file()


def _crash_between_renames(monkeypatch, out: Path):
    """os.replace dies (like a kill -9) on the rename that puts the new folder at `out`."""
    from slmforge import io

    real = os.replace

    class Crash(BaseException):
        pass

    def replace(src, dst):
        if Path(dst) == out and Path(src).name != f".{out.name}.swap.json":
            raise Crash
        real(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    return Crash


def test_crash_between_the_renames_rolls_forward_on_open(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    import torch

    from slmforge.io import swap_dir_into_place
    from slmforge.modeldir import ModelDir, save_model_dir

    out = save_model_dir(tmp_path / "m", tiny_model, tiny_tokenizer, {"stage": "old"})
    new = save_model_dir(tmp_path / ".m.new", tiny_model, tiny_tokenizer, {"stage": "new"})
    crash = _crash_between_renames(monkeypatch, out)
    with pytest.raises(crash):
        swap_dir_into_place(new, out)
    monkeypatch.undo()
    assert not out.exists()  # the state a crash leaves: old one moved aside, new one not yet in place
    md = ModelDir.open(out)  # the next run finishes the swap
    assert md.meta["stage"] == "new" and isinstance(md.load_model().model.norm.weight, torch.Tensor)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # backup, temp and journal gone


def test_crash_during_save_restores_the_old_model_on_next_save(tmp_path, tiny_model, tiny_tokenizer,
                                                                monkeypatch):
    from slmforge.modeldir import ModelDir, save_model_dir

    out = save_model_dir(tmp_path / "m", tiny_model, tiny_tokenizer, {"stage": "old"})
    crash = _crash_between_renames(monkeypatch, out)
    with pytest.raises(crash):  # save_model_dir removes its unfinished temp folder as it unwinds
        save_model_dir(out, tiny_model, tiny_tokenizer, {"stage": "new"})
    monkeypatch.undo()
    assert not out.exists()
    assert ModelDir.open(out).meta["stage"] == "old"  # nothing newer survived: the old one is put back
    save_model_dir(out, tiny_model, tiny_tokenizer, {"stage": "again"})
    assert ModelDir.open(out).meta["stage"] == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
