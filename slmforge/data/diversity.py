"""How diverse is a synthetic corpus? The figures the TinyStories/Phi papers and the synthetic-data
literature use, on a JSONL file or a list of texts:

  distinct-n      unique n-grams / all n-grams over the corpus, n = 1, 2, 3 (Li et al., 2016); higher is
                  more varied. It falls as a corpus grows, so compare corpora of the same size.
  self-BLEU       each of `sample` texts scored as a hypothesis against `n_refs` other texts of the corpus as
                  references, with sacrebleu's corpus BLEU (Zhu et al., 2018, Texygen); 100 = the texts
                  repeat each other, lower is more varied.
  seed coverage   for rows with seed words ({"verb", "noun", "adjective"}): the share of the basic
                  vocabulary's verbs, nouns and adjectives drawn as seeds, and the share of samples whose
                  text really contains its seed words (any inflection: ran/running for run, mice for mouse).
                  For other seed fields (e.g. topic), the distinct values and how often each occurs.
  sentences       how many sentences there are and how many are unique (templates repeat sentences).
  lengths         words per text: summary and a histogram (lengths.png).

`write_report` writes report.json, report.md and lengths.png into a folder atomically.
"""

from __future__ import annotations

import json
import random
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from slmforge.errors import SlmforgeError
from slmforge.io import atomic_write_text, read_jsonl, write_dir_atomically, write_json

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"”']?\s+|\n+")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _load(source, text_field: str) -> tuple[list[str], list[dict] | None]:
    """Texts and, for JSONL or dict input, the rows they came from."""
    if isinstance(source, (str, Path)):
        rows = list(read_jsonl(source))
        for i, r in enumerate(rows):
            if not isinstance(r.get(text_field), str):
                raise SlmforgeError(f"{source}: row {i + 1} has no string field {text_field!r}")
        return [r[text_field] for r in rows], rows
    items = list(source)
    if items and isinstance(items[0], dict):
        return [r[text_field] for r in items], items
    return [str(t) for t in items], None


def distinct_n(token_lists: Sequence[list[str]], n: int) -> float:
    """Unique n-grams / total n-grams over all texts."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for toks in token_lists:
        grams = list(zip(*(toks[i:] for i in range(n)), strict=False))
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def self_bleu(texts: Sequence[str], sample: int = 200, n_refs: int = 10, seed: int = 0) -> float | None:
    """Mean-free corpus self-BLEU: `sample` texts as hypotheses, each against `n_refs` other texts."""
    from sacrebleu.metrics import BLEU

    if len(texts) < 2:
        return None
    rng = random.Random(seed)
    flat = [" ".join(t.split()) for t in texts]  # one line each: sacrebleu scores single lines
    hyp_idx = rng.sample(range(len(flat)), min(sample, len(flat)))
    k = min(n_refs, len(flat) - 1)
    refs = []
    for i in hyp_idx:
        others = set()
        while len(others) < k:
            j = rng.randrange(len(flat))
            if j != i:
                others.add(j)
        refs.append(sorted(others))
    streams = [[flat[r[j]] for r in refs] for j in range(k)]  # sacrebleu: one stream per reference slot
    return round(BLEU().corpus_score([flat[i] for i in hyp_idx], streams).score, 2)


def seed_word_coverage(rows: Sequence[dict], texts: Sequence[str], field: str = "seed_words") -> dict:
    """Share of the basic vocabulary drawn as seeds, per role, and share of texts containing their seeds."""
    from slmforge.data.basic_vocab import ADJECTIVES, NOUN, NOUNS, VERB, VERBS

    vocab = {"verb": {v.base for v in VERBS}, "noun": {n.word for n in NOUNS}, "adjective": {a.word for a in ADJECTIVES}}

    def forms(role: str, word: str) -> tuple[str, ...]:
        if role == "verb" and word in VERB:
            v = VERB[word]
            return (v.base, v.past, v.ing, v.base + "s", v.base + "es")
        if role == "noun" and word in NOUN:
            return (word, NOUN[word].plural)
        return (word,)

    seeds: dict[str, set[str]] = {r: set() for r in vocab}
    contains: Counter = Counter()
    n_seeded = all_in = 0
    for row, text in zip(rows, texts, strict=True):
        words = row.get(field)
        if not isinstance(words, dict):
            continue
        n_seeded += 1
        low = text.lower()
        ok = True
        for role, word in words.items():
            seeds.setdefault(role, set()).add(word)
            found = any(re.search(r"\b" + re.escape(f.lower()) + r"\b", low) for f in forms(role, word))
            contains[role] += found
            ok &= found
        all_in += ok
    if not n_seeded:
        return {}
    out = {"samples_with_seeds": n_seeded,
           "vocab_coverage": {r: round(len(seeds[r] & vocab[r]) / len(vocab[r]), 4) for r in vocab},
           "vocab_size": {r: len(vocab[r]) for r in vocab},
           "distinct_seeds": {r: len(s) for r, s in seeds.items()},
           "text_contains_seed": {r: round(contains[r] / n_seeded, 4) for r in seeds},
           "text_contains_all_seeds": round(all_in / n_seeded, 4)}
    return out


def field_coverage(rows: Sequence[dict], fields: Sequence[str]) -> dict:
    """Distinct values of each field and of their combinations (e.g. topic x audience x style x exercise)."""
    values = {f: Counter(str(r.get(f)) for r in rows if f in r) for f in fields}
    combos = {tuple(str(r.get(f)) for f in fields) for r in rows if all(f in r for f in fields)}
    return {"distinct_values": {f: len(c) for f, c in values.items()},
            "counts": {f: dict(c.most_common()) for f, c in values.items()},
            "distinct_combinations": len(combos)}


def diversity_report(source: str | Path | Sequence[str] | Sequence[dict], sample: int = 200,
                     seed_field: str | Sequence[str] | None = "seed_words", n_refs: int = 10, seed: int = 0,
                     text_field: str = "text", bins: int = 30) -> dict:
    """All the figures for a JSONL path (rows with `text_field`) or a list of texts or rows."""
    import numpy as np

    texts, rows = _load(source, text_field)
    if not texts:
        raise SlmforgeError(f"{source if isinstance(source, (str, Path)) else 'texts'}: no texts to measure")
    toks = [_tokens(t) for t in texts]
    lengths = [len(t.split()) for t in texts]
    sentences = [s.strip() for t in texts for s in _SENTENCE_END.split(t) if s.strip()]
    counts, edges = np.histogram(lengths, bins=min(bins, max(1, len(set(lengths)))))
    report: dict = {
        "texts": len(texts),
        "unique_texts": len(set(texts)),
        "tokens": sum(len(t) for t in toks),
        "distinct_1": round(distinct_n(toks, 1), 4),
        "distinct_2": round(distinct_n(toks, 2), 4),
        "distinct_3": round(distinct_n(toks, 3), 4),
        "self_bleu": self_bleu(texts, sample, n_refs, seed),
        "self_bleu_sample": min(sample, len(texts)),
        "self_bleu_refs": min(n_refs, len(texts) - 1),
        "sentences": len(sentences),
        "unique_sentences": len(set(sentences)),
        "unique_sentence_share": round(len(set(sentences)) / max(len(sentences), 1), 4),
        "length_words": {"mean": round(statistics.fmean(lengths), 1), "median": statistics.median(lengths),
                         "min": min(lengths), "max": max(lengths),
                         "p5": float(np.percentile(lengths, 5)), "p95": float(np.percentile(lengths, 95))},
        "length_histogram": {"edges": [round(float(e), 1) for e in edges], "counts": counts.tolist()},
    }
    if rows is not None and seed_field:
        fields = [seed_field] if isinstance(seed_field, str) else list(seed_field)
        if len(fields) == 1 and any(isinstance(r.get(fields[0]), dict) for r in rows):
            report["seed_coverage"] = seed_word_coverage(rows, texts, fields[0])
        elif any(f in r for r in rows for f in fields):
            report["seed_coverage"] = field_coverage(rows, fields)
    return report


# --- writing ----------------------------------------------------------------------------------------------------

def plot_lengths(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = report["length_histogram"]
    edges, counts = h["edges"], h["counts"]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:], strict=False)], align="edge",
           edgecolor="white")
    ax.set_xlabel("words per text")
    ax.set_ylabel("texts")
    ax.set_title(f"{report['texts']:,} texts, median {report['length_words']['median']:g} words")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _markdown(r: dict, title: str) -> str:
    rows = [("texts", f"{r['texts']:,}"), ("unique texts", f"{r['unique_texts']:,}"), ("tokens", f"{r['tokens']:,}"),
            ("distinct-1", r["distinct_1"]), ("distinct-2", r["distinct_2"]), ("distinct-3", r["distinct_3"]),
            (f"self-BLEU ({r['self_bleu_sample']} texts x {r['self_bleu_refs']} refs)", r["self_bleu"]),
            ("sentences", f"{r['sentences']:,}"), ("unique sentences", f"{r['unique_sentences']:,} "
                                                   f"({r['unique_sentence_share']:.1%})"),
            ("words per text (median, p5-p95)", f"{r['length_words']['median']:g} "
                                                f"({r['length_words']['p5']:g}-{r['length_words']['p95']:g})")]
    md = [f"# {title}", "", "| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    cov = r.get("seed_coverage") or {}
    if "vocab_coverage" in cov:
        md += ["", "## Seed words", "", "| role | vocabulary drawn as seeds | texts containing their seed |",
               "|---|---|---|"]
        md += [f"| {role} | {cov['vocab_coverage'][role]:.1%} of {cov['vocab_size'][role]} | "
               f"{cov['text_contains_seed'].get(role, 0):.1%} |" for role in cov["vocab_coverage"]]
        md += ["", f"Texts containing all their seed words: {cov['text_contains_all_seeds']:.1%}."]
    elif "distinct_values" in cov:
        md += ["", "## Seed fields", "", "| field | distinct values |", "|---|---|"]
        md += [f"| {f} | {n} |" for f, n in cov["distinct_values"].items()]
        md += ["", f"Distinct combinations: {cov['distinct_combinations']:,}."]
    md += ["", "## Lengths", "", "![lengths](lengths.png)", ""]
    return "\n".join(md)


def write_report(report: dict, out_dir: str | Path, title: str = "Diversity report") -> Path:
    """report.json, report.md and lengths.png into out_dir, all at once (a temp folder renamed into place)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SlmforgeError(f"{out}: exists and is not a directory")

    def fill(tmp: Path) -> None:
        write_json(tmp / "report.json", report)
        atomic_write_text(tmp / "report.md", _markdown(report, title))
        plot_lengths(report, tmp / "lengths.png")

    return write_dir_atomically(out, fill)


def diversity(path: str | Path, out_dir: str | Path, **kw) -> dict:
    """Measure a JSONL file and write the report folder (what `slmforge data diversity` runs)."""
    report = diversity_report(path, **kw)
    write_report(report, out_dir, title=f"Diversity of {Path(path).name}")
    return report


if __name__ == "__main__":  # python -m slmforge.data.diversity FILE OUT_DIR
    import sys

    print(json.dumps({k: v for k, v in diversity(sys.argv[1], sys.argv[2]).items() if k != "length_histogram"},
                     indent=2))
