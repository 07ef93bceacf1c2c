"""Decontamination: drop training documents that share a long word n-gram with an evaluation set.

The GPT-3 / phi-1 procedure: texts are lowercased and stripped of punctuation, split into words, and a
document is contaminated when any of its word 13-grams also occurs in an eval text. An eval text shorter
than n words contributes its whole word sequence as one n-gram (a training document containing that
sequence is contaminated), unless it is shorter than `min_words`: a 3-word eval item such as "a good
movie" would otherwise remove every document that says it.

The index is a set of 8-byte hashes of the n-grams (about 70 bytes each in a Python set: 1M eval n-grams
take ~70 MB), picklable, so a process pool can share it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from slmforge.data.dedup import words
from slmforge.errors import SlmforgeError


def _hash(gram: list[str]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(gram).encode("utf-8"), digest_size=8).digest(), "little")


@dataclass
class DecontamIndex:
    n: int = 13
    min_words: int = 8
    hashes: set[int] = field(default_factory=set)
    lengths: set[int] = field(default_factory=set)  # n-gram lengths in the index: n, and shorter eval texts
    eval_texts: int = 0
    skipped_short: int = 0  # eval texts with fewer than min_words words, left out

    @classmethod
    def build(cls, eval_texts: Iterable[str], n: int = 13, min_words: int = 8) -> DecontamIndex:
        """Index every word n-gram of the eval texts (a shorter text: its whole word sequence)."""
        if n < 1 or min_words < 1:
            raise SlmforgeError(f"decontam: n and min_words must be >= 1, got n={n}, min_words={min_words}")
        index = cls(n=n, min_words=min_words)
        for text in eval_texts:
            w = words(text)
            index.eval_texts += 1
            if len(w) < min(n, min_words):
                index.skipped_short += 1
                continue
            k = min(n, len(w))
            index.lengths.add(k)
            index.hashes.update(_hash(w[i : i + k]) for i in range(len(w) - k + 1))
        return index

    @classmethod
    def from_files(cls, paths: str | Path | Iterable[str | Path], n: int = 13, min_words: int = 8,
                   text_field: str = "text", split: str = "line") -> DecontamIndex:
        """Index eval sets from files (any format slmforge.data.ingest reads; one item per line for text)."""
        from slmforge.data.ingest import iter_documents

        return cls.build((d["text"] for d in iter_documents(paths, text_field=text_field, split=split)),
                         n=n, min_words=min_words)

    def match(self, text: str) -> str | None:
        """The first n-gram of `text` found in the eval sets (its normalised words), or None."""
        if not self.hashes:
            return None
        w = words(text)
        for k in sorted(self.lengths, reverse=True):
            for i in range(len(w) - k + 1):
                if _hash(w[i : i + k]) in self.hashes:
                    return " ".join(w[i : i + k])
        return None


def decontaminate(docs: Iterable[dict], index: DecontamIndex) -> tuple[list[dict], list[dict]]:
    """(kept docs, removed docs each with `matched`: the shared n-gram) for documents {"text", ...}."""
    kept, removed = [], []
    for doc in docs:
        hit = index.match(doc["text"])
        if hit is None:
            kept.append(doc)
        else:
            removed.append({**doc, "reason": "decontam", "matched": hit})
    return kept, removed
