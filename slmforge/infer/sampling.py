"""Sampling: per-row temperature, top-k, top-p, repetition, frequency and presence penalties, vectorised
over a batch.

Every row of a batch may belong to a different request with its own parameters, so the parameters are
tensors with one entry per row. Each request draws its own uniform number per token from its own seeded
`random.Random`, and the token is picked by inverse CDF: a request's tokens do not depend on what else
is in the batch, so continuous batching gives the same output as running the request alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from slmforge.errors import SlmforgeError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the context (CTRL-style)
    # OpenAI's, over the tokens generated so far: logit -= count * frequency + (count > 0) * presence
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SlmforgeError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise SlmforgeError("temperature must be >= 0")
        if self.top_k < 0:
            raise SlmforgeError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise SlmforgeError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise SlmforgeError("repetition_penalty must be > 0")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise SlmforgeError(f"{name} must be in [-2, 2]")

    @property
    def counts_generated(self) -> bool:
        """Whether sampling needs the counts of the tokens generated so far."""
        return self.frequency_penalty != 0 or self.presence_penalty != 0


@dataclass
class RowParams:
    """Sampling parameters of B rows as tensors (a slice of the engine's per-slot buffers)."""

    temperature: torch.Tensor  # (B,) float, 0 = greedy
    top_k: torch.Tensor  # (B,) long, 0 = off
    top_p: torch.Tensor  # (B,) float, 1 = off
    penalty: torch.Tensor  # (B,) float, 1 = off
    # Python-side summaries, so that unused filters cost nothing and checking them needs no sync.
    any_sampled: bool = True
    max_top_k: int = 0
    any_top_p: bool = False
    any_penalty: bool = False
    frequency: torch.Tensor | None = None  # (B,) float, 0 = off
    presence: torch.Tensor | None = None  # (B,) float, 0 = off
    any_counts: bool = False  # some row has a frequency or presence penalty

    @classmethod
    def repeat(cls, p: SamplingParams, batch: int, device=None) -> RowParams:
        def full(v, dtype):
            return torch.full((batch,), v, dtype=dtype, device=device)
        return cls(full(p.temperature, torch.float32), full(p.top_k, torch.long), full(p.top_p, torch.float32),
                   full(p.repetition_penalty, torch.float32), any_sampled=p.temperature > 0,
                   max_top_k=p.top_k, any_top_p=p.top_p < 1, any_penalty=p.repetition_penalty != 1,
                   frequency=full(p.frequency_penalty, torch.float32), presence=full(p.presence_penalty, torch.float32),
                   any_counts=p.counts_generated)


def apply_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL / HF repetition penalty on tokens in `seen` (B, V) bool: positive logits divided, negative
    multiplied."""
    pen = penalty[:, None]
    penalised = torch.where(logits > 0, logits / pen, logits * pen)
    return torch.where(seen, penalised, logits)


def apply_counts_penalty(logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor,
                         presence: torch.Tensor) -> torch.Tensor:
    """OpenAI's frequency and presence penalties: `counts` (B, V) is how often each token was generated."""
    return logits - counts * frequency[:, None] - (counts > 0).to(logits.dtype) * presence[:, None]


def filter_logits(logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (HF's order), per row. Greedy rows are left unscaled."""
    temp = torch.where(rp.temperature > 0, rp.temperature, 1.0)
    logits = logits / temp[:, None]
    V = logits.size(-1)
    if 0 < rp.max_top_k:
        k = torch.where((rp.top_k > 0) & (rp.top_k < V), rp.top_k, V)
        kmax = min(rp.max_top_k, V)
        top = torch.topk(logits, kmax, dim=-1).values  # (B, kmax), descending
        kth = top.gather(1, (k.clamp(max=kmax) - 1)[:, None])
        kth = torch.where((k < V)[:, None], kth, float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if rp.any_top_p:
        logits = _top_p(logits, rp.top_p)
    return logits


def _top_p(logits: torch.Tensor, top_p: torch.Tensor, candidates: int = 256) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until the mass before them reaches top_p (always the
    best one). Sorting a 32k vocabulary costs ~2 ms a token on CPU, so sort only the best `candidates`
    (topk) and fall back to the full sort in the rare step where they do not hold the nucleus."""
    probs = logits.softmax(-1)
    V = probs.size(-1)
    off = top_p >= 1
    if candidates < V:
        best = probs.topk(candidates, dim=-1).values  # descending
        if not bool(((best.sum(-1) >= top_p) | off).all()):
            best = probs.sort(dim=-1, descending=True).values
    else:
        best = probs.sort(dim=-1, descending=True).values
    keep = (best.cumsum(-1) - best) < top_p[:, None]
    threshold = best.gather(1, (keep.sum(-1) - 1).clamp(min=0)[:, None])  # smallest kept probability
    threshold = torch.where(off[:, None], 0.0, threshold)
    return logits.masked_fill(probs < threshold, float("-inf"))


def pick(logits: torch.Tensor, rp: RowParams, uniform: torch.Tensor | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,): argmax for greedy rows, inverse CDF at `uniform` (B,) for the rest."""
    greedy = logits.argmax(-1)
    if not rp.any_sampled or uniform is None:
        return greedy
    cdf = filter_logits(logits, rp).softmax(-1).cumsum(-1)
    # right=True: the first index whose cdf exceeds u, so a token of probability 0 is never picked
    sampled = torch.searchsorted(cdf, (uniform.to(cdf.dtype) * cdf[:, -1])[:, None], right=True).squeeze(1)
    sampled = sampled.clamp(max=logits.size(-1) - 1)
    return torch.where(rp.temperature > 0, sampled, greedy)


def sample_next(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | random.Random | None,
                context: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,) for B rows sharing one SamplingParams.

    Filters in the order HF/vLLM apply them: penalties, temperature, top-k, top-p. context: (B, S) ids the
    repetition penalty applies to; counts: (B, V) how often each token was generated so far (frequency
    and presence penalties; without it they are not applied).
    """
    logits = logits.float()
    B = logits.size(0)
    rp = RowParams.repeat(p, B, logits.device)
    if rp.any_penalty and context is not None:
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, context, True)
        logits = apply_penalty(logits, seen, rp.penalty)
    if rp.any_counts and counts is not None:
        logits = apply_counts_penalty(logits, counts.to(logits.dtype), rp.frequency, rp.presence)
    uniform = None
    if rp.any_sampled:
        if isinstance(gen, random.Random):
            uniform = torch.tensor([gen.random() for _ in range(B)], device=logits.device)
        else:
            uniform = torch.rand(B, generator=gen).to(logits.device)
    return pick(logits, rp, uniform)
