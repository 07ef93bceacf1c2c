#!/usr/bin/env python
"""No-model baselines on the task splits the loaders write, so a recipe's figures can be read against them.

Each task's data is prepared exactly as its recipe does it: the `seed` and the `data:` section (loader and
options) of slmforge/recipes/<recipe>.yaml go to `slmforge.data.tasks.prepare` into a temporary
folder, and every baseline is scored with `evaluate_predictions` (the scorer `slmforge eval-task` and the
recipes use) on test.jsonl, and on val.jsonl when the loader writes one.

    dialogsum   lead-3: the first three turns of the dialogue as the summary (and lead-1, lead-2); and one
                constant summary for every dialogue (the floor of a model that ignores its input): of the
                200 shortest DialogSum training summaries, the one with the best mean ROUGE-L against 150
                other training summaries (seeded), chosen on train only; and the extractive ceiling: turns
                added greedily while they raise ROUGE-L against the reference (it reads the answer); ROUGE-1/2/L
    pubmedqa    majority class of train; guessing at the training-label frequencies: accuracy and macro-F1,
    sst2        analytically (expected counts) and as the mean (and sd) of --draws seeded draws
                and a bag-of-words classifier: TF-IDF of word 1-2-grams + logistic regression (scikit-learn),
                C and class weights chosen on val, scored once on test — what a linear model reaches on the
                same leak-free split, without any pretraining
    hdfs        every session anomalous; a session is anomalous when it holds an event (or an event
                bigram) that no training session holds — a lookup table in place of DeepLog's LM
    inspec      keyphrases scored both ways: macro F1@k (pke's: per document, averaged) and micro F1@k
                (PromptRank's: counts pooled); Porter-stemmed exact match against every gold key. TF-IDF
                (benchmarks/keyphrase_baseline.py's) and the extraction ceiling: an oracle that returns the
                gold keys found in the abstract (no extractor can do better), and the gold-key statistics

    python benchmarks/task_baselines.py                    # all five, --data ../shared/data
    python benchmarks/task_baselines.py --tasks sst2 hdfs --draws 200

Results go to benchmarks/results/task_baselines.json (the tasks run replace their entries; others are kept).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

from slmforge.data.tasks import DIALOGSUM_TEMPLATE, prepare
from slmforge.evaluate.tasks import classification_metrics, evaluate_predictions
from slmforge.io import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "slmforge" / "recipes"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "task_baselines.json"
TASKS = {"dialogsum": "dialogsum.yaml", "pubmedqa": "pubmedqa.yaml", "sst2": "sst2.yaml", "hdfs": "hdfs-logs.yaml",
         "inspec": "inspec.yaml"}


def load_recipe_data(name: str) -> dict:
    # only the parts that decide the data, read straight from the YAML so they stay in step with the recipe
    path = RECIPES / TASKS[name]
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    data = spec["data"]
    return {"recipe": str(path.relative_to(ROOT)), "loader": data["loader"], "options": data.get("options") or {},
            "seed": spec.get("seed", 0), "eval": spec.get("eval") or {}}


def held_splits(folder: Path) -> dict[str, list[dict]]:
    """test.jsonl and val.jsonl (when written) of a prepared folder."""
    return {s: list(read_jsonl(folder / f"{s}.jsonl")) for s in ("test", "val") if (folder / f"{s}.jsonl").exists()}


def preds(rows: list[dict], values: list[str]) -> list[dict]:
    return [{"id": r["id"], "prediction": v} for r, v in zip(rows, values, strict=True)]


# --- dialogsum ----------------------------------------------------------------------------------------------

def dialogue_of(row: dict) -> str:
    # the loader writes the dialogue inside DIALOGSUM_TEMPLATE, as a prompt or as the user message
    prompt = row["prompt"] if "prompt" in row else row["messages"][0]["content"]
    head, tail = DIALOGSUM_TEMPLATE.split("{dialogue}")
    return prompt.removeprefix(head).removesuffix(tail)


def turns_of(dialogue: str) -> list[str]:
    return [t.strip() for t in dialogue.split("\n") if t.strip()]


def lead_k(dialogue: str, k: int) -> str:
    return " ".join(turns_of(dialogue)[:k])


@functools.cache
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, prediction: str) -> float:
    """One pair's ROUGE-L F-measure, scored as evaluate_predictions scores it (Porter stemmer)."""
    return _rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure


def constant_summary(train: list[dict], n_candidates: int = 200, n_refs: int = 150, seed: int = 0) -> str:
    """The summary that, said of every dialogue, scores best on training summaries: the floor that
    speaker tags and stock phrases ("#Person1# asks #Person2# ...") give ROUGE without reading the input."""
    # DialogSum's own summaries only: SAMSum's (in train too) use names, not #Person1#
    own = [r["completion"].strip() for r in train if r["id"].startswith("dialogsum")]
    refs = random.Random(seed).sample(own, min(n_refs, len(own)))
    candidates = sorted(set(own), key=lambda s: (len(s), s))[:n_candidates]
    return max(candidates, key=lambda c: sum(rouge_l(x, c) for x in refs if x != c))


def oracle_turns(dialogue: str, reference: str) -> str:
    """The extractive ceiling (as SummaRuNNer's labels): add the turn that raises ROUGE-L against the reference
    most, in dialogue order, until none does."""
    turns = turns_of(dialogue)
    chosen: list[int] = []
    best = 0.0
    while True:
        gains = {i: rouge_l(reference, " ".join(turns[j] for j in sorted([*chosen, i])))
                 for i in range(len(turns)) if i not in chosen}
        i = max(gains, key=gains.get, default=None)
        if i is None or gains[i] <= best:
            return " ".join(turns[j] for j in sorted(chosen))
        chosen.append(i)
        best = gains[i]


def summarization_baselines(rows: list[dict], constant: str) -> dict:
    def scored(summaries: list[str]) -> dict:
        r = evaluate_predictions("summarization", preds(rows, summaries), rows)
        return {m: round(r[m], 2) for m in ("rouge1", "rouge2", "rougeL")} | {"n": r["n"]}

    out = {f"lead_{k}": scored([lead_k(dialogue_of(x), k) for x in rows]) for k in (1, 2, 3)}
    out["constant"] = scored([constant] * len(rows)) | {"summary": constant}
    out["oracle_turns"] = scored([oracle_turns(dialogue_of(x), x["completion"].strip()) for x in rows])
    return out


# --- pubmedqa, sst2 -----------------------------------------------------------------------------------------

def classification_baselines(rows: list[dict], train_labels: list[str], labels: list[str], draws: int) -> dict:
    freq = Counter(train_labels)
    majority = freq.most_common(1)[0][0]
    maj = evaluate_predictions("classification", preds(rows, [majority] * len(rows)), rows, labels=labels)
    truth = [str(r["label"]) for r in rows]

    # guessing at the training frequencies q_c against test shares p_c: expected accuracy is sum p_c q_c; with
    # expected counts in place of counts, class c has precision p_c and recall q_c (a ratio of expectations,
    # close to the mean for a few hundred examples; the draws below check it)
    n = len(truth)
    p = {c: truth.count(c) / n for c in labels}
    q = {c: freq[c] / len(train_labels) for c in labels}
    f1 = {c: 2 * p[c] * q[c] / (p[c] + q[c]) if p[c] + q[c] else 0.0 for c in labels}
    analytic = {"accuracy": round(100 * sum(p[c] * q[c] for c in labels), 2),
                "macro_f1": round(100 * sum(f1.values()) / len(labels), 2)}

    rng = random.Random(0)
    weights = [q[c] for c in labels]
    acc, mf1 = [], []
    for _ in range(draws):
        r = classification_metrics(truth, rng.choices(labels, weights, k=n), labels)
        acc.append(r["accuracy"])
        mf1.append(r["macro_f1"])
    drawn = {"accuracy": round(statistics.fmean(acc), 2), "accuracy_sd": round(statistics.stdev(acc), 2),
             "macro_f1": round(statistics.fmean(mf1), 2), "macro_f1_sd": round(statistics.stdev(mf1), 2),
             "draws": draws}
    return {"n": n, "split_label_share": {c: round(100 * p[c], 2) for c in labels},
            "train_label_share": {c: round(100 * q[c], 2) for c in labels},
            "majority": {"label": majority, "accuracy": round(maj["accuracy"], 2), "macro_f1": round(maj["macro_f1"], 2)},
            "prior_guess_analytic": analytic, "prior_guess_drawn": drawn}


def bag_of_words(train: list[dict], held: dict[str, list[dict]], labels: list[str]) -> dict:
    """TF-IDF word 1-2-grams + logistic regression; C and class_weight chosen by val accuracy."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    x = vec.fit_transform([r["text"] for r in train])
    y = [str(r["label"]) for r in train]

    def fit(c: float, weight: str | None) -> LogisticRegression:
        return LogisticRegression(C=c, class_weight=weight, max_iter=2000).fit(x, y)

    def score(model: LogisticRegression, rows: list[dict]) -> dict:
        guess = model.predict(vec.transform([r["text"] for r in rows])).tolist()
        r = classification_metrics([str(r["label"]) for r in rows], guess, labels)
        return {"accuracy": round(r["accuracy"], 2), "macro_f1": round(r["macro_f1"], 2)}

    grid = [(c, w) for c in (0.3, 1.0, 3.0, 10.0, 30.0) for w in (None, "balanced")]
    val = {f"C={c},{w or 'unweighted'}": score(fit(c, w), held["val"]) for c, w in grid}
    best = max(grid, key=lambda g: (val[f"C={g[0]},{g[1] or 'unweighted'}"]["accuracy"], -g[0]))
    return {"features": len(vec.vocabulary_), "val_grid": val,
            "chosen_on_val": f"C={best[0]},{best[1] or 'unweighted'}", "test": score(fit(*best), held["test"])}


# --- inspec -------------------------------------------------------------------------------------------------

def keyphrase_baselines(rows: list[dict], train: list[dict]) -> dict:
    from keyphrase_baseline import tfidf_keyphrases

    from slmforge.evaluate.tasks import keyphrase_metrics, stem_phrase

    def both(pred: list[list[str]]) -> dict:
        m = keyphrase_metrics(pred, [r["keyphrases"] for r in rows])
        return {k: round(m[k], 2) for k in ("macro_f1@5", "macro_f1@10", "micro_f1@5", "micro_f1@10")}

    def present(r: dict) -> list[str]:
        text = f" {stem_phrase(r['prompt'])} "
        return [k for k in r["keyphrases"] if f" {stem_phrase(k)} " in text]

    tfidf = tfidf_keyphrases([r["prompt"] for r in train], [r["prompt"] for r in rows])
    keys = sum(len(r["keyphrases"]) for r in rows)
    return {"n": len(rows), "gold_keys_per_doc": round(keys / len(rows), 2),
            "gold_present_pct": round(100 * sum(len(present(r)) for r in rows) / keys, 2),
            "tfidf": both(tfidf), "oracle_present_keys": both([present(r) for r in rows])}


# --- hdfs ---------------------------------------------------------------------------------------------------

def anomaly_baselines(rows: list[dict], train: list[dict]) -> dict:
    events = {e for r in train for e in r["events"]}
    bigrams = {b for r in train for b in zip(r["events"], r["events"][1:], strict=False)}

    def score(flags: list[bool]) -> dict:
        r = evaluate_predictions("binary", preds(rows, ["anomalous" if f else "normal" for f in flags]), rows,
                                 positive="anomalous")
        return {k: round(r[k], 2) if isinstance(r[k], float) else r[k]
                for k in ("precision", "recall", "f1", "accuracy", "tp", "fp", "fn", "tn")}

    return {"n": len(rows), "anomalous_share": round(100 * sum(r["label"] == "anomalous" for r in rows) / len(rows), 2),
            "all_anomalous": score([True] * len(rows)),
            "unseen_event": score([any(e not in events for e in r["events"]) for r in rows]),
            "unseen_bigram": score([any(e not in events for e in r["events"])
                                    or any(b not in bigrams for b in zip(r["events"], r["events"][1:], strict=False))
                                    for r in rows])}


def task_baselines(name: str, data_dir: Path, draws: int) -> dict:
    spec = load_recipe_data(name)
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "data"
        stats = prepare(spec["loader"], data_dir, folder, spec["seed"], **spec["options"])
        train = list(read_jsonl(folder / "train.jsonl"))
        held = held_splits(folder)
    out = {k: spec[k] for k in ("recipe", "loader", "options", "seed")}
    out["rows"] = {"train": len(train)} | {s: len(r) for s, r in held.items()}
    if "overlap" in stats:
        out["overlap"] = stats["overlap"]
    constant = constant_summary(train, seed=spec["seed"]) if name == "dialogsum" else ""
    for split, rows in held.items():
        if name == "dialogsum":
            out[split] = summarization_baselines(rows, constant)
        elif name == "hdfs":
            out[split] = anomaly_baselines(rows, train)
        elif name == "inspec":
            out[split] = keyphrase_baselines(rows, train)
        else:
            train_labels = [str(r["label"]) for r in train]
            labels = [str(x) for x in spec["eval"].get("labels") or sorted(set(train_labels))]
            out[split] = classification_baselines(rows, train_labels, labels, draws)
    if name in ("sst2", "pubmedqa") and "val" in held:
        train_labels = [str(r["label"]) for r in train]
        labels = [str(x) for x in spec["eval"].get("labels") or sorted(set(train_labels))]
        out["bag_of_words"] = bag_of_words(train, held, labels)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the folder of shared/data/SOURCES.md")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--draws", type=int, default=1000, help="seeded draws for the prior-guessing baseline")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args()

    results = {}
    for name in args.tasks:
        t = time.perf_counter()
        results[name] = task_baselines(name, args.data, args.draws)
        print(f"{name} ({time.perf_counter() - t:.1f} s):")
        for split in ("test", "val"):
            if split in results[name]:
                print(f"  {split}: {json.dumps(results[name][split])}")

    # a run of some tasks replaces their entries and keeps the others'; "runs" keeps each run's arguments
    old = json.loads(args.json.read_text()) if args.json.is_file() else {}
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    run_args = {k: str(v) for k, v in vars(args).items()}
    out = old | {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "args": run_args, "tasks": old.get("tasks", {}) | results, "created": created,
           "runs": old.get("runs", {}) | {f"{', '.join(results)} ({created[:10]})": run_args}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
