"""Real task data sets as slmforge task JSONL: one `prepare_<name>(data_dir, out_dir, seed)` per source.

data_dir is the folder holding the sources as laid out in shared/data/SOURCES.md (sst2/train.tsv,
multi30k/, medical/, loghub/, keyphrase/Inspec.zip, summarization/). Each loader writes

    out_dir/train.jsonl, [val.jsonl], test.jsonl    one example a line, each with a stable "id"
    out_dir/stats.json                               counts, sources, seed, options (returned too)

in one of three row formats (`fmt`):

    classification   {"id", "text", "label"}
    prompt           {"id", "prompt", "completion", ...}       completion starts with a space (TRL style)
    chat             {"id", "messages": [{"role": "user", ...}, {"role": "assistant", ...}], ...}

Prompt and chat rows keep the fields the metrics need next to them ("label", "keyphrases"), so a
test file is also the reference file of `evaluate_predictions`. Splits are seeded and deterministic
(same sources + seed = byte-identical files), stratified by label where there is one, and made at the
level that avoids leakage (a whole abstract, a whole session). The folder is written aside and swapped
into place, so a failed run leaves the previous output untouched.
"""

from __future__ import annotations

import csv
import gzip
import inspect
import json
import random
import re
import shutil
import tempfile
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from slmforge.errors import SlmforgeError
from slmforge.io import atomic_write_text, read_json, read_jsonl, swap_dir_into_place, write_json

FORMATS = ("classification", "prompt", "chat")
LANGUAGES = {"en": "English", "de": "German", "fr": "French"}


# ---------------------------------------------------------------------------------------------------------
# Shared helpers


def _source(data_dir: str | Path, rel: str) -> Path:
    p = Path(data_dir) / rel
    if not p.exists():
        raise SlmforgeError(f"{p}: missing (expected {rel} under the data folder {data_dir})")
    return p


def _check_fmt(fmt: str, allowed: Sequence[str]) -> None:
    if fmt not in allowed:
        raise SlmforgeError(f"unknown format {fmt!r}: one of {', '.join(allowed)}")


def _as_row(id_: str, prompt: str, completion: str, fmt: str, **extra) -> dict:
    """A prompt/completion example in the requested format, with extra fields kept alongside."""
    if fmt == "chat":
        return {"id": id_, "messages": [{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": completion}], **extra}
    return {"id": id_, "prompt": prompt, "completion": " " + completion, **extra}


def _label_row(id_: str, text: str, label: str, fmt: str, template: str) -> dict:
    """A classification example as {"text", "label"}, or as a prompt whose completion is the label."""
    if fmt == "classification":
        return {"id": id_, "text": text, "label": label}
    return _as_row(id_, template.format(text=text), label, fmt, label=label)


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


def _write_splits(out_dir: str | Path, splits: dict[str, list[dict]], stats: dict,
                  inputs: dict[str, list[str]] | None = None) -> dict:
    """Write every split and stats.json into a folder beside out_dir, then swap it into place. inputs: the
    raw input of every row per split; each held-out split's overlap_report with train goes into stats."""
    if inputs is not None:
        stats = {**stats, "overlap": {name: overlap_report(inputs["train"], inputs[name])
                                      for name in splits if name != "train" and name in inputs}}
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, rows in splits.items():
            atomic_write_text(tmp / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                              for r in rows))
        stats = {**stats, "counts": {name: len(rows) for name, rows in splits.items()}, "out": str(out)}
        write_json(tmp / "stats.json", stats)
        swap_dir_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def _lines(path: Path) -> list[str]:
    text = _read_text(path)
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _read_text(path: Path) -> str:
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


def _word_ngrams(words: list[str], n: int) -> set[int]:
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
        train_grams |= _word_ngrams(t.split(), n)
    shares = []
    for h in held_norm:
        grams = _word_ngrams(h.split(), n)
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


# ---------------------------------------------------------------------------------------------------------
# SST-2 (sentiment classification)

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
    _check_fmt(fmt, FORMATS)
    if unit not in ("sentence", "phrase"):
        raise SlmforgeError(f"sst2: unit {unit!r}: one of sentence, phrase")
    path = _source(data_dir, "sst2/train.tsv")
    lines = _lines(path)
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
        return [_label_row(f"sst2-{i}", examples[i][0], examples[i][1], fmt, SST2_TEMPLATE) for i in idx]

    idx = {"train": train_idx, "val": val_idx, "test": test_idx}
    if not n_val:
        del idx["val"]
    return _write_splits(out_dir, {k: rows(v) for k, v in idx.items()}, {
        "task": "sst2", "kind": "classification", "format": fmt, "seed": seed, "unit": unit,
        "sources": [str(path)], "rows_read": len(lines) - 1, "duplicates_dropped": len(lines) - 1 - len(first),
        "conflicting_dropped": len(conflicting), "phrases": len(examples),
        "sentences": len(examples) - len(inside_other), "phrases_inside_held_dropped": len(inside_held),
        "labels": {k: Counter(examples[i][1] for i in v) for k, v in idx.items()}},
        inputs={k: [examples[i][0] for i in v] for k, v in idx.items()})


# ---------------------------------------------------------------------------------------------------------
# Translation: Multi30k (general domain) and WMT19 biomedical Medline (medical domain)


def translation_prompt(text: str, source: str, target: str) -> str:
    return f"Translate {LANGUAGES[source]} to {LANGUAGES[target]}:\n{text}\n{LANGUAGES[target]}:"


def _check_pair(source: str, target: str) -> None:
    for lang in (source, target):
        if lang not in LANGUAGES:
            raise SlmforgeError(f"unknown language {lang!r}: one of {', '.join(LANGUAGES)}")
    if source == target:
        raise SlmforgeError(f"source and target language are both {source!r}")


def _aligned(src_path: Path, tgt_path: Path) -> list[tuple[str, str]]:
    src, tgt = _lines(src_path), _lines(tgt_path)
    if len(src) != len(tgt):
        raise SlmforgeError(f"{src_path}: {len(src)} lines but {tgt_path} has {len(tgt)}: not line-aligned")
    return [(s.strip(), t.strip()) for s, t in zip(src, tgt, strict=True)]


def prepare_multi30k(data_dir: str | Path, out_dir: str | Path, seed: int = 0, source: str = "en",
                     target: str = "de", n_val: int = 1000, max_train: int | None = None,
                     fmt: str = "prompt") -> dict:
    """Multi30k task 1 captions: the official val (1,014) → test.jsonl; the official train (29,000) →
    a seeded val of n_val pairs and train.jsonl. Training pairs whose source caption is also a val or test
    caption are dropped. max_train keeps a seeded sample of the training pairs (source order preserved)."""
    _check_fmt(fmt, ("prompt", "chat"))
    _check_pair(source, target)
    files = {(split, lang): _source(data_dir, f"multi30k/{split}.{lang}.gz")
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
            splits[name].append(_as_row(f"multi30k-{split}-{i}", translation_prompt(s, source, target), t, fmt))
            inputs[name].append(s)
    if not n_val:
        del splits["val"], inputs["val"]
    dropped = drop_held(splits, inputs)
    return _write_splits(out_dir, splits, {
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
    _check_fmt(fmt, ("prompt", "chat"))
    if {source, target} != {"en", "fr"}:
        raise SlmforgeError(f"wmt_biomed is English-French: got {source}-{target}")
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise SlmforgeError(f"test_fraction {test_fraction} and val_fraction {val_fraction}: each in [0, 1), "
                            f"test above 0, sum below 1")
    docs, sources = [], []
    for name in ("medline19_en2fr", "medline19_fr2en"):
        en, fr = (_source(data_dir, f"medical/wmt_biomed/{name}.{lang}") for lang in ("en", "fr"))
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
            splits[name].append(_as_row(f"{doc_id}-{j}", translation_prompt(s, source, target), t, fmt, doc=doc_id))
            inputs[name].append(s)
    if not n_val:
        del splits["val"], inputs["val"]
    dropped = drop_held(splits, inputs)
    return _write_splits(out_dir, splits, {
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


# ---------------------------------------------------------------------------------------------------------
# PubMedQA (biomedical yes/no/maybe question answering as classification)

PUBMEDQA_LABELS = ("yes", "no", "maybe")
PUBMEDQA_TEMPLATE = "{text}\nAnswer (yes, no or maybe):"


def prepare_pubmedqa(data_dir: str | Path, out_dir: str | Path, seed: int = 0, n_val: int = 50,
                     fmt: str = "classification") -> dict:
    """PubMedQA-L (1,000 expert-labelled questions): the 500 ids of test_ground_truth.json → test, the
    other 500 → train and a stratified val (n_val; 0 for none). Text: question, then the abstract's
    context paragraphs with their section labels; label: final_decision."""
    _check_fmt(fmt, FORMATS)
    path = _source(data_dir, "medical/pubmedqa_ori_pqal.json")
    truth_path = _source(data_dir, "medical/pubmedqa_test_ground_truth.json")
    data, truth = read_json(path), read_json(truth_path)
    examples = {}
    for pmid, item in data.items():
        try:
            question, contexts, label = item["QUESTION"], item["CONTEXTS"], item["final_decision"]
        except (KeyError, TypeError) as e:
            raise SlmforgeError(f"{path}: entry {pmid}: missing field {e}") from None
        if label not in PUBMEDQA_LABELS:
            raise SlmforgeError(f"{path}: entry {pmid}: final_decision {label!r} is not yes/no/maybe")
        sections = item.get("LABELS") or [""] * len(contexts)
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
        return [_label_row(f"pubmedqa-{p}", *examples[p], fmt, PUBMEDQA_TEMPLATE) for p in ids]

    splits = {"train": rows([others[i] for i in train_idx]), "val": rows([others[i] for i in val_idx]),
              "test": rows([p for p in examples if p in truth])}
    if not n_val:
        del splits["val"]
    ids = {"train": [others[i] for i in train_idx], "val": [others[i] for i in val_idx],
           "test": [p for p in examples if p in truth]}
    return _write_splits(out_dir, splits, {
        "task": "pubmedqa", "kind": "classification", "format": fmt, "seed": seed, "questions": len(examples),
        "labels": {name: Counter(r.get("label") for r in rows) for name, rows in splits.items()},
        "sources": [str(path), str(truth_path)]},
        inputs={name: [examples[p][0] for p in ids[name]] for name in splits})


# ---------------------------------------------------------------------------------------------------------
# HDFS logs: DeepLog sessions for anomaly detection, and a template parser for raw lines


def _session_row(id_: str, events: list[int], label: str | None = None) -> dict:
    """A session as text for a next-event LM ("E5 E5 E22 ..."; ids as in loghub's HDFS_templates.csv)."""
    row = {"id": id_, "text": " ".join(f"E{e}" for e in events), "events": events}
    return row if label is None else {**row, "label": label}


def _read_sessions(path: Path) -> list[list[int]]:
    sessions = []
    for lineno, line in enumerate(_lines(path), 1):
        try:
            sessions.append([int(t) for t in line.split()])
        except ValueError:
            raise SlmforgeError(f"{path}:{lineno}: expected space-separated event ids") from None
    return sessions


def prepare_hdfs(data_dir: str | Path, out_dir: str | Path, seed: int = 0, n_test_normal: int = 1000,
                 abnormal_per_normal: float = 1.0, n_val: int = 500) -> dict:
    """DeepLog's HDFS block sessions. hdfs_train (4,855 normal sessions) → a seeded hold-out of
    n_test_normal sessions for test and n_val for val, the rest to train the next-event LM on normal
    behaviour only.

    Normal HDFS sessions repeat a few shapes (4,855 sessions, 839 distinct), so most held-out sessions
    occur verbatim in train: a model that memorised train calls them normal without having learned
    anything. test.jsonl and val.jsonl therefore hold each distinct held-out normal session once, and only
    those found in no training session; the ones seen in train are written once each to test_seen.jsonl
    and counted apart in stats.json. Each gets round(abnormal_per_normal * its normal count) distinct
    sessions of hdfs_test_abnormal (16,838 sessions, 4,123 distinct), labelled "anomalous", val and test
    disjoint. Rows: {"id", "text", "events", "label"}.

    DeepLog flags a test session as anomalous when any of its events is not among the model's top-g
    predictions given the events before it; evaluate with binary_metrics(positive="anomalous")."""
    normal_path = _source(data_dir, "loghub/deeplog_hdfs_sessions/hdfs_train")
    abnormal_path = _source(data_dir, "loghub/deeplog_hdfs_sessions/hdfs_test_abnormal")
    normal, abnormal = _read_sessions(normal_path), _read_sessions(abnormal_path)
    if not 0 < n_test_normal + n_val < len(normal):
        raise SlmforgeError(f"n_test_normal + n_val = {n_test_normal + n_val}: must be below {len(normal)}")
    rng = random.Random(seed)
    order = list(range(len(normal)))
    rng.shuffle(order)
    test_pool, val_pool = sorted(order[:n_test_normal]), sorted(order[n_test_normal:n_test_normal + n_val])
    held = set(test_pool) | set(val_pool)
    train = [i for i in range(len(normal)) if i not in held]
    seen = {tuple(normal[i]) for i in train}

    def distinct(pool: list[int], exclude: set) -> tuple[list[int], list[int]]:
        """First occurrence of each distinct session in pool: (unseen in train, seen in train)."""
        firsts, got = [], set(exclude)
        for i in pool:
            if tuple(normal[i]) not in got:
                got.add(tuple(normal[i]))
                firsts.append(i)
        return [i for i in firsts if tuple(normal[i]) not in seen], [i for i in firsts if tuple(normal[i]) in seen]

    test_normal, test_seen = distinct(test_pool, set())
    val_normal, _ = distinct(val_pool, {tuple(normal[i]) for i in test_pool})
    firsts: dict[tuple, int] = {}
    for i, s in enumerate(abnormal):
        if tuple(s) not in seen:
            firsts.setdefault(tuple(s), i)
    abnormal_idx = sorted(firsts.values())
    n_abn_test, n_abn_val = round(abnormal_per_normal * len(test_normal)), round(abnormal_per_normal * len(val_normal))
    if n_abn_test + n_abn_val > len(abnormal_idx):
        raise SlmforgeError(f"{n_abn_test + n_abn_val} distinct abnormal sessions asked, {abnormal_path} has "
                            f"{len(abnormal_idx)}")
    picked = rng.sample(abnormal_idx, n_abn_test + n_abn_val)
    test_abnormal, val_abnormal = sorted(picked[:n_abn_test]), sorted(picked[n_abn_test:])
    splits = {
        "train": [_session_row(f"hdfs-normal-{i}", normal[i]) for i in train],
        "val": [_session_row(f"hdfs-normal-{i}", normal[i], "normal") for i in val_normal]
        + [_session_row(f"hdfs-abnormal-{i}", abnormal[i], "anomalous") for i in val_abnormal],
        "test": [_session_row(f"hdfs-normal-{i}", normal[i], "normal") for i in test_normal]
        + [_session_row(f"hdfs-abnormal-{i}", abnormal[i], "anomalous") for i in test_abnormal],
        "test_seen": [_session_row(f"hdfs-normal-{i}", normal[i], "normal") for i in test_seen],
    }
    if not n_val:
        del splits["val"]
    events = Counter(e for s in normal for e in s)
    inputs = {name: [r["text"] for r in rows] for name, rows in splits.items()}
    return _write_splits(out_dir, splits, {
        "task": "hdfs", "kind": "anomaly", "seed": seed, "normal_sessions": len(normal),
        "abnormal_sessions": len(abnormal), "distinct_normal": len(set(map(tuple, normal))),
        "distinct_abnormal": len(abnormal_idx),
        "held_normal": {"test": len(test_pool), "val": len(val_pool)},
        "test_normal_distinct": {"unseen_in_train": len(test_normal), "seen_in_train": len(test_seen),
                                 "duplicates_dropped": len(test_pool) - len(test_normal) - len(test_seen)},
        "test_labels": {"normal": len(test_normal), "anomalous": n_abn_test},
        "val_labels": {"normal": len(val_normal), "anomalous": n_abn_val},
        "train_event_vocab": sorted(events), "empty_sessions": sum(1 for s in normal + abnormal if not s),
        "sources": [str(normal_path), str(abnormal_path)]}, inputs)


# "081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_38 terminating"
_HDFS_LINE = re.compile(r"^(?P<date>\d{6}) (?P<time>\d{6}) (?P<pid>\d+) (?P<level>[A-Z]+) "
                        r"(?P<component>[^:]+): (?P<content>.*)$")
# Variable parts, masked in this order (Drain's HDFS preprocessing, plus loghub's template conventions).
_MASKS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"blk_-?\d+"), "blk_<*>"),                            # block ids
    (re.compile(r"(?:blk_<\*>\s*){2,}"), "blk_<*>"),                   # a list of blocks is one field
    (re.compile(r"\d{1,3}(?:\.\d{1,3}){3}"), "<*>"),                  # IPv4 (the port is a number below)
    (re.compile(r"/[^\s/]+(?:/[^\s/]+)*/(?=[^\s/]+)"), "/<*>/"),       # directories of a path, file kept
    (re.compile(r"(?<![\w<*>])-?\d+(?![\w])"), "<*>"),                # standalone numbers
    (re.compile(r"(?<=[-_])\d+(?![\w])"), "<*>"),                     # numbered names: part-00296
]


def hdfs_template(content: str) -> str:
    """The event template of an HDFS log message: variables (blocks, addresses, paths, numbers) as <*>."""
    for pattern, repl in _MASKS:
        content = pattern.sub(repl, content)
    return content


def parse_hdfs_lines(path: str | Path, templates: dict[str, str] | None = None) -> list[dict]:
    """Parse raw HDFS log lines into header fields, content and event template.

    templates ({template: event_id}, e.g. read from a loghub *_templates.csv) names the events it
    knows; other templates get ids "T1", "T2", ... by first appearance. A line that is not an HDFS
    log line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise SlmforgeError(f"{path}: no such file")
    known = dict(templates or {})
    new_ids: dict[str, str] = {}
    parsed = []
    for lineno, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        m = _HDFS_LINE.match(line)
        if not m:
            raise SlmforgeError(f"{path}:{lineno}: not an HDFS log line (date time pid level component: ...)")
        template = hdfs_template(m["content"])
        if template not in known:
            known[template] = new_ids.setdefault(template, f"T{len(new_ids) + 1}")
        parsed.append({"line": lineno, **m.groupdict(), "template": template, "event_id": known[template]})
    return parsed


def read_loghub_csv(path: str | Path, columns: Sequence[str]) -> list[dict]:
    """Rows of a loghub *_structured.csv or *_templates.csv, checking the columns named are there."""
    path = Path(path)
    if not path.is_file():
        raise SlmforgeError(f"{path}: no such file")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        lacking = [c for c in columns if c not in (reader.fieldnames or [])]
        if lacking:
            raise SlmforgeError(f"{path}:1: missing columns {', '.join(lacking)}")
        return list(reader)


def _wildcard_regex(template: str) -> re.Pattern:
    """A loghub template ("<*>Receiving block<*>src:<*>dest:<*>") as a regex, <*> matching anything."""
    return re.compile(".*?".join(map(re.escape, template.split("<*>"))))


def hdfs_sessions_from_log(log_path: str | Path, templates_csv: str | Path) -> dict[str, list[int]]:
    """Raw HDFS lines → DeepLog sessions: {block id: [event id, ...]} in log order, event ids from
    loghub's whole-HDFS HDFS_templates.csv (the numbering of hdfs_train), so a model trained by
    prepare_hdfs can score raw logs. A line naming several blocks adds its event to each; a line that
    matches no template is an error naming it."""
    table = read_loghub_csv(templates_csv, ["EventId", "EventTemplate"])
    patterns = [(int(r["EventId"].lstrip("E")), _wildcard_regex(r["EventTemplate"])) for r in table]
    sessions: dict[str, list[int]] = {}
    for p in parse_hdfs_lines(log_path):
        event = next((e for e, rx in patterns if rx.fullmatch(p["content"])), None)
        if event is None:
            raise SlmforgeError(f"{log_path}:{p['line']}: matches no template in {templates_csv}")
        for block in dict.fromkeys(re.findall(r"blk_-?\d+", p["content"])):
            sessions.setdefault(block, []).append(event)
    return sessions


def hdfs_parse_agreement(data_dir: str | Path) -> dict:
    """parse_hdfs_lines on loghub's HDFS_2k.log against its structured CSV (EventId, EventTemplate):
    template agreement, event-id agreement (ids from HDFS_2k.log_templates.csv) and grouping accuracy."""
    from slmforge.evaluate.tasks import log_parsing_metrics

    folder = _source(data_dir, "loghub/HDFS")
    table = read_loghub_csv(folder / "HDFS_2k.log_templates.csv", ["EventId", "EventTemplate"])
    gold = read_loghub_csv(folder / "HDFS_2k.log_structured.csv",
                           ["LineId", "Content", "EventId", "EventTemplate"])
    parsed = parse_hdfs_lines(folder / "HDFS_2k.log", {r["EventTemplate"]: r["EventId"] for r in table})
    if len(parsed) != len(gold):
        raise SlmforgeError(f"{folder}/HDFS_2k.log: {len(parsed)} lines, the structured CSV has {len(gold)}")
    for p, g in zip(parsed, gold, strict=True):
        if p["content"] != g["Content"]:
            raise SlmforgeError(f"{folder}/HDFS_2k.log:{p['line']}: content differs from the structured "
                                f"CSV's LineId {g['LineId']}")
    result = log_parsing_metrics([p["template"] for p in parsed], [g["EventTemplate"] for g in gold])
    same_id = sum(1 for p, g in zip(parsed, gold, strict=True) if p["event_id"] == g["EventId"])
    wrong = Counter((g["EventTemplate"], p["template"]) for p, g in zip(parsed, gold, strict=True)
                    if p["template"] != g["EventTemplate"])
    return {**result, "event_id_agreement": 100.0 * same_id / len(gold),
            "disagreements": [{"gold": g, "parsed": t, "lines": n} for (g, t), n in wrong.most_common(10)]}


# ---------------------------------------------------------------------------------------------------------
# Inspec (keyphrase generation)

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
    _check_fmt(fmt, ("prompt", "chat"))
    path = _source(data_dir, "keyphrase/Inspec.zip")
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
            _as_row(f"inspec-{d['id']}", prompt, completion, fmt, keyphrases=d["keyphrases"]))
        inputs[part.get(i, "train")].append(f"{d['title']} {d['abstract']}")
    if not n_val:
        del splits["val"], inputs["val"]
    dropped = drop_held(splits, inputs)
    return _write_splits(out_dir, splits, {
        "task": "inspec", "kind": "keyphrase", "format": fmt, "seed": seed, "documents": len(docs),
        "keyphrases": sum(len(d["keyphrases"]) for d in docs), "train_dropped_as_held": dropped,
        "sources": [str(path)]}, inputs)


# ---------------------------------------------------------------------------------------------------------
# DialogSum (dialogue summarization)

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
    _check_fmt(fmt, ("prompt", "chat"))
    path = _source(data_dir, "summarization/dialogsum.dev.jsonl")
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
        row = _as_row(f"dialogsum-{obj.get('fname', i)}", DIALOGSUM_TEMPLATE.format(dialogue=obj["dialogue"]),
                      obj["summary"].strip(), fmt, topic=obj.get("topic"))
        splits[part.get(i, "train")].append(row)
        inputs[part.get(i, "train")].append(obj["dialogue"])
    sources = [str(path)]
    if add_samsum:
        samsum = _source(data_dir, "summarization/samsum_val.csv")
        for r in read_samsum(samsum):
            dialogue = r["dialogue"].replace("\r\n", "\n").strip()
            splits["train"].append(_as_row(f"samsum-{r['id']}", DIALOGSUM_TEMPLATE.format(dialogue=dialogue),
                                           r["summary"].strip(), fmt, topic=None))
            inputs["train"].append(dialogue)
        sources.append(str(samsum))
    if not n_val:
        del splits["val"], inputs["val"]
    dropped = drop_held(splits, inputs)
    return _write_splits(out_dir, splits, {
        "task": "dialogsum", "kind": "summarization", "format": fmt, "seed": seed, "dialogues": len(rows),
        "train_dropped_as_held": dropped, "sources": sources}, inputs)


# ---------------------------------------------------------------------------------------------------------

LOADERS: dict[str, Callable[..., dict]] = {
    "sst2": prepare_sst2, "multi30k": prepare_multi30k, "wmt_biomed": prepare_wmt_biomed,
    "translation_domain": prepare_translation_domain, "pubmedqa": prepare_pubmedqa, "hdfs": prepare_hdfs,
    "inspec": prepare_inspec, "dialogsum": prepare_dialogsum,
}


def prepare(name: str, data_dir: str | Path, out_dir: str | Path, seed: int = 0, **options) -> dict:
    """Run the loader called `name` (a recipe's `data: {task: inspec, ...}`)."""
    if name not in LOADERS:
        raise SlmforgeError(f"unknown task data {name!r}: one of {', '.join(LOADERS)}")
    takes = inspect.signature(LOADERS[name]).parameters
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise SlmforgeError(f"task data {name}: unknown option(s) {', '.join(unknown)} "
                            f"(it takes {', '.join(k for k in takes if k not in ('data_dir', 'out_dir'))})")
    for key, value in options.items():  # the default's type is the option's type (YAML gives true, 500, 0.5)
        default = takes[key].default
        want = type(default) if default not in (inspect.Parameter.empty, None) else None
        ok = (want is None or (isinstance(value, want) and not (want is int and isinstance(value, bool)))
              or (want is float and isinstance(value, int) and not isinstance(value, bool)))
        if not ok:
            raise SlmforgeError(f"task data {name}: option {key} must be {want.__name__}, got {value!r}")
    return LOADERS[name](data_dir, out_dir, seed=seed, **options)
