#!/usr/bin/env python
"""Synthetic data generation speed and diversity.

For each recipe the builtin (offline) teacher writes --n samples through `synthesize` (JSONL, fsync per
batch, as a real run does), and the file is measured with `diversity_report`: distinct-1/2/3, self-BLEU
(sacrebleu, --bleu-sample texts x 10 references) and seed coverage. Then the OpenAI teacher path runs
against a local stub server that sleeps --latency-ms per request, at concurrency 1 and 8, to show that
requests overlap (the ideal speedup at 8 is 8x; the stub and client share this machine's cores).

With --real-text (default: the TinyStories validation paragraphs in ../shared/data when present) the same
diversity code also measures real text, paragraph by paragraph, beside both recipes generated at the same
number of texts: distinct-n falls as a corpus grows, so the comparison is only fair at equal size.

    python benchmarks/synth_speed.py                       # 20k samples per recipe, 200 stub requests
    python benchmarks/synth_speed.py --n 2000 --stub-requests 80
    python benchmarks/synth_speed.py --only-diversity      # only the equal-size diversity rows (seconds)

Results go to benchmarks/results/synth_speed.json (--only-diversity: benchmarks/results/synth_diversity.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slmforge.data.diversity import _tokens, diversity_report
from slmforge.data.synth import synthesize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the OpenAI stub is test code
from openai_stub import serve_stub  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REAL_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_valid_part1.txt"
STUB_REPLY = ("Once upon a time, a little fox named Pip found a shiny red ball in the park. " * 4).strip()


def builtin_row(recipe: str, n: int, tmp: Path, bleu_sample: int) -> dict:
    path = tmp / f"{recipe}.jsonl"
    st = synthesize(recipe, n, path, seed=0, batch_size=256, progress=False)
    t = time.perf_counter()
    seed_field = "seed_words" if recipe == "stories" else ["topic", "audience", "style", "exercise"]
    rep = diversity_report(path, sample=bleu_sample, seed_field=seed_field)
    cov = rep.get("seed_coverage", {})
    if recipe == "stories":
        coverage = {"vocab_coverage": cov["vocab_coverage"], "vocab_size": cov["vocab_size"],
                    "text_contains_all_seeds": cov["text_contains_all_seeds"]}
    else:
        coverage = {"distinct_values": cov["distinct_values"], "distinct_combinations": cov["distinct_combinations"]}
    return {"recipe": recipe, "teacher": "builtin", "n": n, "seconds": st.elapsed_s, "samples_per_s": st.samples_per_s,
            "mb": st.mb_written, "mb_per_s": st.mb_per_s, "distinct_1": rep["distinct_1"],
            "distinct_2": rep["distinct_2"], "distinct_3": rep["distinct_3"], "self_bleu": rep["self_bleu"],
            "unique_sentence_share": rep["unique_sentence_share"], "median_words": rep["length_words"]["median"],
            "tokens": rep["tokens"], "seed_coverage": coverage, "diversity_seconds": round(time.perf_counter() - t, 2)}


def read_paragraphs(path: Path) -> list[str]:
    # the TinyStories file marks no story boundaries, only blank lines between paragraphs
    return [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if p.strip()]


def real_row(path: Path, n: int, bleu_sample: int) -> dict:
    texts = read_paragraphs(path)[:n]  # the first n, so a rerun measures the same texts
    t = time.perf_counter()
    rep = diversity_report(texts, sample=bleu_sample, seed_field=None)
    return {"recipe": f"real: {path.name} (paragraphs)", "teacher": None, "n": len(texts),
            "distinct_1": rep["distinct_1"], "distinct_2": rep["distinct_2"], "distinct_3": rep["distinct_3"],
            "self_bleu": rep["self_bleu"], "unique_sentence_share": rep["unique_sentence_share"],
            "median_words": rep["length_words"]["median"], "tokens": rep["tokens"], "seed_coverage": None,
            "diversity_seconds": round(time.perf_counter() - t, 2)}


def equal_tokens_row(stories: Path, tokens: int, bleu_sample: int) -> dict:
    # generated stories are ~4x longer than a real paragraph, and distinct-n falls with corpus size, so also
    # measure the first generated stories that hold as many tokens as the real paragraphs
    texts, total = [], 0
    for line in stories.read_text(encoding="utf-8").splitlines():
        if total >= tokens:
            break
        texts.append(json.loads(line)["text"])
        total += len(_tokens(texts[-1]))
    rep = diversity_report(texts, sample=bleu_sample, seed_field=None)
    return {"recipe": "stories (as many tokens as the real text)", "teacher": "builtin", "n": len(texts),
            "distinct_1": rep["distinct_1"], "distinct_2": rep["distinct_2"], "distinct_3": rep["distinct_3"],
            "self_bleu": rep["self_bleu"], "unique_sentence_share": rep["unique_sentence_share"],
            "median_words": rep["length_words"]["median"], "tokens": rep["tokens"], "seed_coverage": None}


def same_size_rows(path: Path, n: int, tmp: Path, bleu_sample: int) -> list[dict]:
    """Real paragraphs and both recipes at the same number of texts (at most n, at most what the file holds),
    and the stories recipe at the same number of tokens."""
    real = real_row(path, n, bleu_sample)
    rows = [builtin_row(recipe, real["n"], tmp, bleu_sample) for recipe in ("stories", "textbook")]
    return rows + [equal_tokens_row(tmp / "stories.jsonl", real["tokens"], bleu_sample), real]


def diversity_table(rows: list[dict], title: str, bleu_sample: int) -> Table:
    t = Table(title=title)
    for col in ("corpus", "texts", "tokens", "median words", "distinct-1", "distinct-2", "distinct-3",
                f"self-BLEU ({bleu_sample}x10)", "unique sentences"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["recipe"], f"{r['n']:,}", f"{r['tokens']:,}", f"{r['median_words']:g}", f"{r['distinct_1']:.4f}",
                  f"{r['distinct_2']:.4f}", f"{r['distinct_3']:.4f}", f"{r['self_bleu']:.1f}",
                  f"{r['unique_sentence_share']:.1%}")
    return t


def stub_row(concurrency: int, n: int, latency_s: float, tmp: Path) -> dict:
    with serve_stub(reply=lambda body: STUB_REPLY, latency_s=latency_s) as stub:
        path = tmp / f"stub-c{concurrency}.jsonl"
        st = synthesize("stories", n, path, teacher=f"openai:{stub.url}#stub", concurrency=concurrency,
                        batch_size=64, price_in=0.15, price_out=0.60, progress=False)
        return {"recipe": "stories", "teacher": f"openai stub, {latency_s * 1000:.0f} ms/request",
                "concurrency": concurrency, "n": n, "seconds": st.elapsed_s, "samples_per_s": st.samples_per_s,
                "ideal_samples_per_s": round(concurrency / latency_s, 1), "max_in_flight": stub.max_in_flight,
                "usage": st.usage}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="samples per builtin recipe")
    ap.add_argument("--bleu-sample", type=int, default=200)
    ap.add_argument("--stub-requests", type=int, default=200)
    ap.add_argument("--latency-ms", type=float, default=50)
    ap.add_argument("--real-text", type=Path, default=REAL_TEXT if REAL_TEXT.exists() else None,
                    help="text file of blank-line separated paragraphs to measure beside the generated rows")
    ap.add_argument("--only-diversity", action="store_true",
                    help="only the equal-size diversity rows (real text and both recipes); no speed rows")
    ap.add_argument("--json", type=Path, default=None,
                    help="default benchmarks/results/synth_speed.json (synth_diversity.json with --only-diversity)")
    args = ap.parse_args()
    if args.json is None:
        args.json = RESULTS / ("synth_diversity.json" if args.only_diversity else "synth_speed.json")
    if args.only_diversity and args.real_text is None:
        ap.error("--only-diversity needs --real-text FILE (the default TinyStories file is not here)")
    console = Console(width=max(Console().width, 150))  # the tables are wide
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        same_size = []
        if args.real_text is not None:
            console.print(f"[dim]{args.real_text.name} beside both recipes at the same size...[/dim]")
            same_size = same_size_rows(args.real_text, args.n, tmp, args.bleu_sample)
            console.print(diversity_table(same_size, f"real text and builtin teacher, {same_size[0]['n']:,} texts "
                                          "each", args.bleu_sample))
        if args.only_diversity:
            out = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "same_size": same_size,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2) + "\n")
            console.print(f"[dim]wrote {args.json}[/dim]")
            return
        builtin = []
        for recipe in ("stories", "textbook"):
            console.print(f"[dim]{recipe}: {args.n:,} samples, builtin teacher...[/dim]")
            builtin.append(builtin_row(recipe, args.n, tmp, args.bleu_sample))
        stub = []
        for c in (1, 8):
            console.print(f"[dim]stub server: {args.stub_requests} requests at concurrency {c}...[/dim]")
            stub.append(stub_row(c, args.stub_requests, args.latency_ms / 1000, tmp))

    t = Table(title=f"builtin teacher, {args.n:,} samples per recipe")
    for col in ("recipe", "seconds", "samples/s", "MB/s", "distinct-1", "distinct-2", "distinct-3",
                f"self-BLEU ({args.bleu_sample}x10)", "unique sentences", "seed coverage"):
        t.add_column(col, justify="right")
    for r in builtin:
        cov = r["seed_coverage"]
        cov_s = (f"vocab {min(cov['vocab_coverage'].values()):.0%}, in text {cov['text_contains_all_seeds']:.0%}"
                 if "vocab_coverage" in cov else f"{cov['distinct_combinations']} combos")
        t.add_row(r["recipe"], f"{r['seconds']:.1f}", f"{r['samples_per_s']:,.0f}", f"{r['mb_per_s']:.1f}",
                  f"{r['distinct_1']:.4f}", f"{r['distinct_2']:.4f}", f"{r['distinct_3']:.4f}",
                  f"{r['self_bleu']:.1f}", f"{r['unique_sentence_share']:.1%}", cov_s)
    console.print(t)
    t = Table(title=f"OpenAI teacher against a local stub ({args.latency_ms:g} ms/request)")
    for col in ("concurrency", "requests", "seconds", "samples/s", "ideal", "max in flight", "speedup"):
        t.add_column(col, justify="right")
    for r in stub:
        t.add_row(str(r["concurrency"]), str(r["n"]), f"{r['seconds']:.2f}", f"{r['samples_per_s']:.1f}",
                  f"{r['ideal_samples_per_s']:.0f}", str(r["max_in_flight"]),
                  f"{r['samples_per_s'] / stub[0]['samples_per_s']:.1f}x")
    console.print(t)

    out = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "builtin": builtin, "stub": stub,
           "same_size": same_size, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    console.print(f"[dim]wrote {args.json}[/dim]")


if __name__ == "__main__":
    main()
