"""`slmforge quickstart`: from nothing to a small story model on a laptop CPU, offline.

    stories (TinyStories seeding formula, offline generator) -> BPE tokenizer -> packed tokens
    -> pretrain a few-million-parameter Llama -> val loss / perplexity, samples, report.md

Each stage writes its output atomically and is skipped when that output already exists, and pretraining
resumes from its checkpoint, so an interrupted quickstart picks up where it stopped.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from slmforge.config import preset
from slmforge.io import atomic_write_text, write_json

console = Console()

SAMPLE_PROMPTS = ("Once upon a time", "One day, a little", "Tom and his mom", "The sun was")


@dataclass
class QuickstartConfig:
    out: Path = Path("runs/quickstart")
    n_stories: int = 20_000
    vocab_size: int = 2048
    preset: str = "3m"
    seq_len: int = 256
    batch_size: int = 32
    max_steps: int | None = None  # None: as many as fit in train_minutes on this machine
    train_minutes: float = 10.0
    lr: float = 2e-3
    precision: str = "bf16"
    seed: int = 1337
    n_samples: int = 4
    sample_tokens: int = 200
    teacher: Path | None = None  # a base LM dir (e.g. imported stories260K): stories sampled from it, not the templates
    judge_text: tuple[Path, ...] = ()  # real text files: bits/byte of the model on each (and of each reference)
    references: tuple[Path, ...] = ()  # other model dirs judged on the same text, for comparison


def _stage(name: str, done: bool) -> bool:
    if done:
        console.print(f"[dim]· {name}: already done, skipping[/dim]")
    else:
        console.print(f"[bold]· {name}[/bold]")
    return not done


def make_corpus(path: Path, n: int, seed: int, teacher: Path | None = None) -> int:
    """Write n stories as JSONL, from the offline template generator or sampled from a teacher LM; an
    interrupted run resumes where it stopped."""
    from slmforge.data.synth import synthesize

    stats = synthesize("stories", n, path, teacher=str(teacher) if teacher else "builtin", seed=seed, batch_size=512)
    return stats.existing + stats.written


def corpus_done(path: Path, n: int) -> bool:
    """The corpus is complete: synth's stats say so (a corpus from before synth has no stats and was
    written atomically, so it is complete when it exists)."""
    stats_path = Path(f"{path}.stats.json")
    if not stats_path.is_file():
        return path.is_file()
    stats = json.loads(stats_path.read_text())
    return bool(stats.get("complete")) and stats.get("n") == n


def quickstart(cfg: QuickstartConfig) -> Path:
    from slmforge.data.pack import pack_tokens, read_index
    from slmforge.infer.engine import SamplingParams, generate_text
    from slmforge.modeldir import ModelDir, update_meta
    from slmforge.tokenizer import Tokenizer, train_tokenizer
    from slmforge.train.loop import plot_loss_curve
    from slmforge.train.pretrain import PretrainConfig, pretrain

    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus, tok_dir, packed, run_dir = out / "stories.jsonl", out / "tokenizer", out / "packed", out / "pretrain"
    timings: dict[str, float] = {}

    t = time.time()
    source = f"sampled from teacher {cfg.teacher}" if cfg.teacher else "offline template generator"
    if _stage(f"generating {cfg.n_stories:,} stories ({source})", corpus_done(corpus, cfg.n_stories)):
        make_corpus(corpus, cfg.n_stories, cfg.seed, cfg.teacher)
    timings["corpus_s"] = time.time() - t

    t = time.time()
    if _stage(f"training a {cfg.vocab_size}-token byte-level BPE tokenizer", (tok_dir / "tokenizer.json").is_file()):
        texts = (json.loads(line)["text"] for line in corpus.open(encoding="utf-8"))
        train_tokenizer(texts, cfg.vocab_size).save(tok_dir)
    tokenizer = Tokenizer.from_dir(tok_dir)
    timings["tokenizer_s"] = time.time() - t

    t = time.time()
    if _stage("packing tokens", (packed / "index.json").is_file()):
        pack_tokens([corpus], tokenizer, packed, val_fraction=0.02, seed=cfg.seed)
    index = read_index(packed)
    timings["pack_s"] = time.time() - t

    t = time.time()
    model_cfg = preset(cfg.preset, vocab_size=tokenizer.vocab_size, max_position_embeddings=cfg.seq_len)
    # No step count given: as many steps as fit in train_minutes, timed by train() itself at the start.
    train_cfg = PretrainConfig(max_steps=cfg.max_steps or 5000, max_minutes=None if cfg.max_steps else cfg.train_minutes,
                               batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr, precision=cfg.precision,
                               eval_every=100, ckpt_every=100, seed=cfg.seed)
    model_dir = run_dir / "model"
    budget = f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.train_minutes:g} minutes"
    if _stage(f"pretraining a {model_cfg.n_params / 1e6:.1f}M-parameter model for {budget}",
              (model_dir / "model.safetensors").is_file()):
        pretrain(packed, run_dir, model_cfg, tokenizer, train_cfg)
    timings["pretrain_s"] = time.time() - t

    md = ModelDir.open(model_dir)
    model, tok = md.load_model(), md.load_tokenizer()
    metrics = md.meta.get("metrics", {})
    samples = []
    for i, prompt in enumerate(SAMPLE_PROMPTS[: cfg.n_samples]):
        params = SamplingParams(max_new_tokens=cfg.sample_tokens, temperature=0.8, top_p=0.95, seed=cfg.seed + i)
        samples.append(prompt + generate_text(model, tok, prompt, params))
    curve = run_dir / "loss_curve.png"
    if not curve.is_file() and (run_dir / "metrics.jsonl").is_file():
        plot_loss_curve(run_dir / "metrics.jsonl", curve)

    judge = judge_model(model_dir, corpus, cfg)
    summary = {
        "model_dir": str(model_dir), "teacher": str(cfg.teacher) if cfg.teacher else "builtin templates", "params": md.config.n_params, "preset": cfg.preset,
        "vocab_size": tok.vocab_size, "stories": cfg.n_stories,
        "train_tokens_in_corpus": index.get("splits", {}).get("train", {}).get("tokens", index.get("train_tokens")),
        "val_loss": metrics.get("val_loss"),
        "val_ppl": metrics.get("val_ppl") or (math.exp(metrics["val_loss"]) if metrics.get("val_loss") else None),
        "tokens_per_s": metrics.get("tokens_per_s"), "train_time_s": metrics.get("train_time_s"),
        "bytes_per_token": round(tok.bytes_per_token(
            json.loads(line)["text"] for line in itertools.islice(corpus.open(encoding="utf-8"), 500)), 3),
        "val_bits_per_byte": judge["val_bits_per_byte"],
        **{f"bits_per_byte[{Path(f).name}]": v for f, v in judge["judge_text"].items()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "wall_time_s": round(time.time() - t_start, 1), "config": {k: str(v) for k, v in asdict(cfg).items()},
    }
    write_json(out / "summary.json", {**summary, "judge": judge, "samples": samples})
    update_meta(model_dir, quickstart=summary)
    atomic_write_text(out / "report.md", _report(summary, samples, curve, judge))

    console.print()
    for s in samples:
        console.print(f"[green]{s}[/green]\n")
    console.print(f"val loss {summary['val_loss']:.3f} · perplexity {summary['val_ppl']:.2f} · "
                  f"{md.config.n_params / 1e6:.2f}M params · {summary['tokens_per_s'] or 0:,.0f} tokens/s")
    for name, bpb in judge["table"]:
        console.print(f"bits/byte {bpb:.3f} · {name}")
    console.print(f"model: {model_dir}\nreport: {out / 'report.md'}\n"
                  f"try:   slmforge generate {model_dir} \"Once upon a time\"")
    return model_dir


def judge_model(model_dir: Path, corpus: Path, cfg: QuickstartConfig) -> dict:
    """Bits per byte (slmforge.evaluate.perplexity) on the corpus's held-out stories (the ones pack put in
    val) and on each --judge-text file, for the model and for each --reference model dir."""
    from slmforge.data.pack import is_val_document
    from slmforge.evaluate.perplexity import judge, score_documents
    from slmforge.modeldir import ModelDir

    val = [json.loads(line)["text"] for i, line in enumerate(corpus.open(encoding="utf-8"))
           if is_val_document(i, cfg.seed, 0.02)][:200]
    md = ModelDir.open(model_dir)
    val_bpb = score_documents(md.load_model().eval(), md.load_tokenizer(), val)["bits_per_byte"] if val else None
    texts = [Path(f) for f in cfg.judge_text]
    ours = judge(model_dir, texts)["files"] if texts else []
    table = [("generated val stories (this model)", val_bpb)] if val_bpb is not None else []
    refs = {}
    for f in ours:
        table.append((f"{Path(f['file']).name} (this model)", f["bits_per_byte"]))
    for ref in cfg.references:
        refs[str(ref)] = {f["file"]: round(f["bits_per_byte"], 4) for f in judge(ref, texts)["files"]} if texts else {}
        table += [(f"{Path(f).name} ({ref})", v) for f, v in refs[str(ref)].items()]
    return {"val_bits_per_byte": round(val_bpb, 4) if val_bpb is not None else None,
            "judge_text": {f["file"]: round(f["bits_per_byte"], 4) for f in ours},
            "references": refs, "table": [(n, round(v, 4)) for n, v in table]}


def _report(s: dict, samples: list[str], curve: Path, judge: dict | None = None) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in s.items() if k not in ("config", "timings_s"))
    times = "\n".join(f"| {k} | {v} |" for k, v in s["timings_s"].items())
    judge_rows = "\n".join(f"| {n} | {v} |" for n, v in (judge or {}).get("table", []))
    story_md = "\n\n".join(f"> {x}".replace("\n", "\n> ") for x in samples)
    return f"""# slmforge quickstart report

A {s['params'] / 1e6:.2f}M-parameter Llama-family model pretrained from scratch on {s['stories']:,} stories
from {s['teacher']}.

| metric | value |
|---|---|
{rows}

## Bits per byte (lower is better; comparable across tokenizers)

| text (model) | bits/byte |
|---|---|
{judge_rows}

## Stage timings (seconds)

| stage | seconds |
|---|---|
{times}

## Loss curve

![loss curve]({curve.relative_to(curve.parent.parent) if curve.is_file() else 'n/a'})

## Samples (temperature 0.8, top-p 0.95)

{story_md}
"""
