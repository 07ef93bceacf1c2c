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
        assert "slmforge_requests_rejected_total 1" in httpx.get(s.url.removesuffix("/v1") + "/metrics").text
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
    text = client.get("/metrics").text
    assert 'slmforge_requests_total{path="/v1/completions",method="POST",status="200"}' in text
    assert 'slmforge_time_to_first_token_seconds_count{model="tiny"}' in text
    assert 'slmforge_completion_tokens_total{model="tiny"}' in text


def test_timeout_is_504(model_dir):
    with TestClient(create_app([model_dir], ServerConfig(timeout_s=1e-6))) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 50})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_fuzzed_requests_never_5xx(client):
    from hypothesis import HealthCheck, given, settings

    from slmforge.serve.fuzz import check_response, http_requests

    @settings(max_examples=300, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(http_requests(["tiny"], 300))
    def one(req):
        method, path, body, ctype = req
        r = client.request(method, path, content=body, headers={"content-type": ctype})
        check_response(r.status_code, r.headers.get("content-type", ""), r.content)

    one()
    assert client.get("/health").json()["status"] == "ok"
    assert json.loads(client.get("/v1/models").text)["data"][0]["id"] == "tiny"
