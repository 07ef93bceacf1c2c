#!/usr/bin/env python
"""Serving under load: `slmforge serve` in a subprocess, `--concurrency` clients sending streaming
completions back to back for `--duration` seconds (slmforge.serve.bench.run_load, what `slmforge
bench-serve` runs). Reports requests/s, generated tokens/s, TTFT and latency p50/p99, and errors (the
goal is zero).

    python benchmarks/serve_load.py                               # stories260K (or random 260k), 60 s × 16
    python benchmarks/serve_load.py --preset 15m --duration 30
    python benchmarks/serve_load.py --preset 15m --ctx 2048 --long-clients 2 --json benchmarks/results/serve_long.json

--long-clients N adds N clients sending --long-prompt-len-word prompts (random weights of --preset with a
--ctx context): the short clients' TTFT p99 then shows whether long prefills stall the other slots.

The model is llama2.c's stories260K when ../shared/data/tinystories has it, else random weights of
--preset. Server and load generator share the machine: the server gets --server-threads torch threads.
Results go to benchmarks/results/serve_load.json (gitignored).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from rich.console import Console
from rich.table import Table
from train_throughput import LoadMeter  # benchmarks/ is on sys.path when run as a script

from slmforge.config import preset
from slmforge.model import LlamaModel
from slmforge.modeldir import save_model_dir
from slmforge.serve.bench import WORDS, run_load
from slmforge.tokenizer import train_tokenizer

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "serve_load.json"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"


def model_dir(root: Path, preset_name: str, ctx: int | None = None) -> tuple[str, Path]:
    if preset_name == "260k" and ctx is None and (SHARED / "stories260K.bin").is_file():
        from slmforge.convert.llama2c import import_llama2c

        return "stories260K", import_llama2c(SHARED / "stories260K.bin", SHARED / "tok512.bin", root / "stories260K")
    tok = train_tokenizer([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 20, vocab_size=300)
    torch.manual_seed(0)
    cfg = preset(preset_name, vocab_size=max(tok.vocab_size, 512),
                 **({"max_position_embeddings": ctx} if ctx else {}))
    return f"{preset_name}-random", save_model_dir(root / f"{preset_name}-random", LlamaModel(cfg), tok)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="260k")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--prompt-lens", default="16,64,128")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=None, help="context of the random model (default: the preset's)")
    ap.add_argument("--long-clients", type=int, default=0)
    ap.add_argument("--long-prompt-len", type=int, default=1800)
    ap.add_argument("--long-max-tokens", type=int, default=8)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="pass --compile/--no-compile to serve (default: serve's own choice)")
    ap.add_argument("--server-src", type=Path, default=None,
                    help="run the server from this source tree instead (e.g. `git archive` of an older commit "
                         "unpacked there), for before/after comparisons")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        name, path = model_dir(Path(tmp), args.preset, args.ctx)
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.server_threads)}
        if args.server_src:
            env["PYTHONPATH"] = str(args.server_src.resolve())
        server = subprocess.Popen([sys.executable, "-m", "slmforge", "serve", f"{name}={path}", "--port", str(port),
                                   "--threads", str(args.server_threads), "--max-batch", str(args.max_batch),
                                   "--max-concurrent", str(4 * (args.concurrency + args.long_clients)),
                                   *([] if args.compile is None else ["--compile" if args.compile else "--no-compile"])],
                                  env=env)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    health = httpx.get(base + "/health", timeout=1)
                    if health.status_code == 200 and health.json().get("ready", True):  # compiled, if compiling
                        break
                    time.sleep(0.1)
                except httpx.HTTPError:
                    time.sleep(0.1)
            lens = tuple(int(x) for x in args.prompt_lens.split(","))
            with LoadMeter() as load:  # our process only: the server's CPU counts as "other" here
                result = asyncio.run(run_load(base + "/v1", name, args.concurrency, args.duration, lens,
                                              args.max_tokens, long_clients=args.long_clients,
                                              long_prompt_len=args.long_prompt_len,
                                              long_max_tokens=args.long_max_tokens))
            metrics = httpx.get(base + "/metrics").text  # no --api-key-env: /metrics is open
        finally:
            server.terminate()
            server.wait(10)
    s = result.summary()
    s.update(model=name, max_tokens=args.max_tokens, prompt_lens=list(lens), server_threads=args.server_threads,
             ctx=args.ctx, long_clients=args.long_clients, server_src=str(args.server_src or ""), long_prompt_len=args.long_prompt_len, compile=args.compile,
             max_batch=args.max_batch, other_than_load_generator_pct=load.other_pct,  # server + other users
             server_decode_steps=next((float(line.split()[-1]) for line in metrics.splitlines()
                                       if line.startswith("slmforge_engine_decode_steps_total")), None))
    table = Table(title=f"slmforge serve {name}: {args.concurrency} concurrent clients, {s['duration_s']:.0f} s, "
                        f"prompts {args.prompt_lens} words, {args.max_tokens} new tokens")
    for col in ("requests", "errors", "req/s", "gen tokens/s", "TTFT p50", "TTFT p99", "latency p50",
                "latency p99"):
        table.add_column(col, justify="right")
    table.add_row(str(s["requests"]), str(s["errors"]), f"{s['requests_per_s']:.1f}",
                  f"{s['completion_tokens_per_s']:,.0f}", f"{s['ttft_p50_ms']:.0f} ms", f"{s['ttft_p99_ms']:.0f} ms",
                  f"{s['latency_p50_ms']:.0f} ms", f"{s['latency_p99_ms']:.0f} ms")
    Console(width=150).print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(s, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
