"""One LM interface for every model, local or remote: generate, chat, score.

Teachers (synth, annotate), routers, evaluators and red-team targets all take an LM spec string:

    runs/quickstart/pretrain/model          a local model directory (LocalLM)
    openai:http://localhost:8000/v1#qwen    any OpenAI-compatible endpoint (OpenAILM); key from
                                            OPENAI_API_KEY, or the variable named by api_key_env

Both keep a `Usage` counter (requests, prompt and completion tokens, cost at the given prices).
OpenAILM runs requests concurrently (a thread pool of `concurrency`), retries connection errors,
429 and 5xx with exponential backoff and jitter (honouring Retry-After), and paces requests to
`requests_per_minute` when set.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

import torch

from slmforge.errors import SlmforgeError
from slmforge.infer.engine import SamplingParams, generate_text

Messages = list[dict]  # [{"role": "user", "content": "..."}, ...]


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    failures: int = 0
    price_in: float = 0.0  # USD per 1M prompt tokens
    price_out: float = 0.0  # USD per 1M completion tokens
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, prompt_tokens: int = 0, completion_tokens: int = 0, requests: int = 1) -> None:
        with self._lock:
            self.requests += requests
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def count(self, name: str) -> None:
        """Add one to a counter (retries, failures); threads share a Usage, so under the lock."""
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    @property
    def cost_usd(self) -> float:
        return (self.prompt_tokens * self.price_in + self.completion_tokens * self.price_out) / 1e6

    def to_dict(self) -> dict:
        # not asdict(): it deep-copies every field, and a lock cannot be copied
        d = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        d["cost_usd"] = round(self.cost_usd, 6)
        return d


class LM(Protocol):
    name: str
    usage: Usage

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[str]:
        """Continuations of raw text prompts."""

    def chat(self, conversations: Sequence[Messages], params: SamplingParams) -> list[str]:
        """Assistant replies to chat conversations (the model's chat template applies)."""

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Sum of log-probs (nats) of each completion given its prompt."""


# ------------------------------------------------------------------------------------------ local


class LocalLM:
    """A model directory on this machine (our decoder; bf16 weights on GPU when there is one)."""

    def __init__(self, path: str | Path, device: str | None = None):
        from slmforge.modeldir import ModelDir

        md = ModelDir.open(path)
        self.name = str(path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = md.load_model(self.device)
        self.tokenizer = md.load_tokenizer()
        self.usage = Usage()

    def _generate(self, prompt: str, params: SamplingParams, bos: bool) -> str:
        text = generate_text(self.model, self.tokenizer, prompt, params, bos=bos)
        self.usage.add(len(self.tokenizer.encode(prompt, bos=bos)), len(self.tokenizer.encode(text)))
        return text

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[str]:
        return [self._generate(p, params, bos=True) for p in prompts]

    def chat(self, conversations: Sequence[Messages], params: SamplingParams) -> list[str]:
        # the chat template writes its own <s>
        return [self._generate(self.tokenizer.apply_chat_template(list(m)), params, bos=False).strip()
                for m in conversations]

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise SlmforgeError("score: prompts and completions differ in number")
        ctx = self.model.config.max_position_embeddings
        out = []
        for prompt, completion in zip(prompts, completions, strict=True):
            p_ids = self.tokenizer.encode(prompt, bos=True)
            ids = self.tokenizer.encode(prompt + completion, bos=True)
            if len(ids) < 2 or ids == p_ids:  # nothing to score
                out.append(0.0)
                continue
            # tokens of the completion: those past the longest common prefix with the prompt's encoding
            n_common = 0
            while n_common < min(len(p_ids), len(ids)) and p_ids[n_common] == ids[n_common]:
                n_common += 1
            cut = max(0, len(ids) - (ctx + 1))  # keep the tail that fits the context window
            ids, n_common = ids[cut:], max(1, n_common - cut)
            x = torch.tensor([ids[:-1]], device=self.device)
            logits, _ = self.model(x)
            logp = logits.float().log_softmax(-1)[0]
            targets = torch.tensor(ids[1:], device=self.device)
            token_logp = logp.gather(1, targets[:, None]).squeeze(1)
            out.append(float(token_logp[n_common - 1:].sum()))
            self.usage.add(len(ids), 0)
        return out


# ----------------------------------------------------------------------------------------- remote


class RateLimiter:
    """At most `per_minute` acquisitions per minute, evenly spaced (0 = unlimited)."""

    def __init__(self, per_minute: float = 0):
        self.interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self.next_at = 0.0
        self.lock = threading.Lock()

    def acquire(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            wait = self.next_at - now
            self.next_at = max(now, self.next_at) + self.interval
        if wait > 0:
            time.sleep(wait)


class OpenAILM:
    """Any OpenAI-compatible HTTP endpoint (OpenAI, vLLM, llama.cpp server, slmforge serve, ...)."""

    RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 max_retries: int = 6, timeout_s: float = 120.0, requests_per_minute: float = 0,
                 price_in: float = 0.0, price_out: float = 0.0, backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0):
        import httpx

        # a silent clamp hid typos (and a negative max_retries never sent a request): refuse them
        for name, value, least in (("concurrency", concurrency, 1), ("max_retries", max_retries, 0),
                                   ("requests_per_minute", requests_per_minute, 0)):
            if value < least:
                raise SlmforgeError(f"{name} {value}: must be >= {least}")
        if timeout_s <= 0:
            raise SlmforgeError(f"timeout_s {timeout_s}: must be > 0")
        self.name = f"openai:{base_url}#{model}"
        self.base_url, self.model = base_url.rstrip("/"), model
        self.concurrency, self.max_retries = concurrency, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout_s,
                                   limits=httpx.Limits(max_connections=self.concurrency))
        self.limiter = RateLimiter(requests_per_minute)
        self.usage = Usage(price_in=price_in, price_out=price_out)

    def post(self, path: str, body: dict) -> dict:
        """POST with retries; raises SlmforgeError after the last attempt (or at once on a 4xx)."""
        import httpx

        url = f"{self.base_url}{path}"
        for attempt in range(self.max_retries + 1):
            self.limiter.acquire()
            retry_after = None
            try:
                r = self.client.post(url, json=body)
                if r.status_code == 200:
                    data = r.json()
                    if not isinstance(data, dict) or not data.get("choices"):
                        raise ValueError(f"no choices in the reply: {r.text[:200]}")
                    u = data.get("usage") or {}
                    self.usage.add(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
                    return data
                detail = r.text[:200].replace("\n", " ")
                if r.status_code not in self.RETRY_STATUS:  # a bad request stays bad: fail at once
                    self.usage.count("failures")
                    raise SlmforgeError(f"{url}: HTTP {r.status_code}: {detail}")
                ra = r.headers.get("retry-after", "")
                retry_after = float(ra) if ra.replace(".", "", 1).isdigit() else None
                err = f"HTTP {r.status_code}: {detail}"
            except (httpx.TransportError, ValueError) as e:
                err = f"{type(e).__name__}: {e}"
            if attempt == self.max_retries:
                self.usage.count("failures")
                raise SlmforgeError(f"{url}: gave up after {attempt + 1} attempts ({err})")
            self.usage.count("retries")
            if retry_after is not None:  # the server said when: wait that long, never less
                delay = min(retry_after, self.max_backoff_s)
            else:  # full-ish jitter, so that many threads do not retry in lockstep
                delay = min(self.backoff_s * 2**attempt, self.max_backoff_s) * (0.5 + random.random() / 2)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.client.close()

    def map(self, fn: Callable, items: Sequence) -> list:
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    @staticmethod
    def _sampling(params: SamplingParams) -> dict:
        body = {"max_tokens": params.max_new_tokens, "temperature": params.temperature}
        if params.top_p < 1:
            body["top_p"] = params.top_p
        if params.stop:
            body["stop"] = params.stop[:4]
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[str]:
        def one(p: str) -> str:
            data = self.post("/completions", {"model": self.model, "prompt": p, **self._sampling(params)})
            return data["choices"][0].get("text") or ""
        return self.map(one, list(prompts))

    def chat(self, conversations: Sequence[Messages], params: SamplingParams) -> list[str]:
        def one(m: Messages) -> str:
            data = self.post("/chat/completions", {"model": self.model, "messages": list(m),
                                                   **self._sampling(params)})
            return (data["choices"][0].get("message") or {}).get("content") or ""
        return self.map(one, list(conversations))

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Via /completions with echo=True, max_tokens=0 and logprobs (vLLM and slmforge serve
        support this; OpenAI's own chat models do not)."""
        def one(pc: tuple[str, str]) -> float:
            prompt, completion = pc
            data = self.post("/completions", {"model": self.model, "prompt": prompt + completion,
                                              "echo": True, "max_tokens": 0, "logprobs": 0})
            lp = data["choices"][0].get("logprobs") or {}
            offsets, token_lps = lp.get("text_offset"), lp.get("token_logprobs")
            if offsets is None or token_lps is None:
                raise SlmforgeError(f"{self.name}: the endpoint returned no prompt log-probs (echo=True)")
            return float(sum(v for o, v in zip(offsets, token_lps, strict=False)
                             if o >= len(prompt) and v is not None))
        if len(prompts) != len(completions):
            raise SlmforgeError("score: prompts and completions differ in number")
        return self.map(one, list(zip(prompts, completions, strict=True)))


# ------------------------------------------------------------------------------------------- spec


def open_lm(spec: str, api_key_env: str = "OPENAI_API_KEY", **kw) -> LM:
    """A model directory path, or `openai:<base_url>#<model>` (kw go to OpenAILM: concurrency,
    requests_per_minute, price_in, price_out, max_retries, timeout_s, backoff_s); a local model takes
    only `device` and ignores the rest."""
    if spec.startswith("openai:"):
        url, sep, model = spec[len("openai:"):].partition("#")
        if not sep or not url or not model:
            raise SlmforgeError(f"LM spec {spec!r}: expected openai:<base_url>#<model>")
        kw.pop("device", None)
        return OpenAILM(url, model, api_key=os.environ.get(api_key_env), **kw)
    path = Path(spec)
    if not path.is_dir():
        raise SlmforgeError(f"LM spec {spec!r}: not a model directory, and not openai:<base_url>#<model>")
    return LocalLM(path, device=kw.get("device"))
