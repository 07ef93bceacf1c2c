"""A tiny OpenAI-compatible HTTP server for tests and benchmarks: canned replies, artificial latency and
scripted failures, in a background thread on 127.0.0.1.

    with serve_stub(reply=lambda body: "Once upon a time...", latency_s=0.05) as stub:
        lm = open_lm(f"openai:{stub.url}#stub", concurrency=8)

/v1/chat/completions and /v1/completions answer with `reply(body)` (default: echo the last user message);
/v1/completions with echo=True and logprobs returns the prompt's tokens (whitespace-split, each with
log-prob -len(token)/10) and their character offsets, as vLLM does. Usage counts whitespace tokens.
`errors` is a queue of (status, headers) answered, in order, before any normal reply (e.g. a 429 with
Retry-After); `fail_if(body)` returns a status to answer for requests it picks (e.g. 400 for bad ones).
The stub records every request body and the most requests it had in flight at once.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _last_user_message(body: dict) -> str:
    msgs = [m for m in body.get("messages", []) if m.get("role") == "user"]
    return msgs[-1]["content"] if msgs else body.get("prompt", "")


@dataclass
class Stub:
    url: str = ""
    reply: Callable[[dict], str] = _last_user_message
    latency_s: float = 0.0
    errors: list[tuple[int, dict]] = field(default_factory=list)
    fail_if: Callable[[dict], int | None] = lambda body: None
    requests: list[dict] = field(default_factory=list)
    request_times: list[float] = field(default_factory=list)
    max_in_flight: int = 0
    _in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, path: str, body: dict) -> tuple[int, dict, dict]:
        """(status, headers, JSON body) for one request."""
        with self._lock:
            self.requests.append(body)
            self.request_times.append(time.monotonic())
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            scripted = self.errors.pop(0) if self.errors else None
        try:
            if self.latency_s:
                time.sleep(self.latency_s)
            status = scripted[0] if scripted else self.fail_if(body)
            if status:
                headers = scripted[1] if scripted else {}
                return status, headers, {"error": {"message": f"stub says {status}"}}
            if path.endswith("/chat/completions"):
                text = self.reply(body)
                prompt = " ".join(m.get("content", "") for m in body.get("messages", []))
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            elif path.endswith("/completions"):
                prompt = body.get("prompt", "")
                if body.get("echo"):
                    text = prompt
                    tokens = [(m.start(), m.group()) for m in re.finditer(r"\s*\S+", prompt)]
                    logprobs = {"tokens": [t for _, t in tokens], "text_offset": [o for o, _ in tokens],
                                "token_logprobs": [None] + [-len(t.strip()) / 10 for _, t in tokens[1:]]}
                    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length"}
                else:
                    text = self.reply(body)
                    choice = {"index": 0, "text": text, "finish_reason": "stop"}
            else:
                return 404, {}, {"error": {"message": f"no route {path}"}}
            usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}
            return 200, {}, {"id": "stub", "object": "completion", "choices": [choice], "usage": usage}
        finally:
            with self._lock:
                self._in_flight -= 1


@contextmanager
def serve_stub(**kw) -> Iterator[Stub]:
    """Run a Stub (fields as keyword arguments) on a free port; yields it with .url set (ends in /v1)."""
    stub = Stub(**kw)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
        disable_nagle_algorithm = True  # else headers and body wait on the client's delayed ACK (~40 ms)

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                status, headers, out = 400, {}, {"error": {"message": "invalid JSON"}}
            else:
                status, headers, out = stub.answer(self.path, body)
            data = json.dumps(out).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    stub.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()
