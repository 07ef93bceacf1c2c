"""Inspec (keyphrase generation and extraction from scientific abstracts)."""

from __future__ import annotations

import random
import re
import zipfile
from pathlib import Path

from slmforge.data.tasks.splits import (
    as_row,
    check_fmt,
    drop_held,
    source_path,
    write_splits,
)
from slmforge.errors import SlmforgeError

INSPEC_TEMPLATE = ("Give the keyphrases of this abstract, separated by semicolons.\n"
                   "{title}\n{abstract}\nKeyphrases:")


def _inspec_paragraphs(raw: str) -> list[str]:
    """Inspec text: a paragraph per line, wrapped lines continue with a tab; CRLF and LF both occur."""
    paras: list[str] = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        if line[0] in " \t" and paras:
            paras[-1] += " " + " ".join(line.split())
        else:
            paras.append(" ".join(line.split()))
    return paras


def read_inspec(zip_path: Path) -> list[dict]:
    """Every Inspec document in the zip (not extracted) as {"id", "title", "abstract", "keyphrases"},
    in numeric id order. A key file has one keyphrase a line (tabs and CRLF are wrapping leftovers)."""
    try:
        z = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise SlmforgeError(f"{zip_path}: not a zip file") from None
    with z:
        names = set(z.namelist())
        docs = []
        for name in names:
            m = re.fullmatch(r"(.*)docsutf8/([^/]+)\.txt", name)
            if not m:
                continue
            key_name = f"{m[1]}keys/{m[2]}.key"
            if key_name not in names:
                raise SlmforgeError(f"{zip_path}: {name} has no {key_name}")
            paras = _inspec_paragraphs(z.read(name).decode("utf-8"))
            if not paras:
                raise SlmforgeError(f"{zip_path}: {name} is empty")
            seen, keys = set(), []
            for line in z.read(key_name).decode("utf-8").splitlines():
                key = " ".join(line.split())
                if key and key.lower() not in seen:
                    seen.add(key.lower())
                    keys.append(key)
            docs.append({"id": m[2], "title": paras[0], "abstract": " ".join(paras[1:]), "keyphrases": keys})
    if not docs:
        raise SlmforgeError(f"{zip_path}: no docsutf8/*.txt documents")
    return sorted(docs, key=lambda d: (len(d["id"]), d["id"]))


def prepare_inspec(data_dir: str | Path, out_dir: str | Path, seed: int = 0, n_test: int = 500,
                   n_val: int = 100, fmt: str = "prompt") -> dict:
    """Inspec (Hulth 2003; 2,000 abstracts) → prompt (title + abstract) / completion (gold keyphrases
    joined with "; "), gold list kept as "keyphrases"; seeded test (500) and val (100; 0 for none) splits."""
    check_fmt(fmt, ("prompt", "chat"))
    path = source_path(data_dir, "keyphrase/Inspec.zip")
    docs = read_inspec(path)
    if not 0 < n_test + n_val < len(docs):
        raise SlmforgeError(f"n_test + n_val = {n_test + n_val}: must be below {len(docs)}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    part = {i: "test" for i in order[:n_test]} | {i: "val" for i in order[n_test:n_test + n_val]}
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    inputs: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i, d in enumerate(docs):
        prompt = INSPEC_TEMPLATE.format(title=d["title"], abstract=d["abstract"])
        completion = "; ".join(k.replace(";", ",") for k in d["keyphrases"])  # ";" is the separator
        splits[part.get(i, "train")].append(
            as_row(f"inspec-{d['id']}", prompt, completion, fmt, keyphrases=d["keyphrases"]))
        inputs[part.get(i, "train")].append(f"{d['title']} {d['abstract']}")
    if not n_val:
        del splits["val"], inputs["val"]
    dropped = drop_held(splits, inputs)
    return write_splits(out_dir, splits, {
        "task": "inspec", "kind": "keyphrase", "format": fmt, "seed": seed, "documents": len(docs),
        "keyphrases": sum(len(d["keyphrases"]) for d in docs), "train_dropped_as_held": dropped,
        "sources": [str(path)]}, inputs)
