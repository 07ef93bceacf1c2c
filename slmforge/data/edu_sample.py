"""A labelled sample of real documents for testing and benchmarking the educational-value classifier
when no LLM teacher is at hand.

The labels come from the SOURCE of each document, not from annotators or a teacher model: every
document of a source gets that source's score on the FineWeb-Edu 0-5 scale,

    pubmedqa     4   PubMedQA abstracts (the CONTEXTS of medical/pubmedqa_ori_pqal.json)
    inspec       4   Inspec scientific abstracts, title + abstract (keyphrase/Inspec.zip, docsutf8/*.txt)
    dialogsum    1   everyday two-person dialogues (summarization/dialogsum.dev.jsonl)
    shakespeare  1   passages of the plays (tinyshakespeare/input.txt)
    tinystories  1   children's story paragraphs, three at a time (tinystories/tinystories_valid_part1.txt)
    hdfs         0   8 consecutive HDFS log lines (loghub/HDFS/HDFS_2k.log)

so "F1 at threshold 3" on this sample measures how well a classifier tells expository scientific text
from dialogue, fiction and logs: a proxy for educational value, and an easier task than judging web
pages one by one. The files are the ones ../shared/data/SOURCES.md lists; they are read, never copied.
"""

from __future__ import annotations

import json
import random
import zipfile
from collections.abc import Callable
from pathlib import Path

from slmforge.errors import SlmforgeError


def pubmedqa(data_dir: Path) -> list[str]:
    d = json.loads((data_dir / "medical" / "pubmedqa_ori_pqal.json").read_text(encoding="utf-8"))
    return [" ".join(item["CONTEXTS"]) for _, item in sorted(d.items())]


def inspec(data_dir: Path) -> list[str]:
    out = []
    with zipfile.ZipFile(data_dir / "keyphrase" / "Inspec.zip") as z:
        for name in sorted(n for n in z.namelist() if "/docsutf8/" in n and n.endswith(".txt")):
            lines = [ln.strip() for ln in z.read(name).decode("utf-8").splitlines() if ln.strip()]
            if len(lines) >= 2:  # title, then the abstract wrapped over several lines
                out.append(lines[0] + "\n" + " ".join(lines[1:]))
    return out


def dialogsum(data_dir: Path) -> list[str]:
    path = data_dir / "summarization" / "dialogsum.dev.jsonl"
    return [json.loads(ln)["dialogue"] for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def shakespeare(data_dir: Path, max_chars: int = 800) -> list[str]:
    """Consecutive speeches, cut at a blank line once a passage reaches max_chars."""
    speeches = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").split("\n\n")
    out, cur = [], []
    for s in speeches:
        cur.append(s.strip())
        if sum(map(len, cur)) >= max_chars:
            out.append("\n\n".join(cur))
            cur = []
    return out


def tinystories(data_dir: Path, per_doc: int = 3) -> list[str]:
    text = (data_dir / "tinystories" / "tinystories_valid_part1.txt").read_text(encoding="utf-8")
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    return ["\n\n".join(paras[i:i + per_doc]) for i in range(0, len(paras) - per_doc + 1, per_doc)]


def hdfs(data_dir: Path, per_doc: int = 8) -> list[str]:
    lines = (data_dir / "loghub" / "HDFS" / "HDFS_2k.log").read_text(encoding="utf-8").splitlines()
    return ["\n".join(lines[i:i + per_doc]) for i in range(0, len(lines) - per_doc + 1, per_doc)]


# name -> (reader, score given to every document of the source)
SOURCES: dict[str, tuple[Callable[[Path], list[str]], int]] = {
    "pubmedqa": (pubmedqa, 4),
    "inspec": (inspec, 4),
    "dialogsum": (dialogsum, 1),
    "shakespeare": (shakespeare, 1),
    "tinystories": (tinystories, 1),
    "hdfs": (hdfs, 0),
}


def default_data_dir() -> Path:
    """../shared/data next to the repository checkout."""
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def source_labelled_sample(data_dir: str | Path | None = None, n_per_source: int = 100, seed: int = 0,
                           sources: list[str] | None = None, skip: int = 0) -> list[dict]:
    """Up to n_per_source documents of each source, shuffled with `seed`, as
    {"id": "<source>-<n>", "text", "score", "source"}; `skip` leaves out the first documents of each
    source's shuffled order, so two calls with disjoint (skip, n) ranges give disjoint samples."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    names = sources or list(SOURCES)
    docs = []
    for name in names:
        if name not in SOURCES:
            raise SlmforgeError(f"unknown source {name!r}; choose from {', '.join(SOURCES)}")
        reader, score = SOURCES[name]
        try:
            texts = reader(data_dir)
        except FileNotFoundError as e:
            raise SlmforgeError(f"{e.filename}: missing (source {name!r} of the labelled sample)") from None
        order = list(range(len(texts)))
        random.Random(f"{seed}-{name}").shuffle(order)
        for i in order[skip:skip + n_per_source]:
            docs.append({"id": f"{name}-{i}", "text": texts[i], "score": score, "source": name})
    random.Random(seed).shuffle(docs)
    return docs
