#!/usr/bin/env python
"""Fuzz the server: `--examples` hypothesis-generated HTTP requests (good and bad bodies, junk types, raw
bytes, wrong content types, unknown routes; tests/serve_fuzz.py) against an in-process app serving a tiny
random model. Every answer must be < 500 with an OpenAI-shaped body; afterwards the server must still
answer /health and have nothing in flight. Prints the status histogram and writes it to
benchmarks/results/fuzz_serve.json (gitignored).

    python benchmarks/fuzz_serve.py --examples 10000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from slmforge.config import preset
from slmforge.model import LlamaModel
from slmforge.modeldir import save_model_dir
from slmforge.serve.app import ServerConfig, create_app
from slmforge.serve.bench import WORDS
from slmforge.tokenizer import train_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the strategies are test code
from serve_fuzz import check_response, http_requests  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "fuzz_serve.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    statuses: Counter = Counter()
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 20, vocab_size=300)
        torch.manual_seed(0)
        path = save_model_dir(Path(tmp) / "tiny", LlamaModel(preset("200k", vocab_size=tok.vocab_size)), tok)
        app = create_app([path], ServerConfig(max_batch=8, max_tokens_limit=64, timeout_s=60))
        with TestClient(app) as client:
            @settings(max_examples=args.examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(http_requests(["tiny"], tok.vocab_size))
            def one(req):
                method, path_, body, ctype = req
                r = client.request(method, path_, content=body, headers={"content-type": ctype})
                statuses[r.status_code] += 1
                try:
                    check_response(r.status_code, r.headers.get("content-type", ""), r.content)
                except (AssertionError, ValueError, KeyError) as e:
                    failures.append(f"{method} {path_} {body[:200]!r} -> {r.status_code} {e}"[:500])

            t0 = time.perf_counter()
            one()
            elapsed = time.perf_counter() - t0
            healthy = client.get("/health").status_code == 200
            in_flight = app.state.metrics.in_flight
            active = app.state.workers["tiny"].engine.n_active
    out = {"examples": sum(statuses.values()), "seconds": round(elapsed, 1),
           "statuses": {str(k): v for k, v in sorted(statuses.items())}, "failures": len(failures),
           "failure_samples": failures[:10], "healthy_after": healthy, "in_flight_after": in_flight,
           "active_slots_after": active}
    print(json.dumps(out, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    ok = not failures and healthy and in_flight == 0 and active == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
