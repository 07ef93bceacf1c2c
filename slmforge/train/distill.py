"""Distillation: a student trained by pretrain() or finetune() with a teacher term in its loss (kd.py).

    slmforge distill pretrain --teacher T --data packed/ --out run/ --preset 1m       # LM, from scratch
    slmforge distill pretrain --teacher T --data packed/ --out run/ --init pruned/    # heal a pruned model
    slmforge distill finetune --teacher T --model S --data train.jsonl --task classify --head classifier
    slmforge distill generate --teacher openai:http://host/v1#m --prompts p.jsonl --out answers.jsonl

Logit distillation needs the teacher's tokenizer to be the student's (checked by fingerprint; a teacher
with another tokenizer is distilled through its generated answers instead: `distill generate`, then
finetune on them — sequence-level distillation, Kim & Rush 2016). For classification the teacher is a
fine-tuned classifier over the same labels; for tagging a fine-tuned tagger.

The teacher's top-k logits can be cached (DistillKit-style) for packed-token runs: TopKCache fills a
memory-mapped file batch by batch as training reads them (so an interrupted run keeps what it computed) and
later runs on the same batches (same data, seed, batch_size, seq_len) read it instead of running the teacher.
"""

from __future__ import annotations

import json
import os
import random
import string
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from pydantic import with_config

from slmforge.errors import ConfigError, SlmforgeError
from slmforge.io import file_sha256, read_json, write_json
from slmforge.modeldir import ModelDir
from slmforge.stage_config import STRICT, setting
from slmforge.tokenizer import Tokenizer
from slmforge.train.kd import (
    DistillConfig,
    classifier_kd_loss,
    lm_kd_loss,
    tagger_kd_loss,
    teacher_on,
    teacher_topk,
)
from slmforge.train.loop import dist_env

CACHE_FORMAT = 1


def open_teacher(path: str | Path, tok: Tokenizer) -> ModelDir:
    """The teacher's model directory, its tokenizer checked against the student's."""
    md = ModelDir.open(path)
    t_tok = md.load_tokenizer()
    if t_tok.fingerprint() != tok.fingerprint():
        raise SlmforgeError(f"{md.path}: the teacher's tokenizer differs from the student's (fingerprint "
                            f"{t_tok.fingerprint()} vs {tok.fingerprint()}, {t_tok.vocab_size} vs {tok.vocab_size} "
                            f"tokens); logit distillation needs one vocabulary: distil through the teacher's "
                            f"answers instead (slmforge distill generate, then finetune)")
    return md


def teacher_key(md: ModelDir) -> dict:
    return {"path": str(md.path.resolve()), "weights_sha256": file_sha256(md.path / "model.safetensors")}


def lm_teacher_loss(teacher_dir: str | Path, tok: Tokenizer, kd: DistillConfig, cache_key: dict | None = None):
    """(loss_fn, info) for LM batches; with kd.cache and cache_key (what fixes the batches), a TopKCache."""
    md = open_teacher(teacher_dir, tok)
    teacher = md.load_model()
    info = {"teacher": teacher_key(md), "teacher_params": md.config.n_params, "kd": kd.__dict__.copy()}
    source = None
    if kd.cache:
        if dist_env()[1] > 1:  # one process fills the memory-mapped file; ranks appending at once would tear it
            raise SlmforgeError("distill: the top-k cache is written by one process; under torchrun run without "
                                "--cache (each rank then runs the teacher on its own batches)")
        if cache_key is None:
            raise SlmforgeError("distill: a top-k cache needs batches fixed by their index (packed-token runs)")
        cache = TopKCache(kd.cache, {**cache_key, **info["teacher"], "k": kd.top_k, "vocab": tok.vocab_size})

        def source(i: int, x: torch.Tensor):
            return cache.lookup(i, x, teacher, tok.vocab_size)

        info["cache"] = str(Path(kd.cache).resolve())
    return lm_kd_loss(teacher, kd, tok.vocab_size, source), info


def task_teacher_loss(task: str, classifier_head: bool, teacher_dir: str | Path, tok: Tokenizer,
                      kd: DistillConfig, labels: list[str] | None):
    """(loss_fn, info) for a finetune task: LM tasks (and generative classification) distil the answer tokens,
    a classifier head the label distribution, a tagger the tag distribution."""
    from slmforge.train.heads import load_classifier, load_tagger

    md = open_teacher(teacher_dir, tok)
    info = {"teacher": teacher_key(md), "teacher_params": md.config.n_params, "kd": kd.__dict__.copy()}
    if kd.cache:
        raise SlmforgeError("distill: the top-k cache is for packed-token runs (distill pretrain)")
    if kd.lmbda:
        raise SlmforgeError("distill: on-policy batches (lmbda) are for packed-token runs (distill pretrain)")
    if task == "tag":
        teacher, _, _ = load_tagger(md.path)
        return tagger_kd_loss(teacher, kd), info
    if classifier_head:
        teacher, _, t_info = load_classifier(md.path)
        if t_info.get("head") != "classifier":
            raise SlmforgeError(f"{md.path}: a generative classifier cannot teach a classifier head; use "
                                f"--head generative for the student or a classifier-head teacher")
        if t_info["labels"] != labels:
            raise SlmforgeError(f"{md.path}: the teacher's labels {t_info['labels']} are not the student's {labels} "
                                f"(same labels in the same order needed; set --labels)")
        return classifier_kd_loss(teacher, kd), info
    return lm_kd_loss(md.load_model(), kd, tok.vocab_size), info


class TopKCache:
    """The teacher's top-k logits per micro-batch index, memory-mapped:

        folder/cache.json     what the cache is of (teacher weights, data, seed, batch shape, k): a run with other
                              settings is refused, never served wrong logits
        folder/values.f16     (n, batch, seq_len, k) float16 logits
        folder/indices.i32    (n, batch, seq_len, k) token ids
        folder/filled.u8      (n,) 1 where batch i is written (set after its rows are flushed)
    """

    def __init__(self, folder: str | Path, key: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_path = self.folder / "cache.json"
        if meta_path.is_file():
            try:
                stored = read_json(meta_path)
            except SlmforgeError as e:
                raise SlmforgeError(f"{meta_path}: corrupt top-k cache ({e}); delete {self.folder}") from None
            if stored.get("format") != CACHE_FORMAT or stored.get("key") != key:
                diff = sorted(k for k in set(key) | set(stored.get("key") or {})
                              if (stored.get("key") or {}).get(k) != key.get(k))
                raise SlmforgeError(f"{self.folder}: a top-k cache of another run (differs in {', '.join(diff) or 'format'}); "
                                    f"use another cache folder or delete this one")
        else:
            write_json(meta_path, {"format": CACHE_FORMAT, "key": key})
        self.row = (key["batch_size"], key["seq_len"], key["k"])
        self.n = 0
        self._open()

    def _paths(self):
        return self.folder / "values.f16", self.folder / "indices.i32", self.folder / "filled.u8"

    def _open(self, need: int = 0) -> None:
        per = int(np.prod(self.row))
        values, indices, filled = self._paths()
        n = filled.stat().st_size if filled.exists() else 0
        sizes = [p.stat().st_size if p.exists() else 0 for p in (values, indices)]
        # filled.u8 grows last, so a kill while growing leaves data files longer than it says: still valid
        if sizes[0] < n * per * 2 or sizes[1] < n * per * 4:
            raise SlmforgeError(f"{self.folder}: corrupt top-k cache (file sizes do not match {n} batches); "
                                f"delete it")
        if need > n:  # grow (sparse files: unwritten batches take no disk)
            n = max(need, 2 * n, 64)
            for p, size in ((values, n * per * 2), (indices, n * per * 4), (filled, n)):
                with open(p, "ab") as f:
                    if f.tell() < size:
                        f.truncate(size)
        self.n = n
        if n:
            self.values = np.memmap(values, np.float16, "r+", shape=(n, *self.row))
            self.indices = np.memmap(indices, np.int32, "r+", shape=(n, *self.row))
            self.filled = np.memmap(filled, np.uint8, "r+", shape=(n,))

    def lookup(self, i: int, x: torch.Tensor, teacher: nn.Module, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch i's teacher top-k (computing and storing it the first time), on x's device."""
        if tuple(x.shape) != self.row[:2]:
            raise SlmforgeError(f"{self.folder}: batch {i} has shape {tuple(x.shape)}, the cache {self.row[:2]}")
        if i >= self.n:
            self._open(i + 1)
        if not self.filled[i]:
            with torch.no_grad():
                values, indices = teacher_topk(teacher_on(teacher, x.device)(x)[0][..., :vocab], self.row[2])
            self._reserve(i)
            self.values[i] = values.cpu().numpy().astype(np.float16)
            self.indices[i] = indices.cpu().numpy()
            self.values.flush()
            self.indices.flush()
            self.filled[i] = 1
            self.filled.flush()
        # Read back what is stored, so a run that computes a batch and one that reads it train the same.
        return (torch.from_numpy(np.asarray(self.values[i], dtype=np.float32)).to(x.device),
                torch.from_numpy(np.asarray(self.indices[i])).to(x.device))

    def _reserve(self, i: int) -> None:
        """Give batch i's bytes real disk blocks before writing them through the memory map: on a full disk
        that raises ENOSPC here, where a write to an unbacked sparse page would kill the process (SIGBUS)."""
        per = int(np.prod(self.row))
        for path, offset, size in zip(self._paths(), (i * per * 2, i * per * 4, i), (per * 2, per * 4, 1), strict=True):
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, offset, size)
            except OSError as e:
                raise SlmforgeError(f"{self.folder}: cannot store the teacher's top-k logits "
                                    f"({e.strerror or e})") from None
            finally:
                os.close(fd)

    @property
    def filled_batches(self) -> int:
        return int(np.asarray(self.filled).sum()) if self.n else 0


# ---------------------------------------------------------------------------------------------------------
# Sequence-level distillation (Kim & Rush 2016): the teacher answers prompts, the student fine-tunes on them.
#
#     slmforge distill generate --teacher SPEC --prompts prompts.jsonl --out train.jsonl
#     slmforge finetune --task lm|chat|classify --model STUDENT --data train.jsonl   (the stats say which)
#
# Only text passes between the two models, so the teacher may have any tokenizer: a model directory,
# `slmforge serve` or any OpenAI-compatible endpoint (an LM spec for slmforge.lm.open_lm). The output is
# written as data/synth.py writes its files: a batch of whole lines at a time, flushed and fsynced; a re-run
# cuts off a line left incomplete by a kill and asks only for the (prompt, sample) pairs that have no row yet.

SEQ_APIS = ("auto", "chat", "completion")
_ROW_META = ("prompt_index", "sample", "teacher")  # the resume key and provenance of every output row
_STUDENT_FIELDS = {"lm": ("prompt", "completion"), "chat": ("messages",), "classify": ("text", "label")}


@with_config(STRICT)
@dataclass
class SeqDistillConfig:
    """Every setting of `slmforge distill generate`; its CLI options and YAML mapping are made from these."""

    teacher: str | None = setting(None, "Teacher LM spec (required): a model directory, or "
                                        "openai:<base_url>#<model> (slmforge serve, vLLM, any "
                                        "OpenAI-compatible endpoint).")
    prompts: str | None = setting(None, "Prompts file (required): JSONL (see --prompt-field) or .txt, one "
                                        "prompt per line.")
    out: str | None = setting(None, "Output JSONL for finetune (required; re-running resumes; stats in "
                                    "OUT.stats.json).")
    prompt_field: str = setting("prompt", "JSONL: the field holding each prompt: a string, or a list of chat "
                                          "messages (trailing assistant turns are dropped: the teacher "
                                          "answers).")
    template: str | None = setting(None, "String prompts: the text the teacher gets, with {prompt} for the "
                                         "prompt (default: the prompt as is).")
    system_prompt: str | None = setting(None, "A system message for the teacher only (not written to the "
                                              "rows: the student learns to answer without it).")
    labels: list[str] | None = setting(None, "Classification: the label set; each answer is mapped to the "
                                             "one label it names and the row is text/label; answers naming "
                                             "none (or several) are dropped and counted.")
    keep_fields: list[str] = setting(help="JSONL fields carried into each output row (e.g. the gold label; a "
                                          "name the row already uses gets the prefix source_).", factory=list)
    api: str = setting("auto", "How the teacher is asked: chat, completion (raw continuation), or auto "
                               "(completion for a local model without a chat template, chat otherwise).")
    max_new_tokens: int = setting(256, "Most tokens per answer.")
    # greedy by default: sequence-level KD trains on the teacher's mode (Kim & Rush find it by beam search)
    temperature: float = setting(0.0, "Teacher sampling temperature (0: greedy).")
    top_p: float = setting(1.0, "Teacher nucleus sampling (1: off).")
    n_samples: int = setting(1, "Answers per prompt (more than 1 needs temperature > 0).")
    seed: int = setting(0, "Sampling seed: answer j to prompt i is sampled with a seed from (seed, i, j).")
    max_prompts: int | None = setting(None, "Answer only the first N prompts (default: all).")
    concurrency: int = setting(8, "Requests in flight (remote teachers).")
    requests_per_minute: float = setting(0.0, "Remote teachers: requests per minute (0: unlimited).",
                                         aliases=("--rpm",))
    max_retries: int = setting(6, "Remote teachers: retries per request (backoff, Retry-After).")
    batch_size: int = setting(32, "Answers written per batch (a kill loses at most one batch's work).")
    progress: bool = setting(True, "Show progress.")

    def __post_init__(self) -> None:
        labels = [str(x).strip() for x in self.labels or []]
        checks = [
            (bool(self.teacher), "teacher is required (--teacher: a model directory or "
                                 "openai:<base_url>#<model>)"),
            (bool(self.prompts), "prompts is required (--prompts: a JSONL or .txt file)"),
            (bool(self.out), "out is required (--out: the JSONL file to write)"),
            (bool(self.prompt_field), "prompt_field must not be empty"),
            (self.api in SEQ_APIS, f"api must be one of {', '.join(SEQ_APIS)}"),
            (self.template is None or "{prompt}" in self.template, "template must contain {prompt}"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.n_samples >= 1, "n_samples must be >= 1"),
            # greedy decoding gives the same answer every time: n copies would only weigh the prompt n times
            (self.n_samples == 1 or self.temperature > 0, "n_samples > 1 needs temperature > 0"),
            (self.max_prompts is None or self.max_prompts >= 1, "max_prompts must be >= 1"),
            (self.concurrency >= 1, "concurrency must be >= 1"),
            (self.requests_per_minute >= 0, "requests_per_minute must be >= 0"),
            (self.max_retries >= 0, "max_retries must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.labels is None or (all(labels) and len({x.lower() for x in labels}) == len(labels) >= 2),
             "labels must be at least two distinct non-empty names"),
            (all(self.keep_fields) and len(set(self.keep_fields)) == len(self.keep_fields),
             "keep_fields must be distinct non-empty names"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"distill generate config: {msg}")
        if self.labels is not None:
            self.labels = labels


@dataclass
class SeqPrompt:
    """One prompt of the prompts file, checked."""

    index: int
    where: str                  # file:line, for messages
    value: str | list[dict]     # the student's input: the prompt text, or the conversation so far
    kept: dict                  # keep_fields, under their output names


def _messages(where: str, name: str, value: list) -> list[dict]:
    """A prompt conversation, checked; trailing assistant turns (a gold answer) give way to the teacher's."""
    from slmforge.train.rows import ROLES

    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise SlmforgeError(f"{where}: {name}[{i}] needs 'role' ({'/'.join(ROLES)}) and string 'content'")
    msgs = [{"role": m["role"], "content": m["content"]} for m in value]
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if not any(m["role"] == "user" for m in msgs):
        raise SlmforgeError(f"{where}: field '{name}' has no user turn for the teacher to answer")
    return msgs


def read_prompts(cfg: SeqDistillConfig) -> tuple[list[SeqPrompt], str]:
    """The prompts (the first max_prompts) and the finetune task their rows are for: lm (prompt/completion),
    chat (messages) or classify (text/label). Every problem is an error naming file:line, raised before
    anything is asked or written."""
    from slmforge.io import read_jsonl_lines

    path, name = Path(cfg.prompts), cfg.prompt_field
    if not path.is_file():
        raise SlmforgeError(f"{path}: is a directory" if path.is_dir() else f"{path}: no such file")
    limit = cfg.max_prompts or float("inf")
    records: list[tuple[str, dict]] = []
    if path.suffix.lower() == ".txt":
        if cfg.keep_fields:
            raise SlmforgeError(f"{path}: keep_fields needs JSONL prompts (a .txt file has no fields)")
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if len(records) >= limit:
                    break
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    raise SlmforgeError(f"{path}:{lineno}: not valid UTF-8") from None
                if line.strip():
                    records.append((f"{path}:{lineno}", {name: line}))
    else:
        for lineno, rec in read_jsonl_lines(path):
            if len(records) >= limit:
                break
            records.append((f"{path}:{lineno}", rec))
    if not records:
        raise SlmforgeError(f"{path}: no prompts")

    prompts, kind, first = [], "", ""
    for index, (where, rec) in enumerate(records):
        value = rec.get(name)
        if value is None:
            raise SlmforgeError(f"{where}: missing field '{name}'")
        if isinstance(value, str):
            if not value.strip():
                raise SlmforgeError(f"{where}: field '{name}' is empty")
        elif isinstance(value, list):
            value = _messages(where, name, value)
        else:
            raise SlmforgeError(f"{where}: field '{name}' must be a string or a list of chat messages, got "
                                f"{type(value).__name__}")
        k = "chat" if isinstance(value, list) else "classify" if cfg.labels else "lm"
        if kind and k != kind:  # one file, one finetune task
            raise SlmforgeError(f"{where}: field '{name}' makes a {k} row here but {kind} rows at {first}")
        kind, first = kind or k, first or where
        missing = next((f for f in cfg.keep_fields if f not in rec), None)
        if missing is not None:
            raise SlmforgeError(f"{where}: missing field '{missing}' (named in keep_fields)")
        own = {*_STUDENT_FIELDS[k], *_ROW_META}
        kept = {(f"source_{f}" if f in own else f): rec[f] for f in cfg.keep_fields}
        prompts.append(SeqPrompt(index, where, value, kept))
    if kind == "chat" and cfg.template is not None:
        raise SlmforgeError(f"{path}: template applies to string prompts; field '{name}' holds chat messages")
    return prompts, kind


def _teacher_input(cfg: SeqDistillConfig, p: SeqPrompt, api: str) -> str | list[dict]:
    """What the teacher is sent: a conversation (chat) or a text to continue (completion)."""
    if isinstance(p.value, list):
        if cfg.system_prompt is None:
            return p.value
        # the given system prompt replaces the conversation's own (two system turns break many templates)
        rest = [m for m in p.value if m["role"] != "system"]
        return [{"role": "system", "content": cfg.system_prompt}, *rest]
    text = cfg.template.replace("{prompt}", p.value) if cfg.template else p.value
    if api == "completion":
        return f"{cfg.system_prompt}\n\n{text}" if cfg.system_prompt else text
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return [*system, {"role": "user", "content": text}]


def _student_input(cfg: SeqDistillConfig, p: SeqPrompt, kind: str) -> dict:
    """A row's input fields: everything but the teacher's answer."""
    if kind == "chat":
        return {"messages": p.value}
    if kind == "classify":  # finetune puts the text into its own classification prompt
        return {"text": p.value}
    return {"prompt": cfg.template.replace("{prompt}", p.value) if cfg.template else p.value}


def map_label(answer: str, labels: list[str]) -> str | None:
    """The label an answer names: the whole answer (case, spacing, quotes and punctuation aside), else the one
    label it mentions as a word or phrase (a longer label wins over one inside it: "very positive", not
    "positive"). None when it names no label or several: such a row would teach a guess."""
    from slmforge.train.rows import phrase_spans

    def norm(s: str) -> str:
        return " ".join(s.lower().split())

    by_norm = {norm(x): x for x in labels}
    whole = norm(answer.strip().strip(string.punctuation + "\"'“”‘’ \t\n"))
    if whole in by_norm:
        return by_norm[whole]
    named = {by_norm.get(norm(answer[s:e])) for s, e in phrase_spans(answer, labels)} - {None}
    return named.pop() if len(named) == 1 else None


def _resume(path: Path, cfg: SeqDistillConfig, prompts: list[SeqPrompt], kind: str) -> tuple[set, int, int]:
    """(prompt, sample) pairs already answered in `path`, its number of rows, and the bytes cut off its end.
    A cut last line (a killed run) is removed first. A row made from another prompt at its index (the prompts
    file or the template changed) or of another kind is an error: never mixed in."""
    from slmforge.data.synth import cut_partial_last_line

    if not path.is_file():
        return set(), 0, 0
    cut = cut_partial_last_line(path)
    done: set[tuple[int, int]] = set()
    n_rows = 0
    fresh = f"; write to a new --out file (or delete {path})"
    with open(path, "rb") as f:  # streamed: the file can be large
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = (row["prompt_index"], row["sample"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise SlmforgeError(f"{path}:{lineno}: not a distill generate row (invalid JSON or no "
                                    f"prompt_index/sample){fresh}") from None
            if not all(isinstance(k, int) and k >= 0 for k in key):
                raise SlmforgeError(f"{path}:{lineno}: prompt_index and sample must be integers >= 0{fresh}")
            if key in done:
                raise SlmforgeError(f"{path}:{lineno}: a second row for prompt {key[0]} sample {key[1]}")
            i = key[0]
            if i < len(prompts):  # rows past max_prompts or n_samples stay as they are
                expected = _student_input(cfg, prompts[i], kind)
                got = {k: row.get(k) for k in expected}
                if kind == "chat" and isinstance(got["messages"], list):
                    got["messages"] = got["messages"][:-1]  # without the teacher's answer
                if got != expected or any(f not in row for f in _STUDENT_FIELDS[kind]):
                    raise SlmforgeError(f"{path}:{lineno}: not an answer to prompt {i} ({prompts[i].where}) "
                                        f"as now configured: the prompts, template or labels changed{fresh}")
            done.add(key)
            n_rows += 1
    return done, n_rows, cut


def _resolve_api(cfg: SeqDistillConfig, lm) -> str:
    if cfg.api != "auto":
        return cfg.api
    if lm is not None:  # an opened LM: a local one without a chat template is a plain LM
        tok = getattr(lm, "tokenizer", None)
        return "completion" if tok is not None and not tok.chat_template else "chat"
    from slmforge.data.synth import is_base_lm

    return "completion" if is_base_lm(cfg.teacher) else "chat"


def sample_seed(seed: int, index: int, sample: int) -> int:
    """The sampling seed of answer `sample` to prompt `index`: fixed by the three, whatever ran before."""
    return random.Random(f"{seed}-{index}-{sample}").getrandbits(31)


def generate_targets(cfg: SeqDistillConfig, *, lm=None) -> dict:
    """Have the teacher answer every prompt n_samples times and write the answers as finetune rows to cfg.out,
    resuming what is there. Returns the stats, also written to cfg.out + ".stats.json". `lm`: an opened LM
    (slmforge.lm) to use instead of opening cfg.teacher.

    Rows: {"prompt", "completion"} (task lm), {"messages"} (chat, the answer as the last assistant turn) or
    {"text", "label"} (classify, with labels), then the kept fields, then "prompt_index", "sample" (the resume
    key) and "teacher". Answers that fail (after retries), come back empty or name no label get no row and
    are counted; a re-run asks for them again. A batch in which every request fails stops the run."""
    from slmforge.data.synth import _progress
    from slmforge.infer.sampling import SamplingParams
    from slmforge.lm import Usage, open_lm

    out, prompts_path = Path(cfg.out), Path(cfg.prompts)
    if out.is_dir():
        raise SlmforgeError(f"{out}: is a directory (--out is the JSONL file to write)")
    if out.exists() and prompts_path.exists() and out.resolve() == prompts_path.resolve():
        raise SlmforgeError(f"{out}: the output would overwrite the prompts file")
    prompts, kind = read_prompts(cfg)
    api = _resolve_api(cfg, lm)
    if kind == "chat" and api == "completion":
        raise SlmforgeError(f"{prompts_path}: chat-message prompts need a chat teacher; {cfg.teacher} is "
                            f"asked for raw continuations (a model without a chat template, or --api "
                            f"completion)")
    done, n_rows, cut = _resume(out, cfg, prompts, kind)
    pairs = [(p.index, j) for p in prompts for j in range(cfg.n_samples)]
    todo = [ij for ij in pairs if ij not in done]

    opened = None
    if lm is None and todo:  # (nothing left to do: no need to load a model or reach a server)
        lm = opened = open_lm(cfg.teacher, concurrency=cfg.concurrency, max_retries=cfg.max_retries,
                              requests_per_minute=cfg.requests_per_minute)
    name = getattr(lm, "name", cfg.teacher) if lm is not None else cfg.teacher
    usage: Usage = lm.usage if lm is not None else Usage()
    usage_before = usage.to_dict()
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    inputs = {p.index: _teacher_input(cfg, p, api) for p in prompts}
    stats = {"teacher": name, "prompts_file": str(prompts_path), "out": str(out), "task": kind, "api": api,
             "prompts": len(prompts), "n_samples": cfg.n_samples, "skipped": len(pairs) - len(todo),
             "generated": 0, "failed": 0, "empty": 0, "dropped": 0, "truncated_bytes": cut, "rows": n_rows,
             "missing": len(todo), "complete": not todo, "seconds": 0.0, "usage": {}, "config": asdict(cfg)}

    def ask(ij: tuple[int, int]) -> str | SlmforgeError:
        # one request per answer, each with its own seed (reproducible where the endpoint honours seeds)
        params = replace(sampling, seed=sample_seed(cfg.seed, *ij))
        try:
            if api == "chat":
                return lm.chat([inputs[ij[0]]], params)[0]
            return lm.generate([inputs[ij[0]]], params)[0]
        except SlmforgeError as e:  # counted; a re-run asks again
            return e

    # OpenAILM.map keeps `concurrency` requests in flight; a local model answers one prompt at a time
    pool_map = getattr(lm, "map", None)
    # a batch waits for its slowest request: keep several rounds of requests in each (as synth does)
    batch_size = max(cfg.batch_size, 4 * int(getattr(lm, "concurrency", 1) or 1))
    t0 = time.perf_counter()
    bar = _progress(cfg.progress, f"distill generate ({name})", len(todo))
    f = None
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            replies = pool_map(ask, batch) if callable(pool_map) else [ask(ij) for ij in batch]
            errors = [r for r in replies if isinstance(r, SlmforgeError)]
            stats["failed"] += len(errors)
            lines = []
            for (i, j), reply in zip(batch, replies, strict=True):
                if isinstance(reply, SlmforgeError):
                    continue
                # a continuation keeps its leading space (it joins the prompt); a chat answer is a message
                answer = reply if api == "completion" and kind == "lm" else reply.strip()
                if not answer.strip():  # finetune refuses an empty completion: drop it here, counted
                    stats["empty"] += 1
                    continue
                fields = _student_input(cfg, prompts[i], kind)
                if kind == "lm":
                    fields["completion"] = answer
                elif kind == "chat":
                    fields["messages"] = [*fields["messages"], {"role": "assistant", "content": answer}]
                else:
                    label = map_label(answer, cfg.labels)
                    if label is None:
                        stats["dropped"] += 1
                        continue
                    fields["label"] = label
                row = {**fields, **prompts[i].kept, "prompt_index": i, "sample": j, "teacher": name}
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
                done.add((i, j))
            if lines:
                if f is None:  # opened at the first answer: a teacher that never answers leaves no file
                    out.parent.mkdir(parents=True, exist_ok=True)
                    f = open(out, "ab")  # kept open across batches, closed in finally
                f.write("".join(lines).encode("utf-8"))  # whole lines, onto the disk, before the next batch
                f.flush()
                os.fsync(f.fileno())
                stats["generated"] += len(lines)
                stats["rows"] += len(lines)
            if bar is not None:
                rate = stats["generated"] / (time.perf_counter() - t0)
                bar[0].update(bar[1], advance=len(batch), rate=f"{rate:,.1f}")
            if errors and len(errors) == len(batch):
                # the teacher is down or rejects every request: stop, rather than wait out the retries of
                # every prompt left; what was written stays, and a re-run resumes
                raise SlmforgeError(f"teacher {name}: all {len(batch)} requests of a batch failed, the "
                                    f"first: {errors[0]} ({stats['generated']} rows written by this run; "
                                    f"re-run to resume)")
    finally:
        if f is not None:
            f.close()
        if bar is not None:
            bar[0].stop()
        if opened is not None and hasattr(opened, "close"):
            opened.close()
        stats["missing"] = sum(ij not in done for ij in pairs)
        stats["complete"] = not stats["missing"]
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        stats["usage"] = {k: (round(v - usage_before.get(k, 0), 6) if isinstance(v, (int, float)) and
                              k not in ("price_in", "price_out") else v) for k, v in usage.to_dict().items()}
        if out.is_file():  # never a stats file without its output (a teacher that never answered)
            write_json(f"{out}.stats.json", stats)
    return stats
