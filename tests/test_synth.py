"""Synthetic data: recorded formulas, determinism per (seed, i), resume after a kill, correct textbook answers,
LM teachers (a local model directory, an OpenAI-compatible server with failures, refusals and empty replies)."""

import json
import re
import zlib
from fractions import Fraction

import pytest
from openai_stub import serve_stub

from slmforge.data import synth
from slmforge.data.storygen import sample_seed, write_story
from slmforge.data.synth import plan_sample, synthesize, write_builtin
from slmforge.data.textbook import (
    AUDIENCES,
    COMPUTABLE_TOPICS,
    EXERCISES,
    STYLES,
    sample_textbook_seed,
    write_section,
)
from slmforge.errors import SlmforgeError
from slmforge.lm import OpenAILM


def rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_rows_record_the_formula(tmp_path):
    st = synthesize("stories", 12, tmp_path / "s.jsonl", seed=3, progress=False)
    assert (st.written, st.existing, st.complete) == (12, 0, True)
    for i, r in enumerate(rows(tmp_path / "s.jsonl")):
        s = sample_seed(i, 3)
        assert r["id"] == f"stories-3-{i}" and r["recipe"] == "stories" and r["teacher"] == "builtin"
        assert r["seed_words"] == {"verb": s.verb, "noun": s.noun, "adjective": s.adjective}
        assert r["features"] == s.features and r["prompt"] == s.prompt() and r["text"] == write_story(s)

    synthesize("textbook", 12, tmp_path / "t.jsonl", seed=3, progress=False)
    for i, r in enumerate(rows(tmp_path / "t.jsonl")):
        t = sample_textbook_seed(i, 3)
        assert r["id"] == f"textbook-3-{i}"
        assert (r["topic"], r["audience"], r["style"], r["exercise"]) == (t.topic, t.audience, t.style, t.exercise)
        assert r["topic"] in COMPUTABLE_TOPICS and r["prompt"] == t.prompt()
        assert t.topic in r["prompt"] and t.audience in r["prompt"] and t.exercise in r["prompt"]
    stats = json.loads((tmp_path / "t.jsonl.stats.json").read_text())
    assert stats["complete"] and stats["written"] == 12 and stats["usage"]["cost_usd"] == 0


@pytest.mark.parametrize("recipe", ["stories", "textbook"])
def test_sample_depends_only_on_seed_and_index(tmp_path, recipe):
    synthesize(recipe, 20, tmp_path / "a.jsonl", seed=5, batch_size=3, progress=False)
    synthesize(recipe, 8, tmp_path / "b.jsonl", seed=5, batch_size=64, progress=False)
    synthesize(recipe, 8, tmp_path / "c.jsonl", seed=6, progress=False)
    a, b, c = rows(tmp_path / "a.jsonl"), rows(tmp_path / "b.jsonl"), rows(tmp_path / "c.jsonl")
    assert a[:8] == b
    assert [r["text"] for r in c] != [r["text"] for r in b]
    assert a[17]["text"] == write_builtin(recipe, plan_sample(recipe, 17, 5))


@pytest.mark.parametrize("recipe", ["stories", "textbook"])
def test_resume_after_a_kill_gives_the_uninterrupted_file(tmp_path, recipe, monkeypatch):
    full = tmp_path / "full.jsonl"
    synthesize(recipe, 40, full, seed=1, batch_size=7, progress=False)
    want = full.read_bytes()

    # killed mid-write: the file ends in half a line
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(want[: int(len(want) * 0.6)])
    assert not cut.read_bytes().endswith(b"\n")
    st = synthesize(recipe, 40, cut, seed=1, batch_size=7, progress=False)
    assert st.truncated_bytes > 0 and st.existing == want[: int(len(want) * 0.6)].count(b"\n")
    assert cut.read_bytes() == want and st.complete

    # killed between batches (Ctrl-C in the teacher): whole lines only, stats say incomplete
    killed = tmp_path / "killed.jsonl"
    real = synth.write_builtin

    def dies_at_23(recipe_, plan):
        if plan.index == 23:
            raise KeyboardInterrupt
        return real(recipe_, plan)

    monkeypatch.setattr(synth, "write_builtin", dies_at_23)
    with pytest.raises(KeyboardInterrupt):
        synthesize(recipe, 40, killed, seed=1, batch_size=7, progress=False)
    assert killed.read_bytes() == b"".join(want.splitlines(keepends=True)[:21])  # 3 whole batches
    assert json.loads((tmp_path / "killed.jsonl.stats.json").read_text())["complete"] is False
    monkeypatch.setattr(synth, "write_builtin", real)
    st = synthesize(recipe, 40, killed, seed=1, batch_size=7, progress=False)
    assert (st.existing, st.written, st.truncated_bytes) == (21, 19, 0)
    assert killed.read_bytes() == want

    # nothing left to do: nothing written
    st = synthesize(recipe, 40, killed, seed=1, progress=False)
    assert st.written == 0 and st.complete and killed.read_bytes() == want


def test_resume_refuses_a_file_from_another_run(tmp_path):
    p = tmp_path / "s.jsonl"
    synthesize("stories", 3, p, seed=1, progress=False)
    with pytest.raises(SlmforgeError, match=r"s\.jsonl:1: id 'stories-1-0' is not from recipe 'stories' seed 2"):
        synthesize("stories", 3, p, seed=2, progress=False)
    p.write_text('{"id": "stories-1-0", "text": "x"}\n{"id": oops}\n')
    with pytest.raises(SlmforgeError, match=r"s\.jsonl:2: not a synth row"):
        synthesize("stories", 3, p, seed=1, progress=False)


def test_bad_arguments(tmp_path):
    with pytest.raises(SlmforgeError, match="unknown recipe 'poems'"):
        synthesize("poems", 3, tmp_path / "x.jsonl")
    with pytest.raises(SlmforgeError, match="pass an LM teacher"):
        synthesize("textbook", 3, tmp_path / "x.jsonl", topics=["arithmetic", "the water cycle"])
    with pytest.raises(SlmforgeError, match="on_error"):
        synthesize("stories", 3, tmp_path / "x.jsonl", on_error="ignore")
    with pytest.raises(SlmforgeError, match="not a model directory"):
        synthesize("stories", 3, tmp_path / "x.jsonl", teacher=str(tmp_path / "nope"))
    assert not (tmp_path / "x.jsonl").exists()


# --- textbook answers are right ---------------------------------------------------------------------------------

UNIT = {"mm": 1, "cm": 10, "m": 1000, "km": 10**6, "g": 1, "kg": 1000, "mL": 1, "L": 1000, "s": 1, "min": 60,
        "h": 3600}


def check_equation(topic: str, eq: str) -> None:
    """Recompute an answer-key equation independently of the writer."""
    if topic == "arithmetic":
        lhs, rhs = eq.rsplit(" = ", 1)
        assert eval(lhs.replace("−", "-").replace("×", "*").replace("÷", "/")) == int(rhs), eq
    elif topic == "fractions":
        x, op, y, _, v = eq.split(" ")
        x, y = Fraction(x), Fraction(y)
        assert {"+": x + y, "−": x - y, "×": x * y, "÷": x / y}[op] == Fraction(v), eq
        assert Fraction(v).denominator == int(v.split("/")[1]) if "/" in v else True, f"not simplest: {eq}"
    elif topic == "percentages":
        if m := re.fullmatch(r"(\S+)% of (\S+) = (\S+)", eq):
            p, x, v = map(Fraction, m.groups())
            assert p * x / 100 == v, eq
        elif m := re.fullmatch(r"(\S+) out of (\S+) = (\S+)%", eq):
            a, b, p = map(Fraction, m.groups())
            assert a / b * 100 == p, eq
        else:
            x, word, p, v = re.fullmatch(r"(\S+) (increased|decreased) by (\S+)% = (\S+)", eq).groups()
            sign = 1 if word == "increased" else -1
            assert Fraction(x) * (100 + sign * Fraction(p)) / 100 == Fraction(v) >= 0, eq
    elif topic == "unit conversion":
        q, src, _, v, dst = eq.split(" ")
        assert Fraction(q) * UNIT[src] / UNIT[dst] == Fraction(v), eq
    else:
        expr, value = re.fullmatch(r"`(.+)` evaluates to `(.+)`", eq).groups()
        assert repr(eval(expr)) == value, eq


def result(eq: str) -> str:
    """The answer an equation states: "3/4 + 1/6 = 11/12" -> "11/12", "3 km = 3000 m" -> "3000"."""
    if m := re.fullmatch(r"`.+` evaluates to `(.+)`", eq):
        return m.group(1)
    return eq.rsplit(" = ", 1)[1].split(" ")[0]


def parse_section(text: str) -> tuple[dict[int, list[str]], list[tuple[int, str, str]]]:
    """Exercises {k: [question line, options line?]} and answer key [(k, answer, equation)]."""
    body, key = text.split("\n\n## Answer key\n")
    block = body.split("## Exercises\n\n")[1].split("\n\n")[1]
    exercises: dict[int, list[str]] = {}
    for line in block.split("\n"):
        if m := re.match(r"(\d+)\. (.*)", line):
            exercises[int(m.group(1))] = [m.group(2)]
        else:
            exercises[max(exercises)].append(line.strip())
    answers = [(int(k), a, eq) for k, a, eq in (re.fullmatch(r"(\d+)\. (.*?): (.*)", x).groups()
                                                 for x in key.split("\n"))]
    return exercises, answers


def test_textbook_builtin_answers_are_correct():
    seen_types, n_true, n_false = set(), 0, 0
    for i in range(150):
        s = sample_textbook_seed(i, seed=11)
        text = write_section(s)
        exercises, answers = parse_section(text)
        assert sorted(exercises) == [k for k, _, _ in answers] and 4 <= len(answers) <= 6
        for k, answer, eq in answers:
            check_equation(s.topic, eq)
            q = exercises[k]
            if s.exercise == "multiple choice":
                letter, value = answer.split(") ", 1)
                options = dict(re.findall(r"([A-D])\) (.*?)(?=  [A-D]\) |$)", q[1]))
                assert options[letter] == value and list(options.values()).count(value) == 1, (q, answer)
                assert value == result(eq), (eq, value)
            elif s.exercise == "true or false":
                statement = q[0].removeprefix("True or false: ")
                assert answer == ("True" if statement == eq else "False"), (statement, eq, answer)
                n_true += answer == "True"
                n_false += answer == "False"
            elif s.exercise == "fill in the blank":
                assert q[0].replace("____", answer) == eq, (q, eq)
            else:
                assert answer == result(eq), (answer, eq)
        seen_types.add((s.exercise, s.topic))
        assert s.style and s.audience in AUDIENCES
    assert {e for e, _ in seen_types} == set(EXERCISES) and {t for _, t in seen_types} == set(COMPUTABLE_TOPICS)
    assert n_true > 20 and n_false > 20


def test_textbook_wording_varies_with_audience_and_style():
    base = sample_textbook_seed(0, seed=2)
    texts = set()
    for audience in AUDIENCES:
        for style in STYLES:
            texts.add(write_section(type(base)("fractions", audience, style, "short answer", base.seed)))
    assert len(texts) == len(AUDIENCES) * len(STYLES)
    qa = write_section(type(base)("arithmetic", "adult beginners", "question and answer", "short answer", 1))
    steps = write_section(type(base)("arithmetic", "adult beginners", "step by step", "short answer", 1))
    assert "**Q:" in qa and "Step 1:" in steps and "Step 1:" not in qa


# --- LM teachers ------------------------------------------------------------------------------------------------

def test_local_model_dir_teacher(tmp_path, tiny_model_dir):
    import torch

    torch.set_num_threads(1)
    st = synthesize("stories", 3, tmp_path / "s.jsonl", teacher=str(tiny_model_dir), max_new_tokens=6,
                    progress=False)
    assert st.written + st.empty + st.refused == 3 and st.usage["requests"] == 3
    assert st.usage["prompt_tokens"] > 3 * 50  # the TinyStories prompt in the chat template
    for r in rows(tmp_path / "s.jsonl"):
        assert r["teacher"] == str(tiny_model_dir) and r["seed_words"] and r["text"]


def _verdict(body: dict) -> int:
    """What the stub does with a prompt, stable across runs: 0 fail, 1 refuse, 2 empty, else reply."""
    return zlib.crc32(body["messages"][0]["content"].encode()) % 8


def test_openai_teacher_counts_failures_refusals_empties_and_resumes(tmp_path):
    out = tmp_path / "s.jsonl"
    n = 40

    def reply(body):
        v = _verdict(body)
        return "I'm sorry, but I can't write that." if v == 1 else "" if v == 2 else \
            "Once upon a time " + body["messages"][0]["content"][-60:]

    with serve_stub(reply=reply, fail_if=lambda body: 500 if _verdict(body) == 0 else None,
                    latency_s=0.01) as stub:
        lm = OpenAILM(stub.url, "stub", concurrency=4, max_retries=1, backoff_s=0.001)
        st = synthesize("stories", n, out, teacher="ignored", lm=lm, batch_size=16, price_in=1.0, price_out=2.0,
                        max_new_tokens=50, temperature=0.7, progress=False)
        verdicts = [_verdict({"messages": [{"content": plan_sample("stories", i).prompt}]}) for i in range(n)]
        assert (st.failed, st.refused, st.empty) == tuple(verdicts.count(v) for v in (0, 1, 2))
        assert st.failed and st.refused and st.empty  # the crc picks some of each among 40
        assert st.written == n - st.failed - st.refused - st.empty and not st.complete
        assert stub.max_in_flight > 1
        body = next(b for b in stub.requests if _verdict(b) > 2)
        i = next(i for i in range(n) if plan_sample("stories", i).prompt == body["messages"][0]["content"])
        assert body["seed"] == plan_sample("stories", i).sampling_seed and body["max_tokens"] == 50
        assert body["temperature"] == 0.7
        u = st.usage
        assert u["retries"] == st.failed and u["failures"] == st.failed and u["requests"] == n - st.failed
        assert u["cost_usd"] == pytest.approx((u["prompt_tokens"] * 1.0 + u["completion_tokens"] * 2.0) / 1e6)
        assert u["prompt_tokens"] > 0 and u["completion_tokens"] > 0
        got = rows(out)
        assert all(r["text"].startswith("Once upon a time") for r in got)
        first_usage = u

    # the endpoint recovers: a re-run asks only for the missing samples, by spec string
    with serve_stub(reply=lambda body: "The end.") as stub:
        st = synthesize("stories", n, out, teacher=f"openai:{stub.url}#stub", concurrency=4, progress=False)
        assert len(stub.requests) == n - len(got) and st.existing == len(got) and st.complete
    final = rows(out)
    assert sorted(int(r["id"].rsplit("-", 1)[1]) for r in final) == list(range(n))
    assert final[: len(got)] == got and final[-1]["teacher"] == f"openai:{stub.url}#stub"
    stats = json.loads((tmp_path / "s.jsonl.stats.json").read_text())
    assert stats["usage_total"]["requests"] == first_usage["requests"] + n - len(got)


def test_openai_teacher_on_error_fail_keeps_what_succeeded(tmp_path):
    out = tmp_path / "t.jsonl"
    with serve_stub(reply=lambda body: "Section text.",
                    fail_if=lambda body: 400 if "fractions" in body["messages"][0]["content"] else None) as stub:
        lm = OpenAILM(stub.url, "stub", concurrency=2)
        with pytest.raises(SlmforgeError, match="HTTP 400.*re-run to resume"):
            synthesize("textbook", 30, out, lm=lm, batch_size=30, on_error="fail", progress=False,
                       topics=["fractions", "the water cycle"])
    got = rows(out)
    assert got and all(r["topic"] == "the water cycle" for r in got)
    stats = json.loads((tmp_path / "t.jsonl.stats.json").read_text())
    assert stats["failed"] == 30 - len(got) and not stats["complete"]


def _base_lm_dir(tmp_path):
    """A tiny base LM: a model dir whose tokenizer has no chat template."""
    from conftest import TINY_LLAMA, small_corpus
    from slmforge.config import ModelConfig
    from slmforge.model import LlamaModel
    from slmforge.modeldir import save_model_dir
    from slmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(small_corpus(), vocab_size=320)
    tok.chat_template = None
    model = LlamaModel(ModelConfig(**TINY_LLAMA))
    model.reset_parameters(seed=0)
    return save_model_dir(tmp_path / "base", model, tok, {"stage": "test"})


def test_base_lm_teacher_samples_from_bos_deterministically_and_resumes(tmp_path):
    teacher = _base_lm_dir(tmp_path)
    assert synth.is_base_lm(str(teacher)) and not synth.is_base_lm("builtin")
    full = synthesize("stories", 6, tmp_path / "a.jsonl", teacher=str(teacher), batch_size=4, progress=False,
                      max_new_tokens=20)
    assert full.complete and full.written == 6 and full.usage["completion_tokens"] > 0
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").open()]
    assert [r["prompt"] for r in rows] == [""] * 6 and "seed_words" not in rows[0]
    assert len({r["text"] for r in rows}) > 1  # one seed per story: not six copies
    # a run cut after 3 stories and resumed gives the same file: each story's seed is its own
    synthesize("stories", 3, tmp_path / "b.jsonl", teacher=str(teacher), batch_size=2, progress=False,
               max_new_tokens=20)
    synthesize("stories", 6, tmp_path / "b.jsonl", teacher=str(teacher), batch_size=4, progress=False,
               max_new_tokens=20)
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()
    with pytest.raises(SlmforgeError, match="can only teach `stories`"):
        synthesize("textbook", 2, tmp_path / "c.jsonl", teacher=str(teacher), progress=False)
