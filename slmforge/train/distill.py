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

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from slmforge.errors import SlmforgeError
from slmforge.io import file_sha256, read_json, write_json
from slmforge.modeldir import ModelDir
from slmforge.tokenizer import Tokenizer
from slmforge.train.kd import (
    DistillConfig,
    classifier_kd_loss,
    lm_kd_loss,
    tagger_kd_loss,
    teacher_on,
    teacher_topk,
)

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
        if sizes != [n * per * 2, n * per * 4]:
            raise SlmforgeError(f"{self.folder}: corrupt top-k cache (file sizes do not match {n} batches); "
                                f"delete it")
        if need > n:  # grow (sparse files: unwritten batches take no disk)
            n = max(need, 2 * n, 64)
            for p, size in ((values, n * per * 2), (indices, n * per * 4), (filled, n)):
                with open(p, "ab") as f:
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
            self.values[i] = values.cpu().numpy().astype(np.float16)
            self.indices[i] = indices.cpu().numpy()
            self.values.flush()
            self.indices.flush()
            self.filled[i] = 1
            self.filled.flush()
        # Read back what is stored, so a run that computes a batch and one that reads it train the same.
        return (torch.from_numpy(np.asarray(self.values[i], dtype=np.float32)).to(x.device),
                torch.from_numpy(np.asarray(self.indices[i])).to(x.device))

    @property
    def filled_batches(self) -> int:
        return int(np.asarray(self.filled).sum()) if self.n else 0

