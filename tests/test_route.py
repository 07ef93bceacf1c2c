"""Routers between a small and a large model (slmforge/route.py): RouteLLM's metrics against hand-computed
figures, calibration, save/load, learned routers against random, the loaders' errors, the CLI end to end."""

import json
import random
import sys

import numpy as np
import pytest

from conftest import save_tiny_llama, shared_data
from slmforge.errors import SlmforgeError
from slmforge.route import (
    OutcomeFormat,
    RouterConfig,
    apgr,
    calibrate,
    cpt,
    curve_metrics,
    evaluate,
    load_outcomes,
    load_router,
    optimal_curve,
    oracle_scores,
    outcomes_from_rows,
    pgr_at,
    quality_curve,
    random_baseline,
    routed_quality,
    router_scores,
    save_router,
    scores_for,
    split_by_group,
    threshold_for_share,
    train_router,
)

HARD = ["integral", "eigenvalue", "theorem", "derivative", "entropy", "lemma"]
EASY = ["capital", "colour", "animal", "river", "fruit", "planet"]
FILLER = ["what", "is", "the", "of", "a", "which", "one", "name", "about", "this", "best", "answer"]


def synthetic(n: int, seed: int = 0, hard_share: float = 0.3) -> list[dict]:
    """Prompts whose difficulty shows in their words: the small model fails most 'hard' ones, the large model
    few. The small model's confidence is lower on hard prompts (noisy), for the cascade."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        hard = rng.random() < hard_share
        topic = rng.choice(HARD if hard else EASY)
        words = rng.sample(FILLER, 5) + [topic, rng.choice(HARD if hard else EASY)]
        rng.shuffle(words)
        rows.append({"prompt": f"q{i} " + " ".join(words), "small": rng.random() < (0.15 if hard else 0.9),
                     "large": rng.random() < (0.9 if hard else 0.95), "group": topic,
                     "mean_logprob": -(2.0 if hard else 0.5) + rng.gauss(0, 0.6)})
    return rows


@pytest.fixture(scope="module")
def data():
    return outcomes_from_rows(synthetic(400, seed=1), "train", signal="mean_logprob")


@pytest.fixture(scope="module")
def held_out():
    return outcomes_from_rows(synthetic(300, seed=2), "test", signal="mean_logprob")


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_against_hand_computed_figures():
    d = outcomes_from_rows([{"prompt": "a", "small": 0, "large": 1}, {"prompt": "b", "small": 1, "large": 1},
                            {"prompt": "c", "small": 0, "large": 1}, {"prompt": "d", "small": 1, "large": 0}])
    scores = np.array([0.9, 0.1, 0.5, 0.3])
    curve = quality_curve(scores, d, bins=2)
    # edges: quantiles 0, .5, 1 of the scores = 0.1, 0.4, 0.9; >= 0.1: all large, >= 0.4: a and c, > 0.9: none
    assert [(p["share"], p["quality"]) for p in curve] == [(0.0, 0.5), (0.5, 1.0), (1.0, 0.75)]
    # PGR = (quality - 0.5) / (0.75 - 0.5): 0, 2, 1; trapezoids 0.5 * (0 + 2) / 2 + 0.5 * (2 + 1) / 2 = 1.25
    assert apgr(curve, d) == pytest.approx(1.25)
    assert cpt(curve, d, 0.5) == pytest.approx(0.125)  # PGR rises 0 -> 2 over shares 0 -> 0.5
    assert pgr_at(curve, d, 0.0) == 0 and pgr_at(curve, d, 1.0) == 1
    assert routed_quality(scores, d, 0.4) == (0.5, 1.0)
    # RouteLLM's optimal router: the one prompt that gains from the large model first
    assert [p["quality"] for p in optimal_curve(d, points=5)] == [0.5, 0.75, 1.0, 1.0, 1.0]


def test_oracle_and_random_routers():
    rows = [{"prompt": f"p{i}", "small": i >= 100, "large": True} for i in range(1000)]  # 10% gain from large
    d = outcomes_from_rows(rows)
    m = curve_metrics(quality_curve(oracle_scores(d), d), d)
    assert m["apgr"] == pytest.approx(1 - 0.1 / 2)  # PGR 0 -> 1 over the first 10% of calls, then 1
    assert m["cpt50"] == pytest.approx(0.05)
    for curve in (m["curve"], quality_curve(router_scores(_random(), d.prompts), d)):
        assert pgr_at(curve, d, 0.0) == pytest.approx(0.0) and pgr_at(curve, d, 1.0) == pytest.approx(1.0)
    rnd = random_baseline(d, seeds=20)
    assert abs(rnd["apgr"] - 0.5) < 0.03 and abs(rnd["cpt50"] - 0.5) < 0.05  # 0.5 in expectation


def _random():
    from slmforge.route import Router

    return Router(RouterConfig(router="random"))


def test_pgr_needs_a_gap():
    d = outcomes_from_rows([{"prompt": "a", "small": 1, "large": 1}, {"prompt": "b", "small": 0, "large": 0}])
    with pytest.raises(SlmforgeError, match="no performance gap"):
        evaluate(np.array([0.1, 0.2]), d)


# ------------------------------------------------------------------------------------------------ routers


def test_learned_routers_beat_random_where_difficulty_is_learnable(data, held_out):
    cache: dict = {}
    figures = {}
    for name, cfg in {"learned": RouterConfig(router="learned"),
                      "gain": RouterConfig(router="learned", target="gain"),
                      "mf": RouterConfig(router="mf", epochs=10, mf_dim=16, noise=0.01, lr=3e-2),
                      "sw": RouterConfig(router="sw"),
                      "cascade": RouterConfig(router="cascade", signal="mean_logprob")}.items():
        r = train_router(data, cfg, cache)
        figures[name] = evaluate(scores_for(r, held_out), held_out)["apgr"]
    rnd = random_baseline(held_out, seeds=10)["apgr"]
    assert abs(rnd - 0.5) < 0.08
    for name, a in figures.items():
        assert a > rnd + 0.15, (name, figures, rnd)


def test_cascade_escalates_the_unconfident(data):
    r = train_router(data, RouterConfig(router="cascade", signal="mean_logprob"))
    assert r.params["signal_kind"] == "confidence"
    s = router_scores(r, ["x", "y"], [-3.0, -0.1])
    assert s[0] > s[1]  # lower log-prob: more need of the large model
    r = train_router(outcomes_from_rows([{**row, "entropy": 1.0} for row in synthetic(20)], signal="entropy"),
                     RouterConfig(router="cascade", signal="entropy"))
    assert r.params["signal_kind"] == "uncertainty"
    assert router_scores(r, ["x", "y"], [2.0, 0.1])[0] > router_scores(r, ["x", "y"], [2.0, 0.1])[1]
    with pytest.raises(SlmforgeError, match="needs the field 'mean_logprob'"):
        scores_for(train_router(data, RouterConfig(router="cascade", signal="mean_logprob")),
                   outcomes_from_rows(synthetic(5)))


def test_calibration_on_validation_hits_its_target(data, held_out):
    r = train_router(data, RouterConfig(router="learned", target="gain"))
    r = calibrate(r, data, share=0.3)
    assert r.calibration["val_share"] == pytest.approx(0.3, abs=1 / len(data))
    share, _ = routed_quality(scores_for(r, held_out), held_out, r.threshold)  # applied unchanged
    assert abs(share - 0.3) < 0.08
    r = calibrate(r, data, quality=0.95)
    s = scores_for(r, data)
    _, q = routed_quality(s, data, r.threshold)
    assert r.calibration["reached"] and q >= 0.95 * data.large.mean() - 1e-9
    # the fewest calls: one prompt fewer to the large model (the next higher score as threshold) misses it
    higher = np.sort(s[s > r.threshold])
    if len(higher) > 1:
        assert routed_quality(s, data, higher[1])[1] < 0.95 * data.large.mean()
    assert threshold_for_share(np.array([3.0, 2.0, 1.0, 0.0]), 0.5) == 1.5
    with pytest.raises(SlmforgeError, match="exactly one target"):
        calibrate(r, data, share=0.2, pgr=0.5)


@pytest.mark.parametrize("cfg", [
    RouterConfig(router="random", seed=3),
    RouterConfig(router="cascade", signal="mean_logprob"),
    RouterConfig(router="learned", target="small_ok"),
    RouterConfig(router="learned", classifier="mlp", target="gain", hidden=8, epochs=20),
    RouterConfig(router="mf", epochs=3, mf_dim=8),
    RouterConfig(router="sw", embedder="tfidf-char"),
], ids=lambda c: f"{c.router}-{c.classifier}-{c.embedder}")
def test_save_load_gives_identical_scores(tmp_path, data, held_out, cfg):
    r = calibrate(train_router(data, cfg), data, share=0.25)
    save_router(r, tmp_path / "router")
    back = load_router(tmp_path / "router")
    assert np.array_equal(scores_for(r, held_out), scores_for(back, held_out))
    assert back.threshold == r.threshold and back.calibration == r.calibration and back.config == cfg
    assert not list(tmp_path.glob(".*"))  # no staging folder left behind


def test_model_hidden_state_embeddings(tmp_path, data, held_out):
    model = save_tiny_llama(tmp_path / "model")
    cfg = RouterConfig(router="learned", embedder=f"model:{model}", max_tokens=32)
    small, test = data.take(range(120)), held_out.take(range(40))
    r = train_router(small, cfg)
    s = scores_for(r, test)
    assert s.shape == (40,) and np.isfinite(s).all() and s.std() > 0
    save_router(r, tmp_path / "router")
    assert np.allclose(scores_for(load_router(tmp_path / "router"), test), s)
    with pytest.raises(SlmforgeError, match="sentence-transformers"):
        if "sentence_transformers" in sys.modules or _has("sentence_transformers"):
            pytest.skip("sentence-transformers is installed")
        train_router(small, RouterConfig(router="learned", embedder=f"st:{tmp_path}"))


def _has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_save_refuses_a_folder_of_something_else(tmp_path, data):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SlmforgeError, match="not a router folder"):
        save_router(train_router(data, RouterConfig(router="random")), tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------ loaders


def test_jsonl_and_csv_loaders(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text('{"prompt": "a", "small": true, "large": 0.5, "group": "g1"}\n\n'
                 '{"prompt": "b", "small": 0, "large": 1}\n')
    d = load_outcomes(p)
    assert d.prompts == ["a", "b"] and d.small.tolist() == [1.0, 0.0] and d.large.tolist() == [0.5, 1.0]
    assert d.groups == ["g1", ""]
    # RouteLLM's layout: a folder with mmlu_responses/mmlu_<subject>.csv and the contaminated prompts beside it
    root = tmp_path / "routing"
    (root / "mmlu_responses").mkdir(parents=True)
    header = "prompt,mistralai/Mixtral-8x7B-Instruct-v0.1,gpt-4-1106-preview\n"
    (root / "mmlu_responses" / "mmlu_algebra.csv").write_text(
        header + '"Find x.\nA. 1\nB. 2\nAnswer:",False,True\nEasy one?,True,True\n')
    (root / "mmlu_responses" / "mmlu_law.csv").write_text(header + "Is it legal?,True,False\n")
    (root / "mmlu_contaminated_prompts.jsonl").write_text(json.dumps({"eval_prompt": "Easy one?",
                                                                      "train_prompt": "x"}) + "\n")
    d = load_outcomes(root)
    assert len(d) == 2 and d.excluded == 1 and d.groups == ["algebra", "law"]
    assert d.prompts[0].startswith("Find x.\nA. 1") and d.small.tolist() == [0.0, 1.0]
    assert len(load_outcomes(root, OutcomeFormat(contaminated="none"))) == 3
    assert load_outcomes(root, OutcomeFormat(groups=["law"])).prompts == ["Is it legal?"]
    train, test = split_by_group(load_outcomes(root, OutcomeFormat(contaminated="none")), (1, 1))
    assert {len(train), len(test)} == {1, 2} and not set(train.groups) & set(test.groups)


@pytest.mark.parametrize("name,text,needles", [
    ("bad.jsonl", '{"prompt": "a", "small": 1, "large": 1}\n{"prompt": "b", "small": 2, "large": 1}\n',
     ["bad.jsonl:2", "field 'small'", "[0, 1]"]),
    ("nolarge.jsonl", '{"prompt": "a", "small": 1}\n', ["nolarge.jsonl:1", "field 'large': missing"]),
    ("empty_prompt.jsonl", '{"prompt": " ", "small": 1, "large": 1}\n', ["empty_prompt.jsonl:1", "'prompt'"]),
    ("broken.jsonl", '{"prompt": "a", "small": 1, "large": 1}\n{"prompt": \n', ["broken.jsonl:2", "invalid JSON"]),
    ("words.csv", 'prompt,small,large\n"two\nlines",1,1\nthree,maybe,1\n', ["words.csv:4", "field 'small'", "'maybe'"]),
    ("cols.csv", "prompt,small\nx,1\n", ["cols.csv:1", "no column 'large'"]),
    ("short.csv", "prompt,small,large\nx,1\n", ["short.csv:2", "2 fields"]),
    ("notes.txt", "hello\n", ["notes.txt", ".jsonl or .csv"]),
])
def test_bad_files_give_one_error_naming_file_line_and_field(tmp_path, name, text, needles):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(SlmforgeError) as e:
        load_outcomes(p)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_bad_settings_are_config_errors():
    with pytest.raises(SlmforgeError, match="router must be one of"):
        RouterConfig(router="bert")
    with pytest.raises(SlmforgeError, match="needs --signal"):
        RouterConfig(router="cascade")
    with pytest.raises(SlmforgeError, match="embedder must be"):
        RouterConfig(embedder="openai")


def test_real_mmlu_responses():
    root = shared_data("routing/mmlu_responses").parent
    d = load_outcomes(root)
    raw = load_outcomes(root, OutcomeFormat(contaminated="none"))
    assert len(raw) == 14042 and len(set(raw.groups)) == 57  # RouteLLM's MMLU: 57 subjects
    assert d.excluded == 5 and len(d) == 14037  # its 5 contaminated prompts left out
    assert raw.groups.count("abstract_algebra") == 100
    bad = {json.loads(line)["eval_prompt"] for line in (root / "mmlu_contaminated_prompts.jsonl").open()}
    assert not bad & set(d.prompts) and len(bad & set(raw.prompts)) == 5
    assert 0.6 < d.small.mean() < d.large.mean() < 0.9  # Mixtral below GPT-4


# ------------------------------------------------------------------------------------------------ CLI


def cli(*args) -> int:
    """`slmforge ARGS` in this process (main() as the console script runs it): the exit status."""
    from slmforge.cli import main

    old = sys.argv
    sys.argv = ["slmforge", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as e:
        return e.code or 0
    finally:
        sys.argv = old


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_train_eval_calibrate(tmp_path, capsys):
    train = write_rows(tmp_path / "train.jsonl", synthetic(300, seed=1))
    val = write_rows(tmp_path / "val.jsonl", synthetic(200, seed=2))
    test = write_rows(tmp_path / "test.jsonl", synthetic(200, seed=3))
    out = tmp_path / "router"
    assert cli("route", "train", "--data", train, "--val", val, "--share", 0.3, "--target", "gain",
               "--out", out) == 0
    assert "threshold" in capsys.readouterr().out and (out / "router.json").is_file()
    assert cli("route", "eval", out, "--data", test, "--json", tmp_path / "rep.json",
               "--plot", tmp_path / "curve.png") == 0
    printed = capsys.readouterr().out
    assert "APGR" in printed and "random" in printed
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["result"]["apgr"] > rep["random"]["apgr"] + 0.1
    assert abs(rep["result"]["at_threshold"]["share"] - 0.3) < 0.1
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert cli("route", "calibrate", out, "--data", val, "--quality", 0.95, "--out", tmp_path / "r95") == 0
    r95 = load_router(tmp_path / "r95")
    assert r95.calibration["target"] == {"quality": 0.95} and r95.calibration["val_quality"] >= 0.95 * 0.9 - 0.1
    assert load_router(out).calibration["target"] == {"share": 0.3}  # the original is untouched


@pytest.mark.parametrize("args,needle", [
    (["--router", "bert"], "router must be one of"),
    (["--share", 0.3], "needs --val"),
    (["--share", 2, "--val", "VAL"], "share must be in [0, 1]"),
    (["--data", "MISSING"], "missing.jsonl: no such file"),
    (["--data", "BAD"], "bad.jsonl:2: field 'large'"),
])
def test_cli_bad_input_gives_one_error_line(tmp_path, capsys, args, needle):
    good = write_rows(tmp_path / "good.jsonl", synthetic(60))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "small": 1, "large": 1}\n{"prompt": "b", "small": 1}\n')
    subs = {"VAL": good, "MISSING": tmp_path / "missing.jsonl", "BAD": tmp_path / "bad.jsonl"}
    args = [subs.get(a, a) if isinstance(a, str) else a for a in args]
    base = [] if "--data" in args else ["--data", good]
    assert cli("route", "train", *base, *args, "--out", tmp_path / "out") == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists()  # nothing written
