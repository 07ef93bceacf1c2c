"""An OpenAI-compatible HTTP server over the batch engine.

    app = create_app(["runs/quickstart/pretrain/model"], ServerConfig(api_keys=["sk-..."]))
    uvicorn.run(app, port=8000)

Routes: /v1/chat/completions, /v1/completions, /v1/models, /metrics (Prometheus), /health, and `/`: a
chat page (static/index.html, no external resources) that streams from this same API. With API keys set,
everything but /health and `/` needs one, checked before the body is looked at, so that a caller without
a key learns nothing about what the body should hold.

Each model has one engine thread that runs continuous batching (`BatchEngine.step` in a loop). A request
handler turns the body into engine `Request`s (tokenizing in a worker thread, so that a huge prompt does
not hold up the event loop), hands them to that thread and awaits their updates on an asyncio queue the
thread feeds through `loop.call_soon_threadsafe`, one call per step. Requests join and leave between
decode steps; a client that goes away frees its slot at the next step. With compile on, the compiled
decode step is built in the background while the engine serves eager; /health says `ready: false` until
it is built.

A route (`routes=["sst2=runs/router,small=tiny,large=openai:https://host/v1#big"]`, `--route` on the
command line) serves a router as the model `route:sst2`: each request is answered by the small or the large
model, as the router decides (see "Routes" below and docs/route.md, "Serving a router").

A guard (`guard="guard.yaml"`, `--guard` on the command line: slmforge/safety/guard.py) checks every request to
a model or a route before generation and every answer before it leaves, streams chunk by chunk: refuse (a
normal completion, finish_reason "content_filter"), redact or flag; see "Guard" below and docs/safety.md.

Errors are OpenAI-style bodies, {"error": {"message", "type", "param", "code"}}: 400 for bad input, 401
for a bad API key, 404 for an unknown model or route, 413 for a body over `max_body_bytes`, 429 when
`max_concurrent` requests are already in flight, 502 when a route's remote large model fails, 504 when a
request runs past `timeout_s`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import queue
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmforge.errors import SlmforgeError
from slmforge.infer.engine import BatchEngine, Request, SamplingParams, TextStream, Update
from slmforge.lm import OpenAILM
from slmforge.modeldir import ModelDir
from slmforge.route import Router, decide, load_router, router_scores
from slmforge.route import describe as describe_router
from slmforge.safety.guard import Decision, Guard, load_guard, merge
from slmforge.serve.protocol import ChatBody, CompletionBody, SamplingFields, error_body
from slmforge.tokenizer import Tokenizer


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type, param, code), headers


@dataclass
class ServerConfig:
    max_concurrent: int = 64  # requests in flight across all models; more get 429
    max_batch: int = 16  # KV-cache slots per model; requests beyond wait in the engine's queue
    max_tokens_limit: int | None = None  # most tokens one request may ask for (default: the context)
    timeout_s: float = 600.0  # per request
    api_keys: list[str] = field(default_factory=list)  # empty = no authentication
    compile: bool = False  # torch.compile each engine's decode step (built in the background, eager meanwhile)
    max_body_bytes: int = 2 * 2**20  # larger request bodies get 413 (a context's worth of text is far less)


# ------------------------------------------------------------------------------------------ metrics

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own so that several apps in one process
    (tests) do not clash. Engine state is read when /metrics is scraped."""

    def __init__(self, workers: dict[str, ModelWorker], routes: dict[str, Route] | None = None):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("slmforge_requests", "HTTP responses of /v1/ routes", ["path", "method", "status"],
                                registry=r)
        self.rejected = Counter("slmforge_requests_rejected", "Requests refused with 429", registry=r)
        self.prompt_tokens = Counter("slmforge_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("slmforge_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("slmforge_time_to_first_token_seconds", "Time to the first generated token",
                              ["model"], buckets=SECONDS, registry=r)
        self.latency = Histogram("slmforge_request_duration_seconds", "Time from a request's arrival to its end",
                                 ["model"], buckets=SECONDS, registry=r)
        for name in workers:  # every model's series from the start, at zero
            for m in (self.prompt_tokens, self.completion_tokens, self.ttft, self.latency):
                m.labels(model=name)
        # routes: by destination (small, large); tokens count every answer a destination made, so a cascade's
        # small answers count under small whether or not they were sent back
        per = ["route", "destination"]
        self.route_requests = Counter("slmforge_route_requests", "Routed requests, by the model that answered",
                                      per, registry=r)
        self.route_prompt_tokens = Counter("slmforge_route_prompt_tokens", "Prompt tokens of routed requests, by "
                                           "the model that read them", per, registry=r)
        self.route_completion_tokens = Counter("slmforge_route_completion_tokens", "Tokens generated for routed "
                                               "requests, by the model that wrote them", per, registry=r)
        self.route_errors = Counter("slmforge_route_errors", "Routed requests the remote large model failed "
                                    "(answered 502)", per, registry=r)
        self.route_cost = Counter("slmforge_route_cost_usd", "What the large model's tokens cost at the route's "
                                  "price (USD)", ["route"], registry=r)
        for route in (routes or {}).values():
            for dest in ("small", "large"):
                for m in (self.route_requests, self.route_prompt_tokens, self.route_completion_tokens,
                          self.route_errors):
                    m.labels(route=route.name, destination=dest)
            self.route_cost.labels(route=route.name)
        # the guard (--guard): each check that fired, with the action it took (check "none": nothing fired),
        # and each decision's action, per stage (input, output: one decision per choice)
        self.guard_checks = Counter("slmforge_guard_decisions", "Guard checks that fired, by stage, check and "
                                    "action (check none: nothing fired)", ["stage", "check", "action"], registry=r)
        self.guard_actions = Counter("slmforge_guard_actions", "Guard decisions by stage and the action taken",
                                     ["stage", "action"], registry=r)
        self.in_flight = 0
        self.workers = workers
        r.register(self)  # collect() below

    def collect(self):
        yield GaugeMetricFamily("slmforge_requests_in_flight", "Requests being served", value=self.in_flight)
        for name, kind, doc, get in [
            ("slmforge_engine_decode_steps", CounterMetricFamily, "Decode forwards", lambda w: w.engine.steps),
            ("slmforge_engine_active_slots", GaugeMetricFamily, "KV-cache slots in use", lambda w: w.engine.n_active),
            ("slmforge_engine_waiting_requests", GaugeMetricFamily, "Requests waiting for a slot",
             lambda w: len(w.engine.waiting)),
        ]:
            family = kind(name, doc, labels=["model"])
            for w in self.workers.values():
                family.add_metric([w.name], get(w))
            yield family

    def describe(self):
        return []  # generated at scrape time: nothing to check for duplicates at registration


class CountRequests:
    """ASGI middleware: count /v1/ responses by route and status (a plain ASGI wrapper, so that
    streaming responses and disconnects pass through untouched)."""

    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models")

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        route = next((r for r in self.ROUTES if path == r or path.startswith(r + "/")), "other")

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, scope["method"], str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


# ------------------------------------------------------------------------------------- engine thread


Sink = tuple[asyncio.AbstractEventLoop, asyncio.Queue]


class ModelWorker:
    """One model, its tokenizer, and the thread that runs its BatchEngine."""

    def __init__(self, name: str, path: Path, model, tokenizer: Tokenizer, max_batch: int, compile: bool = False):
        self.name, self.path, self.tokenizer = name, path, tokenizer
        self.ctx = model.config.max_position_embeddings
        self.vocab_size = model.config.vocab_size
        self.engine = BatchEngine(model, tokenizer, max_batch=max_batch, compile=compile)
        self.engine.compile_in_background()
        self.created = int(time.time())
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.sinks: dict[int, Sink] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self.thread.start()

    def submit(self, req: Request, sink: Sink) -> None:
        self.inbox.put(("add", req, sink))
        self.wake.set()

    def cancel(self, req: Request) -> None:
        self.inbox.put(("cancel", req, None))
        self.wake.set()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        while not self.stopping:
            self.wake.clear()
            self._drain_inbox()
            if not self.engine.has_work:
                self.wake.wait(0.5)
                continue
            try:
                updates = self.engine.step()
            except Exception as e:  # a bug: fail the requests in flight rather than hang them
                for r in [*self.engine.slots, *self.engine.waiting]:
                    if r is not None:
                        self.engine.cancel(r)
                        self._deliver(r.id, e)
                continue
            by_sink: dict[int, list[Update]] = defaultdict(list)
            for u in updates:
                by_sink[u.request.id].append(u)
            for rid, us in by_sink.items():
                self._deliver(rid, us)
                if us[-1].finish_reason:
                    self.sinks.pop(rid, None)

    def _drain_inbox(self) -> None:
        while True:
            try:
                op, req, sink = self.inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                self.sinks[req.id] = sink
                try:
                    self.engine.add(req)
                except SlmforgeError as e:
                    self._deliver(req.id, APIError(400, str(e)))
                    self.sinks.pop(req.id, None)
            else:
                self.engine.cancel(req)
                self.sinks.pop(req.id, None)

    def _deliver(self, rid: int, item: list[Update] | Exception) -> None:
        sink = self.sinks.get(rid)
        if sink is None:
            return
        loop, q = sink
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass


# ---------------------------------------------------------------------------------- app and state


@dataclass
class Server:
    """What the routes share: the config, one worker per model, the metrics (app.state.server)."""

    config: ServerConfig
    workers: dict[str, ModelWorker]
    metrics: Metrics
    routes: dict[str, Route] = field(default_factory=dict)  # by model id, "route:NAME"
    guard: Guard | None = None  # --guard: input and output checks (slmforge/safety/guard.py)


def parse_model_specs(specs: list[str | Path]) -> dict[str, Path]:
    """`path` (named after the directory) or `name=path`."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        if not sep:
            name, path = Path(spec).resolve().name, str(spec)
        if not name:
            raise SlmforgeError(f"model spec {spec!r}: empty name")
        if name in out:
            raise SlmforgeError(f"model name {name!r} given twice (use name=path to tell them apart)")
        out[name] = Path(path)
    if not out:
        raise SlmforgeError("serve: give at least one model directory")
    return out


def create_app(model_dirs: list[str | Path] | dict[str, str | Path], config: ServerConfig | None = None,
               dtype: torch.dtype = torch.float32, device: str | None = None,
               routes: list[str | RouteSpec] | None = None, guard: Guard | str | Path | None = None) -> FastAPI:
    """A FastAPI app serving the model directories (a list of `path` / `name=path`, or {name: path}) and
    the routes (`--route` specs, see parse_route_spec) between them and remote models; `guard` (a Guard or
    its YAML config) checks every request to them and every answer (see "Guard" below)."""
    cfg = config or ServerConfig()
    if isinstance(guard, (str, Path)):  # before the models load: a bad config should cost nothing
        guard = load_guard(guard)
    specs = {k: Path(v) for k, v in model_dirs.items()} if isinstance(model_dirs, dict) \
        else parse_model_specs(list(model_dirs))
    # routes first: a bad --route should be an error before minutes of model loading, not after
    route_list = [build_route(parse_route_spec(r) if isinstance(r, str) else r, specs, cfg)
                  for r in routes or []]
    by_id: dict[str, Route] = {}
    for route in route_list:
        if route.id in by_id:
            raise SlmforgeError(f"--route {route.name}: given twice")
        if route.id in specs:
            raise SlmforgeError(f"--route {route.name}: {route.id!r} is also the name of a served model")
        by_id[route.id] = route
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    workers: dict[str, ModelWorker] = {}
    for name, path in specs.items():
        md = ModelDir.open(path)
        workers[name] = ModelWorker(name, path, md.load_model(device, dtype), md.load_tokenizer(), cfg.max_batch,
                                     cfg.compile)
    server = Server(cfg, workers, Metrics(workers, by_id), by_id, guard)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for w in workers.values():
            w.stop()
        for route in by_id.values():
            if isinstance(route.large, Remote):
                route.large.lm.close()

    app = FastAPI(title="slmforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server
    app.state.workers, app.state.metrics, app.state.config = workers, server.metrics, cfg  # shorthands
    app.add_middleware(CountRequests, metrics=server.metrics)
    for exc, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(exc, handler)
    app.include_router(public)
    app.include_router(api)
    return app


# ------------------------------------------------------------------------------------------ errors


async def _api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
    return JSONResponse(e.body, status_code=e.status, headers=e.headers)


async def _validation_error(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
    err = e.errors()[0] if e.errors() else {}
    if err.get("type") == "json_invalid":
        why = (err.get("ctx") or {}).get("error")
        return JSONResponse(error_body("request body is not valid JSON" + (f": {why}" if why else "")),
                            status_code=400)
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return JSONResponse(error_body(f"{param}: {msg}" if param else msg, param=param), status_code=400)


async def _http_error(_: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 413: "request_too_large"}.get(e.status_code)
    return JSONResponse(error_body(str(e.detail), code=code), status_code=e.status_code,
                        headers=getattr(e, "headers", None))


async def _server_error(_: HTTPRequest, e: Exception) -> JSONResponse:
    return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", type="server_error"),
                        status_code=500)


ERROR_HANDLERS = {APIError: _api_error, RequestValidationError: _validation_error,
                  StarletteHTTPException: _http_error, Exception: _server_error}


# ------------------------------------------------------------------------------------ dependencies


def get_server(request: HTTPRequest) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(get_server)]


def authorize(request: HTTPRequest, server: ServerDep) -> None:
    """The API key, when the server has any. A dependency of every /v1/ route and /metrics, so it runs
    before the body is validated."""
    keys = server.config.api_keys
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    token = auth[7:] if auth.lower().startswith("bearer ") else ""
    if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
        raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)", code="invalid_api_key")


def json_body(model: type[BaseModel]) -> Callable:
    """A dependency that validates the request body as `model`, after `authorize`. (A plain body parameter
    would be parsed and checked before any dependency runs, answering unauthenticated callers with the
    fields their body lacks.) Bodies over `max_body_bytes` are a 413, without reading past the limit;
    starlette's own limit answers in plain text, not an OpenAI error body."""
    async def parse(request: HTTPRequest, server: ServerDep, _: Annotated[None, Depends(authorize)]) -> BaseModel:
        limit = server.config.max_body_bytes
        too_large = APIError(413, f"the request body is over this server's limit of {limit} bytes",
                             code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        raw, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size > limit:
                raise too_large
            raw.append(piece)
        try:
            return model.model_validate_json(b"".join(raw))
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False)) from None
    return parse


completion_body, chat_body = json_body(CompletionBody), json_body(ChatBody)


# ------------------------------------------------------------------------------------------ helpers


def worker_for(server: Server, name: str) -> ModelWorker:
    if name not in server.workers:
        available = ", ".join([*server.workers, *server.routes])
        raise APIError(404, f"model {name!r} does not exist; available: {available}", param="model",
                       code="model_not_found")
    return server.workers[name]


def sampling(body: SamplingFields, max_new: int, i: int) -> SamplingParams:
    temperature = 0.0 if body.top_p == 0 else body.temperature
    seed = None if body.seed is None else body.seed + i
    return SamplingParams(max_new_tokens=max(max_new, 1), temperature=temperature, top_k=body.top_k,
                          top_p=body.top_p or 1.0, repetition_penalty=body.repetition_penalty,
                          frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                          stop=body.stop_list(), seed=seed)


def check_stop(body: SamplingFields) -> None:
    stop = body.stop_list()
    if len(stop) > 4 or any(len(s) > 256 for s in stop):
        raise APIError(400, "stop: at most 4 strings of at most 256 characters", param="stop")


def budget(server: Server, w: ModelWorker, n_prompt: int, max_tokens: int | None, param: str,
           prompt_param: str) -> int:
    """max_tokens checked against the context and the server's limit (None: as many as fit). A prompt
    that does not fit is a 400 naming the limit: it is never cut to fit."""
    limit = min(server.config.max_tokens_limit or w.ctx, w.ctx)
    if n_prompt > w.ctx or (n_prompt == w.ctx and max_tokens != 0):
        raise APIError(400, f"the prompt is {n_prompt} tokens; this model's maximum context length is "
                            f"{w.ctx} tokens", param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        return max(0, min(limit, w.ctx - n_prompt))
    if max_tokens > limit:
        raise APIError(400, f"{param}: {max_tokens} is more than this server allows ({limit})", param=param)
    if n_prompt + max_tokens > w.ctx:
        raise APIError(400, f"this model's maximum context length is {w.ctx} tokens; you requested "
                            f"{n_prompt + max_tokens} ({n_prompt} in the prompt, {max_tokens} to generate)",
                       param=param, code="context_length_exceeded")
    return max_tokens


class Slot:
    """A place among the `max_concurrent` requests in flight (429 when there is none)."""

    def __init__(self, server: Server) -> None:
        self.metrics = m = server.metrics
        if m.in_flight >= server.config.max_concurrent:
            m.rejected.inc()
            raise APIError(429, f"too many requests in flight ({server.config.max_concurrent}); retry shortly",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"retry-after": "1"})
        m.in_flight += 1
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.metrics.in_flight -= 1


async def run_to_end(server: Server, w: ModelWorker, reqs: list[Request], http: HTTPRequest, slot: Slot) -> None:
    """Run non-streaming requests to completion, then free their concurrency slot."""
    try:
        async for _ in run_requests(server, w, reqs, http):
            pass
    finally:
        slot.release()


async def run_requests(server: Server, w: ModelWorker, reqs: list[Request],
                       http: HTTPRequest) -> AsyncIterator[Update]:
    """Updates of `reqs` as the engine thread produces them; cancels what is left on exit."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    t0 = time.perf_counter()
    first = True
    for r in reqs:
        w.submit(r, (loop, q))
    pending = len(reqs)
    timeout_s = server.config.timeout_s
    deadline = t0 + timeout_s
    m = server.metrics
    try:
        while pending:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise APIError(504, f"request timed out after {timeout_s:g} s", type="timeout", code="timeout")
            try:
                item = await asyncio.wait_for(q.get(), timeout=min(left, 1.0))
            except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
                if await http.is_disconnected():
                    return
                continue
            if isinstance(item, APIError):
                raise item
            if isinstance(item, Exception):
                raise APIError(500, f"engine error: {type(item).__name__}: {item}", type="server_error")
            for u in item:
                if first and u.token is not None:
                    m.ttft.labels(model=w.name).observe(time.perf_counter() - t0)
                    first = False
                pending -= u.finish_reason is not None
                yield u
    finally:
        for r in reqs:
            if r.finish_reason is None:
                w.cancel(r)
        m.latency.labels(model=w.name).observe(time.perf_counter() - t0)
        m.prompt_tokens.labels(model=w.name).inc(sum(len(r.prompt_ids) for r in reqs))
        m.completion_tokens.labels(model=w.name).inc(sum(len(r.output_ids) for r in reqs))


def usage(reqs: list[Request], n: int) -> dict:
    """Prompt tokens once per prompt (the n choices of a prompt share it), as OpenAI counts them."""
    p = sum(len(r.prompt_ids) for r in reqs[::n])
    c = sum(len(r.output_ids) for r in reqs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def stream(body_iter: AsyncIterator[str], slot: Slot | None, headers: dict | None = None,
           on_end: Callable[[], None] | None = None) -> StreamingResponse:
    """Server-sent events; `on_end` runs once the stream is over, finished or not (a route's metrics)."""
    async def gen() -> AsyncIterator[str]:
        try:
            async for chunk in body_iter:
                yield chunk
        except APIError as e:  # the headers are gone: report the error in the stream
            yield sse(e.body)
        finally:
            if isinstance(body_iter, AsyncGenerator):  # stopped early (the guard refused): end it now, so that
                await body_iter.aclose()  # its engine requests are cancelled at once, not when collected
            if slot is not None:
                slot.release()
            if on_end is not None:
                on_end()
        yield sse("[DONE]")
    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})


@dataclass
class Tag:
    """How a routed answer is marked and counted: `fields` join the body (every chunk of a stream), `headers`
    the response, and `done(usage)` runs once the answer is over (the route's metrics)."""

    fields: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    done: Callable[[dict], None] = lambda usage: None


def respond(body: dict, tag: Tag | None) -> dict | JSONResponse:
    """A whole (non-streamed) answer: as it is, or with the route's headers and metrics."""
    if tag is None:
        return body
    tag.done(body.get("usage") or {})
    return JSONResponse(body, headers=tag.headers)


def token_str(tok: Tokenizer, i: int) -> str:
    return tok.decode([i], skip_special=False)


def kept(r: Request) -> int:
    """How many output tokens the returned text holds: those before a stop string (log-probs stop there)."""
    return r.text.n_tokens_in_text if r.text is not None else len(r.output_ids)


def encode_prompts(w: ModelWorker, prompts: list) -> list[tuple[str, list[int]]]:
    """(text, ids) of each prompt, a string or token ids. Run in a worker thread: tokenizing a long prompt
    takes a while."""
    encoded = []
    for p in prompts:
        if isinstance(p, str):
            ids = w.tokenizer.encode(p, bos=True)
        else:
            if any(not 0 <= t < w.vocab_size for t in p):
                raise APIError(400, f"prompt: token ids must be in [0, {w.vocab_size})", param="prompt")
            ids = list(p)
        if not ids:
            raise APIError(400, "prompt: empty, and this model has no bos token to start from", param="prompt")
        encoded.append((p if isinstance(p, str) else w.tokenizer.decode(p), ids))
    return encoded


def encode_chat(w: ModelWorker, messages: list[dict]) -> list[int]:
    try:
        return w.tokenizer.encode(w.tokenizer.apply_chat_template(messages), bos=False)  # the template writes bos
    except SlmforgeError as e:
        raise APIError(400, str(e), param="messages") from None


# ------------------------------------------------------------------------------------------- routes

public = APIRouter()
api = APIRouter(dependencies=[Depends(authorize)])


@public.get("/", include_in_schema=False)
def web_ui() -> FileResponse:  # the page asks for the API key itself; it holds no secrets
    return FileResponse(Path(__file__).parent / "static" / "index.html")


@public.get("/health")
def health(server: ServerDep) -> dict:
    """Always 200 while the process serves; `ready` is false while a compiled decode step is being built
    (requests are served eager meanwhile, slower)."""
    compiling = [name for name, w in server.workers.items() if w.engine.compiling]
    return {"status": "ok", "ready": not compiling, "compiling": compiling, "models": list(server.workers)}


@api.get("/metrics")
def metrics_text(server: ServerDep) -> Response:
    return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def model_card(w: ModelWorker) -> dict:
    return {"id": w.name, "object": "model", "created": w.created, "owned_by": "slmforge", "max_model_len": w.ctx}


def route_card(route: Route) -> dict:
    return {"id": route.id, "object": "model", "created": route.created, "owned_by": "slmforge",
            "route": {"router": route.router.kind, "threshold": route.router.threshold,
                      "small": route.model_name("small"), "large": route.model_name("large")}}


@api.get("/v1/models")
def list_models(server: ServerDep) -> dict:
    return {"object": "list", "data": [*(model_card(w) for w in server.workers.values()),
                                       *(route_card(r) for r in server.routes.values())]}


@api.get("/v1/models/{name:path}")
def get_model(name: str, server: ServerDep) -> dict:
    if name in server.routes:
        return route_card(server.routes[name])
    return model_card(worker_for(server, name))


@api.post("/v1/completions")
async def completions(body: Annotated[CompletionBody, Depends(completion_body)], request: HTTPRequest,
                      server: ServerDep):
    if server.guard is not None:
        return await guarded(server, body, request, chat=False)
    if body.model in server.routes:
        return await routed(server, server.routes[body.model], body, request, chat=False)
    return (await answer_completions(server, worker_for(server, body.model), body, request))[0]


async def answer_completions(server: Server, w: ModelWorker, body: CompletionBody, request: HTTPRequest,
                             tag: Tag | None = None) -> tuple[Any, list[Request]]:
    """The completion of `body` by the local model `w` (whatever body.model says: a route picks `w`), and
    the engine requests once run (a cascade reads the small answer's log-probs from them)."""
    check_stop(body)
    prompts = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts or len(prompts) * body.n > 16:
        raise APIError(400, "prompt: give 1 to 16 prompts (times n)", param="prompt")
    if body.echo and body.stream:
        raise APIError(400, "echo is not supported with stream", param="echo")
    encoded = await run_in_threadpool(encode_prompts, w, prompts)
    max_new = [budget(server, w, len(ids), body.max_tokens, "max_tokens", "prompt") for _, ids in encoded]
    reqs = [Request(ids, sampling(body, m, j), max_new_tokens=m, stop_ids=w.tokenizer.stop_ids,
                    logprobs=body.logprobs, prompt_logprobs=body.echo and body.logprobs is not None)
            for (_, ids), m in zip(encoded, max_new, strict=True) for j in range(body.n)]
    prompt_texts = [t for t, _ in encoded for _ in range(body.n)]
    slot = Slot(server)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    fields = tag.fields if tag else {}

    def chunk(choices: list[dict], **extra) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": w.name, "choices": choices,
                **extra, **fields}

    if body.stream:
        async def events() -> AsyncIterator[str]:
            index = {r.id: i for i, r in enumerate(reqs)}
            async for u in run_requests(server, w, reqs, request):
                lp = None
                if body.logprobs is not None and u.token is not None:
                    lp = {"tokens": [token_str(w.tokenizer, u.token)], "token_logprobs": [u.logprob],
                          "top_logprobs": [{token_str(w.tokenizer, t): v for t, v in u.top_logprobs or []}],
                          "text_offset": [u.request.text.offsets[-1]]}
                if u.text or u.finish_reason or lp:
                    yield sse(chunk([{"index": index[u.request.id], "text": u.text, "logprobs": lp,
                                      "finish_reason": u.finish_reason}]))
            if body.stream_options and body.stream_options.include_usage:
                yield sse(chunk([], usage=usage(reqs, body.n)))
        return stream(events(), slot, tag and tag.headers, tag and (lambda: tag.done(usage(reqs, body.n)))), reqs

    await run_to_end(server, w, reqs, request, slot)
    choices = []
    for i, (r, ptext) in enumerate(zip(reqs, prompt_texts, strict=True)):
        text = r.text.text
        choice = {"index": i, "text": (ptext + text) if body.echo else text, "logprobs": None,
                  "finish_reason": r.finish_reason}
        if body.logprobs is not None:
            choice["logprobs"] = completion_logprobs(w.tokenizer, r, ptext if body.echo else None)
        choices.append(choice)
    return respond(chunk(choices, usage=usage(reqs, body.n)), tag), reqs


def completion_logprobs(tok: Tokenizer, r: Request, echo_prompt: str | None) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    if echo_prompt is not None:  # the prompt's own tokens first, offsets into the prompt text
        prompt = TextStream(tok)  # decodes incrementally: where each token starts, in linear time
        for t in r.prompt_ids:
            prompt.push(t)
        offsets += prompt.offsets
        for i, t in enumerate(r.prompt_ids):
            tokens.append(token_str(tok, t))
            lps.append(r.prompt_token_logprobs[i] if i < len(r.prompt_token_logprobs) else None)
            tops.append(None)
    base = len(echo_prompt) if echo_prompt is not None else 0
    for i in range(kept(r)):
        t = r.output_ids[i]
        tokens.append(token_str(tok, t))
        lps.append(r.token_logprobs[i])
        tops.append({token_str(tok, a): v for a, v in r.top_logprobs[i]})
        offsets.append(base + r.text.offsets[i])
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


@api.post("/v1/chat/completions")
async def chat_completions(body: Annotated[ChatBody, Depends(chat_body)], request: HTTPRequest, server: ServerDep):
    if server.guard is not None:
        return await guarded(server, body, request, chat=True)
    if body.model in server.routes:
        return await routed(server, server.routes[body.model], body, request, chat=True)
    return (await answer_chat(server, worker_for(server, body.model), body, request))[0]


async def answer_chat(server: Server, w: ModelWorker, body: ChatBody, request: HTTPRequest,
                      tag: Tag | None = None) -> tuple[Any, list[Request]]:
    """The chat answer to `body` by the local model `w`, and the engine requests once run (as
    answer_completions)."""
    check_stop(body)
    if not w.tokenizer.chat_template:
        raise APIError(400, f"model {w.name!r} has no chat template (a plain language model): use "
                            "/v1/completions", param="model", code="no_chat_template")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    ids = await run_in_threadpool(encode_chat, w, messages)
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_new = budget(server, w, len(ids), asked, param, "messages")
    n_top = (body.top_logprobs or 0) if body.logprobs else None
    reqs = [Request(ids, sampling(body, max_new, j), max_new_tokens=max_new, stop_ids=w.tokenizer.stop_ids,
                    logprobs=n_top) for j in range(body.n)]
    slot = Slot(server)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    fields = tag.fields if tag else {}

    def chunk(choices: list[dict], **extra) -> dict:
        return {"id": cid, "object": "chat.completion.chunk" if body.stream else "chat.completion",
                "created": created, "model": w.name, "choices": choices, **extra, **fields}

    def lp_entry(t: int, lp: float, top: list[tuple[int, float]]) -> dict:
        s = token_str(w.tokenizer, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode()),
                "top_logprobs": [{"token": (a := token_str(w.tokenizer, i)), "logprob": v, "bytes": list(a.encode())}
                                 for i, v in top]}

    if body.stream:
        async def events() -> AsyncIterator[str]:
            index = {r.id: i for i, r in enumerate(reqs)}
            for i in range(len(reqs)):
                yield sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]))
            async for u in run_requests(server, w, reqs, request):
                lp = None
                if n_top is not None and u.token is not None:
                    lp = {"content": [lp_entry(u.token, u.logprob, u.top_logprobs or [])]}
                delta = {"content": u.text} if u.text else {}
                if delta or lp or u.finish_reason:
                    yield sse(chunk([{"index": index[u.request.id], "delta": delta, "logprobs": lp,
                                      "finish_reason": u.finish_reason}]))
            if body.stream_options and body.stream_options.include_usage:
                yield sse(chunk([], usage=usage(reqs, body.n)))
        return stream(events(), slot, tag and tag.headers, tag and (lambda: tag.done(usage(reqs, body.n)))), reqs

    await run_to_end(server, w, reqs, request, slot)
    choices = []
    for i, r in enumerate(reqs):
        lp = None
        if n_top is not None:
            n = kept(r)
            lp = {"content": [lp_entry(t, v, top) for t, v, top in
                              zip(r.output_ids[:n], r.token_logprobs[:n], r.top_logprobs[:n], strict=True)]}
        choices.append({"index": i, "message": {"role": "assistant", "content": r.text.text}, "logprobs": lp,
                        "finish_reason": r.finish_reason})
    return respond(chunk(choices, usage=usage(reqs, body.n)), tag), reqs


# ------------------------------------------------------------------------------------------- routes
#
# A route serves a router (slmforge/route.py) as one more model, `route:NAME`. A router that scores the
# prompt (random, learned, mf, sw) decides before anything is generated, and the chosen model answers. The
# cascade scores the small model's own answer: the small model answers first, whole, with log-probs; the
# confidence the router was trained on is computed from them, and where the router then says "large" the
# request, as the client sent it, goes to the large model, whose answer is the response. So a cascade
# streams only once it has decided: a kept small answer comes as one piece, a large one as it is written.

ROUTE_PREFIX = "route:"
ROUTE_KEYS = ("small", "large", "price", "signal", "api_key_env", "retries")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# What the server computes from the small answer's token log-probs (the tokens of the text it returns: a stop
# token or string is not among them), under the names a routing data file gives the field. All are
# confidences (higher = more sure); an entropy would need the whole distribution at every step.
SIGNALS: dict[str, Callable[[list[float]], float]] = {"mean_logprob": _mean, "min_logprob": min,
                                                      "sum_logprob": sum}


@dataclass
class RouteSpec:
    """One --route: NAME=ROUTER_DIR,small=MODEL,large=MODEL|openai:<base_url>#<model>[,key=value...]."""

    name: str
    router_dir: Path
    small: str  # a served model: its name or its directory
    large: str  # a served model, or openai:<base_url>#<model>
    price_in: float = 0.0  # USD per 1M prompt tokens of the large model (the cost metric)
    price_out: float = 0.0  # USD per 1M completion tokens of the large model
    signal: str | None = None  # cascade: which of SIGNALS the router's signal is, where its name does not say
    api_key_env: str | None = None  # remote large model: the variable holding its key (default OPENAI_API_KEY)
    retries: int | None = None  # remote large model: retries of a whole answer (default 2)


def parse_route_spec(spec: str) -> RouteSpec:
    """`NAME=ROUTER_DIR,small=MODEL,large=MODEL_OR_SPEC[,price=IN/OUT][,signal=NAME][,api_key_env=VAR]
    [,retries=N]`; each mistake is one error naming the route."""
    first, *rest = str(spec).split(",")
    name, sep, router_dir = (x.strip() for x in first.partition("="))
    if not sep or not name or not router_dir:
        raise SlmforgeError(f"--route {spec!r}: expected NAME=ROUTER_DIR,small=MODEL,large=MODEL_OR_SPEC")
    flag = f"--route {name}"
    kv: dict[str, str] = {}
    for item in rest:
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep or key not in ROUTE_KEYS:
            raise SlmforgeError(f"{flag}: {item.strip()!r}: expected {', '.join(k + '=...' for k in ROUTE_KEYS)}")
        if key in kv:
            raise SlmforgeError(f"{flag}: {key}= given twice")
        kv[key] = value
    for key in ("small", "large"):
        if not kv.get(key):
            raise SlmforgeError(f"{flag}: {key}=MODEL missing (a served model's name or directory"
                                f"{', or openai:<base_url>#<model>' if key == 'large' else ''})")
    out = RouteSpec(name, Path(router_dir), kv["small"], kv["large"], signal=kv.get("signal") or None,
                    api_key_env=kv.get("api_key_env") or None)
    if "price" in kv:
        a, sep, b = kv["price"].partition("/")
        try:
            out.price_in, out.price_out = float(a), float(b)
        except ValueError:
            sep = ""
        if not sep or not all(math.isfinite(p) and p >= 0 for p in (out.price_in, out.price_out)):
            raise SlmforgeError(f"{flag}: price={kv['price']}: expected IN/OUT, USD per 1M prompt and completion "
                                f"tokens of the large model (e.g. price=0.15/0.60)")
    if "retries" in kv:
        if not kv["retries"].isdigit():
            raise SlmforgeError(f"{flag}: retries={kv['retries']}: expected a whole number >= 0")
        out.retries = int(kv["retries"])
    return out


@dataclass
class Remote:
    """A large model behind an OpenAI-compatible endpoint. Whole answers go through slmforge.lm's OpenAILM
    (retries with backoff, in a worker thread); streamed ones through an httpx.AsyncClient of their own, not
    retried (a stream cannot be retried half-way)."""

    lm: OpenAILM
    headers: dict[str, str]


@dataclass
class Route:
    spec: RouteSpec
    router: Router
    small: str  # a served model's name
    large: str | Remote  # a served model's name, or a remote endpoint
    signal_name: str | None = None  # cascade: which of SIGNALS it is computed with
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def id(self) -> str:
        return ROUTE_PREFIX + self.spec.name

    def model_name(self, dest: str) -> str:
        m = self.small if dest == "small" else self.large
        return m.lm.model if isinstance(m, Remote) else m

    def describe(self) -> str:
        large = self.large.lm.name if isinstance(self.large, Remote) else self.large
        return f"{self.id}: {describe_router(self.router)} · small {self.small} · large {large}"


def _served_name(value: str, served: dict[str, Path]) -> str | None:
    """The served model named `value`, or served from the directory `value`."""
    if value in served:
        return value
    path = Path(value).expanduser()
    if path.is_dir():
        return next((n for n, p in served.items() if p.resolve() == path.resolve()), None)
    return None


def build_route(spec: RouteSpec, served: dict[str, Path], cfg: ServerConfig) -> Route:
    """A route checked against the served models and its router before any model loads: each mistake is
    one error naming the route, and nothing is left to fail at request time that could be found now."""
    from slmforge.lm import open_lm

    flag = f"--route {spec.name}"
    try:
        router = load_router(spec.router_dir)
    except SlmforgeError as e:
        raise SlmforgeError(f"{flag}: {e}") from None
    if router.threshold is None:
        raise SlmforgeError(f"{flag}: the router in {spec.router_dir} has no threshold; calibrate it on validation "
                            f"data first (slmforge route calibrate {spec.router_dir} --data VAL --share X --out DIR)")
    small = _served_name(spec.small, served)
    if small is None:
        raise SlmforgeError(f"{flag}: small={spec.small}: not a served model (serving {', '.join(served)}); give "
                            f"one of those names, or serve that directory too")
    large: str | Remote | None
    if spec.large.startswith("openai:"):
        env = spec.api_key_env or "OPENAI_API_KEY"
        key = os.environ.get(env) or None
        if spec.api_key_env and not key:
            raise SlmforgeError(f"{flag}: api_key_env={env}: the variable is unset or empty")
        try:  # reachability is not checked: the endpoint may come up later; a request to it then is a 502
            lm = open_lm(spec.large, api_key_env=env, concurrency=max(1, cfg.max_concurrent),
                         max_retries=2 if spec.retries is None else spec.retries, timeout_s=cfg.timeout_s,
                         price_in=spec.price_in, price_out=spec.price_out, backoff_s=0.5, max_backoff_s=5.0)
        except SlmforgeError as e:
            raise SlmforgeError(f"{flag}: large={spec.large}: {e}") from None
        large = Remote(lm, {"Authorization": f"Bearer {key}"} if key else {})
    else:
        large = _served_name(spec.large, served)
        if large is None:
            raise SlmforgeError(f"{flag}: large={spec.large}: not a served model (serving {', '.join(served)}) "
                                f"and not openai:<base_url>#<model>")
        if large == small:
            raise SlmforgeError(f"{flag}: small and large are the same model ({small})")
        for key, given in (("api_key_env", spec.api_key_env), ("retries", spec.retries)):
            if given is not None:
                raise SlmforgeError(f"{flag}: {key}= is for a remote large model (openai:<base_url>#<model>)")
    route = Route(spec, router, small, large)
    if router.kind == "cascade":
        route.signal_name = _cascade_signal(router, spec, flag)
    else:
        if spec.signal:
            raise SlmforgeError(f"{flag}: signal= is for a cascade router; this one is {router.kind}")
        try:  # score a prompt now: a missing embedding model or package is an error at startup, not per request
            router_scores(router, ["Is this router ready?"])
        except SlmforgeError as e:
            raise SlmforgeError(f"{flag}: {e}") from None
    return route


def _cascade_signal(router: Router, spec: RouteSpec, flag: str) -> str:
    """Which of SIGNALS the cascade router was trained on: its signal's name (or signal=), normalised."""
    trained = router.config.signal or ""
    key = (spec.signal or trained).lower().replace("-", "_").replace("log_prob", "logprob")
    if key not in SIGNALS:
        named = f"signal={spec.signal}" if spec.signal else f"the signal {trained!r}"
        raise SlmforgeError(f"{flag}: the cascade router was trained on {named}, which this server cannot compute "
                            f"from an answer; it computes {', '.join(SIGNALS)} (the small answer's token log-probs): "
                            f"add signal=NAME if {trained!r} is one of them")
    if router.params.get("signal_kind") != "confidence":
        raise SlmforgeError(f"{flag}: the router takes {trained!r} as an uncertainty (higher = less sure), but "
                            f"{key} is a log-prob (higher = more sure); retrain it with --signal-kind confidence")
    return key


def _number(x: Any) -> float | None:
    """A score for JSON: an infinite or missing one is null (JSON has no Infinity)."""
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _tokens(usage: dict, key: str) -> int:
    try:  # a remote endpoint's usage is not ours to trust: a bad count must not fail the answer
        return max(0, int(usage.get(key) or 0))
    except (TypeError, ValueError):
        return 0


def count_tokens(server: Server, route: Route, dest: str, usage: dict) -> None:
    m = server.metrics
    p, c = _tokens(usage, "prompt_tokens"), _tokens(usage, "completion_tokens")
    m.route_prompt_tokens.labels(route.name, dest).inc(p)
    m.route_completion_tokens.labels(route.name, dest).inc(c)
    if dest == "large":
        m.route_cost.labels(route.name).inc((p * route.spec.price_in + c * route.spec.price_out) / 1e6)


def route_tag(server: Server, route: Route, dest: str, facts: dict) -> Tag:
    """The `routed_to` field and `x-slmforge-routed-to` header of an answer by `dest`, and its metrics."""
    info = {"route": route.name, "model": dest, "model_name": route.model_name(dest), "router": route.router.kind,
            "score": _number(facts.get("score")), "threshold": route.router.threshold}
    if route.router.kind == "cascade":
        info["signal"] = {"name": route.signal_name, "value": _number(facts.get("signal_value"))}

    def done(usage: dict) -> None:
        server.metrics.route_requests.labels(route.name, dest).inc()
        count_tokens(server, route, dest, usage)

    return Tag({"routed_to": info}, {"x-slmforge-routed-to": dest, "x-slmforge-route": route.name}, done)


def routing_text(body: CompletionBody | ChatBody, chat: bool) -> str:
    """What the router reads: the prompt, or in a chat the last user message (RouteLLM's controller routes on
    the last message). One text prompt per request: each prompt would be routed on its own, and token ids
    mean different things to the two models."""
    if chat:
        users = [m for m in body.messages if m.role == "user"]
        return (users or body.messages)[-1].text()
    p = body.prompt
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if not isinstance(p, str):
        raise APIError(400, "prompt: a route takes one text prompt per request (each prompt is routed on its own)",
                       param="prompt")
    return p


async def routed(server: Server, route: Route, body: CompletionBody | ChatBody, request: HTTPRequest,
                 chat: bool):
    """A request to `route:NAME`: decide, have the chosen model answer, and say which (field and header)."""
    text = routing_text(body, chat)
    if route.router.kind == "cascade":
        return await cascade(server, route, body, request, chat, text)
    try:
        score = float((await run_in_threadpool(router_scores, route.router, [text]))[0])
    except Exception as e:  # the router's own failure: an error body, not a traceback
        raise APIError(500, f"route {route.name}: the router failed: {type(e).__name__}: {e}",
                       type="server_error") from None
    dest = "large" if decide(route.router, np.array([score]))[0] else "small"
    return await answer_by(server, route, dest, body, request, chat, {"score": score})


async def answer_by(server: Server, route: Route, dest: str, body: CompletionBody | ChatBody,
                    request: HTTPRequest, chat: bool, facts: dict):
    tag = route_tag(server, route, dest, facts)
    model = route.small if dest == "small" else route.large
    if isinstance(model, Remote):
        return await answer_remote(server, route, model, body, chat, tag)
    answer = answer_chat if chat else answer_completions
    return (await answer(server, server.workers[model], body, request, tag))[0]


async def cascade(server: Server, route: Route, body: CompletionBody | ChatBody, request: HTTPRequest,
                  chat: bool, text: str):
    """The small model answers, whole and with log-probs; its confidence decides whether that answer is the
    response or the request goes to the large model."""
    if body.n != 1:
        raise APIError(400, f"n: {route.id} is a cascade, which answers with one choice (it decides on that "
                            f"answer's confidence)", param="n")
    asked_logprobs = body.logprobs if chat else body.logprobs is not None
    first = body.model_copy(update={"stream": False, "stream_options": None,
                                    "logprobs": True if chat else (body.logprobs or 0)})
    answer = answer_chat if chat else answer_completions
    resp, reqs = await answer(server, server.workers[route.small], first, request)
    count_tokens(server, route, "small", resp.get("usage") or {})
    r = reqs[0]
    if r.finish_reason is None:  # the client went away while the small model answered
        return Response(status_code=499)
    lps = r.token_logprobs[:kept(r)]
    value = SIGNALS[route.signal_name](lps) if lps else None
    # an empty answer has no confidence to judge it by: the large model answers
    score = math.inf if value is None else float(router_scores(route.router, [text], [value])[0])
    facts = {"score": score, "signal_value": value}
    if decide(route.router, np.array([score]))[0]:
        return await answer_by(server, route, "large", body, request, chat, facts)
    tag = route_tag(server, route, "small", facts)
    server.metrics.route_requests.labels(route.name, "small").inc()  # its tokens are counted above
    if not asked_logprobs:
        for c in resp["choices"]:
            c["logprobs"] = None
    resp.update(tag.fields)
    if body.stream:
        include = bool(body.stream_options and body.stream_options.include_usage)
        return stream(replay(resp, chat, include), None, tag.headers)
    return JSONResponse(resp, headers=tag.headers)


async def replay(resp: dict, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """A whole answer as the chunks of a stream: a cascade's kept small answer, or a remote endpoint that
    answered a stream request in one piece."""
    top = {k: v for k, v in resp.items() if k not in ("object", "choices", "usage")}
    obj = "chat.completion.chunk" if chat else "text_completion"
    for c in resp.get("choices") or []:
        if chat:
            i, content = c.get("index", 0), (c.get("message") or {}).get("content") or ""
            delta = {"role": "assistant", "content": content}
            yield sse({**top, "object": obj, "choices": [{"index": i, "delta": delta, "logprobs": c.get("logprobs"),
                                                          "finish_reason": None}]})
            yield sse({**top, "object": obj, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                          "finish_reason": c.get("finish_reason")}]})
        else:
            yield sse({**top, "object": obj, "choices": [c]})
    if include_usage and resp.get("usage"):
        yield sse({**top, "object": obj, "choices": [], "usage": resp["usage"]})


async def answer_remote(server: Server, route: Route, remote: Remote, body: CompletionBody | ChatBody, chat: bool,
                        tag: Tag):
    """The request, as the client sent it (the fields it set), to the remote large model. A failure is a 502
    naming the endpoint; it never reaches the client as a traceback."""
    import httpx

    path = "/chat/completions" if chat else "/completions"
    payload = {**body.model_dump(mode="json", exclude_unset=True), "model": remote.lm.model}

    def failed(why: str) -> APIError:
        server.metrics.route_errors.labels(route.name, "large").inc()
        return APIError(502, f"route {route.name}: the large model {remote.lm.name} failed: {why}",
                        type="server_error", code="upstream_error", headers=tag.headers)

    slot = Slot(server)
    if not body.stream:
        try:
            data = await run_in_threadpool(remote.lm.post, path, payload)
        except SlmforgeError as e:
            raise failed(str(e)) from None
        finally:
            slot.release()
        return respond({**data, **tag.fields}, tag)

    payload["stream"] = True
    payload["stream_options"] = {"include_usage": True}  # for the route's token and cost metrics
    want_usage = bool(body.stream_options and body.stream_options.include_usage)
    url = remote.lm.base_url + path
    client = httpx.AsyncClient(headers=remote.headers, timeout=server.config.timeout_s)
    try:  # opened before the response starts: a refused connection or an error status is still a plain 502
        resp = await client.send(client.build_request("POST", url, json=payload), stream=True)
        if resp.status_code != 200:
            detail = (await resp.aread()).decode(errors="replace")[:200].replace("\n", " ")
            await resp.aclose()
            raise failed(f"{url}: HTTP {resp.status_code}: {detail}")
    except httpx.HTTPError as e:
        await client.aclose()
        slot.release()
        raise failed(f"{url}: {type(e).__name__}: {e}") from None
    except BaseException:  # the 502 above, or the client gone: free what was taken
        await client.aclose()
        slot.release()
        raise
    got: dict = {}

    async def events() -> AsyncIterator[str]:
        try:
            if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                data = json.loads(await resp.aread())  # an endpoint that does not stream: its answer in one piece
                if not isinstance(data, dict):
                    raise ValueError(f"an answer that is not an object: {str(data)[:100]}")
                got.update(data.get("usage") or {})
                async for event in replay({**data, **tag.fields}, chat, want_usage):
                    yield event
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise ValueError(f"a chunk that is not an object: {data[:100]}")
                if isinstance(chunk.get("usage"), dict):
                    got.update(chunk["usage"])
                if not want_usage:
                    if not chunk.get("choices") and "error" not in chunk:
                        continue  # the usage chunk asked for above
                    chunk.pop("usage", None)
                yield sse({**chunk, **tag.fields})
        except (httpx.HTTPError, ValueError) as e:  # stream() reports it in the stream
            raise failed(f"{type(e).__name__}: {e}") from None
        finally:
            await resp.aclose()
            await client.aclose()

    return stream(events(), slot, tag.headers, lambda: tag.done(got))


# -------------------------------------------------------------------------------------------- guard
#
# With --guard (slmforge/safety/guard.py) every request to a model or a route is checked before anything is
# generated and every answer before it leaves. A refused request gets a normal completion whose content is the
# refusal and whose finish_reason is "content_filter"; a redacted one reaches the model (or the router) with
# its matches replaced; a flagged one is served as it is. Answers are checked whole, or for a stream chunk by
# chunk through a StreamFilter that holds text back until it is checked. The decisions are in the body (a
# `guard` field: {"input": ..., "output": ...}, on the last chunk of each choice in a stream), in the header
# x-slmforge-guard and in /metrics. Checks run in worker threads: a long prompt does not hold up the loop.


def guard_header(d_in: Decision | None, d_out: Decision | None = None) -> str:
    return f"input={d_in.action if d_in else 'off'}" + (f", output={d_out.action}" if d_out else "")


def count_decision(server: Server, d: Decision) -> None:
    m = server.metrics
    m.guard_actions.labels(d.stage, d.action).inc()
    if not d.fired:
        m.guard_checks.labels(d.stage, "none", "allow").inc()
    for check, action in d.fired.items():
        m.guard_checks.labels(d.stage, check, action).inc()
    if d.errors:
        m.guard_checks.labels(d.stage, "judge", "error").inc()


def _prompt_texts(server: Server, body: CompletionBody) -> list[str]:
    """The completion prompts as text (token ids decoded by the model that will read them)."""
    p = body.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
        p = [p]
    texts = []
    for x in p:
        if isinstance(x, str):
            texts.append(x)
        elif body.model in server.routes:
            raise APIError(400, "prompt: a route takes one text prompt per request (each prompt is routed on its "
                                "own)", param="prompt")
        else:
            w = server.workers[body.model]
            if any(not 0 <= t < w.vocab_size for t in x):
                raise APIError(400, f"prompt: token ids must be in [0, {w.vocab_size})", param="prompt")
            texts.append(w.tokenizer.decode(list(x)))
    return texts


async def guarded(server: Server, body: CompletionBody | ChatBody, request: HTTPRequest, chat: bool):
    """A request through the guard: the input checks, the answer (a model's or a route's), the output checks."""
    guard = server.guard
    if body.model not in server.routes:
        worker_for(server, body.model)  # an unknown model is a 404, whatever the guard would say
    if guard.active("output") and (body.logprobs if chat else body.logprobs is not None):
        raise APIError(400, "logprobs: not available while this server checks answers (--guard): they would "
                            "show the text before it is checked", param="logprobs")
    d_in = None
    if guard.active("input"):
        if chat:
            subject: Any = [{"role": m.role, "content": m.text()} for m in body.messages]
        else:
            subject = _prompt_texts(server, body)
        d_in = await run_in_threadpool(guard.check_input, subject)
        count_decision(server, d_in)
        if d_in.action == "refuse":
            return refused(server, body, chat, d_in)
        if d_in.redacted is not None:
            if chat:
                from slmforge.serve.protocol import Message

                msgs = [Message(role=m.role, content=r["content"]) for m, r in zip(body.messages, d_in.redacted,
                                                                                   strict=True)]
                body = body.model_copy(update={"messages": msgs})
            else:
                body = body.model_copy(update={"prompt": d_in.redacted if len(d_in.redacted) > 1
                                               else d_in.redacted[0]})
    if body.model in server.routes:
        resp = await routed(server, server.routes[body.model], body, request, chat)
    else:
        answer = answer_chat if chat else answer_completions
        resp = (await answer(server, server.workers[body.model], body, request))[0]
    if isinstance(resp, StreamingResponse):
        return guard_stream(server, resp, chat, d_in, n_choices(body, chat))
    return await guard_whole(server, resp, chat, d_in)


def n_choices(body: CompletionBody | ChatBody, chat: bool) -> int:
    if chat:
        return body.n
    p = body.prompt
    return body.n * (1 if isinstance(p, str) or (p and isinstance(p[0], int)) else len(p))


def refused(server: Server, body: CompletionBody | ChatBody, chat: bool, d_in: Decision):
    """The answer to a refused request: the refusal as a normal completion, finish_reason content_filter."""
    text, n = server.guard.refusal, n_choices(body, chat)
    prefix, obj = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": "content_filter"} for i in range(n)]
    else:
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": "content_filter"} for i in range(n)]
    resp = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": body.model,
            "choices": choices, "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            "guard": {"input": d_in.to_json(), "output": None}}
    headers = {"x-slmforge-guard": guard_header(d_in)}
    if body.stream:
        include = bool(body.stream_options and body.stream_options.include_usage)
        return stream(replay(resp, chat, include), None, headers)
    return JSONResponse(resp, headers=headers)


def _choice_text(c: dict, chat: bool) -> str:
    if chat:
        return (c.get("message") or {}).get("content") or ""
    return c.get("text") or ""


def _set_choice_text(c: dict, chat: bool, text: str) -> None:
    if chat:
        c.setdefault("message", {"role": "assistant"})["content"] = text
    else:
        c["text"] = text


async def guard_whole(server: Server, resp: Any, chat: bool, d_in: Decision | None):
    """A whole answer (a dict, or a route's JSONResponse) with each choice checked."""
    guard = server.guard
    if isinstance(resp, JSONResponse):
        data = json.loads(resp.body)
        headers = {k: v for k, v in resp.headers.items() if k.startswith("x-")}
    elif isinstance(resp, dict):
        data, headers = resp, {}
    else:
        return resp  # a client that went away (499)
    d_out = None
    choices = data.get("choices") or []
    if guard.active("output") and choices:
        decisions = await run_in_threadpool(lambda: [guard.check_output(_choice_text(c, chat)) for c in choices])
        for c, d in zip(choices, decisions, strict=True):
            count_decision(server, d)
            if d.action == "refuse":
                _set_choice_text(c, chat, guard.refusal)
                c["finish_reason"] = "content_filter"
            elif d.redacted is not None:
                _set_choice_text(c, chat, d.redacted)
        d_out = merge(decisions, "output")
    data["guard"] = {"input": d_in.to_json() if d_in else None, "output": d_out.to_json() if d_out else None}
    headers["x-slmforge-guard"] = guard_header(d_in, d_out)
    return JSONResponse(data, headers=headers)


def guard_stream(server: Server, resp: StreamingResponse, chat: bool, d_in: Decision | None,
                 expected: int) -> StreamingResponse:
    """A streamed answer with each choice's text through a StreamFilter: a chunk carries only checked text;
    a refused choice ends with finish_reason content_filter, and once every choice is over the stream ends."""
    guard = server.guard
    resp.headers["x-slmforge-guard"] = guard_header(d_in)
    if not guard.active("output"):
        return resp
    inner = resp.body_iterator

    def text_of(c: dict) -> str:
        return ((c.get("delta") or {}).get("content") or "") if chat else (c.get("text") or "")

    def set_text(c: dict, text: str) -> None:
        if chat:
            delta = c.setdefault("delta", {})
            if text:
                delta["content"] = text
            else:
                delta.pop("content", None)
        else:
            c["text"] = text

    async def events() -> AsyncIterator[str]:
        filters: dict[int, Any] = {}
        over: set[int] = set()
        counted: set[int] = set()
        stopped_early = False

        def done(i: int) -> dict:
            over.add(i)
            if i not in counted:
                counted.add(i)
                count_decision(server, filters[i].decision)
            return filters[i].decision.to_json()

        try:
            async for event in inner:
                payload = event[6:].strip() if event.startswith("data: ") else None
                if payload is None or payload == "[DONE]" or not payload.startswith("{"):
                    yield event
                    continue
                chunk = json.loads(payload)
                choices = chunk.get("choices")
                if not isinstance(choices, list) or not choices:
                    yield event  # the usage chunk, an error
                    continue
                kept_choices, finished = [], []
                for c in choices:
                    i = c.get("index", 0)
                    if i in over:
                        continue  # a refused choice: nothing more of it leaves
                    f = filters.get(i)
                    if f is None:
                        f = filters[i] = guard.stream_filter()
                    text = await run_in_threadpool(f.push, text_of(c)) if text_of(c) else ""
                    if c.get("finish_reason") is not None and not f.stopped:
                        text += await run_in_threadpool(f.finish)
                    if f.stopped:
                        set_text(c, text)
                        c["finish_reason"], c["logprobs"] = "content_filter", None
                        finished.append(done(i))
                    elif c.get("finish_reason") is not None:
                        set_text(c, text)
                        finished.append(done(i))
                    else:
                        set_text(c, text)
                        if not text and not (chat and (c.get("delta") or {}).get("role")) and not c.get("logprobs"):
                            continue  # held back: nothing to send yet
                    kept_choices.append(c)
                if not kept_choices:
                    continue
                chunk["choices"] = kept_choices
                if finished:
                    out = finished[0] if len(finished) == 1 else merge(
                        [filters[c.get("index", 0)].decision for c in kept_choices
                         if c.get("finish_reason") is not None], "output").to_json()
                    chunk["guard"] = {"input": d_in.to_json() if d_in else None, "output": out}
                yield sse(chunk)
                if len(over) >= expected and any(f.stopped for f in filters.values()):
                    stopped_early = True  # every choice is over and one was refused: stop the model now
                    break
        finally:
            for i in filters:  # a stream that ended early: its decisions still count
                if i not in counted:
                    counted.add(i)
                    count_decision(server, filters[i].decision)
            aclose = getattr(inner, "aclose", None)
            if aclose is not None:
                await aclose()
        if stopped_early:
            yield sse("[DONE]")

    resp.body_iterator = events()
    return resp
