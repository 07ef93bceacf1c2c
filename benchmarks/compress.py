#!/usr/bin/env python
"""Compression, measured: int8 / int4 weight-only quantization against fp32, and llama.cpp on the same weights.

    python benchmarks/compress.py                      # 2 threads
    python benchmarks/compress.py --models 15m --compile

For each model (random 15m preset weights as decode_speed.py makes them; llama.cpp's stories260K; the 4.9M
teacher of benchmarks/distill.py when it exists) and each variant (fp32, int8 = `slmforge quantize --bits 8`,
int4 = `--bits 4`):

  size        the weights on disk: model.safetensors for fp32, quantized.safetensors (+ the float tensors
              it leaves out) for int8/int4, and the GGUF file llama.cpp runs (f32, Q8_0, Q4_0 of the same weights)
  peak RSS    of a fresh process that loads the directory and decodes 64 tokens (ru_maxrss)
  decode      greedy tokens/s, 16-token prompt, --new tokens, single stream and 16 requests together, our engine
              (eager fast path; compiled too with --compile) and llama.cpp through benchmarks/llama_cpp_bench.py,
              same run, same threads
  onnxruntime the fp32 model exported by `slmforge export onnx`, decoded greedily with its KV cache (same prompts)
  bits/byte   on 400 paragraphs of real TinyStories text (trained models only), and its change vs fp32

Writes benchmarks/results/compress.json and compress.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# this llama-cpp-python build (0.3.36) segfaults in its repacked (AMX / AVX-512) Q8_0 and Q4_0 kernels on this
# CPU; llama.cpp runs the same files unrepacked (llama_cpp_bench reads this)
os.environ.setdefault("SLMFORGE_LLAMA_CPP_REPACK", "0")

import llama_cpp_bench  # noqa: E402 - benchmarks/ is on sys.path when run as a script
import torch  # noqa: E402
from decode_speed import best_time, make_model_dirs  # noqa: E402
from train_throughput import machine_info  # noqa: E402

from slmforge.compress.pipeline import peak_rss_mb
from slmforge.compress.quantize import QuantizeConfig, quantize_dir, weights_bytes
from slmforge.convert.gguf import export_gguf
from slmforge.evaluate.perplexity import judge
from slmforge.infer.engine import BatchEngine, Request, SamplingParams, run
from slmforge.modeldir import ModelDir

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "tinystories" / "tinystories_valid_part1.txt"
OUT = REPO / "benchmarks" / "results" / "compress.json"
TEACHER = REPO / "runs" / "bench_distill" / "lm" / "teacher" / "model"
GGUF_TYPE = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}


def decode(d: Path, n_new: int, batch: int, repeats: int, threads: int, compile: bool) -> dict:
    model = ModelDir.open(d).load_model()
    prompt = [1] + [(7 * i) % 250 + 5 for i in range(15)]
    greedy = SamplingParams(max_new_tokens=n_new, temperature=0)
    batch_prompts = [prompt[:8 + i % 8] for i in range(batch)]

    def engine_run(prompts, **kw):
        engine = BatchEngine(model, max_batch=len(prompts), max_len=None if len(prompts) > 1 else len(prompt) + n_new,
                             **kw)
        reqs = [engine.add(Request(p, greedy)) for p in prompts]
        list(run(engine))
        return [r.output_ids for r in reqs]

    engine_run([prompt]), engine_run(batch_prompts)  # warm up (and time the kernels per matrix)
    t1, toks = best_time(lambda: engine_run([prompt]), repeats)
    tb, toks_b = best_time(lambda: engine_run(batch_prompts), max(1, repeats - 1))
    row = {"tokens_per_s": n_new / t1, "batched_tokens_per_s": batch * n_new / tb, "tokens": toks[0]}
    if compile:
        t0 = time.perf_counter()
        engine_run([prompt], compile=True), engine_run(batch_prompts, compile=True)
        row["compile_s"] = time.perf_counter() - t0
        tc, toks_c = best_time(lambda: engine_run([prompt], compile=True), repeats)
        tcb, _ = best_time(lambda: engine_run(batch_prompts, compile=True), max(1, repeats - 1))
        row.update(compiled_tokens_per_s=n_new / tc, compiled_batched_tokens_per_s=batch * n_new / tcb,
                   compiled_same_tokens=toks_c[0] == toks[0])
    from slmforge.infer.fastpath import decode_model

    dm = decode_model(model, 1)
    row["kernels_single"] = sorted({p.kind for layer in dm.layers for p in (layer.qkv, layer.o, layer.gate_up,
                                                                             layer.down)} | {dm.lm_head.kind})
    if llama_cpp_bench.available():
        gtype = GGUF_TYPE[variant_of(d)]
        gguf = export_gguf(d, d.parent / f"{d.name}-{gtype}.gguf", gtype)
        single, (ctoks,) = llama_cpp_bench.tokens_per_s(gguf, [prompt], n_new, threads, repeats)
        batched, _ = llama_cpp_bench.tokens_per_s(gguf, batch_prompts, n_new, threads, max(1, repeats - 1))
        row.update(gguf_type=gtype, gguf_mb=gguf.stat().st_size / 1e6, llama_cpp_tokens_per_s=single,
                   llama_cpp_batched_tokens_per_s=batched, llama_cpp_same_tokens=ctoks == toks[0],
                   vs_llama_cpp=row["tokens_per_s"] / single, batched_vs_llama_cpp=row["batched_tokens_per_s"] / batched)
        if compile:
            row.update(compiled_vs_llama_cpp=row["compiled_tokens_per_s"] / single,
                       compiled_batched_vs_llama_cpp=row["compiled_batched_tokens_per_s"] / batched)
    if variant_of(d) == "fp32" and importlib.util.find_spec("onnxruntime"):
        from slmforge.convert.onnx import export_onnx, onnx_tokens_per_s

        onnx = export_onnx(d, d.parent / f"{d.name}.onnx")
        single, (otoks,) = onnx_tokens_per_s(onnx, [prompt], n_new, threads, repeats)
        batched, _ = onnx_tokens_per_s(onnx, batch_prompts, n_new, threads, max(1, repeats - 1))
        row.update(onnxruntime_tokens_per_s=single, onnxruntime_batched_tokens_per_s=batched,
                   onnxruntime_same_tokens=otoks == toks[0])
    return row


def variant_of(d: Path) -> str:
    q = ModelDir.open(d).meta.get("quantization")
    return "fp32" if not q else f"int{q['bits']}"


def markdown(results: dict) -> str:
    lines = ["| model | variant | disk MB | GGUF MB | peak RSS MB | tok/s x1 | llama.cpp x1 | ratio | tok/s x16 | "
             "llama.cpp x16 | ratio | onnxruntime x1 / x16 | compiled x1 / x16 | bits/byte (change) |", "|" + "---|" * 14]
    for r in results["rows"]:
        comp = f"{r['compiled_tokens_per_s']:.0f} / {r['compiled_batched_tokens_per_s']:.0f}" \
            if "compiled_tokens_per_s" in r else "-"
        ort = f"{r['onnxruntime_tokens_per_s']:.0f} / {r['onnxruntime_batched_tokens_per_s']:.0f}" \
            if "onnxruntime_tokens_per_s" in r else "-"
        bpb = f"{r['bits_per_byte']:.4f} ({r['bits_per_byte_change_pct']:+.2f}%)" if r.get("bits_per_byte") else "-"
        lines.append(f"| {r['model']} | {r['variant']} | {r['disk_mb']:.2f} | {r.get('gguf_mb', 0):.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['tokens_per_s']:.0f} | {r.get('llama_cpp_tokens_per_s', 0):.0f} | "
                     f"{r.get('vs_llama_cpp', 0):.2f} | {r['batched_tokens_per_s']:.0f} | "
                     f"{r.get('llama_cpp_batched_tokens_per_s', 0):.0f} | {r.get('batched_vs_llama_cpp', 0):.2f} | "
                     f"{ort} | {comp} | {bpb} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="", help="comma-separated subset: 15m, stories260K, teacher")
    ap.add_argument("--compile", action="store_true", help="also time the compiled decode step")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="compress-"))
    dirs = {k.split(" ")[0]: v for k, v in make_model_dirs(root).items() if not k.startswith("260k")}
    if (TEACHER / "model.safetensors").is_file():
        dirs["teacher"] = TEACHER
    if args.models:
        dirs = {k: v for k, v in dirs.items() if k in args.models.split(",")}
    rows = []
    for name, base in dirs.items():
        trained = name != "15m"
        fp32_bpb = None
        for variant in ("fp32", "int8", "int4"):
            d = base if variant == "fp32" else quantize_dir(base, root / f"{name}-{variant}",
                                                            QuantizeConfig(bits=8 if variant == "int8" else 4))
            t0 = time.perf_counter()
            row = {"model": name, "variant": variant, "params": ModelDir.open(d).config.n_params,
                   "disk_mb": weights_bytes(d) / 1e6, "peak_rss_mb": peak_rss_mb(d, args.threads),
                   **decode(d, args.new, args.batch, args.repeats, args.threads, args.compile)}
            if trained and REAL.is_file():
                bpb = judge(d, [REAL], max_docs=400)["files"][0]["bits_per_byte"]
                fp32_bpb = fp32_bpb or bpb
                row.update(bits_per_byte=bpb, bits_per_byte_change_pct=100 * (bpb / fp32_bpb - 1))
            row["seconds"] = round(time.perf_counter() - t0, 1)
            row.pop("tokens")
            rows.append(row)
            print(json.dumps(row), flush=True)
    # relative to fp32 of the same model
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["variant"] == "fp32")
        r["speed_vs_fp32"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["batched_speed_vs_fp32"] = r["batched_tokens_per_s"] / base["batched_tokens_per_s"]
        r["disk_vs_fp32"] = r["disk_mb"] / base["disk_mb"]
    results = {"env": {"torch": torch.__version__, "threads": args.threads, "cpus": os.cpu_count(),
                       "machine": platform.processor() or platform.machine(), "load_avg_1m_end": os.getloadavg()[0],
                       "llama_cpp_repack": os.environ["SLMFORGE_LLAMA_CPP_REPACK"] != "0", **machine_info(),
                       "command": "python benchmarks/compress.py " + " ".join(sys.argv[1:])}, "rows": rows}
    args.out.write_text(json.dumps(results, indent=2))
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
