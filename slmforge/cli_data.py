"""`slmforge data ...` and `slmforge synth ...`: the data system's commands (see slmforge/data/).

The single-stage commands (dedup, filter, decontam) are one-stage curate runs, so they write the same
layout and report as `slmforge data curate`: OUT/00-source, OUT/01-<stage>/part-*.jsonl (kept),
removed-*.jsonl (with `removed_by`), OUT/final -> the last stage, OUT/report.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(no_args_is_help=True, help="Ingest, deduplicate, filter, decontaminate and curate text.")

Inputs = Annotated[list[str], typer.Argument(help="Files or folders: .txt, .jsonl, .csv, .tsv, .parquet, "
                                                  "HF datasets dirs (.gz too).")]
TextField = Annotated[str, typer.Option(help="Field / column holding the text.")]
Split = Annotated[str, typer.Option(help="Plain text: one document per paragraph, line or file.")]
Workers = Annotated[int, typer.Option(help="Processes for the per-document work.")]
OnError = Annotated[str, typer.Option(help="Broken input lines: fail (default) or skip (counted).")]


def _curate_one(inputs: list[str], out: Path, stages: list[dict], text_field: str, split: str, workers: int,
                on_error: str) -> None:
    from slmforge.data.curate import CurateConfig, curate

    report = curate(CurateConfig(out=str(out), inputs=list(inputs), text_field=text_field, split=split,
                                 stages=stages, workers=workers, on_error=on_error))
    first = report["stages"][0]
    reasons = {k: v for st in report["stages"] for k, v in st["reasons"].items()}
    typer.echo(f"wrote {out}/final · {first['out']['docs']:,} -> {report['stages'][-1]['out']['docs']:,} "
               f"documents · removed {reasons or '{}'} · report {out}/report.md")


@data_app.command("ingest")
def data_ingest(
    inputs: Inputs,
    out: Annotated[Path, typer.Option(help="Output folder of part-*.jsonl shards and stats.json.")],
    text_field: TextField = "text",
    split: Split = "paragraph",
    normalize: Annotated[str, typer.Option(help="Unicode normal form: NFC, NFKC or none.")] = "NFC",
    on_error: OnError = "fail",
    shard_docs: Annotated[int, typer.Option(help="Documents per output shard.")] = 50_000,
) -> None:
    """Read any supported input into normalised JSONL shards (streaming, metadata kept)."""
    from slmforge.data.ingest import ingest

    s = ingest(inputs, out, shard_docs=shard_docs, text_field=text_field, split=split, normalize=normalize,
               on_error=on_error)
    typer.echo(f"wrote {out} · {s.files} files · {s.docs:,} documents · {s.bytes / 1e6:.1f} MB · "
               f"{s.empty:,} empty · {s.skipped:,} skipped")


@data_app.command("dedup")
def data_dedup(
    inputs: Inputs,
    out: Annotated[Path, typer.Option(help="Output folder.")],
    threshold: Annotated[float, typer.Option(help="MinHash Jaccard threshold for near-duplicates.")] = 0.8,
    ngram: Annotated[int, typer.Option(help="Word n-gram shingle size.")] = 5,
    num_perm: Annotated[int, typer.Option(help="MinHash permutations.")] = 128,
    exact: Annotated[bool, typer.Option(help="Remove exact duplicates (normalised text).")] = True,
    near: Annotated[bool, typer.Option(help="Remove near-duplicates (MinHash LSH).")] = True,
    text_field: TextField = "text",
    split: Split = "paragraph",
    workers: Workers = 1,
    on_error: OnError = "fail",
) -> None:
    """Exact and MinHash-LSH near-duplicate removal; the first document of each cluster is kept."""
    stage = {"dedup": {"threshold": threshold, "ngram": ngram, "num_perm": num_perm, "exact": exact, "near": near}}
    _curate_one(inputs, out, [stage], text_field, split, workers, on_error)


@data_app.command("decontam")
def data_decontam(
    inputs: Inputs,
    out: Annotated[Path, typer.Option(help="Output folder.")],
    eval: Annotated[list[str], typer.Option("--eval", help="Evaluation set file (repeatable).")],
    n: Annotated[int, typer.Option(help="Shared word n-gram length that marks contamination.")] = 13,
    eval_text_field: Annotated[str, typer.Option(help="Field / column of the evaluation texts.")] = "text",
    text_field: TextField = "text",
    split: Split = "paragraph",
    workers: Workers = 1,
    on_error: OnError = "fail",
) -> None:
    """Drop documents sharing a long n-gram with any evaluation set."""
    stage = {"decontam": {"eval": list(eval), "n": n, "text_field": eval_text_field}}
    _curate_one(inputs, out, [stage], text_field, split, workers, on_error)


@data_app.command("curate")
def data_curate(
    config: Annotated[Path, typer.Argument(help="Curate config (YAML): inputs/synth, stages, workers.")],
    out: Annotated[str | None, typer.Option(help="Output folder (default: the config's).")] = None,
    workers: Annotated[int | None, typer.Option(help="Processes (default: the config's).")] = None,
    executor: Annotated[str | None, typer.Option(help="local or datatrove (default: the config's).")] = None,
) -> None:
    """The whole chain (source -> dedup/quality/decontam/edu) with a report; re-run to resume."""
    from slmforge.data.curate import curate, load_curate_config

    cfg = load_curate_config(config, out=out, workers=workers, executor=executor)
    report = curate(cfg)
    first, last = report["stages"][0], report["stages"][-1]
    typer.echo(f"wrote {cfg.out}/final · {first['out']['docs']:,} -> {last['out']['docs']:,} documents · "
               f"{report['seconds']:.1f} s · report {cfg.out}/report.md")


@data_app.command("filter")
def data_filter(
    inputs: Inputs,
    out: Annotated[Path, typer.Option(help="Output folder.")],
    min_words: Annotated[int | None, typer.Option(help="Gopher: fewest words (default 50).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="QualityConfig FIELD=VALUE (repeatable; "
                                                                 "null switches a rule off), e.g. "
                                                                 "min_terminal_punct_lines=null.")] = None,
    classifier: Annotated[Path | None, typer.Option(help="Also keep only documents this edu classifier "
                                                         "scores >= --min-score.")] = None,
    min_score: Annotated[float, typer.Option(help="Edu score threshold (with --classifier).")] = 3.0,
    quality: Annotated[bool, typer.Option(help="Run the heuristic (Gopher/C4) quality rules.")] = True,
    text_field: TextField = "text",
    split: Split = "paragraph",
    workers: Workers = 1,
    on_error: OnError = "fail",
) -> None:
    """Heuristic quality rules (Gopher, C4) and/or the educational-value classifier."""
    import yaml

    from slmforge.data.quality import QualityConfig
    from slmforge.errors import SlmforgeError

    stages = []
    if quality:
        opts = {} if min_words is None else {"min_words": min_words}
        for item in set_ or []:
            key, sep, value = item.partition("=")
            if not sep or key not in QualityConfig.__dataclass_fields__:
                raise SlmforgeError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                                    f"{', '.join(QualityConfig.__dataclass_fields__)}")
            opts[key] = yaml.safe_load(value)
        stages.append({"quality": opts})
    if classifier:
        stages.append({"edu": {"classifier": str(classifier), "min_score": min_score}})
    if not stages:
        raise SlmforgeError("nothing to do: give --quality and/or --classifier")
    _curate_one(inputs, out, stages, text_field, split, workers, on_error)


@data_app.command("annotate")
def data_annotate(
    inputs: Inputs,
    teacher: Annotated[str, typer.Option(help="LM spec: a model dir or openai:<base_url>#<model>.")],
    out: Annotated[Path, typer.Option(help="Labels JSONL (appended; re-run to resume).")],
    id_field: Annotated[str, typer.Option(help="Field identifying each document.")] = "id",
    text_field: TextField = "text",
    limit: Annotated[int | None, typer.Option(help="Annotate at most this many documents.")] = None,
    max_chars: Annotated[int, typer.Option(help="Characters of each document shown to the teacher.")] = 1000,
    concurrency: Annotated[int, typer.Option(help="Requests in flight (remote teachers).")] = 8,
    rpm: Annotated[float, typer.Option(help="Requests per minute (0 = unlimited).")] = 0,
    price_in: Annotated[float, typer.Option(help="USD per 1M prompt tokens, for the cost counter.")] = 0.0,
    price_out: Annotated[float, typer.Option(help="USD per 1M completion tokens.")] = 0.0,
    api_key_env: Annotated[str, typer.Option(help="Environment variable holding the API key.")] = "OPENAI_API_KEY",
    retry_failed: Annotated[bool, typer.Option(help="Ask again for documents that failed before.")] = False,
) -> None:
    """Score documents 0-5 for educational value with a teacher LM (FineWeb-Edu prompt)."""
    import itertools

    from slmforge.data.edu import annotate
    from slmforge.data.ingest import iter_documents
    from slmforge.errors import SlmforgeError
    from slmforge.io import check_out_file
    from slmforge.lm import open_lm

    if limit is not None and limit < 0:
        raise SlmforgeError(f"--limit {limit}: must be >= 0 (leave it out for every document)")
    if max_chars < 1:
        raise SlmforgeError(f"--max-chars {max_chars}: must be at least 1")
    check_out_file(out)
    lm = open_lm(teacher, api_key_env=api_key_env,
                 **({"concurrency": concurrency, "requests_per_minute": rpm, "price_in": price_in,
                     "price_out": price_out} if teacher.startswith("openai:") else {}))
    docs = iter_documents(inputs, text_field=text_field)
    # iter_documents puts the text under "text" whatever --text-field is
    r = annotate(itertools.islice(docs, limit), lm, out, id_field=id_field, max_chars=max_chars,
                 retry_failed=retry_failed)
    typer.echo(f"wrote {out} · asked {r.asked:,} · scored {r.scored:,} · failed {r.failed:,} · "
               f"skipped {r.skipped:,} (done before) · usage {r.usage}")


@data_app.command("train-classifier")
def data_train_classifier(
    labels: Annotated[Path, typer.Argument(help="Labels: JSONL/CSV/TSV with id and score (annotate's output).")],
    embedder: Annotated[str, typer.Option(help="Model dir (mean-pooled hidden states), a sentence-transformers "
                                               "dir, or hashing[:N].")],
    out: Annotated[Path, typer.Option(help="Classifier folder.")],
    docs: Annotated[list[str] | None, typer.Option(help="Documents to join by id (default: texts in the "
                                                        "labels file).")] = None,
    threshold: Annotated[float, typer.Option(help="Score >= threshold counts as educational (for F1).")] = 3.0,
    id_field: Annotated[str, typer.Option(help="Id field in labels and documents.")] = "id",
    score_field: Annotated[str, typer.Option(help="Score field in the labels file.")] = "score",
    text_field: TextField = "text",
    val_fraction: Annotated[float, typer.Option(help="Held-out share for the reported metrics.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the validation split.")] = 0,
) -> None:
    """Fit a ridge regressor on embeddings to the labels; reports F1 at the threshold."""
    from slmforge.data.edu import labelled_texts, load_labels, train_classifier
    from slmforge.data.ingest import iter_documents
    from slmforge.io import check_out_dir

    check_out_dir(out)  # before embedding every document, not after
    scores = load_labels(labels, id_field=id_field, score_field=score_field)
    texts, ys = labelled_texts(iter_documents(docs or [labels], text_field=text_field), scores,
                               id_field=id_field, text_field=text_field)
    clf = train_classifier(texts, ys, embedder, out, threshold=threshold, val_fraction=val_fraction, seed=seed)
    val = clf.metrics.get("val", {})
    typer.echo(f"wrote {out} · {len(texts):,} labelled documents · val F1@{threshold:g} {val.get('f1', 0):.3f} "
               f"(precision {val.get('precision', 0):.3f}, recall {val.get('recall', 0):.3f}) · "
               f"MSE {val.get('mse', 0):.3f}")


@data_app.command("score")
def data_score(
    inputs: Inputs,
    classifier: Annotated[Path, typer.Option(help="Classifier folder (train-classifier).")],
    out: Annotated[Path, typer.Option(help="Output JSONL with edu_score / edu_int_score added.")],
    text_field: TextField = "text",
) -> None:
    """Add the classifier's edu_score to every document (use `data filter --classifier` to drop)."""
    import json

    from slmforge.data.edu import load_classifier, score_documents
    from slmforge.data.ingest import iter_documents
    from slmforge.io import atomic_write_text, check_out_file

    check_out_file(out)  # before the scoring, not after it
    clf = load_classifier(classifier)
    rows = score_documents(iter_documents(inputs, text_field=text_field), clf, text_field=text_field, progress=True)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]
    atomic_write_text(out, "".join(lines))
    typer.echo(f"wrote {out} · {len(lines):,} documents scored")


@data_app.command("diversity")
def data_diversity(
    path: Annotated[Path, typer.Argument(help="JSONL corpus (e.g. slmforge synth output).")],
    out: Annotated[Path, typer.Option(help="Report folder: report.md, report.json, lengths.png.")],
    sample: Annotated[int, typer.Option(help="Texts sampled for self-BLEU.")] = 200,
    refs: Annotated[int, typer.Option(help="References per text for self-BLEU.")] = 10,
    seed_field: Annotated[str, typer.Option(help="Field(s) holding the seeds, comma-separated.")] = "seed_words",
    text_field: TextField = "text",
) -> None:
    """Distinct-1/2/3, self-BLEU, seed-word coverage, unique sentences and a length histogram."""
    from slmforge.data.diversity import diversity

    fields = [f for f in seed_field.split(",") if f]
    r = diversity(path, out, sample=sample, n_refs=refs, seed_field=fields[0] if len(fields) == 1 else fields,
                  text_field=text_field)
    typer.echo(f"wrote {out} · {r['texts']:,} texts · distinct-1/2/3 "
               f"{r['distinct_1']:.4f}/{r['distinct_2']:.4f}/{r['distinct_3']:.4f} · self-BLEU {r['self_bleu']:.1f}")


def synth(
    recipe: Annotated[str, typer.Argument(help="stories (TinyStories formula) or textbook (Phi-style).")],
    n: Annotated[int, typer.Option(help="Samples to have in --out (re-running resumes).")],
    out: Annotated[Path, typer.Option(help="Output JSONL (stats in OUT.stats.json).")],
    teacher: Annotated[str, typer.Option(help="builtin (offline), a model dir, or openai:<base_url>#<model>.")] = "builtin",
    seed: Annotated[int, typer.Option(help="Seed of the seeding formula (sample i depends on seed and i).")] = 0,
    topics: Annotated[str | None, typer.Option(help="textbook: comma-separated topics.")] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight (remote teachers).")] = 8,
    rpm: Annotated[float, typer.Option(help="Requests per minute (0 = unlimited).")] = 0,
    max_retries: Annotated[int, typer.Option(help="Retries per request (backoff, Retry-After).")] = 6,
    price_in: Annotated[float, typer.Option(help="USD per 1M prompt tokens, for the cost counter.")] = 0.0,
    price_out: Annotated[float, typer.Option(help="USD per 1M completion tokens.")] = 0.0,
    max_new_tokens: Annotated[int | None, typer.Option(help="Teacher reply length limit.")] = None,
    temperature: Annotated[float, typer.Option(help="Teacher sampling temperature.")] = 1.0,
    on_error: Annotated[str, typer.Option(help="Failed requests: skip (counted; a re-run retries) or fail.")] = "skip",
) -> None:
    """Generate synthetic training data: TinyStories-style stories or Phi-style textbook sections."""
    from slmforge.data.synth import synthesize

    s = synthesize(recipe, n, out, teacher=teacher, seed=seed,
                   topics=[t.strip() for t in topics.split(",")] if topics else None, concurrency=concurrency,
                   requests_per_minute=rpm, max_retries=max_retries, price_in=price_in, price_out=price_out,
                   max_new_tokens=max_new_tokens, temperature=temperature, on_error=on_error)
    usage = s.usage_total or {}
    typer.echo(f"wrote {out} · {s.existing + s.written:,}/{n:,} samples ({s.written:,} new, {s.failed:,} failed, "
               f"{s.empty + s.refused:,} empty/refused) · {s.samples_per_s:,.0f} samples/s · "
               f"{usage.get('prompt_tokens', 0):,}+{usage.get('completion_tokens', 0):,} tokens · "
               f"${usage.get('cost_usd', 0):.4f}")
