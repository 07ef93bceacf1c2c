"""Generation: a batch engine with continuous batching over a preallocated KV cache.

    engine = BatchEngine(model, tokenizer, max_batch=16)
    engine.add(Request(prompt_ids, SamplingParams(max_new_tokens=64), stop_ids=tokenizer.stop_ids))
    while engine.has_work:
        for u in engine.step():     # u.request, u.token, u.text (delta), u.finish_reason
            ...

The cache holds `max_batch` rows (slots) of `max_len` positions, allocated once. A request waits in a
queue until a slot is free; it is then prefilled into its slot in chunks of `prefill_chunk` tokens, at
most `prefill_budget` prompt tokens a step, so that a long prompt is spread over several steps and the
slots already decoding keep getting a token every step (chunked prefill). Once prefilled it is decoded
together with every other active slot: one forward of shape (slots, 1) per step, each row at its own
position. Requests join and leave between steps.

Sampling (temperature, top-k, top-p, repetition, frequency and presence penalties) runs vectorised over
the batch with per-slot parameters, and each request draws from its own seeded generator, so a
request's output does not depend on what else is in the batch (chunk boundaries are fixed multiples of
`prefill_chunk` for the same reason). `generate_ids`, `stream_text` and `generate_text` run one request
alone.
"""

from __future__ import annotations

import itertools
import random
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tokenizers.decoders import DecodeStream

from slmforge.errors import SlmforgeError
from slmforge.infer.fastpath import decode_model
from slmforge.infer.sampling import (
    RowParams,
    SamplingParams,
    apply_counts_penalty,
    apply_penalty,
    pick,
    sample_next,
)
from slmforge.model import KVCache, LlamaModel
from slmforge.tokenizer import Tokenizer

__all__ = ["BatchEngine", "Request", "SamplingParams", "TextStream", "Update", "generate_ids", "generate_text",
           "sample_next", "stream_text"]

_request_ids = itertools.count()


class TextStream:
    """Token ids in, text deltas out, honouring stop strings.

    Text that could be the start of a stop string, or half of a multi-byte character, is held back until
    it is known not to be. `offsets[i]` is where token i's text starts in the output. Decoding is
    incremental (tokenizers' DecodeStream decodes only the last few ids per token, where decoding all of
    them each token would be quadratic in the output's length).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.offsets: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.emitted = 0
        self.stopped = False  # a stop string was found
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.pending = False  # the decoder holds ids that do not form whole characters yet

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (text safe to show now, whether a stop string was reached)."""
        self.offsets.append(len(self.text))
        self.ids.append(token)
        piece = self.decoder.step(self.tokenizer.tok, token)
        self.pending = piece is None
        text = self.text + (piece or "")
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
        if self.pending and not self.stopped:  # bytes that never completed a character: as decode() shows them
            full = self.tokenizer.decode(self.ids)
            if full.startswith(self.text):
                self.text = full
            self.pending = False
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
    n_prefilled: int = 0  # prompt tokens in the cache so far

    @property
    def decoding(self) -> bool:
        """In a slot with its whole prompt prefilled."""
        return self.slot >= 0 and self.n_prefilled == len(self.prompt_ids)

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
                 max_len: int | None = None, prefill_chunk: int = 256, prefill_budget: int = 512,
                 fast: bool = True, compile: bool = False):
        """prefill_chunk: prompt tokens per prefill forward; prefill_budget: prompt tokens prefilled per
        step, across requests (at least one chunk), which bounds how long a step can stall the slots that
        are decoding. fast: decode on `DecodeModel`, an inference copy of the weights laid out for
        one-token steps (False: the training model's own forward). compile: run that step compiled by
        torch.compile, one graph per batch size (10-25 s the first time, more with a cold inductor cache;
        pays off for small models, where eager per-op overhead is most of a step). The first step compiles
        it, unless `compile_in_background` was called: then steps run eager until it is built."""
        ctx = model.config.max_position_embeddings
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_len = max_batch, min(max_len or ctx, ctx)
        self.compile = compile and fast
        self.decoder = decode_model(model, max_batch, fixed=self.compile) if fast else None
        if prefill_chunk < 1 or prefill_budget < 1:
            raise SlmforgeError("prefill_chunk and prefill_budget must be >= 1")
        self.prefill_chunk, self.prefill_budget = prefill_chunk, prefill_budget
        self.prefilling: list[Request] = []  # in slots, prompt partly in the cache, in admission order
        self.passed_over: set[int] = set()  # ids of prefilling requests that got no chunk last step
        self.compiled_ready = False  # the compiled step is built
        self.compiling = False  # ... in a background thread, while steps run eager
        self.compile_thread: threading.Thread | None = None
        self.compile_error: str | None = None
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
        self.frequency = torch.zeros(max_batch, device=device)
        self.presence = torch.zeros(max_batch, device=device)
        self.seen: torch.Tensor | None = None  # (max_batch, vocab) bool, made when a request needs it
        self.counts: torch.Tensor | None = None  # (max_batch, vocab) generated-token counts, likewise
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
        if req in self.prefilling:
            self.prefilling.remove(req)
        self.slots[s], req.slot = None, -1
        self.active[s], self.positions[s], self.pos_py[s] = 0, 0, 0

    # ---------------------------------------------------------------------------------------- step

    @torch.inference_mode()
    def step(self) -> list[Update]:
        """Admit waiting requests into free slots, prefill up to `prefill_budget` of their prompt tokens,
        then decode one token for every slot whose prompt is in."""
        updates: list[Update] = []
        self._admit()
        self._prefill(updates)
        self._decode(updates)
        return updates

    def _admit(self) -> None:
        while self.waiting and None in self.slots:
            req = self.waiting.popleft()
            s = self.slots.index(None)  # lowest free slot keeps the decode window [lo, hi) dense
            self.slots[s], req.slot, req.n_prefilled = req, s, 0
            p = req.params
            self.temperature[s], self.top_k[s], self.top_p[s] = p.temperature, p.top_k, p.top_p
            self.penalty[s], self.frequency[s], self.presence[s] = (p.repetition_penalty, p.frequency_penalty,
                                                                    p.presence_penalty)
            if p.repetition_penalty != 1.0:
                if self.seen is None:
                    self.seen = torch.zeros(self.max_batch, self.model.config.vocab_size, dtype=torch.bool,
                                            device=self.device)
                self.seen[s] = False
                self.seen[s, torch.tensor(req.prompt_ids, device=self.device)] = True
            if p.counts_generated:
                if self.counts is None:
                    self.counts = torch.zeros(self.max_batch, self.model.config.vocab_size, device=self.device)
                self.counts[s] = 0
            # Until its prompt is in, the slot's row in a decode step computes a throwaway token at the
            # first position not yet prefilled; the next chunk overwrites what that wrote to the cache.
            self.positions[s], self.pos_py[s], self.active[s] = 0, 0, 0
            if req.prompt_logprobs:
                req.prompt_token_logprobs = [None]
            self.prefilling.append(req)

    def _prefill(self, updates: list[Update]) -> None:
        """Prefill chunks of waiting prompts, at most `prefill_budget` tokens (and at least one chunk).
        Shortest remaining prompt first, so short requests get their first token soon; a request passed
        over last step goes first, so a long prompt always gets on."""
        budget, done = self.prefill_budget, False
        order = sorted(self.prefilling, key=lambda r: (r.id not in self.passed_over,
                                                       len(r.prompt_ids) - r.n_prefilled))
        self.passed_over = set()
        for req in order:
            n, s, last = len(req.prompt_ids), req.slot, None
            while req.n_prefilled < n:
                size = min(self.prefill_chunk, n - req.n_prefilled)
                if done and size > budget:
                    break
                last = self._prefill_chunk(req, req.n_prefilled, req.n_prefilled + size)
                req.n_prefilled += size
                budget, done = budget - size, True
            if req.n_prefilled < n:
                if last is None:
                    self.passed_over.add(req.id)
                self.positions[s], self.pos_py[s] = req.n_prefilled, req.n_prefilled
                continue
            self.prefilling.remove(req)
            if req.max_new_tokens == 0:  # prompt scoring only
                req.finish_reason = "length"
                self._free(req)
                updates.append(Update(req, None, "", "length"))
                continue
            self.positions[s], self.pos_py[s], self.active[s] = n, n, 1
            self._sample_and_emit(s, s + 1, last, updates)

    def _prefill_chunk(self, req: Request, start: int, end: int) -> torch.Tensor:
        """Write prompt positions [start, end) into the request's slot; returns the last one's logits."""
        ids = torch.tensor(req.prompt_ids[start:end + 1], device=self.device)[None]
        chunk = ids[:, :end - start]
        logits, _ = self.model(chunk, cache=self.cache.rows(req.slot, req.slot + 1), pos=start,
                               last_only=not req.prompt_logprobs)
        if req.prompt_logprobs:  # position j predicts token j + 1
            targets = ids[0, 1:]
            logp = logits[0, :targets.shape[0]].float().log_softmax(-1)
            req.prompt_token_logprobs += logp.gather(1, targets[:, None]).squeeze(1).tolist()
        return logits[:, -1]

    # ------------------------------------------------------------------------------------ compile

    def compile_in_background(self) -> None:
        """Build the compiled decode step in a thread; steps run the same step eager until it is ready
        (so that a server answers from the start, instead of stalling its first requests on the compile)."""
        if not self.compile or self.compiled_ready or self.compile_thread is not None:
            return
        self.compiling = True

        def build() -> None:
            try:
                self._compile_step()
                self.compiled_ready = True
            except Exception as e:  # compilers fail in many ways; eager still gives the same tokens
                self.compile_error, self.compile = f"{type(e).__name__}: {e}", False
            finally:
                self.compiling = False

        self.compile_thread = threading.Thread(target=build, name="engine-compile", daemon=True)
        self.compile_thread.start()

    @torch.inference_mode()
    def _compile_step(self) -> None:
        """Run the compiled step on scratch buffers (not the live cache), at two kv lengths so that the
        graph with a symbolic length is the one built."""
        k, v = torch.zeros_like(self.cache.k), torch.zeros_like(self.cache.v)
        tokens, pos = torch.zeros_like(self.tokens), torch.zeros_like(self.positions)
        for kv_len in (2, min(3, self.max_len)):
            self.decoder.step(tokens, pos, k, v, kv_len)

    def _decode(self, updates: list[Update]) -> None:
        live = [s for s, r in enumerate(self.slots) if r is not None and r.decoding]
        if not live:
            return
        lo, hi = live[0], live[-1] + 1  # free or prefilling slots inside the window are computed and ignored
        kv_len = max(self.pos_py[s] for s, r in enumerate(self.slots[:hi]) if r is not None) + 1
        pos = self.positions[lo:hi]
        if self.compile and not self.compiling:  # every slot, so that the compiled graph's shapes repeat
            logits = self.decoder.step(self.tokens, self.positions, self.cache.k, self.cache.v, kv_len)[lo:hi]
        elif self.compile:  # the compiled step is still being built: the same step, eager
            logits = self.decoder(self.tokens, self.positions, self.cache.k, self.cache.v, kv_len)[lo:hi]
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
        reqs = [r if r is not None and r.decoding else None for r in self.slots[lo:hi]]  # None: ignore the row
        live = [r for r in reqs if r is not None]
        sampled = [r for r in live if r.params.temperature > 0]
        rp = RowParams(self.temperature[lo:hi], self.top_k[lo:hi], self.top_p[lo:hi], self.penalty[lo:hi],
                       any_sampled=bool(sampled), max_top_k=max((r.params.top_k for r in sampled), default=0),
                       any_top_p=any(r.params.top_p < 1 for r in sampled),
                       any_penalty=any(r.params.repetition_penalty != 1 for r in live),
                       frequency=self.frequency[lo:hi], presence=self.presence[lo:hi],
                       any_counts=any(r.params.counts_generated for r in live))
        raw = logits.float()
        logits = apply_penalty(raw, self.seen[lo:hi], rp.penalty) if rp.any_penalty else raw
        if rp.any_counts:
            logits = apply_counts_penalty(logits, self.counts[lo:hi], rp.frequency, rp.presence)
        uniform = None
        if sampled:  # one draw per sampling request per token, from its own generator
            uniform = torch.tensor([r.rng.random() if r is not None and r.params.temperature > 0 else 0.0
                                    for r in reqs], device=self.device)
        toks = pick(logits, rp, uniform)
        self.tokens[lo:hi] = toks
        if rp.any_penalty or rp.any_counts:  # only the rows of requests that took their token
            keep = [i for i, r in enumerate(reqs) if r is not None]
            rows = torch.tensor([lo + i for i in keep], device=self.device)
            mine = toks[keep] if len(keep) < len(reqs) else toks
            if rp.any_penalty:
                self.seen[rows, mine] = True
            if rp.any_counts:
                self.counts[rows, mine] += 1
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
    if len(prompt_ids) > budget:  # the CLI and the server reject or trim-and-say before this; a library caller is told
        warnings.warn(f"prompt of {len(prompt_ids)} tokens does not fit the context ({ctx}) with "
                      f"{params.max_new_tokens} new tokens: keeping its last {budget}", stacklevel=3)
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
