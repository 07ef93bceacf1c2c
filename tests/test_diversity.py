"""Diversity figures on texts built to have known answers, seed coverage, and the report folder."""

import json
import random

import pytest

from slmforge.data.diversity import (
    distinct_n,
    diversity,
    diversity_report,
    seed_word_coverage,
    self_bleu,
    write_report,
)
from slmforge.data.storygen import generate_stories
from slmforge.errors import SlmforgeError

SAME = ("The cat sat on the mat. The dog ran to the park and back. " * 3).strip()


def varied(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(3000)]
    return [" ".join(rng.choice(words) for _ in range(40)) + "." for _ in range(n)]


def test_distinct_n_by_hand():
    assert distinct_n([["a", "b", "a", "b"]], 1) == 2 / 4
    assert distinct_n([["a", "b", "a", "b"]], 2) == 2 / 3  # ab ba ab
    assert distinct_n([["a", "b"], ["a", "b"]], 2) == 1 / 2
    assert distinct_n([["a"]], 3) == 0.0


def test_identical_texts_vs_varied_texts():
    same = diversity_report([SAME] * 50, sample=20)
    assert same["self_bleu"] == pytest.approx(100.0)
    assert same["unique_texts"] == 1 and same["unique_sentences"] == 2
    assert same["distinct_1"] < 0.01 and same["distinct_3"] < 0.02

    var = diversity_report(varied(50), sample=20)
    assert var["self_bleu"] < 5 and var["unique_texts"] == 50
    assert var["distinct_1"] > 0.5 and var["distinct_3"] > 0.95
    assert var["distinct_1"] > 50 * same["distinct_1"]
    assert var["length_words"]["median"] == 40 and sum(var["length_histogram"]["counts"]) == 50


def test_self_bleu_orders_corpora_by_repetition():
    stories = [s["text"] for s in generate_stories(60, seed=1)]
    mixed = stories[:30] + [stories[0]] * 30  # half the corpus is one story
    a, b = self_bleu(stories, sample=30), self_bleu(mixed, sample=30)
    assert 0 < a < b < 100
    assert self_bleu(["only one"]) is None
    assert self_bleu(stories, sample=30, seed=3) == self_bleu(stories, sample=30, seed=3)  # seeded


def test_seed_word_coverage():
    rows = [{"seed_words": {"verb": "run", "noun": "mouse", "adjective": "happy"}},   # inflected forms count
            {"seed_words": {"verb": "jump", "noun": "ball", "adjective": "red"}},     # the noun is missing
            {"text": "no seeds"}]
    texts = ["Tom ran after the mice. He was happy.", "Lily jumped over the red box.", "no seeds"]
    cov = seed_word_coverage(rows, texts)
    assert cov["samples_with_seeds"] == 2 and cov["text_contains_all_seeds"] == 0.5
    assert cov["text_contains_seed"] == {"verb": 1.0, "noun": 0.5, "adjective": 1.0}
    assert cov["distinct_seeds"] == {"verb": 2, "noun": 2, "adjective": 2}
    assert 0 < cov["vocab_coverage"]["verb"] == round(2 / cov["vocab_size"]["verb"], 4)


def test_report_on_a_synth_file_and_the_folder(tmp_path):
    from slmforge.data.synth import synthesize

    path = tmp_path / "s.jsonl"
    synthesize("stories", 300, path, progress=False)
    report = diversity(path, tmp_path / "div", sample=50)
    cov = report["seed_coverage"]
    assert cov["text_contains_all_seeds"] == 1.0 and 0.2 < cov["vocab_coverage"]["noun"] < 0.5
    assert 0 < report["self_bleu"] < 60 and report["unique_texts"] == 300
    files = sorted(p.name for p in (tmp_path / "div").iterdir())
    assert files == ["lengths.png", "report.json", "report.md"]
    assert json.loads((tmp_path / "div" / "report.json").read_text())["distinct_2"] == report["distinct_2"]
    md = (tmp_path / "div" / "report.md").read_text()
    assert "self-BLEU" in md and "Texts containing all their seed words: 100.0%" in md
    assert (tmp_path / "div" / "lengths.png").read_bytes()[:4] == b"\x89PNG"

    # textbook rows: coverage of the formula's fields
    tb = tmp_path / "t.jsonl"
    synthesize("textbook", 100, tb, progress=False)
    r = diversity_report(tb, sample=20, seed_field=["topic", "audience", "style", "exercise"])
    assert r["seed_coverage"]["distinct_values"]["topic"] == 5 and r["seed_coverage"]["distinct_combinations"] > 50

    # rewriting replaces the folder whole; nothing temporary is left beside it
    write_report(r, tmp_path / "div")
    assert "distinct combinations" in (tmp_path / "div" / "report.md").read_text().lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["div", "s.jsonl", "s.jsonl.stats.json", "t.jsonl",
                                                          "t.jsonl.stats.json"]


def test_bad_input(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(SlmforgeError, match="no texts"):
        diversity_report(tmp_path / "e.jsonl")
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(SlmforgeError, match="row 2 has no string field 'text'"):
        diversity_report(tmp_path / "b.jsonl")
    with pytest.raises(SlmforgeError, match="no such file"):
        diversity_report(tmp_path / "missing.jsonl")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SlmforgeError, match="not a directory"):
        write_report(diversity_report(["a b c"]), tmp_path / "file")
