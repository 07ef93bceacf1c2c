"""What every task loader shares: the row formats, seeded stratified hold-out, writing the splits (aside,
then swapped into place), and the overlap report that measures how much of a held-out split is already in
train.
"""

from __future__ import annotations

import gzip
import json
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from slmforge.errors import SlmforgeError
from slmforge.io import atomic_write_text, write_dir_atomically, write_json

FORMATS = ("classification", "prompt", "chat")



# ---------------------------------------------------------------------------------------------------------
# Rows and splits


def source_path(data_dir: str | Path, rel: str) -> Path:
    p = Path(data_dir) / rel
    if not p.exists():
        raise SlmforgeError(f"{p}: missing (expected {rel} under the data folder {data_dir})")
    return p


def check_fmt(fmt: str, allowed: Sequence[str]) -> None:
    if fmt not in allowed:
        raise SlmforgeError(f"unknown format {fmt!r}: one of {', '.join(allowed)}")


def as_row(id_: str, prompt: str, completion: str, fmt: str, **extra) -> dict:
    """A prompt/completion example in the requested format, with extra fields kept alongside."""
    if fmt == "chat":
        return {"id": id_, "messages": [{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": completion}], **extra}
    return {"id": id_, "prompt": prompt, "completion": " " + completion, **extra}


def label_row(id_: str, text: str, label: str, fmt: str, template: str) -> dict:
    """A classification example as {"text", "label"}, or as a prompt whose completion is the label."""
    if fmt == "classification":
        return {"id": id_, "text": text, "label": label}
    return as_row(id_, template.format(text=text), label, fmt, label=label)


def holdout(labels: Sequence[str], n_test: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, test), both in source order, with n_test held out, stratified: each label gets
    its share of the test set (largest remainder), drawn by a seeded shuffle within the label."""
    if not 0 < n_test < len(labels):
        raise SlmforgeError(f"test size {n_test} must be between 1 and {len(labels) - 1}")
    by_label = defaultdict(list)
    for i, lab in enumerate(labels):
        by_label[lab].append(i)
    keys = sorted(by_label)
    exact = {k: n_test * len(by_label[k]) / len(labels) for k in keys}
    quota = {k: int(exact[k]) for k in keys}
    for k in sorted(keys, key=lambda k: (quota[k] - exact[k], k))[:n_test - sum(quota.values())]:
        quota[k] += 1
    rng = random.Random(seed)
    test = []
    for k in keys:
        idx = list(by_label[k])
        rng.shuffle(idx)
        test += idx[:quota[k]]
    chosen = set(test)
    return [i for i in range(len(labels)) if i not in chosen], sorted(test)


def write_splits(out_dir: str | Path, splits: dict[str, list[dict]], stats: dict,
                  inputs: dict[str, list[str]] | None = None) -> dict:
    """Write every split and stats.json into a folder beside out_dir, then swap it into place. inputs: the
    raw input of every row per split; each held-out split's overlap_report with train goes into stats."""
    if inputs is not None:
        stats = {**stats, "overlap": {name: overlap_report(inputs["train"], inputs[name])
                                      for name in splits if name != "train" and name in inputs}}
    out = Path(out_dir)
    stats = {**stats, "counts": {name: len(rows) for name, rows in splits.items()}, "out": str(out)}

    def fill(tmp: Path) -> None:
        for name, rows in splits.items():
            atomic_write_text(tmp / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                              for r in rows))
        write_json(tmp / "stats.json", stats)

    write_dir_atomically(out, fill)
    return stats


def read_lines(path: Path) -> list[str]:
    text = read_text(path)
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def read_text(path: Path) -> str:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            return f.read().replace("\r\n", "\n")
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise SlmforgeError(f"{path}: unreadable ({e})") from None


# ---------------------------------------------------------------------------------------------------------
# Leakage: how much of a held-out split is already in train


def normalize(text: str) -> str:
    """Lowercased, whitespace collapsed: the form inputs are compared in."""
    return " ".join(text.lower().split())


def word_ngrams(words: list[str], n: int) -> set[int]:
    """The hashes of every run of n words."""
    return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}


def overlap_report(train: Sequence[str], held: Sequence[str], n: int = 13) -> dict:
    """How much of the held-out inputs `held` the training inputs `train` already hold, on raw inputs
    (not prompts: a shared template is not leakage). exact: equal after normalize(); contained: occurs as a
    word span inside a training input (GLUE SST-2's phrases are spans of its sentences); train_inside_held:
    training inputs that are word spans of a held input (a sub-phrase whose label is seen); ngram: held
    inputs sharing a word n-gram with train (13, GPT-3's contamination check) and the mean share of their
    n-grams that do."""
    train_norm, held_norm = [normalize(t) for t in train], [normalize(h) for h in held]
    train_set = set(train_norm)
    # A word span of s is a substring of " s " bounded by spaces; one string holding every training input
    # between newlines answers "is it a span of some training input" with one substring search.
    train_blob = "\n " + " \n ".join(train_norm) + " \n"
    contained = [h for h in held_norm if h and (h in train_set or f" {h} " in train_blob)]
    held_spans: set[str] = set()
    for h in set(held_norm):
        w = h.split()
        if len(w) <= 64:  # every span of short inputs; long ones only match train inputs exactly
            held_spans.update(" ".join(w[i:j]) for i in range(len(w)) for j in range(i + 1, len(w) + 1))
        else:
            held_spans.add(h)
    train_grams: set[int] = set()
    for t in train_norm:
        train_grams |= word_ngrams(t.split(), n)
    shares = []
    for h in held_norm:
        grams = word_ngrams(h.split(), n)
        if grams:
            shares.append(len(grams & train_grams) / len(grams))
    return {"held": len(held), "train": len(train), "exact": sum(h in train_set for h in held_norm),
            "contained": len(contained), "contained_5plus_words": sum(len(h.split()) >= 5 for h in contained),
            "train_inside_held": sum(t in held_spans for t in train_norm),
            f"with_{n}gram_overlap": sum(s > 0 for s in shares), f"{n}gram_inputs": len(shares),
            f"mean_{n}gram_share": round(sum(shares) / len(shares), 4) if shares else None,
            "examples": [h[:100] for h in contained[:3]]}


def describe_overlap(o: dict) -> str:
    """An overlap_report in one line, as recipes and `slmforge task-data` print it."""
    grams = next((k for k in o if k.startswith("with_") and k.endswith("gram_overlap")), None)
    line = (f"{o['held']} held-out inputs: {o['exact']} verbatim in train, {o['contained']} inside a training "
            f"input ({o['contained_5plus_words']} of 5+ words), {o['train_inside_held']} training inputs inside "
            f"a held-out one")
    if grams:
        n = grams[len("with_"):-len("gram_overlap")]
        line += f", {o[grams]} share a {n}-gram with train (mean share {o.get(f'mean_{n}gram_share')})"
    return line


def overlap_of(data_stats: dict) -> dict:
    """The loader's overlap reports: {"test": ..., "val": ...}, or {"medical/test": ...} for nested sets."""
    if "overlap" in data_stats:
        return data_stats["overlap"]
    return {f"{k}/{name}": o for k, v in data_stats.items() if isinstance(v, dict) and "overlap" in v
            for name, o in v["overlap"].items()}


def drop_held(splits: dict[str, list[dict]], inputs: dict[str, list[str]]) -> int:
    """Remove from train every row whose input equals (after normalize) a val or test input; returns how
    many. A held-out input must not be a training example, whatever else the loader does."""
    held = {normalize(x) for name, xs in inputs.items() if name != "train" for x in xs}
    keep = [i for i, x in enumerate(inputs["train"]) if normalize(x) not in held]
    dropped = len(inputs["train"]) - len(keep)
    splits["train"] = [splits["train"][i] for i in keep]
    inputs["train"] = [inputs["train"][i] for i in keep]
    return dropped
