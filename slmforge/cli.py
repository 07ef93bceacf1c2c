"""`slmforge <stage> ...`: a thin typer app over the typed functions that are the public API.

User errors (SlmforgeError, missing files) print one line and exit 1; nothing is half-written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from slmforge.errors import SlmforgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build the small language model a task needs, on the hardware you have.")
import_app = typer.Typer(no_args_is_help=True, help="Convert other formats into a slmforge model directory.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train and inspect tokenizers.")
app.add_typer(import_app, name="import")
app.add_typer(tokenizer_app, name="tokenizer")


def _load(model_dir: Path, dtype: str = "float32"):
    import torch

    from slmforge.modeldir import ModelDir

    md = ModelDir.open(model_dir)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
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

    _, m, tok = _load(model, dtype)
    for i in range(samples):
        params = _sampling(max_tokens, temperature, top_k, top_p, repetition_penalty, stop,
                           None if seed is None else seed + i)
        if samples > 1:
            typer.echo(f"--- sample {i + 1}")
        typer.echo(prompt, nl=False)
        for piece in stream_text(m, tok, prompt, params):
            typer.echo(piece, nl=False)
        typer.echo()


@app.command()
def chat(
    model: Annotated[Path, typer.Argument(help="Model directory.")],
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    max_tokens: MaxTokens = 256, temperature: Temperature = 0.7, top_k: TopK = 0, top_p: TopP = 0.95,
    repetition_penalty: RepPenalty = 1.0, seed: Seed = None, dtype: Dtype = "float32",
) -> None:
    """Interactive chat in the terminal (/reset clears the history, /quit or Ctrl-D leaves).

    A model without a chat template (a plain story model) continues what you type instead.
    """
    from slmforge.infer.engine import stream_text

    _, m, tok = _load(model, dtype)
    params = _sampling(max_tokens, temperature, top_k, top_p, repetition_penalty, None, seed)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    mode = "chat" if tok.chat_template else "completion (no chat template)"
    typer.echo(f"slmforge chat — {model} — {mode}. /reset, /quit")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            typer.echo()
            return
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/reset":
            messages = messages[:1] if system else []
            continue
        if tok.chat_template:
            messages.append({"role": "user", "content": line})
            prompt, bos = tok.apply_chat_template(messages), False  # the template writes bos itself
        else:
            prompt, bos = line, True
        typer.echo("model> " + ("" if tok.chat_template else line), nl=False)
        reply = []
        for piece in stream_text(m, tok, prompt, params, bos=bos):
            reply.append(piece)
            typer.echo(piece, nl=False)
        typer.echo()
        if tok.chat_template:
            messages.append({"role": "assistant", "content": "".join(reply)})


@app.command()
def info(model: Annotated[Path, typer.Argument(help="Model directory.")]) -> None:
    """Show a model directory's size, shape and provenance."""
    from slmforge.modeldir import describe

    typer.echo(describe(model))


@import_app.command("llama2c")
def import_llama2c_cmd(
    model_bin: Annotated[Path, typer.Argument(help="llama2.c checkpoint (e.g. stories260K.bin).")],
    tokenizer_bin: Annotated[Path, typer.Argument(help="llama2.c tokenizer (e.g. tok512.bin).")],
    out_dir: Annotated[Path, typer.Argument(help="Model directory to write.")],
) -> None:
    """Convert a llama2.c checkpoint + tokenizer into a model directory (HF layout)."""
    from slmforge.llama2c import import_llama2c

    out = import_llama2c(model_bin, tokenizer_bin, out_dir)
    typer.echo(f"wrote {out}")


def main() -> None:
    try:
        app()
    except SlmforgeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        typer.echo(f"error: {e.strerror or e}: {e.filename}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
