"""The educational-value classifier of Phi-1 (Gunasekar et al. 2023) and FineWeb-Edu (Penedo et al. 2024):
a teacher LM grades a sample of documents 0-5, a linear head on embeddings learns the grades, and the
head then scores the whole corpus cheaply.

    annotate        ask a teacher (any `slmforge.lm` spec) with the additive 5-point prompt, parse
                    "Educational score: N"; appends to a JSONL and resumes where it stopped
    load_labels     or take grades from a file (JSONL, CSV or TSV): id -> score
    embed_texts     mean-pooled final hidden states of a slmforge / HF-Llama model directory, a
                    sentence-transformers directory, or `hashing[:N]` (bag of words, no model)
    train_classifier  standardised embeddings -> ridge regression, seeded held-out split, MSE and
                    precision/recall/F1 of "score >= threshold", confusion matrix of rounded scores
    load_classifier, score_documents, filter_by_score   apply it: adds `edu_score` to each document

A classifier directory holds classifier.json (embedder, threshold, metrics, a checksum of the weights)
and classifier.npz (feature mean and scale, ridge coefficients): no pickles, so loading one is safe.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slmforge.errors import SlmforgeError
from slmforge.io import atomic_write_bytes, read_json, write_json

# ------------------------------------------------------------------------------------------ prompt

# FineWeb-Edu's additive rubric (appendix F.1 of the FineWeb paper), reworded. The teacher sees the
# first `max_chars` characters of the document; FineWeb-Edu showed its teacher the first 1,000.
EDU_PROMPT = """\
Here is an extract from a web page. Judge whether it has high educational value, that is whether it \
could be used to teach at primary to grade school level, with the additive 5-point scheme below. \
Points add up; award each one only if its condition holds:

- 1 point if the extract gives some basic information relevant to an educational topic, even if it \
also contains irrelevant or non-academic material such as advertisements or promotion.
- A 2nd point if it addresses elements that matter for education but does not align closely with \
educational standards: it may mix educational content with non-educational material, give only a \
superficial overview, or be disorganised or incoherent.
- A 3rd point if it suits educational use and introduces key concepts relevant to school curricula. \
It is coherent, though possibly incomplete or containing extraneous information; it may read like an \
introductory textbook section or a basic tutorial, suitable for learning but with notable limitations, \
such as treating concepts too complex for grade school students.
- A 4th point if it is highly relevant and beneficial for teaching at grade school level, with a \
clear, consistent writing style, like a chapter of a textbook or a tutorial. It offers substantial \
educational content, including exercises and solutions, with little irrelevant information, and the \
concepts are not too advanced for grade school students. The content is coherent, focused and \
valuable for structured learning.
- A 5th point if it is outstanding for teaching at primary or grade school level: detailed reasoning, \
writing that is easy to follow, and deep, thorough insight into the subject, free of non-educational \
or overly complex content.

The extract:
{text}

After reading the extract:
- Justify your total score briefly, in at most 100 words.
- End with the score in the format "Educational score: <total points>"."""

SCORE_RE = re.compile(r"educational\s+score\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def edu_prompt(text: str, max_chars: int = 1000) -> str:
    return EDU_PROMPT.format(text=text[:max_chars])


def parse_edu_score(reply: str) -> int | None:
    """The last "Educational score: N" in a reply, as an int 0-5; None when absent or out of range."""
    found = SCORE_RE.findall(reply or "")
    if not found:
        return None
    value = float(found[-1])
    return int(value) if value.is_integer() and 0 <= value <= 5 else None


# ---------------------------------------------------------------------------------------- annotate


@dataclass
class AnnotateResult:
    out: Path
    teacher: str
    asked: int = 0  # documents sent to the teacher in this run
    scored: int = 0  # of those, with a parsed score
    failed: int = 0  # unparseable replies or failed requests (recorded with score null)
    skipped: int = 0  # already in the output file
    usage: dict = field(default_factory=dict)  # this run's requests, tokens and cost


def _done_ids(out: Path, retry_failed: bool) -> set[str]:
    """Ids already in an annotation file. A torn last line (a run killed mid-write) is cut off."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        with open(out, "r+b") as f:
            f.truncate(len(data))
    done = set()
    for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rid = str(rec["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SlmforgeError(f"{out}:{lineno}: not an annotation record (expected JSON with an 'id'); "
                                f"remove the line or write to a new file") from None
        if rec.get("score") is not None or not retry_failed:
            done.add(rid)
    return done


def _ask(lm, prompts: list[str], params) -> list[tuple[str | None, str | None]]:
    """(reply, error) per prompt: one request per prompt, so a failed request costs one document and
    never re-asks the others. Concurrent through the LM's own pool (OpenAILM.map) when it has one."""
    def one(prompt: str) -> tuple[str | None, str | None]:
        try:
            return lm.chat([[{"role": "user", "content": prompt}]], params)[0], None
        except SlmforgeError as e:
            return None, str(e)

    mapper = getattr(lm, "map", None)
    return list(mapper(one, prompts)) if callable(mapper) else [one(p) for p in prompts]


def annotate(docs: Iterable[dict], teacher, out: str | Path, id_field: str = "id", text_field: str = "text",
             max_chars: int = 1000, batch_size: int = 32, max_new_tokens: int = 256, temperature: float = 0.0,
             retry_failed: bool = False, keep_text: bool = True, max_consecutive_errors: int = 8,
             progress: bool = True, **lm_kw) -> AnnotateResult:
    """Grade documents 0-5 with a teacher LM (an `open_lm` spec or an LM object), appending one record
    per document to the JSONL `out`:

        {"id", "score": 0-5 or null, "teacher", "reply", "error"?, "text"?}

    Ids already in `out` are skipped, so an interrupted run resumes (failed ones are asked again with
    retry_failed). The file is appended a batch at a time and fsynced, and a torn last line is cut off
    on the next run; totals and the teacher's usage and cost accumulate in `<out stem>.summary.json`.
    `max_consecutive_errors` failed requests in a row (after the LM's own retries) stop the run with
    the last error: a wrong URL, key or model name, not a bad document."""
    from slmforge.infer.engine import SamplingParams
    from slmforge.lm import open_lm

    out = Path(out)
    lm = open_lm(teacher, **lm_kw) if isinstance(teacher, (str, Path)) else teacher
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    done = _done_ids(out, retry_failed)
    result = AnnotateResult(out=out, teacher=lm.name)
    usage_before = lm.usage.to_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    errors_in_a_row = 0

    def batches() -> Iterator[list[tuple[str, str]]]:
        batch = []
        for i, doc in enumerate(docs):
            if id_field not in doc:
                raise SlmforgeError(f"document {i + 1}: no {id_field!r} field (set id_field)")
            if not isinstance(doc.get(text_field), str):
                raise SlmforgeError(f"document {i + 1} (id {doc[id_field]}): no text in field {text_field!r}")
            rid = str(doc[id_field])
            if rid in done:
                result.skipped += 1
                continue
            done.add(rid)  # a repeated id in the input is asked once
            batch.append((rid, doc[text_field]))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    with open(out, "a", encoding="utf-8") as f:
        for batch in _progress(batches(), "annotating", progress):
            answers = _ask(lm, [edu_prompt(t, max_chars) for _, t in batch], params)
            lines = []
            for (rid, text), (reply, err) in zip(batch, answers, strict=True):
                errors_in_a_row = errors_in_a_row + 1 if err else 0
                if errors_in_a_row >= max_consecutive_errors:
                    f.write("".join(lines))  # keep what this batch got before stopping
                    raise SlmforgeError(f"teacher {lm.name}: {errors_in_a_row} requests in a row failed; "
                                        f"last: {err}")
                score = parse_edu_score(reply) if reply is not None else None
                rec = {"id": rid, "score": score, "teacher": lm.name, "reply": (reply or "")[:2000]}
                if score is None:
                    rec["error"] = f"request failed: {err}" if err else "unparseable reply"
                if keep_text:
                    rec["text"] = text
                lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
                result.asked += 1
                result.scored += int(score is not None)
                result.failed += int(score is None)
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())

    after = lm.usage.to_dict()
    result.usage = {k: round(after[k] - usage_before.get(k, 0), 6) for k in after
                    if isinstance(after[k], (int, float)) and not k.startswith("price")}
    _update_summary(out, result)
    return result


def _update_summary(out: Path, r: AnnotateResult) -> None:
    path = out.with_suffix(".summary.json")
    s = read_json(path) if path.is_file() else {"teachers": [], "runs": 0, "asked": 0, "scored": 0,
                                                  "failed": 0, "usage": {}}
    if r.teacher not in s["teachers"]:
        s["teachers"].append(r.teacher)
    s["runs"] += 1
    for k in ("asked", "scored", "failed"):
        s[k] += getattr(r, k)
    for k, v in r.usage.items():
        s["usage"][k] = round(s["usage"].get(k, 0) + v, 6)
    write_json(path, s)


# ------------------------------------------------------------------------------------------ labels


def load_labels(path: str | Path, id_field: str = "id", score_field: str = "score") -> dict[str, float]:
    """id -> score from a JSONL (e.g. annotate's output), CSV or TSV file. Records whose score is null
    or empty (failed annotations) are left out; a later record for an id replaces an earlier one."""
    path = Path(path)
    if not path.is_file():
        raise SlmforgeError(f"{path}: no such file")
    labels: dict[str, float] = {}

    def take(lineno: int, rec: dict) -> None:
        if id_field not in rec:
            raise SlmforgeError(f"{path}:{lineno}: no {id_field!r} field")
        if score_field not in rec:
            raise SlmforgeError(f"{path}:{lineno}: no {score_field!r} field")
        raw = rec[score_field]
        if raw is None or raw == "":
            return
        try:
            score = float(raw)
        except (TypeError, ValueError):
            raise SlmforgeError(f"{path}:{lineno}: {score_field} {raw!r} is not a number") from None
        if not 0 <= score <= 5:
            raise SlmforgeError(f"{path}:{lineno}: {score_field} {score} is outside 0-5")
        labels[str(rec[id_field])] = score

    text = _read_text(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        for rec in reader:
            take(reader.line_num, rec)
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SlmforgeError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise SlmforgeError(f"{path}:{lineno}: expected a JSON object")
            take(lineno, rec)
    if not labels:
        raise SlmforgeError(f"{path}: no labelled records (fields {id_field!r}, {score_field!r})")
    return labels


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise SlmforgeError(f"{path}:{line}: not valid UTF-8") from None


def labelled_texts(docs: Iterable[dict], labels: dict[str, float], id_field: str = "id",
                   text_field: str = "text") -> tuple[list[str], list[float]]:
    """Join documents with labels by id: (texts, scores) of the documents that have a label."""
    texts, scores = [], []
    for doc in docs:
        rid = str(doc.get(id_field))
        if rid in labels and isinstance(doc.get(text_field), str):
            texts.append(doc[text_field])
            scores.append(labels[rid])
    return texts, scores


# -------------------------------------------------------------------------------------- embeddings


def embedder_kind(spec: str) -> str:
    """'hashing', 'sentence-transformers' or 'llama' for an embedder spec; SlmforgeError if none fits."""
    if spec == "hashing" or spec.startswith("hashing:"):
        return "hashing"
    p = Path(spec)
    if not p.is_dir():
        raise SlmforgeError(f"embedder {spec!r}: not a directory (a model directory, a sentence-transformers "
                            f"directory), nor hashing[:N]")
    if (p / "modules.json").is_file() or (p / "config_sentence_transformers.json").is_file():
        return "sentence-transformers"
    if (p / "config.json").is_file() and (p / "tokenizer.json").is_file():
        return "llama"
    raise SlmforgeError(f"embedder {spec!r}: neither a model directory (config.json + tokenizer.json) nor a "
                        f"sentence-transformers directory (modules.json)")


class Embedder:
    """A loaded embedding model, called on a list of texts: (n, dim) float32.

    llama: our decoder (any slmforge or HF LlamaForCausalLM directory), final hidden states after the
    last norm, averaged over the real tokens (bos included, padding excluded), under bf16 autocast.
    sentence-transformers: that library's `encode` (imported only when used).
    hashing[:N]: l2-normalised counts of hashed unigrams and bigrams in N buckets (default 4096), a
    model-free bag-of-words baseline."""

    def __init__(self, spec: str | Path, batch_size: int = 16, max_tokens: int = 512, device: str | None = None,
                 autocast: bool = True):
        self.spec = str(spec)
        self.kind = embedder_kind(self.spec)
        self.batch_size, self.max_tokens, self.autocast = batch_size, max_tokens, autocast
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.kind == "hashing":
            from sklearn.feature_extraction.text import HashingVectorizer

            n = int(self.spec.partition(":")[2] or 4096)
            self.vectorizer = HashingVectorizer(n_features=n, ngram_range=(1, 2), alternate_sign=False, norm="l2")
        elif self.kind == "sentence-transformers":
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise SlmforgeError(f"embedder {self.spec}: a sentence-transformers model needs the "
                                    f"sentence-transformers package (pip install sentence-transformers)") from None
            self.st = SentenceTransformer(self.spec, device=self.device)
        else:
            from slmforge.modeldir import ModelDir

            md = ModelDir.open(self.spec)
            self.model = md.load_model(self.device)
            self.tokenizer = md.load_tokenizer()

    def __call__(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        if self.kind == "hashing":
            return self.vectorizer.transform(texts).toarray().astype(np.float32)
        if self.kind == "sentence-transformers":
            return np.asarray(self.st.encode(texts, batch_size=self.batch_size, show_progress_bar=progress,
                                             convert_to_numpy=True), dtype=np.float32)
        return self._embed_llama(texts, progress)

    @torch.inference_mode()
    def _embed_llama(self, texts: list[str], progress: bool) -> np.ndarray:
        tok, model = self.tokenizer, self.model
        max_len = min(self.max_tokens, model.config.max_position_embeddings)
        pad = tok.pad_id if tok.pad_id is not None else 0
        ids = [(x or [tok.bos_id if tok.bos_id is not None else pad])[:max_len]
               for x in tok.encode_batch(texts, bos=True)]
        # longest first: batches of similar length waste little on padding
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = np.zeros((len(ids), model.config.hidden_size), dtype=np.float32)
        starts = range(0, len(order), self.batch_size)
        dev_type = "cuda" if str(self.device).startswith("cuda") else "cpu"
        for s in _progress(starts, "embedding", progress, total=len(starts)):
            rows = order[s:s + self.batch_size]
            T = max(len(ids[i]) for i in rows)
            x = torch.full((len(rows), T), pad, dtype=torch.long)
            for r, i in enumerate(rows):
                x[r, :len(ids[i])] = torch.tensor(ids[i])
            mask = (torch.arange(T)[None, :] < torch.tensor([len(ids[i]) for i in rows])[:, None]).float()
            x, mask = x.to(self.device), mask.to(self.device)
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=self.autocast):
                h = model.hidden_states(x).float()
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            out[rows] = pooled.cpu().numpy()
        return out


def embed_texts(texts: Sequence[str], embedder: str | Path | Embedder, batch_size: int = 16,
                max_tokens: int = 512, progress: bool = True) -> np.ndarray:
    """(len(texts), dim) float32 embeddings; `embedder` is a spec (see Embedder) or a loaded Embedder."""
    if not isinstance(embedder, Embedder):
        embedder = Embedder(embedder, batch_size=batch_size, max_tokens=max_tokens)
    return embedder(texts, progress=progress)


def _progress(it, what: str, enabled: bool, total: int | None = None):
    if not enabled:
        return it
    from rich.console import Console
    from rich.progress import track

    return track(it, description=what, total=total, console=Console(stderr=True), transient=True)


# -------------------------------------------------------------------------------------- classifier

ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


@dataclass
class EduClassifier:
    """Standardised embeddings -> ridge regression -> score clipped to 0-5."""

    embedder: str
    threshold: float
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    alpha: float = 1.0
    max_tokens: int = 512
    metrics: dict = field(default_factory=dict)
    _loaded: Embedder | None = field(default=None, repr=False, compare=False)

    def embedder_model(self, batch_size: int = 16) -> Embedder:
        if self._loaded is None:
            self._loaded = Embedder(self.embedder, batch_size=batch_size, max_tokens=self.max_tokens)
        return self._loaded

    def predict_embeddings(self, X: np.ndarray) -> np.ndarray:
        if X.shape[1] != self.coef.shape[0]:
            raise SlmforgeError(f"classifier expects {self.coef.shape[0]}-dim embeddings, got {X.shape[1]} "
                                f"(a different embedder than {self.embedder}?)")
        return np.clip(((X - self.mean) / self.scale) @ self.coef + self.intercept, 0.0, 5.0)

    def predict(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        return self.predict_embeddings(self.embedder_model()(list(texts), progress=progress))


def _fit_ridge(X: np.ndarray, y: np.ndarray, alphas: Sequence[float], standardize: bool = True
               ) -> tuple[np.ndarray, ...]:
    from sklearn.linear_model import RidgeCV

    mean = X.mean(0)
    scale = X.std(0) if standardize else np.ones(X.shape[1])
    scale[scale < 1e-8] = 1.0  # constant features: leave them at zero instead of dividing by 0
    # alpha chosen by efficient leave-one-out on the training split only
    ridge = RidgeCV(alphas=tuple(alphas)).fit((X - mean) / scale, y)
    return mean, scale, ridge.coef_.astype(np.float64), float(ridge.intercept_), float(ridge.alpha_)


def evaluate(y_true: Sequence[float], y_pred: Sequence[float], threshold: float = 3) -> dict:
    """Regression MSE/MAE; precision, recall and F1 of `score >= threshold`; accuracy and confusion
    matrix (rows true, columns predicted, labels 0-5) of scores rounded to integers."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    yt, yp = np.asarray(y_true, dtype=float), np.clip(np.asarray(y_pred, dtype=float), 0, 5)
    p, r, f1, _ = precision_recall_fscore_support(yt >= threshold, yp >= threshold, average="binary",
                                                  zero_division=0)
    rt, rp = np.rint(yt).astype(int), np.rint(yp).astype(int)
    return {"n": int(len(yt)), "positives": int((yt >= threshold).sum()),
            "mse": round(float(np.mean((yt - yp) ** 2)), 4), "mae": round(float(np.mean(np.abs(yt - yp))), 4),
            "precision": round(float(p), 4), "recall": round(float(r), 4), "f1": round(float(f1), 4),
            "accuracy_rounded": round(float(np.mean(rt == rp)), 4),
            "confusion_rounded": confusion_matrix(rt, rp, labels=list(range(6))).tolist()}


def train_classifier(texts: Sequence[str], scores: Sequence[float], embedder: str | Path | Embedder,
                     out_dir: str | Path | None, threshold: float = 3, val_fraction: float = 0.2,
                     seed: int = 0, alphas: Sequence[float] = ALPHAS, batch_size: int = 16,
                     max_tokens: int = 512, progress: bool = True) -> EduClassifier:
    """Embed, hold out `val_fraction` (seeded, stratified on score >= threshold), fit ridge on the rest,
    measure both splits and save to `out_dir` (unless None). The saved head is the one measured: it is
    not refitted on the held-out documents."""
    from sklearn.model_selection import train_test_split

    if len(texts) != len(scores):
        raise SlmforgeError(f"train_classifier: {len(texts)} texts but {len(scores)} scores")
    y = np.asarray(scores, dtype=float)
    if len(y) < 10:
        raise SlmforgeError(f"train_classifier: {len(y)} labelled documents; need at least 10")
    if y.min() < 0 or y.max() > 5:
        raise SlmforgeError("train_classifier: scores must lie in 0-5")
    if not 0 < val_fraction < 1:
        raise SlmforgeError("train_classifier: val_fraction must be between 0 and 1")
    emb = embedder if isinstance(embedder, Embedder) else Embedder(embedder, batch_size, max_tokens)
    X = emb(list(texts), progress=progress)
    positive = y >= threshold
    stratify = positive if min(positive.sum(), (~positive).sum()) >= 2 else None
    idx_tr, idx_va = train_test_split(np.arange(len(y)), test_size=val_fraction, random_state=seed,
                                      stratify=stratify)
    # Dense embeddings are standardised (their dimensions have unrelated scales). Hashed bag-of-words
    # counts are only centred: dividing by each bucket's spread would blow up the rarest words
    # (F1 0.50 vs 1.00 on 30 documents per source of the edu_sample set).
    mean, scale, coef, intercept, alpha = _fit_ridge(X[idx_tr], y[idx_tr], alphas,
                                                     standardize=emb.kind != "hashing")
    spec = emb.spec if emb.kind == "hashing" else str(Path(emb.spec).resolve())
    clf = EduClassifier(embedder=spec, threshold=float(threshold), mean=mean, scale=scale, coef=coef,
                        intercept=intercept, alpha=alpha, max_tokens=emb.max_tokens, _loaded=emb)
    clf.metrics = {"train": evaluate(y[idx_tr], clf.predict_embeddings(X[idx_tr]), threshold),
                   "val": evaluate(y[idx_va], clf.predict_embeddings(X[idx_va]), threshold),
                   "alpha": alpha, "seed": seed, "val_fraction": val_fraction, "dim": int(X.shape[1])}
    if out_dir is not None:
        save_classifier(clf, out_dir)
    return clf


def save_classifier(clf: EduClassifier, out_dir: str | Path) -> Path:
    """classifier.npz, then classifier.json (with the npz's sha256), each written atomically."""
    out_dir = Path(out_dir)
    buf = io.BytesIO()
    np.savez(buf, mean=clf.mean, scale=clf.scale, coef=clf.coef, intercept=np.array([clf.intercept]))
    weights = buf.getvalue()
    atomic_write_bytes(out_dir / "classifier.npz", weights)
    write_json(out_dir / "classifier.json", {
        "format": "slmforge-edu-classifier-1", "embedder": clf.embedder, "embedder_kind": embedder_kind(clf.embedder),
        "max_tokens": clf.max_tokens, "threshold": clf.threshold, "alpha": clf.alpha, "dim": int(clf.coef.shape[0]),
        "weights_sha256": hashlib.sha256(weights).hexdigest(), "metrics": clf.metrics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return out_dir


def load_classifier(path: str | Path) -> EduClassifier:
    """A classifier directory written by train_classifier; the embedder is checked now, loaded on first use."""
    path = Path(path)
    meta = read_json(path / "classifier.json")
    for k in ("embedder", "threshold", "weights_sha256"):
        if k not in meta:
            raise SlmforgeError(f"{path / 'classifier.json'}: no {k!r} field")
    npz = path / "classifier.npz"
    if not npz.is_file():
        raise SlmforgeError(f"{npz}: missing")
    data = npz.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["weights_sha256"]:
        raise SlmforgeError(f"{npz}: does not match classifier.json (checksum differs; retrain or restore it)")
    embedder_kind(meta["embedder"])  # fail now on a moved or missing embedder
    with np.load(io.BytesIO(data), allow_pickle=False) as w:
        return EduClassifier(embedder=meta["embedder"], threshold=float(meta["threshold"]), mean=w["mean"],
                             scale=w["scale"], coef=w["coef"], intercept=float(w["intercept"][0]),
                             alpha=float(meta.get("alpha", 1.0)), max_tokens=int(meta.get("max_tokens", 512)),
                             metrics=meta.get("metrics", {}))


def score_documents(docs: Iterable[dict], clf: EduClassifier | str | Path, text_field: str = "text",
                    batch_size: int = 64, progress: bool = False) -> Iterator[dict]:
    """Yield each document (a copy) with `edu_score` (0-5, 3 decimals) and `edu_int_score` (rounded),
    FineWeb-Edu's score and int_score; embeds `batch_size` documents at a time."""
    clf = clf if isinstance(clf, EduClassifier) else load_classifier(clf)
    batch: list[dict] = []

    def flush() -> Iterator[dict]:
        for i, doc in enumerate(batch):
            if not isinstance(doc.get(text_field), str):
                raise SlmforgeError(f"document {doc.get('id', i)}: no text in field {text_field!r}")
        preds = clf.predict([d[text_field] for d in batch])
        for doc, s in zip(batch, preds, strict=True):
            yield {**doc, "edu_score": round(float(s), 3), "edu_int_score": int(np.rint(s))}

    for doc in _progress(docs, "scoring", progress):
        batch.append(doc)
        if len(batch) == batch_size:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def filter_by_score(docs: Iterable[dict], min_score: float = 3, clf: EduClassifier | str | Path | None = None,
                    text_field: str = "text") -> Iterator[dict]:
    """Keep documents with edu_score >= min_score; scores them first with `clf` when given."""
    if clf is not None:
        docs = score_documents(docs, clf, text_field=text_field)
    for i, doc in enumerate(docs):
        if "edu_score" not in doc:
            raise SlmforgeError(f"document {doc.get('id', i + 1)}: no edu_score (score it first, or pass clf)")
        if doc["edu_score"] >= min_score:
            yield doc
