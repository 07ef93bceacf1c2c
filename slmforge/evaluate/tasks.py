"""Task metrics: plain functions from predictions and references to a dict of named figures.

    classification   accuracy, macro-F1, per-class precision/recall/F1, confusion matrix
    binary           precision, recall, F1 of the positive class (anomaly detection)
    translation      corpus BLEU and chrF (sacrebleu, its default 13a tokenisation)
    summarization    ROUGE-1/2/L F-measure (rouge-score, Porter stemming), averaged over examples
    qa               SQuAD exact match and token F1 (lowercase, no punctuation, no articles), max over golds
    keyphrase        P/R/F1@5, @10 and @M (all predictions), Porter-stemmed exact match, micro and macro
    log_parsing      grouping accuracy of a log parser (Zhu et al. 2019), template agreement

Every figure is on a 0-100 scale (percent; BLEU and chrF are 0-100 by definition), so one report
table reads the same whatever the task; counts (n, support, confusion) are plain integers.

`evaluate_predictions(task, predictions, references)` reads JSONL files (or lists of dicts), lines
them up by "id" (or by line order when there are no ids) and dispatches to the metric; this is what
`slmforge eval-task` calls.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from slmforge.errors import SlmforgeError
from slmforge.io import read_jsonl_lines


def _pct(num: float, den: float) -> float:
    """num/den as a percentage; 0 when den is 0 (sklearn's zero_division=0)."""
    return 100.0 * num / den if den else 0.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def _same_length(a: Sequence, b: Sequence, what: str) -> None:
    if len(a) != len(b):
        raise SlmforgeError(f"{what}: {len(a)} predictions but {len(b)} references")


# ---------------------------------------------------------------------------------------------------------
# Classification


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str],
                           labels: Sequence[str] | None = None) -> dict:
    """Accuracy, macro-F1 over `labels`, per-class P/R/F1/support and the confusion matrix
    (rows true, columns predicted, in `labels` order).

    labels defaults to the sorted union of true and predicted values (as sklearn). Given explicitly,
    a prediction outside it (a model's "Positive!" or "I think") counts as wrong for its example and is
    reported in `invalid`; macro-F1 stays an average over the given classes only.
    """
    _same_length(y_pred, y_true, "classification")
    if not y_true:
        raise SlmforgeError("classification: no examples")
    labels = list(labels) if labels is not None else sorted(set(y_true) | set(y_pred))
    index = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted({t for t in y_true if t not in index})
    if unknown:
        raise SlmforgeError(f"classification: reference labels {unknown} are not in labels {labels}")
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_true, y_pred = list(y_true), list(y_pred)
    # with labels given, sklearn leaves a prediction outside them out of every cell and counts it against
    # its example's recall and the accuracy: the `invalid` semantics above
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = {lab: {"precision": 100.0 * float(p[i]), "recall": 100.0 * float(r[i]), "f1": 100.0 * float(f[i]),
                       "support": int(support[i])} for i, lab in enumerate(labels)}
    return {
        "n": len(y_true),
        "accuracy": 100.0 * float(accuracy_score(y_true, y_pred)),
        "macro_f1": sum(c["f1"] for c in per_class.values()) / len(labels),
        "invalid": sum(1 for x in y_pred if x not in index),
        "labels": labels,
        "per_class": per_class,
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def binary_metrics(y_true: Sequence, y_pred: Sequence, positive="anomalous") -> dict:
    """Precision, recall and F1 of the positive class (anomaly detection: positive = anomalous),
    with the counts behind them. Anything that is not `positive` counts as negative."""
    _same_length(y_pred, y_true, "binary")
    if not y_true:
        raise SlmforgeError("binary: no examples")
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    t = [y == positive for y in y_true]
    p = [y == positive for y in y_pred]
    tn, fp, fn, tp = (int(x) for x in confusion_matrix(t, p, labels=[False, True]).ravel())
    precision, recall, f1, _ = precision_recall_fscore_support(t, p, average="binary", zero_division=0)
    return {"n": len(y_true), "precision": 100.0 * float(precision), "recall": 100.0 * float(recall),
            "f1": 100.0 * float(f1), "accuracy": _pct(tp + tn, len(y_true)), "tp": tp, "fp": fp, "fn": fn,
            "tn": tn, "positive": positive}


# ---------------------------------------------------------------------------------------------------------
# Generation: translation, summarization


def _reference_streams(refs: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str | None]]:
    """One reference per hypothesis, or a list per hypothesis (any number): sacrebleu wants streams,
    stream j holding every hypothesis's j-th reference, None where a hypothesis has fewer."""
    if all(isinstance(r, str) for r in refs):
        return [list(refs)]
    width = max(len(r) for r in refs)
    if width == 0:
        raise SlmforgeError("translation: every reference list is empty")
    return [[r[j] if j < len(r) else None for r in refs] for j in range(width)]


def translation_metrics(hyps: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]],
                        tokenize: str | None = None) -> dict:
    """Corpus-level BLEU and chrF with sacrebleu (signatures included so a figure can be reproduced).
    tokenize: sacrebleu's BLEU tokeniser ("13a" default; "zh", "ja-mecab", "intl", ...)."""
    import sacrebleu

    _same_length(hyps, refs, "translation")
    if not hyps:
        raise SlmforgeError("translation: no examples")
    streams = _reference_streams(refs)
    bleu = sacrebleu.BLEU(**({"tokenize": tokenize} if tokenize else {}))
    chrf = sacrebleu.CHRF()
    b = bleu.corpus_score(list(hyps), streams)
    c = chrf.corpus_score(list(hyps), streams)
    return {"n": len(hyps), "bleu": b.score, "chrf": c.score, "bleu_bp": b.bp,
            "bleu_precisions": list(b.precisions), "hyp_len": b.sys_len, "ref_len": b.ref_len,
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


def summarization_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measure per example (rouge-score, Porter stemmer), averaged."""
    from rouge_score import rouge_scorer

    _same_length(predictions, references, "summarization")
    if not predictions:
        raise SlmforgeError("summarization: no examples")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = Counter()
    for pred, ref in zip(predictions, references, strict=True):
        for name, s in scorer.score(ref, pred).items():  # score(target, prediction)
            totals[name] += s.fmeasure
    return {"n": len(predictions), **{name: 100.0 * totals[name] / len(predictions)
                                      for name in ("rouge1", "rouge2", "rougeL")}}


# ---------------------------------------------------------------------------------------------------------
# Extraction / QA (the SQuAD v1.1/v2.0 evaluation script's normalisation)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:  # SQuAD v2: an empty answer scores 1 only against an empty answer
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> dict:
    """Exact match and token F1 per example, each the best over that example's gold answers, averaged."""
    _same_length(predictions, references, "qa")
    if not predictions:
        raise SlmforgeError("qa: no examples")
    em = f1 = 0.0
    for pred, golds in zip(predictions, references, strict=True):
        golds = [golds] if isinstance(golds, str) else list(golds) or [""]
        em += max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        f1 += max(_token_f1(pred, g) for g in golds)
    n = len(predictions)
    return {"n": n, "exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


# ---------------------------------------------------------------------------------------------------------
# Keyphrases (Meng et al. 2017; Chan et al. 2019: stem, deduplicate, fixed-k denominators)

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


@lru_cache(maxsize=1)
def _stemmer():
    # nltk is a dependency of rouge-score, so it is there whenever rouge-score is; rouge-score's own
    # tokenizer only stems words longer than 3 characters, the keyphrase literature stems every word.
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


@lru_cache(maxsize=200_000)
def stem_phrase(phrase: str) -> str:
    """Lowercase, split on anything not a letter or digit (so "linear-phase" = "linear phase"),
    Porter-stem each word: two keyphrases match when their stemmed forms are equal."""
    stem = _stemmer().stem
    return " ".join(stem(w) for w in _NON_ALNUM.split(phrase.lower()) if w)


def _unique_stems(phrases: Sequence[str]) -> list[str]:
    """Stemmed phrases, first occurrence kept, empty ones dropped (a duplicate is not a second hit)."""
    seen, out = set(), []
    for ph in phrases:
        s = stem_phrase(ph)
        if s and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def split_keyphrases(text: str) -> list[str]:
    """A generated keyphrase list "a; b; c" (or one per line, or comma separated when there is no
    semicolon) as a list of phrases, in order."""
    sep = ";" if ";" in text else ("\n" if "\n" in text.strip() else ",")
    return [p.strip() for p in text.split(sep) if p.strip()]


def keyphrase_metrics(predictions: Sequence[Sequence[str]], gold: Sequence[Sequence[str]],
                      ks: Sequence[int] = (5, 10)) -> dict:
    """Precision, recall and F1 at k for each k, and at M (all predictions), against gold keyphrases.

    Both sides are stemmed and deduplicated; predictions keep their ranked order. P@k divides by k
    (a model that gives fewer than k phrases is not rewarded for it), R@k by the number of gold
    phrases. macro_* averages per-document figures, micro_* pools the counts of all documents.
    Documents with no gold keyphrase are left out (recall is undefined) and counted in `no_gold`.
    """
    _same_length(predictions, gold, "keyphrase")
    cutoffs = {f"@{k}": k for k in ks} | {"@M": None}
    macro = defaultdict(float)
    hits, pred_n, gold_n = Counter(), Counter(), 0
    docs = no_gold = 0
    for preds, golds in zip(predictions, gold, strict=True):
        g = set(_unique_stems(golds))
        if not g:
            no_gold += 1
            continue
        docs += 1
        gold_n += len(g)
        ranked = _unique_stems(preds)
        for name, k in cutoffs.items():
            top = ranked if k is None else ranked[:k]
            h = sum(1 for s in top if s in g)
            denom = len(ranked) if k is None else k
            p, r = _pct(h, denom), _pct(h, len(g))
            macro[f"p{name}"] += p
            macro[f"r{name}"] += r
            macro[f"f1{name}"] += _f1(p, r)
            hits[name] += h
            pred_n[name] += denom
    out = {"n": docs, "no_gold": no_gold}
    for name in cutoffs:
        p, r = _pct(hits[name], pred_n[name]), _pct(hits[name], gold_n)
        out |= {f"micro_p{name}": p, f"micro_r{name}": r, f"micro_f1{name}": _f1(p, r)}
        for m in ("p", "r", "f1"):
            out[f"macro_{m}{name}"] = macro[f"{m}{name}"] / docs if docs else 0.0
    return out


# ---------------------------------------------------------------------------------------------------------
# Log parsing


def log_parsing_metrics(predicted: Sequence[str], gold: Sequence[str]) -> dict:
    """Grouping accuracy (loghub's parsing accuracy, Zhu et al. 2019): a line counts as parsed right
    when the set of lines its predicted template groups it with is exactly its gold event's set of
    lines. template_agreement: lines whose predicted template string equals the gold template."""
    _same_length(predicted, gold, "log_parsing")
    if not gold:
        raise SlmforgeError("log_parsing: no lines")
    by_pred, by_gold = defaultdict(set), defaultdict(set)
    for i, (p, g) in enumerate(zip(predicted, gold, strict=True)):
        by_pred[p].add(i)
        by_gold[g].add(i)
    grouped = sum(len(lines) for lines in by_pred.values() if by_gold[gold[next(iter(lines))]] == lines)
    same = sum(1 for p, g in zip(predicted, gold, strict=True) if p == g)
    return {"n": len(gold), "grouping_accuracy": _pct(grouped, len(gold)),
            "template_agreement": _pct(same, len(gold)), "predicted_templates": len(by_pred),
            "gold_templates": len(by_gold)}


# ---------------------------------------------------------------------------------------------------------
# From files: `slmforge eval-task`

TASKS = ("classification", "binary", "translation", "summarization", "qa", "keyphrase")
_ALIASES = {"anomaly": "binary", "extraction": "qa", "mt": "translation", "summarisation": "summarization"}
# The reference field each task reads by default: what the slmforge.data.tasks loaders write.
# qa reads SQuAD-style "answers" (a list) and falls back to "completion".
REF_FIELDS = {"classification": "label", "binary": "label", "translation": "completion",
              "summarization": "completion", "qa": "answers", "keyphrase": "keyphrases"}


def match_label(text: str, labels: Sequence[str]) -> str:
    """A generated answer as one of `labels`: the label it starts with (case and punctuation aside),
    else the stripped text itself (which then counts as invalid). "Positive." -> "positive"."""
    t = text.strip().lower()
    for lab in sorted(labels, key=len, reverse=True):  # "no" must not shadow "not sure"
        if t.startswith(lab.lower()) and (len(t) == len(lab) or not t[len(lab)].isalnum()):
            return lab
    return text.strip()


_LINE = "__slmforge_line__"  # where a row read from a file came from, for the errors about its fields


def _rows(src: str | Path | Sequence[dict], what: str) -> tuple[list[dict], str]:
    if isinstance(src, (str, Path)):
        return [{**obj, _LINE: lineno} for lineno, obj in read_jsonl_lines(src)], str(src)
    return list(src), what


def _pair_up(preds: list[dict], refs: list[dict], pname: str, rname: str) -> list[tuple[dict, dict]]:
    """Line predictions up with references by "id" when both carry ids, else by position."""
    if preds and refs and all("id" in r for r in preds) and all("id" in r for r in refs):
        by_id = {str(r["id"]): r for r in refs}
        if len(by_id) != len(refs):
            raise SlmforgeError(f"{rname}: duplicate ids")
        missing = [str(p["id"]) for p in preds if str(p["id"]) not in by_id]
        if missing:
            raise SlmforgeError(f"{pname}: ids not in {rname}: {', '.join(missing[:5])}")
        if len(preds) != len(by_id):
            raise SlmforgeError(f"{pname}: {len(preds)} predictions for {len(by_id)} references in {rname}")
        return [(p, by_id[str(p["id"])]) for p in preds]
    if len(preds) != len(refs):
        raise SlmforgeError(f"{pname}: {len(preds)} predictions but {len(refs)} references in {rname} "
                            f"(and no ids to line them up)")
    return list(zip(preds, refs, strict=True))


def _field(row: dict, names: Sequence[str], where: str, i: int, kinds: str = "any"):
    """The first of `names` in the row, checked to be a string ("str"), a string or a list of strings
    ("strs"), a string or an integer label ("label"), or anything ("any"): a reference of the wrong type
    would otherwise end in a TypeError deep in a metric (or, turned into text, a silently wrong score)."""
    for name in names:
        if name in row:
            v = row[name]
            strs = isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) for x in v)
            ok = {"any": True, "str": isinstance(v, str), "strs": strs, "strs1": strs and v != [],
                  "label": isinstance(v, str) or isinstance(v, int) and not isinstance(v, bool)}[kinds]
            if not ok:
                want = {"str": "a string", "strs": "a string or a list of strings",
                        "strs1": "a string or a non-empty list of strings", "label": "a string or an integer"}[kinds]
                got = "null" if v is None else type(v).__name__
                raise SlmforgeError(f"{where}:{row.get(_LINE, i + 1)}: field {name!r} is not {want} (got {got})")
            return v
    raise SlmforgeError(f"{where}:{row.get(_LINE, i + 1)}: no field {names[0]!r}")


def evaluate_predictions(task: str, predictions: str | Path | Sequence[dict],
                         references: str | Path | Sequence[dict] | None = None, *,
                         pred_field: str = "prediction", ref_field: str | None = None,
                         labels: Sequence[str] | None = None, positive: str = "anomalous",
                         ks: Sequence[int] = (5, 10), tokenize: str | None = None) -> dict:
    """Score a predictions JSONL against a references JSONL (a slmforge.data.tasks test file), or against the
    `ref_field` of the prediction rows themselves when references is None.

    Predictions are strings (`pred_field`); for keyphrase they may be a list or a "a; b; c" string.
    Classification predictions are mapped onto the label set first (match_label)."""
    task = _ALIASES.get(task, task)
    if task not in TASKS:
        raise SlmforgeError(f"unknown task {task!r}: one of {', '.join(TASKS)}")
    if task == "translation" and tokenize is not None:
        import sacrebleu

        if tokenize not in sacrebleu.BLEU.TOKENIZERS:  # else a KeyError from sacrebleu after the files are read
            raise SlmforgeError(f"--tokenize {tokenize!r}: not a sacrebleu tokenizer; choose one of "
                                f"{', '.join(sacrebleu.BLEU.TOKENIZERS)}")
    if task == "keyphrase" and ks and min(ks) < 1:  # a negative k would slice from the end
        raise SlmforgeError(f"--ks {','.join(map(str, ks))}: cutoffs must be integers >= 1")
    ref_fields = [ref_field] if ref_field else [REF_FIELDS[task]] + (["completion"] if task == "qa" else [])
    preds, pname = _rows(predictions, "predictions")
    if references is None:
        pairs, rname = [(p, p) for p in preds], pname
    else:
        refs, rname = _rows(references, "references")
        pairs = _pair_up(preds, refs, pname, rname)
    if not pairs:
        raise SlmforgeError(f"{pname}: no predictions")
    hyp = [_field(p, [pred_field], pname, i, "strs" if task == "keyphrase" else "str")
           for i, (p, _) in enumerate(pairs)]
    # (translation: every example needs a reference; sacrebleu fails on an empty list)
    ref_kind = {"classification": "label", "binary": "label", "summarization": "str",
                "translation": "strs1"}.get(task, "strs")
    ref = [_field(r, ref_fields, rname, i, ref_kind) for i, (_, r) in enumerate(pairs)]

    if task == "classification":
        labels = list(labels) if labels else sorted(set(map(str, ref)))
        result = classification_metrics([str(r) for r in ref], [match_label(h, labels) for h in hyp], labels)
    elif task == "binary":
        ref_labels = sorted(set(map(str, ref)) | {positive})
        result = binary_metrics([str(r) for r in ref], [match_label(h, ref_labels) for h in hyp], positive)
    elif task == "translation":
        result = translation_metrics([h.strip() for h in hyp], [_strip(r) for r in ref], tokenize)
    elif task == "summarization":
        result = summarization_metrics(hyp, [str(r) for r in ref])
    elif task == "qa":
        result = qa_metrics(hyp, ref)
    else:
        pred_lists = [h if isinstance(h, list) else split_keyphrases(str(h)) for h in hyp]
        gold_lists = [r if isinstance(r, list) else split_keyphrases(str(r)) for r in ref]
        result = keyphrase_metrics(pred_lists, gold_lists, ks)
    return {"task": task, **result}


def _strip(ref):
    return ref.strip() if isinstance(ref, str) else [r.strip() for r in ref]
