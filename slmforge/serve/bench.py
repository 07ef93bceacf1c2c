"""A load generator for OpenAI-compatible servers: `concurrency` clients send streaming completions
back to back for `duration_s` and we report throughput, time to first token and latency.

    result = asyncio.run(run_load("http://127.0.0.1:8000/v1", "tiny", concurrency=16, duration_s=60))

Prompts are words drawn from a small story vocabulary, about `prompt_len` tokens long (cycling through
`prompt_lens`); token counts come from the server's usage chunk (stream_options.include_usage).
`long_clients` more clients send `long_prompt_len`-word prompts alongside (their results are kept apart,
in `result.long`), to see whether long prefills stall the short requests' first tokens.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field

WORDS = ("once upon a time there was a little girl named Lily who loved to play in the park with her red "
         "ball and her dog Max one day the sun was warm and the birds sang happy songs").split()


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    requests: int = 0
    errors: int = 0
    errors_by_status: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    long: LoadResult | None = None  # the long-prompt clients, when there are any

    def summary(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("ttft_s", "latency_s", "long")}
        d.update(requests_per_s=self.requests / self.duration_s,
                 completion_tokens_per_s=self.completion_tokens / self.duration_s,
                 ttft_p50_ms=1e3 * percentile(self.ttft_s, 50), ttft_p99_ms=1e3 * percentile(self.ttft_s, 99),
                 latency_p50_ms=1e3 * percentile(self.latency_s, 50),
                 latency_p99_ms=1e3 * percentile(self.latency_s, 99))
        if self.long is not None:
            d["long"] = self.long.summary()
        return d


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (nan for no data)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def make_prompt(n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def run_load(base_url: str, model: str, concurrency: int = 16, duration_s: float = 60.0,
                   prompt_lens: tuple[int, ...] = (16, 64, 128), max_tokens: int = 64, api_key: str | None = None,
                   temperature: float = 0.8, seed: int = 0, long_clients: int = 0, long_prompt_len: int = 2000,
                   long_max_tokens: int = 8) -> LoadResult:
    import httpx

    result = LoadResult(concurrency=concurrency, duration_s=duration_s)
    if long_clients:
        result.long = LoadResult(concurrency=long_clients, duration_s=duration_s)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/completions"
    deadline = time.perf_counter() + duration_s

    async def client(i: int, http: httpx.AsyncClient, result: LoadResult, prompt_lens: tuple[int, ...],
                     max_tokens: int) -> None:
        rng = random.Random(seed * 1000 + i)
        k = i
        while time.perf_counter() < deadline:
            body = {"model": model, "prompt": make_prompt(prompt_lens[k % len(prompt_lens)], rng),
                    "max_tokens": max_tokens, "temperature": temperature, "stream": True,
                    "stream_options": {"include_usage": True}}
            k += 1
            t0 = time.perf_counter()
            ttft, usage, status = None, None, None
            try:
                async with http.stream("POST", url, json=body, headers=headers) as r:
                    status = r.status_code
                    if status == 200:
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                status = "stream-error"
                                break
                            if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                                ttft = time.perf_counter() - t0
                            usage = chunk.get("usage") or usage
                    else:
                        await r.aread()
            except httpx.HTTPError as e:
                status = type(e).__name__
            if status != 200 or usage is None:
                result.errors += 1
                key = str(status)
                result.errors_by_status[key] = result.errors_by_status.get(key, 0) + 1
                continue
            result.requests += 1
            result.latency_s.append(time.perf_counter() - t0)
            result.ttft_s.append(ttft if ttft is not None else result.latency_s[-1])
            result.prompt_tokens += usage["prompt_tokens"]
            result.completion_tokens += usage["completion_tokens"]

    n = concurrency + long_clients
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http, result, prompt_lens, max_tokens) for i in range(concurrency)),
                             *(client(concurrency + i, http, result.long, (long_prompt_len,), long_max_tokens)
                               for i in range(long_clients)))
        result.duration_s = time.perf_counter() - t0
        if result.long is not None:
            result.long.duration_s = result.duration_s
    return result
