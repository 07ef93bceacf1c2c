"""A router served as a model (`slmforge serve --route`): the answering model is the one the router picks for
the prompt, a cascade calls the large model exactly when the small answer's confidence is below the
threshold, and responses, streams, /v1/models and /metrics say so."""

import dataclasses
import json
import socket
import sys

import httpx
import numpy as np
import pytest
import torch
from openai_stub import serve_stub

from conftest import LiveServer
from slmforge.config import preset
from slmforge.model import LlamaModel
from slmforge.modeldir import save_model_dir
from slmforge.route import (
    RouterConfig,
    calibrate,
    decide,
    load_router,
    outcomes_from_rows,
    router_scores,
    save_router,
    train_router,
)
from slmforge.serve.app import ServerConfig, create_app

PROMPTS = ["Tom saw the cat.", "Lily found the big boat.", "Sam liked the red kite.", "Mia lost the ball.",
           "Ben drew the little bird.", "Zoë wanted the tree.", "the cat saw Tom", "a proof of the theorem"]
GEN = {"max_tokens": 6, "temperature": 0}
HEADER = "x-slmforge-routed-to"
PRICE_IN, PRICE_OUT = 2.0, 8.0


def _outcomes(n: int, seed: int):
    """Prompts about proofs need the large model; the rest the small one does well."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        hard = i % 2 == 0
        words = ["proof", "theorem", "lemma"] if hard else ["cat", "ball", "kite"]
        rows.append({"prompt": " ".join(rng.choice(words, 3)) + f" {i}", "small": not hard, "large": True,
                     "mean_logprob": float(-2.0 if hard else -0.5) + rng.normal(0, 0.3)})
    return outcomes_from_rows(rows, "synthetic", signal="mean_logprob")


def _model(path, seed: int, tok):
    # a larger init than training uses: logits far from uniform, so greedy decoding has no near-ties
    torch.manual_seed(seed)
    m = LlamaModel(preset("200k", vocab_size=tok.vocab_size, initializer_range=0.1))
    return save_model_dir(path, m, tok, {"stage": "test"})


def _mean_logprob(client: httpx.Client, model: str, prompt: str) -> float:
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "logprobs": 0, **GEN}).json()
    lps = r["choices"][0]["logprobs"]["token_logprobs"]
    return sum(lps) / len(lps)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("route")
    small, large = _model(tmp / "small", 0, tiny_tokenizer), _model(tmp / "large", 1, tiny_tokenizer)
    train = _outcomes(40, 0)
    dirs = {"random": save_router(dataclasses.replace(train_router(train, RouterConfig(router="random")),
                                                      threshold=0.5), tmp / "random"),
            "always": save_router(dataclasses.replace(train_router(train, RouterConfig(router="random")),
                                                      threshold=0.0), tmp / "always"),
            "learned": save_router(calibrate(train_router(train, RouterConfig(router="learned")), _outcomes(20, 1),
                                             share=0.5), tmp / "learned")}
    # the cascade's threshold: between the small model's least and most confident answers to PROMPTS
    with_small = LiveServer(create_app({"small": small}, ServerConfig(max_batch=4)))
    try:
        with httpx.Client(base_url=with_small.base) as c:
            conf = sorted(_mean_logprob(c, "small", p) for p in PROMPTS)
    finally:
        with_small.close()
    cascade = train_router(train, RouterConfig(router="cascade", signal="mean_logprob"))
    dirs["cascade"] = save_router(dataclasses.replace(cascade, threshold=-(conf[0] + conf[-1]) / 2), tmp / "cascade")
    remote = LiveServer(create_app({"big": large}, ServerConfig(max_batch=4)))  # an endpoint that streams
    with serve_stub(reply=lambda body: "the large model says hello") as stub:
        routes = [f"relay={dirs['always']},small=small,large=openai:{remote.url}#big,retries=0",f"rand={dirs['random']},small=small,large=large",
                  f"learned={dirs['learned']},small={small},large={large}",  # models named by their directory
                  f"cascade={dirs['cascade']},small=small,large=openai:{stub.url}#big,price={PRICE_IN}/{PRICE_OUT},"
                  f"retries=0",
                  f"cascade-local={dirs['cascade']},small=small,large=large",
                  f"down={dirs['always']},small=small,large=openai:http://127.0.0.1:{_dead_port()}/v1#big,retries=0"]
        server = LiveServer(create_app({"small": small, "large": large}, ServerConfig(max_batch=4), routes=routes))
        try:
            with httpx.Client(base_url=server.base, timeout=30) as client:
                yield {"server": server, "client": client, "stub": stub, "dirs": dirs, "small": small,
                       "large": large, "tmp": tmp}
        finally:
            server.close()
            remote.close()


def _direct(client: httpx.Client, path: str, model: str, body: dict) -> dict:
    return client.post(path, json={**body, "model": model}).json()


def _expected(router_dir, text: str) -> str:
    router = load_router(router_dir)
    return "large" if decide(router, router_scores(router, [text]))[0] else "small"


def _samples(client: httpx.Client) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples}


def _route_sample(samples: dict, name: str, route: str, dest: str | None = None) -> float:
    labels = (("destination", dest), ("route", route)) if dest else (("route", route),)
    return samples.get((name, labels), 0.0)


@pytest.mark.parametrize("route", ["rand", "learned"])
def test_scoring_routers_answer_by_the_model_the_router_picks(setup, route):
    c = setup["client"]
    dests = set()
    for p in PROMPTS:
        want = _expected(setup["dirs"]["random" if route == "rand" else "learned"], p)
        dests.add(want)
        r = c.post("/v1/completions", json={"model": f"route:{route}", "prompt": p, **GEN})
        assert r.status_code == 200, r.text
        got = r.json()
        assert r.headers[HEADER] == got["routed_to"]["model"] == want, (p, got["routed_to"])
        assert got["model"] == got["routed_to"]["model_name"] == want  # served as "small" and "large"
        assert got["routed_to"]["route"] == route and got["routed_to"]["threshold"] == load_router(
            setup["dirs"]["random" if route == "rand" else "learned"]).threshold
        assert got["choices"][0]["text"] == _direct(c, "/v1/completions", want, {"prompt": p, **GEN})["choices"][0]["text"]
    assert dests == {"small", "large"}  # both ways taken


def test_chat_routes_on_the_last_user_message(setup):
    c = setup["client"]
    for p in PROMPTS[:4]:
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ignored"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": p}]
        want = _expected(setup["dirs"]["random"], p)
        r = c.post("/v1/chat/completions", json={"model": "route:rand", "messages": msgs, **GEN})
        assert r.headers[HEADER] == r.json()["routed_to"]["model"] == want
        assert r.json()["choices"][0]["message"] == _direct(c, "/v1/chat/completions", want,
                                                            {"messages": msgs, **GEN})["choices"][0]["message"]


def test_cascade_calls_the_large_model_exactly_below_the_threshold(setup):
    c, stub = setup["client"], setup["stub"]
    threshold = load_router(setup["dirs"]["cascade"]).threshold
    escalated = []
    for p in PROMPTS:
        before = len(stub.requests)
        r = c.post("/v1/completions", json={"model": "route:cascade", "prompt": p, **GEN})
        assert r.status_code == 200, r.text
        got = r.json()
        confidence = _mean_logprob(c, "small", p)  # the small answer's mean token log-prob, asked directly
        below = -confidence >= threshold  # the cascade's score is the negated confidence
        info = got["routed_to"]
        assert info["signal"]["name"] == "mean_logprob"
        assert info["signal"]["value"] == pytest.approx(confidence, abs=1e-6)
        assert info["model"] == r.headers[HEADER] == ("large" if below else "small")
        assert len(stub.requests) - before == (1 if below else 0)
        if below:
            assert got["choices"][0]["text"] == "the large model says hello" and info["model_name"] == "big"
            sent = stub.requests[-1]  # the request as the client sent it, to the remote model
            assert sent["model"] == "big" and sent["prompt"] == p and sent["max_tokens"] == 6
            assert "logprobs" not in sent
        else:
            plain = _direct(c, "/v1/completions", "small", {"prompt": p, **GEN})
            assert got["choices"][0]["text"] == plain["choices"][0]["text"]
            assert got["choices"][0]["logprobs"] is None  # forced on for the decision, not asked for
        escalated.append(below)
    assert any(escalated) and not all(escalated)


def test_cascade_with_a_local_large_model_and_streams(setup):
    c = setup["client"]
    threshold = load_router(setup["dirs"]["cascade"]).threshold
    for p in PROMPTS:
        dest = "large" if -_mean_logprob(c, "small", p) >= threshold else "small"
        want = _direct(c, "/v1/completions", dest, {"prompt": p, **GEN})["choices"][0]["text"]
        body = {"model": "route:cascade-local", "prompt": p, **GEN}
        assert c.post("/v1/completions", json=body).headers[HEADER] == dest
        with c.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                    "stream_options": {"include_usage": True}}) as r:
            assert r.headers[HEADER] == dest and r.headers["x-slmforge-route"] == "cascade-local"
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert all(ch["routed_to"]["model"] == dest for ch in chunks)
        assert "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]) == want
        assert chunks[-1]["usage"]["completion_tokens"] >= 1


def test_streams_say_who_answered_remote_too(setup):
    c = setup["client"]
    for route in ("rand", "cascade"):
        for p in PROMPTS:
            msgs = [{"role": "user", "content": p}]
            whole = c.post("/v1/chat/completions", json={"model": f"route:{route}", "messages": msgs, **GEN})
            with c.stream("POST", "/v1/chat/completions", json={"model": f"route:{route}", "messages": msgs,
                                                             "stream": True, **GEN}) as r:
                assert r.status_code == 200 and r.headers[HEADER] == whole.headers[HEADER]
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            info = whole.json()["routed_to"]
            assert chunks and all(ch["routed_to"]["model"] == info["model"] for ch in chunks)
            text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
            assert text == whole.json()["choices"][0]["message"]["content"]
            assert "usage" not in chunks[-1]  # not asked for (the remote is asked, for the metrics)


def test_a_remote_stream_is_relayed_chunk_by_chunk(setup):
    c = setup["client"]
    before = _samples(c)
    for path, body, text in [("/v1/completions", {"prompt": PROMPTS[0]}, lambda ch: ch["choices"][0]["text"]),
                             ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPTS[0]}]},
                              lambda ch: ch["choices"][0]["delta"].get("content") or "")]:
        want = _direct(c, path, "large", {**body, **GEN})
        for usage in (False, True):
            with c.stream("POST", path, json={"model": "route:relay", **body, **GEN, "stream": True,
                                              "stream_options": {"include_usage": usage}}) as r:
                assert r.status_code == 200 and r.headers[HEADER] == "large"
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            assert len(chunks) > 2 and all(ch["routed_to"]["model_name"] == "big" for ch in chunks)
            assert "".join(text(ch) for ch in chunks if ch["choices"]) == (
                want["choices"][0]["text"] if "prompt" in body else want["choices"][0]["message"]["content"])
            assert ("usage" in chunks[-1]) == usage  # asked of the remote always, passed on when asked for
    after = _samples(c)
    got = _route_sample(after, "slmforge_route_completion_tokens_total", "relay", "large") - _route_sample(
        before, "slmforge_route_completion_tokens_total", "relay", "large")
    assert got == 2 * (_direct(c, "/v1/completions", "large", {"prompt": PROMPTS[0], **GEN})["usage"]["completion_tokens"]
                       + want["usage"]["completion_tokens"])


def test_metrics_count_requests_tokens_and_cost_per_destination(setup):
    c, stub = setup["client"], setup["stub"]
    before = _samples(c)
    dests = []
    for p in PROMPTS:
        r = c.post("/v1/completions", json={"model": "route:cascade", "prompt": p, **GEN})
        dests.append(r.headers[HEADER])
    after = _samples(c)

    def delta(name: str, dest: str | None = None) -> float:
        return _route_sample(after, name, "cascade", dest) - _route_sample(before, name, "cascade", dest)

    assert delta("slmforge_route_requests_total", "large") == dests.count("large") >= 1
    assert delta("slmforge_route_requests_total", "small") == dests.count("small") >= 1
    # every prompt was answered by the small model first: its tokens count whether or not it was kept
    assert delta("slmforge_route_completion_tokens_total", "small") >= len(PROMPTS)
    remote = stub.requests[-dests.count("large"):]
    p_tok = sum(len(b["prompt"].split()) for b in remote)
    c_tok = dests.count("large") * len("the large model says hello".split())
    assert delta("slmforge_route_prompt_tokens_total", "large") == p_tok
    assert delta("slmforge_route_completion_tokens_total", "large") == c_tok
    assert delta("slmforge_route_cost_usd_total") == pytest.approx((p_tok * PRICE_IN + c_tok * PRICE_OUT) / 1e6)
    assert ("slmforge_route_requests_total", (("destination", "small"), ("route", "down"))) in after


def test_openai_client_reads_the_answering_model(setup):
    import openai

    oa = openai.OpenAI(base_url=setup["server"].url, api_key="none", max_retries=0)
    ids = {m.id for m in oa.models.list()}
    assert {"small", "large", "route:rand", "route:cascade", "route:learned"} <= ids
    p = PROMPTS[1]
    raw = oa.chat.completions.with_raw_response.create(model="route:rand", messages=[{"role": "user", "content": p}],
                                                       max_tokens=6, temperature=0)
    r = raw.parse()
    want = _expected(setup["dirs"]["random"], p)
    assert raw.headers[HEADER] == r.routed_to["model"] == r.model == want
    chunks = list(oa.completions.create(model="route:cascade", prompt=p, max_tokens=6, temperature=0, stream=True))
    assert {ch.routed_to["model"] for ch in chunks} == {oa.completions.create(
        model="route:cascade", prompt=p, max_tokens=6, temperature=0).routed_to["model"]}


def test_models_list_names_the_route(setup):
    cards = {m["id"]: m for m in setup["client"].get("/v1/models").json()["data"]}
    assert cards["route:cascade"]["route"]["router"] == "cascade"
    assert cards["route:cascade"]["route"]["large"] == "big" and cards["route:rand"]["route"]["small"] == "small"
    assert setup["client"].get("/v1/models/route:learned").json()["route"]["router"] == "learned"


def test_unreachable_large_model_is_a_502_not_a_traceback(setup):
    c = setup["client"]
    r = c.post("/v1/completions", json={"model": "route:down", "prompt": "Tom", **GEN})
    err = r.json()["error"]
    assert r.status_code == 502 and err["code"] == "upstream_error" and "127.0.0.1" in err["message"], r.text
    assert r.headers[HEADER] == "large"
    r = c.post("/v1/chat/completions", json={"model": "route:down", "messages": [{"role": "user", "content": "a"}],
                                          "stream": True, **GEN})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
    assert _route_sample(_samples(c), "slmforge_route_errors_total", "down", "large") >= 2
    assert c.get("/health").status_code == 200


def test_requests_a_route_cannot_take_are_400(setup):
    c = setup["client"]
    r = c.post("/v1/completions", json={"model": "route:cascade", "prompt": "Tom", "n": 2, **GEN})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = c.post("/v1/completions", json={"model": "route:rand", "prompt": [5, 6, 7], **GEN})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = c.post("/v1/completions", json={"model": "route:nope", "prompt": "Tom"})
    assert r.status_code == 404 and "route:rand" in r.json()["error"]["message"]


def _cli_error(monkeypatch, capsys, *args) -> str:
    """`slmforge serve ...` in this process: the exit status and what it printed."""
    from slmforge.cli import main

    monkeypatch.setattr(sys, "argv", ["slmforge", "serve", *map(str, args), "--no-compile", "--port", "0"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("error: --route "), err
    assert "Traceback" not in err and "on http://" not in err
    return err


def test_bad_route_config_is_one_error_line(setup, monkeypatch, capsys):
    d, tmp = setup["dirs"], setup["tmp"]
    models = [f"small={setup['small']}", f"large={setup['large']}"]
    no_threshold = save_router(train_router(_outcomes(10, 0), RouterConfig(router="random")), tmp / "unset")
    entropy = _outcomes(10, 0)
    entropy.signal_name = "entropy"
    uncertain = save_router(dataclasses.replace(train_router(entropy, RouterConfig(router="cascade", signal="entropy")),
                                                threshold=1.0), tmp / "entropy")
    cases = {
        f"r={tmp / 'nothing'},small=small,large=large": "not a router folder",
        f"r={d['random']},small=tiny,large=large": "small=tiny: not a served model",
        f"r={d['random']},small=small,large=runs/missing": "large=runs/missing: not a served model",
        f"r={d['random']},small=small,large=openai:http://x": "expected openai:<base_url>#<model>",
        f"r={d['random']},small=small,large=small": "the same model",
        f"r={d['random']},small=small": "large=MODEL missing",
        f"r={d['random']},small=small,large=large,price=cheap": "price=cheap: expected IN/OUT",
        f"r={d['random']},small=small,large=large,colour=red": "'colour=red': expected small=...",
        f"r={no_threshold},small=small,large=large": "no threshold",
        f"r={uncertain},small=small,large=large": "cannot compute",
        f"r={d['cascade']},small=small,large=large,signal=margin": "signal=margin",
        f"r={d['learned']},small=small,large=large,signal=min_logprob": "signal= is for a cascade router",
    }
    for spec, says in cases.items():
        assert says in _cli_error(monkeypatch, capsys, *models, "--route", spec), spec
