"""An OpenAI-compatible HTTP server over the batch engine.

    app = create_app(["runs/quickstart/pretrain/model"], api_keys=["sk-..."])
    uvicorn.run(app, port=8000)

Routes: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics (Prometheus text), and `/`:
a chat page (static/index.html, no external resources) that streams from this same API.

Each model has one engine thread that runs continuous batching (`BatchEngine.step` in a loop). A request
handler turns the body into engine `Request`s, hands them to that thread and awaits their updates on an
asyncio queue the thread feeds through `loop.call_soon_threadsafe`, one call per step. Requests join
and leave between decode steps; a client that goes away frees its slot at the next step.

Errors are OpenAI-style bodies, {"error": {"message", "type", "param", "code"}}: 400 for bad input, 401
for a bad API key, 404 for an unknown model or route, 429 when `max_concurrent` requests are already in
flight, 504 when a request runs past `timeout_s`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmforge.errors import SlmforgeError
from slmforge.infer.engine import BatchEngine, Request, SamplingParams, Update
from slmforge.modeldir import ModelDir
from slmforge.serve.protocol import ChatBody, CompletionBody, SamplingFields, error_body
from slmforge.tokenizer import Tokenizer


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type, param, code), headers


# ------------------------------------------------------------------------------------------ metrics


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count) of seconds."""

    BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        self.counts[next((i for i, b in enumerate(self.BOUNDS) if v <= b), len(self.BOUNDS))] += 1
        self.sum, self.count = self.sum + v, self.count + 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, cum = [], 0
        for b, c in zip([*self.BOUNDS, "+Inf"], self.counts, strict=True):
            cum += c
            out.append(f'{name}_bucket{{{labels},le="{b}"}} {cum}')
        return [*out, f"{name}_sum{{{labels}}} {self.sum:.6f}", f"{name}_count{{{labels}}} {self.count}"]


@dataclass
class Metrics:
    requests: dict[tuple[str, str, int], int] = field(default_factory=lambda: defaultdict(int))
    prompt_tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    completion_tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    ttft: dict[str, Histogram] = field(default_factory=lambda: defaultdict(Histogram))
    latency: dict[str, Histogram] = field(default_factory=lambda: defaultdict(Histogram))
    in_flight: int = 0
    rejected: int = 0  # 429s


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
                self.metrics.requests[(route, scope["method"], message["status"])] += 1
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


# ---------------------------------------------------------------------------------------- the app


@dataclass
class ServerConfig:
    max_concurrent: int = 64  # requests in flight across all models; more get 429
    max_batch: int = 16  # KV-cache slots per model; requests beyond wait in the engine's queue
    max_tokens_limit: int | None = None  # most tokens one request may ask for (default: the context)
    timeout_s: float = 600.0  # per request
    api_keys: list[str] = field(default_factory=list)  # empty = no authentication
    compile: bool = False  # torch.compile each engine's decode step (first steps per kv-length bucket wait)


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
               dtype: torch.dtype = torch.float32, device: str | None = None) -> FastAPI:
    """A FastAPI app serving the model directories (a list of `path` / `name=path`, or {name: path})."""
    cfg = config or ServerConfig()
    specs = {k: Path(v) for k, v in model_dirs.items()} if isinstance(model_dirs, dict) \
        else parse_model_specs(list(model_dirs))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    workers: dict[str, ModelWorker] = {}
    for name, path in specs.items():
        md = ModelDir.open(path)
        workers[name] = ModelWorker(name, path, md.load_model(device, dtype), md.load_tokenizer(), cfg.max_batch,
                                     cfg.compile)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for w in workers.values():
            w.stop()

    app = FastAPI(title="slmforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.workers, app.state.metrics, app.state.config = workers, metrics, cfg
    app.add_middleware(CountRequests, metrics=metrics)

    # ------------------------------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body("request body is not valid JSON"), status_code=400)
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = f"{param}: {err.get('msg', 'invalid value')}" if param else err.get("msg", "invalid request body")
        return JSONResponse(error_body(msg, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(error_body(str(e.detail), code=code), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _server_error(_: HTTPRequest, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", type="server_error"),
                            status_code=500)

    # ------------------------------------------------------------------------------------ helpers

    def authorize(request: HTTPRequest) -> None:
        if not cfg.api_keys:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in cfg.api_keys):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")

    def worker_for(name: str) -> ModelWorker:
        if name not in workers:
            raise APIError(404, f"model {name!r} does not exist; available: {', '.join(workers)}",
                           param="model", code="model_not_found")
        return workers[name]

    def sampling(body: SamplingFields, max_new: int, i: int) -> SamplingParams:
        temperature = 0.0 if body.top_p == 0 else body.temperature
        seed = None if body.seed is None else body.seed + i
        return SamplingParams(max_new_tokens=max(max_new, 1), temperature=temperature, top_k=body.top_k,
                              top_p=body.top_p or 1.0, repetition_penalty=body.repetition_penalty,
                              stop=body.stop_list(), seed=seed)

    def check_stop(body: SamplingFields) -> None:
        stop = body.stop_list()
        if len(stop) > 4 or any(len(s) > 256 for s in stop):
            raise APIError(400, "stop: at most 4 strings of at most 256 characters", param="stop")

    def budget(w: ModelWorker, n_prompt: int, max_tokens: int | None, param: str, prompt_param: str) -> int:
        """max_tokens checked against the context and the server's limit (None: as many as fit)."""
        limit = min(cfg.max_tokens_limit or w.ctx, w.ctx)
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

        def __init__(self) -> None:
            if metrics.in_flight >= cfg.max_concurrent:
                metrics.rejected += 1
                raise APIError(429, f"too many requests in flight ({cfg.max_concurrent}); retry shortly",
                               type="rate_limit_error", code="rate_limit_exceeded", headers={"retry-after": "1"})
            metrics.in_flight += 1
            self.held = True

        def release(self) -> None:
            if self.held:
                self.held = False
                metrics.in_flight -= 1

    async def run_to_end(w: ModelWorker, reqs: list[Request], http: HTTPRequest, slot: Slot) -> None:
        """Run non-streaming requests to completion, then free their concurrency slot."""
        try:
            async for _ in run_requests(w, reqs, http):
                pass
        finally:
            slot.release()

    async def run_requests(w: ModelWorker, reqs: list[Request], http: HTTPRequest) -> AsyncIterator[Update]:
        """Updates of `reqs` as the engine thread produces them; cancels what is left on exit."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        t0 = time.perf_counter()
        first = True
        for r in reqs:
            w.submit(r, (loop, q))
        pending = len(reqs)
        deadline = t0 + cfg.timeout_s
        try:
            while pending:
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise APIError(504, f"request timed out after {cfg.timeout_s:g} s", type="timeout",
                                   code="timeout")
                try:
                    item = await asyncio.wait_for(q.get(), timeout=min(left, 1.0))
                except TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                if isinstance(item, APIError):
                    raise item
                if isinstance(item, Exception):
                    raise APIError(500, f"engine error: {type(item).__name__}: {item}", type="server_error")
                for u in item:
                    if first and u.token is not None:
                        metrics.ttft[w.name].observe(time.perf_counter() - t0)
                        first = False
                    pending -= u.finish_reason is not None
                    yield u
        finally:
            for r in reqs:
                if r.finish_reason is None:
                    w.cancel(r)
            metrics.latency[w.name].observe(time.perf_counter() - t0)
            metrics.prompt_tokens[w.name] += sum(len(r.prompt_ids) for r in reqs)
            metrics.completion_tokens[w.name] += sum(len(r.output_ids) for r in reqs)

    def usage(reqs: list[Request], n: int) -> dict:
        """Prompt tokens once per prompt (the n choices of a prompt share it), as OpenAI counts them."""
        p = sum(len(r.prompt_ids) for r in reqs[::n])
        c = sum(len(r.output_ids) for r in reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj: dict | str) -> str:
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"

    def stream(body_iter: AsyncIterator[str], slot: Slot) -> StreamingResponse:
        async def gen() -> AsyncIterator[str]:
            try:
                async for chunk in body_iter:
                    yield chunk
            except APIError as e:  # the headers are gone: report the error in the stream
                yield sse(e.body)
            finally:
                slot.release()
            yield sse("[DONE]")
        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    def token_str(tok: Tokenizer, i: int) -> str:
        return tok.decode([i], skip_special=False)

    # ------------------------------------------------------------------------------------ routes

    @app.get("/", include_in_schema=False)
    def web_ui() -> FileResponse:  # the page asks for the API key itself; it holds no secrets
        return FileResponse(Path(__file__).parent / "static" / "index.html")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "models": list(workers)}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics_text() -> str:
        lines = ["# TYPE slmforge_requests_total counter"]
        for (path, method, status), n in sorted(metrics.requests.items()):
            lines.append(f'slmforge_requests_total{{path="{path}",method="{method}",status="{status}"}} {n}')
        lines += ["# TYPE slmforge_requests_in_flight gauge", f"slmforge_requests_in_flight {metrics.in_flight}",
                  "# TYPE slmforge_requests_rejected_total counter",
                  f"slmforge_requests_rejected_total {metrics.rejected}"]
        for metric, kind, get in [
            ("prompt_tokens_total", "counter", lambda w: metrics.prompt_tokens[w.name]),
            ("completion_tokens_total", "counter", lambda w: metrics.completion_tokens[w.name]),
            ("engine_decode_steps_total", "counter", lambda w: w.engine.steps),
            ("engine_active_slots", "gauge", lambda w: w.engine.n_active),
            ("engine_waiting_requests", "gauge", lambda w: len(w.engine.waiting)),
        ]:
            lines.append(f"# TYPE slmforge_{metric} {kind}")
            lines += [f'slmforge_{metric}{{model="{w.name}"}} {get(w)}' for w in workers.values()]
        for metric, hists in [("time_to_first_token_seconds", metrics.ttft),
                              ("request_duration_seconds", metrics.latency)]:
            lines.append(f"# TYPE slmforge_{metric} histogram")
            for name in workers:
                lines += hists[name].lines(f"slmforge_{metric}", f'model="{name}"')
        return "\n".join(lines) + "\n"

    def model_card(w: ModelWorker) -> dict:
        return {"id": w.name, "object": "model", "created": w.created, "owned_by": "slmforge",
                "max_model_len": w.ctx}

    @app.get("/v1/models")
    def list_models(request: HTTPRequest) -> dict:
        authorize(request)
        return {"object": "list", "data": [model_card(w) for w in workers.values()]}

    @app.get("/v1/models/{name:path}")
    def get_model(name: str, request: HTTPRequest) -> dict:
        authorize(request)
        return model_card(worker_for(name))

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HTTPRequest):
        authorize(request)
        w = worker_for(body.model)
        check_stop(body)
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts or len(prompts) * body.n > 16:
            raise APIError(400, "prompt: give 1 to 16 prompts (times n)", param="prompt")
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
        if body.echo and body.stream:
            raise APIError(400, "echo is not supported with stream", param="echo")
        max_new = [budget(w, len(ids), body.max_tokens, "max_tokens", "prompt") for _, ids in encoded]
        reqs = [Request(ids, sampling(body, m, j), max_new_tokens=m, stop_ids=w.tokenizer.stop_ids,
                        logprobs=body.logprobs, prompt_logprobs=body.echo and body.logprobs is not None)
                for (_, ids), m in zip(encoded, max_new, strict=True) for j in range(body.n)]
        prompt_texts = [t for t, _ in encoded for _ in range(body.n)]
        slot = Slot()
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": w.name,
                    "choices": choices, **extra}

        if body.stream:
            async def events() -> AsyncIterator[str]:
                index = {r.id: i for i, r in enumerate(reqs)}
                async for u in run_requests(w, reqs, request):
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
            return stream(events(), slot)

        await run_to_end(w, reqs, request, slot)
        choices = []
        for i, (r, ptext) in enumerate(zip(reqs, prompt_texts, strict=True)):
            text = r.text.text
            choice = {"index": i, "text": (ptext + text) if body.echo else text, "logprobs": None,
                      "finish_reason": r.finish_reason}
            if body.logprobs is not None:
                choice["logprobs"] = completion_logprobs(w.tokenizer, r, ptext if body.echo else None)
            choices.append(choice)
        return chunk(choices, usage=usage(reqs, body.n))

    def completion_logprobs(tok: Tokenizer, r: Request, echo_prompt: str | None) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        if echo_prompt is not None:  # the prompt's own tokens first, offsets into the prompt text
            prefix = ""
            for i, t in enumerate(r.prompt_ids):
                offsets.append(len(prefix))
                prefix = tok.decode(r.prompt_ids[:i + 1])
                tokens.append(token_str(tok, t))
                lps.append(r.prompt_token_logprobs[i] if i < len(r.prompt_token_logprobs) else None)
                tops.append(None)
        base = len(echo_prompt) if echo_prompt is not None else 0
        n_kept = r.text.n_tokens_in_text  # tokens past a stop string are not part of the text
        for i in range(n_kept):
            t = r.output_ids[i]
            tokens.append(token_str(tok, t))
            lps.append(r.token_logprobs[i])
            tops.append({token_str(tok, a): v for a, v in r.top_logprobs[i]})
            offsets.append(base + r.text.offsets[i])
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: HTTPRequest):
        authorize(request)
        w = worker_for(body.model)
        check_stop(body)
        if not w.tokenizer.chat_template:
            raise APIError(400, f"model {w.name!r} has no chat template (a plain language model): use "
                                "/v1/completions", param="model", code="no_chat_template")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        ids = w.tokenizer.encode(w.tokenizer.apply_chat_template(messages), bos=False)  # template writes bos
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_new = budget(w, len(ids), asked, param, "messages")
        n_top = (body.top_logprobs or 0) if body.logprobs else None
        reqs = [Request(ids, sampling(body, max_new, j), max_new_tokens=max_new, stop_ids=w.tokenizer.stop_ids,
                        logprobs=n_top) for j in range(body.n)]
        slot = Slot()
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": cid, "object": "chat.completion.chunk" if body.stream else "chat.completion",
                    "created": created, "model": w.name, "choices": choices, **extra}

        def lp_entry(t: int, lp: float, top: list[tuple[int, float]]) -> dict:
            s = token_str(w.tokenizer, t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode()),
                    "top_logprobs": [{"token": (a := token_str(w.tokenizer, i)), "logprob": v,
                                      "bytes": list(a.encode())} for i, v in top]}

        if body.stream:
            async def events() -> AsyncIterator[str]:
                index = {r.id: i for i, r in enumerate(reqs)}
                for i in range(len(reqs)):
                    yield sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}]))
                async for u in run_requests(w, reqs, request):
                    lp = None
                    if n_top is not None and u.token is not None:
                        lp = {"content": [lp_entry(u.token, u.logprob, u.top_logprobs or [])]}
                    delta = {"content": u.text} if u.text else {}
                    if delta or lp or u.finish_reason:
                        yield sse(chunk([{"index": index[u.request.id], "delta": delta, "logprobs": lp,
                                          "finish_reason": u.finish_reason}]))
                if body.stream_options and body.stream_options.include_usage:
                    yield sse(chunk([], usage=usage(reqs, body.n)))
            return stream(events(), slot)

        await run_to_end(w, reqs, request, slot)
        choices = []
        for i, r in enumerate(reqs):
            lp = None
            if n_top is not None:
                lp = {"content": [lp_entry(t, v, top) for t, v, top in
                                  zip(r.output_ids, r.token_logprobs, r.top_logprobs, strict=True)]}
            choices.append({"index": i, "message": {"role": "assistant", "content": r.text.text}, "logprobs": lp,
                            "finish_reason": r.finish_reason})
        return chunk(choices, usage=usage(reqs, body.n))

    return app
