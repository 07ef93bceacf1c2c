"""Routers between a small and a large model: which prompts need the large one.

    data = load_outcomes("../shared/data/routing")              # RouteLLM's MMLU responses, or a JSONL
    router = train_router(train, RouterConfig(router="learned"))   # or random, cascade, mf, sw
    router = calibrate(router, val, share=0.3)                    # the threshold, chosen on validation data
    report = evaluate(scores_for(router, test), test, router.threshold)   # APGR, CPT(50%), the curve
    save_router(router, "runs/router"); router = load_router("runs/router")

A router gives every prompt a score: how much the prompt needs the large model. A prompt goes to the large
model when its score is at least the router's threshold. Five routers:

    random    a uniform score per prompt (seeded; the same prompt always gets the same score): the baseline
    cascade   the small model's own confidence on the prompt (mean/min token log-prob, label margin: higher is
              more confident; entropy: higher is less), given per row; escalates the unconfident ones
    learned   a classifier on local embeddings of the prompt, trained on evaluation outcomes: by default
              P(small answer good enough | prompt), the score being 1 - P
    mf        RouteLLM's matrix factorisation: a bilinear win-rate model over model embeddings and the
              projected prompt embedding, trained on the prompts where one model beat the other
    sw        RouteLLM's similarity-weighted ranking: a Bradley-Terry fit over the training prompts, each
              weighted by its similarity to the prompt being routed

Embeddings are local: TF-IDF (scikit-learn, always available), our own model's mean-pooled hidden states
(`model:DIR`), or a sentence-transformers model on disk (`st:DIR`, when that optional package is installed).

Metrics are RouteLLM's (routellm/evals/evaluate.py and benchmarks.py): the curve of quality against the share
of large-model calls at the deciles of the router's scores; PGR (performance gap recovered) = (quality -
small's) / (large's - small's); APGR, the area under PGR over call shares 0..100%; CPT(x%), the share of calls
needed to reach PGR x%.

A trained router is a folder: router.json (kind, settings, threshold, provenance), arrays.safetensors (learned
weights, no pickle) and vocab.json (TF-IDF terms), written to a temp folder and renamed into place.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import with_config

from slmforge.errors import ConfigError, SlmforgeError
from slmforge.io import atomic_write_bytes, read_json, read_jsonl_lines, write_dir_atomically, write_json
from slmforge.stage_config import STRICT, build, setting

ROUTERS = ("random", "cascade", "learned", "mf", "sw")
CLASSIFIERS = ("logreg", "mlp")
TARGETS = ("small_ok", "large_wins", "gain")
SIGNAL_KINDS = ("auto", "confidence", "uncertainty")
# RouteLLM's MMLU responses name the pair by model: Mixtral is the weak (small) one, GPT-4 the strong one
ROUTELLM_SMALL, ROUTELLM_LARGE = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"
CONTAMINATED_FILE = "mmlu_contaminated_prompts.jsonl"
ROUTER_FILE, ARRAYS_FILE, VOCAB_FILE = "router.json", "arrays.safetensors", "vocab.json"
FORMAT = "slmforge-router"


# ---------------------------------------------------------------------------------------------------------
# Settings: one typed config per concern; the CLI's options are made from them (stage_config.options_from)


@with_config(STRICT)
@dataclass
class RouterConfig:
    """How a router is trained (`slmforge route train`); saved with the router."""

    router: str = setting("learned", "Router: random, cascade (the small model's confidence), learned (a "
                                     "classifier on prompt embeddings), mf (RouteLLM's matrix factorisation) "
                                     "or sw (RouteLLM's similarity-weighted ranking).")
    embedder: str = setting("tfidf", "Prompt embeddings (learned, mf, sw): tfidf (word 1-2 grams), tfidf-char "
                                     "(character 2-5 grams), model:DIR (our model's mean-pooled hidden states) "
                                     "or st:DIR (a sentence-transformers model on disk; needs that package).")
    classifier: str = setting("logreg", "learned: logreg (logistic regression) or mlp (one hidden layer).")
    target: str = setting("small_ok", "learned: what the classifier predicts. small_ok: P(small answer good "
                                      "enough), score 1 - P; large_wins: P(large better than small); gain: "
                                      "three classes, score P(large better) - P(small better).")
    good_enough: float = setting(0.5, "small_ok: a small answer of at least this quality is good enough.")
    logreg_c: float = setting(1.0, "logreg: inverse regularisation strength (scikit-learn's C).")
    hidden: int = setting(64, "mlp: hidden units.")
    max_features: int = setting(50000, "tfidf: most terms kept (by frequency).")
    max_tokens: int = setting(256, "model:DIR: tokens per prompt embedded (the last ones: a question and its "
                                   "options end the prompt).")
    mf_dim: int = setting(128, "mf: latent dimension (RouteLLM: 128).")
    epochs: int = setting(100, "mf: epochs (RouteLLM: 100); mlp: most epochs.")
    lr: float = setting(3e-4, "mf: Adam learning rate (RouteLLM: 3e-4).")
    weight_decay: float = setting(1e-5, "mf: Adam weight decay (RouteLLM: 1e-5).")
    noise: float = setting(0.1, "mf: std of the Gaussian noise added to prompt embeddings in training "
                                "(RouteLLM's alpha: 0.1).")
    batch_size: int = setting(64, "mf: pairs per step (RouteLLM: 64).")
    signal: str | None = setting(None, "cascade: the data field (JSONL) or column (CSV) holding the small "
                                       "model's confidence signal per prompt.")
    signal_kind: str = setting("auto", "cascade: confidence (higher = more sure: log-probs, margins), "
                                       "uncertainty (higher = less sure: entropy), or auto (uncertainty when "
                                       "the signal's name contains 'entropy').")
    seed: int = setting(0, "Seed (random scores, mf and mlp initialisation).")

    def __post_init__(self) -> None:
        checks = [
            (self.router in ROUTERS, f"router must be one of {', '.join(ROUTERS)}"),
            (self.classifier in CLASSIFIERS, f"classifier must be one of {', '.join(CLASSIFIERS)}"),
            (self.target in TARGETS, f"target must be one of {', '.join(TARGETS)}"),
            (self.signal_kind in SIGNAL_KINDS, f"signal_kind must be one of {', '.join(SIGNAL_KINDS)}"),
            (self.router != "cascade" or bool(self.signal), "the cascade router needs --signal (the field "
                                                            "holding the small model's confidence)"),
            (0 <= self.good_enough <= 1, "good_enough must be in [0, 1]"),
            (self.logreg_c > 0, "logreg_c must be > 0"),
            (self.hidden >= 1, "hidden must be >= 1"),
            (self.max_features >= 1, "max_features must be >= 1"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.mf_dim >= 1, "mf_dim must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.noise >= 0, "noise must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"route config: {msg}")
        _check_embedder(self.embedder)


@with_config(STRICT)
@dataclass
class OutcomeFormat:
    """Where a data file keeps each row's fields (`slmforge route ... --data`)."""

    small_field: str | None = setting(None, "The small model's quality field/column (default: small, else "
                                            "RouteLLM's Mixtral column).")
    large_field: str | None = setting(None, "The large model's quality field/column (default: large, else "
                                            "RouteLLM's GPT-4 column).")
    group_field: str = setting("group", "The group field/column (e.g. a subject); MMLU files: the subject "
                                        "from the file name.")
    groups: list[str] | None = setting(None, "Keep only these groups (comma-separated; default: all).")
    contaminated: str = setting("auto", "JSONL of prompts to leave out (field eval_prompt, RouteLLM's format); "
                                        "auto: mmlu_contaminated_prompts.jsonl beside the data if there is "
                                        "one; none: keep every prompt.")


@with_config(STRICT)
@dataclass
class CalibrationTarget:
    """What the threshold is chosen for, on validation data (at most one)."""

    share: float | None = setting(None, "Send this share of prompts (0..1) to the large model.")
    quality: float | None = setting(None, "Reach this fraction of the large model's quality (e.g. 0.95) with "
                                          "the fewest large-model calls.")
    pgr: float | None = setting(None, "Reach this performance gap recovered (0..1) with the fewest calls.")

    def __post_init__(self) -> None:
        given = [k for k in ("share", "quality", "pgr") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ConfigError(f"calibration: give one target, not {' and '.join('--' + k for k in given)}")
        for k in given:
            v = getattr(self, k)
            if not (math.isfinite(v) and 0 <= v <= 1):
                raise ConfigError(f"calibration: {k} must be in [0, 1], got {v}")

    def target(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@with_config(STRICT)
@dataclass
class EvalConfig:
    """`slmforge route eval`: how the curve is drawn and what is written."""

    bins: int = setting(10, "Thresholds at the quantiles of the scores in this many bins (RouteLLM: 10).")
    random_seeds: int = setting(10, "The random baseline's APGR is averaged over this many seeds.")
    json_out: str | None = setting(None, "Write the report here as JSON.", aliases=("--json",))
    plot: str | None = setting(None, "Write the cost-quality curve here as PNG.")

    def __post_init__(self) -> None:
        if self.bins < 1:
            raise ConfigError("route eval: bins must be >= 1")
        if self.random_seeds < 1:
            raise ConfigError("route eval: random_seeds must be >= 1")


def _check_embedder(spec: str) -> None:
    kind, _, arg = spec.partition(":")
    if spec in ("tfidf", "tfidf-char") or (kind in ("model", "st") and arg):
        return
    raise ConfigError(f"route config: embedder must be tfidf, tfidf-char, model:DIR or st:DIR, got {spec!r}")


# ---------------------------------------------------------------------------------------------------------
# Outcome data


@dataclass
class Outcomes:
    """Routing data: per prompt, the quality (0..1) of each model's answer, an optional group (a subject) and
    optionally the small model's confidence signal. Arrays, so that the metrics are vector operations."""

    prompts: list[str]
    small: np.ndarray                 # quality of the small (weak) model's answer
    large: np.ndarray                 # quality of the large (strong) model's answer
    groups: list[str]                 # "" where none
    signal: np.ndarray | None = None  # the small model's confidence signal (cascade), when loaded
    signal_name: str | None = None
    source: str = ""
    excluded: int = 0                 # contaminated prompts left out
    contaminated_file: str | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx) -> Outcomes:
        """The rows at idx (indexes or a boolean mask), same provenance."""
        idx = np.flatnonzero(idx) if np.asarray(idx).dtype == bool else np.asarray(idx, dtype=int)
        return dataclasses.replace(
            self, prompts=[self.prompts[i] for i in idx], small=self.small[idx], large=self.large[idx],
            groups=[self.groups[i] for i in idx], signal=None if self.signal is None else self.signal[idx])

    def summary(self) -> dict:
        return {"rows": len(self), "source": self.source, "excluded_contaminated": self.excluded,
                "groups": len(set(self.groups) - {""}), "small_quality": float(self.small.mean()),
                "large_quality": float(self.large.mean())}


def _quality(value: Any, where: str, name: str, text: bool) -> float:
    """A quality in [0, 1] or a boolean (JSON true/false; in a CSV also the words True/False)."""
    if isinstance(value, bool):
        return float(value)
    number = value
    if text and isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "false"):
            return float(word == "true")
        try:
            number = float(word)
        except ValueError:
            pass
    if isinstance(number, int | float) and not isinstance(number, bool) and math.isfinite(number) \
            and 0 <= number <= 1:
        return float(number)
    raise SlmforgeError(f"{where}: field '{name}': expected a quality in [0, 1] or true/false, got {value!r}")


def _number(value: Any, where: str, name: str, text: bool) -> float:
    if text and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise SlmforgeError(f"{where}: field '{name}': expected a finite number, got {value!r}")


class _Rows:
    """Accumulates checked rows (the parsers below share it)."""

    def __init__(self, small: str, large: str, group: str, signal: str | None):
        self.names = (small, large, group, signal)
        self.prompts: list[str] = []
        self.small: list[float] = []
        self.large: list[float] = []
        self.groups: list[str] = []
        self.signal: list[float] = []

    def add(self, row: dict, where: str, text: bool, default_group: str = "") -> None:
        small, large, group, signal = self.names
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            got = "nothing" if prompt is None else repr(prompt)[:60]
            raise SlmforgeError(f"{where}: field 'prompt': expected a non-empty string, got {got}")
        for name in (small, large) + ((signal,) if signal else ()):
            if row.get(name) is None or (text and row.get(name) == ""):
                raise SlmforgeError(f"{where}: field '{name}': missing")
        self.prompts.append(prompt)
        self.small.append(_quality(row[small], where, small, text))
        self.large.append(_quality(row[large], where, large, text))
        g = row.get(group, default_group)
        if g is None or g == "":
            g = default_group
        if not isinstance(g, str | int):
            raise SlmforgeError(f"{where}: field '{group}': expected a string, got {g!r}")
        self.groups.append(str(g))
        if signal:
            self.signal.append(_number(row[signal], where, signal, text))

    def outcomes(self, source: str) -> Outcomes:
        return Outcomes(self.prompts, np.asarray(self.small, float), np.asarray(self.large, float), self.groups,
                        np.asarray(self.signal, float) if self.names[3] else None, self.names[3], source)


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SlmforgeError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise SlmforgeError(f"{path}:{line}: not valid UTF-8") from None


def _read_csv(path: Path, rows: _Rows, fmt: OutcomeFormat, auto: bool) -> None:
    """One CSV: a header (prompt, the two quality columns, optionally group and the signal), then rows; a
    quoted prompt may span lines, so errors name the line its row starts on."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise SlmforgeError(f"{path}: empty file (expected a CSV header: prompt,small,large)") from None
    except csv.Error as e:
        raise SlmforgeError(f"{path}:1: invalid CSV ({e})") from None
    if auto:  # the columns' names are resolved per file: RouteLLM's files name the models
        rows.names = (_column(path, header, fmt.small_field, "small", ROUTELLM_SMALL),
                      _column(path, header, fmt.large_field, "large", ROUTELLM_LARGE), *rows.names[2:])
    needed = ["prompt", rows.names[0], rows.names[1]] + ([rows.names[3]] if rows.names[3] else [])
    missing = [c for c in needed if c not in header]
    if missing:
        raise SlmforgeError(f"{path}:1: no column {missing[0]!r} (the header has {', '.join(map(repr, header))})")
    # mmlu_<subject>.csv: the subject is the group (RouteLLM's files have no group column)
    default_group = path.stem[5:] if path.stem.startswith("mmlu_") else ""
    end = reader.line_num
    while True:
        start = end + 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise SlmforgeError(f"{path}:{start}: invalid CSV ({e})") from None
        end = reader.line_num
        if not values or values == [""]:
            continue
        if len(values) != len(header):
            raise SlmforgeError(f"{path}:{start}: {len(values)} fields, the header has {len(header)}")
        rows.add(dict(zip(header, values, strict=True)), f"{path}:{start}", text=True, default_group=default_group)


def _column(path: Path, header: list[str], given: str | None, plain: str, routellm: str) -> str:
    if given:
        return given
    return plain if plain in header or routellm not in header else routellm


def _read_jsonl(path: Path, rows: _Rows) -> None:
    for lineno, obj in read_jsonl_lines(path):
        rows.add(obj, f"{path}:{lineno}", text=False)


def _contaminated_prompts(path: Path) -> set[str]:
    """RouteLLM's contaminated prompts file: JSON lines, the MMLU prompt under eval_prompt."""
    out = set()
    for lineno, obj in read_jsonl_lines(path):
        p = obj.get("eval_prompt")
        if not isinstance(p, str):
            raise SlmforgeError(f"{path}:{lineno}: field 'eval_prompt': expected a string")
        out.add(p)
    return out


def _find_contaminated(path: Path) -> Path | None:
    for folder in ([path] if path.is_dir() else []) + [path.parent, path.parent.parent]:
        if (folder / CONTAMINATED_FILE).is_file():
            return folder / CONTAMINATED_FILE
    return None


def load_outcomes(path: str | Path, fmt: OutcomeFormat | None = None, signal: str | None = None) -> Outcomes:
    """Routing data from a JSONL file (fields prompt, small, large, optional group; qualities in [0, 1] or
    booleans), a CSV (columns prompt, small, large or RouteLLM's model columns), or a folder of CSVs (RouteLLM's
    MMLU responses: `mmlu_responses/mmlu_<subject>.csv` or the CSVs themselves; the subject is the group).
    `signal` also reads that numeric field (the small model's confidence, for the cascade).

    Contaminated prompts (RouteLLM's mmlu_contaminated_prompts.jsonl, found beside the data unless
    fmt.contaminated names another file or none) are left out; Outcomes.excluded counts them. Any bad file or
    field: one SlmforgeError naming file:line and the field."""
    fmt = fmt or OutcomeFormat()
    path = Path(path)
    if not path.exists():
        raise SlmforgeError(f"{path}: no such file or directory")
    rows = _Rows(fmt.small_field or "small", fmt.large_field or "large", fmt.group_field, signal)
    if path.is_dir():
        folder = path / "mmlu_responses" if (path / "mmlu_responses").is_dir() else path
        files = sorted(folder.glob("*.csv"))
        if not files:
            raise SlmforgeError(f"{path}: no CSV files (expected RouteLLM's mmlu_responses/mmlu_<subject>.csv)")
        for f in files:
            _read_csv(f, rows, fmt, auto=True)
    elif path.suffix.lower() == ".csv":
        _read_csv(path, rows, fmt, auto=True)
    elif path.suffix.lower() in (".jsonl", ".json"):
        _read_jsonl(path, rows)
    else:
        raise SlmforgeError(f"{path}: expected a .jsonl or .csv file, or a folder of CSVs")
    data = rows.outcomes(str(path))
    if not len(data):
        raise SlmforgeError(f"{path}: no rows")
    if fmt.groups:
        wanted = set(fmt.groups)
        unknown = sorted(wanted - set(data.groups))
        if unknown:
            raise SlmforgeError(f"{path}: no rows in group {unknown[0]!r} (--groups)")
        data = dataclasses.replace(data.take([g in wanted for g in data.groups]), source=str(path))
    if fmt.contaminated != "none":
        cfile = _find_contaminated(path) if fmt.contaminated == "auto" else Path(fmt.contaminated)
        if cfile is not None:
            if not cfile.is_file():
                raise SlmforgeError(f"{cfile}: no such file (--contaminated)")
            bad = _contaminated_prompts(cfile)
            keep = np.array([p not in bad for p in data.prompts])
            n = len(data)
            data = data.take(keep)
            data.excluded, data.contaminated_file = n - len(data), str(cfile)
            if not len(data):
                raise SlmforgeError(f"{path}: no rows left after leaving out the contaminated prompts of {cfile}")
    return data


def outcomes_from_rows(rows: list[dict], source: str = "rows", signal: str | None = None) -> Outcomes:
    """Outcomes from dicts shaped like the JSONL rows (tests, benchmarks), checked the same way."""
    acc = _Rows("small", "large", "group", signal)
    for i, row in enumerate(rows):
        acc.add(row, f"{source}[{i}]", text=False)
    if not rows:
        raise SlmforgeError(f"{source}: no rows")
    return acc.outcomes(source)


def concat(parts: list[Outcomes]) -> Outcomes:
    """Several Outcomes as one, in order (e.g. the test folds of a cross-validation); provenance (source,
    contaminated prompts left out) from the first part."""
    if not parts:
        raise SlmforgeError("concat: no parts")
    has_signal = all(p.signal is not None for p in parts)
    return Outcomes([q for p in parts for q in p.prompts], np.concatenate([p.small for p in parts]),
                    np.concatenate([p.large for p in parts]), [g for p in parts for g in p.groups],
                    np.concatenate([p.signal for p in parts]) if has_signal else None,
                    parts[0].signal_name if has_signal else None, parts[0].source,
                    parts[0].excluded, parts[0].contaminated_file)


def split_by_group(data: Outcomes, fractions: tuple[float, ...], seed: int = 0) -> list[Outcomes]:
    """Deterministic split by group (e.g. MMLU subject): the sorted groups are shuffled with `seed` and cut
    by count in these fractions, so no group is in two parts."""
    names = sorted(set(data.groups))
    order = np.random.default_rng(seed).permutation(len(names))
    names = [names[i] for i in order]
    cuts = np.round(np.cumsum((0.0, *fractions)) / sum(fractions) * len(names)).astype(int)
    parts = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        chosen = set(names[a:b])
        parts.append(data.take([g in chosen for g in data.groups]))
    return parts


# ---------------------------------------------------------------------------------------------------------
# Embeddings


@dataclass
class Embedder:
    """A fitted prompt embedding: its spec (JSON), arrays (safetensors) and, for TF-IDF, the vocabulary."""

    spec: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    vocab: list[str] | None = None


_TFIDF = {"tfidf": {"analyzer": "word", "ngram_range": [1, 2]},
          "tfidf-char": {"analyzer": "char_wb", "ngram_range": [2, 5]}}


def fit_embedder(spec: str, prompts: list[str], cfg: RouterConfig) -> Embedder:
    """Fit the embedding named by `spec` on the training prompts (TF-IDF learns its vocabulary and idf; model
    and sentence-transformers embeddings only record where the model is, and a fingerprint of it)."""
    if spec in _TFIDF:
        from sklearn.feature_extraction.text import TfidfVectorizer

        # sublinear tf and min_df 2: a term once in the training prompts says nothing about other prompts
        params = {**_TFIDF[spec], "min_df": 2 if len(prompts) >= 50 else 1, "sublinear_tf": True,
                  "max_features": cfg.max_features}
        vec = TfidfVectorizer(analyzer=params["analyzer"], ngram_range=tuple(params["ngram_range"]),
                              min_df=params["min_df"], sublinear_tf=True, max_features=cfg.max_features)
        try:
            vec.fit(prompts)
        except ValueError as e:  # an empty vocabulary: prompts without a single word
            raise SlmforgeError(f"tfidf: cannot build a vocabulary from the training prompts ({e})") from None
        vocab = [""] * len(vec.vocabulary_)
        for term, i in vec.vocabulary_.items():
            vocab[i] = term
        return Embedder({"kind": "tfidf", **params}, {"tfidf.idf": vec.idf_.astype(np.float64)}, vocab)
    kind, _, where = spec.partition(":")
    path = Path(where).resolve()
    if kind == "model":
        from slmforge.io import file_sha256
        from slmforge.modeldir import ModelDir

        md = ModelDir.open(path)
        return Embedder({"kind": "model", "path": str(path), "max_tokens": cfg.max_tokens,
                         "weights_sha256": file_sha256(md.path / "model.safetensors")})
    _sentence_transformers(path)  # a clear error now, not after training
    return Embedder({"kind": "st", "path": str(path)})


def embed(emb: Embedder, prompts: list[str]):
    """The prompts' embedding matrix: scipy CSR (TF-IDF, rows L2-normalised) or a dense float array."""
    kind = emb.spec["kind"]
    if kind == "tfidf":
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.preprocessing import normalize

        # TfidfVectorizer.transform, rebuilt from the saved vocabulary and idf (nothing pickled)
        counts = CountVectorizer(analyzer=emb.spec["analyzer"], ngram_range=tuple(emb.spec["ngram_range"]),
                                 vocabulary={t: i for i, t in enumerate(emb.vocab)}, dtype=np.float64)
        x = counts.transform(prompts).tocsr()
        np.log(x.data, out=x.data)
        x.data += 1.0  # sublinear tf: 1 + log(count)
        x = x.multiply(emb.arrays["tfidf.idf"][None, :]).tocsr()
        return normalize(x, norm="l2", copy=False)
    if kind == "model":
        return _model_embeddings(emb, prompts)
    model = _sentence_transformers(Path(emb.spec["path"]))
    return np.asarray(model.encode(prompts, batch_size=32, normalize_embeddings=True, show_progress_bar=False),
                      dtype=np.float64)


def _sentence_transformers(path: Path):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise SlmforgeError("st:DIR embeddings need the optional package sentence-transformers "
                            "(pip install sentence-transformers), or use tfidf or model:DIR") from None
    if not path.is_dir():
        raise SlmforgeError(f"{path}: not a sentence-transformers model folder (no such folder)")
    return SentenceTransformer(str(path), device="cpu")


def _model_embeddings(emb: Embedder, prompts: list[str]) -> np.ndarray:
    """Mean of our model's final hidden states (after the last norm: what lm_head reads) over each prompt's
    tokens. Batches are padded on the right, which a causal model cannot see from the real tokens."""
    import torch

    from slmforge.io import file_sha256
    from slmforge.modeldir import ModelDir

    md = ModelDir.open(emb.spec["path"])
    if file_sha256(md.path / "model.safetensors") != emb.spec["weights_sha256"]:
        raise SlmforgeError(f"{md.path / 'model.safetensors'}: not the weights this router was trained on "
                            f"(its embeddings would differ); retrain the router")
    model, tok = md.load_model("cpu"), md.load_tokenizer()
    ctx = min(int(emb.spec["max_tokens"]), md.config.max_position_embeddings)
    # the tail of a long prompt: a question and its options come last
    ids = [tok.encode(p, bos=True)[-ctx:] for p in prompts]
    out = np.zeros((len(prompts), md.config.hidden_size))
    order = np.argsort([len(x) for x in ids])  # similar lengths together: less padding
    with torch.inference_mode():
        for start in range(0, len(order), 16):
            batch = order[start:start + 16]
            width = max(len(ids[i]) for i in batch)
            x = torch.zeros((len(batch), width), dtype=torch.long)
            valid = torch.zeros((len(batch), width, 1))
            for row, i in enumerate(batch):
                x[row, :len(ids[i])] = torch.tensor(ids[i])
                valid[row, :len(ids[i])] = 1
            h = model.hidden_states(x).float()
            out[batch] = ((h * valid).sum(1) / valid.sum(1)).numpy()
    return out


def _unit_rows(x):
    """Rows scaled to unit length (RouteLLM's OpenAI embeddings are; TF-IDF rows already are)."""
    if not isinstance(x, np.ndarray):
        return x
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def _dense(x, rows) -> np.ndarray:
    sub = x[rows]
    return sub.toarray() if hasattr(sub, "toarray") else np.asarray(sub)


# ---------------------------------------------------------------------------------------------------------
# Routers


@dataclass
class Router:
    """A trained router: its kind and settings, the fitted embedding, learned arrays and (once calibrated) the
    threshold: prompts scoring at least this go to the large model."""

    config: RouterConfig
    embedder: Embedder | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict = field(default_factory=dict)       # JSON-able facts scoring needs (classes, signal sign)
    threshold: float | None = None
    calibration: dict | None = None
    trained: dict = field(default_factory=dict)       # provenance: data, sizes, time

    @property
    def kind(self) -> str:
        return self.config.router


def strong_wins(data: Outcomes) -> np.ndarray:
    """1 where the large answer is better, 0 where the small one is, 0.5 for a tie: a tie counts as half a win
    each, as RouteLLM's Bradley-Terry fit counts ties (compute_elo_mle_with_tie)."""
    return 0.5 + 0.5 * np.sign(data.large - data.small)


def _labels(data: Outcomes, cfg: RouterConfig) -> np.ndarray:
    if cfg.target == "small_ok":
        return data.small >= cfg.good_enough
    if cfg.target == "large_wins":
        return data.large > data.small
    return np.sign(data.large - data.small).astype(int)


def train_router(train: Outcomes, cfg: RouterConfig, cache: dict | None = None) -> Router:
    """Fit the router `cfg.router` on the training outcomes. `cache` (any dict kept by the caller) reuses the
    fitted embedding and training matrix between routers trained on the same prompts (benchmarks)."""
    t0 = time.perf_counter()
    router = Router(cfg, trained={**train.summary(), "embedder": cfg.embedder})
    if cfg.router == "random":
        pass
    elif cfg.router == "cascade":
        if train.signal is None or train.signal_name != cfg.signal:
            raise SlmforgeError(f"{train.source}: the cascade router needs the signal field {cfg.signal!r} "
                                f"loaded with the data")
        kind = cfg.signal_kind
        if kind == "auto":
            kind = "uncertainty" if "entropy" in cfg.signal.lower() else "confidence"
        router.params["signal_kind"] = kind
    else:
        router.embedder, x = _train_features(train, cfg, cache)
        if cfg.router == "learned":
            router.arrays, router.params = _fit_classifier(x, _labels(train, cfg), cfg, train.source)
        elif cfg.router == "mf":
            router.arrays, router.params = _fit_mf(_unit_rows(x), train, cfg)
        else:  # sw: the training prompts are the model
            x = _unit_rows(x)
            router.arrays = {"sw.wins": strong_wins(train), **_matrix_arrays("sw.x", x)}
    router.trained["seconds"] = round(time.perf_counter() - t0, 2)
    return router


def _train_features(train: Outcomes, cfg: RouterConfig, cache: dict | None):
    key = (cfg.embedder, cfg.max_features, cfg.max_tokens, _fingerprint(train.prompts))
    if cache is not None and key in cache:
        return cache[key]
    emb = fit_embedder(cfg.embedder, train.prompts, cfg)
    out = (emb, embed(emb, train.prompts))
    if cache is not None:
        cache[key] = out
    return out


def _fingerprint(prompts: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in prompts:
        h.update(p.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def _fit_classifier(x, y: np.ndarray, cfg: RouterConfig, source: str) -> tuple[dict, dict]:
    """A scikit-learn classifier, kept as plain arrays (its weights) so that a router needs no pickle."""
    classes = np.unique(y)
    if len(classes) < 2:
        raise SlmforgeError(f"{source}: every training row has the same {cfg.target} label "
                            f"({classes[0].item()!r}): nothing for a classifier to learn")
    arrays: dict[str, np.ndarray] = {}
    if isinstance(x, np.ndarray):  # dense embeddings: standardised (TF-IDF is sparse and already scaled)
        mean, std = x.mean(0), x.std(0)
        std = np.where(std > 1e-12, std, 1.0)
        arrays |= {"scale.mean": mean, "scale.std": std}
        x = (x - mean) / std
    if cfg.classifier == "logreg":
        from sklearn.linear_model import LogisticRegression

        m = LogisticRegression(C=cfg.logreg_c, max_iter=5000).fit(x, y)
        arrays |= {"clf.w0": m.coef_.T.astype(np.float64), "clf.b0": m.intercept_.astype(np.float64)}
    else:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        m = MLPClassifier(hidden_layer_sizes=(cfg.hidden,), max_iter=cfg.epochs, early_stopping=True,
                          random_state=cfg.seed)
        with warnings.catch_warnings():  # early stopping ends most runs; hitting max_iter is fine too
            warnings.simplefilter("ignore", ConvergenceWarning)
            m.fit(x, y)
        for i, (w, b) in enumerate(zip(m.coefs_, m.intercepts_, strict=True)):
            arrays |= {f"clf.w{i}": w.astype(np.float64), f"clf.b{i}": b.astype(np.float64)}
    return arrays, {"classes": [c.item() for c in m.classes_], "layers": 1 if cfg.classifier == "logreg" else 2}


def _class_probs(router: Router, x) -> np.ndarray:
    """P(class) per row from the stored weights: relu hidden layers, then a sigmoid (two classes: one
    output, scikit-learn's convention) or a softmax."""
    a = router.arrays
    if "scale.mean" in a:
        x = (x - a["scale.mean"]) / a["scale.std"]
    n = router.params["layers"]
    for i in range(n):
        x = np.asarray(x @ a[f"clf.w{i}"]) + a[f"clf.b{i}"]
        if i < n - 1:
            x = np.maximum(x, 0.0)
    if x.shape[1] == 1:
        p = _sigmoid(x[:, 0])
        return np.stack([1.0 - p, p], axis=1)
    x = x - x.max(1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warnings for large |z|


def _fit_mf(x, train: Outcomes, cfg: RouterConfig) -> tuple[dict, dict]:
    """RouteLLM's matrix factorisation (routellm/routers/matrix_factorization): model m's score on prompt q is
    delta(m, q) = w2 . (v_m/|v_m| * (W1 q)), and P(m beats m' | q) = sigmoid(delta(m, q) - delta(m', q)). It is
    trained on the pairs with a winner (ties left out), winner first, to a label of 1 with binary
    cross-entropy, Gaussian noise of std `noise` added to the prompt embedding, Adam.

    With two models the factorisation scores a prompt by one vector: delta(large) - delta(small) =
    q . W1^T (w2 * (v_l/|v_l| - v_s/|v_s|)); that vector is what is kept (with v and w2, for the record)."""
    import torch
    import torch.nn.functional as F

    decisive = np.flatnonzero(train.large != train.small)
    if len(decisive) == 0:
        raise SlmforgeError(f"{train.source}: no training prompt where one model beat the other: nothing for "
                            f"matrix factorisation to learn")
    large_won = train.large[decisive] > train.small[decisive]
    gen = torch.Generator().manual_seed(cfg.seed)
    d = x.shape[1]
    models = torch.nn.Parameter(torch.randn(2, cfg.mf_dim, generator=gen))  # 0: small, 1: large
    proj = torch.nn.Parameter(torch.randn(cfg.mf_dim, d, generator=gen) / math.sqrt(d))
    w2 = torch.nn.Parameter(torch.randn(cfg.mf_dim, generator=gen) / math.sqrt(cfg.mf_dim))
    opt = torch.optim.Adam([models, proj, w2], lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    winner = torch.tensor(large_won.astype(np.int64))
    for _ in range(cfg.epochs):
        order = rng.permutation(len(decisive))
        for start in range(0, len(order), cfg.batch_size):
            b = order[start:start + cfg.batch_size]
            q = torch.from_numpy(_dense(x, decisive[b])).float()
            if cfg.noise > 0:
                q = q + torch.randn(q.shape, generator=gen) * cfg.noise  # RouteLLM: "to stabilise the training"
            v = F.normalize(models, dim=1)
            w, lose = winner[b], 1 - winner[b]
            logit = ((v[w] - v[lose]) * (q @ proj.T)) @ w2
            loss = F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        v = F.normalize(models, dim=1)
        u = (proj.T @ ((v[1] - v[0]) * w2)).double().numpy()
    return {"mf.u": u, "mf.models": models.detach().double().numpy(), "mf.w2": w2.detach().double().numpy()}, \
        {"pairs": int(len(decisive))}


def _matrix_arrays(prefix: str, x) -> dict[str, np.ndarray]:
    """A matrix as safetensors arrays: dense, or CSR's three arrays."""
    if isinstance(x, np.ndarray):
        return {f"{prefix}.dense": np.ascontiguousarray(x, dtype=np.float64)}
    x = x.tocsr()
    return {f"{prefix}.data": x.data.astype(np.float64), f"{prefix}.indices": x.indices.astype(np.int64),
            f"{prefix}.indptr": x.indptr.astype(np.int64), f"{prefix}.shape": np.asarray(x.shape, np.int64)}


def _matrix(arrays: dict, prefix: str):
    if f"{prefix}.dense" in arrays:
        return arrays[f"{prefix}.dense"]
    import scipy.sparse as sp

    shape = tuple(int(v) for v in arrays[f"{prefix}.shape"])
    return sp.csr_matrix((arrays[f"{prefix}.data"], arrays[f"{prefix}.indices"], arrays[f"{prefix}.indptr"]),
                         shape=shape)


def _sw_scores(router: Router, x) -> np.ndarray:
    """RouteLLM's similarity-weighted ranking (routellm/routers/routers.py, SWRankingRouter): training prompt
    i gets weight 10 * 10^(sim_i / max_j sim_j) (sim: cosine similarity to the routed prompt), a Bradley-Terry
    model with ties is fitted to the weighted battles, and the score is the large model's win rate under it.
    With two models that maximum-likelihood fit has a closed form: the weighted mean of the battles' outcomes
    (1 large won, 0.5 tie, 0 small won)."""
    memory, wins = _matrix(router.arrays, "sw.x"), router.arrays["sw.wins"]
    x = _unit_rows(x)
    out = np.empty(x.shape[0])
    for start in range(0, x.shape[0], 256):
        sims = x[start:start + 256] @ memory.T
        sims = sims.toarray() if hasattr(sims, "toarray") else np.asarray(sims)
        top = sims.max(1, keepdims=True)
        # a prompt sharing nothing with the training prompts: all weights equal (the overall win rate)
        rel = np.where(top > 0, sims / np.where(top > 0, top, 1.0), 0.0)
        weights = 10.0 * np.power(10.0, rel)
        out[start:start + 256] = (weights @ wins) / weights.sum(1)
    return out


def _random_scores(seed: int, prompts: list[str]) -> np.ndarray:
    """Uniform in [0, 1) from a hash of (seed, prompt): the same prompt gets the same score in every run, in
    any order, before and after saving (RouteLLM draws random.uniform per prompt)."""
    out = np.empty(len(prompts))
    for i, p in enumerate(prompts):
        h = hashlib.blake2b(f"{seed}\0{p}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") / 2**64
    return out


def router_scores(router: Router, prompts: list[str], signal: np.ndarray | list[float] | None = None,
                  cache: dict | None = None) -> np.ndarray:
    """How much each prompt needs the large model (higher: send it to the large one). The cascade needs the
    small model's confidence signal per prompt; the other routers only the prompts. `cache` (a dict the
    caller keeps, as for train_router) reuses the prompts' embeddings between routers sharing an embedder."""
    kind = router.kind
    if kind == "random":
        return _random_scores(router.config.seed, prompts)
    if kind == "cascade":
        if signal is None or len(signal) != len(prompts):
            raise SlmforgeError(f"the cascade router needs the small model's {router.config.signal!r} for every "
                                f"prompt")
        s = np.asarray(signal, dtype=float)
        # a cascade escalates the prompts the small model is least sure of
        return s if router.params["signal_kind"] == "uncertainty" else -s
    x = _embedded(router.embedder, list(prompts), cache)
    if kind == "learned":
        p = _class_probs(router, x)
        classes = router.params["classes"]
        col = {c: p[:, i] for i, c in enumerate(classes)}
        target = router.config.target
        if target == "small_ok":
            return 1.0 - col[True]
        if target == "large_wins":
            return col[True]
        zero = np.zeros(len(prompts))
        return col.get(1, zero) - col.get(-1, zero)
    if kind == "mf":
        return _sigmoid(np.asarray(_unit_rows(x) @ router.arrays["mf.u"]).ravel())
    return _sw_scores(router, x)


def _embedded(emb: Embedder, prompts: list[str], cache: dict | None):
    if cache is None:
        return embed(emb, prompts)
    key = ("embedded", id(emb), _fingerprint(prompts))  # the embedder lives in the cache (train_router)
    if key not in cache:
        cache[key] = (emb, embed(emb, prompts))  # holding emb keeps its id from being reused
    return cache[key][1]


def scores_for(router: Router, data: Outcomes, cache: dict | None = None) -> np.ndarray:
    """router_scores for the prompts of `data` (with its signal column, for the cascade)."""
    if router.kind == "cascade" and (data.signal is None or data.signal_name != router.config.signal):
        raise SlmforgeError(f"{data.source}: the cascade router needs the field {router.config.signal!r} (the "
                            f"small model's confidence) on every row")
    return router_scores(router, data.prompts, data.signal, cache)


def oracle_scores(data: Outcomes) -> np.ndarray:
    """What a router that knew the outcomes would score: the large model's gain on each prompt."""
    return data.large - data.small


def decide(router: Router, scores: np.ndarray) -> np.ndarray:
    """True where the prompt goes to the large model (score >= threshold)."""
    if router.threshold is None:
        raise SlmforgeError("the router has no threshold yet: calibrate it on validation data "
                            "(slmforge route calibrate ... --share X or --quality Y)")
    return np.asarray(scores) >= router.threshold


# ---------------------------------------------------------------------------------------------------------
# Metrics (RouteLLM's definitions: routellm/evals/evaluate.py, benchmarks.py)


def routed_quality(scores: np.ndarray, data: Outcomes, threshold: float) -> tuple[float, float]:
    """(share of large calls, mean quality) when prompts scoring >= threshold go to the large model."""
    sel = np.asarray(scores) >= threshold
    return float(sel.mean()), float(np.where(sel, data.large, data.small).mean())


def quality_curve(scores: np.ndarray, data: Outcomes, bins: int = 10) -> list[dict]:
    """RouteLLM's evaluation curve: thresholds at the bins+1 quantiles of the scores (0%, 10%, ..., 100% for
    10 bins, as pandas.qcut's edges); at each, the prompts scoring >= it go to the large model (> at the last,
    so that the curve reaches 0% of calls). Points sorted by share of large calls."""
    s = np.asarray(scores, dtype=float)
    if len(s) != len(data):
        raise SlmforgeError(f"{len(s)} scores for {len(data)} prompts")
    pts = []
    for i, t in enumerate(np.quantile(s, np.linspace(0, 1, bins + 1))):
        sel = s > t if i == bins else s >= t
        pts.append({"threshold": float(t), "share": float(sel.mean()),
                    "quality": float(np.where(sel, data.large, data.small).mean())})
    return sorted(pts, key=lambda p: (p["share"], p["quality"]))


def optimal_curve(data: Outcomes, points: int = 11) -> list[dict]:
    """RouteLLM's optimal router (get_optimal_accuracy): with share c of large calls, the prompts where the
    large model gains most get them, at most c * n."""
    gains = np.sort(np.clip(data.large - data.small, 0, None))[::-1]
    gained = np.concatenate([[0.0], np.cumsum(gains)])
    n, base = len(data), float(data.small.sum())
    out = []
    for c in np.linspace(0, 1, points):
        k = int(min(math.floor(c * n + 1e-9), n))
        out.append({"share": float(c), "quality": (base + gained[k]) / n})
    return out


def _gap(data: Outcomes) -> tuple[float, float]:
    q_small, q_large = float(data.small.mean()), float(data.large.mean())
    if abs(q_large - q_small) < 1e-12:
        raise SlmforgeError(f"{data.source}: the two models' mean qualities are equal ({q_small:.4f}): there is "
                            f"no performance gap to recover (PGR is undefined)")
    return q_small, q_large


def pgr(quality: float, data: Outcomes) -> float:
    """Performance gap recovered: (quality - small's) / (large's - small's)."""
    q_small, q_large = _gap(data)
    return (quality - q_small) / (q_large - q_small)


_pgr = pgr  # calibrate() takes a pgr= target


def apgr(curve: list[dict], data: Outcomes) -> float:
    """Average PGR: the trapezoid area under PGR against the share of large calls, over the shares the curve
    spans (0..1 for quality_curve), as RouteLLM's (AUC - weak AUC) / (strong AUC - weak AUC)."""
    x = np.array([p["share"] for p in curve])
    y = np.array([pgr(p["quality"], data) for p in curve])
    span = x[-1] - x[0]
    if span <= 0:
        raise SlmforgeError("the curve has a single share of large calls: no area to average over")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / span)


def cpt(curve: list[dict], data: Outcomes, x: float) -> float:
    """Call-performance threshold CPT(x): the share of large calls at which PGR first reaches x, linearly
    interpolated between curve points. RouteLLM computes np.interp(target quality, qualities, shares), which is
    the same while the curve rises; the first crossing stays defined where it dips."""
    pts = [(p["share"], pgr(p["quality"], data)) for p in curve]
    if pts[0][1] >= x:
        return pts[0][0]
    for (s0, g0), (s1, g1) in zip(pts, pts[1:], strict=False):
        if g1 >= x:
            return s0 + (x - g0) / (g1 - g0) * (s1 - s0) if g1 > g0 else s1
    return pts[-1][0]


def pgr_at(curve: list[dict], data: Outcomes, share: float) -> float:
    """PGR at a share of large calls, interpolated on the curve (0 at 0%, 1 at 100%)."""
    x = np.array([p["share"] for p in curve])
    y = np.array([pgr(p["quality"], data) for p in curve])
    return float(np.interp(share, x, y))


def curve_metrics(curve: list[dict], data: Outcomes) -> dict:
    """APGR, CPT(50%) and CPT(80%) of a curve, and the curve with PGR per point."""
    return {"apgr": apgr(curve, data), "cpt50": cpt(curve, data, 0.5), "cpt80": cpt(curve, data, 0.8),
            "curve": [{**p, "pgr": pgr(p["quality"], data)} for p in curve]}


def evaluate(scores: np.ndarray, data: Outcomes, threshold: float | None = None, bins: int = 10) -> dict:
    """RouteLLM's figures for one router's scores on `data`; with a threshold, also what it decides there."""
    q_small, q_large = _gap(data)
    out = {"rows": len(data), "small_quality": q_small, "large_quality": q_large,
           **curve_metrics(quality_curve(scores, data, bins), data)}
    if threshold is not None:
        share, quality = routed_quality(scores, data, threshold)
        out["at_threshold"] = {"threshold": threshold, "share": share, "quality": quality,
                               "pgr": pgr(quality, data), "quality_of_large": quality / q_large if q_large else None}
    return out


def random_baseline(data: Outcomes, seeds: int = 10, bins: int = 10) -> dict:
    """The random router's APGR and CPT(50%) on `data`, averaged over seeds (its expectation is 0.5 and 50%)."""
    runs = [curve_metrics(quality_curve(_random_scores(s, data.prompts), data, bins), data) for s in range(seeds)]
    return {"apgr": float(np.mean([r["apgr"] for r in runs])), "apgr_std": float(np.std([r["apgr"] for r in runs])),
            "cpt50": float(np.mean([r["cpt50"] for r in runs])), "cpt80": float(np.mean([r["cpt80"] for r in runs])),
            "seeds": seeds, "curve": runs[0]["curve"]}


def report(router: Router, data: Outcomes, cfg: EvalConfig | None = None) -> dict:
    """Everything `slmforge route eval` shows: the router's figures beside the random baseline and the
    optimal router on the same data."""
    cfg = cfg or EvalConfig()
    s = scores_for(router, data)
    opt = optimal_curve(data)
    return {"router": router.kind, "config": dataclasses.asdict(router.config), "data": data.summary(),
            "contaminated_file": data.contaminated_file, "bins": cfg.bins,
            "result": evaluate(s, data, router.threshold, cfg.bins),
            "random": random_baseline(data, cfg.random_seeds, cfg.bins),
            "optimal": {"apgr": apgr(opt, data), "curve": opt}, "calibration": router.calibration}


def format_report(rep: dict) -> str:
    """The eval report as a short table."""
    r, rnd = rep["result"], rep["random"]
    d = rep["data"]
    lines = [f"{d['rows']:,} prompts ({d['excluded_contaminated']} contaminated left out) · small quality "
             f"{r['small_quality']:.4f} · large quality {r['large_quality']:.4f}",
             f"{'router':<12} {'APGR':>7} {'CPT(50%)':>9} {'CPT(80%)':>9}",
             f"{rep['router']:<12} {r['apgr']:>7.4f} {r['cpt50']:>8.1%} {r['cpt80']:>8.1%}",
             f"{'random':<12} {rnd['apgr']:>7.4f} {rnd['cpt50']:>8.1%} {rnd['cpt80']:>8.1%}   (mean of "
             f"{rnd['seeds']} seeds)",
             f"{'optimal':<12} {rep['optimal']['apgr']:>7.4f}"]
    if "at_threshold" in r:
        t = r["at_threshold"]
        of_large = f" ({t['quality_of_large']:.1%} of large's)" if t["quality_of_large"] is not None else ""
        lines.append(f"at the calibrated threshold {t['threshold']:.6g}: {t['share']:.1%} large calls · quality "
                     f"{t['quality']:.4f}{of_large} · PGR {t['pgr']:.3f}")
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[dict]], data: Outcomes, path: str | Path, title: str = "") -> Path:
    """The cost-quality curve: quality against the share of large-model calls, one line per router, with the
    two models' own qualities as dashed lines (RouteLLM's plot). Written atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    q_small, q_large = _gap(data)
    fig = Figure(figsize=(7.5, 4.5), dpi=110)
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch
    ax = fig.add_subplot()
    for name, pts in curves.items():
        ax.plot([100 * p["share"] for p in pts], [p["quality"] for p in pts], marker=".", lw=1.2, label=name)
    ax.axhline(q_small, color="grey", ls="--", lw=1, label="small model")
    ax.axhline(q_large, color="red", ls="--", lw=1, label="large model")
    ax.set_xlabel("large-model calls (%)")
    ax.set_ylabel("quality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# Calibration: a threshold chosen on validation data, applied unchanged elsewhere


def _cut(desc: np.ndarray, k: int) -> float:
    """A threshold sending the k highest of these (descending) scores to the large model: halfway between the
    k-th and the next, so that unseen scores near the boundary are not decided by the exact validation values."""
    if k <= 0:
        return float(np.nextafter(desc[0], np.inf))
    if k >= len(desc) or desc[k - 1] == desc[k]:
        return float(desc[k - 1])
    return float((desc[k - 1] + desc[k]) / 2)


def threshold_for_share(scores: np.ndarray, share: float) -> float:
    """The threshold that sends `share` of these prompts to the large model (more if scores tie there)."""
    desc = np.sort(np.asarray(scores, dtype=float))[::-1]
    return _cut(desc, int(round(share * len(desc))))


def threshold_for_quality(scores: np.ndarray, data: Outcomes, quality: float) -> tuple[float, bool]:
    """The highest threshold (fewest large calls) at which the routed mean quality reaches `quality`; and
    whether it is reached at all (else every prompt goes to the large model)."""
    s = np.asarray(scores, dtype=float)
    order = np.argsort(-s, kind="stable")
    desc = s[order]
    n = len(s)
    # quality with the top k prompts sent to the large model, k = 0..n
    routed = (data.small.sum() + np.concatenate([[0.0], np.cumsum((data.large - data.small)[order])])) / n
    # only cuts between distinct scores can be made by a threshold
    k_ok = np.concatenate([[True], desc[:-1] != desc[1:], [True]])
    reached = np.flatnonzero(k_ok & (routed >= quality - 1e-12))
    if len(reached) == 0:
        return _cut(desc, n), False
    return _cut(desc, int(reached[0])), True


def calibrate(router: Router, val: Outcomes, share: float | None = None, quality: float | None = None,
              pgr: float | None = None, scores: np.ndarray | None = None) -> Router:
    """The router with its threshold chosen on validation data, for one target: a share of large calls, a
    fraction of the large model's quality, or a PGR. The validation figures are kept with it. `scores`: the
    router's scores on `val`, when the caller has them already."""
    given = {k: v for k, v in {"share": share, "quality": quality, "pgr": pgr}.items() if v is not None}
    if len(given) != 1:
        raise SlmforgeError("calibrate: give exactly one target (--share, --quality or --pgr)")
    s = scores_for(router, val) if scores is None else np.asarray(scores, dtype=float)
    reached = True
    if share is not None:
        t = threshold_for_share(s, share)
    else:
        q_small, q_large = _gap(val)
        target = quality * q_large if quality is not None else q_small + given["pgr"] * (q_large - q_small)
        t, reached = threshold_for_quality(s, val, target)
    v_share, v_quality = routed_quality(s, val, t)
    cal = {"target": given, "reached": reached, "threshold": t, "val_rows": len(val), "val_source": val.source,
           "val_share": v_share, "val_quality": v_quality, "val_pgr": _pgr(v_quality, val)}
    return dataclasses.replace(router, threshold=t, calibration=cal)


# ---------------------------------------------------------------------------------------------------------
# Saving and loading


def save_router(router: Router, out: str | Path) -> Path:
    """Write the router folder atomically (a temp folder renamed into place). An existing folder is replaced
    only if it is a router folder: a typo in --out must not delete a directory of something else."""
    from safetensors.numpy import save_file

    from slmforge import __version__

    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / ROUTER_FILE).is_file():
        raise SlmforgeError(f"{out}: exists and is not a router folder (no {ROUTER_FILE}); choose another --out")
    meta = {"format": FORMAT, "version": 1, "slmforge": __version__, "kind": router.kind,
            "config": dataclasses.asdict(router.config), "params": router.params, "threshold": router.threshold,
            "calibration": router.calibration, "trained": router.trained,
            "embedder": router.embedder.spec if router.embedder else None}
    arrays = {**router.arrays, **({f"emb.{k}": v for k, v in router.embedder.arrays.items()} if router.embedder else {})}

    def fill(tmp: Path) -> None:
        write_json(tmp / ROUTER_FILE, meta)
        if arrays:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / ARRAYS_FILE))
        if router.embedder and router.embedder.vocab is not None:
            (tmp / VOCAB_FILE).write_text(json.dumps(router.embedder.vocab, ensure_ascii=False), encoding="utf-8")

    return write_dir_atomically(out, fill)


def load_router(path: str | Path) -> Router:
    """A router folder written by save_router; a missing or damaged file is one error naming it."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not (path / ROUTER_FILE).is_file():
        raise SlmforgeError(f"{path}: not a router folder (no {ROUTER_FILE})")
    meta = read_json(path / ROUTER_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SlmforgeError(f"{path / ROUTER_FILE}: not a slmforge router (format {FORMAT!r} expected)")
    cfg = build(RouterConfig, meta.get("config"), where=path / ROUTER_FILE)
    arrays: dict[str, np.ndarray] = {}
    if (path / ARRAYS_FILE).is_file():
        try:
            arrays = load_file(str(path / ARRAYS_FILE))
        except (SafetensorError, OSError, ValueError) as e:
            raise SlmforgeError(f"{path / ARRAYS_FILE}: cannot read ({e})") from None
    embedder = None
    if meta.get("embedder"):
        vocab = None
        if meta["embedder"].get("kind") == "tfidf":
            try:
                vocab = json.loads((path / VOCAB_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise SlmforgeError(f"{path / VOCAB_FILE}: cannot read ({e})") from None
        embedder = Embedder(meta["embedder"], {k[4:]: v for k, v in arrays.items() if k.startswith("emb.")}, vocab)
    router = Router(cfg, embedder, {k: v for k, v in arrays.items() if not k.startswith("emb.")},
                    meta.get("params") or {}, meta.get("threshold"), meta.get("calibration"), meta.get("trained") or {})
    _check_arrays(router, path)
    return router


def _check_arrays(router: Router, path: Path) -> None:
    """A router folder with a file missing fails here, by name, not as a KeyError while scoring."""
    need = {"learned": ["clf.w0", "clf.b0"], "mf": ["mf.u"], "sw": ["sw.wins"]}.get(router.kind, [])
    if router.kind in ("learned", "mf", "sw") and router.embedder is None:
        raise SlmforgeError(f"{path / ROUTER_FILE}: a {router.kind} router without its embedder")
    if router.embedder is not None and router.embedder.spec.get("kind") == "tfidf":
        if "tfidf.idf" not in router.embedder.arrays or router.embedder.vocab is None:
            raise SlmforgeError(f"{path}: the TF-IDF vocabulary or idf is missing ({ARRAYS_FILE}, {VOCAB_FILE})")
    missing = [k for k in need if k not in router.arrays]
    if missing:
        raise SlmforgeError(f"{path / ARRAYS_FILE}: missing array {missing[0]!r}")


def describe(router: Router) -> str:
    """One line for the CLI: what the router is and how it was trained."""
    c, t = router.config, router.trained
    what = {"random": "random", "cascade": f"cascade on {c.signal} ({router.params.get('signal_kind')})",
            "learned": f"learned ({c.classifier}, target {c.target}) on {c.embedder}",
            "mf": f"matrix factorisation (dim {c.mf_dim}) on {c.embedder}",
            "sw": f"similarity-weighted ranking on {c.embedder}"}[router.kind]
    line = f"{what} · trained on {t.get('rows', 0):,} prompts"
    if router.threshold is not None and router.calibration:
        cal = router.calibration
        target = ", ".join(f"{k} {v}" for k, v in cal["target"].items())
        line += (f" · threshold {router.threshold:.6g} for {target}: on validation {cal['val_share']:.1%} large "
                 f"calls, PGR {cal['val_pgr']:.3f}" + ("" if cal["reached"] else " (target not reached)"))
    return line
