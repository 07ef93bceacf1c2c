"""Routers between a small and a large model, measured on prompts they were not trained on.

    python benchmarks/route.py                        # every part (mmlu: ~9 min on 2 shared cores)
    python benchmarks/route.py --part mmlu --quick    # a few subjects and epochs: checks the script only

mmlu    RouteLLM's own router benchmark data (../shared/data/routing): for each of the 14,042 MMLU prompts,
        whether Mixtral-8x7B-Instruct (the small model) and GPT-4-1106-preview (the large one) answered
        correctly; the 5 prompts RouteLLM found in its router training data are left out, as RouteLLM does.
        Cross-validation by subject: the 57 subjects (sorted, shuffled with seed 0) are dealt into 5 folds;
        fold f is the test fold, fold f+1 the validation fold, the other three train. Every router variant is
        trained on the training subjects; validation chooses each router's variant (by APGR) and its
        threshold; the chosen one scores the test subjects once. So every prompt is scored exactly once, by a
        router that never saw its subject; each fold's test scores are mapped through its validation scores
        (so that a threshold means the same share in every fold) and pooled: APGR and CPT over all 14,037
        prompts, the population RouteLLM reports on (random 0.500, matrix factorisation 0.524, best 0.603).
        The routers use local embeddings only (TF-IDF; --embedders adds model:DIR or st:DIR).

Writes benchmarks/results/route.json and route_mmlu.png. A part is a function in PARTS returning a JSON-able
dict: a later `--part sst2` (the small model's confidence as a cascade signal, served models end to end)
adds one function and one PARTS entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from slmforge.io import write_json
from slmforge.route import (
    Outcomes,
    RouterConfig,
    apgr,
    calibrate,
    concat,
    curve_metrics,
    evaluate,
    load_outcomes,
    optimal_curve,
    plot_curves,
    quality_curve,
    random_baseline,
    routed_quality,
    scores_for,
    train_router,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "routing"
OUT = REPO / "benchmarks" / "results" / "route.json"
RUNS = REPO / "runs" / "bench_route"
THREADS = 1
FOLDS = 5
GOAL_APGR = 0.62
# RouteLLM (Ong et al. 2024, "RouteLLM: Learning to Route LLMs with Preference Data", MMLU table) on these
# same responses, all 14,037 prompts; its routers were trained on Chatbot Arena preferences plus golden
# labels from MMLU's own questions (D_arena + D_gold), not on the subjects held out here.
ROUTELLM = {"random": 0.500, "matrix_factorization": 0.524, "best": 0.603,
            "best_router": "causal LLM (Llama-3-8B classifier), trained on D_arena + D_gold",
            "note": "APGR on MMLU, RouteLLM paper's MMLU table; the brief's figures, best router as we read the paper"}


def variants(quick: bool, embedders: list[str]) -> dict[str, dict[str, RouterConfig]]:
    """Each router's candidate settings; validation picks one per fold. Kept small: this machine is shared."""
    out: dict[str, dict[str, RouterConfig]] = {"learned": {}, "mf": {}, "sw": {}}
    for emb in embedders:
        tag = "" if emb == "tfidf" else f"{emb}/"
        for target, cs in (("small_ok", (1.0,)), ("large_wins", (1.0,)), ("gain", (0.3, 1.0, 3.0))):
            for c in cs[:1] if quick else cs:
                out["learned"][f"{tag}logreg/{target}/C={c:g}"] = RouterConfig(
                    router="learned", embedder=emb, target=target, logreg_c=c)
        # the MLP (~20 times logistic regression's cost) only with the three-class target
        out["learned"][f"{tag}mlp/gain"] = RouterConfig(router="learned", embedder=emb, classifier="mlp",
                                                        target="gain", epochs=5 if quick else 100)
        # RouteLLM trains MF for 100 epochs on 1,536-wide embeddings; here 30 epochs on 10,000 TF-IDF terms,
        # for time (MF trains on dense rows as wide as the vocabulary)
        out["mf"][f"{tag}mf"] = RouterConfig(router="mf", embedder=emb, epochs=2 if quick else 30,
                                             max_features=10000)
        out["sw"][f"{tag}sw"] = RouterConfig(router="sw", embedder=emb)
    return out


def subject_folds(data: Outcomes, k: int, seed: int = 0) -> list[list[str]]:
    """The sorted subjects shuffled with `seed` and dealt round-robin into k folds (deterministic)."""
    names = sorted(set(data.groups))
    order = np.random.default_rng(seed).permutation(len(names))
    return [sorted(names[i] for i in order[f::k]) for f in range(k)]


def part_mmlu(quick: bool, embedders: list[str]) -> dict:
    data = load_outcomes(DATA)
    print(f"{len(data):,} prompts, {data.excluded} contaminated left out, {len(set(data.groups))} subjects",
          flush=True)
    folds = subject_folds(data, FOLDS)
    if quick:  # two subjects per fold
        folds = [f[:2] for f in folds]
    cands = variants(quick, embedders)
    families = list(cands) + ["best"]
    grid = _fingerprint({k: {lab: dataclasses.asdict(c) for lab, c in v.items()} for k, v in cands.items()})
    tests, done = [], []
    for f in range(FOLDS):
        test_subj, val_subj = set(folds[f]), set(folds[(f + 1) % FOLDS])
        train_subj = set().union(*(folds[j] for j in range(FOLDS) if j not in (f, (f + 1) % FOLDS)))
        pick = lambda s: data.take([g in s for g in data.groups])  # noqa: E731
        train, val, test = pick(train_subj), pick(val_subj), pick(test_subj)
        print(f"fold {f}: train {len(train):,} ({len(train_subj)} subjects) · val {len(val):,} · test "
              f"{len(test):,}", flush=True)
        # a finished fold is kept (the machine is shared and slow): a rerun with the same grid skips it
        ckpt = RUNS / f"mmlu_fold{f}_{grid}_v2.json"
        if ckpt.is_file() and not quick:
            rec = json.loads(ckpt.read_text())
        else:
            rec = run_fold(cands, train, val, test)
            rec.update(test_subjects=sorted(test_subj), val_subjects=sorted(val_subj),
                       rows={"train": len(train), "val": len(val), "test": len(test)})
            if not quick:
                write_json(ckpt, rec)
        tests.append(test)
        done.append(rec)
    val_apgr = {lab: [r["val_apgr"][lab] for r in done] for lab in done[0]["val_apgr"]}
    picked = {fam: [r["chosen"][fam] for r in done] for fam in families}
    per_fold = [{k: v for k, v in r.items() if k not in ("test_scores", "val_scores", "calibration")} for r in done]
    pooled = concat(tests)
    results = {}
    curves = {}
    for fam in families:
        # each fold's scores come from another router, on its own scale: pooled raw, a global threshold would
        # route by fold rather than by prompt. So each fold's test scores are first mapped through that fold's
        # validation scores (the share of them below: monotone, so the fold's own curve is unchanged, and
        # learned without test outcomes), which makes a threshold mean the same share in every fold.
        s = np.concatenate([_through_val(r["val_scores"][fam], r["test_scores"][fam]) for r in done])
        m = curve_metrics(quality_curve(s, pooled), pooled)
        raw = np.concatenate([r["test_scores"][fam] for r in done])
        curves[fam if fam != "best" else "best by validation"] = m["curve"]
        fold_apgr = [pf["test_apgr"][fam] for pf in per_fold]
        results[fam] = {"apgr": m["apgr"], "cpt50": m["cpt50"], "cpt80": m["cpt80"],
                        "fold_apgr_mean": float(np.mean(fold_apgr)), "fold_apgr": fold_apgr,
                        "apgr_pooled_raw_scores": curve_metrics(quality_curve(raw, pooled), pooled)["apgr"],
                        "chosen": dict(Counter(picked[fam]).most_common()),
                        "calibration": _summarise_calibration([r["calibration"][fam] for r in done], pooled)}
    rnd = random_baseline(pooled, 10)
    rnd_folds = [pf["test_random_apgr"] for pf in per_fold]
    results = {"random": {"apgr": rnd["apgr"], "apgr_std": rnd["apgr_std"], "cpt50": rnd["cpt50"],
                          "cpt80": rnd["cpt80"], "seeds": rnd["seeds"], "fold_apgr": rnd_folds,
                          "fold_apgr_mean": float(np.mean(rnd_folds))}, **results}
    curves = {"random": rnd["curve"], **curves}
    opt = optimal_curve(pooled)
    curves["optimal"] = opt
    best = results["best"]["apgr"]
    if not quick:
        plot_curves(curves, pooled, OUT.with_name("route_mmlu.png"),
                    title=f"MMLU, {len(pooled):,} prompts, each scored by a router trained on other subjects")
    return {
        "data": {"rows": len(pooled), "excluded_contaminated": data.excluded, "subjects": len(set(data.groups)),
                 "small": "mistralai/Mixtral-8x7B-Instruct-v0.1", "large": "gpt-4-1106-preview",
                 "small_quality": float(pooled.small.mean()), "large_quality": float(pooled.large.mean()),
                 "optimal_apgr": apgr(opt, pooled)},
        "protocol": f"{FOLDS}-fold cross-validation by subject (seed 0): test fold f, validation fold f+1, "
                    f"train the rest; each router's variant and threshold chosen on validation APGR; test "
                    f"scores mapped through the fold's validation scores, then pooled (all prompts), bins of 10 "
                    f"(RouteLLM's evaluation)",
        "embedders": embedders,
        "results": results,
        "val_apgr_mean": {k: float(np.mean(v)) for k, v in val_apgr.items()},
        "routellm": ROUTELLM,
        "goal": {"apgr": GOAL_APGR, "reached": bool(best >= GOAL_APGR), "router": "best by validation",
                 "apgr_measured": best},
        "folds": per_fold,
        "curves_pooled": {k: [{"share": round(p["share"], 4), "quality": round(p["quality"], 4)} for p in v]
                          for k, v in curves.items()},
    }


def run_fold(cands: dict[str, dict[str, RouterConfig]], train: Outcomes, val: Outcomes, test: Outcomes) -> dict:
    """Every variant trained on `train` and scored on `val`; per router the best by validation APGR (and the
    best of all, "best") scores `test` once, with thresholds calibrated on `val` and applied unchanged."""
    cache: dict = {}
    rec: dict = {"val_apgr": {}, "chosen": {}, "test_scores": {}, "calibration": {}, "test_apgr": {}}
    winners = {}
    for family, options in cands.items():
        best = None
        for label, cfg in options.items():
            t = time.perf_counter()
            router = train_router(train, cfg, cache)
            s_val = scores_for(router, val, cache)
            a = evaluate(s_val, val)["apgr"]
            rec["val_apgr"][label] = a
            print(f"  {label:<28} val APGR {a:.4f}  ({time.perf_counter() - t:.0f} s)", flush=True)
            if best is None or a > best[0]:
                best = (a, label, router, s_val)
        winners[family] = best
    winners["best"] = max(winners.values(), key=lambda w: w[0])
    for family, (_, label, router, s_val) in winners.items():
        s = scores_for(router, test, cache)
        rec["chosen"][family] = label
        rec["test_scores"][family] = [float(v) for v in s]
        rec.setdefault("val_scores", {})[family] = sorted(float(v) for v in s_val)
        rec["test_apgr"][family] = evaluate(s, test)["apgr"]
        cal = {}
        for name, target in (("share=0.5", {"share": 0.5}), ("quality=0.95", {"quality": 0.95})):
            r = calibrate(router, val, scores=s_val, **target)
            share, quality = routed_quality(s, test, r.threshold)
            cal[name] = {"threshold": r.threshold, "val_share": r.calibration["val_share"], "test_share": share,
                         "test_quality": quality, "test_rows": len(test)}
        rec["calibration"][family] = cal
    rec["test_random_apgr"] = random_baseline(test, 10)["apgr"]
    return rec


def _through_val(val_sorted: list[float], scores: list[float]) -> np.ndarray:
    """Scores mapped to the share of validation scores below them (mid-rank for ties, linear in between;
    beyond the validation range 0 or 1)."""
    v = np.asarray(val_sorted, dtype=float)
    u, first, counts = np.unique(v, return_index=True, return_counts=True)
    mid = (first + counts / 2) / len(v)
    return np.interp(np.asarray(scores, dtype=float), u, mid, left=0.0, right=1.0)


def _fingerprint(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _summarise_calibration(recs: list[dict], pooled: Outcomes) -> dict:
    """The fold thresholds applied to their test folds, pooled: share of large calls and quality."""
    out = {}
    for name in recs[0]:
        rows = sum(r[name]["test_rows"] for r in recs)
        share = sum(r[name]["test_share"] * r[name]["test_rows"] for r in recs) / rows
        quality = sum(r[name]["test_quality"] * r[name]["test_rows"] for r in recs) / rows
        q_small, q_large = float(pooled.small.mean()), float(pooled.large.mean())
        out[name] = {"test_share": share, "test_quality": quality,
                     "test_pgr": (quality - q_small) / (q_large - q_small), "test_quality_of_large": quality / q_large,
                     "val_share_per_fold": [round(r[name]["val_share"], 4) for r in recs]}
    return out


# ---------------------------------------------------------------------------------------------------------
# sst2: two models of ours behind `slmforge serve`, end to end

SST2_RUNS = REPO / "runs" / "bench_route" / "sst2"  # (--quick: sst2-quick, removed after)
LARGE_MINUTES = (7.0, 4.0)  # the large model's pretraining and fine-tuning budgets (--large-minutes)
SST2_PROMPT = "{text}\nlabel:"  # the generative classifier's prompt (slmforge/train/rows.py CLASSIFY_PROMPT)


def sst2_runs(quick: bool) -> Path:
    return SST2_RUNS.with_name("sst2-quick") if quick else SST2_RUNS


def sst2_model(name: str, preset: str, pretrain_minutes: float, finetune_minutes: float, quick: bool) -> dict:
    """The sst2 recipe's pretrained-full variant at another size, with the generative head (the label as its
    answer), so that `slmforge serve` can answer with it; leak-free splits, chosen on val (the recipe's)."""
    from slmforge.recipes import load_recipe, run_recipe

    recipe = load_recipe("sst2", {"model.preset": preset, "pretrain.max_minutes": pretrain_minutes})
    v = next(v for v in recipe.variants if v.name == "pretrained-full")
    v = dataclasses.replace(v, finetune=dataclasses.replace(v.finetune, head="generative",
                                                            max_minutes=finetune_minutes))
    recipe = dataclasses.replace(recipe, name=f"sst2-{name}", variants=[v])
    run = sst2_runs(quick) / name
    report = run_recipe(recipe, run, minutes_scale=0.05 if quick else 1.0)
    row = report["variants"][0]
    return {"model": str(run / "model"), "params": row["params"], "val_accuracy": row["val_metric"],
            "test_accuracy": row["metric"], "train_s": row["total_train_s"], "data": str(run / "data")}


def start_server(models: dict[str, str], port: int, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    import urllib.request

    cmd = [str(REPO / ".venv" / "bin" / "slmforge"), "serve", *[f"{k}={v}" for k, v in models.items()],
           "--port", str(port), "--threads", str(THREADS), "--no-compile", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"slmforge serve exited: {proc.stderr.read()[-2000:]}") from None
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("slmforge serve did not come up in 120 s")


def ask_served(url: str, model: str, rows: list[dict], labels: list[str]) -> list[dict]:
    """Each row's greedy answer from the served model through the official openai client: the label it
    names and the answer's mean token log-prob (the small model's confidence, the cascade's signal)."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from slmforge.train.distill import map_label

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=2)

    def one(row: dict) -> dict:
        r = client.completions.create(model=model, prompt=SST2_PROMPT.format(text=row["text"]), max_tokens=3,
                                      temperature=0, stop=["\n"], logprobs=1)
        c = r.choices[0]
        lps = [x for x in (c.logprobs.token_logprobs if c.logprobs else []) if x is not None]
        label = map_label(c.text, labels)
        return {"label": label, "correct": label == row["label"],
                "mean_logprob": sum(lps) / len(lps) if lps else -99.0}

    with ThreadPoolExecutor(4) as ex:
        return list(ex.map(one, rows))


def part_sst2(quick: bool, embedders: list[str]) -> dict:
    """A 0.31M and a 2.76M (8.8x) SST-2 model of ours, both behind one `slmforge serve`: their answers on the
    held-out sentences (validation and test, through the OpenAI-compatible URL), the report card
    (`slmforge eval card` on the served URLs), and routers calibrated on validation for 95% of the large
    model's accuracy, scored once on test."""
    from slmforge.evaluate.card import EvalCardConfig, SuiteSpec, make_card
    from slmforge.io import read_jsonl
    from slmforge.route import outcomes_from_rows

    runs = sst2_runs(quick)
    small = sst2_model("small", "200k", 4, 3, quick)
    pre, ft = LARGE_MINUTES
    large = sst2_model("large" if (pre, ft) == (7, 4) else f"large-{pre:g}+{ft:g}min", "3m", pre, ft, quick)
    data = Path(large["data"])
    val_rows, test_rows = list(read_jsonl(data / "val.jsonl")), list(read_jsonl(data / "test.jsonl"))
    if quick:
        val_rows, test_rows = val_rows[:60], test_rows[:60]
    labels = sorted({r["label"] for r in val_rows})
    port = 8731
    server = start_server({"small": small["model"], "large": large["model"]}, port)
    url = f"http://127.0.0.1:{port}/v1"
    tag = Path(large["model"]).parent.name  # answers and card cells belong to this pair of models
    cached = runs / f"answers-{tag}.json"  # the served answers, kept: a rerun (or a crash after) does not re-ask
    try:
        answers = {tuple(k.split("/")): v for k, v in json.loads(cached.read_text()).items()} \
            if cached.is_file() else {}
        for split, rows in (("val", val_rows), ("test", test_rows)):
            for m in ("small", "large"):
                if (split, m) not in answers:
                    answers[(split, m)] = ask_served(url, m, rows, labels)
        write_json(cached, {"/".join(k): v for k, v in answers.items()})
        test_file = runs / "test_text_label.jsonl"
        test_file.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n"
                                     for r in test_rows), encoding="utf-8")
        card = make_card(EvalCardConfig(
            models=[f"small=openai:{url}#small", f"large=openai:{url}#large"], large="large",
            out=str(runs / f"card-{tag}"), api="completion", progress=False,
            suites=[SuiteSpec(kind="classification", file=str(test_file), template=SST2_PROMPT, max_tokens=3,
                              name="sst2-test")], speed_requests=4 if quick else 16))
    finally:
        server.terminate()
        server.wait(30)

    def outcomes(split: str, rows: list[dict]):
        s, g = answers[(split, "small")], answers[(split, "large")]
        return outcomes_from_rows([{"prompt": r["text"], "small": a["correct"], "large": b["correct"],
                                    "mean_logprob": a["mean_logprob"]} for r, a, b in zip(rows, s, g, strict=True)],
                                  source=f"sst2 {split}", signal="mean_logprob")

    val, test = outcomes("val", val_rows), outcomes("test", test_rows)
    png = OUT.parent / ("route_sst2_quick.png" if quick else "route_sst2.png")
    results = route_sst2(val, test, runs, png)
    served = served_router(runs, small["model"], large["model"], test_rows, labels, port + 1)
    q_small, q_large = float(test.small.mean()), float(test.large.mean())
    if quick:  # checks the script only: nothing stays
        import shutil

        shutil.rmtree(runs, ignore_errors=True)
        png.unlink(missing_ok=True)
    return {"small": small, "large": large, "large_minutes": list(LARGE_MINUTES), "ratio_params": round(large["params"] / small["params"], 2),
            "served_accuracy": {"val_small": float(val.small.mean()), "val_large": float(val.large.mean()),
                                "test_small": q_small, "test_large": q_large},
            "card": {"summary": card.get("summary"), "files": [str(runs / f"card-{tag}" / f)
                                                                for f in ("card.md", "card.json", "card.png")]},
            "routers": results, "served_router": served, "plot": str(png.relative_to(REPO)),
            "goal": "router >= 95% of the large model's test accuracy with <= 50% large calls"}


def served_router(runs: Path, small: str, large: str, rows: list[dict], labels: list[str], port: int) -> dict:
    """The calibrated cascade behind `slmforge serve --route`, every test sentence through the official openai
    client: the answering model named in each response, the served route's accuracy and share of large calls
    (the same decisions as offline, unless the engine's batching changes a log-prob)."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from slmforge.train.distill import map_label

    server = start_server({"small": small, "large": large}, port,
                          ("--route", f"sst2={runs / 'router_cascade'},small=small,large=large"))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=2)

    def one(row: dict) -> tuple[bool, str, str]:
        raw = client.completions.with_raw_response.create(
            model="route:sst2", prompt=SST2_PROMPT.format(text=row["text"]), max_tokens=3, temperature=0,
            stop=["\n"])
        r = raw.parse()
        routed = (r.model_extra or {}).get("routed_to", {})
        return map_label(r.choices[0].text, labels) == row["label"], routed.get("model", ""), \
            raw.headers.get("x-slmforge-routed-to", "")

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(one, rows))
    finally:
        server.terminate()
        server.wait(30)
    return {"requests": len(got), "accuracy": sum(c for c, _, _ in got) / len(got),
            "large_share": sum(m == "large" for _, m, _ in got) / len(got),
            "field_equals_header": all(m == h for _, m, h in got), "seconds": round(time.perf_counter() - t0, 1),
            "client": f"openai {openai.__version__}", "example_routed_to": got[0][1]}


def route_sst2(val: Outcomes, test: Outcomes, runs: Path, png: Path) -> dict:
    """Routers chosen and calibrated on validation (95% of the large model's accuracy), scored once on test;
    the cost-quality curve to `png`, the calibrated cascade router saved under runs/ (to serve it)."""
    from slmforge.errors import SlmforgeError
    from slmforge.route import save_router

    half = len(val) // 2  # the learned router trains on one half of validation, is calibrated on the other
    val_a = dataclasses.replace(val.take(range(half)), source="sst2 val A")
    val_b = dataclasses.replace(val.take(range(half, len(val))), source="sst2 val B")
    routers = {"cascade (small's mean token log-prob)": (train_router(val, RouterConfig(router="cascade",
                                                                                      signal="mean_logprob")), val)}
    results, curves = {}, {}
    try:
        routers["learned (tfidf, gain)"] = (train_router(val_a, RouterConfig(router="learned", target="gain",
                                                                             classifier="logreg")), val_b)
    except SlmforgeError as e:  # (--quick: two untrained models answer alike, nothing to learn)
        results["learned (tfidf, gain)"] = {"skipped": str(e)}
    routers["random"] = (train_router(val, RouterConfig(router="random")), val)
    for name, (router, cal_data) in routers.items():
        try:
            router = calibrate(router, cal_data, quality=0.95)
        except SlmforgeError as e:  # (--quick: both models equally wrong, no gap to recover)
            results[name] = {"skipped": str(e)}
            continue
        s = scores_for(router, test)
        ev = evaluate(s, test, threshold=router.threshold)
        curves[name] = quality_curve(s, test)
        at = ev["at_threshold"]
        results[name] = {"test_apgr": ev.get("apgr"), "test_cpt50": ev.get("cpt50"), "calibration": router.calibration,
                         "test_at_threshold": at,
                         "goal_reached": bool(at["quality_of_large"] is not None and at["quality_of_large"] >= 0.95
                                              and at["share"] <= 0.5)}
        if name.startswith("cascade"):
            import shutil

            shutil.rmtree(runs / "router_cascade", ignore_errors=True)
            save_router(router, runs / "router_cascade")
    if curves:
        plot_curves(curves, test, png, title="SST-2 test: small 0.31M, large 2.76M (served)")
    return json.loads(json.dumps(results, default=lambda x: x.item() if hasattr(x, "item") else str(x)))


PARTS = {"mmlu": part_mmlu, "sst2": part_sst2}


def print_table(name: str, res: dict) -> None:
    r = res["results"]
    print(f"\n{name}: {res['data']['rows']:,} prompts · small {res['data']['small_quality']:.4f} · large "
          f"{res['data']['large_quality']:.4f} · optimal APGR {res['data']['optimal_apgr']:.3f}")
    print(f"{'router':<10} {'APGR':>6} {'CPT(50%)':>9} {'CPT(80%)':>9}  {'per fold (mean)':<31} chosen on validation")
    for fam, m in r.items():
        folds = " ".join(f"{a:.2f}" for a in m.get("fold_apgr", []))
        folds = f"{folds} ({m['fold_apgr_mean']:.3f})" if folds else ""
        chosen = ", ".join(f"{k} x{v}" for k, v in m.get("chosen", {}).items())
        print(f"{fam:<10} {m['apgr']:>6.3f} {m['cpt50']:>8.1%} {m['cpt80']:>8.1%}  {folds:<31} {chosen}")
    rl = res["routellm"]
    print(f"RouteLLM on the same responses: random {rl['random']:.3f} · matrix factorisation "
          f"{rl['matrix_factorization']:.3f} · best {rl['best']:.3f} ({rl['best_router']})")
    g = res["goal"]
    print(f"goal APGR >= {g['apgr']}: {'reached' if g['reached'] else 'not reached'} ({g['apgr_measured']:.3f}, "
          f"{g['router']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=list(PARTS), action="append")
    ap.add_argument("--quick", action="store_true", help="a few subjects and epochs: checks the script, "
                                                         "measures nothing (writes nothing)")
    ap.add_argument("--embedders", default="tfidf", help="comma-separated: tfidf, tfidf-char, model:DIR, st:DIR")
    ap.add_argument("--large-minutes", default="7,4", help="sst2: the large model's pretraining,fine-tuning minutes")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    global LARGE_MINUTES
    LARGE_MINUTES = tuple(float(x) for x in args.large_minutes.split(","))
    torch.set_num_threads(THREADS)
    threadpool_limits(THREADS)  # numpy's and scikit-learn's BLAS too: the machine is shared
    if not DATA.is_dir() and "mmlu" in (args.part or list(PARTS)):
        sys.exit(f"{DATA}: RouteLLM's MMLU responses are not here (see ../shared/data/SOURCES.md)")
    embedders = [e.strip() for e in args.embedders.split(",") if e.strip()]
    results = json.loads(args.out.read_text()) if args.out.is_file() and not args.quick else {}
    for name in args.part or list(PARTS):
        t = time.perf_counter()
        results[name] = {**PARTS[name](args.quick, embedders), "seconds": round(time.perf_counter() - t, 1),
                         "load_avg_1m_after": os.getloadavg()[0]}
        if name == "mmlu":
            print_table(name, results[name])
        else:
            print(json.dumps({k: v for k, v in results[name].items() if k != "card"}, indent=1, default=str))
        if not args.quick:
            results["env"] = {"torch": torch.__version__, "threads": THREADS, "python": platform.python_version(),
                              "machine": platform.processor() or platform.machine(),
                              "command": "python benchmarks/route.py" + (f" --embedders {args.embedders}"
                                                                         if args.embedders != "tfidf" else "")
                              + (f" --large-minutes {args.large_minutes}" if args.large_minutes != "7,4" else "")}
            write_json(args.out, results)
            print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
