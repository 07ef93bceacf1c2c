"""Educational-value classifier and quality filter on real text, offline.

    python benchmarks/edu_classifier.py                    # ~2 minutes on one CPU thread

Labels come from the SOURCE of each document (slmforge/data/edu_sample.py), not from annotators or a
teacher: PubMedQA and Inspec abstracts score 4, DialogSum dialogues, Shakespeare passages and
TinyStories paragraphs 1, HDFS log lines 0. "F1 at threshold 3" therefore measures how well a linear
head on each embedding separates expository scientific text from dialogue, fiction and logs: a
proxy for educational value, easier than grading web pages.

Classifier: `--n` documents per source are embedded and split 80/20 by train_classifier (its "val"
figures); a further disjoint `--n-test` per source is scored with the saved classifier ("test").
Embedders compared:
    hashing          bag of hashed unigrams and bigrams (no model)
    stories260K      llama2.c's TinyStories model, imported (260K parameters, trained on stories only)
    tiny-trained     a ~0.5M-parameter Llama pretrained here for `--pretrain-steps` on documents of the
                     same sources that appear in neither split
    tiny-random      the same model before training (what the pretraining adds)

Quality filter: the real documents plus injected junk (random symbols, repeated lines, cookie /
javascript / lorem-ipsum boilerplate, code with braces), default QualityConfig; documents kept per kind
and removals per rule.
"""

from __future__ import annotations

import argparse
import platform
import random
import string
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from slmforge.config import ModelConfig
from slmforge.convert.llama2c import import_llama2c
from slmforge.data.edu import Embedder, evaluate, score_documents, train_classifier
from slmforge.data.edu_sample import SOURCES, source_labelled_sample
from slmforge.data.quality import QualityConfig, QualityStats, quality_reasons
from slmforge.io import write_json
from slmforge.model import LlamaModel
from slmforge.modeldir import save_model_dir
from slmforge.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
console = Console(width=140)


# ------------------------------------------------------------------------------------ tiny embedder


def tiny_model_dir(texts: list[str], out: Path, steps: int, seed: int = 0) -> tuple[Path, Path, dict]:
    """Train a tokenizer and pretrain a tiny Llama on `texts`; save it before and after training."""
    tok = train_tokenizer(texts, vocab_size=1024)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=96, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaModel(cfg)
    random_dir = save_model_dir(out / "tiny-random", model, tok, {"stage": "benchmark-random-init"})
    ids = np.array([i for t in texts for i in tok.encode(t, bos=True)], dtype=np.int64)
    T, B = 128, 16
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        for g in opt.param_groups:  # linear warmup, then cosine decay
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 30) * 0.5 * (1 + np.cos(np.pi * step / steps))
        starts = rng.integers(0, len(ids) - T - 1, B)
        x = torch.from_numpy(np.stack([ids[s:s + T] for s in starts]))
        y = torch.from_numpy(np.stack([ids[s + 1:s + T + 1] for s in starts]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    trained_dir = save_model_dir(out / "tiny-trained", model, tok, {"stage": "benchmark-pretrain"})
    info = {"params": cfg.n_params, "tokens": int(len(ids)), "steps": steps, "batch": B, "seq_len": T,
            "first_loss": round(float(np.mean(losses[:10])), 3), "last_loss": round(float(np.mean(losses[-10:])), 3),
            "seconds": round(time.perf_counter() - t0, 1)}
    return random_dir, trained_dir, info


# ---------------------------------------------------------------------------------------- junk docs


def junk_documents(real: list[str], n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    sentences = [s.strip() + "." for t in real for s in t.split(". ") if 40 < len(s) < 200]
    out = []
    for _ in range(n):
        chars = string.ascii_letters + string.digits + string.punctuation * 3
        out.append({"kind": "random_symbols",
                    "text": " ".join("".join(rng.choice(chars) for _ in range(rng.randint(2, 9)))
                                     for _ in range(rng.randint(80, 250)))})
        line = rng.choice(sentences)
        body = [rng.choice(sentences) for _ in range(rng.randint(2, 5))] + [line] * rng.randint(6, 20)
        rng.shuffle(body)
        out.append({"kind": "repeated_lines", "text": "\n".join(body)})
        boiler = ["Home | About us | Contact | Shop | Blog", "This website uses cookies to improve your experience.",
                  "Please enable JavaScript in your browser to view this page.",
                  "By continuing you accept our Privacy Policy and Terms of Use.",
                  "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
                  "Sign up for our newsletter!", "Copyright 2024. All rights reserved."]
        page = rng.sample(boiler, rng.randint(3, len(boiler))) + [rng.choice(sentences) for _ in range(3)]
        rng.shuffle(page)
        out.append({"kind": "boilerplate", "text": "\n".join(page)})
        fn = rng.choice(["render", "update", "fetchData", "init"])
        code = [f"function {fn}(items, options) {{", "  const out = [];",
                "  for (let i = 0; i < items.length; i++) {", "    if (items[i].ok) { out.push(items[i]); }",
                "  }", f"  return {{ result: out, n: out.length, id: {rng.randint(0, 999)} }};", "}"]
        out.append({"kind": "code", "text": "\n".join(code * rng.randint(1, 4))})
    return out


def quality_benchmark(docs: list[dict], cfg: QualityConfig) -> dict:
    stats = QualityStats()
    kinds: dict[str, Counter] = {}
    first_rule: dict[str, Counter] = {}
    t0 = time.perf_counter()
    for d in docs:
        reasons = quality_reasons(d["text"], cfg)
        stats.add(d["text"], reasons)
        kinds.setdefault(d["kind"], Counter())["kept" if not reasons else "removed"] += 1
        if reasons:
            first_rule.setdefault(d["kind"], Counter())[reasons[0]] += 1
    seconds = time.perf_counter() - t0
    s = stats.to_dict()
    return {"docs": len(docs), "seconds": round(seconds, 3), "docs_per_second": round(len(docs) / seconds),
            "kept": s["kept"], "removed": s["removed"], "removed_by": s["removed_by"], "failed": s["failed"],
            "per_kind": {k: dict(v) for k, v in kinds.items()},
            "per_kind_removed_by": {k: dict(v.most_common()) for k, v in first_rule.items()},
            "examples": {k: [e[:120] for e in v[:1]] for k, v in s["examples"].items()}}


# -------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--n", type=int, default=120, help="labelled documents per source (80/20 train/val)")
    ap.add_argument("--n-test", type=int, default=40, help="further held-out documents per source")
    ap.add_argument("--n-pretrain", type=int, default=90, help="documents per source to pretrain the tiny model")
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--junk", type=int, default=50, help="junk documents of each kind")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "edu_classifier.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for rel in ("medical/pubmedqa_ori_pqal.json", "keyphrase/Inspec.zip", "tinystories/stories260K.bin"):
        if not (args.data / rel).exists():
            raise SystemExit(f"{args.data / rel}: missing; this benchmark needs ../shared/data")

    labelled = source_labelled_sample(args.data, n_per_source=args.n, seed=args.seed)
    test = source_labelled_sample(args.data, n_per_source=args.n_test, seed=args.seed, skip=args.n)
    pretrain = source_labelled_sample(args.data, n_per_source=args.n_pretrain, seed=args.seed,
                                      skip=args.n + args.n_test)
    assert not {d["id"] for d in labelled} & ({d["id"] for d in test} | {d["id"] for d in pretrain})
    texts, scores = [d["text"] for d in labelled], [d["score"] for d in labelled]

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        console.print(f"pretraining the tiny embedder on {len(pretrain)} documents...")
        random_dir, trained_dir, pretrain_info = tiny_model_dir([d["text"] for d in pretrain], tmp,
                                                                args.pretrain_steps, args.seed)
        s260k = import_llama2c(args.data / "tinystories" / "stories260K.bin",
                               args.data / "tinystories" / "tok512.bin", tmp / "stories260K")
        embedders = {"hashing": "hashing", "stories260K": s260k, "tiny-trained": trained_dir,
                     "tiny-random": random_dir}
        for name, spec in embedders.items():
            t0 = time.perf_counter()
            emb = Embedder(spec, batch_size=16, max_tokens=256)
            clf = train_classifier(texts, scores, emb, tmp / f"clf-{name}", seed=args.seed, progress=False)
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            scored = list(score_documents(test, tmp / f"clf-{name}", batch_size=32))
            score_s = time.perf_counter() - t0
            test_m = evaluate([d["score"] for d in scored], [d["edu_score"] for d in scored], clf.threshold)
            per_source = {s: round(float(np.mean([d["edu_score"] for d in scored if d["source"] == s])), 2)
                          for s in SOURCES}
            results.append({"embedder": name, "dim": clf.metrics["dim"], "alpha": clf.alpha,
                            "val": clf.metrics["val"], "test": test_m, "test_mean_score_per_source": per_source,
                            "embed_and_train_seconds": round(train_s, 1),
                            "test_docs_per_second": round(len(test) / score_s, 1)})

    table = Table(title=f"edu classifier: F1 of score >= 3, {args.n}/source labelled (80/20), "
                        f"{args.n_test}/source test; labels from the source")
    for col in ("embedder", "dim", "val F1", "val P/R", "val MSE", "test F1", "test P/R", "test MSE",
                "train s", "test docs/s"):
        table.add_column(col, justify="right" if col != "embedder" else "left")
    for r in results:
        v, t = r["val"], r["test"]
        table.add_row(r["embedder"], str(r["dim"]), f"{v['f1']:.3f}", f"{v['precision']:.2f}/{v['recall']:.2f}",
                      f"{v['mse']:.3f}", f"{t['f1']:.3f}", f"{t['precision']:.2f}/{t['recall']:.2f}",
                      f"{t['mse']:.3f}", f"{r['embed_and_train_seconds']}", f"{r['test_docs_per_second']}")
    console.print(table)
    src = Table(title="mean predicted edu_score per source on the test documents")
    src.add_column("embedder")
    for s in SOURCES:
        src.add_column(f"{s} ({SOURCES[s][1]})", justify="right")
    for r in results:
        src.add_row(r["embedder"], *(f"{r['test_mean_score_per_source'][s]:.2f}" for s in SOURCES))
    console.print(src)
    console.print(f"tiny embedder pretraining: {pretrain_info}")

    # quality filter on real documents + injected junk
    real = [{"kind": d["source"], "text": d["text"]} for d in labelled]
    junk = junk_documents([d["text"] for d in labelled if d["score"] >= 3], args.junk, args.seed)
    q = quality_benchmark(real + junk, QualityConfig())
    qt = Table(title=f"quality filter (default QualityConfig): {q['docs']} documents, "
                     f"{q['docs_per_second']} docs/s")
    qt.add_column("kind")
    qt.add_column("kept", justify="right")
    qt.add_column("removed", justify="right")
    qt.add_column("removed by (first failed rule)")
    for k, c in q["per_kind"].items():
        why = ", ".join(f"{r} {n}" for r, n in q["per_kind_removed_by"].get(k, {}).items())
        qt.add_row(k, str(c.get("kept", 0)), str(c.get("removed", 0)), why)
    console.print(qt)
    rt = Table(title="removals per rule (first failed rule / every failed rule)")
    rt.add_column("rule")
    rt.add_column("removed by", justify="right")
    rt.add_column("failed", justify="right")
    for rule, n in q["failed"].items():
        rt.add_row(rule, str(q["removed_by"].get(rule, 0)), str(n))
    console.print(rt)

    write_json(args.out, {
        "labels": "from the source of each document (edu_sample.SOURCES), not annotated",
        "sources": {s: v[1] for s, v in SOURCES.items()}, "n_per_source": args.n, "n_test_per_source": args.n_test,
        "classifier": results, "tiny_pretraining": pretrain_info, "quality": q, "seed": args.seed,
        "threads": args.threads, "torch": torch.__version__, "machine": platform.machine()})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
