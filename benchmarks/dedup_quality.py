#!/usr/bin/env python
"""Precision and recall of slmforge's exact + MinHash near-dedup on real text with injected duplicates.

1. The paragraphs of TinyStories (tinystories_valid_part1.txt) are read with slmforge.data.ingest and
   deduplicated with the default config: the duplicates already in the data are counted and removed,
   which leaves a clean base set.
2. Known duplicates are appended: for each perturbation level k, `--copies` copies of random base
   paragraphs with max(1, round(k * words)) random word edits (each a substitution, deletion or
   insertion of a corpus word), plus copies changed only in case and whitespace ("exact" level).
3. Every config runs exact + near dedup over base + copies. A copy is a true positive when it is
   removed; removing a base paragraph is a false positive.

    recall(level)     removed copies of that level / copies of that level
    precision(level)  removed copies of that level attributed to their own original (duplicate_of)
                      / removed copies of that level
    precision         removed copies / all removed documents (base paragraphs removed are errors)
    P/R J>=t          the same against the copies whose true Jaccard similarity of shingle sets with
                      their original is >= the threshold: what MinHash + LSH loses or adds compared
                      with exact Jaccard (a short paragraph falls below 0.8 after one edit of 5-grams)

It also reports docs/s (signatures and clustering, one process) and the memory clustering takes per
document (tracemalloc peak of cluster_near_duplicates / documents).

    python benchmarks/dedup_quality.py
    python benchmarks/dedup_quality.py --thresholds 0.7 0.8 0.9 --num-perms 64 128 256 --ngrams 3 5

Results go to benchmarks/results/dedup_quality.json (gitignored).
"""

from __future__ import annotations

import argparse
import os
import random
import time
import tracemalloc
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from slmforge.data.dedup import (
    DedupConfig,
    cluster_near_duplicates,
    compute_signatures,
    dedup_documents,
    shingles,
)
from slmforge.data.ingest import iter_documents
from slmforge.io import write_json

ROOT = Path(__file__).resolve().parents[1]


def perturb(text: str, fraction: float, vocab: list[str], rng: random.Random) -> tuple[str, int]:
    """The text with max(1, round(fraction * words)) random substitutions, deletions or insertions."""
    w = text.split()
    edits = max(1, round(fraction * len(w)))
    for _ in range(edits):
        op = rng.choice(("sub", "del", "ins")) if len(w) > 1 else "ins"
        i = rng.randrange(len(w))
        if op == "sub":
            w[i] = rng.choice(vocab)
        elif op == "del":
            del w[i]
        else:
            w.insert(i, rng.choice(vocab))
    return " ".join(w), edits


def recase(text: str, rng: random.Random) -> str:
    """Same words, other case and whitespace: an exact duplicate after normalisation."""
    w = text.split()
    case = rng.choice((str.upper, str.lower, str.title))
    seps = ("  ", "\n", " \t ", " ")
    return "  " + "".join(case(x) + rng.choice(seps) for x in w) + "\n"


BUCKETS = (25, 50)  # words in the original paragraph: <25, 25-49, >=50


def length_bucket(n_words: int) -> str:
    lo = 0
    for hi in BUCKETS:
        if n_words < hi:
            return f"{lo}-{hi - 1} words"
        lo = hi
    return f">={lo} words"


def true_jaccard(a: str, b: str, n: int) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / max(len(sa | sb), 1)


def evaluate(docs: list[dict], n_base: int, cfg: DedupConfig, originals: dict[str, str]) -> dict:
    """Precision/recall against the injected copies, and against the true Jaccard similarity of each
    copy with its original (which separates MinHash/LSH error from what the threshold asks for)."""
    jac = {d["id"]: true_jaccard(d["text"], originals[d["original"]], cfg.ngram) for d in docs[n_base:]}
    t0 = time.perf_counter()
    r = dedup_documents(docs, cfg)
    seconds = time.perf_counter() - t0
    removed = {d["id"]: d for d in r.removed}
    levels: dict[str, dict] = {}
    by_length: dict[str, dict] = {}
    for d in docs[n_base:]:
        b = by_length.setdefault(d["level"], {}).setdefault(length_bucket(d["original_words"]), [0, 0])
        b[0] += 1
        b[1] += d["id"] in removed
        lv = levels.setdefault(d["level"], {"copies": 0, "removed": 0, "attributed": 0, "edits": 0, "jaccard": 0.0})
        lv["copies"] += 1
        lv["edits"] += d["edits"]
        lv["jaccard"] += jac[d["id"]]
        if d["id"] in removed:
            lv["removed"] += 1
            lv["attributed"] += removed[d["id"]]["duplicate_of"] == d["original"]
    for lv in levels.values():
        lv["recall"] = lv["removed"] / lv["copies"]
        lv["precision"] = lv["attributed"] / lv["removed"] if lv["removed"] else float("nan")
        lv["mean_edits"] = lv.pop("edits") / lv["copies"]
        lv["mean_true_jaccard"] = lv.pop("jaccard") / lv["copies"]
    tp = sum(lv["removed"] for lv in levels.values())
    copies = len(docs) - n_base
    above = [i for i, j in jac.items() if j >= cfg.threshold]  # copies the threshold asks to remove
    removed_copies = [i for i in jac if i in removed]
    return {
        "threshold": cfg.threshold, "num_perm": cfg.num_perm, "ngram": cfg.ngram, "bands_rows": cfg.lsh_params(),
        "precision": tp / max(len(r.removed), 1), "recall": tp / copies,
        "false_positives": len(r.removed) - tp,
        "recall_true_jaccard": sum(i in removed for i in above) / max(len(above), 1),
        "precision_true_jaccard": sum(jac[i] >= cfg.threshold for i in removed_copies) / max(len(removed_copies), 1),
        "copies_above_threshold": len(above), "removed_exact": r.counts["removed_exact"],
        "removed_near": r.counts["removed_near"], "seconds": seconds, "docs_per_s": len(docs) / seconds,
        "levels": levels,
        "recall_by_length": {lv: {k: v[1] / v[0] for k, v in sorted(bs.items())} for lv, bs in by_length.items()},
    }


def timings_and_memory(texts: list[str], cfg: DedupConfig) -> dict:
    t0 = time.perf_counter()
    sigs = np.stack(compute_signatures(texts, cfg))  # as dedup_documents holds them: one array
    t1 = time.perf_counter()
    cluster_near_duplicates(sigs, cfg)
    t2 = time.perf_counter()
    tracemalloc.start()
    sigs2 = compute_signatures(texts[:1], cfg)  # warm imports outside the measurement
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    cluster_near_duplicates(sigs, cfg)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del sigs2
    sig_bytes = sigs.nbytes
    # peak includes nothing of sigs (allocated before the measurement): LSH index, union-find, result
    return {"docs": len(texts), "signatures_docs_per_s": len(texts) / (t1 - t0),
            "cluster_docs_per_s": len(texts) / (t2 - t1),
            "cluster_bytes_per_doc": peak / len(texts), "signature_bytes_per_doc": sig_bytes / len(texts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/tinystories/tinystories_valid_part1.txt")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.10, 0.20, 0.30],
                    help="fractions of words edited in the injected copies")
    ap.add_argument("--copies", type=int, default=150, help="injected copies per level")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.7, 0.8, 0.9])
    ap.add_argument("--num-perms", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--ngrams", type=int, nargs="+", default=[5, 3], help="shingle sizes (extra runs at 0.8/128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/dedup_quality.json")
    args = ap.parse_args()
    console = Console(width=200)
    rng = random.Random(args.seed)

    raw = list(iter_documents(args.data))
    t0 = time.perf_counter()
    first = dedup_documents(raw, DedupConfig())
    first_s = time.perf_counter() - t0
    base = [{"text": d["text"], "id": f"base{i}"} for i, d in enumerate(first.kept)]
    console.print(f"{args.data.name}: {len(raw):,} paragraphs; already duplicated: "
                  f"{first.counts['removed_exact']} exact, {first.counts['removed_near']} near "
                  f"(threshold 0.8) -> {len(base):,} base paragraphs ({len(raw) / first_s:,.0f} docs/s)")
    examples = [(d["text"][:80], d["duplicate_of"]) for d in first.removed[:3]]

    vocab = sorted({w for d in base for w in d["text"].split()})
    copies = []
    for level in [*args.levels, "exact"]:
        for j, orig in enumerate(rng.sample(base, args.copies)):
            if level == "exact":
                text, edits = recase(orig["text"], rng), 0
            else:
                text, edits = perturb(orig["text"], level, vocab, rng)
            name = "exact" if level == "exact" else f"{level:.0%}"
            copies.append({"text": text, "id": f"copy-{name}-{j}", "level": name, "original": orig["id"],
                           "edits": edits, "original_words": len(orig["text"].split())})
    rng.shuffle(copies)
    docs = base + copies

    configs = [DedupConfig(threshold=t, num_perm=p) for t in args.thresholds for p in args.num_perms]
    configs += [DedupConfig(ngram=g) for g in args.ngrams if g != DedupConfig().ngram]
    configs += [DedupConfig(lsh_weights=(0.5, 0.5))]  # datasketch's default bands x rows, for comparison
    runs = []
    for cfg in configs:
        runs.append(evaluate(docs, len(base), cfg, {d["id"]: d["text"] for d in base}))
        console.print(f"  threshold {cfg.threshold} num_perm {cfg.num_perm} ngram {cfg.ngram} "
                      f"bands x rows {cfg.lsh_params()}: "
                      f"P {runs[-1]['precision']:.3f} R {runs[-1]['recall']:.3f}")
    default = runs[configs.index(DedupConfig())]
    perf = timings_and_memory([d["text"] for d in docs], DedupConfig())

    level_names = [f"{lv:.0%}" for lv in args.levels] + ["exact"]
    t = Table(title=f"Per level, default config (threshold 0.8, num_perm 128, 5-gram shingles); "
                    f"{len(base):,} base + {len(copies):,} copies")
    for col in ("level", "copies", "mean edits", "mean true Jaccard", "recall", "precision"):
        t.add_column(col, justify="right")
    for name in level_names:
        lv = default["levels"][name]
        t.add_row(name, str(lv["copies"]), f"{lv['mean_edits']:.1f}", f"{lv['mean_true_jaccard']:.3f}",
                  f"{lv['recall']:.3f}", f"{lv['precision']:.3f}")
    t.add_row("all", str(len(copies)), "", "", f"{default['recall']:.3f}", f"{default['precision']:.3f}")
    console.print(t)

    buckets = [length_bucket(lo) for lo in (0, *BUCKETS)]
    t = Table(title="Recall by length of the original paragraph, default config")
    for col in ("level", *buckets):
        t.add_column(col, justify="right")
    for name in level_names:
        rb = default["recall_by_length"][name]
        t.add_row(name, *(f"{rb[b]:.3f}" if b in rb else "" for b in buckets))
    console.print(t)

    t = Table(title="Sweep: precision/recall vs the injected copies and vs their true Jaccard >= threshold "
                    "(P/R J>=t), recall per level, throughput (1 process)")
    for col in ("threshold", "num_perm", "ngram", "bands x rows", "precision", "recall", "FP", "P J>=t", "R J>=t", *level_names,
                "docs/s"):
        t.add_column(col, justify="right")
    for r in runs:
        t.add_row(str(r["threshold"]), str(r["num_perm"]), str(r["ngram"]), "{} x {}".format(*r["bands_rows"]),
                  f"{r['precision']:.3f}",
                  f"{r['recall']:.3f}", str(r["false_positives"]), f"{r['precision_true_jaccard']:.3f}",
                  f"{r['recall_true_jaccard']:.3f}",
                  *(f"{r['levels'][n]['recall']:.2f}" for n in level_names), f"{r['docs_per_s']:,.0f}")
    console.print(t)
    console.print(f"default config on {perf['docs']:,} docs: signatures {perf['signatures_docs_per_s']:,.0f} docs/s, "
                  f"clustering {perf['cluster_docs_per_s']:,.0f} docs/s; memory: signature "
                  f"{perf['signature_bytes_per_doc']:.0f} B/doc, clustering (LSH index, union-find) peak {perf['cluster_bytes_per_doc']:,.0f} B/doc")

    result = {
        "data": str(args.data), "paragraphs": len(raw), "base": len(base), "copies_per_level": args.copies,
        "already_duplicated": {"exact": first.counts["removed_exact"], "near": first.counts["removed_near"],
                               "examples": examples},
        "runs": runs, "default_perf": perf, "seed": args.seed,
        "threads": os.environ.get("OMP_NUM_THREADS"), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(args.out, result)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
