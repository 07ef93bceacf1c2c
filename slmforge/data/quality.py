"""Heuristic document quality filters in the style of Gopher (Rae et al. 2021, appendix A) and C4
(Raffel et al. 2020), with no models: every rule is a cheap count over words, lines and characters.

    from slmforge.data.quality import QualityConfig, QualityStats, filter_documents, quality_reasons

    quality_reasons("some text", QualityConfig())     # ['too_few_words', ...]; [] means keep
    stats = QualityStats()
    kept = list(filter_documents(docs, QualityConfig(min_words=20), stats))
    stats.to_dict()                                    # removals per rule, with a few examples each

Every threshold lives in `QualityConfig`; set a field to None (or a flag to False) to switch its rule
off. Rules are reported by name (RULES below), so a removal can always be traced to the rule that
made it. Everything here is a pure function of (text, config), and the config is a plain dataclass,
so `quality_reasons` pickles into a multiprocessing Pool or a datatrove step unchanged.

Defaults are the published thresholds (Gopher table A1; C4's rules recast per document, as FineWeb
does for its terminal-punctuation rule) where there is one; the character-ratio and English-ness rules
are ours, set so that real prose, abstracts and dialogue pass and logs, code and symbol noise do not.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

# Gopher's stop-word rule: a document must contain at least 2 of these.
GOPHER_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})

# The commonest English function words; their share of the words is a cheap English-language signal
# (English prose: 30-50%; keyword lists, logs, code and other languages: near 0).
ENGLISH_STOP_WORDS = frozenset("""
a about after all also an and are as at be because been but by can could did do does for from had has
have he her his how i if in into is it its may more my no not of on or our she so some than that the
their them then there these they this those to us was we were what when where which while who will
with would you your
""".split())

BULLETS = ("•", "-", "*", "‣", "◦", "·", "–", "—")
ELLIPSES = ("...", "…")
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”", "’")  # C4's marks, plus curly closing quotes
BOILERPLATE = ("javascript", "cookie policy", "uses cookies", "use of cookies", "use cookies",
               "privacy policy", "terms of use", "terms of service", "all rights reserved")
PUNCT = set(string.punctuation) | {"…", "“", "”", "‘", "’", "–", "—", "•"}

RULES = (
    "too_few_words", "too_many_words", "short_mean_word", "long_mean_word",
    "hash_ratio", "ellipsis_ratio", "bullet_lines", "ellipsis_lines", "alpha_words", "stop_words",
    "dup_lines", "dup_paragraphs", "dup_line_chars", "dup_paragraph_chars", "top_ngram", "dup_ngram",
    "terminal_punct", "lorem_ipsum", "curly_braces", "boilerplate_lines",
    "symbol_chars", "digit_chars", "ascii_words", "english_stop_words",
)


@dataclass
class QualityConfig:
    # Gopher quality rules
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1  # '#' per word, and '...'/'…' per word
    max_bullet_lines: float | None = 0.9  # fraction of lines starting with a bullet
    max_ellipsis_lines: float | None = 0.3  # fraction of lines ending with an ellipsis
    min_alpha_words: float | None = 0.8  # fraction of words with at least one letter
    min_stop_words: int | None = 2  # distinct Gopher stop words present
    # Gopher repetition rules (table A1)
    max_dup_lines: float | None = 0.3  # fraction of lines that repeat an earlier line
    max_dup_paragraphs: float | None = 0.3
    max_dup_line_chars: float | None = 0.2  # fraction of characters in repeated lines
    max_dup_paragraph_chars: float | None = 0.2
    # (n, max fraction of word characters covered by the most frequent n-gram)
    top_ngram_fractions: tuple[tuple[int, float], ...] | None = ((2, 0.20), (3, 0.18), (4, 0.16))
    # (n, max fraction of word characters covered by repeats of n-grams seen before)
    dup_ngram_fractions: tuple[tuple[int, float], ...] | None = (
        (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    # C4 rules, per document
    min_terminal_punct_lines: float | None = 0.12  # fraction of lines ending in terminal punctuation
    reject_lorem_ipsum: bool = True
    reject_curly_braces: bool = True
    max_boilerplate_lines: float | None = 0.1  # lines mentioning javascript, cookies, privacy policy...
    # character ratios
    max_symbol_chars: float | None = 0.25  # non-space characters that are neither letters nor digits
    max_digit_chars: float | None = 0.2
    # English-ish, without a language model
    min_ascii_words: float | None = 0.7  # of the words with letters, share made of ASCII letters only
    min_english_stop_word_rate: float | None = 0.06  # share of words in ENGLISH_STOP_WORDS

    def __post_init__(self) -> None:
        # YAML gives lists; keep tuples so the config stays hashable and compares equal
        for name in ("top_ngram_fractions", "dup_ngram_fractions"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, tuple((int(n), float(f)) for n, f in v))


# ---------------------------------------------------------------------------------------- counting


def _words(text: str) -> list[str]:
    return text.split()


def _norm(word: str) -> str:
    """Lower-cased, with surrounding punctuation stripped: 'The,' -> 'the'."""
    return word.strip(string.punctuation + "“”‘’…–—").lower()


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items equal to an earlier item, characters in them)."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


def _top_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    """Characters covered by the commonest n-gram (counted once per occurrence) / all word characters."""
    if len(words) < n or not total_chars:
        return 0.0
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    return sum(map(len, gram)) * count / total_chars


def _dup_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    """Characters of words covered by an n-gram that already occurred earlier / all word characters."""
    if len(words) < 2 * n or not total_chars:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        g = tuple(words[i:i + n])
        if g in seen:
            covered[i:i + n] = [True] * n
        else:
            seen.add(g)
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total_chars


# ------------------------------------------------------------------------------------------- rules


def quality_reasons(text: str, cfg: QualityConfig | None = None) -> list[str]:
    """Names of the rules `text` fails, in RULES order; an empty list means keep the document."""
    cfg = cfg or QualityConfig()
    failed: list[str] = []

    def check(bad: bool, rule: str) -> None:
        if bad:
            failed.append(rule)

    words = _words(text)
    n_words = len(words)
    if n_words == 0:
        return ["too_few_words"] if cfg.min_words else []
    # Word-level rules count words that are not pure punctuation (as Gopher does).
    real = [w for w in words if any(c not in PUNCT for c in w)]
    normed = [_norm(w) for w in real]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    n_lines = max(1, len(lines))

    check(cfg.min_words is not None and len(real) < cfg.min_words, "too_few_words")
    check(cfg.max_words is not None and len(real) > cfg.max_words, "too_many_words")
    mean_len = sum(map(len, real)) / len(real) if real else 0.0
    check(cfg.min_mean_word_length is not None and mean_len < cfg.min_mean_word_length, "short_mean_word")
    check(cfg.max_mean_word_length is not None and mean_len > cfg.max_mean_word_length, "long_mean_word")
    if cfg.max_symbol_word_ratio is not None:
        check(text.count("#") / n_words > cfg.max_symbol_word_ratio, "hash_ratio")
        check((text.count("...") + text.count("…")) / n_words > cfg.max_symbol_word_ratio, "ellipsis_ratio")
    if cfg.max_bullet_lines is not None:
        bullets = sum(ln.lstrip().startswith(BULLETS) for ln in lines)
        check(bullets / n_lines > cfg.max_bullet_lines, "bullet_lines")
    if cfg.max_ellipsis_lines is not None:
        ellipsis = sum(ln.rstrip().endswith(ELLIPSES) for ln in lines)
        check(ellipsis / n_lines > cfg.max_ellipsis_lines, "ellipsis_lines")
    if cfg.min_alpha_words is not None:
        alpha = sum(any(c.isalpha() for c in w) for w in words)
        check(alpha / n_words < cfg.min_alpha_words, "alpha_words")
    if cfg.min_stop_words is not None:
        check(len(GOPHER_STOP_WORDS.intersection(normed)) < cfg.min_stop_words, "stop_words")

    # Gopher repetition: lines, paragraphs, n-grams
    if cfg.max_dup_lines is not None or cfg.max_dup_line_chars is not None:
        stripped = [ln.strip() for ln in lines]
        n_dup, dup_chars = _duplicates(stripped)
        check(cfg.max_dup_lines is not None and n_dup / n_lines > cfg.max_dup_lines, "dup_lines")
        check(cfg.max_dup_line_chars is not None and dup_chars / max(1, len(text)) > cfg.max_dup_line_chars,
              "dup_line_chars")
    if cfg.max_dup_paragraphs is not None or cfg.max_dup_paragraph_chars is not None:
        paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        n_dup, dup_chars = _duplicates(paras)
        check(cfg.max_dup_paragraphs is not None and n_dup / max(1, len(paras)) > cfg.max_dup_paragraphs,
              "dup_paragraphs")
        check(cfg.max_dup_paragraph_chars is not None
              and dup_chars / max(1, len(text)) > cfg.max_dup_paragraph_chars, "dup_paragraph_chars")
    gram_words = [w for w in normed if w]
    total_chars = sum(map(len, gram_words))
    if cfg.top_ngram_fractions:
        check(any(_top_ngram_fraction(gram_words, n, total_chars) > f for n, f in cfg.top_ngram_fractions),
              "top_ngram")
    if cfg.dup_ngram_fractions:
        check(any(_dup_ngram_fraction(gram_words, n, total_chars) > f for n, f in cfg.dup_ngram_fractions),
              "dup_ngram")

    # C4
    if cfg.min_terminal_punct_lines is not None:
        ended = sum(ln.rstrip().endswith(TERMINAL_PUNCT) and not ln.rstrip().endswith(ELLIPSES) for ln in lines)
        check(ended / n_lines < cfg.min_terminal_punct_lines, "terminal_punct")
    lower = text.lower()
    check(cfg.reject_lorem_ipsum and "lorem ipsum" in lower, "lorem_ipsum")
    check(cfg.reject_curly_braces and ("{" in text or "}" in text), "curly_braces")
    if cfg.max_boilerplate_lines is not None:
        boiler = sum(any(b in ln.lower() for b in BOILERPLATE) for ln in lines)
        check(boiler / n_lines > cfg.max_boilerplate_lines, "boilerplate_lines")

    # character ratios
    if cfg.max_symbol_chars is not None or cfg.max_digit_chars is not None:
        chars = [c for c in text if not c.isspace()]
        n_chars = max(1, len(chars))
        symbols = sum(not c.isalnum() for c in chars)
        digits = sum(c.isdigit() for c in chars)
        check(cfg.max_symbol_chars is not None and symbols / n_chars > cfg.max_symbol_chars, "symbol_chars")
        check(cfg.max_digit_chars is not None and digits / n_chars > cfg.max_digit_chars, "digit_chars")

    # English-ish
    if cfg.min_ascii_words is not None:
        lettered = [w for w in normed if any(c.isalpha() for c in w)]
        ascii_words = sum(w.isascii() and w.replace("-", "").replace("'", "").isalpha() for w in lettered)
        check(ascii_words / max(1, len(lettered)) < cfg.min_ascii_words, "ascii_words")
    if cfg.min_english_stop_word_rate is not None:
        rate = sum(w in ENGLISH_STOP_WORDS for w in normed) / max(1, len(normed))
        check(rate < cfg.min_english_stop_word_rate, "english_stop_words")
    return failed


# ------------------------------------------------------------------------------------------ stream


@dataclass
class QualityStats:
    """Counts for a report. `removed_by` attributes each removed document to the first rule it failed
    (they sum to `removed`); `failed` counts every failed rule, so one document may count several times."""

    docs_in: int = 0
    kept: int = 0
    removed: int = 0
    removed_by: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # first rule -> first few texts
    max_examples: int = 3
    example_chars: int = 200

    def add(self, text: str, reasons: list[str]) -> None:
        self.docs_in += 1
        if not reasons:
            self.kept += 1
            return
        self.removed += 1
        first = reasons[0]
        self.removed_by[first] = self.removed_by.get(first, 0) + 1
        for r in reasons:
            self.failed[r] = self.failed.get(r, 0) + 1
        ex = self.examples.setdefault(first, [])
        if len(ex) < self.max_examples:
            ex.append(text[:self.example_chars])

    def merge(self, other: QualityStats | dict) -> None:
        """Add another worker's stats (a QualityStats or its to_dict())."""
        o = other.to_dict() if isinstance(other, QualityStats) else other
        self.docs_in += o["docs_in"]
        self.kept += o["kept"]
        self.removed += o["removed"]
        for mine, theirs in ((self.removed_by, o["removed_by"]), (self.failed, o["failed"])):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for k, v in o["examples"].items():
            ex = self.examples.setdefault(k, [])
            ex.extend(v[:max(0, self.max_examples - len(ex))])

    def to_dict(self) -> dict:
        return {"docs_in": self.docs_in, "kept": self.kept, "removed": self.removed,
                "removed_by": _in_rule_order(self.removed_by), "failed": _in_rule_order(self.failed),
                "examples": _in_rule_order(self.examples)}


def _in_rule_order(d: dict) -> dict:
    order = {r: i for i, r in enumerate(RULES)}
    return dict(sorted(d.items(), key=lambda kv: order.get(kv[0], len(order))))


def filter_documents(docs: Iterable[dict], cfg: QualityConfig | None = None, stats: QualityStats | None = None,
                     text_field: str = "text") -> Iterator[dict]:
    """Yield the documents that pass every enabled rule; removals are counted in `stats` when given.
    A document without `text_field` (or with a non-string there) counts as failing `too_few_words`."""
    cfg = cfg or QualityConfig()
    for doc in docs:
        text = doc.get(text_field)
        reasons = quality_reasons(text, cfg) if isinstance(text, str) else ["too_few_words"]
        if stats is not None:
            stats.add(text if isinstance(text, str) else "", reasons)
        if not reasons:
            yield doc
