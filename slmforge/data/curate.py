"""The whole data chain in one command: `slmforge data curate CONFIG`.

    source    ingest files (text, JSONL, CSV/TSV, Parquet, HF datasets dirs) and/or synthesize
    stages    dedup · quality · decontam · edu, in the order the config lists them
    report    docs, words (and tokens, given a tokenizer) in and out per stage, removal reasons with
              examples: report.md, report.json, funnel.png

A config (YAML):

    out: runs/curate
    inputs: [data/raw/*.jsonl]          # and/or
    synth: {recipe: stories, n: 20000, teacher: builtin, seed: 0}
    text_field: text
    workers: 2                          # processes for the per-document stages
    executor: local                     # local (multiprocessing) | datatrove (LocalPipelineExecutor)
    tokenizer: runs/tok                 # optional: count tokens too
    stages:
      - dedup: {threshold: 0.8, ngram: 5}
      - quality: {}
      - decontam: {eval: [../shared/data/sst2/train.tsv], n: 13}
      - edu: {classifier: runs/edu-clf, min_score: 3}

Layout: out/00-source/part-*.jsonl, then out/NN-<stage>/part-*.jsonl with removed-*.jsonl (each
removed document with its `removed_by` reason) and stats.json. Every stage works shard by shard and
writes each shard atomically, then marks itself done, so an interrupted run resumes at the first shard
not yet written and never duplicates or loses a document.

Per-document stages (quality, decontam, edu) are a picklable function over a batch of documents,
giving each (doc, None) to keep it or (None, reason) to drop it (a batch, so edu embeds many documents
per forward); the local executor maps it over shards with a multiprocessing pool, the datatrove
executor wraps it as a datatrove PipelineStep, so the same stage runs on datatrove's Slurm or Ray executors
(`datatrove_pipeline`). Dedup computes MinHash signatures per shard in parallel, then clusters in one
process (the LSH index must see every document).
"""

from __future__ import annotations

import functools
import glob
import itertools
import json
import multiprocessing as mp
import os
import shutil
import signal
import time
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from slmforge.errors import FieldError, SlmforgeError, check_types, writes_into
from slmforge.interrupt import StopRequest
from slmforge.io import atomic_write_text, check_out_dir, read_json, read_jsonl, write_json
from slmforge.stage_config import check_yaml_size

console = Console(stderr=True)

STAGES = ("dedup", "quality", "decontam", "edu")
EXECUTORS = ("local", "datatrove")
N_EXAMPLES = 3  # removed examples kept per reason for the report

DocResult = tuple[dict | None, str | None]  # (kept doc, None) or (None, removal reason)
BatchFn = Callable[[list[dict]], list[DocResult]]
BATCH = 256  # documents per call of a stage function


@dataclass
class CurateConfig:
    out: str = "runs/curate"
    inputs: list[str] = field(default_factory=list)
    synth: dict | None = None
    text_field: str = "text"
    split: str = "paragraph"  # for plain-text inputs: paragraph | line | file
    stages: list[dict] = field(default_factory=list)
    workers: int = 1
    executor: str = "local"
    shard_docs: int = 20_000
    tokenizer: str | None = None
    on_error: str = "fail"  # fail | skip (broken input lines)

    def __post_init__(self) -> None:
        check_types({f: getattr(self, f) for f in self.__dataclass_fields__}, typing.get_type_hints(CurateConfig))
        if not self.inputs and not self.synth:
            raise SlmforgeError("curate config: give `inputs` (files) and/or `synth` (a recipe)")
        if self.executor not in EXECUTORS:
            raise SlmforgeError(f"curate config: executor {self.executor!r}; choose from {', '.join(EXECUTORS)}")
        if self.workers < 1 or self.shard_docs < 1:
            raise SlmforgeError("curate config: workers and shard_docs must be >= 1")
        if self.on_error not in ("fail", "skip"):
            raise SlmforgeError("curate config: on_error must be fail or skip")
        for i, st in enumerate(self.stages):
            if not isinstance(st, dict) or len(st) != 1 or next(iter(st)) not in STAGES:
                raise FieldError(("stages", i), f"must be one of "
                                 f"{', '.join(f'{{{s}: {{...}}}}' for s in STAGES)}, got {st!r}")
            name, opts = next(iter(st.items()))
            if opts is not None and not isinstance(opts, dict):
                raise FieldError(("stages", i, name), "options must be a mapping")
            check_stage_options(name, opts or {}, ("stages", i, name))
        if self.synth is not None:
            check_synth_options(self.synth)


def check_stage_options(name: str, opts: dict, loc: tuple) -> None:
    """A stage's options, checked by name, type and value before any stage runs: a typo in the last stage
    must not cost the run of the ones before it."""
    if name in ("dedup", "quality"):
        if name == "dedup":
            from slmforge.data.dedup import DedupConfig as cls
        else:
            from slmforge.data.quality import QualityConfig as cls
        hints = typing.get_type_hints(cls)
    else:
        hints = _STAGE_OPTIONS[name]
    unknown = sorted(set(opts) - set(hints))
    if unknown:
        raise FieldError(loc, f"unknown option {unknown[0]!r} (known: {', '.join(sorted(hints))})")
    check_types(opts, hints, loc)
    if name in ("dedup", "quality"):
        try:
            cls(**opts)  # its own range checks (threshold in (0, 1], ...)
        except SlmforgeError as e:
            raise FieldError(loc, str(e).removeprefix(f"{name}: ")) from None
    elif name == "decontam":
        evals = opts.get("eval")
        if not evals:
            raise FieldError(loc, "needs `eval: [files with the evaluation sets]`")
        for j, p in enumerate([evals] if isinstance(evals, str) else evals):
            if not Path(p).exists():
                raise FieldError((*loc, "eval", j), f"{p}: no such file")
    elif name == "edu":
        clf = opts.get("classifier")
        if not clf:
            raise FieldError(loc, "needs `classifier: <dir from slmforge data train-classifier>`")
        if not Path(clf).is_dir():
            raise FieldError((*loc, "classifier"), f"{clf}: no such classifier folder")


_STAGE_OPTIONS = {
    "decontam": {"eval": str | list[str], "n": int, "min_words": int, "text_field": str},
    "edu": {"classifier": str, "min_score": float},
}


def check_synth_options(opts: dict) -> None:
    """`synth:` is synthesize()'s keyword arguments plus recipe and n."""
    from slmforge.data.synth import synthesize

    hints = {k: v for k, v in typing.get_type_hints(synthesize).items()
             if k not in ("out_path", "lm", "progress", "return")}
    unknown = sorted(set(opts) - set(hints))
    if unknown:
        raise FieldError(("synth",), f"unknown option {unknown[0]!r} (known: {', '.join(sorted(hints))})")
    check_types(opts, hints, ("synth",))


def load_curate_config(path: str | Path, **overrides) -> CurateConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SlmforgeError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text)  # the node tree keeps each value's line, for the errors
        raw = yaml.safe_load(text) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SlmforgeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:  # PyYAML composes and constructs recursively
        raise SlmforgeError(f"{path}: not valid YAML (nested too deeply)") from None
    check_yaml_size(raw, path)  # a "billion laughs" of aliases
    if not isinstance(raw, dict):
        raise SlmforgeError(f"{path}: expected a mapping at the top level")
    known = set(CurateConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known, key=str)  # YAML keys need not be strings (`1: a`), nor of one type
    if unknown:
        line = _yaml_line(node, (unknown[0],))
        raise SlmforgeError(f"{path}{f':{line}' if line else ''}: unknown field {unknown[0]!r} "
                            f"(known: {', '.join(sorted(known))})")
    if isinstance(raw.get("inputs"), str):
        raw["inputs"] = [raw["inputs"]]
    try:
        # before the paths in it are used; a field given on the command line replaces the file's
        check_types({k: v for k, v in raw.items() if overrides.get(k) is None}, typing.get_type_hints(CurateConfig))
        # relative paths in the config are relative to the config file; overrides to the working folder
        base = path.parent
        raw["inputs"] = [p if os.path.isabs(p) else str(base / p) for p in raw.get("inputs") or []]
        if "out" in raw:
            raw["out"] = raw["out"] if os.path.isabs(raw["out"]) else str(base / raw["out"])
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return CurateConfig(**raw)
    except FieldError as e:
        line = _yaml_line(node, e.loc) if e.loc and overrides.get(e.loc[0]) is None else None  # (not the CLI)
        raise SlmforgeError(f"{path}{f':{line}' if line else ''}: {e}") from None
    except SlmforgeError as e:
        raise SlmforgeError(f"{path}: {e}") from None


def _yaml_line(node, loc: tuple) -> int | None:
    """The 1-based line of the value at `loc` (keys and list indexes) in a composed YAML tree; the
    deepest one found when the path goes further than the file does."""
    import yaml

    line = None
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):  # (a key node's value is its text: "1" for the key 1)
            child = next((v for k, v in node.value if k.value in (part, str(part))), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        if child is None:
            break
        node, line = child, child.start_mark.line + 1
    return line


# ------------------------------------------------------------------------------------------ shards


def shard_paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.jsonl"))


@dataclass
class Counts:
    docs: int = 0
    words: int = 0
    bytes: int = 0
    tokens: int = 0

    def add(self, text: str, tokenizer=None) -> None:
        self.docs += 1
        self.words += len(text.split())
        self.bytes += len(text.encode("utf-8"))
        if tokenizer is not None:
            self.tokens += len(tokenizer.encode(text))

    def merge(self, other: dict) -> None:
        for k in ("docs", "words", "bytes", "tokens"):
            setattr(self, k, getattr(self, k) + other.get(k, 0))


@functools.cache
def _tokenizer(path: str | None):
    if not path:
        return None
    from slmforge.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)


def _write_lines(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def run_doc_fn_on_shard(fn: BatchFn, src: Path, dst_dir: Path, tokenizer: str | None = None) -> dict:
    """Apply a per-document stage to one shard; writes part-i.jsonl, removed-i.jsonl, part-i.stats.json
    (the stats file last: its presence marks the shard done)."""
    stats_path = dst_dir / (src.stem + ".stats.json")
    if stats_path.is_file():
        return read_json(stats_path)
    tok = _tokenizer(tokenizer)
    kept, removed = [], []
    c_in, c_out = Counts(), Counts()
    reasons: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    docs = list(read_jsonl(src))
    results = [r for i in range(0, len(docs), BATCH) for r in fn(docs[i:i + BATCH])]
    for doc, (out, reason) in zip(docs, results, strict=True):
        c_in.add(doc["text"], tok)
        if out is None:
            reasons[reason] += 1
            removed.append({**doc, "removed_by": reason})
            ex = examples.setdefault(reason, [])
            if len(ex) < N_EXAMPLES:
                ex.append(doc["text"][:300])
        else:
            kept.append(out)
            c_out.add(out["text"], tok)
    _write_lines(dst_dir / src.name, kept)
    _write_lines(dst_dir / src.name.replace("part-", "removed-"), removed)
    stats = {"in": vars(c_in), "out": vars(c_out), "reasons": dict(reasons), "examples": examples}
    write_json(stats_path, stats)
    return stats


def _run_shard_task(args: tuple) -> dict:
    return run_doc_fn_on_shard(*args)


def map_shards(fn: BatchFn, src_dir: Path, dst_dir: Path, workers: int, tokenizer: str | None,
               label: str, stop: StopRequest | None = None) -> list[dict]:
    """Run a per-document stage over every shard with a process pool (shards already done are reused).
    With `stop` (a StopRequest), a SIGINT/SIGTERM ends it between shards (Interrupted)."""
    from rich.progress import Progress

    stop = stop or StopRequest()  # (one not entered: never requested)
    shards = shard_paths(src_dir)
    tasks = [(fn, s, dst_dir, tokenizer) for s in shards]
    results: list[dict] = []

    def written() -> str:
        return f"{len(results)} of {len(tasks)} {label} shards written to {dst_dir}"

    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task(label, total=len(tasks))
        if workers > 1 and len(tasks) > 1:
            # spawn: torch and tokenizers are not fork-safe once their thread pools have started
            with mp.get_context("spawn").Pool(min(workers, len(tasks)), initializer=_worker_init) as pool:
                pending = pool.imap(_run_shard_task, tasks)
                for _ in tasks:
                    # Waited for in short slices, so that a stop is seen at once. The shards in flight are then
                    # dropped: leaving the pool terminates the workers (atomic writes: no shard is half-written;
                    # a re-run removes their temp files and writes those shards).
                    while True:
                        try:
                            results.append(pending.next(timeout=0.2))
                            break
                        except mp.TimeoutError:
                            stop.check(written())
                    progress.advance(bar)
                    stop.check(written())
        else:
            for t in tasks:
                results.append(_run_shard_task(t))
                progress.advance(bar)
                stop.check(written())
    return results


def _worker_init() -> None:
    # Ctrl-C signals the whole process group: the parent decides when to stop (between shards)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


# ------------------------------------------------------------------------------------- doc stages


def _quality_batch(docs: list[dict], cfg) -> list[DocResult]:
    from slmforge.data.quality import quality_reasons

    out = []
    for doc in docs:
        reasons = quality_reasons(doc["text"], cfg)
        out.append((None, f"quality:{reasons[0]}") if reasons else (doc, None))
    return out


def _decontam_batch(docs: list[dict], index) -> list[DocResult]:
    return [(None, "decontam") if index.match(d["text"]) is not None else (d, None) for d in docs]


@functools.cache
def _load_classifier(path: str):
    from slmforge.data.edu import load_classifier

    return load_classifier(path)


def _edu_batch(docs: list[dict], classifier: str, min_score: float) -> list[DocResult]:
    from slmforge.data.edu import score_documents

    scored = score_documents(docs, _load_classifier(classifier), batch_size=len(docs))
    return [(d, None) if d["edu_score"] >= min_score else (None, "edu") for d in scored]


def make_doc_fn(name: str, opts: dict, cfg: CurateConfig) -> BatchFn:
    """The picklable per-document function (over a batch) of a stage, built from its options."""
    opts = dict(opts or {})
    if name == "quality":
        from slmforge.data.quality import QualityConfig

        return functools.partial(_quality_batch, cfg=_dataclass_from(QualityConfig, opts, "quality"))
    if name == "decontam":
        from slmforge.data.decontam import DecontamIndex

        evals = opts.pop("eval", None)
        if not evals:
            raise SlmforgeError("curate config: decontam needs `eval: [files with the evaluation sets]`")
        index = DecontamIndex.from_files([evals] if isinstance(evals, str) else evals, n=int(opts.pop("n", 13)),
                                         min_words=int(opts.pop("min_words", 8)),
                                         text_field=opts.pop("text_field", "text"))
        _no_more(opts, "decontam")
        return functools.partial(_decontam_batch, index=index)
    if name == "edu":
        clf = opts.pop("classifier", None)
        if not clf:
            raise SlmforgeError("curate config: edu needs `classifier: <dir from slmforge data train-classifier>`")
        min_score = float(opts.pop("min_score", 3))
        _no_more(opts, "edu")
        _load_classifier(str(clf))  # fail early on a bad path
        return functools.partial(_edu_batch, classifier=str(clf), min_score=min_score)
    raise SlmforgeError(f"unknown per-document stage {name!r}")


def _no_more(opts: dict, stage: str) -> None:
    if opts:
        raise SlmforgeError(f"curate config: {stage}: unknown option {next(iter(opts))!r}")


def _dataclass_from(cls, opts: dict, stage: str):
    known = set(cls.__dataclass_fields__)
    bad = sorted(set(opts) - known)
    if bad:
        raise SlmforgeError(f"curate config: {stage}: unknown option {bad[0]!r} (known: {', '.join(sorted(known))})")
    return cls(**opts)


# ------------------------------------------------------------------------------------------- dedup


def _signatures_of_shard(args: tuple) -> list:
    from slmforge.data.dedup import minhash_signature

    path, cfg = args
    return [minhash_signature(d["text"], cfg) for d in read_jsonl(path)]


def run_dedup(src_dir: Path, dst_dir: Path, opts: dict, workers: int, tokenizer: str | None,
              stop: StopRequest | None = None) -> list[dict]:
    """Exact + MinHash near-dedup over all shards: signatures in parallel, clustering in one process. With
    `stop`, a SIGINT/SIGTERM ends it between the shards it writes (Interrupted)."""
    from slmforge.data.dedup import DedupConfig, duplicate_map

    stop = stop or StopRequest()
    cfg = _dataclass_from(DedupConfig, dict(opts or {}), "dedup")
    shards = shard_paths(src_dir)
    with console.status("dedup: MinHash signatures"):
        if workers > 1 and len(shards) > 1:
            with mp.get_context("spawn").Pool(min(workers, len(shards)), initializer=_worker_init) as pool:
                sigs = pool.map(_signatures_of_shard, [(s, cfg) for s in shards])
        else:
            sigs = [_signatures_of_shard((s, cfg)) for s in shards]
    sources: list[str] = []  # what to call a kept document in its duplicates' `duplicate_of`

    def texts():
        for s in shards:
            for d in read_jsonl(s):
                sources.append(str(d.get("id", d.get("source", len(sources)))))
                yield d["text"]

    with console.status("dedup: clustering"):
        dupes = duplicate_map(texts(), [g for shard in sigs for g in shard], cfg)  # {global index: Duplicate}
    offset, results = 0, []
    for s, shard_sigs in zip(shards, sigs, strict=True):
        # documents come back in file order, so a counter gives each one its global index
        index = itertools.count(offset)

        def fn(docs: list[dict], index=index) -> list[DocResult]:
            out = []
            for doc in docs:
                dup = dupes.get(next(index))
                if dup is None:
                    out.append((doc, None))
                else:
                    doc["duplicate_of"], doc["similarity"] = sources[dup.kept], round(dup.similarity, 3)
                    out.append((None, f"dedup:{dup.reason}"))
            return out

        results.append(run_doc_fn_on_shard(fn, s, dst_dir, tokenizer))
        offset += len(shard_sigs)
        stop.check(f"{len(results)} of {len(shards)} dedup shards written to {dst_dir}")
    # clusters: groups of duplicates, each represented by the one document kept
    results[0]["clusters"] = len({d.kept for d in dupes.values()}) if results else 0
    return results


# ---------------------------------------------------------------------------------------- datatrove


def datatrove_pipeline(fn: BatchFn, src_dir: str | Path, dst_dir: str | Path) -> list:
    """The datatrove pipeline for a per-document stage: read our shards, apply `fn`, write kept docs
    (and removed ones, with their reason) as flat JSONL. Hand it to datatrove's LocalPipelineExecutor,
    SlurmPipelineExecutor or RayPipelineExecutor."""
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    class SlmforgeStage(PipelineStep):
        name = "slmforge stage"
        type = "slmforge"

        def __init__(self, fn: BatchFn, removed_dir: str):
            super().__init__()
            self.fn, self.removed_dir = fn, removed_dir

        def run(self, data, rank: int = 0, world_size: int = 1):
            removed = []
            for batch in itertools.batched(data, BATCH) if hasattr(itertools, "batched") else _batched(data):
                docs = [{"text": d.text, "id": d.id, **d.metadata} for d in batch]
                for document, doc, (out, reason) in zip(batch, docs, self.fn(docs), strict=True):
                    self.stat_update("total")
                    if out is None:
                        self.stat_update(f"dropped_{reason}")
                        removed.append({**doc, "removed_by": reason})
                        continue
                    self.stat_update("forwarded")
                    document.text = out.pop("text")
                    out.pop("id", None)
                    document.metadata = out
                    yield document
            _write_lines(Path(self.removed_dir) / f"removed-{rank:05d}.jsonl", removed)

    return [
        JsonlReader(str(src_dir), glob_pattern="part-*.jsonl", compression=None, add_file_path=False),
        SlmforgeStage(fn, str(dst_dir)),
        JsonlWriter(str(dst_dir), output_filename="part-${rank}.jsonl", compression=None, expand_metadata=True),
    ]


def run_datatrove(fn: BatchFn, src_dir: Path, dst_dir: Path, workers: int, tokenizer: str | None) -> list[dict]:
    from datatrove.executor import LocalPipelineExecutor

    n_tasks = max(1, len(shard_paths(src_dir)))
    executor = LocalPipelineExecutor(
        pipeline=datatrove_pipeline(fn, src_dir, dst_dir), tasks=n_tasks, workers=min(workers, n_tasks),
        logging_dir=str(dst_dir / ".datatrove"), skip_completed=True, start_method="spawn")
    executor.run()
    # per-shard stats in our own format, from what datatrove wrote
    tok = _tokenizer(tokenizer)
    results = []
    for src in shard_paths(src_dir):
        c_in = Counts()
        for d in read_jsonl(src):
            c_in.add(d["text"], tok)
        results.append({"in": vars(c_in), "out": vars(Counts()), "reasons": {}, "examples": {}})
    out, reasons, examples = Counts(), Counter(), {}
    for p in shard_paths(dst_dir):
        for d in read_jsonl(p):
            out.add(d["text"], tok)
    for p in sorted(dst_dir.glob("removed-*.jsonl")):
        for d in read_jsonl(p):
            reasons[d["removed_by"]] += 1
            ex = examples.setdefault(d["removed_by"], [])
            if len(ex) < N_EXAMPLES:
                ex.append(d["text"][:300])
    results[0].update(out=vars(out), reasons=dict(reasons), examples=examples)
    return results


def _batched(it, n: int = BATCH):  # itertools.batched before Python 3.12
    it = iter(it)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


# --------------------------------------------------------------------------------------------- run


def _merge(results: list[dict]) -> dict:
    c_in, c_out, reasons, examples = Counts(), Counts(), Counter(), {}
    for r in results:
        c_in.merge(r["in"])
        c_out.merge(r["out"])
        reasons.update(r["reasons"])
        for k, v in r["examples"].items():
            examples.setdefault(k, []).extend(v[: N_EXAMPLES - len(examples.get(k, []))])
    return {"in": vars(c_in), "out": vars(c_out), "reasons": dict(reasons), "examples": examples}


def run_source(cfg: CurateConfig, out: Path) -> dict:
    """Stage 0: synthesize (if asked) and ingest everything into shards of cfg.shard_docs documents."""
    from slmforge.data.ingest import ingest

    dst = out / "00-source"
    if (dst / "stats.json").is_file() and (out / "00-source.done").is_file():
        return read_json(out / "00-source.json")
    inputs = []
    for pattern in cfg.inputs:
        hits = sorted(glob.glob(pattern))
        if not hits:
            raise SlmforgeError(f"curate config: inputs: {pattern}: no such file")
        inputs.extend(hits)
    synth_stats = None
    if cfg.synth:
        from slmforge.data.synth import synthesize

        opts = dict(cfg.synth)
        recipe = opts.pop("recipe", "stories")
        n = int(opts.pop("n", 1000))
        synth_path = out / "synth" / f"{recipe}.jsonl"
        synth_path.parent.mkdir(parents=True, exist_ok=True)
        synth_stats = synthesize(recipe, n, synth_path, **opts)
        inputs.append(str(synth_path))
    t0 = time.time()
    stats = ingest(inputs, dst, shard_docs=cfg.shard_docs, text_field=cfg.text_field, split=cfg.split,
                   on_error=cfg.on_error)
    tok = _tokenizer(cfg.tokenizer)
    c = Counts()
    for s in shard_paths(dst):
        for d in read_jsonl(s):
            c.add(d["text"], tok)
    result = {"in": vars(c), "out": vars(c), "reasons": {}, "examples": {}, "seconds": time.time() - t0,
              "ingest": _as_dict(stats), "synth": _as_dict(synth_stats)}
    write_json(out / "00-source.json", result)
    atomic_write_text(out / "00-source.done", "")
    return result


def _as_dict(obj) -> dict | None:
    if obj is None:
        return None
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return json.loads(json.dumps(asdict(obj), default=str))
    return dict(obj)


def curate(cfg: CurateConfig) -> dict:
    """Run the chain; returns the report dict (also written to out/report.json, report.md, funnel.png)."""
    out = Path(cfg.out)
    created = check_out_dir(out)
    if not (out / "00-source.done").is_file():  # before the folder is made: a typo should leave nothing behind
        for pattern in cfg.inputs:
            if not glob.glob(pattern):
                raise SlmforgeError(f"curate config: inputs: {pattern}: no such file")
    out.mkdir(parents=True, exist_ok=True)
    _remove_temp_files(out)
    try:
        with writes_into(out), StopRequest() as stop:
            return _curate(cfg, out, stop)
    except BaseException:
        # a folder this run made and nothing in it worth resuming from (no finished source, no synth rows)
        if created and not (out / "00-source.done").exists() and \
                not any(p.stat().st_size for p in (out / "synth").glob("*.jsonl")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _remove_temp_files(out: Path) -> None:
    """Delete the temp files of writes that a killed run left (`.NAME.XXXXXXXX.tmp` from atomic_write_text, the
    funnel's, the `final` link's): one run writes a curate folder at a time, so any found now are dead."""
    for p in [*out.glob(".*.tmp"), *out.glob("*/.*.tmp")]:
        if p.is_symlink() or p.is_file():
            p.unlink(missing_ok=True)


def _curate(cfg: CurateConfig, out: Path, stop: StopRequest) -> dict:
    t_start = time.time()
    console.print(f"[bold]curate[/] -> {out} ({cfg.executor} executor, {cfg.workers} worker(s))")
    stages = [{"stage": "source", **run_source(cfg, out)}]
    console.print(f"· source: {stages[0]['out']['docs']:,} docs")
    stop.check(f"the source shards are written to {out / '00-source'}")
    src = out / "00-source"
    for i, st in enumerate(cfg.stages, 1):
        name, opts = next(iter(st.items()))
        dst = out / f"{i:02d}-{name}"
        done = dst / "stats.json"
        if done.is_file():
            result = read_json(done)
        else:
            dst.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            if name == "dedup":
                shard_results = run_dedup(src, dst, opts, cfg.workers, cfg.tokenizer, stop)
            else:
                fn = make_doc_fn(name, opts, cfg)
                if cfg.executor == "datatrove":
                    shard_results = run_datatrove(fn, src, dst, cfg.workers, cfg.tokenizer)
                else:
                    shard_results = map_shards(fn, src, dst, cfg.workers, cfg.tokenizer, name, stop)
            result = {**_merge(shard_results), "seconds": time.time() - t0, "options": opts or {}}
            if name == "dedup":
                result["clusters"] = shard_results[0].get("clusters", 0) if shard_results else 0
            write_json(done, result)
        stages.append({"stage": name, **result})
        console.print(f"· {name}: {result['in']['docs']:,} -> {result['out']['docs']:,} docs "
                      f"({result['in']['docs'] - result['out']['docs']:,} removed)")
        src = dst
    final = out / "final"
    if final.exists() and not final.is_symlink():
        shutil.rmtree(final)
    link = out / ".final.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(src.name)
    os.replace(link, final)  # one rename: `final` is never missing once a run has finished
    report = {"config": {k: v for k, v in vars(cfg).items()}, "stages": stages, "final_dir": str(src),
              "seconds": time.time() - t_start}
    write_curate_report(report, out)
    return report


# ------------------------------------------------------------------------------------------ report


def write_curate_report(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = report["stages"]
    has_tokens = any(s["out"].get("tokens") for s in stages)
    unit = "tokens" if has_tokens else "words"
    lines = ["# Data curation report", "",
             f"Final data: `{report['final_dir']}` · {report['seconds']:.1f} s", "",
             f"| stage | docs in | docs out | removed | {unit} in | {unit} out | MB out | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in stages:
        lines.append(f"| {s['stage']} | {s['in']['docs']:,} | {s['out']['docs']:,} | "
                     f"{s['in']['docs'] - s['out']['docs']:,} | {s['in'][unit]:,} | {s['out'][unit]:,} | "
                     f"{s['out']['bytes'] / 1e6:.2f} | {s.get('seconds', 0):.1f} |")
    lines += ["", "## Removal reasons", ""]
    for s in stages:
        if not s["reasons"]:
            continue
        lines += [f"### {s['stage']}", ""]
        if "clusters" in s:
            lines += [f"{s['clusters']:,} clusters of duplicates; the first document of each is kept.", ""]
        lines += ["| reason | docs |", "|---|---:|"]
        lines += [f"| {r} | {n:,} |" for r, n in sorted(s["reasons"].items(), key=lambda kv: -kv[1])]
        lines.append("")
        for r, exs in s["examples"].items():
            for ex in exs[:2]:
                lines.append(f"- `{r}`: " + ex.replace("\n", " ")[:200])
        lines.append("")
    lines += ["![docs per stage](funnel.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    write_json(out / "report.json", report)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [s["stage"] for s in stages]
    ax.bar(names, [s["out"]["docs"] for s in stages], color="#4c72b0")
    ax.set_ylabel("documents out")
    ax.set_title("documents after each stage")
    for j, s in enumerate(stages):
        ax.text(j, s["out"]["docs"], f"{s['out']['docs']:,}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    tmp = out / ".funnel.png.tmp"
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, out / "funnel.png")
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
