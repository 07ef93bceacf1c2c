"""Plain text corpora (text, JSONL, CSV, Parquet: whatever slmforge.data.ingest reads) as {"id", "text"} rows,
for a recipe's data.pretrain_extra: e.g. tinyshakespeare/input.txt or multi30k/train.en.gz of shared/data."""

from __future__ import annotations

from pathlib import Path

from slmforge.data.tasks.splits import source_path, write_splits
from slmforge.errors import SlmforgeError


def prepare_text(data_dir: str | Path, out_dir: str | Path, seed: int = 0, files: list | None = None,
                 split: str = "paragraph", text_field: str = "text", max_docs: int = 0) -> dict:
    """Every document of `files` (paths under the data folder) as train.jsonl, in file order; split: a
    document per "paragraph" (blank-line separated), "line" or "file" of a text file. max_docs: the first
    max_docs documents only (0 for all). No val or test: this is pretraining text."""
    from slmforge.data.ingest import iter_documents

    if not files or not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise SlmforgeError(f"task data text: option files must be a list of paths under the data folder, got {files!r}")
    if max_docs < 0:
        raise SlmforgeError(f"task data text: option max_docs must be >= 0, got {max_docs}")
    paths = [source_path(data_dir, f) for f in files]
    rows = []
    for doc in iter_documents(paths, text_field=text_field, split=split):
        rows.append({"id": f"text-{len(rows)}", "text": doc["text"]})
        if len(rows) == max_docs:
            break
    if not rows:
        raise SlmforgeError(f"task data text: no text in {', '.join(map(str, paths))}")
    return write_splits(out_dir, {"train": rows}, {
        "task": "text", "kind": "text", "seed": seed, "split": split, "documents": len(rows),
        "characters": sum(len(r["text"]) for r in rows), "sources": [str(p) for p in paths]})
