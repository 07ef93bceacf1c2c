"""Generation with a KV cache: sampling (temperature, top-k, top-p, repetition penalty, seed), stop tokens
and stop strings, streamed as text deltas.

The cache is preallocated for prompt + max_new_tokens, so each decode step is one forward of one token
with no reallocation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from slmforge.errors import SlmforgeError
from slmforge.model import KVCache, LlamaModel
from slmforge.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the context (CTRL-style)
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


def sample_next(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None,
                context: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). Filters in the order HF applies them: penalty, temperature, top-k, top-p."""
    logits = logits.float()
    if p.repetition_penalty != 1.0 and context is not None:
        seen = logits.gather(1, context)
        seen = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        logits = logits.scatter(1, context, seen)
    if p.temperature == 0:
        return logits.argmax(-1)
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop tokens once the mass before them already reaches top_p (always keep the best one)
        drop = (cum - sorted_logits.softmax(-1)) >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


def _model_device_dtype(model: LlamaModel) -> tuple[torch.device, torch.dtype]:
    w = model.model.embed_tokens.weight
    return w.device, w.dtype


@torch.inference_mode()
def generate_ids(model: LlamaModel, prompt_ids: list[int], params: SamplingParams,
                 stop_ids: list[int] = ()) -> Iterator[int]:
    """Yield generated token ids one at a time (stops on a stop id, which is not yielded)."""
    ctx = model.config.max_position_embeddings
    if not prompt_ids:
        raise SlmforgeError("empty prompt: nothing to condition on (the model directory has no bos token)")
    # Keep the prompt's tail if prompt + new tokens would not fit the context window.
    budget = max(ctx - params.max_new_tokens, ctx // 2)
    prompt_ids = prompt_ids[-budget:]
    max_new = min(params.max_new_tokens, ctx - len(prompt_ids))
    device, dtype = _model_device_dtype(model)
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else torch.seed())
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new, device=device, dtype=dtype)
    ids = torch.tensor([prompt_ids], device=device)
    context = ids
    logits, _ = model(ids, cache=cache, pos=0, last_only=True)
    pos = ids.shape[1]
    stop = set(stop_ids)
    for _ in range(max_new):
        nxt = sample_next(logits[:, -1], params, gen, context if params.repetition_penalty != 1.0 else None)
        tok = int(nxt.item())
        if tok in stop:
            return
        yield tok
        if params.repetition_penalty != 1.0:
            context = torch.cat([context, nxt[:, None]], 1)
        if pos >= cache.max_len:
            return
        logits, _ = model(nxt[:, None], cache=cache, pos=pos, last_only=True)
        pos += 1


def stream_text(model: LlamaModel, tokenizer: Tokenizer, prompt: str, params: SamplingParams,
                bos: bool = True) -> Iterator[str]:
    """Yield text deltas of the continuation of `prompt`, honouring stop ids and stop strings.

    Text that could be the start of a stop string, or half of a multi-byte character, is held back until
    it is known not to be.
    """
    prompt_ids = tokenizer.encode(prompt, bos=bos)
    out: list[int] = []
    emitted = 0
    hold = max((len(s) for s in params.stop), default=0)
    for tok in generate_ids(model, prompt_ids, params, tokenizer.stop_ids):
        out.append(tok)
        text = tokenizer.decode(out)
        cut = min((i for s in params.stop if (i := text.find(s, max(0, emitted - len(s)))) >= 0), default=-1)
        if cut >= 0:
            if cut > emitted:
                yield text[emitted:cut]
            return
        safe = len(text) - (hold - 1 if hold else 0)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            safe = min(safe, len(text) - 1)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text = tokenizer.decode(out)
    if len(text) > emitted:
        yield text[emitted:]


def generate_text(model: LlamaModel, tokenizer: Tokenizer, prompt: str, params: SamplingParams,
                  bos: bool = True) -> str:
    return "".join(stream_text(model, tokenizer, prompt, params, bos=bos))
