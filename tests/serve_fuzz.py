"""Fuzzing the server: hypothesis strategies for HTTP requests, good and bad, and the check every answer
must pass (no 5xx; OpenAI-shaped bodies). Used by tests/test_serve.py, tests/test_guard.py and benchmarks/fuzz_serve.py;
needs the `hypothesis` test dependency.
"""

from __future__ import annotations

import json


def http_requests(model_names: list[str], vocab_size: int = 256):
    """A strategy of (method, path, body bytes, content-type) tuples: about half are valid generation
    requests with random settings, the rest have junk in random fields, are not JSON, or hit other routes."""
    from hypothesis import strategies as st

    junk = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                     st.text(max_size=20), st.lists(st.integers(-5, 400), max_size=5), st.dictionaries(
                         st.text(max_size=5), st.integers(), max_size=2))
    model = st.one_of(st.sampled_from(model_names), st.text(max_size=10), junk)
    small = st.one_of(st.integers(0, 8), st.sampled_from([None, -1, 10**6, 2**64, 1.5, "4"]))
    sampling = {
        "model": model, "max_tokens": small, "temperature": st.one_of(st.floats(-1, 3), junk),
        "top_p": st.one_of(st.floats(-0.5, 1.5), junk), "top_k": st.one_of(st.integers(-3, 600), junk),
        "repetition_penalty": st.one_of(st.floats(-1, 12), junk), "n": st.one_of(st.integers(0, 3), junk),
        "seed": st.one_of(st.integers(-(2**65), 2**65), junk), "stream": st.one_of(st.booleans(), junk),
        "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=300), max_size=6), junk),
        "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), junk),
        "frequency_penalty": st.floats(-3, 3),
    }
    text = st.text(max_size=60)
    prompt = st.one_of(text, st.lists(text, max_size=3), st.lists(st.integers(-5, 400), max_size=20),
                       st.lists(st.lists(st.integers(0, 300), min_size=1, max_size=5), max_size=2), junk)
    completion = st.fixed_dictionaries({}, optional={
        **sampling, "prompt": prompt, "echo": st.one_of(st.booleans(), junk),
        "logprobs": st.one_of(st.integers(-1, 25), junk), "suffix": st.one_of(st.none(), text)})
    message = st.fixed_dictionaries({}, optional={
        "role": st.one_of(st.sampled_from(["system", "user", "assistant", "developer", "tool"]), junk),
        "content": st.one_of(text, st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]),
                                                                    "text": text}), max_size=2), junk)})
    chat = st.fixed_dictionaries({}, optional={
        **sampling, "messages": st.one_of(st.lists(message, max_size=3), junk),
        "max_completion_tokens": small, "logprobs": st.one_of(st.booleans(), junk),
        "top_logprobs": st.one_of(st.integers(-1, 25), junk)})

    valid = {
        "temperature": st.floats(0, 2), "top_p": st.floats(0, 1),
        "top_k": st.integers(0, 50), "repetition_penalty": st.floats(0.5, 2), "n": st.integers(1, 2),
        "seed": st.integers(0, 2**32), "stream": st.booleans(), "stop": st.lists(st.text(max_size=3), max_size=4),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    }
    valid_completion = st.fixed_dictionaries(
        {"model": st.sampled_from(model_names), "prompt": st.one_of(text, st.lists(st.integers(0, vocab_size - 1), min_size=1,
                                                                      max_size=30))},
        optional={**valid, "max_tokens": st.integers(0, 8), "echo": st.booleans(), "logprobs": st.integers(0, 5)})
    valid_chat = st.fixed_dictionaries(
        {"model": st.sampled_from(model_names), "messages": st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant"]), "content": text}), min_size=1, max_size=3)},
        optional={**valid, "max_tokens": st.integers(1, 8), "logprobs": st.booleans(),
                  "top_logprobs": st.integers(0, 5)})

    def dumps(body) -> bytes:
        return json.dumps(body).encode()

    posts = st.one_of(
        st.tuples(st.just("POST"), st.just("/v1/completions"), valid_completion.map(dumps), st.just("application/json")),
        st.tuples(st.just("POST"), st.just("/v1/chat/completions"), valid_chat.map(dumps), st.just("application/json")),
        st.tuples(st.just("POST"), st.just("/v1/completions"), completion.map(dumps), st.just("application/json")),
        st.tuples(st.just("POST"), st.just("/v1/chat/completions"), chat.map(dumps), st.just("application/json")),
        st.tuples(st.just("POST"), st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
                  st.one_of(st.binary(max_size=40), junk.map(dumps)), st.sampled_from(["application/json", "text/plain"])),
    )
    gets = st.tuples(st.sampled_from(["GET", "DELETE"]),
                     st.sampled_from(["/v1/models", "/health", "/metrics", "/v1/models/x", "/v1/nothing"]),
                     st.just(b""), st.just("application/json"))
    return st.one_of(posts, posts, posts, gets)


def check_response(status: int, content_type: str, body: bytes) -> None:
    """Raise AssertionError when an answer is not acceptable."""
    assert status < 500, f"{status}: {body[:300]!r}"
    if status >= 400:
        err = json.loads(body)["error"]
        assert isinstance(err["message"], str) and err["message"]
    elif "text/event-stream" in content_type:
        events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]"
        for e in events[:-1]:
            assert "error" not in json.loads(e), e
    elif "json" in content_type:
        json.loads(body)


def fuzz_client(client, model_names: list[str], vocab_size: int, max_examples: int) -> None:
    """Send `max_examples` generated requests (the same ones every run) through a TestClient; every answer
    must pass check_response, and the server must still be healthy afterwards."""
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=max_examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(http_requests(model_names, vocab_size))
    def one(req):
        method, path, body, ctype = req
        r = client.request(method, path, content=body, headers={"content-type": ctype})
        check_response(r.status_code, r.headers.get("content-type", ""), r.content)

    one()
    assert client.get("/health").json()["status"] == "ok"
