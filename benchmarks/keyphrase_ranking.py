"""How a tagger's O/B/I probabilities become ranked keyphrases, compared on the inspec recipe's val split.

    python benchmarks/keyphrase_ranking.py runs/recipes/inspec/variants/pretrained-tagger/model \
        --data runs/recipes/inspec/data --out benchmarks/results/keyphrase_ranking.json

Two rankings of the same probabilities (one forward pass per document):
  argmax spans   the rule slmforge used until 2026-12-06: spans of tokens whose argmax tag is B/I, ranked by
                 their mean P(B or I), topped up to k with the best untagged runs of 1-3 words
  span prob      slmforge.infer.predict.decode_keyphrases: every run of 1-5 words, ranked by the probability
                 of tagging exactly that span (B, I..., then not I), as a geometric mean
With --ensemble MODEL..., the same rankings of the mean probabilities of several taggers are added.
Only val is scored here: the recipe scores test once per variant with the ranking chosen on val.
"""

from __future__ import annotations

import argparse
import json
from bisect import bisect_left, bisect_right
from itertools import accumulate
from pathlib import Path

import torch

from slmforge.evaluate.tasks import keyphrase_metrics, stem_phrase
from slmforge.infer.predict import _WORD, decode_keyphrases
from slmforge.io import read_jsonl
from slmforge.train.heads import load_tagger, tag_probs
from slmforge.train.rows import tag_text


def argmax_spans(text: str, offsets: list[tuple[int, int]], probs: torch.Tensor, k: int = 10) -> list[str]:
    """The earlier rule: argmax-tagged spans by mean P(B or I), then the best untagged 1-3-word runs."""
    tags = probs.argmax(-1).tolist()
    cum = [0.0, *accumulate((probs[:, 1] + probs[:, 2]).tolist())]
    starts, ends = [o[0] for o in offsets], [o[1] for o in offsets]

    def scored(s: int, e: int):
        while s < e and not text[s].isalnum():
            s += 1
        while e > s and not text[e - 1].isalnum():
            e -= 1
        while 0 < s < e and text[s - 1].isalnum():
            s -= 1
        while s < e < len(text) and text[e].isalnum():
            e += 1
        a, b = bisect_right(ends, s), bisect_left(starts, e)
        return (s, e, text[s:e], (cum[b] - cum[a]) / (b - a)) if s < e and b > a else None

    spans, i = [], 0
    while i < len(tags):
        if tags[i] == 0:
            i += 1
            continue
        j = i + 1
        while j < len(tags) and tags[j] == 2:
            j += 1
        if (sp := scored(starts[i], ends[j - 1])) is not None:
            spans.append(sp)
        i = j
    best: dict[str, tuple[float, str]] = {}
    for _, _, phrase, score in spans:
        st = stem_phrase(phrase)
        if st and (st not in best or score > best[st][0]):
            best[st] = (score, phrase)
    ranked = [p for _, p in sorted(best.values(), key=lambda x: -x[0])]
    if len(ranked) < k:
        taken = [(s, e) for s, e, _, _ in spans]
        words = [m.span() for m in _WORD.finditer(text) if m.end() <= ends[-1]]
        cands = []
        for a in range(len(words)):
            for b in range(a, min(a + 3, len(words))):
                if b > a and text[words[b - 1][1]:words[b][0]].strip():
                    break
                if (sp := scored(words[a][0], words[b][1])) is not None:
                    cands.append(sp)
        for s, e, phrase, _ in sorted(cands, key=lambda c: -c[3]):
            st = stem_phrase(phrase)
            if st in best or any(s < te and e > ts for ts, te in taken):
                continue
            taken.append((s, e))
            best[st] = (0.0, phrase)
            ranked.append(phrase)
            if len(ranked) >= k:
                break
    return ranked[:k]


def score(preds: list[list[str]], gold: list[list[str]]) -> dict:
    m = keyphrase_metrics(preds, gold)
    return {k: round(m[k], 2) for k in ("macro_f1@10", "micro_f1@10", "macro_f1@5", "micro_f1@5")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a tagger model dir (finetune --task tag)")
    ap.add_argument("--data", required=True, help="the recipe's data folder (val.jsonl)")
    ap.add_argument("--ensemble", nargs="*", default=[], help="more tagger dirs: their mean probabilities too")
    ap.add_argument("--out", default="benchmarks/results/keyphrase_ranking.json")
    args = ap.parse_args()
    rows = list(read_jsonl(Path(args.data) / "val.jsonl"))
    texts, gold = [tag_text("val", r) for r in rows], [r["keyphrases"] for r in rows]
    probs = []
    for md in [args.model, *args.ensemble]:
        model, tok, info = load_tagger(md)
        with torch.no_grad():
            probs.append(tag_probs(model, tok, texts, info["seq_len"], 16))
    result = {"split": "val", "documents": len(rows), "model": args.model, "ensemble": args.ensemble, "rows": []}
    sets = [("one tagger", probs[:1])] + ([(f"mean of {len(probs)} taggers", probs)] if args.ensemble else [])
    for name, ps in sets:
        mean = [(ps[0][i][0], sum(p[i][1] for p in ps) / len(ps)) for i in range(len(texts))]
        for rank_name, fn in (("argmax spans", lambda t, o, p: argmax_spans(t, o, p)),
                              ("span prob", lambda t, o, p: [ph for ph, _ in decode_keyphrases(t, o, p)])):
            preds = [fn(t, o, p) for t, (o, p) in zip(texts, mean, strict=True)]
            result["rows"].append({"taggers": name, "ranking": rank_name, **score(preds, gold)})
            print(name, rank_name, result["rows"][-1])
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
