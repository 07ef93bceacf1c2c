"""Exact and near-duplicate removal: a blake2b hash of normalised text, then MinHash + LSH.

    exact   documents whose words (lowercased, punctuation dropped, whitespace collapsed) are the same
    near    MinHash signatures of word n-gram shingles (datasketch), candidate pairs from MinHashLSH,
            kept when their estimated Jaccard similarity is >= threshold (LSH alone lets some lower
            pairs through), then joined into clusters with union-find

Short documents: one edit removes up to `ngram` shingles, so a 37-word paragraph with one word changed
is at Jaccard ~0.74 with 5-grams and escapes threshold 0.8. For short texts use ngram=3 or threshold
0.7 (recall and precision of each choice on TinyStories: benchmarks/dedup_quality.py).

In every cluster the first document (in input order) is kept and the others are removed, each with
the reason, its cluster id (the index of the kept document) and the id/source of the kept document.

The expensive part, minhash_signature, is a pure function of (text, config): map it over shards with a
multiprocessing Pool (compute_signatures does), then cluster in one process, since the LSH index must
see every document.

Memory per document, for clustering (num_perm=128, threshold 0.8: 14 bands of 9 rows): the signature,
4 * num_perm = 512 bytes, plus the LSH index (a key and a bucket per band) and union-find, 4.7 KB
(tracemalloc peak, benchmarks/dedup_quality.py): about 5.3 KB a document, so 1M documents need ~5 GB of
RAM. The exact-hash table adds ~100 bytes a document; cluster_near_duplicates does not hold the texts.
For much larger corpora, shard by band (as datatrove's MinhashDedup does) or use datasketch's Redis
storage.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from slmforge.errors import SlmforgeError

_SCHEME = "affine32"  # datasketch's default: 32-bit hash values
_EMPTY = np.uint32(0xFFFFFFFF)  # every slot of the signature of an empty set


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # Jaccard similarity of the shingle sets above which documents are duplicates
    ngram: int = 5  # words per shingle
    num_perm: int = 128  # MinHash permutations: more is more precise and slower
    seed: int = 1
    verify: bool = True  # check LSH candidates by their estimated Jaccard similarity
    # (false positive, false negative) weights from which datasketch picks bands x rows. Its default,
    # (0.5, 0.5), puts the LSH S-curve above the threshold (9 x 13 for 0.8: a pair at J = 0.8 is found
    # 40% of the time); candidates are verified, so we trade cheap false candidates for recall:
    # 14 x 9 finds 87% of pairs at J = 0.8 (see benchmarks/dedup_quality.py).
    lsh_weights: tuple[float, float] = (0.1, 0.9)

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise SlmforgeError(f"dedup: threshold must be in (0, 1], got {self.threshold}")
        if self.ngram < 1:
            raise SlmforgeError(f"dedup: ngram must be >= 1, got {self.ngram}")
        if self.num_perm < 2:
            raise SlmforgeError(f"dedup: num_perm must be >= 2, got {self.num_perm}")
        self.lsh_weights = tuple(self.lsh_weights)  # a list from YAML
        if len(self.lsh_weights) != 2 or abs(sum(self.lsh_weights) - 1.0) > 1e-6 or min(self.lsh_weights) < 0:
            raise SlmforgeError(f"dedup: lsh_weights must be two non-negative numbers adding up to 1, "
                                f"got {self.lsh_weights}")

    def lsh_params(self) -> tuple[int, int]:
        """(bands, rows) of the LSH index."""
        from datasketch.lsh import _optimal_param

        return _optimal_param(self.threshold, self.num_perm, *self.lsh_weights)


@dataclass
class DedupResult:
    kept: list[dict]
    kept_indices: list[int]
    removed: list[dict]  # each doc plus reason, cluster, duplicate_of, similarity
    counts: dict[str, int | float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Keys and signatures

_NOT_WORD = re.compile(r"[^\w\s]+")


def words(text: str) -> list[str]:
    """Lowercased words with punctuation removed ("Don't stop!" -> ["dont", "stop"])."""
    return _NOT_WORD.sub("", text.lower()).split()


def exact_key(text: str) -> bytes:
    """16-byte blake2b of the text's words: equal for texts differing only in case, punctuation, spacing."""
    return hashlib.blake2b(" ".join(words(text)).encode("utf-8"), digest_size=16).digest()


def shingles(text: str, n: int) -> set[bytes]:
    """Word n-grams; a text shorter than n words is one shingle of all its words."""
    w = words(text)
    if len(w) <= n:
        return {" ".join(w).encode("utf-8")} if w else set()
    return {" ".join(w[i : i + n]).encode("utf-8") for i in range(len(w) - n + 1)}


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> np.ndarray:
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME).permutations


def minhash_signature(text: str, cfg: DedupConfig) -> np.ndarray:
    """The MinHash of the text's shingles: uint32[num_perm]. Pure and picklable, for a process pool.
    A text without words gets all slots 0xFFFFFFFF, which clustering ignores."""
    from datasketch import MinHash

    m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=_SCHEME,
                permutations=_permutations(cfg.num_perm, cfg.seed))
    m.update_batch(shingles(text, cfg.ngram))
    return m.hashvalues


def compute_signatures(texts: Iterable[str], cfg: DedupConfig, workers: int = 1) -> list[np.ndarray]:
    """minhash_signature of every text, in a pool of `workers` processes when workers > 1."""
    if workers <= 1:
        return [minhash_signature(t, cfg) for t in texts]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        return pool.map(functools.partial(minhash_signature, cfg=cfg), texts, chunksize=256)


# ---------------------------------------------------------------------------------------------------------
# Finding duplicates


def exact_duplicates(texts: Iterable[str]) -> dict[int, int]:
    """{index: index of the first text with the same exact_key} for every text that is not the first."""
    first: dict[bytes, int] = {}
    dupes = {}
    for i, text in enumerate(texts):
        j = first.setdefault(exact_key(text), i)
        if j != i:
            dupes[i] = j
    return dupes


def cluster_near_duplicates(signatures: Sequence[np.ndarray | None] | np.ndarray,
                            cfg: DedupConfig) -> dict[int, tuple[int, float]]:
    """{index: (index of the kept document of its cluster, estimated Jaccard with it)} for every
    near-duplicate; a None signature (e.g. an exact duplicate already removed) or the signature of a
    text without words takes no part. `signatures` may be one uint32 array (documents x num_perm).

    Documents go into the LSH index in order; each first queries it for earlier candidates, keeps
    those whose estimated Jaccard similarity is >= threshold (with cfg.verify) and joins their clusters.
    The root of a cluster is its smallest index, so the first document is the one kept.
    """
    from datasketch import LeanMinHash, MinHashLSH

    n = len(signatures)
    if isinstance(signatures, np.ndarray) and signatures.ndim == 2:  # already one array: no copy
        sigs = signatures
    else:
        sigs = np.full((n, cfg.num_perm), _EMPTY, dtype=np.uint32)
        for i, s in enumerate(signatures):
            if s is not None:
                _check_length(s, cfg)
                sigs[i] = s
    _check_length(sigs[0] if n else np.zeros(cfg.num_perm), cfg)
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=cfg.lsh_weights)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees flat
            i = parent[i]
        return i

    for i in range(n):
        if (sigs[i] == _EMPTY).all():
            continue
        m = LeanMinHash(seed=cfg.seed, hashvalues=sigs[i], scheme=_SCHEME)
        candidates = lsh.query(m)
        if candidates and cfg.verify:
            cand = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
            sim = (sigs[cand] == sigs[i]).mean(axis=1)
            candidates = cand[sim >= cfg.threshold].tolist()
        for j in candidates:
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
        lsh.insert(i, m, check_duplication=False)

    dupes = {}
    for i in range(n):
        root = find(i)
        if root != i:
            dupes[i] = (root, float((sigs[i] == sigs[root]).mean()))
    return dupes


def _check_length(sig: np.ndarray, cfg: DedupConfig) -> None:
    if len(sig) != cfg.num_perm:
        raise SlmforgeError(f"dedup: a signature has {len(sig)} values, the config says num_perm={cfg.num_perm}")


@dataclass
class Duplicate:
    reason: str  # "exact" | "near"
    kept: int  # index of the kept document of its cluster (also the cluster id)
    similarity: float  # estimated Jaccard similarity with the kept document (1.0 for exact)


def duplicate_map(texts: Iterable[str], signatures: Sequence[np.ndarray] | None, cfg: DedupConfig,
                  workers: int = 1) -> dict[int, Duplicate]:
    """Every duplicate by index. Exact duplicates are found first and take no part in near-dedup;
    `signatures` (one per text) are computed here when None, for the exact-unique texts only."""
    texts = list(texts) if signatures is None else texts
    exact = exact_duplicates(texts) if cfg.exact else {}
    near: dict[int, tuple[int, float]] = {}
    if cfg.near:
        # One array for all documents; exact duplicates keep the "no words" signature and are skipped.
        sigs = np.full((len(texts) if signatures is None else len(signatures), cfg.num_perm), _EMPTY, np.uint32)
        todo = [i for i in range(len(sigs)) if i not in exact]
        if signatures is None:
            signatures = compute_signatures((texts[i] for i in todo), cfg, workers)
            todo_sigs = zip(todo, signatures, strict=True)
        else:
            todo_sigs = ((i, signatures[i]) for i in todo)
        for i, sig in todo_sigs:
            _check_length(sig, cfg)
            sigs[i] = sig
        del todo_sigs, signatures  # the list of arrays: sigs holds them now
        near = cluster_near_duplicates(sigs, cfg)
    out = {i: Duplicate("near", kept, sim) for i, (kept, sim) in near.items()}
    for i, j in exact.items():
        # an exact copy of a near-duplicate belongs to the cluster of the document kept for both
        kept = near[j][0] if j in near else j
        out[i] = Duplicate("exact", kept, 1.0 if kept == j else near[j][1])
    return dict(sorted(out.items()))


def find_duplicates(texts: Iterable[str], signatures: Sequence[np.ndarray] | None, cfg: DedupConfig) -> dict[int, str]:
    """{index: "exact" | "near"} for every document to remove (for stages that only need to drop)."""
    return {i: d.reason for i, d in duplicate_map(texts, signatures, cfg).items()}


def dedup_documents(docs: Iterable[dict], cfg: DedupConfig | None = None, workers: int = 1) -> DedupResult:
    """Exact + near dedup of documents {"text", ...} held in memory: the kept ones in order, the removed
    ones with `reason`, `cluster`, `duplicate_of` (the "id", else "source", else index of the kept
    document) and `similarity`, and counts."""
    cfg = cfg or DedupConfig()
    t0 = time.time()
    docs = list(docs)
    dupes = duplicate_map([d["text"] for d in docs], None, cfg, workers)
    kept_indices = [i for i in range(len(docs)) if i not in dupes]

    def name(i: int):
        return docs[i].get("id", docs[i].get("source", i))

    removed = [{**docs[i], "reason": d.reason, "cluster": d.kept, "duplicate_of": name(d.kept),
                "similarity": round(d.similarity, 4)} for i, d in dupes.items()]
    seconds = time.time() - t0
    counts = {
        "docs": len(docs),
        "kept": len(kept_indices),
        "removed_exact": sum(d.reason == "exact" for d in dupes.values()),
        "removed_near": sum(d.reason == "near" for d in dupes.values()),
        "clusters": len({d.kept for d in dupes.values()}),  # clusters of two or more documents
        "seconds": round(seconds, 3),
        "docs_per_s": round(len(docs) / max(seconds, 1e-9), 1),
    }
    return DedupResult([docs[i] for i in kept_indices], kept_indices, removed, counts)
