import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import LiveServer
from slmforge.config import preset
from slmforge.infer.engine import SamplingParams, generate_ids, generate_text
from slmforge.model import LlamaModel
from slmforge.modeldir import save_model_dir
from slmforge.serve.app import ServerConfig, create_app

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    # a larger init than training uses: logits far from uniform, so greedy decoding has no near-ties
    torch.manual_seed(0)
    m = LlamaModel(preset("200k", vocab_size=tiny_tokenizer.vocab_size, initializer_range=0.1))
    return save_model_dir(tmp_path_factory.mktemp("serve") / "tiny", m, tiny_tokenizer, {"stage": "test"})


@pytest.fixture(scope="module")
def local(model_dir):
    from slmforge.modeldir import ModelDir

    md = ModelDir.open(model_dir)
    return md.load_model(), md.load_tokenizer()


@pytest.fixture(scope="module")
def server(model_dir):
    s = LiveServer(create_app([f"tiny={model_dir}", f"other={model_dir}"],
                              ServerConfig(max_batch=4, api_keys=[KEY])))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app([model_dir], ServerConfig(max_batch=4, max_tokens_limit=64))) as c:
        yield c


def _openai(server):
    import openai

    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)


def test_openai_client_chat_completions_models_streaming(server, local):
    model, tok = local
    oa = _openai(server)
    assert sorted(m.id for m in oa.models.list()) == ["other", "tiny"]
    msgs = [{"role": "user", "content": "Tom saw the cat."}]
    r = oa.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    want = generate_text(model, tok, tok.apply_chat_template(msgs), SamplingParams(max_new_tokens=12, temperature=0),
                         bos=False)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(msgs)))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(oa.chat.completions.create(model="other", messages=msgs, max_tokens=12, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason

    c = oa.completions.create(model="tiny", prompt="Lily", max_tokens=10, temperature=0.9, seed=7)
    assert c.choices[0].text == generate_text(model, tok, "Lily", SamplingParams(max_new_tokens=10, temperature=0.9,
                                                                                 seed=7))
    streamed = "".join(x.choices[0].text for x in oa.completions.create(
        model="tiny", prompt="Lily", max_tokens=10, temperature=0.9, seed=7, stream=True))
    assert streamed == c.choices[0].text


def test_concurrent_requests_equal_single_stream(server, local):
    """Continuous batching (4 slots, 12 requests at once, mixed settings) does not change any output."""
    model, tok = local
    bodies = [{"model": "tiny", "prompt": p, "max_tokens": 6 + 3 * i, "temperature": [0, 0.8, 1.2][i % 3],
               "top_k": [0, 20][i % 2], "seed": i} for i, p in enumerate(["Tom", "Lily saw", "Sam found the"] * 4)]
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda b: httpx.post(server.url + "/completions", json=b,
                                                 headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json(),
                            bodies))
    for b, g in zip(bodies, got, strict=True):
        p = SamplingParams(max_new_tokens=b["max_tokens"], temperature=b["temperature"], top_k=b["top_k"],
                           seed=b["seed"])
        ids = list(generate_ids(model, tok.encode(b["prompt"], bos=True), p, tok.stop_ids))
        assert g["usage"]["completion_tokens"] == len(ids)
        assert g["choices"][0]["text"] == tok.decode(ids)


def test_echo_scoring_matches_local_score(server, model_dir):
    from slmforge.lm import LocalLM, OpenAILM

    remote = OpenAILM(server.url, "tiny", api_key=KEY, max_retries=0)
    prompts, completions = ["Tom saw", "Lily liked the"], [" the cat.", " red kite."]
    assert remote.score(prompts, completions) == pytest.approx(LocalLM(model_dir).score(prompts, completions),
                                                               abs=1e-3)


def test_api_key_required(server):
    import openai

    r = httpx.post(server.url + "/completions", json={"model": "tiny", "prompt": "a"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url.removesuffix("/v1") + "/health").json()["status"] == "ok"  # open


def test_client_disconnect_frees_the_slot(server):
    engine = server.app.state.workers["tiny"].engine
    body = {"model": "tiny", "prompt": "Tom", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        next(r.iter_lines())
    for _ in range(200):
        if engine.n_active == 0 and server.app.state.metrics.in_flight == 0:
            break
        time.sleep(0.01)
    assert engine.n_active == 0 and server.app.state.metrics.in_flight == 0


def test_429_when_full(model_dir):
    s = LiveServer(create_app([model_dir], ServerConfig(max_concurrent=1, max_batch=1)))
    engine = s.app.state.workers["tiny"].engine
    gate, step = threading.Event(), engine.step
    engine.step = lambda: (gate.wait(10), step())[1]  # hold the engine so the first request stays in flight
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, s.url + "/completions", json={"model": "tiny", "prompt": "a"}, timeout=30)
            while s.app.state.metrics.in_flight == 0:
                time.sleep(0.01)
            busy = httpx.post(s.url + "/completions", json={"model": "tiny", "prompt": "a"})
            gate.set()
            assert first.result().status_code == 200
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "rate_limit_exceeded"
        assert _samples(httpx.get(s.base + "/metrics").text)[("slmforge_requests_rejected_total", ())] == 1
    finally:
        gate.set()
        s.close()


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", {"model": "nope", "prompt": "a"}, 404, "model"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "top_p": "x"}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 65}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "a " * 300, "max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "n": 9}, 400, "n"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, 400, None),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "max_tokens": 0}, 400, "max_tokens"),
])
def test_bad_requests_are_openai_style_4xx(client, path, body, status, param):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    if param:
        assert err["param"].startswith(param)


def test_bad_json_and_unknown_route(client):
    r = client.post("/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_metrics_and_stop_strings(client, local):
    model, tok = local
    full = client.post("/v1/completions", json={"model": "tiny", "prompt": "Tom", "max_tokens": 20,
                                                "temperature": 0}).json()["choices"][0]["text"]
    i = next(i for i in range(2, len(full) - 2) if full.find(full[i:i + 2]) == i)  # a first occurrence
    stop = full[i:i + 2]
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Tom", "max_tokens": 20, "temperature": 0,
                                             "stop": stop, "logprobs": 1}).json()
    want = generate_text(model, tok, "Tom", SamplingParams(max_new_tokens=20, temperature=0, stop=[stop]))
    assert r["choices"][0]["text"] == want and r["choices"][0]["finish_reason"] == "stop"
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) >= 1
    got = _samples(client.get("/metrics").text)
    assert got[("slmforge_requests_total", (("method", "POST"), ("path", "/v1/completions"), ("status", "200")))] >= 2
    assert got[("slmforge_time_to_first_token_seconds_count", (("model", "tiny"),))] >= 2
    assert got[("slmforge_completion_tokens_total", (("model", "tiny"),))] >= 2


def _samples(text: str) -> dict:
    """Prometheus text -> {(sample name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_timeout_is_504(model_dir):
    with TestClient(create_app([model_dir], ServerConfig(timeout_s=1e-6))) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 50})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_fuzzed_requests_never_5xx(client):
    from serve_fuzz import fuzz_client

    fuzz_client(client, ["tiny"], 300, max_examples=300)
    assert json.loads(client.get("/v1/models").text)["data"][0]["id"] == "tiny"


# ------------------------------------------------------------------------------- issue 11

AUTH = {"Authorization": f"Bearer {KEY}"}


def test_auth_runs_before_body_validation_and_guards_metrics(server):
    """A caller without the key learns nothing about the body's fields (401, not 400 naming them), and
    /metrics is behind the key once one is set."""
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server.url + "/completions", json={"model": "tiny", "temperature": "hot"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["param"] is None, r.text
        r = httpx.post(server.url + "/chat/completions", json={"messages": 3}, headers=headers)
        assert r.status_code == 401, r.text
        assert httpx.get(server.base + "/metrics", headers=headers).status_code == 401
    r = httpx.get(server.base + "/metrics", headers=AUTH)
    assert r.status_code == 200 and "slmforge_requests_total" in r.text


def test_metrics_are_prometheus_client_text(client):
    from prometheus_client.parser import text_string_to_metric_families

    client.post("/v1/completions", json={"model": "tiny", "prompt": "Tom", "max_tokens": 3})
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert families["slmforge_time_to_first_token_seconds"].type == "histogram"
    assert families["slmforge_requests"].type == "counter"
    assert {s.labels["model"] for s in families["slmforge_completion_tokens"].samples} == {"tiny"}


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "a", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "n": "2"}, "n"),
    ("/v1/completions", {"prompt": "a", "echo": 1}, "echo"),
    ("/v1/completions", {"prompt": "a", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/chat/completions", {"logprobs": "true"}, "logprobs"),
    ("/v1/chat/completions", {"logit_bias": {"5": -100}}, "logit_bias"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
])
def test_wrong_types_and_unimplemented_fields_are_400(client, path, body, param):
    if path.endswith("chat/completions"):
        body = {"messages": [{"role": "user", "content": "hi"}], **body}
    r = client.post(path, json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)


def test_defaults_of_unimplemented_fields_pass(client):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2, "best_of": 1,
                                             "logit_bias": {}, "user": "u1"})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "a"}],
                                                  "max_tokens": 2, "logit_bias": None, "tools": [],
                                                  "response_format": {"type": "text"}})
    assert r.status_code == 200, r.text


def test_frequency_and_presence_penalties_are_applied(client, local):
    model, tok = local
    body = {"model": "tiny", "prompt": "Tom", "max_tokens": 20, "temperature": 0}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    got = client.post("/v1/completions", json={**body, "frequency_penalty": 2, "presence_penalty": 1}).json()
    want = generate_text(model, tok, "Tom", SamplingParams(max_new_tokens=20, temperature=0, frequency_penalty=2,
                                                            presence_penalty=1))
    assert got["choices"][0]["text"] == want != plain


def _stop_in_middle(client, path, body, key):
    full = client.post(path, json=body).json()["choices"][0]
    text = full["message"]["content"] if key == "chat" else full["text"]
    i = next(i for i in range(2, len(text) - 2) if text.find(text[i:i + 2]) == i and "\ufffd" not in text[i:i + 2])
    return text[i:i + 2]


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_logprobs_stop_at_the_stop_string(client, local, kind):
    from slmforge.infer.engine import BatchEngine, Request

    model, tok = local
    msgs = [{"role": "user", "content": "Tom saw the cat."}]
    if kind == "chat":
        path, body = "/v1/chat/completions", {"model": "tiny", "messages": msgs, "max_tokens": 30, "temperature": 0}
        prompt_ids = tok.encode(tok.apply_chat_template(msgs))
    else:
        path, body = "/v1/completions", {"model": "tiny", "prompt": "Tom", "max_tokens": 30, "temperature": 0}
        prompt_ids = tok.encode("Tom", bos=True)
    stop = _stop_in_middle(client, path, body, kind)
    extra = {"logprobs": True, "top_logprobs": 1} if kind == "chat" else {"logprobs": 1}
    r = client.post(path, json={**body, "stop": stop, **extra}).json()["choices"][0]
    engine = BatchEngine(model, tok, max_batch=1)
    ref = engine.add(Request(prompt_ids, SamplingParams(max_new_tokens=30, temperature=0, stop=[stop]),
                             stop_ids=tok.stop_ids))
    while engine.has_work:
        engine.step()
    assert ref.finish_reason == "stop" and ref.text.n_tokens_in_text < len(ref.output_ids)
    n = len(r["logprobs"]["content"]) if kind == "chat" else len(r["logprobs"]["tokens"])
    assert n == ref.text.n_tokens_in_text


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tom saw the cat. " * 80}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tom saw. " * 40}], "max_tokens": 200}),
    ("/v1/completions", {"prompt": "a " * 300, "max_tokens": None}),
    ("/v1/completions", {"prompt": [[5] * 300]}),
])
def test_over_long_prompt_is_400_naming_the_limit(client, path, body):
    r = client.post(path, json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "256" in err["message"], err


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}'),
    ("/v1/completions", b'{"model": "tiny", "prompt": "a\\udfff", "max_tokens": 2, "stream": true}'),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("/v1/chat/completions", b'{"model": "tiny", "stream": true, "messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("/v1/completions", b'{"model": "tiny", "prompt": "a", "stop": ["\\ud800"]}'),
    ("/v1/completions", b'{"model": "\\ud800", "prompt": "a"}'),
])
def test_lone_surrogate_is_400(client, path, body):
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_body_size_is_capped(model_dir):
    with TestClient(create_app([model_dir], ServerConfig(max_batch=1, max_body_bytes=10_000))) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "a " * 10_000})
        assert r.status_code == 413, r.text
        assert "10000" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 1}).status_code == 200
    assert ServerConfig().max_body_bytes <= 4 * 2**20


def test_tokenizing_does_not_block_health(model_dir):
    """A prompt that takes long to tokenize must not hold up /health (tokenizing runs off the event loop)."""
    s = LiveServer(create_app([model_dir], ServerConfig(max_batch=1)))
    tok = s.app.state.workers["tiny"].tokenizer
    gate, encode = threading.Event(), tok.encode
    tok.encode = lambda *a, **kw: (gate.wait(20), encode(*a, **kw))[1]
    try:
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(httpx.post, s.url + "/completions", json={"model": "tiny", "prompt": "a",
                                                                        "max_tokens": 1}, timeout=30)
            time.sleep(0.3)
            t0 = time.perf_counter()
            assert httpx.get(s.base + "/health", timeout=5).status_code == 200
            assert time.perf_counter() - t0 < 2
            gate.set()
            assert slow.result().status_code == 200
    finally:
        gate.set()
        s.close()


def test_health_answers_while_compiling(model_dir, monkeypatch):
    """compile=True: /health is 200 at once with ready false while the compiled step builds, requests are
    served (eager) meanwhile, and ready turns true when it is built. The compile is faked."""
    from slmforge.infer.engine import BatchEngine

    gate = threading.Event()
    monkeypatch.setattr(BatchEngine, "_compile_step", lambda self: gate.wait(30))
    try:
        with TestClient(create_app([model_dir], ServerConfig(max_batch=2, compile=True))) as c:
            h = c.get("/health")
            assert h.status_code == 200 and h.json()["ready"] is False and h.json()["compiling"] == ["tiny"]
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": "Tom", "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
            gate.set()
            for _ in range(100):
                if c.get("/health").json()["ready"]:
                    break
                time.sleep(0.05)
            assert c.get("/health").json() == {"status": "ok", "ready": True, "compiling": [], "models": ["tiny"]}
    finally:
        gate.set()


def _serve_cli(*args, timeout=60):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "slmforge", "serve", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_serve_bad_port_and_port_in_use(model_dir):
    import socket

    r = _serve_cli(model_dir, "--port", "99999", "--no-compile")
    assert r.returncode != 0 and r.stderr.startswith("error:") and "99999" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _serve_cli(model_dir, "--port", port, "--no-compile")
    assert r.returncode != 0 and "serving" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error:") and str(port) in r.stderr, r.stderr


def test_test_code_is_not_in_the_package():
    import re
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "slmforge"
    assert not (pkg / "openai_stub.py").exists() and not (pkg / "serve" / "fuzz.py").exists()
    imports = re.compile(r"^\s*(import|from)\s+hypothesis\b", re.M)
    assert not [p for p in pkg.rglob("*.py") if imports.search(p.read_text())]
