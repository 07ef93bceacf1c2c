"""`slmforge eval ...`: judging models on real text (see slmforge/evaluate/perplexity.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

eval_app = typer.Typer(no_args_is_help=True, help="Judge models on real text, whatever their tokenizer.")


@eval_app.command("ppl")
def eval_ppl(
    model: Annotated[Path, typer.Argument(help="Model directory (slmforge or HF Llama layout).")],
    files: Annotated[list[Path], typer.Argument(help="Text (.txt, documents split by blank lines) or .jsonl "
                                                     "(field \"text\").")],
    max_docs: Annotated[int | None, typer.Option(help="Score only the first N documents of each file.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward.")] = 16,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures here as JSON.")] = None,
) -> None:
    """Loss per token and bits per byte (comparable across tokenizers); each document from BOS."""
    from slmforge.errors import SlmforgeError
    from slmforge.evaluate.perplexity import format_table, judge
    from slmforge.io import check_out_file, write_json

    # all before the (slow) scoring
    if max_docs is not None and max_docs < 1:
        raise SlmforgeError(f"--max-docs {max_docs}: must be at least 1")
    if batch_size < 1:
        raise SlmforgeError(f"--batch-size {batch_size}: must be at least 1")
    if json_out:
        check_out_file(json_out)
    report = judge(model, list(files), max_docs=max_docs, batch_size=batch_size)
    typer.echo(format_table([report]))
    if json_out:
        write_json(json_out, report)
        typer.echo(f"wrote {json_out}")
