#!/usr/bin/env python
"""Decode speed: slmforge's engine vs transformers `generate` on the same model directory (CPU).

For each model (random weights of the 260k and 15m presets, and llama2.c's stories260K when
../shared/data/tinystories has it) and each weight dtype it times greedy decoding of `--new` tokens after
a 16-token prompt, single stream, with no stop token so every run makes exactly `--new` tokens:

  slmforge     `generate_ids` (a BatchEngine with one slot): the default engine, decoding on the fast path's
               eager inference copy of the weights (slmforge.infer.fastpath); "fast" in the table
  reference    the same engine with fast=False: the training model's own forward (the engine before the
               fast path)
  compiled     the engine with compile=True: the fast path's fixed-shape step compiled by torch.compile;
               compile_s is the time of the first (compiling) calls, single and batched together
  transformers `AutoModelForCausalLM.from_pretrained(dir).generate(..., do_sample=False,
               min_new_tokens=N, max_new_tokens=N)`, its default dynamic KV cache
  batched      the engine with `--batch` requests decoding together: total tokens/s (the server's case),
               fast, reference and compiled
  llama.cpp    (when llama-cpp-python is installed: benchmarks/setup_llama_cpp.sh) the same weights exported
               by `slmforge export gguf --type f32`, same prompt, same thread count, greedy, timed the same
               way: single stream, and the `--batch` requests decoded together through llama.cpp's batch
               API (benchmarks/llama_cpp_bench.py); fp32 rows only (the GGUF holds the fp32 weights)

tokens/s = new tokens / wall time of the whole call (prefill of 16 tokens included), best of `--repeats`.
All produce the same greedy tokens in fp32 (checked, reported as `same_tokens`, `llama_cpp_same_tokens`).

    python benchmarks/decode_speed.py                       # 2 threads, fp32 and bf16
    python benchmarks/decode_speed.py --threads 1 --dtypes float32

Results go to benchmarks/results/decode_speed.json (gitignored). Other processes' share of the machine
while each row was timed is recorded as other_load_pct; distrust rows where it is high.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import llama_cpp_bench  # benchmarks/ is on sys.path when run as a script
import torch
from rich.console import Console
from rich.table import Table
from train_throughput import LoadMeter

from slmforge.config import preset
from slmforge.convert.gguf import export_gguf
from slmforge.infer.engine import BatchEngine, Request, SamplingParams, generate_ids, run
from slmforge.model import LlamaModel
from slmforge.modeldir import ModelDir, save_model_dir
from slmforge.tokenizer import train_tokenizer

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "decode_speed.json"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_model_dirs(root: Path) -> dict[str, Path]:
    words = "once upon a time there was a little girl named lily who loved to play in the park".split()
    tok = train_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20, vocab_size=300)
    dirs = {}
    for name, vocab in [("260k", 512), ("15m", 32000)]:
        torch.manual_seed(0)
        dirs[f"{name} (random)"] = save_model_dir(root / name, LlamaModel(preset(name, vocab_size=vocab)), tok)
    if (SHARED / "stories260K.bin").is_file() and (SHARED / "tok512.bin").is_file():
        from slmforge.convert.llama2c import import_llama2c

        dirs["stories260K"] = import_llama2c(SHARED / "stories260K.bin", SHARED / "tok512.bin", root / "stories260K")
    return dirs


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def llama_cpp_rows(path: Path, prompt: list[int], batch_prompts: list[list[int]], n_new: int, threads: int,
                   repeats: int, ours: list[int], ours_batched: list[list[int]]) -> dict:
    """llama.cpp on an f32 GGUF export of the same model directory: single stream and batched."""
    if not llama_cpp_bench.available():
        return {"llama_cpp_tokens_per_s": None}
    gguf = export_gguf(path, path.parent / f"{path.name}-f32.gguf", "f32")
    single, (toks,) = llama_cpp_bench.tokens_per_s(gguf, [prompt], n_new, threads, repeats)
    batched, toks_b = llama_cpp_bench.tokens_per_s(gguf, batch_prompts, n_new, threads, max(1, repeats - 1))
    return {"llama_cpp_tokens_per_s": single, "llama_cpp_same_tokens": toks == ours,
            "llama_cpp_batched_tokens_per_s": batched, "llama_cpp_batched_same_tokens": toks_b == ours_batched}


def bench_one(label: str, path: Path, dtype: str, n_new: int, batch: int, repeats: int, threads: int) -> dict:
    import transformers

    md = ModelDir.open(path)
    ours = md.load_model("cpu", DTYPES[dtype])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    prompt = [1] + [(7 * i) % 250 + 5 for i in range(15)]
    greedy = SamplingParams(max_new_tokens=n_new, temperature=0)

    def run_ours():
        return list(generate_ids(ours, prompt, greedy))

    def engine_run(prompts: list[list[int]], **kw) -> list[list[int]]:
        engine = BatchEngine(ours, max_batch=len(prompts), max_len=None if len(prompts) > 1 else len(prompt) + n_new,
                             **kw)
        reqs = [engine.add(Request(p, greedy)) for p in prompts]
        list(run(engine))
        return [r.output_ids for r in reqs]

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                              pad_token_id=0)
        return out[0, len(prompt):].tolist()

    batch_prompts = [prompt[:8 + i % 8] for i in range(batch)]

    # compile=True: the first call compiles (one graph per kv bucket); time it, then time warm calls
    t0 = time.perf_counter()
    engine_run([prompt], compile=True), engine_run(batch_prompts, compile=True)
    compile_s = time.perf_counter() - t0
    run_ours(), run_hf(), engine_run([prompt], fast=False)  # warm up
    with LoadMeter() as load:
        t_ours, toks_ours = best_time(run_ours, repeats)
        t_ref, toks_ref = best_time(lambda: engine_run([prompt], fast=False)[0], repeats)
        t_comp, toks_comp = best_time(lambda: engine_run([prompt], compile=True)[0], repeats)
        t_hf, toks_hf = best_time(run_hf, repeats)
        t_batch, toks_batch = best_time(lambda: engine_run(batch_prompts), max(1, repeats - 1))
        t_batch_ref, _ = best_time(lambda: engine_run(batch_prompts, fast=False), max(1, repeats - 1))
        t_batch_comp, toks_batch_comp = best_time(lambda: engine_run(batch_prompts, compile=True), max(1, repeats - 1))
        cpp = llama_cpp_rows(path, prompt, batch_prompts, n_new, threads, repeats, toks_ours, toks_batch) \
            if dtype == "float32" else {"llama_cpp_tokens_per_s": None}
    n_batch = sum(map(len, toks_batch))
    if cpp["llama_cpp_tokens_per_s"]:
        cpp["vs_llama_cpp"] = (n_new / t_ours) / cpp["llama_cpp_tokens_per_s"]
        cpp["compiled_vs_llama_cpp"] = (n_new / t_comp) / cpp["llama_cpp_tokens_per_s"]
        cpp["batched_vs_llama_cpp_batched"] = (n_batch / t_batch) / cpp["llama_cpp_batched_tokens_per_s"]
        cpp["compiled_batched_vs_llama_cpp_batched"] = (n_batch / t_batch_comp) / cpp["llama_cpp_batched_tokens_per_s"]
        cpp["batched_vs_llama_cpp_sequential"] = (n_batch / t_batch) / cpp["llama_cpp_tokens_per_s"]
    return {"model": label, "params": md.config.n_params, "vocab": md.config.vocab_size, "dtype": dtype,
            "threads": threads, "new_tokens": n_new,
            "slmforge_tokens_per_s": n_new / t_ours, "transformers_tokens_per_s": n_new / t_hf,
            "speedup": t_hf / t_ours, "same_tokens": toks_ours == toks_hf,
            "reference_tokens_per_s": n_new / t_ref, "compiled_tokens_per_s": n_new / t_comp,
            "compile_s": compile_s, "compiled_same_tokens": toks_comp == toks_ours == toks_ref,
            "batch": batch, "batched_tokens_per_s": n_batch / t_batch,
            "reference_batched_tokens_per_s": n_batch / t_batch_ref,
            "compiled_batched_tokens_per_s": n_batch / t_batch_comp,
            "compiled_batched_same_tokens": toks_batch_comp == toks_batch,
            **cpp, "other_load_pct": load.other_pct}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--new", type=int, default=128, help="tokens to generate per run")
    ap.add_argument("--batch", type=int, default=16, help="requests decoded together in the batched run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="", help="comma-separated subset of the model labels")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_model_dirs(Path(tmp))
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        for label, path in dirs.items():
            if wanted and not any(w in label for w in wanted):
                continue
            for dtype in args.dtypes.split(","):
                rows.append(bench_one(label, path, dtype, args.new, args.batch, args.repeats, args.threads))
                print(json.dumps(rows[-1]))
    table = Table(title=f"decode tokens/s, greedy, {args.new} new tokens, {args.threads} threads")
    for col in ("model", "dtype", "reference", "fast", "compiled", "transformers", "llama.cpp",
                "fast / compiled vs llama.cpp", f"×{args.batch} fast", f"×{args.batch} compiled",
                f"llama.cpp ×{args.batch}", f"vs llama.cpp ×{args.batch}", "compile s", "same", "other load"):
        table.add_column(col, justify="left" if col in ("model", "dtype") else "right")
    for r in rows:
        load = "?" if r["other_load_pct"] is None else f"{r['other_load_pct']:.0f}%"
        cpp = r["llama_cpp_tokens_per_s"]
        same = r["same_tokens"] and r["compiled_same_tokens"] and r["compiled_batched_same_tokens"]
        same = str(same) + ("" if not cpp else f" / {r['llama_cpp_same_tokens']}")
        table.add_row(r["model"], r["dtype"], f"{r['reference_tokens_per_s']:,.0f}",
                      f"{r['slmforge_tokens_per_s']:,.0f}", f"{r['compiled_tokens_per_s']:,.0f}",
                      f"{r['transformers_tokens_per_s']:,.0f}", f"{cpp:,.0f}" if cpp else "-",
                      f"{r['vs_llama_cpp']:.2f}× / {r['compiled_vs_llama_cpp']:.2f}×" if cpp else "-",
                      f"{r['batched_tokens_per_s']:,.0f}", f"{r['compiled_batched_tokens_per_s']:,.0f}",
                      f"{r['llama_cpp_batched_tokens_per_s']:,.0f}" if cpp else "-",
                      f"{r['batched_vs_llama_cpp_batched']:.2f}× / {r['compiled_batched_vs_llama_cpp_batched']:.2f}×"
                      if cpp else "-", f"{r['compile_s']:.0f}", same, load)
    Console(width=150).print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                     "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
