"""The LM interface: LocalLM on a tiny model directory, OpenAILM against a real local HTTP server (retries,
failures, concurrency, rate limit, usage and cost, score via echo log-probs) and spec errors."""

import threading
import time

import pytest
import torch
from openai_stub import serve_stub

from slmforge.errors import SlmforgeError
from slmforge.infer.engine import SamplingParams
from slmforge.lm import LocalLM, OpenAILM, RateLimiter, Usage, open_lm

GREEDY = SamplingParams(max_new_tokens=8, temperature=0)


# ------------------------------------------------------------------------------------------ local


@pytest.fixture()
def local_lm(tiny_model_dir):
    torch.set_num_threads(1)
    lm = open_lm(str(tiny_model_dir), device="cpu")
    assert isinstance(lm, LocalLM)
    return lm


def test_local_generate_chat_usage(local_lm):
    a = local_lm.generate(["Tom saw", "Lily liked"], SamplingParams(max_new_tokens=6, seed=3))
    assert len(a) == 2 and all(isinstance(x, str) for x in a)
    assert local_lm.generate(["Tom saw"], SamplingParams(max_new_tokens=6, seed=3)) == a[:1]  # seeded
    assert local_lm.usage.requests == 3 and local_lm.usage.prompt_tokens >= 3 * 2
    [reply] = local_lm.chat([[{"role": "user", "content": "Hi"}]], GREEDY)
    assert isinstance(reply, str) and reply == reply.strip()
    assert local_lm.usage.requests == 4


def test_local_score_matches_a_manual_forward_pass(local_lm):
    tok, model = local_lm.tokenizer, local_lm.model
    prompt, completion = "Tom saw", " the cat."
    [got] = local_lm.score([prompt], [completion])
    ids = tok.encode(prompt + completion, bos=True)
    n_prompt = len(tok.encode(prompt, bos=True))
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    logp = logits.float().log_softmax(-1)[0]
    want = sum(float(logp[i - 1, ids[i]]) for i in range(n_prompt, len(ids)))
    assert got == pytest.approx(want, abs=1e-4) and got < 0
    assert local_lm.score(["Tom saw"], [""]) == [0.0]
    with pytest.raises(SlmforgeError, match="differ in number"):
        local_lm.score(["a", "b"], ["c"])


# ----------------------------------------------------------------------------------------- remote


def chat1(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_openai_chat_generate_usage_and_cost():
    with serve_stub(reply=lambda body: "one two three") as stub:
        lm = open_lm(f"openai:{stub.url}#stub-model", price_in=2.0, price_out=10.0, concurrency=4)
        assert isinstance(lm, OpenAILM)
        out = lm.chat([chat1("hello there"), chat1("a b c d")], SamplingParams(max_new_tokens=5, seed=1))
        assert out == ["one two three"] * 2
        assert lm.generate(["x y"], GREEDY) == ["one two three"]
        body = stub.requests[0]
        assert body["model"] == "stub-model" and body["max_tokens"] == 5 and body["messages"][0]["role"] == "user"
        u = lm.usage
        assert (u.requests, u.prompt_tokens, u.completion_tokens, u.retries, u.failures) == (3, 2 + 4 + 2, 9, 0, 0)
        assert u.cost_usd == pytest.approx((8 * 2.0 + 9 * 10.0) / 1e6)
        assert u.to_dict()["cost_usd"] == pytest.approx(u.cost_usd) and "_lock" not in u.to_dict()


def test_openai_429_then_200_honours_retry_after():
    with serve_stub(errors=[(429, {"Retry-After": "0.3"})]) as stub:
        lm = OpenAILM(stub.url, "m", backoff_s=0.01)
        t = time.monotonic()
        assert lm.chat([chat1("ping")], GREEDY) == ["ping"]
        assert time.monotonic() - t >= 0.3  # waited what the server asked, not the 10 ms backoff
        assert len(stub.requests) == 2 and lm.usage.retries == 1 and lm.usage.requests == 1


def test_openai_400_fails_at_once_and_5xx_gives_up_after_retries():
    with serve_stub(fail_if=lambda body: 400 if "bad" in str(body) else 503) as stub:
        lm = OpenAILM(stub.url, "m", max_retries=2, backoff_s=0.01)
        with pytest.raises(SlmforgeError, match="HTTP 400"):
            lm.chat([chat1("bad")], GREEDY)
        assert len(stub.requests) == 1 and lm.usage.failures == 1 and lm.usage.retries == 0
        with pytest.raises(SlmforgeError, match="gave up after 3 attempts.*HTTP 503"):
            lm.chat([chat1("fine")], GREEDY)
        assert len(stub.requests) == 4 and lm.usage.failures == 2 and lm.usage.retries == 2


def test_openai_connection_refused_is_retried_then_reported():
    with serve_stub() as stub:
        url = stub.url
    lm = OpenAILM(url, "m", max_retries=1, backoff_s=0.01)  # the server is gone
    with pytest.raises(SlmforgeError, match="gave up after 2 attempts.*ConnectError"):
        lm.chat([chat1("x")], GREEDY)


def test_openai_concurrency():
    with serve_stub(latency_s=0.1) as stub:
        lm = OpenAILM(stub.url, "m", concurrency=8)
        t = time.monotonic()
        out = lm.chat([chat1(f"q{i}") for i in range(8)], GREEDY)
        elapsed = time.monotonic() - t
        assert out == [f"q{i}" for i in range(8)]  # in input order
        assert stub.max_in_flight >= 4 and elapsed < 0.5  # serially this takes 0.8 s
    with serve_stub(latency_s=0.02) as stub:
        OpenAILM(stub.url, "m", concurrency=1).chat([chat1(f"q{i}") for i in range(4)], GREEDY)
        assert stub.max_in_flight == 1


def test_openai_rate_limit():
    with serve_stub() as stub:
        lm = OpenAILM(stub.url, "m", concurrency=4, requests_per_minute=600)  # one per 0.1 s
        lm.chat([chat1(str(i)) for i in range(5)], GREEDY)
        gaps = [b - a for a, b in zip(stub.request_times, stub.request_times[1:], strict=False)]
        # the limiter spaces the sends 0.1 s apart; arrival at the stub adds thread and socket jitter
        assert min(gaps) >= 0.05 and stub.request_times[-1] - stub.request_times[0] >= 0.33
    limiter = RateLimiter(0)
    t = time.monotonic()
    for _ in range(100):
        limiter.acquire()
    assert time.monotonic() - t < 0.05


def test_openai_score_via_echo_logprobs():
    with serve_stub() as stub:
        lm = OpenAILM(stub.url, "m")
        # the stub gives each whitespace token -len/10; completion tokens: " the" (-0.3), " cat." (-0.4)
        assert lm.score(["Tom saw", "a"], [" the cat.", " bb"]) == [pytest.approx(-0.7), pytest.approx(-0.2)]
        body = next(b for b in stub.requests if b["prompt"] == "Tom saw the cat.")  # sent concurrently
        assert body["echo"] is True and body["max_tokens"] == 0
    lm.post = lambda path, body: {"choices": [{"text": "x"}]}  # an endpoint that ignores echo
    with pytest.raises(SlmforgeError, match="no prompt log-probs"):
        lm.score(["a"], [" b"])


def test_usage_counts_are_thread_safe():
    u = Usage()

    def work():
        for _ in range(1000):
            u.count("retries")
            u.add(1, 2)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (u.retries, u.requests, u.prompt_tokens, u.completion_tokens) == (4000, 4000, 4000, 8000)


@pytest.mark.parametrize("spec, needle", [
    ("openai:http://localhost:1/v1", "expected openai:<base_url>#<model>"),
    ("openai:#model", "expected openai:<base_url>#<model>"),
    ("openai:http://localhost:1/v1#", "expected openai:<base_url>#<model>"),
    ("no/such/model/dir", "not a model directory"),
])
def test_bad_specs(spec, needle):
    with pytest.raises(SlmforgeError, match=needle):
        open_lm(spec)
