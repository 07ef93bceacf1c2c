"""Fine-tuning a model directory on task data: full or LoRA, language-model tasks, classification or
token tagging.

Tasks and their data (JSONL, or CSV/TSV with the same column names):

    lm        {"prompt": ..., "completion": ...}       loss on the completion (and eos) only
    chat      {"messages": [{"role", "content"}...]}   rendered with the model's chat template; loss on
                                                       the assistant turns only
    classify  {"text": ..., "label": ...}              head "generative": the label is the completion of
                                                       CLASSIFY_PROMPT, predicted as the label with the
                                                       highest log-likelihood; head "classifier": a linear
                                                       layer on the final hidden state of the last token
    tag       {"text": ..., "phrases": [...]}          extractive keyphrases: a linear layer on every token's
                                                       final hidden state tags it O/B/I; the gold tags mark
                                                       each phrase's occurrences in the text (inspec rows
                                                       {"prompt", "keyphrases"} are read as text and phrases)

Every example becomes token ids plus an answer mask (True where the loss is taken). Batches are a pure
function of their index (an epoch permutation seeded by the run's seed), so the trainer core's exact
resume holds. Evaluation keeps the best weights (val accuracy or macro-F1 for classify, token F1 of the B/I tags
for tag, val_loss otherwise) and can stop early.

    out/metrics.jsonl, checkpoints/      the trainer core's files (resumable)
    out/model/                           the fine-tuned (for LoRA with merge: merged) model directory
    out/adapter/                         LoRA: the peft adapter (save_pretrained)
    classifier_head.safetensors          in model/ or adapter/ with head "classifier"; labels in slmforge.json
    tagger_head.safetensors              in model/ or adapter/ for task tag; "tagger" entry in slmforge.json
    out/finetune.json                    provenance and metrics of the run
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from slmforge.errors import SlmforgeError
from slmforge.io import read_jsonl_lines, swap_dir_into_place, write_json
from slmforge.model import LlamaModel
from slmforge.modeldir import ModelDir, save_model_dir
from slmforge.tokenizer import Tokenizer
from slmforge.train.loop import TrainConfig, read_metrics, train

TASKS = ("lm", "chat", "classify", "tag")
MODES = ("full", "lora")
HEADS = ("generative", "classifier")
CLASS_WEIGHTS = ("none", "balanced")
SELECT_METRICS = ("accuracy", "macro_f1")
ROLES = ("system", "user", "assistant")
CLASSIFY_PROMPT = "{text}\nlabel:"  # generative classification: the completion is " " + label
HEAD_FILE = "classifier_head.safetensors"
TAGS = ("O", "B", "I")  # tag: outside, beginning and inside of a phrase occurrence
TAGGER_HEAD_FILE = "tagger_head.safetensors"
IGNORE = -100


@dataclass
class FinetuneConfig:
    task: str = "lm"  # lm | chat | classify | tag
    mode: str = "full"  # full | lora
    head: str = "generative"  # classify only: generative | classifier
    labels: list[str] | None = None  # classify: the label set (default: the labels seen in train, sorted)
    # classify: "balanced" weighs each class's loss by n / (k * count), so a rare class (PubMedQA's "maybe")
    # is not drowned by the majority; and the val metric that picks the kept checkpoint
    class_weights: str = "none"
    select_metric: str = "accuracy"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    val_fraction: float = 0.1  # held out of train when no val file is given
    max_val_examples: int = 2000
    merge: bool = False  # LoRA: also write the merged model to out/model
    # LoRA: the frozen projection weights in bfloat16 (QLoRA's idea — a low-precision frozen base under
    # full-precision adapters — at 16 bits: half the base memory; bf16 autocast computes in bf16 anyway)
    base_dtype: str = "float32"
    dtype: str = "float32"  # weights of the written model directory

    def __post_init__(self) -> None:
        checks = [
            (self.task in TASKS, f"task must be one of {', '.join(TASKS)}"),
            (self.mode in MODES, f"mode must be one of {', '.join(MODES)}"),
            (self.head in HEADS, f"head must be one of {', '.join(HEADS)}"),
            (self.lora_r > 0 and self.lora_alpha > 0 and 0 <= self.lora_dropout < 1,
             "need lora_r > 0, lora_alpha > 0 and 0 <= lora_dropout < 1"),
            (bool(self.lora_targets), "lora_targets must name at least one module"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (self.base_dtype in ("float32", "bfloat16"), "base_dtype must be float32 or bfloat16"),
            (self.base_dtype == "float32" or self.mode == "lora", "base_dtype bfloat16 is for mode lora"),
            (self.class_weights in CLASS_WEIGHTS, f"class_weights must be one of {', '.join(CLASS_WEIGHTS)}"),
            (self.select_metric in SELECT_METRICS, f"select_metric must be one of {', '.join(SELECT_METRICS)}"),
            (self.class_weights == "none" or (self.task == "classify" and self.head == "classifier"),
             "class_weights balanced needs task classify with head classifier"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SlmforgeError(f"finetune config: {msg}")

    @property
    def classifier_head(self) -> bool:
        return self.task == "classify" and self.head == "classifier"

    @property
    def best_metric(self) -> tuple[str, str]:
        """The val metric that picks the kept weights, and whether higher ("max") or lower is better."""
        if self.task == "classify":
            return f"val_{self.select_metric}", "max"
        return ("val_tag_f1", "max") if self.task == "tag" else ("val_loss", "min")


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


def _text_field(where: str, rec: dict, name: str, allow_empty: bool = False) -> str:
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
    return _text_field(where, rec, "text" if "text" in rec or "prompt" not in rec else "prompt")


def _tag_fields(where: str, rec: dict) -> tuple[str, list[str]]:
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
    template renders it after the generation prompt, is an answer; everything else is context."""
    segments, pos = [], 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tok.apply_chat_template(messages[:k], add_generation_prompt=True)
        full = tok.apply_chat_template(messages[:k + 1], add_generation_prompt=False)
        if not full.startswith(prefix) or len(prefix) < pos:
            raise SlmforgeError(f"{where}: the chat template does not render turn {k} as a continuation of "
                                f"the conversation before it; cannot mask the assistant turns")
        segments += [(prefix[pos:], False), (full[len(prefix):], True)]
        pos = len(full)
    rest = tok.apply_chat_template(messages, add_generation_prompt=False)[pos:]
    return segments + ([(rest, False)] if rest else [])


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
            prompt = _text_field(where, rec, "prompt", allow_empty=True)
            completion = _text_field(where, rec, "completion")
            out.append(_segments_to_example(tok, [(prompt, False), (completion, True)], seq_len + 1, where,
                                            bos=True, eos_answer=True))
        elif cfg.task == "chat":
            msgs = _messages_of(where, rec)
            out.append(_segments_to_example(tok, chat_segments(tok, msgs, where), seq_len + 1, where))
        elif cfg.task == "tag":
            out.append(tag_example(tok, *_tag_fields(where, rec), seq_len, where))
        else:
            text, label = _text_field(where, rec, "text"), _label_of(where, rec)
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


def batch_indices(i: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of batch i: consecutive slices of a fresh permutation per epoch (pure in i)."""
    out = []
    for p in range(i * batch_size, (i + 1) * batch_size):
        out.append(int(_epoch_order(n, seed, p // n)[p % n]))
    return out


# ---------------------------------------------------------------------------------------------------------
# Models: LoRA, the classifier head, losses


def base_model(model: nn.Module) -> LlamaModel:
    """The LlamaModel inside a PeftModel (LoRA layers are swapped in place, so its submodules use them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class SequenceClassifier(nn.Module):
    """A language model plus a linear head on the last real token's final hidden state (`score`, the name
    transformers' LlamaForSequenceClassification uses)."""

    def __init__(self, lm: nn.Module, n_labels: int):
        super().__init__()
        self.lm = lm
        self.score = nn.Linear(base_model(lm).config.hidden_size, n_labels, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)

    def forward(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        h = base_model(self.lm).hidden_states(x)
        pooled = h[torch.arange(x.shape[0], device=x.device), last]
        return self.score(pooled)


class TokenTagger(nn.Module):
    """A language model plus a linear head on every token's final hidden state and the next token's (`score`).
    The model is causal, so a token's own state cannot tell whether the phrase it starts goes on; the next
    token's state can (one token of lookahead). Batches end in a pad column (collate_tags), so every real
    token has a next state and a row's tags do not depend on the batch it is in."""

    def __init__(self, lm: nn.Module, n_tags: int = len(TAGS)):
        super().__init__()
        self.lm = lm
        self.score = nn.Linear(2 * base_model(lm).config.hidden_size, n_tags, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = base_model(self.lm).hidden_states(x)
        ahead = torch.cat([h[:, 1:], torch.zeros_like(h[:, :1])], dim=1)
        return self.score(torch.cat([h, ahead], dim=-1))


def trainable_model(lm: LlamaModel, cfg: FinetuneConfig, labels: list[str] | None,
                    precision: str) -> tuple[nn.Module, nn.Module]:
    """(lm, model): the language model as cfg trains it (itself, or a peft LoRA model, its frozen projections
    in bf16 with base_dtype bfloat16) and the model the loss takes (lm, or lm with a classifier or tagger
    head). The recipe runner's timing probe builds the same thing."""
    if cfg.mode == "lora":
        lm = apply_lora(lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        if cfg.base_dtype == "bfloat16":
            if precision != "bf16":
                raise SlmforgeError("base_dtype bfloat16 needs precision bf16 (autocast)")
            frozen_linears_to_bf16(lm)
    if cfg.classifier_head:
        return lm, SequenceClassifier(lm, len(labels or []))
    return lm, (TokenTagger(lm) if cfg.task == "tag" else lm)


def apply_lora(model: LlamaModel, r: int, alpha: int, dropout: float, targets: list[str]) -> nn.Module:
    """Wrap in a peft PeftModel: frozen base, trainable low-rank adapters on the named linear layers."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise SlmforgeError(f"lora targets {unknown}: no such linear layers (choose from {', '.join(sorted(names))})")
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets)))


def frozen_linears_to_bf16(model: nn.Module) -> int:
    """Store the frozen weights of linear layers inside the transformer blocks in bfloat16 (embeddings, norms
    and the adapters stay fp32). Returns the number of weights converted."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and ".layers." in f".{name}" and not m.weight.requires_grad:
            m.weight.data = m.weight.data.to(torch.bfloat16)
            n += m.weight.numel()
    return n


def lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["x"], batch["y"])[1]


def classifier_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"], batch["last"]).float(), batch["label"], weight=batch.get("weight"))


def tagger_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(batch["x"]).float()
    return F.cross_entropy(logits.flatten(0, 1), batch["tags"].flatten(), ignore_index=IGNORE)


def loss_fn_of(cfg: FinetuneConfig):
    if cfg.task == "tag":
        return tagger_loss
    return classifier_loss if cfg.classifier_head else lm_loss


def tag_f1(pred: torch.Tensor, gold: torch.Tensor) -> float:
    """Token-level F1 of the phrase tags: a token counts when its predicted tag equals a gold B or I.
    IGNORE positions (bos, padding) are left out."""
    real = gold != IGNORE
    pred_pos, gold_pos = (pred != 0) & real, (gold > 0) & real
    denom = pred_pos.sum().item() + gold_pos.sum().item()
    return 2 * (gold_pos & (pred == gold)).sum().item() / denom if denom else 0.0


def balanced_class_weights(examples: list[Example], n_labels: int) -> torch.Tensor:
    """n / (k * count_c) per class, k the classes present in train (sklearn's "balanced"); an absent class
    gets weight 0."""
    counts = torch.bincount(torch.tensor([e.label for e in examples]), minlength=n_labels).float()
    k = int((counts > 0).sum())
    return torch.where(counts > 0, len(examples) / (k * counts.clamp(min=1)), torch.zeros_like(counts))


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, n_labels: int) -> float:
    """Macro-F1 over all n_labels classes (a class never predicted nor present scores 0, as in eval)."""
    f1s = []
    for c in range(n_labels):
        tp = ((pred == c) & (gold == c)).sum().item()
        denom = (pred == c).sum().item() + (gold == c).sum().item()
        f1s.append(2 * tp / denom if denom else 0.0)
    return sum(f1s) / n_labels


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, tied weights counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# ---------------------------------------------------------------------------------------------------------
# Predictions


@torch.no_grad()
def label_logliks(model: nn.Module, tok: Tokenizer, texts: list[str], labels: list[str], seq_len: int,
                  batch_size: int = 32) -> torch.Tensor:
    """(len(texts), len(labels)) summed log-probabilities of " label" + eos after CLASSIFY_PROMPT."""
    cfg = FinetuneConfig(task="classify", head="generative")
    pad = pad_id_of(tok)
    rows = [(t, lab) for t in texts for lab in labels]
    scores = []
    for s in range(0, len(rows), batch_size):
        recs = [("", {"text": t, "label": lab}) for t, lab in rows[s:s + batch_size]]
        batch = collate(encode_records(recs, tok, cfg, seq_len, labels), pad, classifier=False)
        dev = next(base_model(model).parameters()).device
        logits = model(batch["x"].to(dev))[0].float()
        y = batch["y"].to(dev)
        logp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
        scores.append((logp * (y != IGNORE)).sum(1).cpu())
    return torch.cat(scores).view(len(texts), len(labels))


@torch.no_grad()
def classifier_logits(model: SequenceClassifier, tok: Tokenizer, texts: list[str], seq_len: int,
                      batch_size: int = 32) -> torch.Tensor:
    cfg = FinetuneConfig(task="classify", head="classifier")
    dev = model.score.weight.device
    out = []
    for s in range(0, len(texts), batch_size):
        recs = [("", {"text": t, "label": "_"}) for t in texts[s:s + batch_size]]
        batch = collate(encode_records(recs, tok, cfg, seq_len, ["_"]), pad_id_of(tok), classifier=True)
        out.append(model(batch["x"].to(dev), batch["last"].to(dev)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def tag_probs(model: TokenTagger, tok: Tokenizer, texts: list[str], seq_len: int,
              batch_size: int = 16) -> list[tuple[list[tuple[int, int]], torch.Tensor]]:
    """Per text: the character span of each token the tagger saw (the first seq_len - 1 after bos) and the
    (tokens, 3) probabilities of O, B, I at those tokens."""
    dev = model.score.weight.device
    out = []
    for s in range(0, len(texts), batch_size):
        encoded = [tok.encode_with_offsets(t, bos=True) for t in texts[s:s + batch_size]]
        exs = [Example(ids[:seq_len], [], tags=[IGNORE] * len(ids[:seq_len])) for ids, _ in encoded]
        probs = torch.softmax(model(collate_tags(exs, pad_id_of(tok))["x"].to(dev)).float(), -1).cpu()
        for (ids, offsets), p in zip(encoded, probs, strict=True):
            n = min(len(ids), seq_len)
            start = 1 if tok.bos_id is not None else 0  # bos is not part of the text
            out.append((offsets[start:n], p[start:n]))
    return out


def load_tagger(model_dir: str | Path) -> tuple[TokenTagger, Tokenizer, dict]:
    """A fine-tuned tagger directory: (TokenTagger with the saved head, tokenizer, slmforge.json 'tagger')."""
    md = ModelDir.open(model_dir)
    info = md.meta.get("tagger")
    if not info:
        raise SlmforgeError(f"{md.path / 'slmforge.json'}: no 'tagger' entry (not a fine-tuned tagger: "
                            f"finetune --task tag)")
    head_path = md.path / TAGGER_HEAD_FILE
    if not head_path.is_file():
        raise SlmforgeError(f"{head_path}: missing (slmforge.json has a 'tagger' entry)")
    model = TokenTagger(md.load_model(), len(info["labels"]))
    model.score.load_state_dict(_load_head(head_path).state_dict())
    return model.eval(), md.load_tokenizer(), info


def load_classifier(model_dir: str | Path) -> tuple[nn.Module, Tokenizer, dict]:
    """A fine-tuned classification model directory: (model, tokenizer, its slmforge.json 'classifier' entry).
    With head "classifier" the model is a SequenceClassifier with the saved head."""
    md = ModelDir.open(model_dir)
    info = md.meta.get("classifier")
    if not info:
        raise SlmforgeError(f"{md.path / 'slmforge.json'}: no 'classifier' entry (not a fine-tuned classifier)")
    lm = md.load_model()
    if info["head"] != "classifier":
        return lm, md.load_tokenizer(), info
    head_path = md.path / HEAD_FILE
    if not head_path.is_file():
        raise SlmforgeError(f"{head_path}: missing (slmforge.json says head 'classifier')")
    model = SequenceClassifier(lm, len(info["labels"]))
    model.score.load_state_dict(_load_head(head_path).state_dict())
    return model.eval(), md.load_tokenizer(), info


def predict_labels(model_dir: str | Path, texts: list[str], batch_size: int = 32) -> list[str]:
    """Labels for texts from a fine-tuned classification model directory (either head)."""
    model, tok, info = load_classifier(model_dir)
    labels, seq_len = info["labels"], info["seq_len"]
    if info["head"] == "classifier":
        scores = classifier_logits(model, tok, texts, seq_len, batch_size)
    else:
        scores = label_logliks(model, tok, texts, labels, seq_len, batch_size)
    return [labels[i] for i in scores.argmax(-1).tolist()]


# ---------------------------------------------------------------------------------------------------------
# The run


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _write_dir_atomically(out: Path, write) -> Path:
    """write(tmp_dir) fills a staging folder that then replaces `out` whole."""
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write(staging)
        swap_dir_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _save_head(head: nn.Linear, path: Path) -> None:
    save_file({"score.weight": head.weight.detach().float().cpu().contiguous()}, str(path))


def _load_head(path: Path) -> nn.Linear:
    """A head written by _save_head, shaped by its saved weight (a tagger's reads two hidden states)."""
    weight = load_file(str(path))["score.weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight.data = weight
    return head


def finetune(
    model_dir: str | Path,
    train_path: str | Path,
    out_dir: str | Path,
    cfg: FinetuneConfig,
    train_cfg: TrainConfig,
    val_path: str | Path | None = None,
    resume: bool = True,
) -> dict:
    """Fine-tune a model directory on task data. Returns the run summary (also written to out/finetune.json)."""
    md = ModelDir.open(model_dir)
    tok = md.load_tokenizer()
    out = Path(out_dir)
    seq_len = train_cfg.seq_len
    if seq_len + (cfg.task == "tag") > md.config.max_position_embeddings:  # a tag batch ends in a pad column
        raise SlmforgeError(f"seq_len {seq_len} exceeds the model's context (max_position_embeddings "
                            f"{md.config.max_position_embeddings}{'; task tag takes one token more' if cfg.task == 'tag' else ''})")
    if cfg.task == "chat" and not tok.chat_template:
        raise SlmforgeError(f"{md.path}: the tokenizer has no chat template; use --task lm with prompt/completion")

    # Data: validate everything before any training starts.
    train_recs = read_records(train_path)
    labels = label_set(train_recs, cfg.labels) if cfg.task == "classify" else None
    if val_path is not None:
        val_recs = read_records(val_path)
    elif cfg.val_fraction > 0 and len(train_recs) >= 2:
        order = np.random.default_rng(train_cfg.seed).permutation(len(train_recs))
        n_val = min(max(1, round(len(train_recs) * cfg.val_fraction)), cfg.max_val_examples, len(train_recs) - 1)
        val_recs = [train_recs[i] for i in sorted(order[:n_val])]
        train_recs = [train_recs[i] for i in sorted(order[n_val:])]
    else:
        val_recs = []
    val_recs = val_recs[:cfg.max_val_examples]
    train_ex = encode_records(train_recs, tok, cfg, seq_len, labels)
    val_ex = encode_records(val_recs, tok, cfg, seq_len, labels)
    if cfg.task in ("lm", "chat") or (cfg.task == "classify" and not cfg.classifier_head):
        empty = next((e for e in train_ex if sum(e.answer[1:]) == 0), None)
        if empty is not None:
            raise SlmforgeError(f"{empty.where}: no answer tokens left after truncation to seq_len {seq_len}")

    # Model: full or LoRA, with or without a classifier or tagger head.
    torch.manual_seed(train_cfg.seed)  # LoRA and head initialisation
    lm, model = trainable_model(md.load_model().train(), cfg, labels, train_cfg.precision)
    trainable, total = count_params(model)

    bs, pad = train_cfg.batch_size, pad_id_of(tok)

    weight = balanced_class_weights(train_ex, len(labels)) if cfg.class_weights == "balanced" else None

    def get_batch(i: int) -> dict:
        batch = make_batch([train_ex[j] for j in batch_indices(i, len(train_ex), bs, train_cfg.seed)], pad, cfg)
        return batch if weight is None else batch | {"weight": weight}

    val_batches = [make_batch(val_ex[s:s + bs], pad, cfg) for s in range(0, len(val_ex), bs)]
    texts = [r["text"] for _, r in val_recs] if cfg.task == "classify" else []
    gold = torch.tensor([e.label for e in val_ex]) if cfg.task == "classify" else None

    @torch.no_grad()
    def val_metrics() -> dict:
        if cfg.task == "tag":
            dev = model.score.weight.device
            pred = [model(b["x"].to(dev)).argmax(-1).cpu().flatten() for b in val_batches]
            return {"val_tag_f1": tag_f1(torch.cat(pred), torch.cat([b["tags"].flatten() for b in val_batches]))}
        if cfg.classifier_head:
            pred = classifier_logits(model, tok, texts, seq_len, bs).argmax(-1)
        else:
            pred = label_logliks(model, tok, texts, labels, seq_len, bs).argmax(-1)
        return {"val_accuracy": (pred == gold).float().mean().item(),
                "val_macro_f1": macro_f1(pred, gold, len(labels))}

    def on_eval(step: int, val_loss: float) -> dict | None:
        if cfg.task not in ("classify", "tag") or not val_ex:
            return None
        was_training = model.training
        model.eval()
        metrics = val_metrics()
        model.train(was_training)
        return metrics

    if val_ex and train_cfg.best_metric is None:  # keep the best evaluation's weights
        train_cfg = replace(train_cfg, best_metric=cfg.best_metric[0], best_mode=cfg.best_metric[1])
    if not val_ex and train_cfg.patience:
        raise SlmforgeError("early stopping (patience) needs validation data: give a val file or val_fraction > 0")
    result = train(model, get_batch, train_cfg, out, (lambda: val_batches) if val_ex else None,
                   on_eval=on_eval, loss_fn=loss_fn_of(cfg), resume=resume)
    model.cpu().eval()

    # Metrics of the weights we keep (the best evaluation's, restored by train()).
    rows = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}  # the whole curve, across resumes
    best_row = rows.get(result.best_step, {}) if result.best_step else {}
    metrics = {
        "train_loss": result.loss,
        "val_loss": best_row.get("val_loss", result.val_loss),
        "val_accuracy": best_row.get("val_accuracy"),
        "val_macro_f1": best_row.get("val_macro_f1"),
        "val_tag_f1": best_row.get("val_tag_f1"),
        "best_step": result.best_step, "steps": result.step, "stopped_early": result.stopped_early,
        "train_tokens": result.tokens, "tokens_per_s": round(result.tokens_per_s, 1),
        "train_time_s": round(result.train_time_s, 2),
        "trainable_params": trainable, "total_params": total,
        "trainable_pct": round(100 * trainable / total, 4),
    }
    if metrics["val_loss"] is not None and metrics["val_loss"] < 50:
        metrics["val_ppl"] = math.exp(metrics["val_loss"])
    meta = {
        "stage": "finetune",
        "parent": {"path": str(md.path.resolve()), "stage": md.meta.get("stage"),
                   "tokenizer_fingerprint": tok.fingerprint()},
        "data": {"train": str(Path(train_path).resolve()), "train_sha256": _fingerprint(Path(train_path)),
                 "val": str(Path(val_path).resolve()) if val_path else None,
                 "val_sha256": _fingerprint(Path(val_path)) if val_path else None,
                 "train_examples": len(train_ex), "val_examples": len(val_ex)},
        "finetune": asdict(cfg), "train": asdict(train_cfg), "metrics": metrics,
    }
    if cfg.task == "classify":
        meta["classifier"] = {"head": cfg.head, "labels": labels, "seq_len": seq_len, "pooling": "last_token",
                              "prompt": CLASSIFY_PROMPT if cfg.head == "generative" else None}
    if cfg.task == "tag":  # phrases absent from their text (many in Inspec) cannot be tagged: say how many
        pairs = [_tag_fields(w, r) for w, r in train_recs]
        n_phrases = sum(len(set(map(str.lower, ph))) for _, ph in pairs)
        found = sum(1 for text, ph in pairs for x in set(map(str.lower, ph)) if phrase_spans(text, [x]))
        meta["tagger"] = {"labels": list(TAGS), "seq_len": seq_len,
                          "train_phrases_in_text_pct": round(100 * found / max(n_phrases, 1), 2)}

    head = model.score if cfg.classifier_head or cfg.task == "tag" else None
    head_file = TAGGER_HEAD_FILE if cfg.task == "tag" else HEAD_FILE
    written = {}
    if cfg.mode == "lora":
        def write_adapter(d: Path) -> None:
            lm.save_pretrained(str(d))
            if head is not None:
                _save_head(head, d / head_file)
            write_json(d / "slmforge.json", meta)

        written["adapter"] = str(_write_dir_atomically(out / "adapter", write_adapter))
        if cfg.merge and cfg.base_dtype == "bfloat16":  # fold into the fp32 base on disk, not its bf16 copy
            written["model"] = str(merge_lora(md.path, out / "adapter", out / "model", dtype=cfg.dtype))
        elif cfg.merge:
            written["model"] = str(_save_model(out / "model", lm.merge_and_unload(), tok, head,
                                               {**meta, "merged_lora": True}, cfg.dtype, head_file))
    else:
        written["model"] = str(_save_model(out / "model", lm, tok, head, meta, cfg.dtype, head_file))
    summary = {**meta, "outputs": written}
    write_json(out / "finetune.json", summary)
    return summary


def _save_model(out: Path, lm: LlamaModel, tok: Tokenizer, head: nn.Linear | None, meta: dict, dtype: str,
                head_file: str = HEAD_FILE) -> Path:
    def write(d: Path) -> None:
        save_model_dir(d, lm, tok, meta, dtype=dtype)
        if head is not None:
            _save_head(head, d / head_file)

    return _write_dir_atomically(out, write)


def merge_lora(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Fold a LoRA adapter into its base model (peft merge_and_unload) and write a plain model directory;
    a classifier or tagger head saved with the adapter comes along."""
    from peft import PeftModel

    adapter = Path(adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise SlmforgeError(f"{adapter / 'adapter_config.json'}: missing (not a peft adapter directory)")
    md = ModelDir.open(model_dir)
    try:
        peft_model = PeftModel.from_pretrained(md.load_model(), str(adapter))
    except (ValueError, RuntimeError, KeyError) as e:
        raise SlmforgeError(f"{adapter}: does not fit {md.path} ({str(e).splitlines()[0]})") from None
    merged = peft_model.merge_and_unload()
    meta_path = adapter / "slmforge.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.update(stage="merge-lora", merged_lora=True, adapter=str(adapter.resolve()),
                parent={**meta.get("parent", {}), "path": str(md.path.resolve())})
    head, head_file = None, HEAD_FILE
    for name in (HEAD_FILE, TAGGER_HEAD_FILE):
        if (adapter / name).is_file():
            head, head_file = _load_head(adapter / name), name
    return _save_model(Path(out_dir), merged, md.load_tokenizer(), head, meta, dtype, head_file)
