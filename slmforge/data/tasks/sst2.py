"""SST-2 (GLUE sentiment): whole sentences held out, the phrases inside them dropped from train."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from slmforge.data.tasks.splits import (
    FORMATS,
    check_fmt,
    holdout,
    label_row,
    read_lines,
    source_path,
    write_splits,
)
from slmforge.errors import SlmforgeError

SST2_TEMPLATE = "Review: {text}\nSentiment (positive or negative):"


def _spans(words: list[str], proper: bool = False) -> list[str]:
    """Every contiguous word span of a phrase (proper: not the whole phrase)."""
    n = len(words)
    return [" ".join(words[i:j]) for i in range(n) for j in range(i + 1, n + 1) if not (proper and j - i == n)]


def prepare_sst2(data_dir: str | Path, out_dir: str | Path, seed: int = 0, n_test: int = 1000, n_val: int = 500,
                 unit: str = "sentence", fmt: str = "classification") -> dict:
    """GLUE SST-2 train.tsv (text<TAB>0|1, header) → train / val / test, labels negative/positive.

    GLUE's train.tsv holds whole review sentences and the sub-phrases of their parse trees, so a random
    held-out phrase is nearly always a word span of a training phrase. unit "sentence" (the default) holds
    out whole sentences — phrases that are a span of no other phrase — stratified, and drops from train
    every phrase that is a span of a held-out sentence: val and test are unseen sentences and nothing of
    theirs is trained on (nor pretrained on: the recipes' in-domain text is train.jsonl). unit "phrase" is
    the old random-phrase split, kept only to measure that leak. Exact duplicates are kept once and texts
    given both labels dropped."""
    check_fmt(fmt, FORMATS)
    if unit not in ("sentence", "phrase"):
        raise SlmforgeError(f"sst2: unit {unit!r}: one of sentence, phrase")
    path = source_path(data_dir, "sst2/train.tsv")
    lines = read_lines(path)
    if not lines or lines[0].split("\t") != ["text", "label"]:
        raise SlmforgeError(f"{path}:1: expected the header 'text<TAB>label'")
    names = {"0": "negative", "1": "positive"}
    first: dict[str, str] = {}
    conflicting = set()
    for lineno, line in enumerate(lines[1:], 2):
        parts = line.split("\t")
        if len(parts) != 2 or parts[1].strip() not in names:
            raise SlmforgeError(f"{path}:{lineno}: expected 'text<TAB>0|1'")
        text, label = parts[0].strip(), names[parts[1].strip()]
        if text in first and first[text] != label:
            conflicting.add(text)
        first.setdefault(text, label)
    examples = [(t, lab) for t, lab in first.items() if t not in conflicting]
    index = {t: i for i, (t, _) in enumerate(examples)}
    inside_other = {index[s] for t, _ in examples for s in _spans(t.split(), proper=True) if s in index}
    pool = list(range(len(examples))) if unit == "phrase" else \
        [i for i in range(len(examples)) if i not in inside_other]
    labels = [examples[i][1] for i in pool]
    rest, test = holdout(labels, n_test, seed)
    val = []
    if n_val:
        rest_val = holdout([labels[i] for i in rest], n_val, seed + 1)[1]
        val = [rest[i] for i in rest_val]
    test_idx, val_idx = [pool[i] for i in test], [pool[i] for i in val]
    held = set(test_idx) | set(val_idx)
    inside_held = set()
    if unit == "sentence":
        inside_held = {index[s] for i in held for s in _spans(examples[i][0].split()) if s in index} - held
    train_idx = [i for i in range(len(examples)) if i not in held and i not in inside_held]

    def rows(idx):
        return [label_row(f"sst2-{i}", examples[i][0], examples[i][1], fmt, SST2_TEMPLATE) for i in idx]

    idx = {"train": train_idx, "val": val_idx, "test": test_idx}
    if not n_val:
        del idx["val"]
    return write_splits(out_dir, {k: rows(v) for k, v in idx.items()}, {
        "task": "sst2", "kind": "classification", "format": fmt, "seed": seed, "unit": unit,
        "sources": [str(path)], "rows_read": len(lines) - 1, "duplicates_dropped": len(lines) - 1 - len(first),
        "conflicting_dropped": len(conflicting), "phrases": len(examples),
        "sentences": len(examples) - len(inside_other), "phrases_inside_held_dropped": len(inside_held),
        "labels": {k: Counter(examples[i][1] for i in v) for k, v in idx.items()}},
        inputs={k: [examples[i][0] for i in v] for k, v in idx.items()})
