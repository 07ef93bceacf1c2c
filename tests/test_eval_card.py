"""`slmforge eval card`: figures against hand-computed ones for stub models whose answers are known, tiny
local model directories through the judge and the classifier path, resume per cell, bad input as one error
line, and lm-evaluation-harness's `hf` model on our model directory."""

from __future__ import annotations

import json
import math
import shutil
import socket

import pytest
import torch
from openai_stub import serve_stub

from conftest import TINY_LLAMA, save_tiny_llama
from conftest import run_cli as slm
from slmforge.errors import SlmforgeError
from slmforge.evaluate.card import (
    CLASSIFY_TEMPLATE,
    SPEED_PROMPTS,
    EvalCardConfig,
    make_card,
    percentile,
    quality_pct,
)

torch.set_num_threads(1)

CLS = [("Tom saw the cat", "cat"), ("Lily has a dog", "dog"), ("the big cat sleeps", "cat"), ("a dog runs", "dog")]
MT = {"the cat sleeps in the warm house": "die Katze schläft im warmen Haus",
      "the little dog plays in the green garden": "der kleine Hund spielt im grünen Garten",
      "my mother reads a long book every evening": "meine Mutter liest jeden Abend ein langes Buch"}
SMALL_MT = "das ist ein Haus im Garten"
DOCS = ["Tom saw the cat.", "Lily has a big dog today."]
# the stub's log-prob of a token is -len(token)/10, the first token of a prompt has none:
# "Tom saw the cat." -> saw the cat. = -(3 + 3 + 4)/10; "Lily has a big dog today." -> -(3+1+3+3+6)/10
DOCS_NLL = 1.0 + 1.6


def reply(body: dict) -> str:
    """big knows every answer; small says "cat" and one fixed translation; anything else: three words."""
    msg = body["messages"][-1]["content"] if "messages" in body else body.get("prompt", "")
    big = body.get("model") == "big"
    if msg.startswith("Translate"):
        return MT[msg.split(": ", 1)[1].split("\n")[0]] if big else SMALL_MT
    if "\nAnswer with one of" in msg:
        text = msg.split("\nAnswer with one of")[0]
        return ("dog" if "dog" in text else "cat") if big else "cat"
    return "one two three"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("card_data")
    (d / "cls.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in CLS))
    (d / "mt.jsonl").write_text("".join(json.dumps({"prompt": f"Translate to German: {s}\nGerman:",
                                                    "completion": " " + t}) + "\n" for s, t in MT.items()))
    (d / "docs.txt").write_text("\n\n".join(DOCS) + "\n")
    return d


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("card_models") / "tiny")


def words(s: str) -> int:
    return len(s.split())


def test_percentile_and_quality_pct():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)  # numpy's linear interpolation
    assert quality_pct(40.0, 80.0, "accuracy") == 50.0
    assert quality_pct(2.0, 1.0, "bits_per_byte") == 50.0  # twice the bits/byte: half as good
    assert quality_pct(10.0, 0.0, "bleu") is None


def test_card_figures_against_hand_computed(tmp_path, files):
    from slmforge.evaluate.tasks import translation_metrics

    with serve_stub(reply=reply, latency_s=0.02) as stub:
        cfg = EvalCardConfig(models=[f"openai:{stub.url}#small", f"openai:{stub.url}#big"], out=str(tmp_path / "card"),
                             text=[str(files / "docs.txt")],
                             tasks=[str(files / "cls.jsonl"), f"translation:{files / 'mt.jsonl'}"],
                             speed_requests=3, prices=["big=10/30", "small=1/2"], progress=False)
        card = make_card(cfg)
    cells = {(c["model"], c["suite"]): c for c in card["cells"]}
    assert card["large"] == "big" and card["complete"]

    # bits/byte through the endpoint's echoed log-probs
    bpb = DOCS_NLL / (math.log(2) * sum(len(d.encode()) for d in DOCS))
    for m in ("small", "big"):
        assert cells[(m, "bpb:docs")]["metrics"]["bits_per_byte"] == pytest.approx(bpb)
    # classification: small answers "cat" to all: accuracy 2/4; F1 cat = 2/3, dog = 0 -> macro 1/3
    small, big = cells[("small", "classification:cls")]["metrics"], cells[("big", "classification:cls")]["metrics"]
    assert small["accuracy"] == pytest.approx(50.0) and small["macro_f1"] == pytest.approx(100 / 3)
    assert big["accuracy"] == 100.0 and big["macro_f1"] == 100.0
    # translation: big gives the references (BLEU and chrF 100), small one fixed sentence
    refs = list(MT.values())
    want = translation_metrics([SMALL_MT] * 3, refs)
    assert cells[("small", "translation:mt")]["metrics"]["bleu"] == pytest.approx(want["bleu"])
    assert cells[("small", "translation:mt")]["metrics"]["chrf"] == pytest.approx(want["chrf"])
    assert cells[("big", "translation:mt")]["metrics"]["bleu"] == pytest.approx(100.0)

    s = card["summary"]["small"]
    assert s["quality_pct"]["classification:cls"] == pytest.approx({"accuracy": 50.0, "macro_f1": 100 / 3})
    assert s["quality_pct"]["bpb:docs"]["bits_per_byte"] == pytest.approx(100.0)
    assert s["quality_pct"]["translation:mt"]["chrf"] == pytest.approx(want["chrf"])
    # the headline: the mean of each suite's headline (bits/byte, accuracy, BLEU)
    assert s["quality_pct_mean"] == pytest.approx((100.0 + 50.0 + want["bleu"]) / 3)

    # $ per 1k requests: the generation requests (4 classify, 3 translate, 1 warm-up + 3 timed), the
    # stub counting whitespace words of the chat messages and of the reply
    cls_prompts = [CLASSIFY_TEMPLATE.replace("{labels}", "cat, dog").replace("{text}", t) for t, _ in CLS]
    mt_prompts = [f"Translate to German: {src}\nGerman:" for src in MT]
    speed_prompts = [SPEED_PROMPTS[0]] + [SPEED_PROMPTS[i % len(SPEED_PROMPTS)] for i in range(3)]
    p_tokens = sum(map(words, cls_prompts + mt_prompts + speed_prompts))
    c_small = 4 * 1 + 3 * words(SMALL_MT) + 4 * 3
    c_big = 4 * 1 + sum(map(words, refs)) + 4 * 3
    usd_small = 1000 * (p_tokens * 1 + c_small * 2) / 1e6 / 11
    usd_big = 1000 * (p_tokens * 10 + c_big * 30) / 1e6 / 11
    assert s["usd_per_1k_requests"] == pytest.approx(usd_small)
    assert card["summary"]["big"]["usd_per_1k_requests"] == pytest.approx(usd_big)
    assert s["cost_basis"] == "usd_per_1k_requests" and s["cost_pct"] == pytest.approx(100 * usd_small / usd_big)

    # speed: one request at a time, each at least the stub's latency
    sp = cells[("small", "speed")]["metrics"]
    assert sp["requests"] == 3 and sp["completion_tokens"] == 9
    assert 0.02 <= sp["latency_p50_s"] <= sp["latency_p95_s"]
    assert sp["s_per_token"] * sp["tokens_per_s"] == pytest.approx(1.0)

    md = (tmp_path / "card" / "card.md").read_text()
    assert "| small | 50.00 (50.0%) | 33.33 (33.3%) |" in md
    assert f"| small | {s['quality_pct_mean']:.1f}% | {s['cost_pct']:.1f}% | $ per 1k requests |" in md
    assert (tmp_path / "card" / "card.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "card" / "card.json").read_text())["summary"]["small"] == s


def test_local_models_judge_classifier_speed_memory(tmp_path, files, tiny_dir):
    from slmforge.config import ModelConfig
    from slmforge.evaluate.perplexity import judge
    from slmforge.evaluate.tasks import classification_metrics
    from slmforge.infer.predict import classify, read_rows

    clf = tmp_path / "clf" / "model"  # a generative-head classifier: predict's classify path
    shutil.copytree(tiny_dir, clf)
    meta = json.loads((clf / "slmforge.json").read_text())
    meta["classifier"] = {"head": "generative", "labels": ["cat", "dog"], "seq_len": 63, "pooling": "last_token"}
    (clf / "slmforge.json").write_text(json.dumps(meta))
    # big gives no prompt log-probs (as OpenAI's chat models): its bits/byte is n/a, with the reason
    with serve_stub(reply=reply, fail_if=lambda body: 400 if body.get("echo") else None) as stub:
        cfg = EvalCardConfig(models=[str(tiny_dir), str(clf), f"openai:{stub.url}#big"], out=str(tmp_path / "card"),
                             text=[str(files / "docs.txt")], tasks=[str(files / "cls.jsonl")], speed_requests=2,
                             speed_tokens=4, threads=1, progress=False)
        card = make_card(cfg)
    cells = {(c["model"], c["suite"]): c for c in card["cells"]}
    models = {m["name"]: m for m in card["models"]}
    assert set(models) == {"tiny", "clf", "big"}  # runs/x/model is named x

    want = judge(tiny_dir, [files / "docs.txt"])["files"][0]["bits_per_byte"]
    assert cells[("tiny", "bpb:docs")]["metrics"]["bits_per_byte"] == pytest.approx(want, rel=1e-5)
    assert "log-probs" in cells[("big", "bpb:docs")]["na"]
    assert card["summary"]["tiny"]["quality_pct"]["bpb:docs"]["bits_per_byte"] is None

    c = cells[("clf", "classification:cls")]
    preds = classify(clf, read_rows(files / "cls.jsonl"), ["cat", "dog"])
    assert c["how"].startswith("classifier")
    assert c["metrics"]["accuracy"] == pytest.approx(classification_metrics([y for _, y in CLS], preds)["accuracy"])
    assert cells[("tiny", "classification:cls")]["how"].startswith("prompt (completion)")

    n = ModelConfig(**TINY_LLAMA).n_params
    heads, head_dim = TINY_LLAMA["num_attention_heads"], TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]
    flops = 2 * n + 4 * TINY_LLAMA["num_hidden_layers"] * heads * head_dim * TINY_LLAMA["max_position_embeddings"]
    assert models["tiny"]["params"] == n and models["tiny"]["flops_per_token"] == flops
    sp = cells[("tiny", "speed")]["metrics"]
    assert sp["peak_rss_mb"] > 50 and sp["latency_p50_s"] <= sp["latency_p95_s"]
    assert sp["s_per_token"] * sp["tokens_per_s"] == pytest.approx(1.0)
    assert cells[("big", "speed")]["metrics"]["peak_rss_mb"] is None  # remote: not ours to measure
    s = card["summary"]["tiny"]  # big is not priced: cost is measured s/token
    big_spt = cells[("big", "speed")]["metrics"]["s_per_token"]
    assert s["cost_basis"] == "s_per_token" and s["cost_pct"] == pytest.approx(100 * sp["s_per_token"] / big_spt)
    assert "| big | n/a |" in (tmp_path / "card" / "card.md").read_text()


def _by_model(requests: list[dict], start: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for body in requests[start:]:
        out[body.get("model")] = out.get(body.get("model"), 0) + 1
    return out


def test_resume_measures_only_missing_or_changed_cells(tmp_path, files):
    mt = tmp_path / "mt.jsonl"
    shutil.copy(files / "mt.jsonl", mt)
    out = tmp_path / "card"
    # big fails (HTTP 400) on translation: the run stops there, with small's cells and big's first kept
    broken = lambda body: 400 if body.get("model") == "big" and "Translate" in json.dumps(body) else None  # noqa: E731
    with serve_stub(reply=reply, fail_if=broken) as stub:
        cfg = EvalCardConfig(models=[f"openai:{stub.url}#small", f"openai:{stub.url}#big"], out=str(out),
                             tasks=[str(files / "cls.jsonl"), f"translation:{mt}"], speed_requests=2, progress=False)
        with pytest.raises(SlmforgeError, match="HTTP 400"):
            make_card(cfg)
        partial = json.loads((out / "card.json").read_text())
        assert not partial["complete"] and not (out / "card.md").exists()
        assert [(c["model"], c["suite"]) for c in partial["cells"]] == [
            ("small", "classification:cls"), ("small", "translation:mt"), ("small", "speed"),
            ("big", "classification:cls")]

        stub.fail_if = lambda body: None
        start = len(stub.requests)
        card = make_card(cfg)
        # big: 1 probe, 3 translations, 1 warm-up + 2 timed; small: nothing (no probe either)
        assert _by_model(stub.requests, start) == {"big": 1 + 3 + 3}
        assert card["cells"][:4] == partial["cells"]
        assert card["complete"] and (out / "card.md").is_file()

        start = len(stub.requests)
        again = make_card(cfg)
        assert len(stub.requests) == start and again["cells"] == card["cells"]

        with open(mt, "a") as f:  # a changed suite file: that suite only, for both models
            f.write(json.dumps({"prompt": "Translate to German: the cat sleeps in the warm house\nGerman:",
                                "completion": " die Katze schläft im warmen Haus"}) + "\n")
        start = len(stub.requests)
        third = make_card(cfg)
        assert _by_model(stub.requests, start) == {"small": 1 + 4, "big": 1 + 4}
        assert [c for c in third["cells"] if c["suite"] != "translation:mt"] == \
               [c for c in card["cells"] if c["suite"] != "translation:mt"]
        assert {c["metrics"]["n"] for c in third["cells"] if c["suite"] == "translation:mt"} == {4}


def one_error(rc: int, err: str, *needles: str) -> None:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["missing file", "bad jsonl line", "row without label", "unknown suite field",
                                  "unknown suite kind", "unreachable endpoint", "bad price"])
def test_bad_input_is_one_error_line_and_writes_nothing(case, tmp_path, files, capsys, monkeypatch):
    out = tmp_path / "card"
    bad = tmp_path / "bad.jsonl"
    with serve_stub(reply=reply) as stub:
        models = [f"openai:{stub.url}#small", f"openai:{stub.url}#big"]
        args: list = ["eval", "card", *models, "--out", out, "--no-progress"]
        if case == "missing file":
            args += ["--text", tmp_path / "nope.txt"]
            needles = ["nope.txt", "no such file"]
        elif case == "bad jsonl line":
            bad.write_text(json.dumps({"text": "a cat", "label": "cat"}) + "\n{not json\n")
            args += ["--tasks", bad]
            needles = ["bad.jsonl:2", "invalid JSON"]
        elif case == "row without label":
            bad.write_text(json.dumps({"text": "a cat", "label": "cat"}) + "\n" + json.dumps({"text": "x"}) + "\n")
            args += ["--tasks", bad]
            needles = ["bad.jsonl:2", "'label'"]
        elif case in ("unknown suite field", "unknown suite kind"):
            suite = "{kind: classification, file: x.jsonl, bogus: 1}" if case == "unknown suite field" else \
                    "{kind: classify, file: x.jsonl}"
            (tmp_path / "card.yaml").write_text(f"models: {json.dumps(models)}\nsuites:\n  - {suite}\n")
            args = ["eval", "card", "--config", tmp_path / "card.yaml", "--out", out]
            needles = (["card.yaml:3", "suites[0].bogus", "unknown field"] if case == "unknown suite field"
                       else ["card.yaml:3", "'classify'"])
        elif case == "unreachable endpoint":
            dead = f"http://127.0.0.1:{_closed_port()}/v1"
            args = ["eval", "card", models[0], f"openai:{dead}#big", "--out", out, "--no-speed",
                    "--tasks", files / "cls.jsonl"]
            needles = ["big", "not reachable", dead]
        else:
            args += ["--prices", "big=cheap"]
            needles = ["prices", "big=cheap"]
        rc, _, err = slm(capsys, monkeypatch, *args)
        assert not stub.requests or case == "unreachable endpoint"  # nothing was measured
    one_error(rc, err, *needles)
    assert not out.exists()


def test_cli_reads_yaml_and_options_override_it(tmp_path, files, capsys, monkeypatch):
    with serve_stub(reply=reply) as stub:
        (tmp_path / "card.yaml").write_text(
            f"models: [small=openai:{stub.url}#small, 'openai:{stub.url}#big']\n"
            f"out: {tmp_path / 'from_yaml'}\n"
            f"suites:\n  - {{kind: classification, file: {files / 'cls.jsonl'}, name: pets}}\n")
        rc, out, err = slm(capsys, monkeypatch, "eval", "card", "--config", tmp_path / "card.yaml",
                           "--out", tmp_path / "from_cli", "--no-speed", "--prices", "big=10/20,small=1/2")
    assert rc == 0, err
    assert not (tmp_path / "from_yaml").exists()
    card = json.loads((tmp_path / "from_cli" / "card.json").read_text())
    assert [s["name"] for s in card["suites"]] == ["pets"]  # no speed suite: --no-speed won over the default
    # both priced, the same prompts, one-word answers from both: the cost is the price ratio
    assert "small: quality 50.0% of big at 10.0% of its cost ($ per 1k requests)" in out
    assert "card [2/2] big · pets: measuring" in err


# ---------------------------------------------------------------------------------------------------------
# lm-evaluation-harness: its `hf` model loads our model directory as it is


def test_lm_eval_harness_hf_model_on_our_model_dir(tmp_path, monkeypatch, tiny_dir):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from slmforge.lm import LocalLM

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    data = tmp_path / "pets.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in CLS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "pets.yaml").write_text(
        "task: slmforge_pets\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'hf_cache'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{text}}\\nlabel:"\ndoc_to_choice: ["cat", "dog"]\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    try:  # only our task: indexing lm_eval's thousands of built-in task files takes most of a minute
        tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    except TypeError:  # an lm_eval without include_defaults
        tasks = TaskManager(include_path=str(tmp_path / "tasks"))
    res = simple_evaluate(model="hf", model_args=f"pretrained={tiny_dir},dtype=float32", tasks=["slmforge_pets"],
                          task_manager=tasks, device="cpu", batch_size=1, log_samples=True)
    # the same log-likelihoods as our own scoring of " cat" / " dog" after the prompt (BOS first)
    lm = LocalLM(tiny_dir, device="cpu")
    hits = []
    for sample in res["samples"]["slmforge_pets"]:
        (ctx, _), _ = sample["arguments"]
        theirs = [r[0][0] for r in sample["resps"]]
        ours = lm.score([ctx, ctx], [" cat", " dog"])
        assert theirs == pytest.approx(ours, abs=1e-3)
        target = sample["target"] if isinstance(sample["target"], str) else ["cat", "dog"][sample["target"]]
        hits.append(["cat", "dog"][ours.index(max(ours))] == target)
    assert len(hits) == len(CLS)
    assert res["results"]["slmforge_pets"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
