"""`slmforge <stage> ...`: a thin typer app over the typed functions that are the public API.

User errors (SlmforgeError; missing, unwritable or full paths) print one line and exit 1; nothing is
half-written. SIGINT and SIGTERM stop a stage cleanly (slmforge/interrupt.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from slmforge.errors import SlmforgeError
from slmforge.stage_config import options_from
from slmforge.train.pretrain import PretrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build the small language model a task needs, on the hardware you have.")
import_app = typer.Typer(no_args_is_help=True, help="Convert other formats into a slmforge model directory.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train and inspect tokenizers.")
app.add_typer(import_app, name="import")
app.add_typer(tokenizer_app, name="tokenizer")

from slmforge.cli_data import data_app, synth  # noqa: E402 - the data system's commands live in their own module

app.add_typer(data_app, name="data")
app.command()(synth)

from slmforge.cli_tasks import eval_task, predict, run, task_data  # noqa: E402 - task data, predict, recipes
from slmforge.cli_train import ensemble_cmd, finetune, import_hf_cmd, merge_lora_cmd  # noqa: E402 - fine-tuning and conversion

app.command()(finetune)
app.command("merge-lora")(merge_lora_cmd)
app.command("ensemble")(ensemble_cmd)
import_app.command("hf")(import_hf_cmd)
app.command("task-data")(task_data)
app.command()(predict)
app.command("eval-task")(eval_task)
app.command()(run)

from slmforge.cli_compress import compress_cmd, distill_app, prune, quantize  # noqa: E402 - distillation and compression
from slmforge.cli_eval import eval_app  # noqa: E402 - bits per byte on real text
from slmforge.cli_guard import guard_app  # noqa: E402 - the guard's classifiers for serve --guard
from slmforge.cli_route import route_app  # noqa: E402 - routers between a small and a large model
from slmforge.cli_safety import redteam_app  # noqa: E402 - red-team probe suites, scans and reports

app.add_typer(eval_app, name="eval")
app.add_typer(distill_app, name="distill")
app.add_typer(route_app, name="route")
app.add_typer(guard_app, name="guard")
app.add_typer(redteam_app, name="redteam")
app.command()(quantize)
app.command()(prune)
app.command("compress")(compress_cmd)


def _load(model_dir: Path, dtype: str = "float32"):
    import torch

    from slmforge.modeldir import ModelDir

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:  # before the model loads: a typo should cost nothing
        raise SlmforgeError(f"--dtype {dtype}: choose {' or '.join(dtypes)}")
    md = ModelDir.open(model_dir)
    dt = dtypes[dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return md, md.load_model(device=device, dtype=dt), md.load_tokenizer()


def _sampling(max_tokens: int, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
              stop: list[str] | None, seed: int | None):
    from slmforge.infer.engine import SamplingParams

    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, stop=list(stop or []), seed=seed)


MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option(help="0 = greedy.")]
TopK = Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")]
RepPenalty = Annotated[float, typer.Option(help="Penalise tokens already present (1 = off).")]
Stop = Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")]
Seed = Annotated[int | None, typer.Option(help="Sampling seed, for reproducible output.")]
Dtype = Annotated[str, typer.Option(help="float32 or bfloat16 weights for inference.")]


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="Run folder (re-running resumes).")] = Path("runs/quickstart"),
    stories: Annotated[int | None, typer.Option(help="Stories to generate (recipe: 20,000).")] = None,
    preset: Annotated[str | None, typer.Option(help="Model size preset (recipe: 3m).")] = None,
    steps: Annotated[int | None, typer.Option(help="Pretraining steps, instead of the time budget.")] = None,
    minutes: Annotated[float | None, typer.Option(help="Pretraining time budget (recipe: 10).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per step (recipe: 32).")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="Tokenizer vocabulary size (recipe: 2,048).")] = None,
    precision: Annotated[str | None, typer.Option(help="bf16 (autocast), fp32 or auto (recipe: auto).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for data, init and sampling (recipe: 1337).")] = None,
    teacher: Annotated[Path | None, typer.Option(help="Base LM dir to sample the stories from (e.g. stories260K "
                                                      "after `slmforge import llama2c`); default: templates.")] = None,
    judge_text: Annotated[list[Path] | None, typer.Option(help="Real text to report bits/byte on (repeatable).")] = None,
    reference: Annotated[list[Path] | None, typer.Option(help="Model dir judged beside ours (repeatable).")] = None,
) -> None:
    """Offline, on a laptop CPU: story corpus -> tokenizer -> pretrain -> samples and report. Runs the bundled
    recipe slmforge/recipes/quickstart.yaml (`slmforge run quickstart --set ...` is the same) with these
    options as overrides; the defaults are the recipe's."""
    from slmforge.recipes import load_recipe, run_recipe

    given = {"data.options.n": stories, "model.preset": preset, "pretrain.max_steps": steps,
             "pretrain.max_minutes": minutes, "pretrain.batch_size": batch_size, "model.vocab_size": vocab_size,
             "pretrain.precision": precision, "seed": seed,
             "data.options.teacher": str(teacher) if teacher else None,
             "judge.files": [str(p) for p in judge_text or []] or None,
             "judge.references": [str(p) for p in reference or []] or None}
    overrides = {k: v for k, v in given.items() if v is not None}
    if steps is not None and minutes is None:  # a step count replaces the time budget
        overrides["pretrain.max_minutes"] = None
    run_recipe(load_recipe("quickstart", overrides), out)


@tokenizer_app.command("train")
def tokenizer_train(
    inputs: Annotated[list[Path], typer.Argument(help="Text (.txt) or JSONL files.")],
    out: Annotated[Path, typer.Option(help="Folder for tokenizer.json and tokenizer_config.json.")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size, special tokens and 256 bytes included.")] = 4096,
    text_field: Annotated[str, typer.Option(help="JSONL field holding the text.")] = "text",
    min_frequency: Annotated[int, typer.Option(help="Minimum pair count for a merge.")] = 2,
) -> None:
    """Train a byte-level BPE tokenizer and report its compression (bytes/token)."""
    import itertools

    from slmforge.data.pack import iter_documents
    from slmforge.io import check_out_dir
    from slmforge.tokenizer import train_tokenizer

    check_out_dir(out)  # before the training, not when saving its result
    tok = train_tokenizer(iter_documents(inputs, text_field=text_field), vocab_size, min_frequency,
                          show_progress=True)
    tok.save(out)
    sample = list(itertools.islice(iter_documents(inputs, text_field=text_field), 2000))
    typer.echo(f"wrote {out} · vocab {tok.vocab_size} · {tok.bytes_per_token(sample):.2f} bytes/token "
               f"on {len(sample)} documents")


@app.command()
def pack(
    inputs: Annotated[list[Path], typer.Argument(help="Text (.txt, documents split by blank lines) or JSONL.")],
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer or model directory.")],
    out: Annotated[Path, typer.Option(help="Output folder for train.bin, val.bin, index.json.")],
    val_fraction: Annotated[float, typer.Option(help="Share of documents held out for validation.")] = 0.005,
    text_field: Annotated[str, typer.Option(help="JSONL field holding the text.")] = "text",
    one_per_line: Annotated[bool, typer.Option(help="Each .txt line is one document.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the train/val split.")] = 0,
) -> None:
    """Tokenise a corpus into uint16/uint32 memmap shards with a train/val split (streaming)."""
    from slmforge.data.pack import pack_tokens
    from slmforge.tokenizer import Tokenizer

    stats = pack_tokens(inputs, Tokenizer.from_dir(tokenizer), out, val_fraction=val_fraction, seed=seed,
                        text_field=text_field, one_per_line=one_per_line)
    sp = stats["splits"]
    typer.echo(f"wrote {out} · {stats['documents']:,} documents · train {sp['train']['tokens']:,} tokens · "
               f"val {sp['val']['tokens']:,} tokens · {stats['dtype']} · {stats['tokens_per_s']:,} tokens/s")


@app.command()
@options_from(PretrainConfig)
def pretrain(
    cfg: PretrainConfig,
    data: Annotated[Path, typer.Option(help="Packed token folder (slmforge pack).")],
    out: Annotated[Path, typer.Option(help="Run folder: metrics, checkpoints, model/.")],
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer (or model) folder the data was packed with.")],
    preset: Annotated[str, typer.Option(help="Model size preset.")] = "5m",
    ctx: Annotated[int | None, typer.Option(help="Context length (default: the preset's).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from out/checkpoints/last.pt if present.")] = True,
) -> None:
    """Pretrain a fresh model on packed tokens (resumable; under torchrun: DDP, or FSDP2 with --fsdp)."""
    from slmforge.config import preset as make_preset
    from slmforge.tokenizer import Tokenizer
    from slmforge.train.pretrain import pretrain as run_pretrain

    tok = Tokenizer.from_dir(tokenizer)
    model_cfg = make_preset(preset, vocab_size=tok.vocab_size, **({"max_position_embeddings": ctx} if ctx else {}))
    model_dir = run_pretrain(data, out, model_cfg, tok, cfg, resume=resume)
    typer.echo(f"wrote {model_dir}")


@app.command()
def generate(
    model: Annotated[Path, typer.Argument(help="Model directory.")],
    prompt: Annotated[str, typer.Argument(help="Text to continue.")] = "",
    max_tokens: MaxTokens = 200, temperature: Temperature = 0.8, top_k: TopK = 0, top_p: TopP = 0.95,
    repetition_penalty: RepPenalty = 1.0, stop: Stop = None, seed: Seed = None,
    samples: Annotated[int, typer.Option(help="How many continuations.")] = 1,
    dtype: Dtype = "float32",
) -> None:
    """Continue a prompt, streaming tokens as they are sampled."""
    from slmforge.infer.engine import stream_text

    if samples < 1:
        raise SlmforgeError(f"--samples {samples}: must be at least 1")
    if max_tokens < 1:
        raise SlmforgeError(f"--max-tokens {max_tokens}: must be at least 1")
    md, m, tok = _load(model, dtype)
    # the engine would quietly cut the prompt's start (BOS included) or the continuation to fit: say so instead
    ctx, n_prompt = md.config.max_position_embeddings, len(tok.encode(prompt, bos=True))
    if n_prompt + max_tokens > ctx:
        raise SlmforgeError(f"prompt of {n_prompt} tokens + --max-tokens {max_tokens} exceeds {model}'s context of "
                            f"{ctx} tokens (config.json max_position_embeddings); shorten the prompt or lower "
                            f"--max-tokens")
    for i in range(samples):
        params = _sampling(max_tokens, temperature, top_k, top_p, repetition_penalty, stop,
                           None if seed is None else seed + i)
        if samples > 1:
            typer.echo(f"--- sample {i + 1}")
        typer.echo(prompt, nl=False)
        for piece in stream_text(m, tok, prompt, params):
            typer.echo(piece, nl=False)
        typer.echo()


def _read_line(prompt: str) -> str | None:
    """A line from stdin (None at end of input); bytes that are not UTF-8 are a user error, not a traceback."""
    try:
        line = input(prompt)
        line.encode("utf-8")  # a C/POSIX locale decodes bad bytes into lone surrogates instead of failing
    except EOFError:
        return None
    except UnicodeError:
        raise SlmforgeError("stdin: the input is not UTF-8 text") from None
    return line


@app.command()
def chat(
    model: Annotated[Path, typer.Argument(help="Model directory.")],
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    max_tokens: MaxTokens = 256, temperature: Temperature = 0.7, top_k: TopK = 0, top_p: TopP = 0.95,
    repetition_penalty: RepPenalty = 1.0, seed: Seed = None, dtype: Dtype = "float32",
) -> None:
    """Interactive chat in the terminal (/reset clears the history, /quit or Ctrl-D leaves).

    When the conversation outgrows the model's context the oldest exchanges are dropped (the system
    message stays), with a note on stderr. A model without a chat template (a plain story model)
    continues what you type instead.
    """
    from slmforge.infer.engine import generate_ids
    from slmforge.tokenizer import fit_messages

    _, m, tok = _load(model, dtype)
    params = _sampling(max_tokens, temperature, top_k, top_p, repetition_penalty, None, seed)
    ctx = m.config.max_position_embeddings
    # the prompt budget generate_ids allows (a long reply is shortened to fit, a prompt is never cut here)
    budget = max(ctx - max_tokens, ctx // 2)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    mode = "chat" if tok.chat_template else "completion (no chat template)"
    typer.echo(f"slmforge chat — {model} — {mode}. /reset, /quit")
    while True:
        line = _read_line("you> ")
        if line is None:
            typer.echo()
            return
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/reset":
            messages = messages[:1] if system else []
            continue
        try:
            if tok.chat_template:
                turn, dropped = fit_messages([*messages, {"role": "user", "content": line}], tok, budget)
                ids = tok.encode_chat(turn)  # the template writes bos itself
                if dropped:
                    typer.secho(f"(dropped the oldest {dropped} messages: the conversation outgrew the model's "
                                f"context of {ctx} tokens)", dim=True, err=True)
                messages = turn
            else:
                ids = tok.encode(line, bos=True)
                if len(ids) > budget:
                    raise SlmforgeError(f"the text does not fit the model's context: {len(ids)} tokens, and "
                                        f"there is room for {budget}")
        except SlmforgeError as e:  # this turn cannot be answered; the session (and its history) goes on
            typer.echo(f"error: {e}", err=True)
            continue
        typer.echo("model> " + ("" if tok.chat_template else line), nl=False)
        stream, reply = tok.decode_stream(), []  # incremental: no re-decoding of the whole reply per token
        for token in generate_ids(m, ids, params, stop_ids=tok.stop_ids):
            if piece := stream.step(token):
                reply.append(piece)
                typer.echo(piece, nl=False)
        typer.echo()
        if tok.chat_template:
            messages.append({"role": "assistant", "content": "".join(reply)})


@app.command()
def info(model: Annotated[Path, typer.Argument(help="Model directory.")]) -> None:
    """Show a model directory's size, shape and provenance, and whether vLLM's attention takes its shape."""
    import json

    from slmforge.modeldir import ModelDir, describe
    from slmforge.serve.vllm_compat import vllm_summary

    out = json.loads(describe(model))
    # vLLM loads our HF Llama layout as is; what it can refuse is the head size (head_dim 8 on its CPU build)
    head_dim = ModelDir.open(model).config.head_dim
    out.update(head_dim=head_dim, vllm=vllm_summary(head_dim))
    typer.echo(json.dumps(out, indent=2))


@import_app.command("llama2c")
def import_llama2c_cmd(
    model_bin: Annotated[Path, typer.Argument(help="llama2.c checkpoint (e.g. stories260K.bin).")],
    tokenizer_bin: Annotated[Path, typer.Argument(help="llama2.c tokenizer (e.g. tok512.bin).")],
    out_dir: Annotated[Path, typer.Argument(help="Model directory to write.")],
) -> None:
    """Convert a llama2.c checkpoint + tokenizer into a model directory (HF layout)."""
    from slmforge.convert.llama2c import import_llama2c

    out = import_llama2c(model_bin, tokenizer_bin, out_dir)
    typer.echo(f"wrote {out}")


@app.command()
def serve(
    models: Annotated[list[str], typer.Argument(help="Model directories (named after the folder) or NAME=DIR.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_key_env: Annotated[str | None, typer.Option(
        help="Environment variable holding the API key(s), comma-separated; unset = no authentication.")] = None,
    max_concurrent: Annotated[int, typer.Option(help="Requests in flight before 429s.")] = 64,
    max_batch: Annotated[int, typer.Option(help="KV-cache slots per model (sequences decoded together).")] = 16,
    max_tokens_limit: Annotated[int | None, typer.Option(help="Most tokens a request may generate.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds a request may run.")] = 600.0,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads (default: torch's).")] = None,
    dtype: Dtype = "float32",
    compile: Annotated[bool | None, typer.Option(
        "--compile/--no-compile", help="torch.compile the decode step (default: on for models up to 512 wide, "
        "where per-op overhead is a large part of a step; the first requests wait ~15 s per cache bucket).")] = None,
    route: Annotated[list[str] | None, typer.Option(
        "--route", metavar="SPEC",
        help="NAME=ROUTER_DIR,small=MODEL,large=MODEL: serve a router as the model route:NAME, answered by the "
        "small or the large model as the router decides (a cascade: the small model first, the large one when "
        "its confidence is below the threshold). MODEL: a served model's name or directory; large may also be "
        "openai:<base_url>#<model>. Options: ,price=IN/OUT (USD per 1M prompt/completion tokens of the large "
        "model), ,signal=mean_logprob|min_logprob|sum_logprob (a cascade's), ,api_key_env=VAR, ,retries=N "
        "(remote). Repeatable; see docs/route.md.")] = None,
    guard: Annotated[Path | None, typer.Option(
        "--guard", metavar="CONFIG",
        help="Guard YAML: input and output checks (a trained classifier, PII / blocked-term / canary rules, an "
        "optional judge model), each with an action (refuse, redact, flag); see docs/safety.md.")] = None,
) -> None:
    """OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""
    import os

    import torch
    import uvicorn

    from slmforge.serve.app import ServerConfig, create_app

    if not 0 <= port <= 65535:
        raise SlmforgeError(f"--port {port}: must be in 0-65535")
    keys: list[str] = []
    if api_key_env:
        keys = [k.strip() for k in os.environ.get(api_key_env, "").split(",") if k.strip()]
        if not keys:
            raise SlmforgeError(f"--api-key-env {api_key_env}: the variable is unset or empty")
    if dtype not in ("float32", "bfloat16"):
        raise SlmforgeError(f"--dtype {dtype}: choose float32 or bfloat16")
    if threads:
        torch.set_num_threads(threads)
    if compile is None:
        from slmforge.modeldir import ModelDir
        from slmforge.serve.app import parse_model_specs

        widths = [ModelDir.open(p).config.hidden_size for p in parse_model_specs(list(models)).values()]
        compile = not torch.cuda.is_available() and max(widths) <= 512
    cfg = ServerConfig(max_concurrent=max_concurrent, max_batch=max_batch, max_tokens_limit=max_tokens_limit,
                       timeout_s=timeout, api_keys=keys, compile=compile)
    guarded = None
    if guard is not None:  # checked before the port and the models: a bad config costs nothing
        from slmforge.safety.guard import load_guard

        guarded = load_guard(guard)
    sock = _listen(host, port)  # before loading models: a port in use is an error at once, not after "serving"
    application = create_app(models, cfg, dtype=getattr(torch, dtype), routes=route or [], guard=guarded)
    port = sock.getsockname()[1]
    ready = " (compiling the decode step in the background; /health says when it is ready)" if compile else ""
    served = [*application.state.workers, *application.state.server.routes]
    typer.echo(f"serving {', '.join(served)} on http://{host}:{port}/v1{ready}", err=True)
    for r in application.state.server.routes.values():
        typer.echo(f"  {r.describe()}", err=True)
    if guarded is not None:
        from slmforge.safety.guard import describe as describe_guard

        typer.echo(f"  {describe_guard(guarded)}", err=True)
    uvicorn.Server(uvicorn.Config(application, log_level="warning")).run(sockets=[sock])


def _listen(host: str, port: int):
    """A socket bound to host:port, for uvicorn to serve on (binding here makes a bad address or a port in
    use one clear error)."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart right after a stop (TIME_WAIT)
        sock.bind(addr)
    except OSError as e:  # gaierror too
        raise SlmforgeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


@app.command("bench-serve")
def bench_serve(
    url: Annotated[str, typer.Argument(help="Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")],
    model: Annotated[str, typer.Option(help="Model name on that server.")],
    concurrency: Annotated[int, typer.Option(help="Clients sending requests back to back.")] = 16,
    duration: Annotated[float, typer.Option(help="Seconds to run.")] = 60.0,
    prompt_lens: Annotated[str, typer.Option(help="Prompt lengths in words, comma-separated (cycled).")] = "16,64,128",
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate per request.")] = 64,
    api_key_env: Annotated[str | None, typer.Option(help="Environment variable holding the API key.")] = None,
    long_clients: Annotated[int, typer.Option(help="Extra clients sending long prompts (reported apart).")] = 0,
    long_prompt_len: Annotated[int, typer.Option(help="Their prompt length in words.")] = 1000,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the summary here as JSON.")] = None,
) -> None:
    """Load-test a server: throughput, time to first token and latency (p50/p99)."""
    import asyncio
    import json
    import os

    from slmforge.serve.bench import run_load

    try:
        lens = tuple(int(x) for x in prompt_lens.split(",") if x.strip())
    except ValueError:
        raise SlmforgeError(f"--prompt-lens {prompt_lens!r}: expected comma-separated integers") from None
    if concurrency < 1 or long_clients < 0 or duration <= 0:
        raise SlmforgeError("--concurrency must be >= 1, --long-clients >= 0 and --duration > 0")
    key = os.environ.get(api_key_env) if api_key_env else None
    s = asyncio.run(run_load(url, model, concurrency, duration, lens or (16,), max_tokens, key,
                             long_clients=long_clients, long_prompt_len=long_prompt_len)).summary()
    typer.echo(f"{s['requests']} requests, {s['errors']} errors {s['errors_by_status'] or ''} in {s['duration_s']:.1f} s"
               f" · {s['requests_per_s']:.2f} req/s · {s['completion_tokens_per_s']:.1f} tokens/s · "
               f"TTFT p50 {s['ttft_p50_ms']:.0f} ms p99 {s['ttft_p99_ms']:.0f} ms · "
               f"latency p50 {s['latency_p50_ms']:.0f} ms p99 {s['latency_p99_ms']:.0f} ms")
    if "long" in s:
        lo = s["long"]
        typer.echo(f"long prompts: {lo['requests']} requests, {lo['errors']} errors · TTFT p50 {lo['ttft_p50_ms']:.0f} ms "
                   f"p99 {lo['ttft_p99_ms']:.0f} ms")
    if json_out:
        json_out.write_text(json.dumps(s, indent=2))


export_app = typer.Typer(no_args_is_help=True, help="Export a model directory to other runtimes' formats.")
app.add_typer(export_app, name="export")


@export_app.command("gguf")
def export_gguf_cmd(
    model: Annotated[Path, typer.Argument(help="Model directory.")],
    out: Annotated[Path, typer.Argument(help="GGUF file to write (for llama.cpp, Ollama).")],
    type: Annotated[str, typer.Option("--type", help="Weight type: f32, f16, q8_0 or q4_0 (a quantized "
                                                             "directory: its own weights as q8_0/q4_0).")] = "f16",
) -> None:
    """Write a GGUF v3 file (llama architecture, tokenizer and chat template included)."""
    from slmforge.convert.gguf import export_gguf

    path = export_gguf(model, out, type)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@export_app.command("onnx")
def export_onnx_cmd(
    model: Annotated[Path, typer.Argument(help="Model directory.")],
    out: Annotated[Path, typer.Argument(help="ONNX file to write (for onnxruntime, optimum, onnxruntime-genai).")],
    opset: Annotated[int, typer.Option(help="ONNX opset, 18 to 23.")] = 18,
) -> None:
    """Write an ONNX graph with the KV cache as inputs and outputs (past_key_values.N.key -> present.N.key)."""
    from slmforge.convert.onnx import export_onnx

    path = export_onnx(model, out, opset)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    from slmforge.errors import WRITE_ERRNOS, describe_os_error, os_error_behind
    from slmforge.interrupt import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():  # `kill PID` unwinds like Ctrl-C: temp files are removed, one line printed
            app()
    except SlmforgeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        # A full disk, a read-only or unwritable output, a missing input: the user's to fix, so one line and no
        # traceback. Any other error is a bug and keeps its traceback.
        err = os_error_behind(e)
        if err is None:
            raise
        # a failed write() names no file: name the output the command was given
        typer.echo(f"error: {describe_os_error(err, _out_option() if err.errno in WRITE_ERRNOS else None)}",
                   err=True)
        sys.exit(1)


def _out_option() -> str | None:
    """The command line's --out value, if any."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--out" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--out="):
            return arg.split("=", 1)[1]
    return None


if __name__ == "__main__":
    main()
