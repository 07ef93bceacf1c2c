"""A TF-IDF n-gram baseline for the inspec recipe, scored with the recipe's own keyphrase metric.

    python benchmarks/keyphrase_baseline.py runs/recipes/inspec     # after `slmforge run inspec`

Candidates: runs of 1-3 words inside a clause with no stopword in them (no part-of-speech filter); score:
term frequency in the abstract x log inverse document frequency over the training abstracts, multi-word
phrases up-weighted; the top 10 distinct stems. The reference point the tagger variants are read against.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter
from pathlib import Path

from slmforge.evaluate.tasks import keyphrase_metrics, stem_phrase
from slmforge.io import read_jsonl

STOP = set("""a an the of and or in on for to with by from as at is are was were be been this that these those which
we our it its their there than then also such can may not into over under between using based new two one paper
approach method methods results result used use show shows shown present presented proposed propose""".split())


def candidates(text: str) -> list[str]:
    out = []
    for clause in re.split(r"[.,;:()\[\]\"!?\n]", text):
        words = re.findall(r"[A-Za-z][A-Za-z0-9-]*", clause)
        for i in range(len(words)):
            for n in (1, 2, 3):
                gram = words[i:i + n]
                if len(gram) == n and not any(w.lower() in STOP for w in gram):
                    out.append(" ".join(gram))
    return out


def tfidf_keyphrases(train_texts: list[str], texts: list[str], k: int = 10) -> list[list[str]]:
    """The top k distinct-stem candidates of each text by tf x log idf over train_texts (multi-word up-weighted)."""
    df = Counter()
    for t in train_texts:
        df.update({stem_phrase(c) for c in candidates(t)})
    out = []
    for t in texts:
        cands = candidates(t)
        tf = Counter(stem_phrase(c) for c in cands)
        surface: dict[str, str] = {}
        for c in cands:
            surface.setdefault(stem_phrase(c), c)
        score = {s: tf[s] * math.log((len(train_texts) + 1) / (df[s] + 1)) * (1 + 0.5 * (len(s.split()) - 1))
                 for s in tf}
        out.append([surface[s] for s in sorted(score, key=lambda s: -score[s])][:k])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the inspec recipe's run folder (its data/ is read)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "keyphrase_baseline.json")
    args = ap.parse_args()
    train, test = (list(read_jsonl(args.run / "data" / f"{s}.jsonl")) for s in ("train", "test"))
    preds = tfidf_keyphrases([r["prompt"] for r in train], [r["prompt"] for r in test])
    m = keyphrase_metrics(preds, [r["keyphrases"] for r in test])
    result = {"run": str(args.run), "train_docs": len(train), "test_docs": len(test),
              **{k: round(m[k], 2) for k in ("macro_f1@5", "macro_f1@10", "micro_f1@5", "micro_f1@10")}}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
