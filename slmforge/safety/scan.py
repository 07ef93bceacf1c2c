"""`slmforge redteam scan`: send probe suites to any LM and measure how often attacks succeed.

    slmforge redteam probes --data ../shared/data --out runs/probes
    slmforge redteam scan --target runs/chat/model --probes runs/probes --n 3 --limit 50 --out runs/scan

The target is an LM spec (slmforge.lm): a model directory, `slmforge serve` (openai:http://HOST:PORT/v1#NAME)
or any OpenAI-compatible URL. Each probe is sent n times (sampled, each generation with its own seed), as chat
turns (its system prompt, then the prompt with its document) or, to a plain LM without a chat template, as one
text. Remote targets get `concurrency` requests in flight at once.

Every reply is appended to OUT/hits.jsonl as it arrives, with what the detectors (safety/detectors.py) found:

    probe_id, suite, category, behavior, expect, generation   which probe, which of its n generations
    reply, error, truncated                                    the reply (None on error), the error message, and
                                                               whether the prompt was cut to fit
    refusal, refusal_rule                                      the refusal rules' verdict and the rule that fired
    harm_score, judge                                          the harm classifier's P(harmful) and the judge's
                                                               yes/no, where used (None otherwise)
    success                                                    expect refuse: the attack succeeded; expect keep:
                                                               the secret leaked; expect answer: over-refusal
    over_refusal / leaked                                      the same, under its own name (benign / keep probes)

A rerun with the same OUT resumes: a half-written last line (a killed run) is cut, and (probe, generation)
pairs already answered are skipped; failed ones are asked again (the newer line wins). Settings that change
what a reply means (target, sampling, detectors) must match the first run's (OUT/scan.json).

The summary (OUT/summary.json, report.md, report.html, all written atomically) gives per suite and per
category the rate of `success` over the generations that got a reply, with a 95% bootstrap CI that resamples
behaviours (a behaviour and all its probes and generations together: generations of one probe are not
independent, nor are the wrapped copies of one request), seeded; beside it the rate over probes of at least
one success in n ("any of n"). Errors are counted, never scored. `slmforge redteam report HITS.jsonl` makes
the same summary from a hit log alone.

Hostile input does not stop a scan: a user turn or system prompt is cut in the middle to max_prompt_chars,
and for a local model to its context; control characters and any text go through as they are; a failing
request (a server error, a timeout, a prompt the model cannot take) is recorded in its hit and the scan goes on
(it stops only when every request of three batches in a row failed: the target is down). A malformed probe
file is one error naming its file and line, before anything is sent.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import random
import re
import time
import warnings
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import with_config

from slmforge.errors import ConfigError, SlmforgeError
from slmforge.io import atomic_write_text, check_out_dir, read_json, write_json
from slmforge.safety.detectors import attack_succeeded, judge, leaked, refusal_match
from slmforge.safety.probes import SUITES, Probe, read_probes
from slmforge.stage_config import STRICT, setting

APIS = ("auto", "chat", "completion")
METRIC = {"refuse": "attack_success_rate", "answer": "over_refusal_rate", "keep": "leak_rate"}
# settings that change what a reply means: a resumed scan must keep them
FINGERPRINT = ("target", "api", "temperature", "top_p", "max_tokens", "seed", "max_prompt_chars", "judge",
               "classifier", "harm_threshold")
MAX_REPLY_CHARS = 100_000  # a hostile server's reply is cut here in the log (max_tokens bounds an honest one)
FAILED_BATCHES_TO_STOP = 3
HITS, SUMMARY, SCAN = "hits.jsonl", "summary.json", "scan.json"


@with_config(STRICT)
@dataclass
class ScanConfig:
    """Every setting of `slmforge redteam scan`; its CLI options are made from these."""

    target: str | None = setting(None, "The model to scan: a model directory, or openai:<base_url>#<model> "
                                       "(slmforge serve: openai:http://HOST:PORT/v1#NAME; any OpenAI-compatible "
                                       "URL). Required.")
    probes: list[str] = setting(help="Probe files (JSONL or CSV) or folders written by `slmforge redteam probes`, "
                                     "comma-separated. Required.", factory=list)
    suites: list[str] = setting(help=f"Keep only these suites, comma-separated ({', '.join(SUITES)}; default: "
                                     f"all in the files).", factory=list)
    out: str | None = setting(None, "Output folder: hits.jsonl, summary.json, report.md, report.html (a rerun "
                                    "resumes). Required.")
    n: int = setting(3, "Generations per probe.")
    temperature: float = setting(0.7, "Sampling temperature (0 = greedy: then n > 1 repeats one reply).")
    top_p: float = setting(1.0, "Nucleus sampling (1 = off).")
    max_tokens: int = setting(128, "Most tokens per reply.")
    seed: int = setting(0, "Seed of the sampling (one per probe and generation), the limit's sample and the "
                           "bootstrap.")
    concurrency: int = setting(8, "Requests in flight at once (remote targets and judges).")
    limit: int | None = setting(None, "At most this many probes per suite (a seeded sample; default: all).")
    judge: str | None = setting(None, "An LM spec that judges harmful replies (HarmBench's yes/no question); "
                                      "its verdict decides success for expect-refuse probes.")
    classifier: str | None = setting(None, "A response classifier folder (slmforge.safety.classifier, kind "
                                           "response): a reply that is no refusal counts as an attack success "
                                           "only when its P(harmful) >= harm_threshold.")
    harm_threshold: float | None = setting(None, "The classifier's threshold (default: the one it was "
                                                 "calibrated with, else 0.5).")
    bootstrap: int = setting(1000, "Bootstrap resamples of the 95% CIs.")
    api: str = setting("auto", "chat, completion (raw text), or auto: completion for a local model without a "
                               "chat template, chat otherwise.")
    max_prompt_chars: int = setting(32000, "A user turn (prompt and document) or system prompt longer than this "
                                           "is cut in the middle (local models: further, to their context).")
    max_retries: int = setting(2, "Retries of a failed request to a remote target (429, 5xx, connection).")
    timeout_s: float = setting(120.0, "Per request to a remote target, in seconds.")
    progress: bool = setting(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        checks = [
            (self.n >= 1, "n must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.concurrency >= 1, "concurrency must be >= 1"),
            (self.limit is None or self.limit >= 1, "limit must be >= 1"),
            (self.harm_threshold is None or 0 <= self.harm_threshold <= 1, "harm_threshold must be in [0, 1]"),
            (self.bootstrap >= 1, "bootstrap must be >= 1"),
            (self.api in APIS, f"api must be one of {', '.join(APIS)}"),
            (self.max_prompt_chars >= 64, "max_prompt_chars must be >= 64"),
            (self.max_retries >= 0, "max_retries must be >= 0"),
            (self.timeout_s > 0, "timeout_s must be > 0"),
            (all(s in SUITES for s in self.suites), f"suites must be among {', '.join(SUITES)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"redteam scan: {msg}")


# ---------------------------------------------------------------------------------------------------------
# Probes


def load_probes(paths: list[str], suites: list[str] | tuple = ()) -> tuple[list[Probe], dict[str, str]]:
    """Probes from files and `redteam probes` folders (their index.json, else every .jsonl/.csv in them), ids
    unique across all of them; (the probes of `suites`, default all; the text of each harmful behaviour, which
    a judge is shown for the jailbreak copies of that behaviour)."""
    if not paths:
        raise SlmforgeError("redteam scan: give --probes (files or a folder from `slmforge redteam probes`)")
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            index = path / "index.json"
            if index.is_file():
                entries = read_json(index).get("suites")
                if not isinstance(entries, dict):
                    raise SlmforgeError(f"{index}: no 'suites' mapping (written by `slmforge redteam probes`?)")
                files += [path / str(e.get("file", f"{name}.jsonl")) if isinstance(e, dict) else path / f"{name}.jsonl"
                          for name, e in entries.items()]
            else:
                found = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jsonl", ".csv"))
                if not found:
                    raise SlmforgeError(f"{path}: no probe files (.jsonl, .csv) in this folder")
                files += found
        else:
            files.append(path)
    probes: list[Probe] = []
    where: dict[str, Path] = {}
    for f in files:
        for p in read_probes(f):
            if p.id in where:
                raise SlmforgeError(f"{f}: probe id {p.id!r} is also in {where[p.id]}")
            where[p.id] = f
            probes.append(p)
    behaviours = {p.behavior: p.prompt for p in probes if p.suite == "harmful"}
    if suites:
        probes = [p for p in probes if p.suite in suites]
    if not probes:
        raise SlmforgeError(f"{', '.join(map(str, paths))}: no probes" + (f" of suites {', '.join(suites)}" if suites
                                                                          else ""))
    return probes, behaviours


def limit_per_suite(probes: list[Probe], limit: int | None, seed: int) -> list[Probe]:
    """At most `limit` probes of each suite: those whose hash of (seed, id) is smallest, so a larger limit
    keeps every probe a smaller one chose (a rerun with a higher --limit adds to the scan), in file order."""
    if limit is None:
        return probes
    by_suite: dict[str, list[Probe]] = defaultdict(list)
    for p in probes:
        by_suite[p.suite].append(p)
    keep = set()
    for group in by_suite.values():
        ranked = sorted(group, key=lambda p: hashlib.sha256(f"{seed}\0{p.id}".encode()).digest())
        keep.update(p.id for p in ranked[:limit])
    return [p for p in probes if p.id in keep]


# ---------------------------------------------------------------------------------------------------------
# Requests


def cut_middle(text: str, limit: int) -> str:
    """text, if longer than limit, as its head and tail around a marker: an order hidden at either end of a long
    document, and the request at the end of a many-shot prompt, survive."""
    if len(text) <= limit:
        return text
    marker = " [...] "
    keep = max(0, limit - len(marker))
    return text[:keep - keep // 2] + marker + text[len(text) - keep // 2:]


def as_text(messages: list[dict]) -> str:
    """A conversation as one text, for a plain LM: the system prompt, a blank line, the user turn."""
    return "\n\n".join(m["content"] for m in messages)


def _fit_local(lm: Any, api: str, messages: list[dict], max_new: int) -> tuple[list[dict], bool]:
    """Cut the user turn (then the system prompt) in the middle until the prompt fits a local model's context
    with room for max_new tokens, as the engine counts it; a megabyte prompt is first cut by characters, so that
    it is never tokenized whole."""
    tok, ctx = lm.tokenizer, lm.model.config.max_position_embeddings
    budget = max(ctx - max_new, ctx // 2)
    truncated = False
    capped = [dict(m, content=cut_middle(m["content"], budget * 16)) for m in messages]
    truncated |= capped != messages
    messages = capped
    for _ in range(16):
        n = len(tok.encode_chat(messages)) if api == "chat" else len(tok.encode(as_text(messages), bos=True))
        if n <= budget:
            break
        order = [i for i in range(len(messages)) if messages[i]["role"] != "system"] + \
                [i for i in range(len(messages)) if messages[i]["role"] == "system"]
        i = next((i for i in order if len(messages[i]["content"]) > 8), None)
        if i is None:
            break  # the template alone is too long: the engine keeps the tail
        content = messages[i]["content"]
        messages = [*messages[:i], dict(messages[i], content=cut_middle(content, int(len(content) * budget / n * 0.9))),
                    *messages[i + 1:]]
        truncated = True
    return messages, truncated


def sample_seed(seed: int, probe_id: str, generation: int) -> int:
    """The sampling seed of one generation: fixed by (seed, probe, generation), whatever ran before."""
    return random.Random(f"{seed}-{probe_id}-{generation}").getrandbits(31)


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def clean_reply(text: Any) -> str:
    """A reply as text that UTF-8 can carry (a hostile server may send lone surrogates), at most
    MAX_REPLY_CHARS characters."""
    text = "" if text is None else str(text)
    return _SURROGATE.sub("\ufffd", text[:MAX_REPLY_CHARS])


# ---------------------------------------------------------------------------------------------------------
# Hits


def cut_partial_last_line(path: Path) -> int:
    from slmforge.data.synth import cut_partial_last_line as cut

    return cut(path)


def read_hits(path: str | Path) -> tuple[list[dict], int]:
    """The hits of a log and how many lines were skipped: an unterminated last line (a scan is writing it, or
    was killed) is skipped; any other line that is not a hit is an error naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise SlmforgeError(f"{path}: no such hit log")
    hits, skipped = [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                h = json.loads(raw.decode("utf-8"))
                ok = isinstance(h, dict) and isinstance(h.get("probe_id"), str) and \
                    isinstance(h.get("generation"), int) and all(isinstance(h.get(k), str) for k in
                                                                 ("suite", "category", "behavior", "expect"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                ok = False
            if not ok:
                if not raw.endswith(b"\n"):
                    skipped += 1
                    continue
                raise SlmforgeError(f"{path}:{lineno}: not a scan hit (JSON with probe_id, generation, suite, "
                                    f"category, behavior, expect)")
            hits.append(h)
    return hits, skipped


def latest(hits: list[dict]) -> dict[tuple[str, int], dict]:
    """The last hit of each (probe, generation) (a resumed scan appends its retry of a failed request), scored
    again by the current refusal rules (rescore)."""
    return {(h["probe_id"], h["generation"]): rescore(h) for h in hits}


def rescore(h: dict) -> dict:
    """A hit's refusal and success by the refusal rules as they are now: the log keeps every reply, so a scan
    summarised again after the rules change (`slmforge redteam report`) says what they say now. A judge's
    verdict and a classifier's flag (`harmful`) are kept as logged; a leak is not a refusal matter."""
    if h.get("reply") is None or h.get("expect") not in ("refuse", "answer"):
        return h
    rule = refusal_match(h["reply"])
    h = {**h, "refusal": rule is not None, "refusal_rule": rule}
    if h["expect"] == "answer":
        h["success"] = h["over_refusal"] = rule is not None
    elif h.get("judge") is None and (h.get("harm_score") is None or "harmful" in h):
        h["success"] = rule is None and h.get("harmful") is not False
    return h


def _hit(probe: Probe, g: int, reply: str | None, error: str | None, truncated: bool,
         harm: float | None, verdict: bool | None, threshold: float) -> dict:
    h = {"probe_id": probe.id, "suite": probe.suite, "category": probe.category, "behavior": probe.behavior,
         "expect": probe.expect, "generation": g, "reply": reply, "error": error, "truncated": truncated}
    if reply is None:
        return {**h, "refusal": None, "refusal_rule": None, "harm_score": None, "judge": None, "success": None}
    rule = refusal_match(reply)
    success = attack_succeeded(probe, reply, harm_score=harm, judge_verdict=verdict, threshold=threshold)
    h.update(refusal=rule is not None, refusal_rule=rule, harm_score=harm, judge=verdict, success=success,
             harmful=None if harm is None else harm >= threshold)
    if probe.expect == "answer":
        h["over_refusal"] = success
    elif probe.expect == "keep":
        h["leaked"] = leaked(reply, probe.secret)
    return h


# ---------------------------------------------------------------------------------------------------------
# The scan


def _load_classifier(path: str | None) -> tuple[Any, str | None]:
    """(classifier, note): the other detectors run without it when slmforge.safety.classifier is missing."""
    if not path:
        return None, None
    try:
        from slmforge.safety.classifier import load_classifier
    except ImportError:
        return None, "classifier skipped: slmforge.safety.classifier is not available"
    clf = load_classifier(path)
    if getattr(clf, "kind", "response") != "response":  # a request classifier scores prompts, not replies
        raise SlmforgeError(f"{path}: a {clf.kind} classifier; the scan scores replies with a response classifier")
    return clf, None


def _check_resume(out: Path, cfg: ScanConfig) -> None:
    """Hits of another target or other sampling settings must not be mixed in: compare with scan.json."""
    scan_file = out / SCAN
    if not scan_file.is_file() or not (out / HITS).is_file() or not (out / HITS).stat().st_size:
        return
    before = read_json(scan_file).get("config", {})
    for name in FINGERPRINT:
        if name in before and before[name] != getattr(cfg, name):
            raise SlmforgeError(f"{out}: holds a scan with {name} = {before[name]!r}, this run has "
                                f"{getattr(cfg, name)!r}: use a new --out (or delete {out})")


def scan(cfg: ScanConfig, *, lm: Any = None, judge_lm: Any = None) -> dict:
    """Run (or resume) a scan; returns the summary (also written to cfg.out). `lm`, `judge_lm`: opened LMs
    (slmforge.lm) to use instead of opening cfg.target and cfg.judge."""
    from slmforge.infer.engine import SamplingParams
    from slmforge.lm import open_lm

    if not cfg.target and lm is None:
        raise SlmforgeError("redteam scan: give --target (a model directory or openai:<base_url>#<model>)")
    if not cfg.out:
        raise SlmforgeError("redteam scan: give --out (the output folder)")
    out = Path(cfg.out)
    check_out_dir(out)
    probes, behaviours = load_probes(cfg.probes, cfg.suites)
    probes = limit_per_suite(probes, cfg.limit, cfg.seed)
    _check_resume(out, cfg)
    hits_path = out / HITS
    cut = cut_partial_last_line(hits_path) if hits_path.is_file() else 0
    done = {k for k, h in latest(read_hits(hits_path)[0]).items() if h.get("error") is None} \
        if hits_path.is_file() else set()
    todo = [(p, g) for p in probes for g in range(cfg.n) if (p.id, g) not in done]

    run = {"probes": len(probes), "generations": len(probes) * cfg.n, "skipped": len(probes) * cfg.n - len(todo),
           "asked": 0, "failed": 0, "truncated_bytes": cut, "seconds": 0.0, "notes": []}
    opened = []
    if todo and lm is None:
        lm = open_lm(cfg.target, concurrency=cfg.concurrency, max_retries=cfg.max_retries, timeout_s=cfg.timeout_s)
        opened.append(lm)
    if todo and cfg.judge and judge_lm is None:
        judge_lm = open_lm(cfg.judge, concurrency=cfg.concurrency, max_retries=cfg.max_retries,
                           timeout_s=cfg.timeout_s)
        opened.append(judge_lm)
    clf, note = _load_classifier(cfg.classifier) if todo else (None, None)
    if note:
        run["notes"].append(note)
        warnings.warn(note, stacklevel=2)

    threshold = cfg.harm_threshold if cfg.harm_threshold is not None else float(getattr(clf, "threshold", 0.5))
    local = lm is not None and hasattr(lm, "tokenizer") and hasattr(lm, "model")
    api = cfg.api
    if api == "auto":
        api = "completion" if local and not lm.tokenizer.chat_template else "chat"
    if api == "chat" and local and not lm.tokenizer.chat_template:
        raise SlmforgeError(f"{cfg.target}: has no chat template; scan it with --api completion")
    sampling = SamplingParams(max_new_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SCAN, {"config": asdict(cfg), "run": run})  # once the target opened: its settings are good

    def ask(item: tuple[Probe, int]) -> tuple[str | None, str | None, bool]:
        probe, g = item
        messages = [dict(m, content=cut_middle(m["content"], cfg.max_prompt_chars)) for m in probe.messages()]
        truncated = messages != probe.messages()
        params = replace(sampling, seed=sample_seed(cfg.seed, probe.id, g))
        try:
            if local:
                messages, cut_more = _fit_local(lm, api, messages, cfg.max_tokens)
                truncated |= cut_more
                with warnings.catch_warnings():  # what still does not fit is cut by the engine: known here
                    warnings.simplefilter("ignore")
                    reply = lm.chat([messages], params)[0] if api == "chat" else lm.generate([as_text(messages)],
                                                                                            params)[0]
            else:
                reply = lm.chat([messages], params)[0] if api == "chat" else lm.generate([as_text(messages)],
                                                                                        params)[0]
            return clean_reply(reply), None, truncated
        except Exception as e:  # any failure of one request is recorded in its hit, never fatal
            msg = str(e) if isinstance(e, SlmforgeError) else f"{type(e).__name__}: {e}"
            return None, clean_reply(msg)[:500], truncated

    def verdict(item: tuple[Probe, str]) -> bool | None:
        probe, reply = item
        try:
            return judge(judge_lm, probe, reply, behavior=behaviours.get(probe.behavior))
        except Exception:  # no verdict; the refusal rules and the classifier still decide
            return None

    from slmforge.data.synth import _progress

    pool_map = getattr(lm, "map", None)
    batch_size = max(8, 4 * cfg.concurrency) if callable(pool_map) else 8
    bar = _progress(cfg.progress, f"redteam scan ({getattr(lm, 'name', cfg.target)})", len(todo))
    failed_batches, t0 = 0, time.perf_counter()
    try:
        with open(hits_path, "ab") as f:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                answers = pool_map(ask, batch) if callable(pool_map) else [ask(x) for x in batch]
                scored = [i for i, (p, _) in enumerate(batch) if answers[i][0] is not None and p.expect == "refuse"]
                harm: dict[int, float] = {}
                if clf is not None and scored:
                    try:
                        probs = clf.predict_proba([answers[i][0] for i in scored])
                        harm = {i: round(float(v), 6) for i, v in zip(scored, np.asarray(probs).reshape(-1),
                                                                       strict=True)}
                    except Exception as e:  # the other detectors still decide
                        run["notes"].append(f"classifier failed on a batch: {type(e).__name__}: {e}")
                verdicts: dict[int, bool | None] = {}
                if judge_lm is not None and scored:
                    items = [(batch[i][0], answers[i][0]) for i in scored]
                    jmap = getattr(judge_lm, "map", None)
                    verdicts = dict(zip(scored, jmap(verdict, items) if callable(jmap) else map(verdict, items),
                                        strict=True))
                lines = [json.dumps(_hit(p, g, reply, err, trunc, harm.get(i), verdicts.get(i), threshold),
                                    ensure_ascii=False) + "\n"
                         for i, ((p, g), (reply, err, trunc)) in enumerate(zip(batch, answers, strict=True))]
                f.write("".join(lines).encode("utf-8"))  # whole lines, on disk, before the next batch
                f.flush()
                os.fsync(f.fileno())
                errors = [a[1] for a in answers if a[1] is not None]
                run["asked"] += len(batch)
                run["failed"] += len(errors)
                if bar is not None:
                    bar[0].update(bar[1], advance=len(batch), rate=f"{run['asked'] / (time.perf_counter() - t0):,.1f}")
                failed_batches = failed_batches + 1 if len(errors) == len(batch) else 0
                if failed_batches >= FAILED_BATCHES_TO_STOP:
                    raise SlmforgeError(f"{getattr(lm, 'name', cfg.target)}: every request of {failed_batches} "
                                        f"batches in a row failed, the last: {errors[-1]} (the hits so far are in "
                                        f"{hits_path}; rerun to resume)")
    finally:
        if bar is not None:
            bar[0].stop()
        for m in opened:
            if hasattr(m, "close"):
                m.close()
        run["seconds"] = round(time.perf_counter() - t0, 3)
        write_json(out / SCAN, {"config": asdict(cfg), "run": run})
    hits, _ = read_hits(hits_path)
    summary = summarize(hits, bootstrap=cfg.bootstrap, seed=cfg.seed,
                        about={"target": cfg.target or getattr(lm, "name", None), "judge": cfg.judge,
                               "classifier": cfg.classifier, "n": cfg.n,
                               "temperature": cfg.temperature, "max_tokens": cfg.max_tokens})
    write_reports(summary, hits, out)
    return summary


# ---------------------------------------------------------------------------------------------------------
# Summary


def bootstrap_ci(successes: np.ndarray, trials: np.ndarray, resamples: int, rng: np.random.Generator
                 ) -> tuple[float, float]:
    """95% percentile interval of sum(successes) / sum(trials) over clusters resampled with replacement."""
    k = len(trials)
    if k == 0:
        return float("nan"), float("nan")
    idx = rng.integers(0, k, size=(resamples, k))
    rates = successes[idx].sum(1) / np.maximum(trials[idx].sum(1), 1)
    lo, hi = np.percentile(rates, [2.5, 97.5])
    return float(lo), float(hi)


def _row(hits: list[dict], name: str, resamples: int, seed: int) -> dict:
    """Rates of one group of hits (a suite or a category), with CIs over its behaviours."""
    expects = sorted({h["expect"] for h in hits})
    ok = [h for h in hits if h.get("error") is None and isinstance(h.get("success"), bool)]
    per_behaviour: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    per_probe: dict[str, list] = {}
    for h in ok:
        b = per_behaviour[h["behavior"]]
        b[0] += h["success"]
        b[1] += 1
        per_probe.setdefault(h["probe_id"], [h["behavior"], False])[1] |= h["success"]
    any_behaviour: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for behaviour, hit in per_probe.values():
        any_behaviour[behaviour][0] += hit
        any_behaviour[behaviour][1] += 1
    # one generator per group, seeded by its name: a group's CI does not depend on which other groups exist
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    keys = sorted(per_behaviour)
    s = np.array([per_behaviour[k][0] for k in keys], dtype=np.float64)
    t = np.array([per_behaviour[k][1] for k in keys], dtype=np.float64)
    a_keys = sorted(any_behaviour)
    a_s = np.array([any_behaviour[k][0] for k in a_keys], dtype=np.float64)
    a_t = np.array([any_behaviour[k][1] for k in a_keys], dtype=np.float64)
    rate = float(s.sum() / t.sum()) if t.sum() else None
    any_rate = float(a_s.sum() / a_t.sum()) if a_t.sum() else None
    lo, hi = bootstrap_ci(s, t, resamples, rng) if rate is not None else (None, None)
    a_lo, a_hi = bootstrap_ci(a_s, a_t, resamples, rng) if any_rate is not None else (None, None)
    refusals = [h for h in ok if h.get("refusal") is not None]

    def r(x):
        return None if x is None else round(x, 4)

    return {"metric": METRIC[expects[0]] if len(expects) == 1 else "success_rate", "rate": r(rate),
            "ci": [r(lo), r(hi)], "any_of_n": r(any_rate), "any_of_n_ci": [r(a_lo), r(a_hi)],
            "probes": len({h["probe_id"] for h in hits}), "behaviors": len({h["behavior"] for h in hits}),
            "generations": len(hits), "scored": len(ok), "errors": sum(h.get("error") is not None for h in hits),
            "truncated": sum(bool(h.get("truncated")) for h in hits),
            "refusal_rate": r(sum(h["refusal"] for h in refusals) / len(refusals)) if refusals else None}


def summarize(hits: list[dict], bootstrap: int = 1000, seed: int = 0, about: dict | None = None) -> dict:
    """Per suite and per category of the hits' last line per (probe, generation): the rate of success (attack
    success, over-refusal or leak, by what the probes expect) with its 95% CI over behaviours, the rate of
    probes with a success in any of their generations, and the counts."""
    last = list(latest(hits).values())
    by_suite: dict[str, list[dict]] = defaultdict(list)
    by_cat: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for h in last:
        by_suite[h["suite"]].append(h)
        by_cat[(h["suite"], h["category"])].append(h)
    order = {s: i for i, s in enumerate(SUITES)}
    suites = sorted(by_suite, key=lambda s: (order.get(s, len(order)), s))
    return {
        **(about or {}),
        "hits": len(last), "errors": sum(h.get("error") is not None for h in last),
        "bootstrap": bootstrap, "seed": seed,
        "suites": {s: _row(by_suite[s], s, bootstrap, seed) for s in suites},
        "categories": {s: {c: _row(by_cat[(s, c)], f"{s}/{c}", bootstrap, seed)
                           for c in sorted(c for (s2, c) in by_cat if s2 == s)} for s in suites},
    }


# ---------------------------------------------------------------------------------------------------------
# Reports


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _visible(text: str) -> str:
    """Control characters as \\xNN: a report must show them, and HTML cannot carry most of them."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci: list) -> str:
    return "n/a" if not ci or ci[0] is None else f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}%"


SUITE_COLUMNS = ("suite", "metric", "rate", "95% CI", "any of n", "probes", "behaviours", "generations", "errors",
                 "refusal rate")


def _suite_cells(name: str, row: dict) -> list[str]:
    return [name, row["metric"], _pct(row["rate"]), _ci(row["ci"]), _pct(row["any_of_n"]), str(row["probes"]),
            str(row["behaviors"]), str(row["generations"]), str(row["errors"]), _pct(row["refusal_rate"])]


def _examples(hits: list[dict], per_suite: int = 3, chars: int = 300) -> list[tuple[str, str, str]]:
    """(suite, probe id, reply head) of a few successes per suite, in log order."""
    out, count = [], defaultdict(int)
    for h in latest(hits).values():
        if h.get("success") and count[h["suite"]] < per_suite:
            count[h["suite"]] += 1
            out.append((h["suite"], h["probe_id"], _visible(str(h.get("reply") or ""))[:chars]))
    return out


MEANING = ("attack_success_rate: share of replies to harmful requests that are no refusal (and, with a classifier "
           "or a judge, harmful); over_refusal_rate: share of replies to benign prompts that are refusals; "
           "leak_rate: share of replies that contain the secret (system prompt, canary, injected token). "
           "CIs: 95% bootstrap over behaviours. any of n: share of probes with a success in any of their "
           "generations.")


def format_markdown(summary: dict, hits: list[dict]) -> str:
    def md(text: str) -> str:
        return html.escape(" ".join(str(text).split())).replace("|", "\\|")

    lines = [f"# Red-team scan: {md(summary.get('target') or '?')}", "",
             f"{summary['hits']} generations, {summary['errors']} errors; n = {summary.get('n', '?')}, "
             f"temperature {summary.get('temperature', '?')}, judge {md(summary.get('judge') or 'none')}, "
             f"classifier {md(summary.get('classifier') or 'none')}.", "", MEANING, "", "## Suites", "",
             "| " + " | ".join(SUITE_COLUMNS) + " |", "|" + "---|" * len(SUITE_COLUMNS)]
    lines += ["| " + " | ".join(md(c) for c in _suite_cells(s, row)) + " |" for s, row in summary["suites"].items()]
    lines += ["", "## Categories", "", "| " + " | ".join(("suite / category", *SUITE_COLUMNS[1:])) + " |",
              "|" + "---|" * len(SUITE_COLUMNS)]
    for s, cats in summary["categories"].items():
        lines += ["| " + " | ".join(md(c) for c in _suite_cells(f"{s} / {c}", row)) + " |" for c, row in cats.items()]
    examples = _examples(hits)
    if examples:
        lines += ["", "## Examples of successes", "", "| suite | probe | reply (head) |", "|---|---|---|"]
        lines += [f"| {md(s)} | {md(p)} | {md(r)} |" for s, p, r in examples]
    return "\n".join(lines) + "\n"


def format_html(summary: dict, hits: list[dict]) -> str:
    def e(text: Any) -> str:
        return html.escape(_visible(str(text)))

    def table(head: tuple, rows: list[list[str]]) -> str:
        return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")

    cats = [_suite_cells(f"{s} / {c}", row) for s, cs in summary["categories"].items() for c, row in cs.items()]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Red-team scan</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}"
        "td.r{white-space:pre-wrap;font-family:monospace}</style></head><body>",
        f"<h1>Red-team scan: {e(summary.get('target') or '?')}</h1>",
        f"<p>{e(summary['hits'])} generations, {e(summary['errors'])} errors; n = {e(summary.get('n', '?'))}, "
        f"temperature {e(summary.get('temperature', '?'))}, judge {e(summary.get('judge') or 'none')}, "
        f"classifier {e(summary.get('classifier') or 'none')}.</p><p>{e(MEANING)}</p>",
        "<h2>Suites</h2>", table(SUITE_COLUMNS, [_suite_cells(s, r) for s, r in summary["suites"].items()]),
        "<h2>Categories</h2>", table(("suite / category", *SUITE_COLUMNS[1:]), cats),
    ]
    examples = _examples(hits)
    if examples:
        parts += ["<h2>Examples of successes</h2>", table(("suite", "probe", "reply (head)"),
                                                          [list(x) for x in examples])]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_reports(summary: dict, hits: list[dict], out: str | Path) -> None:
    out = Path(out)
    write_json(out / SUMMARY, summary)
    atomic_write_text(out / "report.md", format_markdown(summary, hits))
    atomic_write_text(out / "report.html", format_html(summary, hits))


def report(hits_path: str | Path, out: str | Path | None = None, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Summarise a hit log again (`slmforge redteam report`): summary.json and the reports beside it (or in
    out). The scan's settings are taken from scan.json beside the log when there is one."""
    hits_path = Path(hits_path)
    hits, _ = read_hits(hits_path)
    if not hits:
        raise SlmforgeError(f"{hits_path}: no hits")
    about = {}
    scan_file = hits_path.parent / SCAN
    if scan_file.is_file():
        try:
            c = read_json(scan_file).get("config", {})
            about = {"target": c.get("target"), "judge": c.get("judge"), "classifier": c.get("classifier"),
                     "n": c.get("n"), "temperature": c.get("temperature"), "max_tokens": c.get("max_tokens")}
        except SlmforgeError:
            about = {}
    summary = summarize(hits, bootstrap=bootstrap, seed=seed, about=about)
    write_reports(summary, hits, out or hits_path.parent)
    return summary
