"""Heuristic quality filters: every rule fires on a document made to break it, none on normal prose,
and each can be switched off."""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing as mp
import pickle

import pytest

from conftest import shared_data
from slmforge.data.quality import RULES, QualityConfig, QualityStats, filter_documents, quality_reasons

NORMAL = (
    "Plants make their own food through photosynthesis. Inside the leaves, chlorophyll captures the "
    "energy of sunlight and uses it to turn water and carbon dioxide into sugar, releasing oxygen into "
    "the air as a by-product.\n\n"
    "The sugar that a plant makes is stored in its roots, stems and fruit, and it is used to build new "
    "cells as the plant grows. Animals that eat plants take in that stored energy, which is why nearly "
    "every food chain on land begins with a green plant and the light of the sun."
)
CONTENT_WORDS = ("cats sleep. dogs bark loudly. birds sing songs. rivers flow north. mountains rise high. "
                 "children laugh often. teachers explain ideas. farmers grow wheat. ")

# rule -> (a document that breaks it, config overrides for the test, the config field that disables it)
BAD = {
    "too_few_words": ("The cat sat on the mat with the dog.", {}, "min_words"),
    "too_many_words": (NORMAL + "\n\n" + NORMAL, {"max_words": 150}, "max_words"),
    "short_mean_word": (" ".join(["a b c to be of the and"] * 10), {}, "min_mean_word_length"),
    "long_mean_word": (NORMAL + " " + " ".join(["internationalisation", "electroencephalography"] * 60), {},
                       "max_mean_word_length"),
    "hash_ratio": (NORMAL + " #tag" * 20, {}, "max_symbol_word_ratio"),
    "ellipsis_ratio": (NORMAL.replace(",", " ...").replace(" and ", " ... and ... "), {}, "max_symbol_word_ratio"),
    "bullet_lines": ("\n".join(f"- item {i} is one of the things to have with you." for i in range(60)), {},
                     "max_bullet_lines"),
    "ellipsis_lines": ("\n".join(s.strip() + " and so on..." for s in NORMAL.split(".") if s.strip()), {},
                       "max_ellipsis_lines"),
    "alpha_words": (NORMAL + " " + " ".join(str(i * 37) for i in range(40)), {}, "min_alpha_words"),
    "stop_words": (CONTENT_WORDS * 5, {}, "min_stop_words"),
    "dup_lines": ("\n".join(["Click here to read more of the story and the news."] * 8 + NORMAL.split(". ")), {},
                  "max_dup_lines"),
    "dup_paragraphs": ("\n\n".join([NORMAL.split("\n\n")[0]] * 4 + [NORMAL]), {}, "max_dup_paragraphs"),
    "dup_line_chars": ("\n".join([NORMAL.replace("\n\n", " ")] * 3), {}, "max_dup_line_chars"),
    "dup_paragraph_chars": ("\n\n".join([NORMAL] * 3), {}, "max_dup_paragraph_chars"),
    "top_ngram": (NORMAL + " " + "buy now " * 40, {}, "top_ngram_fractions"),
    "dup_ngram": (NORMAL + "\n\n" + NORMAL.replace("\n\n", "\n"), {}, "dup_ngram_fractions"),
    "terminal_punct": ("\n".join(w.strip(".,") for w in NORMAL.split() if w), {}, "min_terminal_punct_lines"),
    "lorem_ipsum": (NORMAL + " Lorem ipsum dolor sit amet.", {}, "reject_lorem_ipsum"),
    "curly_braces": (NORMAL + " The set {a, b} is small.", {}, "reject_curly_braces"),
    "boilerplate_lines": (NORMAL + "\nThis site uses cookies. Read our privacy policy.", {},
                          "max_boilerplate_lines"),
    "symbol_chars": (NORMAL + " " + " ".join(["%$@^&*|~<>"] * 20), {}, "max_symbol_chars"),
    "digit_chars": (NORMAL + " the code is " + "4096 8192 1234 5678 " * 15, {}, "max_digit_chars"),
    "ascii_words": (NORMAL + " " + "Фотосинтез превращает свет в химическую энергию растения. " * 8, {},
                    "min_ascii_words"),
    "english_stop_words": (CONTENT_WORDS * 5, {}, "min_english_stop_word_rate"),
}


def test_every_rule_has_a_bad_document():
    assert set(BAD) == set(RULES)


def test_normal_paragraph_passes():
    assert quality_reasons(NORMAL) == []
    assert quality_reasons(NORMAL, QualityConfig()) == []


@pytest.mark.parametrize("rule", RULES)
def test_rule_fires_on_bad_document_and_not_on_normal(rule):
    text, overrides, knob = BAD[rule]
    cfg = QualityConfig(**overrides)
    assert rule in quality_reasons(text, cfg), rule
    assert rule not in quality_reasons(NORMAL, cfg)
    # switched off, the rule no longer fires
    off = False if isinstance(getattr(cfg, knob), bool) else None
    assert rule not in quality_reasons(text, dataclasses.replace(cfg, **{knob: off}))


def test_reasons_come_in_rule_order_and_empty_text():
    reasons = quality_reasons("{ # # # }")
    assert reasons == sorted(reasons, key=RULES.index) and "too_few_words" in reasons
    assert quality_reasons("") == ["too_few_words"]
    assert quality_reasons("", QualityConfig(min_words=None)) == []


def test_yaml_style_lists_become_tuples():
    cfg = QualityConfig(top_ngram_fractions=[[2, 0.5]], dup_ngram_fractions=[[5, 0.9]])
    assert cfg.top_ngram_fractions == ((2, 0.5),) and cfg.dup_ngram_fractions == ((5, 0.9),)


def test_filter_documents_counts_per_rule_with_examples():
    docs = [{"id": 1, "text": NORMAL}, {"id": 2, "text": BAD["lorem_ipsum"][0]},
            {"id": 3, "text": BAD["hash_ratio"][0]}, {"id": 4, "text": "short one"},
            {"id": 5, "text": BAD["lorem_ipsum"][0]}, {"id": 6}]
    stats = QualityStats(max_examples=1)
    kept = list(filter_documents(docs, QualityConfig(), stats))
    assert [d["id"] for d in kept] == [1]
    d = stats.to_dict()
    assert (d["docs_in"], d["kept"], d["removed"]) == (6, 1, 5)
    assert d["removed_by"] == {"too_few_words": 2, "hash_ratio": 1, "lorem_ipsum": 2}
    assert sum(d["removed_by"].values()) == d["removed"]
    assert d["failed"]["too_few_words"] >= 2 and len(d["examples"]["lorem_ipsum"]) == 1
    # merging another worker's counts
    other = QualityStats()
    list(filter_documents(docs[:2], None, other))
    stats.merge(other)
    assert stats.docs_in == 8 and stats.removed_by["lorem_ipsum"] == 3 and stats.kept == 2


def test_picklable_for_a_process_pool():
    cfg = QualityConfig(min_words=20)
    fn = functools.partial(quality_reasons, cfg=cfg)
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    texts = [NORMAL, BAD["curly_braces"][0], BAD["stop_words"][0]]
    with mp.get_context("fork").Pool(2) as pool:
        assert pool.map(fn, texts) == [fn(t) for t in texts]


def test_real_text_passes_and_logs_do_not():
    from slmforge.data.edu_sample import hdfs, pubmedqa

    data = shared_data("medical/pubmedqa_ori_pqal.json").parents[1]
    shared_data("loghub/HDFS/HDFS_2k.log")
    abstracts, logs = pubmedqa(data)[:200], hdfs(data)[:20]
    stats = QualityStats()
    assert len(list(filter_documents(({"text": t} for t in abstracts), stats=stats))) >= 180
    assert list(filter_documents({"text": t} for t in logs)) == []
    assert all("digit_chars" in quality_reasons(t) for t in logs)
