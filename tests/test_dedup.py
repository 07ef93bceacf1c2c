"""Exact and MinHash near-duplicate removal."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from slmforge.data.dedup import (
    DedupConfig,
    cluster_near_duplicates,
    compute_signatures,
    dedup_documents,
    exact_key,
    find_duplicates,
    minhash_signature,
    shingles,
)
from slmforge.errors import SlmforgeError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOCAB = [f"word{i}" for i in range(3000)]


def text_of(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb)


def test_exact_key_ignores_case_punctuation_and_spacing():
    assert exact_key("Hello, world!\n\nHow are  you?") == exact_key("hello world how are you")
    assert exact_key("hello world") != exact_key("hello word")
    assert len(exact_key("x")) == 16


def test_shingles():
    assert shingles("A b, c d e f", 5) == {b"a b c d e", b"b c d e f"}
    assert shingles("Too short.", 5) == {b"too short"}
    assert shingles("...", 5) == set()


def test_exact_and_near_duplicates_are_removed():
    a, b, c = text_of(100, 1), text_of(100, 2), text_of(100, 3)
    w = a.split()
    w[40:42] = ["changed", "phrase"]  # a two-word edit in a 100-word text
    near = " ".join(w)
    assert 0.85 < jaccard(a, near) < 0.9
    exact = "  " + b.upper().replace(" ", "\n ", 3) + " !"
    docs = [{"text": a, "id": "a"}, {"text": b, "source": "f:2"}, {"text": near, "id": "a-edit"},
            {"text": c, "id": "c"}, {"text": exact, "id": "b-copy"}]
    r = dedup_documents(docs, DedupConfig())
    assert r.kept_indices == [0, 1, 3] and [d.get("id") for d in r.kept] == ["a", None, "c"]
    by_id = {d["id"]: d for d in r.removed}
    assert by_id["a-edit"]["reason"] == "near" and by_id["a-edit"]["cluster"] == 0
    assert by_id["a-edit"]["duplicate_of"] == "a" and by_id["a-edit"]["similarity"] >= 0.8
    assert by_id["b-copy"]["reason"] == "exact" and by_id["b-copy"]["cluster"] == 1
    assert by_id["b-copy"]["duplicate_of"] == "f:2"  # no id: the source names the kept document
    assert r.counts["removed_exact"] == 1 and r.counts["removed_near"] == 1 and r.counts["clusters"] == 2
    assert r.counts["kept"] == 3 and r.counts["docs"] == 5

    # Switched off one at a time.
    assert dedup_documents(docs, DedupConfig(near=False)).kept_indices == [0, 1, 2, 3]
    assert dedup_documents(docs, DedupConfig(exact=False)).removed[-1]["reason"] == "near"  # the copy is near too
    # A larger edit (10% of the words) is below the 0.8 threshold: kept.
    w = a.split()
    for i in range(5, 100, 10):
        w[i] = "other"
    assert jaccard(a, " ".join(w)) < 0.5
    assert dedup_documents([{"text": a}, {"text": " ".join(w)}]).counts["kept"] == 2


def test_exact_copy_of_a_near_duplicate_joins_its_cluster():
    a = text_of(100, 5)
    w = a.split()
    w[50] = "edited"
    near = " ".join(w)
    r = dedup_documents([{"text": a, "id": "a"}, {"text": near, "id": "n"}, {"text": near.title(), "id": "n2"}])
    assert r.kept_indices == [0]
    assert [(d["id"], d["reason"], d["cluster"], d["duplicate_of"]) for d in r.removed] == [
        ("n", "near", 0, "a"), ("n2", "exact", 0, "a")]


def test_signature_is_deterministic_picklable_and_the_same_in_a_pool():
    cfg = DedupConfig(num_perm=64)
    texts = [text_of(30, s) for s in range(6)]
    serial = compute_signatures(texts, cfg)
    assert serial[0].dtype == np.uint32 and serial[0].shape == (64,)
    assert np.array_equal(serial[0], minhash_signature(texts[0], cfg))
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    pooled = compute_signatures(texts, cfg, workers=2)  # spawned processes: no shared hash seed
    assert all(np.array_equal(a, b) for a, b in zip(serial, pooled, strict=True))
    assert not np.array_equal(serial[0], minhash_signature(texts[0], DedupConfig(num_perm=64, seed=2)))


def test_verification_drops_lsh_false_positives():
    # Two signatures equal in the first 13 rows (band 0 is rows 0..8 of 14 bands x 9): LSH makes them
    # candidates, but they agree in 13 of 128 slots (estimated Jaccard 0.1).
    cfg = DedupConfig()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**32 - 1, 128, dtype=np.uint32)
    b = rng.integers(0, 2**32 - 1, 128, dtype=np.uint32)
    b[:13] = a[:13]
    assert cluster_near_duplicates([a, b], cfg) == {}
    assert cluster_near_duplicates([a, b], DedupConfig(verify=False)) == {1: (0, pytest.approx(13 / 128))}


def test_clusters_are_transitive_and_keep_the_first():
    cfg = DedupConfig()
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2**32 - 1, 128, dtype=np.uint32)
    b, c = a.copy(), a.copy()
    b[60:80] = 1  # a~b: 108/128 = 0.84
    c[60:80], c[90:110] = 1, 2  # b~c 0.84, a~c 88/128 = 0.69 < 0.8: joined through b
    other = rng.integers(0, 2**32 - 1, 128, dtype=np.uint32)
    dupes = cluster_near_duplicates([other, a, None, b, c], cfg)
    assert dupes == {3: (1, 108 / 128), 4: (1, 88 / 128)}
    assert find_duplicates(["x", "y", "z", "v", "w"], [other, a, other, b, c], cfg) == {2: "near", 3: "near",
                                                                                           4: "near"}


def test_texts_without_words_are_not_near_duplicates():
    cfg = DedupConfig()
    sigs = [minhash_signature(t, cfg) for t in ["", "...", text_of(20, 1)]]
    assert cluster_near_duplicates(sigs, cfg) == {}


def test_config_errors():
    for bad in ({"threshold": 0}, {"threshold": 1.5}, {"ngram": 0}, {"num_perm": 1}):
        with pytest.raises(SlmforgeError, match="dedup: "):
            DedupConfig(**bad)
    with pytest.raises(SlmforgeError, match="num_perm=128"):
        cluster_near_duplicates([np.zeros(64, np.uint32)], DedupConfig())


def test_real_tinystories_copies_are_found():
    f = DATA / "tinystories" / "tinystories_valid_part1.txt"
    if not f.is_file():
        pytest.skip(f"{f} not available")
    from slmforge.data.ingest import iter_documents

    docs = [d for d in iter_documents(f) if len(d["text"].split()) >= 80][:150]
    rng = random.Random(0)
    copies = []
    for d in rng.sample(docs, 20):
        w = d["text"].split()
        w[rng.randrange(len(w))] = "banana"
        copies.append({"text": " ".join(w), "source": "copy"})
    r = dedup_documents(docs + copies)
    removed_copies = [d for d in r.removed if d["source"] == "copy"]
    assert len(removed_copies) == 20
    assert len(r.removed) - len(removed_copies) <= 3  # the originals are (almost all) distinct stories
