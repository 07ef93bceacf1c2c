"""`slmforge eval card`: small models against a large one on the same suites, in one report card.

    slmforge eval card runs/sst2/pretrained-full/model big=openai:http://localhost:8000/v1#qwen \
        --text valid.txt --tasks sst2/test.jsonl,translation:multi30k/test.jsonl --out runs/card

Every model is an LM spec (slmforge.lm): a model directory, `slmforge serve`, any OpenAI-compatible URL;
NAME=SPEC names one. One is the reference "large" model (--large, default the last); every other is a
"small" one. The suites:

    bpb             bits per byte of a text file (.txt or .jsonl "text"): model directories through
                    evaluate/perplexity's judge (score_documents); remote models through LM.score (the
                    endpoint's echoed prompt log-probs), n/a with the reason where it gives none
    classification  a task JSONL with "label" and "text" (or an already templated "prompt"): accuracy and
                    macro-F1 (evaluate/tasks.py). A fine-tuned classifier directory answers through
                    infer/predict's classify (its head, or the label log-likelihoods); any other LM gets a
                    prompt naming the label set, and its answer is mapped onto a label (map_label of
                    distill generate: an answer naming no label, or several, counts as invalid)
    translation     prompt/completion (or chat) rows: BLEU and chrF of the greedy answers (sacrebleu)
    summarization   the same rows: ROUGE-1/2/L
    speed           `requests` greedy generations of up to max_tokens tokens, one at a time after a
                    warm-up: latency per request (p50, p95), s/token and tokens/s of generation, and for
                    model directories the peak memory of a fresh process that loads and decodes (VmHWM)

Beside them: parameters and forward FLOPs/token (2·params + 4·layers·d_attn·ctx, PaLM's count at the
full context) of model directories, and for remote models given prices ($ per 1M input / output tokens)
the $ per 1k requests of the card's own requests (the endpoint's token counts).

Each small model's quality is given as % of the large one's, per suite metric (for bits/byte, where lower
is better, large / small), and one headline figure (the mean over suites of each suite's headline metric),
at % of the large one's cost: $ per 1k requests when both are priced, else measured s/token (token counts
come from each model's own tokenizer; the card says which basis it used).

Resumable: OUT/card.json is rewritten (atomically) after every (model, suite) cell; a rerun keeps a cell
whose model fingerprint (the files of a model directory; the spec of a remote one), suite fingerprint (its
settings and the file's hash) and API are unchanged, and measures the rest. All input is read and checked,
and every remote endpoint reached, before the first cell, so bad input writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import with_config

from slmforge.errors import ConfigError, SlmforgeError
from slmforge.stage_config import STRICT, build, read_config_file, set_fields, setting

SUITE_KINDS = ("bpb", "classification", "translation", "summarization", "speed")
TASK_KINDS = ("classification", "translation", "summarization")
# the quality figures of each suite kind, its headline first (the recipes' own metrics)
METRICS = {"bpb": ("bits_per_byte",), "classification": ("accuracy", "macro_f1"),
           "translation": ("bleu", "chrf"), "summarization": ("rougeL", "rouge1", "rouge2")}
LOWER_IS_BETTER = {"bits_per_byte"}
DEFAULT_TOKENS = {"classification": 16, "translation": 64, "summarization": 64, "speed": 32}
CLASSIFY_TEMPLATE = "{text}\nAnswer with one of: {labels}.\nAnswer:"
SPEED_PROMPTS = ("Once upon a time", "The weather today is", "Write one sentence about the sea.",
                 "Tom and his mom went to")
APIS = ("auto", "chat", "completion")
CARD_FORMAT = 1


@with_config(STRICT)
@dataclass
class SuiteSpec:
    """One suite of the card (the YAML's `suites:` entries; --text, --tasks and --speed make them too)."""

    kind: str = setting(help=f"One of {', '.join(SUITE_KINDS)}.")
    file: str | None = setting(None, "bpb: a .txt or .jsonl text file; tasks: a task JSONL; speed: prompts "
                                     "(.txt lines or JSONL 'prompt'; default a few built-in ones).")
    name: str | None = setting(None, "The suite's name in the card (default KIND:FILE-STEM).")
    max_examples: int | None = setting(None, "Only the first N documents or rows (default: the card's).")
    labels: list[str] | None = setting(None, "classification: the label set (default: the file's labels).")
    template: str | None = setting(None, "classification: the prompt for 'text' rows, with {text} and {labels} "
                                         f"(default {CLASSIFY_TEMPLATE!r}).")
    metric: str | None = setting(None, "The headline metric (default: the first of the kind's).")
    max_tokens: int | None = setting(None, "Most tokens per answer (default: 16 classification, 64 generation, "
                                           "32 speed).")
    stop: list[str] = setting(help="Stop strings of task answers.", factory=lambda: ["\n"])
    requests: int = setting(8, "speed: timed requests (after one warm-up request).")

    def __post_init__(self) -> None:
        checks = [
            (self.kind in SUITE_KINDS, f"suite kind {self.kind!r}: one of {', '.join(SUITE_KINDS)}"),
            (self.kind == "speed" or bool(self.file), f"a {self.kind} suite needs a file"),
            (self.max_examples is None or self.max_examples >= 1, "max_examples must be >= 1"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.requests >= 1, "requests must be >= 1"),
            (self.labels is None or self.kind == "classification", "labels are for classification suites"),
            (self.labels is None or len(set(self.labels)) == len(self.labels) >= 2,
             "labels must be at least two distinct names"),
            (self.template is None or "{text}" in self.template, "template must contain {text}"),
            (self.metric is None or self.metric in METRICS.get(self.kind, ()),
             f"metric {self.metric!r}: one of {', '.join(METRICS.get(self.kind, ())) or 'none (speed)'}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"suite {self.name or self.file or self.kind}: {msg}")


@with_config(STRICT)
@dataclass
class EvalCardConfig:
    """Every setting of `slmforge eval card`; its CLI options and YAML mapping are made from these."""

    models: list[str] = setting(help="LM specs (the command's arguments): model directories, "
                                     "openai:<base_url>#<model>; NAME=SPEC names one.", factory=list)
    large: str | None = setting(None, "The reference model, by name or spec (default: the last).")
    out: str | None = setting(None, "Output folder: card.md, card.json, card.png (required; a rerun resumes).")
    text: list[str] = setting(help="Text files for bits/byte (.txt, .jsonl 'text'), comma-separated.",
                              factory=list)
    tasks: list[str] = setting(help="Task JSONL files, comma-separated, each [KIND:]FILE with KIND "
                                    "classification (the default), translation or summarization.", factory=list)
    suites: list[SuiteSpec] = setting(help="Suites in full (YAML only).", factory=list)
    speed: bool = setting(True, "Add the speed suite: latency, s/token, tokens/s (and peak memory).")
    speed_requests: int = setting(8, "Speed suite: timed requests.")
    speed_tokens: int = setting(32, "Speed suite: tokens per request.")
    memory: bool = setting(True, "Speed suite: peak memory of model directories (a fresh process; VmHWM).")
    max_examples: int | None = setting(None, "Only the first N documents or rows of each suite file.")
    prices: list[str] = setting(help="USD per 1M input/output tokens of remote models: NAME=IN/OUT, or IN/OUT "
                                     "for every remote model; comma-separated.", factory=list)
    api: str = setting("auto", "How models are asked: chat, completion (continue the prompt), or auto "
                               "(completion for model directories, chat for endpoints).")
    concurrency: int = setting(8, "Remote models: requests in flight (task suites).")
    max_retries: int = setting(3, "Remote models: retries per request.")
    timeout_s: float = setting(120.0, "Remote models: seconds per request.")
    api_key_env: str = setting("OPENAI_API_KEY", "The variable holding the endpoints' API key.")
    threads: int = setting(0, "torch threads for model directories (0: torch's default).")
    progress: bool = setting(True, "Show progress on stderr.")

    def __post_init__(self) -> None:
        checks = [
            (self.api in APIS, f"api must be one of {', '.join(APIS)}"),
            (self.speed_requests >= 1, "speed_requests must be >= 1"),
            (self.speed_tokens >= 1, "speed_tokens must be >= 1"),
            (self.max_examples is None or self.max_examples >= 1, "max_examples must be >= 1"),
            (self.concurrency >= 1, "concurrency must be >= 1"),
            (self.max_retries >= 0, "max_retries must be >= 0"),
            (self.timeout_s > 0, "timeout_s must be > 0"),
            (self.threads >= 0, "threads must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"eval card config: {msg}")


def load_card_config(path: str | Path, overrides: dict | None = None) -> EvalCardConfig:
    """An EvalCardConfig from a YAML file, `overrides` ({field: value}, the command line's) set on top; any
    problem is one error naming file:line and the field."""
    path = Path(path)
    raw = read_config_file(path, "eval card config", "models, suites, out, ...")
    set_fields(raw, overrides or {}, path)
    return build(EvalCardConfig, raw, path)


# ---------------------------------------------------------------------------------------------------------
# models


@dataclass
class CardModel:
    name: str
    spec: str
    remote: bool
    fingerprint: str
    api: str
    info: dict = field(default_factory=dict)  # params, flops_per_token, ctx, classifier (model directories)
    price: tuple[float, float] | None = None  # USD per 1M input, output tokens


def dir_fingerprint(path: str | Path) -> str:
    """A model directory's identity: the hash of every file in it (weights, config, tokenizer, heads, meta)."""
    from slmforge.io import file_sha256

    h = hashlib.sha256()
    for p in sorted(Path(path).iterdir()):
        if p.is_file() and not p.name.startswith("."):
            h.update(f"{p.name}:{file_sha256(p)}\n".encode())
    return h.hexdigest()[:16]


def _default_name(spec: str) -> str:
    if spec.startswith("openai:"):
        return spec.rpartition("#")[2]
    p = Path(spec)
    # runs/sst2/pretrained-full/model: the run's name says more than "model"
    return p.parent.name if p.name == "model" and p.parent.name else p.name


def parse_prices(items: list[str], names: list[str]) -> dict[str | None, tuple[float, float]]:
    """{model name or None (every remote model): (USD per 1M input tokens, per 1M output tokens)}."""
    out: dict[str | None, tuple[float, float]] = {}
    for item in items:
        name, eq, value = item.rpartition("=")
        a, slash, b = value.partition("/")
        try:
            price = (float(a), float(b))
        except ValueError:
            price = None
        if not slash or price is None or min(price) < 0 or not all(map(math.isfinite, price)):
            raise SlmforgeError(f"prices {item!r}: expected NAME=IN/OUT or IN/OUT (USD per 1M input / output "
                                "tokens, >= 0)")
        if eq and name not in names:
            raise SlmforgeError(f"prices {item!r}: no model named {name!r} (models: {', '.join(names)})")
        out[name if eq else None] = price
    return out


def resolve_models(cfg: EvalCardConfig) -> tuple[list[CardModel], str]:
    """The models (directories opened and fingerprinted; nothing loaded) and the large one's name."""
    from slmforge.modeldir import ModelDir

    if not cfg.models:
        raise SlmforgeError("eval card: give the models (LM specs: model directories, openai:<base_url>#<model>)")
    if len(cfg.models) < 2:
        raise SlmforgeError("eval card: needs at least two models (small ones and the large reference)")
    parsed = []
    for item in cfg.models:
        m = re.fullmatch(r"([\w.-]+)=(.+)", item)
        name, spec = (m.group(1), m.group(2)) if m and not item.startswith("openai:") else (_default_name(item), item)
        parsed.append((name, spec))
    names = [n for n, _ in parsed]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SlmforgeError(f"eval card: two models named {dup[0]!r}: name them NAME=SPEC")
    prices = parse_prices(cfg.prices, names)
    models = []
    for name, spec in parsed:
        if spec.startswith("openai:"):
            url, sep, model = spec[len("openai:"):].partition("#")
            if not sep or not url or not model:
                raise SlmforgeError(f"LM spec {spec!r}: expected openai:<base_url>#<model>")
            api = "chat" if cfg.api == "auto" else cfg.api
            models.append(CardModel(name, spec, True, "remote:" + spec, api, price=prices.get(name, prices.get(None))))
            continue
        if not Path(spec).is_dir():
            raise SlmforgeError(f"LM spec {spec!r}: not a model directory, and not openai:<base_url>#<model>")
        if name in prices:
            raise SlmforgeError(f"prices: {name} is a model directory (prices are for remote models)")
        md = ModelDir.open(spec)
        c = md.config
        # forward FLOPs per token at the full context: a third of PaLM's training count (6N + 12·L·d_attn·T)
        info = {"params": c.n_params, "flops_per_token": int(c.flops_per_token(c.max_position_embeddings) / 3),
                "ctx": c.max_position_embeddings, "classifier": bool(md.meta.get("classifier"))}
        api = "completion" if cfg.api == "auto" else cfg.api
        models.append(CardModel(name, spec, False, dir_fingerprint(spec), api, info))
    if cfg.large is None:
        large = models[-1].name
    else:
        hit = [m.name for m in models if cfg.large in (m.name, m.spec)]
        if not hit:
            raise SlmforgeError(f"--large {cfg.large}: not one of the models ({', '.join(names)})")
        large = hit[0]
    return models, large


def probe(model: CardModel, cfg: EvalCardConfig) -> None:
    """One 1-token request, without retries: an unreachable endpoint, a wrong model name or key is an error
    before any cell is measured (else the card would stop half-way)."""
    from slmforge.infer.sampling import SamplingParams
    from slmforge.lm import open_lm

    lm = open_lm(model.spec, api_key_env=cfg.api_key_env, max_retries=0, timeout_s=min(cfg.timeout_s, 30.0))
    try:
        params = SamplingParams(max_new_tokens=1, temperature=0.0)
        if model.api == "chat":
            lm.chat([[{"role": "user", "content": "Hi"}]], params)
        else:
            lm.generate(["Hi"], params)
    except SlmforgeError as e:
        raise SlmforgeError(f"model {model.name} ({model.spec}): not reachable: {e}") from None
    finally:
        lm.close()


def open_model(model: CardModel, cfg: EvalCardConfig):
    from slmforge.lm import open_lm

    return open_lm(model.spec, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                   max_retries=cfg.max_retries, timeout_s=cfg.timeout_s)


# ---------------------------------------------------------------------------------------------------------
# suites


@dataclass
class Suite:
    spec: SuiteSpec
    name: str
    fingerprint: str
    docs: list[str] = field(default_factory=list)  # bpb: documents; speed: prompts
    rows: list[tuple[str, dict]] = field(default_factory=list)  # task suites: (file:line, row)
    labels: list[str] = field(default_factory=list)
    max_tokens: int = 32


def suite_specs(cfg: EvalCardConfig) -> list[SuiteSpec]:
    """The YAML's suites, then one per --text file, one per --tasks file, then speed."""
    specs = list(cfg.suites)
    specs += [SuiteSpec(kind="bpb", file=f) for f in cfg.text]
    for item in cfg.tasks:
        kind, sep, path = item.partition(":")
        if not sep or (kind not in SUITE_KINDS and Path(item).exists()):  # a plain path (a colon in its name)
            kind, path = "classification", item
        if kind not in TASK_KINDS:
            raise SlmforgeError(f"tasks {item!r}: KIND {kind!r} is not one of {', '.join(TASK_KINDS)}")
        specs.append(SuiteSpec(kind=kind, file=path))
    if cfg.speed and not any(s.kind == "speed" for s in specs):
        specs.append(SuiteSpec(kind="speed", requests=cfg.speed_requests, max_tokens=cfg.speed_tokens))
    if not specs:
        raise SlmforgeError("eval card: no suites (give --text, --tasks, --speed or a config's suites)")
    return specs


def _field(where: str, rec: dict, name: str) -> str:
    v = rec.get(name)
    if not isinstance(v, str) or not v.strip():
        raise SlmforgeError(f"{where}: needs a non-empty string field '{name}'")
    return v


def _reference(where: str, rec: dict) -> str:
    """A generation row's reference: "completion", or the content of a final assistant turn."""
    if isinstance(rec.get("completion"), str):
        return rec["completion"].strip()
    msgs = rec.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
        return str(msgs[-1].get("content", "")).strip()
    raise SlmforgeError(f"{where}: needs a 'completion' field, or 'messages' ending with the assistant's answer")


def _messages(where: str, rec: dict) -> list[dict]:
    msgs = rec["messages"][:-1] if rec["messages"][-1].get("role") == "assistant" else rec["messages"]
    if not msgs or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")
                           for m in msgs):
        raise SlmforgeError(f"{where}: field 'messages' needs role/content turns before the answer")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def load_suite(spec: SuiteSpec, max_examples: int | None) -> Suite:
    """Read and check a suite's file: every problem is an error naming file:line and the field."""
    from slmforge.evaluate.perplexity import read_documents
    from slmforge.io import file_sha256, read_jsonl_lines

    limit = spec.max_examples or max_examples
    path = Path(spec.file) if spec.file else None
    if path is not None and not path.is_file():
        raise SlmforgeError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'} "
                            f"({spec.kind} suite)")
    name = spec.name or (f"{spec.kind}:{path.stem}" if path else spec.kind)
    suite = Suite(spec, name, "", max_tokens=spec.max_tokens or DEFAULT_TOKENS.get(spec.kind, 32))
    if spec.kind == "bpb":
        suite.docs = read_documents(path, limit)
    elif spec.kind == "speed":
        if path is None:
            suite.docs = list(SPEED_PROMPTS)
        elif path.suffix == ".jsonl":
            suite.docs = [_field(f"{path}:{n}", rec, "prompt") for n, rec in read_jsonl_lines(path)]
        else:
            suite.docs = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not suite.docs:
            raise SlmforgeError(f"{path}: no prompts (speed suite)")
    else:
        rows = [(f"{path}:{n}", rec) for n, rec in read_jsonl_lines(path)][:limit]
        if not rows:
            raise SlmforgeError(f"{path}: no rows ({spec.kind} suite)")
        for where, rec in rows:
            if spec.kind == "classification":
                label = rec.get("label")
                if not isinstance(label, str) or not label.strip():
                    raise SlmforgeError(f"{where}: needs a string field 'label' (a classification row)")
                if not isinstance(rec.get("text"), str) and not isinstance(rec.get("prompt"), str):
                    raise SlmforgeError(f"{where}: needs a string field 'text' (or an already templated 'prompt')")
                if spec.labels and label not in spec.labels:
                    raise SlmforgeError(f"{where}: label {label!r} is not in the suite's labels {spec.labels}")
            else:
                _reference(where, rec)
                if isinstance(rec.get("messages"), list):
                    _messages(where, rec)
                elif not isinstance(rec.get("prompt"), str):
                    raise SlmforgeError(f"{where}: needs a string field 'prompt' (or chat 'messages')")
        suite.rows = rows
        if spec.kind == "classification":
            suite.labels = list(spec.labels) if spec.labels else sorted({rec["label"] for _, rec in rows})
            if len(suite.labels) < 2:
                raise SlmforgeError(f"{path}: one label only ({suite.labels[0]!r}); give the label set (labels:)")
    what = {"spec": asdict(spec), "limit": limit, "file": file_sha256(path) if path else None,
            "n": len(suite.docs or suite.rows)}
    suite.fingerprint = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    return suite


def load_suites(cfg: EvalCardConfig) -> list[Suite]:
    suites = [load_suite(s, cfg.max_examples) for s in suite_specs(cfg)]
    seen: dict[str, Suite] = {}
    for s in suites:
        if s.name in seen and s.spec.file and not s.spec.name:  # two test.jsonl: say whose
            s.name = f"{s.spec.kind}:{Path(s.spec.file).parent.name}/{Path(s.spec.file).stem}"
        if s.name in seen:
            raise SlmforgeError(f"eval card: two suites named {s.name!r}: give them names (suites[].name)")
        seen[s.name] = s
    return suites


# ---------------------------------------------------------------------------------------------------------
# measuring one cell


def _ask(lm, api: str, inputs: list, max_tokens: int, stop: list[str]) -> list[str]:
    """Greedy answers; inputs are prompt strings or chat conversations (always asked by chat)."""
    from slmforge.infer.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, stop=list(stop))
    if inputs and isinstance(inputs[0], list):
        return lm.chat(inputs, params)
    if api == "chat":
        return lm.chat([[{"role": "user", "content": p}] for p in inputs], params)
    return lm.generate(inputs, params)


def _usage(lm) -> dict:
    u = lm.usage
    return {"requests": u.requests, "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between the closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure_bpb(lm, model: CardModel, suite: Suite) -> dict:
    docs = suite.docs
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    if not model.remote:
        from slmforge.evaluate.perplexity import score_documents

        r = score_documents(lm.model, lm.tokenizer, docs)
        return {"metrics": {"bits_per_byte": r["bits_per_byte"], "loss_per_token": r["loss_per_token"],
                            "docs": r["docs"], "tokens": r["tokens"], "bytes": r["bytes"]}}
    try:  # can this endpoint score a prompt at all? (OpenAI's chat models cannot)
        lm.score(["Hello"], [" world"])
    except SlmforgeError as e:
        return {"na": f"no prompt log-probs from the endpoint ({e})"}
    # each document is the completion of an empty prompt: every token scored but the first, which has no
    # context on an endpoint without BOS (vLLM gives it no log-prob)
    nll = -sum(lm.score([""] * len(docs), docs))
    return {"metrics": {"bits_per_byte": nll / (math.log(2) * max(n_bytes, 1)), "docs": len(docs),
                        "bytes": n_bytes}}


def measure_classification(lm, model: CardModel, suite: Suite, cfg: EvalCardConfig) -> dict:
    from slmforge.evaluate.tasks import classification_metrics
    from slmforge.train.distill import map_label

    rows, labels = suite.rows, suite.labels
    gold = [rec["label"] for _, rec in rows]
    if model.info.get("classifier") and all(isinstance(rec.get("text"), str) for _, rec in rows):
        from slmforge.infer.predict import classify

        preds, how = classify(model.spec, rows, labels), "classifier (infer/predict classify)"
    else:
        template = suite.spec.template or CLASSIFY_TEMPLATE
        shown = ", ".join(labels)
        prompts = [rec["prompt"] if not isinstance(rec.get("text"), str) else
                   template.replace("{labels}", shown).replace("{text}", rec["text"]) for _, rec in rows]
        answers = _ask(lm, model.api, prompts, suite.max_tokens, suite.spec.stop)
        # an answer that names no label (or several) stays as it is: counted wrong and invalid
        preds = [map_label(a, labels) or a.strip() for a in answers]
        how = f"prompt ({model.api}), answer mapped to a label"
    m = classification_metrics(gold, preds, labels)
    return {"metrics": {k: m[k] for k in ("accuracy", "macro_f1", "invalid", "n")}, "how": how,
            "confusion": m["confusion"], "labels": labels}


def measure_generation(lm, model: CardModel, suite: Suite) -> dict:
    from slmforge.evaluate.tasks import summarization_metrics, translation_metrics

    inputs = [_messages(w, rec) if isinstance(rec.get("messages"), list) else rec["prompt"] for w, rec in suite.rows]
    refs = [_reference(w, rec) for w, rec in suite.rows]
    hyps = [h.strip() for h in _ask(lm, model.api, inputs, suite.max_tokens, suite.spec.stop)]
    if suite.spec.kind == "translation":
        m = translation_metrics(hyps, refs)
        metrics = {k: m[k] for k in ("bleu", "chrf", "n")}
    else:
        m = summarization_metrics(hyps, refs)
        metrics = {k: m[k] for k in ("rougeL", "rouge1", "rouge2", "n")}
    examples = [{"prediction": h, "reference": r} for h, r in zip(hyps[:3], refs[:3], strict=True)]
    return {"metrics": metrics, "examples": examples}


def measure_speed(lm, model: CardModel, suite: Suite, cfg: EvalCardConfig) -> dict:
    """One request at a time (latency, not throughput), greedy, no stop strings, after a warm-up request."""
    from slmforge.infer.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=suite.max_tokens, temperature=0.0)

    def one(prompt: str) -> None:
        if model.api == "chat":
            lm.chat([[{"role": "user", "content": prompt}]], params)
        else:
            lm.generate([prompt], params)

    one(suite.docs[0])  # builds the decode path / opens the connection: not timed
    before = _usage(lm)
    latencies = []
    for i in range(suite.spec.requests):
        t0 = time.perf_counter()
        one(suite.docs[i % len(suite.docs)])
        latencies.append(time.perf_counter() - t0)
    after = _usage(lm)
    tokens = after["completion_tokens"] - before["completion_tokens"]
    total = sum(latencies)
    metrics = {"latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
               "s_per_token": total / tokens if tokens else None, "tokens_per_s": tokens / total if total else None,
               "requests": len(latencies), "completion_tokens": tokens, "peak_rss_mb": None}
    if not model.remote and cfg.memory:
        from slmforge.compress.pipeline import peak_rss_mb

        metrics["peak_rss_mb"] = round(peak_rss_mb(model.spec, cfg.threads or 1, suite.max_tokens), 1)
    return {"metrics": metrics}


def measure_cell(lm, model: CardModel, suite: Suite, cfg: EvalCardConfig) -> dict:
    before = _usage(lm)
    t0 = time.perf_counter()
    kind = suite.spec.kind
    if kind == "bpb":
        cell = measure_bpb(lm, model, suite)
    elif kind == "classification":
        cell = measure_classification(lm, model, suite, cfg)
    elif kind == "speed":
        cell = measure_speed(lm, model, suite, cfg)
    else:
        cell = measure_generation(lm, model, suite)
    after = _usage(lm)
    cell["usage"] = {k: after[k] - before[k] for k in after}
    cell["seconds"] = round(time.perf_counter() - t0, 3)
    return cell


# ---------------------------------------------------------------------------------------------------------
# the card


def make_card(cfg: EvalCardConfig) -> dict:
    """Measure every (model, suite) cell not already in OUT/card.json and write the card; returns it."""
    import torch

    from slmforge.io import check_out_dir, read_json, write_json

    if not cfg.out:
        raise SlmforgeError("eval card: --out is required (the folder for card.md, card.json, card.png)")
    out = Path(cfg.out)
    check_out_dir(out)
    models, large = resolve_models(cfg)
    suites = load_suites(cfg)  # every file read and checked before anything is measured
    last_path = out / "card.json"
    last = read_json(last_path) if last_path.is_file() else {}
    kept = {(c.get("model"), c.get("suite")): c for c in last.get("cells", []) if isinstance(c, dict)}

    def still_valid(m: CardModel, s: Suite) -> dict | None:
        c = kept.get((m.name, s.name))
        if c and (c.get("model_fingerprint"), c.get("suite_fingerprint"), c.get("api")) == (
                m.fingerprint, s.fingerprint, m.api):
            return c
        return None

    todo = [(m, s) for m in models for s in suites if still_valid(m, s) is None]
    for m in {m.name: m for m, _ in todo if m.remote}.values():  # before any cell: an unreachable one fails now
        probe(m, cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    card = {"format": CARD_FORMAT, "large": large, "complete": False, "config": asdict(cfg),
            "models": [_model_entry(m) for m in models],
            "suites": [{"name": s.name, "kind": s.spec.kind, "file": s.spec.file, "fingerprint": s.fingerprint,
                        "n": len(s.docs or s.rows), "labels": s.labels or None,
                        "metric": s.spec.metric or (METRICS[s.spec.kind][0] if s.spec.kind in METRICS else None)}
                       for s in suites],
            "cells": []}
    total, step = len(models) * len(suites), 0
    for m in models:
        lm = None
        try:
            for s in suites:
                step += 1
                cell = still_valid(m, s)
                if cell is not None:
                    _say(cfg, f"card [{step}/{total}] {m.name} · {s.name}: kept from {last_path}")
                else:
                    if lm is None:
                        _say(cfg, f"card: opening {m.name} ({m.spec})")
                        lm = open_model(m, cfg)
                    _say(cfg, f"card [{step}/{total}] {m.name} · {s.name}: measuring")
                    cell = {"model": m.name, "suite": s.name, "model_fingerprint": m.fingerprint,
                            "suite_fingerprint": s.fingerprint, "api": m.api, **measure_cell(lm, m, s, cfg)}
                    _say(cfg, f"card [{step}/{total}] {m.name} · {s.name}: {_cell_line(cell)} "
                              f"({cell['seconds']:.1f} s)")
                card["cells"].append(cell)
                if cell is not kept.get((m.name, s.name)):
                    write_json(last_path, card)  # a kill after this keeps the cell
        finally:
            if lm is not None and hasattr(lm, "close"):
                lm.close()
    card["summary"] = summarize(card)
    card["complete"] = True
    write_card(card, out)
    return card


def _model_entry(m: CardModel) -> dict:
    return {"name": m.name, "spec": m.spec, "kind": "remote" if m.remote else "local", "api": m.api,
            "fingerprint": m.fingerprint, **m.info,
            "price_in_per_1m": m.price[0] if m.price else None, "price_out_per_1m": m.price[1] if m.price else None}


def _say(cfg: EvalCardConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr, flush=True)


def _cell_line(cell: dict) -> str:
    if "na" in cell:
        return "n/a"
    return ", ".join(f"{k} {_num(v)}" for k, v in cell["metrics"].items() if v is not None and k != "n")


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def quality_pct(small: float | None, large: float | None, metric: str) -> float | None:
    """The small model's figure as % of the large one's; for lower-is-better figures (bits/byte) large/small,
    so that 100 is as good and less is worse either way. None when undefined (a 0 or a missing figure)."""
    if small is None or large is None:
        return None
    if metric in LOWER_IS_BETTER:
        return 100.0 * large / small if small > 0 else None
    return 100.0 * small / large if large > 0 else None


def usd_per_1k_requests(card: dict, model: dict) -> float | None:
    """$ per 1k requests at the model's prices, from the card's own generation requests (task and speed
    suites; scoring requests for bits/byte are left out) and the endpoint's token counts."""
    if model.get("price_in_per_1m") is None:
        return None
    kinds = {s["name"]: s["kind"] for s in card["suites"]}
    cells = [c for c in card["cells"] if c["model"] == model["name"] and kinds.get(c["suite"]) != "bpb"]
    req = sum(c["usage"]["requests"] for c in cells)
    if not req:
        return None
    usd = sum(c["usage"]["prompt_tokens"] * model["price_in_per_1m"] + c["usage"]["completion_tokens"]
              * model["price_out_per_1m"] for c in cells) / 1e6
    return 1000 * usd / req


def summarize(card: dict) -> dict:
    """Per model: cost figures, and each suite metric as % of the large model's, the headline quality, and
    the cost as % of the large model's with the basis said."""
    cells = {(c["model"], c["suite"]): c for c in card["cells"]}
    speed = next((s["name"] for s in card["suites"] if s["kind"] == "speed"), None)
    large = card["large"]

    def metric(model: str, suite: str, name: str):
        c = cells.get((model, suite))
        return None if c is None or "na" in c else c["metrics"].get(name)

    cost = {}
    for m in card["models"]:
        cost[m["name"]] = {"usd_per_1k_requests": usd_per_1k_requests(card, m),
                           "s_per_token": metric(m["name"], speed, "s_per_token") if speed else None}
    out = {}
    for m in card["models"]:
        name = m["name"]
        per_suite, headline = {}, []
        for s in card["suites"]:
            if s["kind"] not in METRICS:
                continue
            pct = {k: quality_pct(metric(name, s["name"], k), metric(large, s["name"], k), k)
                   for k in METRICS[s["kind"]]}
            per_suite[s["name"]] = pct
            if pct.get(s["metric"]) is not None:
                headline.append(pct[s["metric"]])
        mine, theirs = cost[name], cost[large]
        basis = next((b for b in ("usd_per_1k_requests", "s_per_token")
                      if mine[b] is not None and theirs[b] is not None and theirs[b] > 0), None)
        out[name] = {**mine, "quality_pct": per_suite,
                     "quality_pct_mean": sum(headline) / len(headline) if headline else None,
                     "cost_basis": basis, "cost_pct": 100.0 * mine[basis] / theirs[basis] if basis else None}
    return out


# ---------------------------------------------------------------------------------------------------------
# writing it out

BASIS_WORDS = {"usd_per_1k_requests": "$ per 1k requests", "s_per_token": "measured s/token", None: "n/a"}


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:.2e}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}%"


def card_markdown(card: dict) -> str:
    large, summary = card["large"], card["summary"]
    cells = {(c["model"], c["suite"]): c for c in card["cells"]}
    lines = [f"# Report card: small models against {large}", "",
             f"Reference (large) model: **{large}**. Quality is each figure as % of the large model's (bits/byte: "
             "large / small, lower being better); cost is $ per 1k requests where both models are priced, else "
             "measured s/token.", ""]
    small = [m for m in card["models"] if m["name"] != large]
    lines += ["## Summary", "", "| model | quality (% of large) | cost (% of large) | cost basis |",
              "|---|---|---|---|"]
    for m in small:
        s = summary[m["name"]]
        lines.append(f"| {m['name']} | {_pct(s['quality_pct_mean'])} | {_pct(s['cost_pct'])} | "
                     f"{BASIS_WORDS[s['cost_basis']]} |")
    lines += ["", "## Models", "", "| model | spec | kind | params | FLOPs/token | $ in / out per 1M |",
              "|---|---|---|---|---|---|"]
    for m in card["models"]:
        priced = m.get("price_in_per_1m") is not None
        price = f"{m['price_in_per_1m']:g} / {m['price_out_per_1m']:g}" if priced else "n/a"
        lines.append(f"| {m['name']} | `{m['spec']}` | {m['kind']} | {_fmt(m.get('params'))} | "
                     f"{_fmt(m.get('flops_per_token'))} | {price} |")
    for s in card["suites"]:
        if s["kind"] == "speed":
            continue
        metrics = METRICS[s["kind"]]
        lines += ["", f"## {s['name']} ({s['kind']}, {s['n']} {'documents' if s['kind'] == 'bpb' else 'rows'}"
                      f"{', ' + s['file'] if s['file'] else ''})", "",
                  "| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for m in card["models"]:
            c = cells.get((m["name"], s["name"]))
            if c is None or "na" in c:
                lines.append(f"| {m['name']} | " + " | ".join(["n/a"] * len(metrics)) + " |")
                continue
            pct = summary[m["name"]]["quality_pct"][s["name"]]
            shown = [_fmt(c["metrics"][k], 4 if k in LOWER_IS_BETTER else 2)
                     + ("" if m["name"] == large else f" ({_pct(pct[k])})") for k in metrics]
            lines.append(f"| {m['name']} | " + " | ".join(shown) + " |")
        notes = [f"{m['name']}: {cells[(m['name'], s['name'])]['na']}" for m in card["models"]
                 if "na" in cells.get((m["name"], s["name"]), {})]
        notes += [f"{m['name']}: {cells[(m['name'], s['name'])]['how']}" for m in card["models"]
                  if "how" in cells.get((m["name"], s["name"]), {})]
        lines += [""] + [f"- {n}" for n in notes] if notes else []
    speed = next((s for s in card["suites"] if s["kind"] == "speed"), None)
    lines += ["", "## Speed and cost", ""]
    if speed:
        lines += [f"{speed['n']} prompts, one request at a time after a warm-up; tokens are each model's own.", ""]
    lines += ["| model | s/request p50 | p95 | s/token | tokens/s | peak memory MB | $ per 1k requests |",
              "|---|---|---|---|---|---|---|"]
    for m in card["models"]:
        c = cells.get((m["name"], speed["name"])) if speed else None
        sm = c["metrics"] if c else {}
        lines.append(f"| {m['name']} | {_fmt(sm.get('latency_p50_s'), 3)} | {_fmt(sm.get('latency_p95_s'), 3)} | "
                     f"{_fmt(sm.get('s_per_token'), 4)} | {_fmt(sm.get('tokens_per_s'), 1)} | "
                     f"{_fmt(sm.get('peak_rss_mb'), 0)} | {_fmt(summary[m['name']]['usd_per_1k_requests'], 4)} |")
    return "\n".join(lines) + "\n"


def card_png(card: dict) -> bytes:
    """Quality (% of large) against cost (% of large), one point per model, its cost basis in the label."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    marks = {"usd_per_1k_requests": "s", "s_per_token": "o"}
    for m in card["models"]:
        s = card["summary"][m["name"]]
        if s["quality_pct_mean"] is None or s["cost_pct"] is None:
            continue
        ax.scatter([s["cost_pct"]], [s["quality_pct_mean"]], marker=marks[s["cost_basis"]], s=50,
                   color="black" if m["name"] == card["large"] else None)
        label = "reference" if m["name"] == card["large"] else BASIS_WORDS[s["cost_basis"]]
        ax.annotate(f"{m['name']} ({label})", (s["cost_pct"], s["quality_pct_mean"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.1)  # room for the labels of the outermost points
    ax.axhline(100, color="gray", lw=0.8)
    ax.axvline(100, color="gray", lw=0.8)
    ax.set_xlabel(f"cost, % of {card['large']} (log)")
    ax.set_ylabel(f"quality, % of {card['large']}")
    ax.set_title("Report card: quality vs cost")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_card(card: dict, out: Path) -> None:
    """card.json, card.md and card.png, each written to a temp file and renamed."""
    from slmforge.io import atomic_write_bytes, atomic_write_text, write_json

    png, md = card_png(card), card_markdown(card)  # made before anything is replaced
    write_json(out / "card.json", card)
    atomic_write_text(out / "card.md", md)
    atomic_write_bytes(out / "card.png", png)
