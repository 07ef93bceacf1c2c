"""Sequence-level distillation (`slmforge distill generate`): a teacher's answers as finetune rows, from a
local model directory or an OpenAI-compatible server; resume after a kill, label mapping, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from openai_stub import serve_stub

from conftest import run_cli, small_corpus
from slmforge.errors import ConfigError, SlmforgeError
from slmforge.infer.sampling import SamplingParams
from slmforge.lm import open_lm
from slmforge.modeldir import ModelDir
from slmforge.train.distill import SeqDistillConfig, generate_targets, map_label, sample_seed
from slmforge.train.finetune import FinetuneConfig
from slmforge.train.rows import encode_records, label_set, read_records

PROMPTS = [s[:40] for s in small_corpus(6, seed=3)]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def cfg_for(teacher, prompts: Path, out: Path, **kw) -> SeqDistillConfig:
    return SeqDistillConfig(teacher=str(teacher), prompts=str(prompts), out=str(out), progress=False, **kw)


def loads_as_finetune_rows(out: Path, task: str, tok, labels: list[str] | None = None) -> int:
    """How many examples finetune's row loader makes of the file (validated as for training)."""
    recs = read_records(out)
    cfg = FinetuneConfig(task=task, labels=labels)
    return len(encode_records(recs, tok, cfg, 64, label_set(recs, labels) if task == "classify" else None))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    """A random 200k-preset model directory with a chat template (the tiny_model_dir of conftest, once)."""
    from slmforge.config import preset
    from slmforge.model import LlamaModel
    from slmforge.modeldir import save_model_dir

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaModel(preset("200k", vocab_size=tiny_tokenizer.vocab_size))
    return save_model_dir(tmp_path_factory.mktemp("teacher") / "model", model, tiny_tokenizer, {"stage": "test"})


# --- a local teacher ------------------------------------------------------------------------------------------

def test_local_teacher_rows_are_its_greedy_answers(tmp_path, teacher_dir):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "gold": i} for i, p in enumerate(PROMPTS)])
    out = tmp_path / "out.jsonl"
    # raw continuations: a random model's chat answers are mostly special tokens, which decode to nothing
    st = generate_targets(cfg_for(teacher_dir, prompts, out, max_new_tokens=8, keep_fields=["gold"],
                                  api="completion"))

    lm = open_lm(str(teacher_dir))
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    expected = {i: lm.generate([p], greedy)[0] for i, p in enumerate(PROMPTS)}
    got = rows(out)
    assert st["task"] == "lm" and st["api"] == "completion" and st["prompts"] == 6
    assert st["generated"] == len(got) == 6 - st["empty"] and st["skipped"] == 0 and st["dropped"] == 0
    assert st["usage"]["requests"] == 6 and st["teacher"] == str(teacher_dir)
    for r in got:
        i = r["prompt_index"]
        assert r["prompt"] == PROMPTS[i] and r["completion"] == expected[i] and r["completion"]
        assert r["gold"] == i and r["sample"] == 0 and r["teacher"] == str(teacher_dir)
    assert json.loads(Path(f"{out}.stats.json").read_text())["generated"] == st["generated"]
    # (f) what finetune trains on: its own row loader takes every row
    assert loads_as_finetune_rows(out, "lm", ModelDir.open(teacher_dir).load_tokenizer()) == len(got)


def test_resume_after_a_kill_asks_only_for_the_missing_answers(tmp_path, teacher_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")  # .txt: one prompt per line
    full, out = tmp_path / "full.jsonl", tmp_path / "out.jsonl"
    n = generate_targets(cfg_for(teacher_dir, prompts, full, max_new_tokens=6, api="completion"))["generated"]
    assert n >= 4  # (a random model's 6 tokens are rarely all whitespace)

    # a first run answered 3 prompts; a second was killed while writing its last line
    st = generate_targets(cfg_for(teacher_dir, prompts, out, max_new_tokens=6, max_prompts=3, api="completion"))
    lines = out.read_bytes().splitlines(keepends=True)
    k = len(lines)
    assert st["prompts"] == 3 and k == st["generated"] >= 1
    cut = len(lines[-1]) // 2  # the bytes of the half-written line
    out.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])

    st = generate_targets(cfg_for(teacher_dir, prompts, out, max_new_tokens=6, api="completion"))
    assert st["truncated_bytes"] == cut and st["skipped"] == k - 1
    assert st["usage"]["requests"] == 6 - (k - 1) and st["generated"] == n - (k - 1) and st["rows"] == n
    assert out.read_bytes() == full.read_bytes()  # greedy: the same file an uninterrupted run writes

    # nothing left to do: the teacher is not even opened
    st = generate_targets(cfg_for("no/such/teacher", prompts, out, max_new_tokens=6, api="completion"))
    assert st["generated"] == 0 and st["usage"]["requests"] == 0 and out.read_bytes() == full.read_bytes()


# --- an OpenAI-compatible teacher -----------------------------------------------------------------------------

def test_openai_teacher_concurrency_samples_system_prompt_and_failures(tmp_path, tiny_tokenizer):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"q": f"question {i}"} for i in range(12)])
    out = tmp_path / "out.jsonl"

    def reply(body: dict) -> str:
        return f"answer to {body['messages'][-1]['content']} seed {body['seed']}"

    bad = "question 5"
    with serve_stub(reply=reply, latency_s=0.03,
                    fail_if=lambda b: 500 if b["messages"][-1]["content"] == bad else None) as stub:
        st = generate_targets(cfg_for(f"openai:{stub.url}#stub", prompts, out, prompt_field="q", concurrency=4,
                                      n_samples=2, temperature=0.7, max_retries=0, system_prompt="Be brief.",
                                      max_new_tokens=20))
        assert 1 < stub.max_in_flight <= 4
        assert all(b["messages"][0] == {"role": "system", "content": "Be brief."} for b in stub.requests)
        assert all(b["temperature"] == 0.7 and b["max_tokens"] == 20 for b in stub.requests)
    assert (st["failed"], st["generated"], st["missing"], st["complete"]) == (2, 22, 2, False)
    got = rows(out)
    assert sorted((r["prompt_index"], r["sample"]) for r in got) == [(i, j) for i in range(12) if i != 5
                                                                     for j in range(2)]
    for r in got:  # each answer has its own seed; the system prompt was for the teacher only
        assert r["completion"] == f"answer to question {r['prompt_index']} seed " \
                                  f"{sample_seed(0, r['prompt_index'], r['sample'])}"
        assert r["prompt"] == f"question {r['prompt_index']}"

    with serve_stub(reply=reply) as stub:  # the endpoint recovers: a re-run asks for the two failed answers
        st = generate_targets(cfg_for(f"openai:{stub.url}#stub", prompts, out, prompt_field="q", concurrency=4,
                                      n_samples=2, temperature=0.7, system_prompt="Be brief.", max_new_tokens=20))
        assert len(stub.requests) == 2 and st["generated"] == 2 and st["skipped"] == 22 and st["complete"]
    assert len(rows(out)) == 24
    assert loads_as_finetune_rows(out, "lm", tiny_tokenizer) == 24


def test_chat_prompts_become_chat_rows(tmp_path, tiny_tokenizer):
    conv = [{"role": "system", "content": "You help."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "gold answer, replaced"}]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"messages": conv}, {"messages": conv[1:2]}])
    out = tmp_path / "out.jsonl"
    with serve_stub(reply=lambda b: f"  {len(b['messages'])} turns  ") as stub:
        st = generate_targets(cfg_for(f"openai:{stub.url}#stub", prompts, out, prompt_field="messages"))
    assert st["task"] == "chat" and st["generated"] == 2
    first, second = rows(out)
    assert first["messages"] == conv[:2] + [{"role": "assistant", "content": "2 turns"}]
    assert second["messages"] == conv[1:2] + [{"role": "assistant", "content": "1 turns"}]
    assert loads_as_finetune_rows(out, "chat", tiny_tokenizer) == 2


# --- classification: answers mapped to labels -----------------------------------------------------------------

def test_map_label():
    labels = ["positive", "negative", "very positive"]
    assert map_label("Positive.", labels) == "positive"
    assert map_label('  "NEGATIVE"\n', labels) == "negative"
    assert map_label("I would say it is negative overall.", labels) == "negative"
    assert map_label("Very  positive!", labels) == "very positive"
    assert map_label("It is very positive.", labels) == "very positive"  # not also "positive"
    assert map_label("positive or negative", labels) is None
    assert map_label("no idea", labels) is None
    assert map_label("positively", labels) is None  # whole words only


def test_labels_drop_unmappable_answers_and_count_them(tmp_path, tiny_tokenizer):
    answers = {"great film": "Positive.", "awful film": "negative", "fine film": "I think it is positive",
               "odd film": "no idea", "mixed film": "positive or negative", "blank film": ""}
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"text": t, "label": "gold"} for t in answers])
    out = tmp_path / "out.jsonl"
    with serve_stub(reply=lambda b: answers[b["messages"][-1]["content"].split("Review: ")[1]]) as stub:
        st = generate_targets(cfg_for(f"openai:{stub.url}#stub", prompts, out, prompt_field="text",
                                      labels=["positive", "negative"], keep_fields=["label"],
                                      template="Review: {prompt}"))
        assert stub.requests[0]["messages"][-1]["content"].startswith("Review: ")
    assert (st["task"], st["generated"], st["dropped"], st["empty"], st["missing"]) == ("classify", 3, 2, 1, 3)
    got = rows(out)
    assert [(r["text"], r["label"], r["source_label"]) for r in got] == [
        ("great film", "positive", "gold"), ("awful film", "negative", "gold"), ("fine film", "positive", "gold")]
    assert loads_as_finetune_rows(out, "classify", tiny_tokenizer, ["positive", "negative"]) == 3


# --- bad input ------------------------------------------------------------------------------------------------

def slm(capsys, monkeypatch, *args) -> tuple[int, str]:
    """`slmforge ARGS` in this process: (exit code, stderr)."""
    rc, _, err = run_cli(capsys, monkeypatch, *args)
    return rc, err


def one_error(rc: int, err: str, *needles: str) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, monkeypatch, teacher_dir):
    out = tmp_path / "out.jsonl"
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}])
    base = ["distill", "generate", "--out", out, "--no-progress"]

    rc, err = slm(capsys, monkeypatch, *base, "--teacher", teacher_dir, "--prompts", tmp_path / "nope.jsonl")
    one_error(rc, err, "nope.jsonl", "no such file")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"question": "c"}])
    rc, err = slm(capsys, monkeypatch, *base, "--teacher", teacher_dir, "--prompts", bad)
    one_error(rc, err, "bad.jsonl:3", "missing field 'prompt'")
    rc, err = slm(capsys, monkeypatch, *base, "--teacher", "no/such/dir", "--prompts", good)
    one_error(rc, err, "no/such/dir", "not a model directory")
    rc, err = slm(capsys, monkeypatch, *base, "--teacher", "openai:http://127.0.0.1:1/v1#m", "--prompts", good,
                  "--max-retries", 0)
    one_error(rc, err, "openai:http://127.0.0.1:1/v1#m", "all 3 requests", "re-run to resume")
    rc, err = slm(capsys, monkeypatch, *base, "--prompts", good)
    one_error(rc, err, "teacher is required")
    rc, err = slm(capsys, monkeypatch, *base, "--teacher", teacher_dir, "--prompts", good, "--n-samples", 2)
    one_error(rc, err, "n_samples > 1 needs temperature > 0")
    assert not out.exists() and not Path(f"{out}.stats.json").exists()

    # the CLI end to end, then a resume against prompts that changed: refused, the file untouched
    rc, _ = slm(capsys, monkeypatch, *base, "--teacher", teacher_dir, "--prompts", good, "--max-new-tokens", 4,
                "--api", "completion")
    assert rc == 0 and len(rows(out)) == 3
    before = out.read_bytes()
    write_jsonl(good, [{"prompt": "a"}, {"prompt": "B"}, {"prompt": "c"}])
    rc, err = slm(capsys, monkeypatch, *base, "--teacher", teacher_dir, "--prompts", good, "--api", "completion")
    one_error(rc, err, "out.jsonl:2", "not an answer to prompt 1")
    assert out.read_bytes() == before


def test_config_checks(tmp_path):
    ok = dict(teacher="t", prompts="p.jsonl", out="o.jsonl")
    for bad, msg in [(dict(labels=["a"]), "labels"), (dict(labels=["a", "A"]), "labels"),
                     (dict(template="no placeholder"), "{prompt}"), (dict(api="beam"), "api"),
                     (dict(top_p=0), "top_p"), (dict(concurrency=0), "concurrency")]:
        with pytest.raises(ConfigError, match=msg):
            SeqDistillConfig(**ok, **bad)
    txt = tmp_path / "p.txt"
    txt.write_text("a prompt\n", encoding="utf-8")
    with pytest.raises(SlmforgeError, match="keep_fields needs JSONL"):
        generate_targets(cfg_for("t", txt, tmp_path / "o.jsonl", keep_fields=["x"]))
    assert not (tmp_path / "o.jsonl").exists()
