"""Knowledge distillation, measured: the same student trained with and without a teacher, at equal tokens.

    python benchmarks/distill.py                 # all three parts (~40 min on 2 cores)
    python benchmarks/distill.py --part lm --quick

lm      a 4.9M teacher and a 0.99M student (1m preset), both trained here on the same corpus (20,000 offline
        template stories, a 2,048-token BPE); the student with KD (forward KL, alpha 0.5) and without, for the
        same steps on the same batches: validation loss (the student's own cross-entropy) and bits per byte on
        real TinyStories text (400 paragraphs of tinystories_valid_part1.txt).
llama2c llama2.c's stories260K (imported; trained on real TinyStories) teaches a student of another depth and
        width (200k preset: 4 layers x 64, 4 heads; stories260K has 5 x 64, 8 heads) on the same stories packed
        with its tokenizer: bits per byte on real TinyStories text with and without KD. The stories are synthetic,
        so this asks whether a real-data teacher carries real-text knowledge into a student trained on synthetic text.
prune   the lm part's teacher through `slmforge compress` (prune to ~half, heal by distillation, int8; its
        compression report), and the pruned shape from scratch for the healing's wall-clock time (trains the lm part's teacher if missing).
sst2    the sst2 recipe's shipped model (2.76M, classifier head; runs/recipes/sst2, made by `slmforge run sst2`)
        teaches a 0.60M student (<= 1/4 of its parameters), pretrained on the recipe's training phrases, then
        fine-tuned with a classifier head with and without the teacher's label distribution. Steps and the kept
        checkpoint are chosen on val; each variant is scored once on the held-out test sentences.

Writes benchmarks/results/distill.json (runs under runs/bench_distill/; a finished part is not re-run unless
--fresh).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from train_throughput import machine_info  # benchmarks/ is on sys.path when run as a script

from slmforge.config import ModelConfig, preset
from slmforge.data.pack import pack_tokens
from slmforge.evaluate.perplexity import judge
from slmforge.io import read_jsonl, write_json
from slmforge.modeldir import ModelDir
from slmforge.tokenizer import train_tokenizer
from slmforge.train.finetune import FinetuneConfig, finetune
from slmforge.train.heads import predict_labels
from slmforge.train.kd import DistillConfig
from slmforge.train.loop import resolve_precision
from slmforge.train.pretrain import PretrainConfig, pretrain

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tinystories"
REAL = DATA / "tinystories_valid_part1.txt"
RUNS = REPO / "runs" / "bench_distill"
OUT = REPO / "benchmarks" / "results" / "distill.json"
THREADS = 2


def bpb(model_dir: Path, quick: bool) -> float:
    return judge(model_dir, [REAL], max_docs=40 if quick else 400)["files"][0]["bits_per_byte"]


def stories(root: Path, n: int) -> Path:
    from slmforge.data.synth import synthesize

    out = root / "stories.txt"
    if not out.is_file():
        raw = root / "stories.jsonl"
        synthesize("stories", n, raw, seed=7, batch_size=512)
        out.write_text("\n\n".join(r["text"].strip() for r in read_jsonl(raw)), encoding="utf-8")
    return out


def run_student(name: str, root: Path, packed: Path, cfg: ModelConfig | None, tok, pcfg: PretrainConfig,
                teacher: Path | None, kd: DistillConfig | None, quick: bool) -> dict:
    t = time.perf_counter()
    model_dir = pretrain(packed, root / name, cfg, tok, pcfg, teacher=teacher, kd=kd)
    md = ModelDir.open(model_dir)
    m = md.meta["metrics"]
    return {"run": name, "params": md.config.n_params, "teacher": str(teacher) if teacher else None,
            "kd": kd.__dict__ if kd else None, "steps": m["steps"], "train_tokens": m["train_tokens"],
            "val_loss": round(m["val_loss"], 4), "real_bits_per_byte": round(bpb(model_dir, quick), 4),
            "train_s": round(time.perf_counter() - t, 1), "model": str(model_dir)}


def lm_teacher(quick: bool):
    """The lm part's corpus, tokenizer, packed data and 5M teacher (each made once, reused when there)."""
    root = RUNS / "lm"
    root.mkdir(parents=True, exist_ok=True)
    text = stories(root, 2000 if quick else 20_000)
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        paras = text.read_text(encoding="utf-8").split("\n\n")
        train_tokenizer(paras, vocab_size=2048).save(tok_dir)
    from slmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tok_dir)
    packed = root / "packed"
    if not (packed / "index.json").is_file():
        pack_tokens(text, tok, packed, val_fraction=0.02, progress=False)
    common = dict(batch_size=32, seq_len=256, lr=2e-3, eval_every=0, eval_batches=20, ckpt_every=100,
                  threads=THREADS, progress=False)
    t_steps, s_steps = (20, 10) if quick else (400, 300)
    teacher_cfg = preset("5m", vocab_size=tok.vocab_size, max_position_embeddings=256)
    t0 = time.perf_counter()
    teacher = root / "teacher" / "model"
    if not (teacher / "model.safetensors").is_file():
        teacher = pretrain(packed, root / "teacher", teacher_cfg, tok, PretrainConfig(max_steps=t_steps, **common))
    return dict(root=root, tok=tok, packed=packed, teacher=teacher, teacher_cfg=teacher_cfg, common=common,
                t_steps=t_steps, s_steps=s_steps, train_s=time.perf_counter() - t0)


def part_lm(quick: bool) -> dict:
    t = lm_teacher(quick)
    root, tok, packed, teacher, teacher_cfg, common = (t[k] for k in ("root", "tok", "packed", "teacher",
                                                                     "teacher_cfg", "common"))
    t_steps, s_steps, train_s = t["t_steps"], t["s_steps"], t["train_s"]
    teacher_row = {"run": "teacher", "params": teacher_cfg.n_params, "steps": t_steps,
                   "val_loss": round(ModelDir.open(teacher).meta["metrics"]["val_loss"], 4),
                   "real_bits_per_byte": round(bpb(teacher, quick), 4), "train_s": round(train_s, 1)}
    student_cfg = preset("1m", vocab_size=tok.vocab_size, max_position_embeddings=256)
    pcfg = PretrainConfig(max_steps=s_steps, **common)
    plain = run_student("student_plain", root, packed, student_cfg, tok, pcfg, None, None, quick)
    kd = run_student("student_kd", root, packed, student_cfg, tok, pcfg, teacher, DistillConfig(alpha=0.5), quick)
    return {"teacher": teacher_row, "students": [plain, kd],
            "params_ratio": round(teacher_cfg.n_params / student_cfg.n_params, 2),
            "kd_val_loss_lower": kd["val_loss"] < plain["val_loss"]}


def part_llama2c(quick: bool) -> dict:
    from slmforge.convert.llama2c import import_llama2c

    root = RUNS / "llama2c"
    root.mkdir(parents=True, exist_ok=True)
    teacher = REPO / "runs" / "stories260K"
    if not (teacher / "model.safetensors").is_file():
        import_llama2c(DATA / "stories260K.bin", DATA / "tok512.bin", teacher)
    md = ModelDir.open(teacher)
    tok = md.load_tokenizer()
    text = stories(RUNS / "lm", 2000 if quick else 20_000)
    packed = root / "packed"
    if not (packed / "index.json").is_file():
        pack_tokens(text, tok, packed, val_fraction=0.02, progress=False)
    student_cfg = preset("200k", vocab_size=md.config.vocab_size, max_position_embeddings=256)
    pcfg = PretrainConfig(max_steps=10 if quick else 400, batch_size=32, seq_len=256, lr=3e-3, eval_every=0,
                          ckpt_every=100, threads=THREADS, progress=False)
    teacher_row = {"run": "stories260K", "params": md.config.n_params, "real_bits_per_byte": round(bpb(teacher, quick), 4)}
    plain = run_student("student_plain", root, packed, student_cfg, tok, pcfg, None, None, quick)
    kd = run_student("student_kd", root, packed, student_cfg, tok, pcfg, teacher, DistillConfig(alpha=0.5), quick)
    return {"teacher": teacher_row, "students": [plain, kd],
            "kd_real_bits_per_byte_lower": kd["real_bits_per_byte"] < plain["real_bits_per_byte"]}


def accuracy(model_dir: str | Path, path: Path) -> float:
    rows = list(read_jsonl(path))
    pred = predict_labels(model_dir, [r["text"] for r in rows], batch_size=64)
    return round(100 * sum(p == r["label"] for p, r in zip(pred, rows, strict=True)) / len(rows), 2)


def part_sst2(quick: bool) -> dict:
    recipe = REPO / "runs" / "recipes" / "sst2"
    teacher = recipe / "model"
    if not (teacher / "model.safetensors").is_file():
        raise SystemExit(f"{teacher}: missing; run `slmforge run sst2` first (the teacher is its shipped model)")
    root = RUNS / "sst2"
    root.mkdir(parents=True, exist_ok=True)
    t_md = ModelDir.open(teacher)
    tok = t_md.load_tokenizer()
    data = recipe / "data"
    student_cfg = ModelConfig(vocab_size=t_md.config.vocab_size, hidden_size=96, intermediate_size=256,
                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=t_md.config.max_position_embeddings)
    t0 = time.perf_counter()
    base = pretrain(recipe / "packed", root / "student_pretrain", student_cfg, tok,
                    PretrainConfig(max_steps=10 if quick else 600, max_epochs=50, batch_size=64, seq_len=64, lr=2e-3,
                                   eval_every=0, ckpt_every=100, threads=THREADS, progress=False))
    pretrain_s = round(time.perf_counter() - t0, 1)
    ft = dict(task="classify", head="classifier", epochs=3, max_steps=10 if quick else 900, batch_size=64, seq_len=64,
              lr=1e-3, weight_decay=0.05, eval_every=5 if quick else 150, patience=4, threads=THREADS, progress=False,
              ckpt_every=150)
    rows = []
    for name, kd in (("student_plain", None), ("student_kd", DistillConfig(alpha=0.5, temperature=2.0))):
        t = time.perf_counter()
        s = finetune(base, data / "train.jsonl", root / name, FinetuneConfig(**ft), val_path=data / "val.jsonl",
                     teacher=teacher if kd else None, kd=kd)
        model_dir = s["outputs"]["model"]
        rows.append({"run": name, "params": s["metrics"]["total_params"], "kd": kd.__dict__ if kd else None,
                     "steps": s["metrics"]["steps"], "best_step": s["metrics"]["best_step"],
                     "val_accuracy": round(100 * s["metrics"]["val_accuracy"], 2),
                     "test_accuracy": accuracy(model_dir, data / "test.jsonl"),
                     "finetune_s": round(time.perf_counter() - t, 1), "model": model_dir})
    chosen = max(rows, key=lambda r: r["val_accuracy"])
    teacher_row = {"run": "teacher (sst2 recipe)", "params": t_md.config.n_params,
                   "val_accuracy": accuracy(teacher, data / "val.jsonl"),
                   "test_accuracy": accuracy(teacher, data / "test.jsonl")}
    kd_row = rows[1]
    return {"teacher": teacher_row, "student_pretrain_s": pretrain_s, "students": rows,
            "params_ratio": round(rows[0]["params"] / t_md.config.n_params, 3),
            "chosen_on_val": chosen["run"],
            "kd_test_accuracy_pct_of_teacher": round(100 * kd_row["test_accuracy"] / teacher_row["test_accuracy"], 1),
            "kd_beats_plain_on_test": kd_row["test_accuracy"] > rows[0]["test_accuracy"]}


def part_prune(quick: bool) -> dict:
    """The lm part's 4.9M teacher through `slmforge compress` (recipe prune-heal-int8, fewer healing steps):
    pruned to about half its parameters (MLP neurons, kv groups, embedding channels ranked on calibration
    batches), healed by distilling from the unpruned model, quantized to int8, with its compression report;
    then the same pruned shape trained from scratch for the healing's wall-clock time on the same machine
    (the teacher's forward passes are inside the healing time, so scratch runs more steps)."""
    from dataclasses import replace

    from slmforge.compress.pipeline import compress, load_compress_recipe

    t = lm_teacher(quick)  # the lm part's teacher, trained here if that part has not run
    packed, teacher = t["packed"], t["teacher"]
    root = RUNS / "prune"
    cfg = load_compress_recipe("prune-heal-int8")
    cfg = replace(cfg, heal=replace(cfg.heal, max_steps=5 if quick else 100), judge_docs=40 if quick else 400)
    if quick:
        cfg = replace(cfg, prune=replace(cfg.prune, batches=2))
    report = compress(teacher, packed, root, cfg, [REAL], progress=False)
    healed_dir = root / "healed" / "model"
    heal_s = ModelDir.open(healed_dir).meta["metrics"]["train_time_s"]  # training steps only, teacher included
    p_md = ModelDir.open(root / "pruned")
    tok = p_md.load_tokenizer()
    scratch = root / "scratch" / "model"
    if not (scratch / "model.safetensors").is_file():  # (a rerun of this part only re-measures)
        scratch = pretrain(packed, root / "scratch", p_md.config, tok,
                           PretrainConfig(**{**asdict(cfg.heal), "max_steps": 10_000, "max_minutes": heal_s / 60,
                                             "lr": 2e-3, "progress": False}))
    rows = []
    for name, d in (("pruned + healed (KD from the teacher)", healed_dir), ("same shape from scratch", scratch)):
        m = ModelDir.open(d).meta["metrics"]
        rows.append({"run": name, "params": p_md.config.n_params, "steps": m["steps"], "train_tokens": m["train_tokens"],
                     "val_loss": round(m["val_loss"], 4), "real_bits_per_byte": round(bpb(d, quick), 4),
                     "train_time_s": m["train_time_s"]})
    return {"prune": p_md.meta["prune"], "report": report["rows"], "vs_scratch": rows,
            "healed_val_loss_lower": rows[0]["val_loss"] < rows[1]["val_loss"],
            "report_files": [str(root / f) for f in ("report.md", "report.json", "report.png")]}


PARTS = {"lm": part_lm, "llama2c": part_llama2c, "sst2": part_sst2, "prune": part_prune}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=list(PARTS), action="append")
    ap.add_argument("--quick", action="store_true", help="a few steps each: checks the script, measures nothing")
    ap.add_argument("--fresh", action="store_true", help="delete this part's runs first")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    results = json.loads(args.out.read_text()) if args.out.is_file() and not args.quick else {}
    for name in args.part or list(PARTS):
        if args.fresh:
            shutil.rmtree(RUNS / name, ignore_errors=True)
        t = time.perf_counter()
        results[name] = {**PARTS[name](args.quick), "seconds": round(time.perf_counter() - t, 1),
                         "load_avg_1m_after": os.getloadavg()[0], "machine": machine_info(),
                         "train_precision": resolve_precision("auto", "cpu")}
        print(json.dumps({name: results[name]}, indent=2))
        if not args.quick:
            results["env"] = {"torch": torch.__version__, "threads": THREADS,
                              "machine": platform.processor() or platform.machine(), "command": "python benchmarks/distill.py"}
            write_json(args.out, results)
    if args.quick:
        shutil.rmtree(RUNS, ignore_errors=True)


if __name__ == "__main__":
    main()
