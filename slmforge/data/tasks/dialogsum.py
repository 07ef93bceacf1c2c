"""DialogSum (dialogue summarization), optionally with SAMSum's training dialogues."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from slmforge.data.tasks.splits import (
    as_row,
    check_fmt,
    drop_held,
    source_path,
    write_splits,
)
from slmforge.errors import SlmforgeError
from slmforge.io import read_jsonl

DIALOGSUM_TEMPLATE = "Summarize the dialogue.\n{dialogue}\nSummary:"


def read_samsum(path: Path) -> list[dict]:
    """SAMSum's CSV (id, summary, dialogue) as rows; errors name file:line."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"id", "summary", "dialogue"} - set(reader.fieldnames or [])
        if missing:
            raise SlmforgeError(f"{path}: missing columns {sorted(missing)}")
        rows = []
        for row in reader:
            if not (row["dialogue"] or "").strip() or not (row["summary"] or "").strip():
                raise SlmforgeError(f"{path}:{reader.line_num}: empty dialogue or summary")
            rows.append(row)
    return rows


def prepare_dialogsum(data_dir: str | Path, out_dir: str | Path, seed: int = 0, n_test: int = 100,
                      n_val: int = 50, fmt: str = "prompt", add_samsum: bool = False) -> dict:
    """DialogSum dev (500 dialogues) → prompt (dialogue) / completion (summary), seeded test and val splits;
    "topic" kept alongside. add_samsum: also train on SAMSum's 818 validation dialogues (chat-style
    dialogues with abstractive summaries — more of the same task; the test split stays DialogSum's)."""
    check_fmt(fmt, ("prompt", "chat"))
    path = source_path(data_dir, "summarization/dialogsum.dev.jsonl")
    rows = []
    for lineno, obj in enumerate(read_jsonl(path), 1):
        if not isinstance(obj.get("dialogue"), str) or not isinstance(obj.get("summary"), str):
            raise SlmforgeError(f"{path}:{lineno}: needs string fields 'dialogue' and 'summary'")
        rows.append(obj)
    if not (0 < n_test and 0 <= n_val and n_test + n_val < len(rows)):
        raise SlmforgeError(f"n_test {n_test} + n_val {n_val} must be below {len(rows)}, n_test above 0")
    order = random.Random(seed).sample(range(len(rows)), n_test + n_val)
    part = {i: "test" for i in order[:n_test]} | {i: "val" for i in order[n_test:]}
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    inputs: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i, obj in enumerate(rows):
        row = as_row(f"dialogsum-{obj.get('fname', i)}", DIALOGSUM_TEMPLATE.format(dialogue=obj["dialogue"]),
                      obj["summary"].strip(), fmt, topic=obj.get("topic"))
        splits[part.get(i, "train")].append(row)
        inputs[part.get(i, "train")].append(obj["dialogue"])
    sources = [str(path)]
    if add_samsum:
        samsum = source_path(data_dir, "summarization/samsum_val.csv")
        for r in read_samsum(samsum):
            dialogue = r["dialogue"].replace("\r\n", "\n").strip()
            splits["train"].append(as_row(f"samsum-{r['id']}", DIALOGSUM_TEMPLATE.format(dialogue=dialogue),
                                           r["summary"].strip(), fmt, topic=None))
            inputs["train"].append(dialogue)
        sources.append(str(samsum))
    if not n_val:
        del splits["val"], inputs["val"]
    dropped = drop_held(splits, inputs)
    return write_splits(out_dir, splits, {
        "task": "dialogsum", "kind": "summarization", "format": fmt, "seed": seed, "dialogues": len(rows),
        "train_dropped_as_held": dropped, "sources": sources}, inputs)
