"""Knowledge distillation losses: a student learns a teacher's output distribution as well as the data.

    loss = alpha * T^2 * D(teacher_T || student_T) + (1 - alpha) * CE(student, data)

with p_T = softmax(logits / T) and D one of (beta as in TRL's GKD, arXiv:2306.13649)

    forward_kl   KL(teacher || student)     mode-covering: the student spreads over all the teacher allows
    reverse_kl   KL(student || teacher)     mode-seeking: the student keeps to the teacher's likeliest outputs
    jsd          beta * KL(teacher || M) + (1 - beta) * KL(student || M),  M = beta * teacher + (1 - beta) * student

The T^2 factor keeps the gradient of the soft term on the scale of the hard one as T changes (Hinton et al.).
With top_k set, both distributions are taken over the teacher's k likeliest tokens at each position and
renormalised there (what a top-k logit cache stores; DistillKit's sparse distillation).

The loss functions here wrap a stage's own loss: in training they add the teacher term; in evaluation they
return the stage's loss unchanged, so a distilled run's val_loss is the student's cross-entropy and compares
with a run without a teacher.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import with_config

from slmforge.errors import ConfigError
from slmforge.stage_config import STRICT, setting

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@with_config(STRICT)
@dataclass
class DistillConfig:
    """The teacher term of a distillation run (the rest of the run is the stage's own config)."""

    loss: str = setting("forward_kl", "Divergence to the teacher: forward_kl, reverse_kl or jsd.")
    alpha: float = setting(0.5, "Weight of the teacher term (1 - alpha on the data's cross-entropy).")
    temperature: float = setting(1.0, "Softmax temperature of both distributions (the term is scaled by T^2).")
    beta: float = setting(0.5, "jsd: the mixture weight of the teacher (0 ~ forward KL, 1 ~ reverse KL).")
    top_k: int | None = setting(None, "Distil over the teacher's k likeliest tokens only (default: all).")
    lmbda: float = setting(0.0, "On-policy share (GKD's lambda): this share of training batches is continued by the "
                                "student from half-way (sampled at temperature 1) and the teacher term is taken on "
                                "the student's own tokens (no data term on those batches).")
    cache: str | None = setting(None, "pretrain: a folder caching the teacher's top-k logits, filled as training "
                                      "reads batches and reused by later runs on the same batches (needs top_k).")

    def __post_init__(self) -> None:
        checks = [
            (self.loss in DIVERGENCES, f"loss must be one of {', '.join(DIVERGENCES)}"),
            (0 <= self.alpha <= 1, "alpha must be in [0, 1]"),
            (self.temperature > 0, "temperature must be > 0"),
            (0 < self.beta < 1, "beta must be in (0, 1) (use forward_kl or reverse_kl for the ends)"),
            (self.top_k is None or self.top_k >= 2, "top_k must be >= 2"),
            (self.cache is None or self.top_k is not None, "cache needs top_k (it stores the top-k logits)"),
            (0 <= self.lmbda <= 1, "lmbda must be in [0, 1]"),
            (not (self.lmbda and self.cache), "lmbda (on-policy) and cache exclude each other: the teacher scores "
                                              "tokens the student samples, which no cache holds"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"distill config: {msg}")


def divergence(student: torch.Tensor, teacher: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """D(teacher_T || student_T) per row, times T^2. student/teacher: (..., V) logits over the same classes."""
    T = cfg.temperature
    s = F.log_softmax(student.float() / T, dim=-1)
    t = F.log_softmax(teacher.float() / T, dim=-1)
    if cfg.loss == "forward_kl":
        d = (t.exp() * (t - s)).sum(-1)
    elif cfg.loss == "reverse_kl":
        d = (s.exp() * (s - t)).sum(-1)
    else:
        b = cfg.beta
        m = torch.logsumexp(torch.stack([t + math.log(b), s + math.log(1 - b)]), dim=0)
        d = b * (t.exp() * (t - m)).sum(-1) + (1 - b) * (s.exp() * (s - m)).sum(-1)
    return d * T * T


def topk_divergence(student: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor,
                    cfg: DistillConfig) -> torch.Tensor:
    """divergence() over the teacher's top-k tokens: student (..., V) logits, teacher (..., k) logits at
    top_indices (..., k); both renormalised over those k."""
    return divergence(student.gather(-1, top_indices.long()), top_values, cfg)


def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = logits.float().topk(k, dim=-1)
    return values, indices.to(torch.int32)


def _mix(kd: torch.Tensor, ce: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    return cfg.alpha * kd + (1 - cfg.alpha) * ce


def teacher_on(teacher: nn.Module, device: torch.device) -> nn.Module:
    """The teacher, moved to the student's device the first time (train() moves only the student)."""
    if next(teacher.parameters()).device != device:
        teacher.to(device)
    return teacher


# (i, x) -> (values, indices): the teacher's top-k logits for micro-batch i (TopKCache.lookup)
TopKSource = Callable[[int, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def lm_kd_loss(teacher: nn.Module, cfg: DistillConfig, vocab: int, topk_source: TopKSource | None = None):
    """Token-level distillation for batches (x, y[, i]) or {"x", "y"}: the teacher term over positions with a
    target (y != -100), over the tokenizer's `vocab` (model vocabularies may be padded differently)."""
    teacher.eval().requires_grad_(False)
    coin = random.Random(0)  # which batches are on-policy: the same ones in every run with the same settings

    def loss(model: nn.Module, batch) -> torch.Tensor:
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else (batch[0], batch[1])
        if model.training and cfg.lmbda and coin.random() < cfg.lmbda:
            return on_policy_loss(model, teacher, x, cfg, vocab)
        logits, ce = model(x, y)
        if not model.training:
            return ce
        keep = y.reshape(-1) != -100
        student = logits[..., :vocab].reshape(-1, vocab)[keep]
        if topk_source is not None:
            values, indices = topk_source(int(batch[2]), x)
            kd = topk_divergence(student, values.reshape(-1, values.shape[-1])[keep],
                                 indices.reshape(-1, indices.shape[-1])[keep], cfg)
        else:
            with torch.no_grad():
                t_logits = teacher_on(teacher, x.device)(x)[0][..., :vocab].reshape(-1, vocab)[keep]
            if cfg.top_k:
                values, indices = teacher_topk(t_logits, cfg.top_k)
                kd = topk_divergence(student, values, indices, cfg)
            else:
                kd = divergence(student, t_logits, cfg)
        return _mix(kd.mean() if kd.numel() else ce * 0, ce, cfg)

    return loss


@torch.no_grad()
def student_continue(model: nn.Module, x: torch.Tensor, start: int, vocab: int) -> torch.Tensor:
    """x (B, T) with positions start.. replaced by the student's own samples (temperature 1, KV cache)."""
    from slmforge.model import KVCache

    was_training = model.training
    model.eval()
    B, T = x.shape
    cache = KVCache(model.config, B, T, device=x.device, dtype=next(model.parameters()).dtype)
    out = x.clone()
    logits, _ = model(out[:, :start], cache=cache, pos=0, last_only=True)
    for t in range(start, T):
        probs = logits[:, -1, :vocab].float().softmax(-1)
        out[:, t] = torch.multinomial(probs, 1)[:, 0]
        if t + 1 < T:
            logits, _ = model(out[:, t:t + 1], cache=cache, pos=t)
    model.train(was_training)
    return out


def on_policy_loss(model: nn.Module, teacher: nn.Module, x: torch.Tensor, cfg: DistillConfig,
                   vocab: int) -> torch.Tensor:
    """GKD's on-policy term: the student continues each sequence from half-way, both models score the
    student's tokens, and the divergence is taken where the student chose the next token."""
    start = max(1, x.shape[1] // 2)
    xs = student_continue(getattr(model, "module", model), x, start, vocab)  # DDP: sample on the local copy
    logits, _ = model(xs)
    student = logits[:, start - 1:, :vocab].reshape(-1, vocab)
    with torch.no_grad():
        t_logits = teacher_on(teacher, x.device)(xs)[0][:, start - 1:, :vocab].reshape(-1, vocab)
    if cfg.top_k:
        values, indices = teacher_topk(t_logits, cfg.top_k)
        return topk_divergence(student, values, indices, cfg).mean()
    return divergence(student, t_logits, cfg).mean()


def classifier_kd_loss(teacher: nn.Module, cfg: DistillConfig):
    """Distil a classifier's label distribution: batches {"x", "last", "label"[, "weight"]}; both models are
    SequenceClassifiers over the same labels in the same order."""
    teacher.eval().requires_grad_(False)

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        logits = model(batch["x"], batch["last"]).float()
        ce = F.cross_entropy(logits, batch["label"], weight=batch.get("weight"))
        if not model.training:
            return ce
        with torch.no_grad():
            t_logits = teacher_on(teacher, batch["x"].device)(batch["x"], batch["last"])
        return _mix(divergence(logits, t_logits, cfg).mean(), ce, cfg)

    return loss


def tagger_kd_loss(teacher: nn.Module, cfg: DistillConfig, ignore: int = -100):
    """Distil a token tagger's O/B/I distribution at every tagged token: batches {"x", "tags"}."""
    teacher.eval().requires_grad_(False)

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        logits = model(batch["x"]).float().flatten(0, 1)
        tags = batch["tags"].flatten()
        ce = F.cross_entropy(logits, tags, ignore_index=ignore)
        if not model.training:
            return ce
        keep = tags != ignore
        with torch.no_grad():
            t_logits = teacher_on(teacher, batch["x"].device)(batch["x"]).flatten(0, 1)
        return _mix(divergence(logits[keep], t_logits[keep], cfg).mean(), ce, cfg)

    return loss
