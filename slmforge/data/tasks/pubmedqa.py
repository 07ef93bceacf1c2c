"""PubMedQA (biomedical yes/no/maybe question answering) as classification."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from slmforge.data.tasks.splits import (
    FORMATS,
    check_fmt,
    holdout,
    label_row,
    source_path,
    write_splits,
)
from slmforge.errors import SlmforgeError
from slmforge.io import read_json

PUBMEDQA_LABELS = ("yes", "no", "maybe")
PUBMEDQA_TEMPLATE = "{text}\nAnswer (yes, no or maybe):"


def prepare_pubmedqa(data_dir: str | Path, out_dir: str | Path, seed: int = 0, n_val: int = 50,
                     fmt: str = "classification") -> dict:
    """PubMedQA-L (1,000 expert-labelled questions): the 500 ids of test_ground_truth.json → test, the
    other 500 → train and a stratified val (n_val; 0 for none). Text: question, then the abstract's
    context paragraphs with their section labels; label: final_decision."""
    check_fmt(fmt, FORMATS)
    path = source_path(data_dir, "medical/pubmedqa_ori_pqal.json")
    truth_path = source_path(data_dir, "medical/pubmedqa_test_ground_truth.json")
    data, truth = read_json(path), read_json(truth_path)
    for f, d in ((path, data), (truth_path, truth)):
        if not isinstance(d, dict):
            raise SlmforgeError(f"{f}: expected a JSON object of entries by PubMed id")
    examples = {}
    for pmid, item in data.items():
        try:
            question, contexts, label = item["QUESTION"], item["CONTEXTS"], item["final_decision"]
        except (KeyError, TypeError) as e:
            raise SlmforgeError(f"{path}: entry {pmid}: missing field {e}") from None
        if label not in PUBMEDQA_LABELS:
            raise SlmforgeError(f"{path}: entry {pmid}: final_decision {label!r} is not yes/no/maybe"[:300])
        sections = item.get("LABELS") or [""] * (len(contexts) if isinstance(contexts, list) else 0)
        for key, v in (("QUESTION", [question]), ("CONTEXTS", contexts), ("LABELS", sections)):
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):  # else a TypeError in join
                what = "a string" if key == "QUESTION" else "a list of strings"
                raise SlmforgeError(f"{path}: entry {pmid}: {key} is not {what}")
        if len(sections) != len(contexts):
            raise SlmforgeError(f"{path}: entry {pmid}: {len(sections)} LABELS for {len(contexts)} CONTEXTS")
        context = "\n".join(f"{s.title()}: {c}" if s else c for s, c in zip(sections, contexts, strict=True))
        examples[pmid] = (f"Question: {question}\nContext:\n{context}", label)
    missing = sorted(set(truth) - set(examples))
    if missing:
        raise SlmforgeError(f"{truth_path}: test ids not in {path.name}: {', '.join(missing[:5])}")
    disagree = sorted(pmid for pmid, lab in truth.items() if examples[pmid][1] != lab)
    if disagree:
        raise SlmforgeError(f"{truth_path}: labels differ from {path.name} for ids {', '.join(disagree[:5])}")
    others = [pmid for pmid in examples if pmid not in truth]
    if n_val:
        train_idx, val_idx = holdout([examples[p][1] for p in others], n_val, seed)
    else:
        train_idx, val_idx = list(range(len(others))), []

    def rows(ids):
        return [label_row(f"pubmedqa-{p}", *examples[p], fmt, PUBMEDQA_TEMPLATE) for p in ids]

    splits = {"train": rows([others[i] for i in train_idx]), "val": rows([others[i] for i in val_idx]),
              "test": rows([p for p in examples if p in truth])}
    if not n_val:
        del splits["val"]
    ids = {"train": [others[i] for i in train_idx], "val": [others[i] for i in val_idx],
           "test": [p for p in examples if p in truth]}
    return write_splits(out_dir, splits, {
        "task": "pubmedqa", "kind": "classification", "format": fmt, "seed": seed, "questions": len(examples),
        "labels": {name: Counter(r.get("label") for r in rows) for name, rows in splits.items()},
        "sources": [str(path), str(truth_path)]},
        inputs={name: [examples[p][0] for p in ids[name]] for name in splits})
