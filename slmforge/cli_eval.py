"""`slmforge eval ...`: judging models on real text (slmforge/evaluate/perplexity.py) and the SLM-vs-LLM report
card (slmforge/evaluate/card.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from slmforge.evaluate.card import EvalCardConfig
from slmforge.stage_config import options_from

eval_app = typer.Typer(no_args_is_help=True, help="Judge models on real text, whatever their tokenizer, and "
                                                  "small models against a large one (report card).")


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


@eval_app.command("card")
@options_from(EvalCardConfig, exclude=("models", "suites"))
def eval_card(
    cfg: EvalCardConfig,
    models: Annotated[list[str] | None, typer.Argument(help="LM specs: model directories, openai:<base_url>#<model> "
                                                            "(slmforge serve, vLLM, any OpenAI-compatible "
                                                            "endpoint); NAME=SPEC names one. The last is the "
                                                            "large reference unless --large.")] = None,
    config: Annotated[Path | None, typer.Option(help="A YAML of these settings (models, suites, out, ...); an "
                                                     "option given here overrides the file's (one left at "
                                                     "its default does not).")] = None,
) -> None:
    """Report card: every model on every suite (bits/byte, task metrics, speed and cost), each small model's
    quality as % of the large one's at % of its cost; OUT/card.md, card.json, card.png. A rerun resumes."""
    from slmforge.evaluate.card import load_card_config, make_card

    if models:
        cfg = dataclasses.replace(cfg, models=list(models))
    if config is not None:
        # the options that differ from their defaults were given: they win over the file
        defaults = EvalCardConfig()
        overrides = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                     if getattr(cfg, f.name) != getattr(defaults, f.name)}
        cfg = load_card_config(config, overrides)
    card = make_card(cfg)
    for name, s in card["summary"].items():
        if name == card["large"]:
            continue
        q, c = s["quality_pct_mean"], s["cost_pct"]
        basis = {"usd_per_1k_requests": "$ per 1k requests", "s_per_token": "s/token"}.get(s["cost_basis"], "n/a")
        typer.echo(f"{name}: quality {'n/a' if q is None else f'{q:.1f}%'} of {card['large']} at "
                   f"{'n/a' if c is None else f'{c:.1f}%'} of its cost ({basis})")
    typer.echo(f"wrote {Path(cfg.out) / 'card.md'}, card.json, card.png")
