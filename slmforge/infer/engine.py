"""Generation: a batch engine with continuous batching over a preallocated KV cache.

    engine = BatchEngine(model, tokenizer, max_batch=16)
    engine.add(Request(prompt_ids, SamplingParams(max_new_tokens=64), stop_ids=tokenizer.stop_ids))
    while engine.has_work:
        for u in engine.step():     # u.request, u.token, u.text (delta), u.finish_reason
            ...

The cache holds `max_batch` rows (slots) of `max_len` positions, allocated once. A request waits in a
queue until a slot is free; it is then prefilled into its slot (in chunks, so attention and logits stay
small) and from then on decoded together with every other active slot: one forward of shape
(slots, 1) per step, each row at its own position. Requests join and leave between steps.

Sampling (temperature, top-k, top-p, repetition penalty) runs vectorised over the batch with per-slot
parameters, and each request draws from its own seeded generator, so a request's output does not depend
on what else is in the batch. `generate_ids`, `stream_text` and `generate_text` run one request alone.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from slmforge.errors import SlmforgeError
from slmforge.infer.fastpath import decode_model
from slmforge.infer.sampling import RowParams, SamplingParams, apply_penalty, pick, sample_next
from slmforge.model import KVCache, LlamaModel
from slmforge.tokenizer import Tokenizer

__all__ = ["BatchEngine", "Request", "SamplingParams", "TextStream", "Update", "generate_ids", "generate_text",
           "sample_next", "stream_text"]

_request_ids = itertools.count()


class TextStream:
    """Token ids in, text deltas out, honouring stop strings.

    Text that could be the start of a stop string, or half of a multi-byte character, is held back until
    it is known not to be. `offsets[i]` is where token i's text starts in the output.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.offsets: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.emitted = 0
        self.stopped = False  # a stop string was found

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (text safe to show now, whether a stop string was reached)."""
        self.offsets.append(len(self.text))
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cut = min((i for s in self.stop if (i := text.find(s, max(0, self.emitted - len(s)))) >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self.flush(), True
        self.text = text
        safe = len(text) - (self.hold - 1 if self.hold else 0)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            safe = min(safe, len(text) - 1)
        if safe > self.emitted:
            delta, self.emitted = text[self.emitted:safe], safe
            return delta, False
        return "", False

    @property
    def n_tokens_in_text(self) -> int:
        """How many tokens make up `text`: after a stop string, those that start before it."""
        if not self.stopped:
            return len(self.ids)
        return sum(o < len(self.text) for o in self.offsets)

    def flush(self) -> str:
        """Everything not yet emitted (at the end of the request)."""
        delta, self.emitted = self.text[self.emitted:], max(self.emitted, len(self.text))
        return delta


@dataclass
class Request:
    """One generation request and, as it runs, its output."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int | None = None  # default params.max_new_tokens; 0 = only score the prompt
    stop_ids: Sequence[int] = ()
    logprobs: int | None = None  # None = off; n = the chosen token's log-prob and the n best alternatives
    prompt_logprobs: bool = False  # log-prob of every prompt token given the ones before it
    id: int = field(default_factory=lambda: next(_request_ids))
    # filled in by the engine
    output_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_token_logprobs: list[float | None] = field(default_factory=list)
    text: TextStream | None = None
    finish_reason: str | None = None  # "stop" (stop id or string), "length", or "cancelled"
    slot: int = -1

    def __post_init__(self) -> None:
        if self.max_new_tokens is None:
            self.max_new_tokens = self.params.max_new_tokens
        self.rng = random.Random(self.params.seed)  # seed None: seeded from the OS


@dataclass
class Update:
    """What one step did for one request: a new token (None when it ended without one) and text."""

    request: Request
    token: int | None
    text: str = ""
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def _model_device_dtype(model: LlamaModel) -> tuple[torch.device, torch.dtype]:
    w = model.model.embed_tokens.weight
    return w.device, w.dtype


class BatchEngine:
    """Continuous batching over `max_batch` KV-cache slots. Not thread-safe: one thread calls add/step."""

    def __init__(self, model: LlamaModel, tokenizer: Tokenizer | None = None, max_batch: int = 8,
                 max_len: int | None = None, prefill_chunk: int = 512, prefill_budget: int = 2048,
                 fast: bool = True, compile: bool = False):
        """fast: decode on `DecodeModel`, an inference copy of the weights laid out for one-token steps
        (False: the training model's own forward). compile: run that step compiled by torch.compile, one
        graph per batch size (10-25 s the first time; pays off for small models, where eager per-op
        overhead is most of a step)."""
        ctx = model.config.max_position_embeddings
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_len = max_batch, min(max_len or ctx, ctx)
        self.compile = compile and fast
        self.decoder = decode_model(model, max_batch, fixed=self.compile) if fast else None
        self.prefill_chunk = prefill_chunk  # tokens per prefill forward
        self.prefill_budget = prefill_budget  # prompt tokens admitted per step (at least one request)
        device, dtype = _model_device_dtype(model)
        self.device = device
        self.cache = KVCache(model.config, max_batch, self.max_len, device=device, dtype=dtype)
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        # Per-slot state on the device, written when a request is admitted and read as slices.
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=device)  # next token to feed
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)  # where it goes
        self.active = torch.zeros(max_batch, dtype=torch.long, device=device)  # 1 while decoding
        self.temperature = torch.zeros(max_batch, device=device)
        self.top_k = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.top_p = torch.ones(max_batch, device=device)
        self.penalty = torch.ones(max_batch, device=device)
        self.seen: torch.Tensor | None = None  # (max_batch, vocab) bool, made when a request needs it
        self.arange = torch.arange(self.max_len, device=device)
        self.pos_py = [0] * max_batch  # positions again, in Python, so kv_len needs no sync
        self.steps = 0  # decode forwards so far

    # ------------------------------------------------------------------------------------ requests

    def add(self, req: Request) -> Request:
        n = len(req.prompt_ids)
        if n == 0:
            raise SlmforgeError("empty prompt: nothing to condition on")
        if req.max_new_tokens < 0:
            raise SlmforgeError("max_new_tokens must be >= 0")
        if n + req.max_new_tokens > self.max_len:
            raise SlmforgeError(f"prompt of {n} tokens + {req.max_new_tokens} new tokens exceeds the context "
                                f"of {self.max_len}")
        if self.tokenizer is not None:
            req.text = TextStream(self.tokenizer, req.params.stop)
        self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Drop a request (a client went away); its slot is free for the next step."""
        if req.finish_reason is None:
            req.finish_reason = "cancelled"
        if req.slot >= 0:
            self._free(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    @property
    def n_active(self) -> int:
        return sum(r is not None for r in self.slots)

    def _free(self, req: Request) -> None:
        s = req.slot
        self.slots[s], req.slot = None, -1
        self.active[s], self.positions[s], self.pos_py[s] = 0, 0, 0

    # ---------------------------------------------------------------------------------------- step

    @torch.inference_mode()
    def step(self) -> list[Update]:
        """Admit waiting requests into free slots (prefill), then decode one token for every slot."""
        updates: list[Update] = []
        self._admit(updates)
        self._decode(updates)
        return updates

    def _admit(self, updates: list[Update]) -> None:
        budget = self.prefill_budget
        while self.waiting and None in self.slots and (budget > 0 or budget == self.prefill_budget):
            req = self.waiting.popleft()
            budget -= len(req.prompt_ids)
            s = self.slots.index(None)  # lowest free slot keeps the decode window [lo, hi) dense
            self.slots[s], req.slot = req, s
            p = req.params
            self.temperature[s], self.top_k[s], self.top_p[s] = p.temperature, p.top_k, p.top_p
            self.penalty[s] = p.repetition_penalty
            if p.repetition_penalty != 1.0:
                if self.seen is None:
                    self.seen = torch.zeros(self.max_batch, self.model.config.vocab_size, dtype=torch.bool,
                                            device=self.device)
                self.seen[s] = False
                self.seen[s, torch.tensor(req.prompt_ids, device=self.device)] = True
            last = self._prefill(req)
            n = len(req.prompt_ids)
            if req.max_new_tokens == 0:  # prompt scoring only
                req.finish_reason = "length"
                self._free(req)
                updates.append(Update(req, None, "", "length"))
                continue
            self.positions[s], self.pos_py[s], self.active[s] = n, n, 1
            self._sample_and_emit(s, s + 1, last, updates)

    def _prefill(self, req: Request) -> torch.Tensor:
        """Write the prompt's keys/values into the request's slot; returns the last position's logits."""
        ids = torch.tensor(req.prompt_ids, device=self.device)[None]
        cache = self.cache.rows(req.slot, req.slot + 1)
        if req.prompt_logprobs:
            req.prompt_token_logprobs = [None]
        for start in range(0, ids.shape[1], self.prefill_chunk):
            chunk = ids[:, start:start + self.prefill_chunk]
            logits, _ = self.model(chunk, cache=cache, pos=start, last_only=not req.prompt_logprobs)
            if req.prompt_logprobs:  # position j predicts token j + 1
                targets = ids[0, start + 1:start + 1 + chunk.shape[1]]
                logp = logits[0, :targets.shape[0]].float().log_softmax(-1)
                req.prompt_token_logprobs += logp.gather(1, targets[:, None]).squeeze(1).tolist()
        return logits[:, -1]

    def _decode(self, updates: list[Update]) -> None:
        live = [s for s, r in enumerate(self.slots) if r is not None]
        if not live:
            return
        lo, hi = live[0], live[-1] + 1  # free slots inside the window are computed and ignored
        kv_len = max(self.pos_py[s] for s in live) + 1
        pos = self.positions[lo:hi]
        if self.compile:  # every slot, so that the compiled graph's shapes repeat
            logits = self.decoder.step(self.tokens, self.positions, self.cache.k, self.cache.v, kv_len)[lo:hi]
        elif self.decoder is not None:
            logits = self.decoder(self.tokens[lo:hi], pos, self.cache.k[:, lo:hi], self.cache.v[:, lo:hi], kv_len)
        else:
            mask = (self.arange[:kv_len] <= pos[:, None])[:, None, None, :]
            logits, _ = self.model(self.tokens[lo:hi, None], cache=self.cache.rows(lo, hi), pos=pos, mask=mask,
                                   last_only=True)
            logits = logits[:, -1]
        self.steps += 1
        self.positions[lo:hi] += self.active[lo:hi]
        for s in live:
            self.pos_py[s] += 1
        self._sample_and_emit(lo, hi, logits, updates)

    def _sample_and_emit(self, lo: int, hi: int, logits: torch.Tensor, updates: list[Update]) -> None:
        """Sample the next token of slots lo..hi from logits (hi - lo, V) and hand it to each request."""
        reqs = self.slots[lo:hi]
        live = [r for r in reqs if r is not None]
        sampled = [r for r in live if r.params.temperature > 0]
        rp = RowParams(self.temperature[lo:hi], self.top_k[lo:hi], self.top_p[lo:hi], self.penalty[lo:hi],
                       any_sampled=bool(sampled), max_top_k=max((r.params.top_k for r in sampled), default=0),
                       any_top_p=any(r.params.top_p < 1 for r in sampled),
                       any_penalty=any(r.params.repetition_penalty != 1 for r in live))
        raw = logits.float()
        logits = apply_penalty(raw, self.seen[lo:hi], rp.penalty) if rp.any_penalty else raw
        uniform = None
        if sampled:  # one draw per sampling request per token, from its own generator
            uniform = torch.tensor([r.rng.random() if r is not None and r.params.temperature > 0 else 0.0
                                    for r in reqs], device=self.device)
        toks = pick(logits, rp, uniform)
        self.tokens[lo:hi] = toks
        if rp.any_penalty:
            self.seen[torch.arange(lo, hi, device=self.device), toks] = True
        n_top = max((r.logprobs for r in live if r.logprobs is not None), default=-1)
        chosen_lp = top_lp = top_ids = None
        if n_top >= 0:  # log-probs of the model's own distribution, before any sampling filter
            logp = raw.log_softmax(-1)
            chosen_lp = logp.gather(1, toks[:, None]).squeeze(1).tolist()
            if n_top > 0:
                top = logp.topk(min(n_top, logp.size(-1)), dim=-1)
                top_lp, top_ids = top.values.tolist(), top.indices.tolist()
        for i, (r, tok) in enumerate(zip(reqs, toks.tolist(), strict=True)):
            if r is not None:
                self._accept(r, tok, updates, chosen_lp[i] if chosen_lp else None,
                             list(zip(top_ids[i], top_lp[i], strict=True))[:r.logprobs] if top_ids else None)

    def _accept(self, r: Request, tok: int, updates: list[Update], lp: float | None,
                top: list[tuple[int, float]] | None) -> None:
        if tok in r.stop_ids:  # a stop id ends the request and is not part of the output
            return self._finish(r, "stop", updates)
        r.output_ids.append(tok)
        if r.logprobs is not None:
            r.token_logprobs.append(lp)
            r.top_logprobs.append(top or [])
        text, stopped = r.text.push(tok) if r.text is not None else ("", False)
        reason = "stop" if stopped else "length" if len(r.output_ids) >= r.max_new_tokens else None
        if reason:
            self._free(r)
            r.finish_reason = reason
            text += r.text.flush() if r.text is not None else ""
        updates.append(Update(r, tok, text, reason, lp if r.logprobs is not None else None, top))

    def _finish(self, r: Request, reason: str, updates: list[Update]) -> None:
        self._free(r)
        r.finish_reason = reason
        updates.append(Update(r, None, r.text.flush() if r.text is not None else "", reason))


def run(engine: BatchEngine) -> Iterator[Update]:
    """Step the engine until every request it holds has finished."""
    while engine.has_work:
        yield from engine.step()


# ----------------------------------------------------------------------------------- one request


def _fit_context(model: LlamaModel, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], int]:
    """Keep the prompt's tail if prompt + new tokens would not fit the context window."""
    if not prompt_ids:
        raise SlmforgeError("empty prompt: nothing to condition on (the model directory has no bos token)")
    ctx = model.config.max_position_embeddings
    budget = max(ctx - params.max_new_tokens, ctx // 2)
    prompt_ids = prompt_ids[-budget:]
    return prompt_ids, min(params.max_new_tokens, ctx - len(prompt_ids))


def generate_ids(model: LlamaModel, prompt_ids: list[int], params: SamplingParams,
                 stop_ids: Sequence[int] = (), compile: bool = False) -> Iterator[int]:
    """Yield generated token ids one at a time (stops on a stop id, which is not yielded)."""
    prompt_ids, max_new = _fit_context(model, list(prompt_ids), params)
    engine = BatchEngine(model, max_batch=1, max_len=len(prompt_ids) + max_new, compile=compile)
    engine.add(Request(prompt_ids, params, max_new_tokens=max_new, stop_ids=stop_ids))
    for u in run(engine):
        if u.token is not None:
            yield u.token


def stream_text(model: LlamaModel, tokenizer: Tokenizer, prompt: str, params: SamplingParams,
                bos: bool = True) -> Iterator[str]:
    """Yield text deltas of the continuation of `prompt`, honouring stop ids and stop strings."""
    prompt_ids, max_new = _fit_context(model, tokenizer.encode(prompt, bos=bos), params)
    engine = BatchEngine(model, tokenizer, max_batch=1, max_len=len(prompt_ids) + max_new)
    engine.add(Request(prompt_ids, params, max_new_tokens=max_new, stop_ids=tokenizer.stop_ids))
    for u in run(engine):
        if u.text:
            yield u.text


def generate_text(model: LlamaModel, tokenizer: Tokenizer, prompt: str, params: SamplingParams,
                  bos: bool = True) -> str:
    return "".join(stream_text(model, tokenizer, prompt, params, bos=bos))
