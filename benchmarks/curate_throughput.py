#!/usr/bin/env python
"""End-to-end `slmforge data curate` on a synthetic corpus of >= 100 MB: MB/s per stage and overall.

    python benchmarks/curate_throughput.py                     # 100k stories (~105 MB), 2 workers
    python benchmarks/curate_throughput.py --executors local,datatrove --workers 1,2

The corpus is made once by `slmforge synth stories` (builtin teacher) with 2% of it re-inserted as exact
copies and 1% as near copies (a few words changed), so dedup has something to find. The chain is
source (ingest into shards) -> dedup -> quality -> decontam (13-grams of the TinyStories validation text
in ../shared/data, when present). Results go to benchmarks/results/curate_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slmforge.data.curate import CurateConfig, curate
from slmforge.data.synth import synthesize
from slmforge.io import read_jsonl

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DEFAULT_JSON = REPO / "benchmarks" / "results" / "curate_throughput.json"


def make_corpus(work: Path, n: int, seed: int = 0) -> tuple[Path, dict]:
    stories = work / "stories.jsonl"
    t0 = time.time()
    synthesize("stories", n, stories, seed=seed, progress=False)
    synth_s = time.time() - t0
    corpus = work / "corpus.jsonl"
    if not corpus.is_file():
        rng = random.Random(seed)
        rows = list(read_jsonl(stories))
        exact = rng.sample(rows, len(rows) // 50)
        near = []
        for r in rng.sample(rows, len(rows) // 100):
            words = r["text"].split(" ")
            for _ in range(2):
                words[rng.randrange(len(words))] = rng.choice(["big", "small", "happy", "red"])
            near.append({**r, "id": r["id"] + "-near", "text": " ".join(words)})
        rows += [{**r, "id": r["id"] + "-copy"} for r in exact] + near
        (work / "injected.json").write_text(json.dumps([r["id"] + "-copy" for r in exact] + [r["id"] for r in near]))
        rng.shuffle(rows)
        tmp = corpus.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, corpus)
    return corpus, {"injected_ids": json.loads((work / "injected.json").read_text()), "stories": n, "synth_s": round(synth_s, 1), "injected_exact": n // 50,
                    "injected_near": n // 100, "corpus_mb": round(corpus.stat().st_size / 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stories", type=int, default=100_000)
    p.add_argument("--executors", default="local", help="comma-separated: local, datatrove")
    p.add_argument("--workers", default="2", help="comma-separated worker counts")
    p.add_argument("--shard-docs", type=int, default=10_000)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench-curate")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    console = Console(width=170)
    args.work.mkdir(parents=True, exist_ok=True)
    corpus, corpus_info = make_corpus(args.work, args.stories)
    console.print(f"corpus: {corpus} · {({k: v for k, v in corpus_info.items() if k != 'injected_ids'})}")
    stages = [{"dedup": {}}, {"quality": {"min_words": 20}}]
    evals = DATA / "tinystories" / "tinystories_valid_part1.txt"
    if evals.is_file():
        stages.append({"decontam": {"eval": [str(evals)]}})

    runs = []
    for executor in args.executors.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            out = args.work / f"curate-{executor}-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = CurateConfig(out=str(out), inputs=[str(corpus)], stages=stages, workers=workers,
                               executor=executor, shard_docs=args.shard_docs)
            t0 = time.time()
            report = curate(cfg)
            wall = time.time() - t0
            dedup_dir = next(out.glob("*-dedup"))
            removed = {d.get("id", "") for f in sorted(dedup_dir.glob("removed-*.jsonl")) for d in read_jsonl(f)}
            # a pair (original, injected copy) is found when either one was removed (the corpus is shuffled,
            # so the copy may come first and be the one kept)
            pairs = [(i.rsplit("-", 1)[0], i) for i in corpus_info["injected_ids"]]
            injected = sum(a in removed or b in removed for a, b in pairs)
            in_pairs = {x for pair in pairs for x in pair}
            dedup_quality = {"injected_found": injected, "recall": round(injected / len(pairs), 4),
                             "other_removed": len(removed - in_pairs)}
            runs.append({"executor": executor, "workers": workers, "wall_s": round(wall, 1), "dedup": dedup_quality,
                         "mb_per_s": round(corpus_info["corpus_mb"] / wall, 2),
                         "stages": [{"stage": s["stage"], "docs_in": s["in"]["docs"], "docs_out": s["out"]["docs"],
                                     "mb_in": round(s["in"]["bytes"] / 1e6, 1), "seconds": round(s.get("seconds", 0), 1),
                                     "reasons": s["reasons"]} for s in report["stages"]]})

    table = Table(title=f"slmforge data curate on {corpus_info['corpus_mb']} MB "
                        f"({args.stories:,} stories + injected duplicates)")
    for col in ("executor", "workers", "stage", "docs in", "docs out", "MB in", "seconds", "MB/s", "removed by"):
        table.add_column(col, justify="left" if col in ("executor", "stage", "removed by") else "right")
    for r in runs:
        for s in r["stages"]:
            mbps = s["mb_in"] / s["seconds"] if s["seconds"] else float("nan")
            table.add_row(r["executor"], str(r["workers"]), s["stage"], f"{s['docs_in']:,}", f"{s['docs_out']:,}",
                          f"{s['mb_in']:.1f}", f"{s['seconds']:.1f}", f"{mbps:.1f}",
                          ", ".join(f"{k} {v:,}" for k, v in s["reasons"].items()))
        table.add_row(r["executor"], str(r["workers"]), "[bold]all", "", "", f"{corpus_info['corpus_mb']:.1f}",
                      f"{r['wall_s']:.1f}", f"[bold]{r['mb_per_s']:.2f}", "")
    console.print(table)
    for r in runs:
        console.print(f"{r['executor']} x{r['workers']}: dedup found {r['dedup']['injected_found']:,} of the "
                      f"injected copies (recall {r['dedup']['recall']:.3f}); {r['dedup']['other_removed']:,} "
                      f"other documents removed as duplicates of each other")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    corpus_info.pop("injected_ids")
    args.json.write_text(json.dumps({"corpus": corpus_info, "cpus": os.cpu_count(), "runs": runs,
                                     "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
