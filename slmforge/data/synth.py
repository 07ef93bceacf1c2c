"""Synthetic training data from a teacher: TinyStories-style stories and Phi-1-style textbook sections.

    synthesize("stories", 20_000, "data/stories.jsonl")                                  # offline, seconds
    synthesize("textbook", 5_000, "data/tb.jsonl", teacher="openai:http://localhost:8000/v1#qwen",
               concurrency=16, price_in=0.15, price_out=0.6)

recipe   what sample i asks for is drawn from (seed, i) alone: for `stories` the TinyStories formula
         (storygen.sample_seed: a verb, noun and adjective from the basic vocabulary and 1-3 features), for
         `textbook` the topic x audience x style x exercise-type formula (textbook.sample_textbook_seed).
teacher  `builtin` writes offline (storygen.write_story; textbook.write_section for the computable topics),
         anything else is an LM spec for slmforge.lm.open_lm (a model directory or openai:<url>#<model>),
         which gets the recipe's prompt as one chat message, with a per-sample sampling seed. A model directory
         whose tokenizer has no chat template is a base LM (e.g. llama2.c's stories260K, imported): for
         `stories` it is sampled from BOS at the given temperature and top-p (1.0 and 1.0 by default, so the
         student sees the teacher's own distribution, not a sharpened one), many stories at once on the
         BatchEngine, each with its own seed; the row's formula fields are then empty (nothing was asked).
output   one JSONL row per sample: {"id": "<recipe>-<seed>-<i>", "text", "recipe", "teacher", the formula's
         fields, "prompt"}. Rows are written a batch at a time, then flushed and fsynced, so the file only
         ever ends in a cut line when the process was killed mid-write; a re-run cuts that line off, skips the
         ids already there and writes the rest, so an interrupted run finishes with no duplicates and no gaps
         (and, with a deterministic teacher, byte for byte the file an uninterrupted run writes). Ctrl-C or
         SIGTERM stops after the batch in hand is written; a batch a full disk cannot take is cut off again.
stats    out_path + ".stats.json": counts (written, failed, empty, refused), speed, and the teacher's token
         usage and cost, for this run and summed over all runs on the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from slmforge.data import storygen, textbook
from slmforge.errors import SlmforgeError
from slmforge.interrupt import StopRequest
from slmforge.io import read_json, write_json

RECIPES = ("stories", "textbook")
# Teachers that cannot write a sample answer like this; such replies are counted and dropped.
_REFUSAL = re.compile(r"^\W*(I'm sorry|I am sorry|Sorry, (but )?I|I can(no|')t|I can not|I'm unable|I am unable|"
                      r"I apologi[sz]e|As an AI)", re.IGNORECASE)
_MAX_NEW_TOKENS = {"stories": 700, "textbook": 1500}


@dataclass
class Plan:
    """What sample `index` asks the teacher for."""

    index: int
    fields: dict          # the formula's fields as written to the row
    prompt: str
    sampling_seed: int
    spec: object          # the StorySeed / TextbookSeed the builtin writer takes


@dataclass
class SynthStats:
    recipe: str
    teacher: str
    seed: int
    n: int
    out_path: str
    existing: int = 0            # rows already in the file when this run started
    written: int = 0             # rows this run appended
    failed: int = 0              # teacher requests that failed after retries (skipped)
    empty: int = 0               # empty replies (dropped)
    refused: int = 0             # refusals (dropped)
    truncated_bytes: int = 0     # a cut last line from a killed run, removed
    complete: bool = False       # every id of 0..n-1 is in the file
    elapsed_s: float = 0.0
    samples_per_s: float = 0.0
    mb_written: float = 0.0
    mb_per_s: float = 0.0
    usage: dict = field(default_factory=dict)        # this run: requests, tokens, retries, failures, cost_usd
    usage_total: dict = field(default_factory=dict)  # summed over every run on this file

    def to_dict(self) -> dict:
        return asdict(self)


# --- recipes ----------------------------------------------------------------------------------------------------

def plan_sample(recipe: str, index: int, seed: int = 0,
                topics: tuple[str, ...] = textbook.COMPUTABLE_TOPICS) -> Plan:
    """The formula for sample `index` (deterministic per (recipe, seed, index))."""
    if recipe == "stories":
        s = storygen.sample_seed(index, seed)
        fields = {"seed_words": {"verb": s.verb, "noun": s.noun, "adjective": s.adjective},
                  "features": list(s.features)}
        return Plan(index, fields, s.prompt(), s.seed % 2**31, s)
    if recipe == "textbook":
        t = textbook.sample_textbook_seed(index, seed, topics)
        fields = {"topic": t.topic, "audience": t.audience, "style": t.style, "exercise": t.exercise}
        return Plan(index, fields, t.prompt(), t.seed % 2**31, t)
    raise SlmforgeError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")


def write_builtin(recipe: str, plan: Plan) -> str:
    """The offline teacher's text for a planned sample."""
    return storygen.write_story(plan.spec) if recipe == "stories" else textbook.write_section(plan.spec)


def _check_topics(recipe: str, teacher: str, topics: tuple[str, ...] | None) -> tuple[str, ...]:
    if recipe != "textbook":
        return textbook.COMPUTABLE_TOPICS
    if not topics:  # the builtin writer's topics offline, every topic with an LM
        return textbook.COMPUTABLE_TOPICS if teacher == "builtin" else textbook.TOPICS
    topics = tuple(t.strip() for t in topics)
    if teacher == "builtin":
        bad = [t for t in topics if not textbook.can_write_offline(t)]
        if bad:
            raise SlmforgeError(f"topics: the builtin teacher cannot write {', '.join(map(repr, bad))} (it writes "
                                f"only {', '.join(textbook.COMPUTABLE_TOPICS)}); pass an LM teacher: "
                                f"--teacher openai:<base_url>#<model> or a model directory")
    if any(not t for t in topics):
        raise SlmforgeError("topics: empty topic name")
    return topics


# --- resuming ---------------------------------------------------------------------------------------------------

def sample_id(recipe: str, seed: int, index: int) -> str:
    return f"{recipe}-{seed}-{index}"


def resume_ids(path: Path, recipe: str, seed: int) -> tuple[set[str], int]:
    """Ids already in `path`, after cutting off a last line left incomplete by a killed run.
    Returns (ids, bytes cut). A row from another recipe or seed is an error: it would mix two runs."""
    if not path.is_file():
        return set(), 0
    cut = cut_partial_last_line(path)
    ids: set[str] = set()
    prefix = f"{recipe}-{seed}-"
    with open(path, "rb") as f:  # streamed: a long run's file can be large
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rid = json.loads(line)["id"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise SlmforgeError(f"{path}:{lineno}: not a synth row (invalid JSON or no 'id'); "
                                    f"write to a new --out file") from None
            if not isinstance(rid, str) or not rid.startswith(prefix):
                raise SlmforgeError(f"{path}:{lineno}: id {rid!r} is not from recipe {recipe!r} seed {seed}; "
                                    f"write to a new --out file")
            if rid in ids:
                raise SlmforgeError(f"{path}:{lineno}: duplicate id {rid!r}")
            ids.add(rid)
    return ids, cut


def cut_partial_last_line(path: Path) -> int:
    """Truncate what follows the file's last newline (a line a killed run left half-written), durably;
    returns the bytes cut."""
    keep = _end_of_last_line(path)
    cut = path.stat().st_size - keep
    if cut:
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return cut


def _end_of_last_line(path: Path, chunk: int = 1 << 16) -> int:
    """Byte offset just past the file's last newline (0 when it has none), reading from the end."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            i = f.read(end - start).rfind(b"\n")
            if i >= 0:
                return start + i + 1
            end = start
    return 0


# --- the run ----------------------------------------------------------------------------------------------------

def _ask_teacher(lm, plans: list[Plan], sampling, on_error: str,
                 stats: SynthStats) -> tuple[list[str | None], SlmforgeError | None]:
    """The teacher's reply to each plan (None when its request failed), up to lm.concurrency at once;
    and the first error (None when every request succeeded)."""

    def one(plan: Plan) -> str | SlmforgeError:
        # one sampling seed per sample: reproducible where the endpoint honours seeds
        params = replace(sampling, seed=plan.sampling_seed)
        try:
            return lm.chat([[{"role": "user", "content": plan.prompt}]], params)[0]
        except SlmforgeError as e:
            return e

    workers = max(1, int(getattr(lm, "concurrency", 1)))
    if workers == 1 or len(plans) == 1:
        replies = [one(p) for p in plans]
    else:
        with ThreadPoolExecutor(workers) as pool:
            replies = list(pool.map(one, plans))
    errors = [r for r in replies if isinstance(r, SlmforgeError)]
    stats.failed += len(errors)
    texts = [None if isinstance(r, SlmforgeError) else r for r in replies]
    return texts, (errors[0] if errors else None)


def is_base_lm(teacher: str) -> bool:
    """A local model directory without a chat template: a plain LM, to be sampled from BOS."""
    p = Path(teacher)
    if teacher == "builtin" or teacher.startswith("openai:") or not p.is_dir():
        return False
    cfg = p / "tokenizer_config.json"
    return cfg.is_file() and not read_json(cfg).get("chat_template")


class BaseLMSampler:
    """Stories from a base LM: sampled from BOS on one BatchEngine kept across batches."""

    def __init__(self, model_dir: str | Path, max_batch: int = 64, compile: bool = False):
        import torch

        from slmforge.infer.engine import BatchEngine
        from slmforge.lm import Usage
        from slmforge.modeldir import ModelDir

        md = ModelDir.open(model_dir)
        self.name = str(model_dir)
        self.model, self.tokenizer = md.load_model("cuda" if torch.cuda.is_available() else "cpu"), md.load_tokenizer()
        if self.tokenizer.bos_id is None:
            raise SlmforgeError(f"{model_dir}: the teacher's tokenizer has no BOS token to sample stories from")
        self.engine = BatchEngine(self.model, None, max_batch=max_batch, compile=compile)
        self.usage = Usage()

    def sample(self, plans: list[Plan], sampling) -> list[str]:
        from slmforge.infer.engine import Request, run

        # the whole context after BOS; a story ends at the teacher's stop ids (llama2.c's: the next <s>)
        max_new = min(sampling.max_new_tokens, self.engine.max_len - 1)
        reqs = [self.engine.add(Request([self.tokenizer.bos_id], replace(sampling, seed=p.sampling_seed),
                                        max_new_tokens=max_new, stop_ids=self.tokenizer.stop_ids))
                for p in plans]
        for _ in run(self.engine):
            pass
        self.usage.add(len(reqs), sum(len(r.output_ids) for r in reqs), requests=len(reqs))
        return [self.tokenizer.decode(r.output_ids) for r in reqs]


def synthesize(recipe: str, n: int, out_path: str | Path, teacher: str = "builtin", seed: int = 0,
               batch_size: int = 64, *, topics: tuple[str, ...] | list[str] | None = None,
               concurrency: int = 8, requests_per_minute: float = 0, max_retries: int = 6,
               price_in: float = 0.0, price_out: float = 0.0, max_new_tokens: int | None = None,
               temperature: float = 1.0, top_p: float = 1.0, on_error: str = "skip", progress: bool = True,
               lm=None) -> SynthStats:
    """Write samples 0..n-1 of `recipe` to out_path (JSONL), resuming what is there. See the module doc.

    teacher: "builtin", a model directory or openai:<base_url>#<model> (or pass an opened `lm`).
    on_error: "skip" counts a request that failed after retries and goes on (a re-run retries it);
    "fail" writes what the batch got and raises.
    """
    from slmforge.lm import Usage

    if recipe not in RECIPES:
        raise SlmforgeError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if n < 0:
        raise SlmforgeError(f"n must be >= 0, got {n}")
    if batch_size < 1:
        raise SlmforgeError(f"batch_size must be >= 1, got {batch_size}")
    if on_error not in ("skip", "fail"):
        raise SlmforgeError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    # all before anything is opened or written (0 requests in flight would never finish a batch)
    for name, value, least in (("concurrency", concurrency, 1), ("max_retries", max_retries, 0),
                               ("rpm", requests_per_minute, 0), ("price_in", price_in, 0),
                               ("price_out", price_out, 0), ("max_new_tokens", max_new_tokens or 1, 1)):
        if value < least:
            raise SlmforgeError(f"--{name.replace('_', '-')} {value}: must be >= {least}")
    if Path(out_path).is_dir():
        raise SlmforgeError(f"{out_path}: is a directory (--out is the JSONL file to write)")
    teacher_name = getattr(lm, "name", teacher) if lm is not None else teacher
    topics = _check_topics(recipe, teacher_name if lm is None else "lm", tuple(topics) if topics else None)

    out_path = Path(out_path)
    stats_path = Path(f"{out_path}.stats.json")
    stats = SynthStats(recipe, teacher_name, seed, n, str(out_path))
    previous = read_json(stats_path) if stats_path.is_file() else {}
    done, stats.truncated_bytes = resume_ids(out_path, recipe, seed)
    stats.existing = len(done)
    todo = [i for i in range(n) if sample_id(recipe, seed, i) not in done]

    sampling = None  # None: the builtin writer
    base_lm = lm is None and is_base_lm(teacher)
    if base_lm and recipe != "stories":
        raise SlmforgeError(f"--teacher {teacher}: a base LM (no chat template) can only teach `stories`, "
                            f"sampled from BOS; {recipe!r} needs an instruction-following teacher")
    if teacher_name == "builtin" and lm is None:
        usage = Usage()
    elif base_lm:
        from slmforge.infer.engine import SamplingParams

        if todo:
            import torch

            from slmforge.modeldir import ModelDir

            # compiling the decode step costs ~1 min once and then nearly doubles a small model's speed on CPU
            # (per-op overhead is most of its step): worth it for a long run only
            compile = (not torch.cuda.is_available() and len(todo) >= 2000
                       and ModelDir.open(teacher).config.hidden_size <= 512)
            lm = BaseLMSampler(teacher, max_batch=min(batch_size, 128), compile=compile)
        usage = lm.usage if todo else Usage()
        sampling = SamplingParams(max_new_tokens=max_new_tokens or _MAX_NEW_TOKENS[recipe],
                                  temperature=temperature, top_p=top_p)
    else:
        from slmforge.infer.engine import SamplingParams
        from slmforge.lm import open_lm

        if lm is None and todo:  # (nothing to do: no need to load a model)
            lm = open_lm(teacher, concurrency=concurrency, requests_per_minute=requests_per_minute,
                         max_retries=max_retries, price_in=price_in, price_out=price_out)
        usage = lm.usage if lm is not None else Usage()
        if price_in or price_out:
            usage.price_in, usage.price_out = price_in, price_out
        sampling = SamplingParams(max_new_tokens=max_new_tokens or _MAX_NEW_TOKENS[recipe],
                                  temperature=temperature, top_p=top_p)
        # a batch waits for its slowest request: keep several rounds of requests in each
        batch_size = max(batch_size, 4 * int(getattr(lm, "concurrency", 1)))

    usage_before = usage.to_dict()

    def finish() -> SynthStats:
        stats.elapsed_s = round(time.perf_counter() - t0, 3)
        stats.samples_per_s = round(stats.written / max(stats.elapsed_s, 1e-9), 1)
        stats.mb_written = round(n_bytes / 1e6, 3)
        stats.mb_per_s = round(n_bytes / 1e6 / max(stats.elapsed_s, 1e-9), 2)
        stats.complete = all(sample_id(recipe, seed, i) in done for i in range(n))
        now = usage.to_dict()
        stats.usage = {k: (round(v - usage_before.get(k, 0), 6) if isinstance(v, (int, float)) and
                           k not in ("price_in", "price_out") else v) for k, v in now.items()}
        total = dict(previous.get("usage_total") or {})
        for k, v in stats.usage.items():
            if k in ("price_in", "price_out"):
                total[k] = v
            elif isinstance(v, (int, float)):
                total[k] = round(total.get(k, 0) + v, 6)
        stats.usage_total = total
        write_json(stats_path, stats.to_dict())
        return stats

    t0, n_bytes, first_error = time.perf_counter(), 0, None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for tmp in out_path.parent.glob(f".{stats_path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)  # a stats file a killed run was writing (write_json's temp file)
    finish()  # a stats file marked incomplete exists before the first row does
    bar = _progress(progress, f"{recipe} ({teacher_name})", len(todo))
    try:
        # unbuffered: a failed write is seen at once, and nothing is left in a buffer to be flushed at close
        with StopRequest() as stop, open(out_path, "ab", buffering=0) as f:
            for start in range(0, len(todo), batch_size):
                plans = [plan_sample(recipe, i, seed, topics) for i in todo[start:start + batch_size]]
                error = None
                if sampling is None:
                    texts: list[str | None] = [write_builtin(recipe, p) for p in plans]
                elif base_lm:
                    texts = lm.sample(plans, sampling)
                else:
                    texts, error = _ask_teacher(lm, plans, sampling, on_error, stats)
                    first_error = first_error or error
                    error = error if on_error == "fail" else None
                lines, ids = [], []
                for plan, text in zip(plans, texts, strict=True):
                    if text is None:
                        continue
                    text = text.strip()
                    if not text:
                        stats.empty += 1
                        continue
                    if _REFUSAL.match(text):
                        stats.refused += 1
                        continue
                    rid = sample_id(recipe, seed, plan.index)
                    row = {"id": rid, "text": text, "recipe": recipe, "teacher": teacher_name,
                           **({"prompt": ""} if base_lm else {**plan.fields, "prompt": plan.prompt})}
                    lines.append(json.dumps(row, ensure_ascii=False) + "\n")
                    ids.append(rid)
                data = "".join(lines).encode("utf-8")
                append_whole_lines(f, data, out_path)  # on the disk before the next batch is asked for
                done.update(ids)
                n_bytes += len(data)
                stats.written += len(lines)
                if bar is not None:
                    rate = stats.written / (time.perf_counter() - t0)
                    bar[0].update(bar[1], advance=len(plans), rate=f"{rate:,.0f}")
                if error is not None:
                    raise SlmforgeError(f"{recipe} sample {plans[0].index}..{plans[-1].index}: {error} "
                                        f"(the rows that succeeded are saved; re-run to resume)")
                stop.check(f"{out_path} holds {len(done):,} of {n:,} samples, whole rows only")
        if stats.failed and not (stats.written or stats.empty or stats.refused):
            # skipping failures is for the odd one; a run where nothing got through is not a success
            raise SlmforgeError(f"{teacher_name}: all {stats.failed} teacher requests failed; the first: "
                                f"{first_error}")
    except BaseException:
        _stop(bar)
        with contextlib.suppress(SlmforgeError):  # (a full disk: the error in flight is the one to report)
            finish()
        raise
    _stop(bar)
    finish()
    return stats


def append_whole_lines(f, data: bytes, path: Path) -> None:
    """Append `data` (whole JSONL lines) to the unbuffered file `f` and fsync. A write the disk cannot take
    (full, quota) is cut off again, so the file still ends in a whole line, and is an error naming `path`."""
    end = f.seek(0, os.SEEK_END)
    view = memoryview(data)
    try:
        while view:  # an unbuffered write may take only part of the data
            view = view[f.write(view):]
        os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            f.truncate(end)
        raise SlmforgeError(f"{path}: cannot write ({e.strerror or e}); the rows before are kept, "
                            f"re-run to resume") from None


def _stop(bar) -> None:
    if bar is not None:
        bar[0].stop()


def _progress(enabled: bool, label: str, total: int):
    """A rich progress bar with samples/s, or None."""
    if not enabled or not total:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                 TextColumn("{task.fields[rate]} samples/s"), TimeRemainingColumn())
    task = p.add_task(label, total=total, rate="-")
    p.start()
    return p, task
