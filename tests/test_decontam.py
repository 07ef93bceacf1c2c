"""Removing training documents that share a long n-gram with an evaluation set."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from slmforge.data.decontam import DecontamIndex, decontaminate
from slmforge.errors import SlmforgeError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

EVAL = ("The quick brown fox jumps over the lazy dog while seven wizards quietly boxed "
        "jackdaws near the frozen river at dawn.")


def words_of(text: str) -> list[str]:
    return text.replace(".", "").split()


def test_13_gram_is_caught_and_12_gram_is_not():
    index = DecontamIndex.build([EVAL], n=13)
    w = words_of(EVAL)
    thirteen = " ".join(w[3:16])
    twelve = " ".join(w[3:15])
    doc13 = f"Some training text. {thirteen.upper()}, and then it goes on about something else."
    doc12 = f"Some training text. {twelve}, and then it goes on about something else."
    assert index.match(doc13) == thirteen.lower()
    assert index.match(doc12) is None
    # punctuation and case inside the n-gram do not hide it
    assert index.match(" ".join(w[0:13]).replace("fox", "Fox,").replace("dog", "dog!")) is not None
    assert DecontamIndex.build([EVAL], n=12).match(doc12) == twelve.lower()


def test_short_eval_texts():
    short = "seven little wizards boxed the jackdaws today"  # 7 words < 13
    index = DecontamIndex.build([short, "a good movie", EVAL], n=13, min_words=5)
    assert index.skipped_short == 1 and index.eval_texts == 3
    assert index.match("Yesterday SEVEN little wizards boxed the jackdaws today, they said.") == short
    assert index.match("seven little wizards boxed the jackdaws") is None  # not the whole item
    assert index.match("This was a good movie.") is None  # shorter than min_words: not indexed


def test_pickle_and_decontaminate():
    index = pickle.loads(pickle.dumps(DecontamIndex.build([EVAL])))
    docs = [{"text": "unrelated story about a cat", "id": 1}, {"text": "Copied: " + EVAL, "id": 2}]
    kept, removed = decontaminate(docs, index)
    assert [d["id"] for d in kept] == [1]
    assert removed[0]["id"] == 2 and removed[0]["reason"] == "decontam"
    assert removed[0]["matched"] == " ".join(words_of(EVAL)[:13]).lower()
    assert DecontamIndex.build([]).match(EVAL) is None
    with pytest.raises(SlmforgeError, match="decontam: n and min_words"):
        DecontamIndex.build([EVAL], n=0)


def test_eval_sets_from_files(tmp_path):
    tsv = tmp_path / "eval.tsv"
    tsv.write_text(f"sentence\tlabel\n{EVAL}\t1\nshort one\t0\n")
    index = DecontamIndex.from_files([tsv], text_field="sentence")
    assert index.eval_texts == 2 and index.skipped_short == 1
    assert index.match(EVAL) is not None
    with pytest.raises(SlmforgeError, match=r"eval\.tsv:1: no column 'text' \(columns: sentence, label\)"):
        DecontamIndex.from_files([tsv])


def test_real_sst2_eval_set():
    f = DATA / "sst2" / "train.tsv"
    if not f.is_file():
        pytest.skip(f"{f} not available")
    from slmforge.data.ingest import iter_documents

    items = [d["text"] for _, d in zip(range(2000), iter_documents(f, split="line"), strict=False)]
    index = DecontamIndex.build(items)
    long_item = next(t for t in items if len(t.split()) >= 20)
    assert index.match("A review we scraped: " + long_item + " -- end.") is not None
    assert index.match("Once upon a time there was a little girl named Lily who loved to play outside.") is None
