"""Translation: Multi30k (general domain) and WMT19 biomedical Medline (medical domain, split by whole
abstract), and the two together for domain transfer."""

from __future__ import annotations

import random
import re
from pathlib import Path

from slmforge.data.tasks.splits import (
    as_row,
    check_fmt,
    drop_held,
    read_lines,
    source_path,
    write_splits,
)
from slmforge.errors import SlmforgeError

LANGUAGES = {"en": "English", "de": "German", "fr": "French"}




def translation_prompt(text: str, source: str, target: str) -> str:
    return f"Translate {LANGUAGES[source]} to {LANGUAGES[target]}:\n{text}\n{LANGUAGES[target]}:"


def _check_pair(source: str, target: str) -> None:
    for lang in (source, target):
        if lang not in LANGUAGES:
            raise SlmforgeError(f"unknown language {lang!r}: one of {', '.join(LANGUAGES)}")
    if source == target:
        raise SlmforgeError(f"source and target language are both {source!r}")


def _aligned(src_path: Path, tgt_path: Path) -> list[tuple[str, str]]:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise SlmforgeError(f"{src_path}: {len(src)} lines but {tgt_path} has {len(tgt)}: not line-aligned")
    return [(s.strip(), t.strip()) for s, t in zip(src, tgt, strict=True)]


def prepare_multi30k(data_dir: str | Path, out_dir: str | Path, seed: int = 0, source: str = "en",
                     target: str = "de", n_val: int = 1000, max_train: int | None = None,
                     fmt: str = "prompt") -> dict:
    """Multi30k task 1 captions: the official val (1,014) → test.jsonl; the official train (29,000) →
    a seeded val of n_val pairs and train.jsonl. Training pairs whose source caption is also a val or test
    caption are dropped. max_train keeps a seeded sample of the training pairs (source order preserved)."""
    check_fmt(fmt, ("prompt", "chat"))
    _check_pair(source, target)
    files = {(split, lang): source_path(data_dir, f"multi30k/{split}.{lang}.gz")
             for split in ("train", "val") for lang in (source, target)}
    train_pairs = _aligned(files["train", source], files["train", target])
    test_pairs = _aligned(files["val", source], files["val", target])
    if not 0 <= n_val < len(train_pairs):
        raise SlmforgeError(f"multi30k: n_val {n_val} must be below {len(train_pairs)}")
    rng = random.Random(seed)
    val_idx = set(rng.sample(range(len(train_pairs)), n_val))
    parts = {"train": [("train", i) for i in range(len(train_pairs)) if i not in val_idx],
             "val": [("train", i) for i in sorted(val_idx)], "test": [("val", i) for i in range(len(test_pairs))]}
    if max_train is not None and max_train < len(parts["train"]):
        parts["train"] = sorted(rng.sample(parts["train"], max_train))
    splits: dict[str, list[dict]] = {}
    inputs: dict[str, list[str]] = {}
    skipped = 0
    for name, keys in parts.items():
        splits[name], inputs[name] = [], []
        for split, i in keys:
            s, t = (train_pairs if split == "train" else test_pairs)[i]
            if not s or not t:
                skipped += 1
                continue
            splits[name].append(as_row(f"multi30k-{split}-{i}", translation_prompt(s, source, target), t, fmt))
            inputs[name].append(s)
    if not n_val:
        del splits["val"], inputs["val"]
    dropped = drop_held(splits, inputs)
    return write_splits(out_dir, splits, {
        "task": "multi30k", "kind": "translation", "pair": f"{source}-{target}", "format": fmt, "seed": seed,
        "max_train": max_train, "empty_pairs_dropped": skipped, "train_dropped_as_held": dropped,
        "sources": sorted(map(str, files.values()))}, inputs)


# A Medline test file is abstracts one after another, sentence-aligned, each starting with a "Title" or
# "Abstract" line and structured ones with section headings ("Background", "RÉSULTATS"): headings are
# short lines with no final punctuation, and are not translation examples.
_DOC_START = {"Title", "Abstract"}
_HEADING = re.compile(r"^(?:\S+\s?){1,4}$")


def _is_heading(en: str) -> bool:
    return bool(_HEADING.match(en)) and not en.rstrip().endswith((".", "?", "!", ":", ";", ")"))


def read_medline_docs(en_path: Path, fr_path: Path) -> list[list[tuple[str, str]]]:
    """The (en, fr) sentence pairs of each abstract in a WMT biomedical Medline test set."""
    docs: list[list[tuple[str, str]]] = []
    for en, fr in _aligned(en_path, fr_path):
        if en in _DOC_START or not docs:
            docs.append([])
        if en and fr and not _is_heading(en):
            docs[-1].append((en, fr))
    return [d for d in docs if d]


def prepare_wmt_biomed(data_dir: str | Path, out_dir: str | Path, seed: int = 0, source: str = "en",
                       target: str = "fr", test_fraction: float = 0.5, val_fraction: float = 0.1,
                       fmt: str = "prompt") -> dict:
    """WMT19 biomedical EN↔FR (both test sets, medline19_en2fr.* and medline19_fr2en.*, pooled) →
    a seeded split by whole abstract into test (in-domain evaluation), val (val_fraction of the abstracts)
    and train (in-domain fine-tuning); training sentences equal to a held-out one are dropped.
    Pair with prepare_multi30k(target="fr") as the general-domain set for a domain-transfer comparison."""
    check_fmt(fmt, ("prompt", "chat"))
    if {source, target} != {"en", "fr"}:
        raise SlmforgeError(f"wmt_biomed is English-French: got {source}-{target}")
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise SlmforgeError(f"test_fraction {test_fraction} and val_fraction {val_fraction}: each in [0, 1), "
                            f"test above 0, sum below 1")
    docs, sources = [], []
    for name in ("medline19_en2fr", "medline19_fr2en"):
        en, fr = (source_path(data_dir, f"medical/wmt_biomed/{name}.{lang}") for lang in ("en", "fr"))
        sources += [str(en), str(fr)]
        docs += [(f"{name}-{d}", pairs) for d, pairs in enumerate(read_medline_docs(en, fr))]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_test = max(1, min(len(docs) - 2, round(test_fraction * len(docs))))
    n_val = min(len(docs) - n_test - 1, round(val_fraction * len(docs)))
    part = {d: "test" for d in order[:n_test]} | {d: "val" for d in order[n_test:n_test + n_val]}
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    inputs: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for d, (doc_id, pairs) in enumerate(docs):
        for j, (en, fr) in enumerate(pairs):
            s, t = (en, fr) if source == "en" else (fr, en)
            name = part.get(d, "train")
            splits[name].append(as_row(f"{doc_id}-{j}", translation_prompt(s, source, target), t, fmt, doc=doc_id))
            inputs[name].append(s)
    if not n_val:
        del splits["val"], inputs["val"]
    dropped = drop_held(splits, inputs)
    return write_splits(out_dir, splits, {
        "task": "wmt_biomed", "kind": "translation", "pair": f"{source}-{target}", "format": fmt,
        "seed": seed, "documents": {"train": len(docs) - n_test - n_val, "val": n_val, "test": n_test},
        "train_dropped_as_held": dropped, "sources": sources}, inputs)


def prepare_translation_domain(data_dir: str | Path, out_dir: str | Path, seed: int = 0,
                               max_general_train: int | None = None, fmt: str = "prompt") -> dict:
    """The EN→FR domain-transfer set: out_dir/general (Multi30k) and out_dir/medical (Medline)."""
    out = Path(out_dir)
    return {"general": prepare_multi30k(data_dir, out / "general", seed, "en", "fr",
                                        max_train=max_general_train, fmt=fmt),
            "medical": prepare_wmt_biomed(data_dir, out / "medical", seed, "en", "fr", fmt=fmt)}
