"""Fine-tuning rows: task data (JSONL, CSV, TSV) read and checked with file:line errors, turned into token
ids plus an answer mask (the loss is taken where it is True), and batched as a pure function of the batch
index (so the trainer core's exact resume holds).

    lm        {"prompt": ..., "completion": ...}       loss on the completion (and eos) only
    chat      {"messages": [{"role", "content"}...]}   rendered with the model's chat template; loss on
                                                       the assistant turns only
    classify  {"text": ..., "label": ...}              a label index (and, for the generative head, the label
                                                       as the completion of CLASSIFY_PROMPT)
    tag       {"text": ..., "phrases": [...]}          O/B/I tags marking each phrase's occurrences
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from slmforge.errors import SlmforgeError
from slmforge.io import read_jsonl_lines
from slmforge.tokenizer import Tokenizer, chat_text

if TYPE_CHECKING:
    from slmforge.train.finetune import FinetuneConfig

ROLES = ("system", "user", "assistant")
CLASSIFY_PROMPT = "{text}\nlabel:"  # generative classification: the completion is " " + label
TAGS = ("O", "B", "I")  # tag: outside, beginning and inside of a phrase occurrence
IGNORE = -100


@dataclass
class Example:
    ids: list[int]
    answer: list[bool]  # per token: is it part of the answer (the loss is taken on these)
    label: int | None = None  # classify: index into the label set
    tags: list[int] | None = None  # tag: per token an index into TAGS, or IGNORE (bos)
    where: str = ""  # file:line, for messages


# ---------------------------------------------------------------------------------------------------------
# Reading task data


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """(file:line, record) for every row of a JSONL, CSV or TSV file; errors name file:line."""
    path = Path(path)
    if not path.is_file():
        raise SlmforgeError(f"{path}: no such file")
    rows: list[tuple[str, dict]] = []
    if path.suffix.lower() in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",",
                                    quoting=csv.QUOTE_NONE if path.suffix.lower() == ".tsv" else csv.QUOTE_MINIMAL)
            try:
                for row in reader:
                    if any(v for v in row.values() if isinstance(v, str) and v.strip()):
                        rows.append((f"{path}:{reader.line_num}", row))
            except (csv.Error, UnicodeDecodeError) as e:
                raise SlmforgeError(f"{path}:{reader.line_num}: unreadable row ({e})") from None
    else:
        rows.extend((f"{path}:{lineno}", obj) for lineno, obj in read_jsonl_lines(path))
    if not rows:
        raise SlmforgeError(f"{path}: empty file (no examples)")
    return rows


def text_field(where: str, rec: dict, name: str, allow_empty: bool = False) -> str:
    if name not in rec or rec[name] is None:
        raise SlmforgeError(f"{where}: missing field '{name}'")
    v = rec[name]
    if not isinstance(v, str):
        raise SlmforgeError(f"{where}: field '{name}' must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise SlmforgeError(f"{where}: field '{name}' is empty")
    return v


def _label_of(where: str, rec: dict) -> str:
    if "label" not in rec or rec["label"] is None or (isinstance(rec["label"], str) and not rec["label"].strip()):
        raise SlmforgeError(f"{where}: missing field 'label'")
    v = rec["label"]
    if not isinstance(v, (str, int, bool)):
        raise SlmforgeError(f"{where}: field 'label' must be a string or integer, got {type(v).__name__}")
    return str(v).strip()


def _messages_of(where: str, rec: dict) -> list[dict]:
    msgs = rec.get("messages")
    if msgs is None:
        raise SlmforgeError(f"{where}: missing field 'messages'")
    if not isinstance(msgs, list) or not msgs:
        raise SlmforgeError(f"{where}: field 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise SlmforgeError(f"{where}: messages[{i}] needs 'role' ({'/'.join(ROLES)}) and string 'content'")
    if not any(m["role"] == "assistant" for m in msgs):
        raise SlmforgeError(f"{where}: field 'messages' has no assistant turn to train on")
    return msgs


def tag_text(where: str, rec: dict) -> str:
    """The text of a tag row: "text", or "prompt" when there is no "text" (inspec's rows)."""
    return text_field(where, rec, "text" if "text" in rec or "prompt" not in rec else "prompt")


def tag_fields(where: str, rec: dict) -> tuple[str, list[str]]:
    """(text, phrases) of a tag row; inspec's prompt/keyphrases rows are read as text/phrases."""
    text = tag_text(where, rec)
    name = "phrases" if "phrases" in rec or "keyphrases" not in rec else "keyphrases"
    phrases = rec.get(name)
    if phrases is None:
        raise SlmforgeError(f"{where}: missing field 'phrases'")
    if not isinstance(phrases, list) or not all(isinstance(x, str) for x in phrases):
        raise SlmforgeError(f"{where}: field '{name}' must be a list of strings")
    return text, phrases


def label_set(records: list[tuple[str, dict]], given: list[str] | None) -> list[str]:
    """The labels: as given, or those seen in train (sorted, numerically when they are all integers)."""
    if given:
        return [str(x) for x in given]
    seen = {_label_of(w, r) for w, r in records}
    return sorted(seen, key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))


# ---------------------------------------------------------------------------------------------------------
# Tokenising: ids + answer mask


def _fit(ids: list[int], answer: list[bool], max_len: int) -> tuple[list[int], list[bool]]:
    """Truncate to max_len keeping the (last) answer: cut the prompt from the left, but never past the token
    before the answer; an answer longer than the window loses its end."""
    n = len(ids)
    if n <= max_len:
        return ids, answer
    last_start = max((i for i in range(n) if answer[i] and (i == 0 or not answer[i - 1])), default=n)
    start = min(n - max_len, max(0, last_start - 1))
    return ids[start:start + max_len], answer[start:start + max_len]


def _segments_to_example(tok: Tokenizer, segments: list[tuple[str, bool]], max_len: int, where: str,
                         bos: bool = False, eos_answer: bool = False) -> Example:
    ids: list[int] = [tok.bos_id] if bos and tok.bos_id is not None else []
    answer = [False] * len(ids)
    for text, is_answer in segments:
        piece = tok.encode(text) if text else []
        ids += piece
        answer += [is_answer] * len(piece)
    if eos_answer and tok.eos_id is not None:  # the model learns to stop after its answer
        ids.append(tok.eos_id)
        answer.append(True)
    ids, answer = _fit(ids, answer, max_len)
    return Example(ids, answer, where=where)


def chat_segments(tok: Tokenizer, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_answer) pieces: each assistant turn, exactly as the
    template renders it after the generation prompt, is an answer; everything else is context.

    The pieces are cut from the marked renders and rebuilt as ChatText, so that encoding them gives the
    template's control tokens as ids and control tokens typed in the messages as text."""
    segments, pos = [], 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tok.apply_chat_template(messages[:k], add_generation_prompt=True).marked
        full = tok.apply_chat_template(messages[:k + 1], add_generation_prompt=False).marked
        if not full.startswith(prefix) or len(prefix) < pos:
            raise SlmforgeError(f"{where}: the chat template does not render turn {k} as a continuation of "
                                f"the conversation before it; cannot mask the assistant turns")
        segments += [(chat_text(prefix[pos:]), False), (chat_text(full[len(prefix):]), True)]
        pos = len(full)
    rest = tok.apply_chat_template(messages, add_generation_prompt=False).marked[pos:]
    return segments + ([(chat_text(rest), False)] if rest else [])


def phrase_spans(text: str, phrases: list[str]) -> list[tuple[int, int]]:
    """Character spans of every occurrence of the phrases in text: case-insensitive, at word boundaries,
    any whitespace between words. Overlapping occurrences keep the longer one (then the earlier)."""
    found = []
    for ph in phrases:
        words = ph.split()
        if not words:
            continue
        pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)"
        found += [(m.start(), m.end()) for m in re.finditer(pattern, text, re.IGNORECASE)]
    kept: list[tuple[int, int]] = []
    for s, e in sorted(set(found), key=lambda se: (se[0] - se[1], se[0])):
        if all(e <= ks or s >= ke for ks, ke in kept):
            kept.append((s, e))
    return sorted(kept)


def bio_tags(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Per token an index into TAGS: B for the first token that overlaps a span, I for the rest of that
    span's tokens, O elsewhere. Empty offsets (bos) get IGNORE."""
    tags, j, prev = [], 0, -1  # spans are sorted and disjoint: walk them with the tokens
    for s, e in offsets:
        if s == e:
            tags.append(IGNORE)
            continue
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j < len(spans) and spans[j][0] < e:
            tags.append(TAGS.index("I") if prev == j else TAGS.index("B"))
            prev = j
        else:
            tags.append(TAGS.index("O"))
    return tags


def tag_example(tok: Tokenizer, text: str, phrases: list[str], seq_len: int, where: str = "") -> Example:
    """bos + the text's tokens, cut to seq_len from the right (the beginning is kept), with BIO tags."""
    ids, offsets = tok.encode_with_offsets(text, bos=True)
    ids, offsets = ids[:seq_len], offsets[:seq_len]
    return Example(ids, [False] * len(ids), tags=bio_tags(offsets, phrase_spans(text, phrases)), where=where)


def encode_records(records: list[tuple[str, dict]], tok: Tokenizer, cfg: FinetuneConfig, seq_len: int,
                   labels: list[str] | None = None) -> list[Example]:
    """Validate and tokenise records for cfg.task. LM-style examples hold up to seq_len + 1 tokens (inputs
    and shifted targets); classifier-head examples hold up to seq_len tokens ending in eos; tag examples
    up to seq_len tokens."""
    out = []
    index = {lab: i for i, lab in enumerate(labels or [])}
    for where, rec in records:
        if cfg.task == "lm":
            prompt = text_field(where, rec, "prompt", allow_empty=True)
            completion = text_field(where, rec, "completion")
            out.append(_segments_to_example(tok, [(prompt, False), (completion, True)], seq_len + 1, where,
                                            bos=True, eos_answer=True))
        elif cfg.task == "chat":
            msgs = _messages_of(where, rec)
            out.append(_segments_to_example(tok, chat_segments(tok, msgs, where), seq_len + 1, where))
        elif cfg.task == "tag":
            out.append(tag_example(tok, *tag_fields(where, rec), seq_len, where))
        else:
            text, label = text_field(where, rec, "text"), _label_of(where, rec)
            if label not in index:
                raise SlmforgeError(f"{where}: field 'label': unknown label {label!r} "
                                    f"(labels: {', '.join(labels or [])})")
            if cfg.head == "classifier":
                ids = tok.encode(text, bos=True)[:seq_len - 1] + ([tok.eos_id] if tok.eos_id is not None else [])
                out.append(Example(ids, [False] * len(ids), label=index[label], where=where))
            else:
                ex = _segments_to_example(tok, [(CLASSIFY_PROMPT.format(text=text), False), (" " + label, True)],
                                          seq_len + 1, where, bos=True, eos_answer=True)
                ex.label = index[label]
                out.append(ex)
    return out


# ---------------------------------------------------------------------------------------------------------
# Batches


def pad_id_of(tok: Tokenizer) -> int:
    for i in (tok.pad_id, tok.eos_id, 0):
        if i is not None:
            return i
    return 0


def collate(examples: list[Example], pad_id: int, classifier: bool) -> dict[str, torch.Tensor]:
    """Right-padded batch. LM: x = ids[:-1], y = ids[1:] with -100 off the answer and on padding.
    Classifier: x = ids, last = index of the last real token, label."""
    if classifier:
        T = max(len(e.ids) for e in examples)
        x = torch.full((len(examples), T), pad_id, dtype=torch.long)
        for r, e in enumerate(examples):
            x[r, :len(e.ids)] = torch.tensor(e.ids)
        return {"x": x, "last": torch.tensor([len(e.ids) - 1 for e in examples]),
                "label": torch.tensor([e.label for e in examples])}
    T = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for r, e in enumerate(examples):
        ids = torch.tensor(e.ids)
        x[r, :len(ids) - 1] = ids[:-1]
        targets = ids[1:].clone()
        targets[~torch.tensor(e.answer[1:], dtype=torch.bool)] = IGNORE
        y[r, :len(ids) - 1] = targets
    return {"x": x, "y": y}


def collate_tags(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch for the tagger: x = ids, tags with IGNORE on padding; one pad column more than the
    longest row, the next token every last real token looks ahead to (TokenTagger)."""
    T = max(len(e.ids) for e in examples) + 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    tags = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for r, e in enumerate(examples):
        x[r, :len(e.ids)] = torch.tensor(e.ids)
        tags[r, :len(e.ids)] = torch.tensor(e.tags)
    return {"x": x, "tags": tags}


def make_batch(examples: list[Example], pad_id: int, cfg: FinetuneConfig) -> dict[str, torch.Tensor]:
    """The batch cfg's model and loss take."""
    return collate_tags(examples, pad_id) if cfg.task == "tag" else collate(examples, pad_id, cfg.classifier_head)


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


LENGTH_GROUP_BATCHES = 50  # batches sorted together by length (transformers' LengthGroupedSampler uses 50)


@lru_cache(maxsize=4)
def _length_grouped_epoch(lengths: tuple[int, ...], batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batches of one epoch, grouped by length: the epoch's permutation is cut into groups of
    LENGTH_GROUP_BATCHES batches, each group sorted by length and cut into batches, and the batches shuffled.
    A batch is padded to its longest row, so rows of like length waste little compute on padding."""
    order = _epoch_order(len(lengths), seed, epoch)
    size = batch_size * LENGTH_GROUP_BATCHES
    lens = np.asarray(lengths)
    batches = []
    for start in range(0, len(order), size):
        group = order[start:start + size]
        group = group[np.argsort(-lens[group], kind="stable")]
        batches += [group[b:b + batch_size] for b in range(0, len(group), batch_size)]
    shuffle = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
    return [batches[k] for k in shuffle]


def batch_indices(i: int, n: int, batch_size: int, seed: int, lengths: tuple[int, ...] | None = None) -> list[int]:
    """Example indices of batch i: consecutive slices of a fresh permutation per epoch (pure in i). With the
    examples' lengths, batch i is one of its epoch's length-grouped batches (the last one of an epoch may be
    smaller)."""
    if lengths is not None:
        per_epoch = math.ceil(n / batch_size)
        return [int(j) for j in _length_grouped_epoch(lengths, batch_size, seed, i // per_epoch)[i % per_epoch]]
    out = []
    for p in range(i * batch_size, (i + 1) * batch_size):
        out.append(int(_epoch_order(n, seed, p // n)[p % n]))
    return out
