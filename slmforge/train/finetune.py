"""Fine-tuning a model directory on task data: full or LoRA, language-model tasks, classification or
token tagging.

Tasks and their data (JSONL, or CSV/TSV with the same column names):

    lm        {"prompt": ..., "completion": ...}       loss on the completion (and eos) only
    chat      {"messages": [{"role", "content"}...]}   rendered with the model's chat template; loss on
                                                       the assistant turns only
    classify  {"text": ..., "label": ...}              head "generative": the label is the completion of
                                                       CLASSIFY_PROMPT, predicted as the label with the
                                                       highest log-likelihood; head "classifier": a linear
                                                       layer on the final hidden state of the last token
    tag       {"text": ..., "phrases": [...]}          extractive keyphrases: a linear layer on every token's
                                                       final hidden state tags it O/B/I; the gold tags mark
                                                       each phrase's occurrences in the text (inspec rows
                                                       {"prompt", "keyphrases"} are read as text and phrases)

Reading and encoding the rows is slmforge/train/rows.py; LoRA, the heads, their losses, predictions and
files are slmforge/train/heads.py; this module is the config and the run. Every example becomes token ids
plus an answer mask (True where the loss is taken). Batches are a pure
function of their index (an epoch permutation seeded by the run's seed), so the trainer core's exact
resume holds. Evaluation keeps the best weights (val accuracy or macro-F1 for classify, token F1 of the B/I tags
for tag, val_loss otherwise) and can stop early.

    out/metrics.jsonl, checkpoints/      the trainer core's files (resumable)
    out/model/                           the fine-tuned (for LoRA with merge: merged) model directory
    out/adapter/                         LoRA: the peft adapter (save_pretrained)
    classifier_head.safetensors          in model/ or adapter/ with head "classifier"; labels in slmforge.json
    tagger_head.safetensors              in model/ or adapter/ for task tag; "tagger" entry in slmforge.json
    out/finetune.json                    provenance and metrics of the run
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import with_config

from slmforge.errors import ConfigError, SlmforgeError
from slmforge.io import file_sha256, write_dir_atomically, write_json
from slmforge.modeldir import ModelDir
from slmforge.stage_config import STRICT, setting
from slmforge.train.heads import (
    HEAD_FILE,
    TAGGER_HEAD_FILE,
    balanced_class_weights,
    classifier_logits,
    count_params,
    label_logliks,
    loss_fn_of,
    macro_f1,
    merge_lora,
    save_head,
    save_with_head,
    tag_f1,
    trainable_model,
)
from slmforge.train.kd import DistillConfig
from slmforge.train.loop import (
    TrainConfig,
    dist_env,
    read_metrics,
    resolve_precision,
    sequences_per_step,
    train,
)
from slmforge.train.rows import (
    CLASSIFY_PROMPT,
    TAGS,
    batch_indices,
    encode_records,
    label_set,
    make_batch,
    pad_id_of,
    phrase_spans,
    read_records,
    tag_fields,
)

TASKS = ("lm", "chat", "classify", "tag")
MODES = ("full", "lora")
HEADS = ("generative", "classifier")
CLASS_WEIGHTS = ("none", "balanced")
SELECT_METRICS = ("accuracy", "macro_f1")


@with_config(STRICT)
@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run, in one place: `slmforge finetune`'s options and a recipe's
    `finetune:` sections are made from these fields (slmforge/stage_config.py)."""

    task: str = setting("lm", "lm (prompt/completion), chat (messages), classify (text/label) or tag "
                              "(text/phrases: an O/B/I keyphrase tagger).")
    mode: str = setting("full", "full or lora.")
    head: str = setting("generative", "classify: generative (the label as a completion) or classifier.")
    labels: list[str] | None = setting(None, "classify: the label set (default: the labels seen in train).")
    # "balanced" weighs each class's loss by n / (k * count), so a rare class (PubMedQA's "maybe") is not
    # drowned by the majority
    class_weights: str = setting("none", "classify, head classifier: none or balanced (n/(k*count)).")
    select_metric: str = setting("accuracy", "classify: the val metric that picks the kept weights: accuracy or "
                                             "macro_f1.")
    lora_r: int = setting(8, "LoRA rank.")
    lora_alpha: int = setting(16, "LoRA alpha (scale alpha/r).")
    lora_dropout: float = setting(0.05, "LoRA dropout.")
    lora_targets: list[str] = setting(help="Linear layers to adapt (comma-separated).",
                                      factory=lambda: ["q_proj", "v_proj"])
    merge: bool = setting(False, "LoRA: also write the merged model to out/model.")
    # QLoRA's idea (a low-precision frozen base under full-precision adapters) at 16 bits: half the base
    # memory; bf16 autocast computes in bf16 anyway
    base_dtype: str = setting("float32", "LoRA: frozen base weights in float32 or bfloat16 (needs precision bf16; "
                                         "auto becomes bf16).")
    val_fraction: float = setting(0.1, "Share of train held out for validation when no val file is given.")
    max_val_examples: int = setting(2000, "Most validation examples scored at each evaluation.")
    dtype: str = setting("float32", "Weights of the written model: float32 or bfloat16.")
    # How long: max_steps when given, else epochs; then max_minutes may shorten it (timed by train()).
    epochs: float = setting(3.0, "Passes over the training data (when max_steps is not given).")
    max_steps: int | None = setting(None, "Optimizer steps (replaces epochs).", aliases=("--steps",))
    max_minutes: float | None = setting(None, "Time budget: fewer steps when they do not fit (timed at the start and as it runs).",
                                        aliases=("--minutes",))
    lr: float | None = setting(None, "Peak learning rate (default: 2e-5 full, 1e-3 LoRA).")
    min_lr: float | None = setting(None, "Final learning rate (default: lr/10).")
    warmup_fraction: float = setting(0.05, "Warmup steps as a share of the steps.")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    # a regulariser where the model over-fits its targets (translation: Vaswani et al. use 0.1); the val loss
    # that picks the kept checkpoint is smoothed the same way
    label_smoothing: float = setting(0.0, "Label smoothing of the training targets (0: off).")
    dropout: float = setting(0.0, "Residual dropout on every attention and MLP output while training (0: off).")
    batch_size: int = setting(16, "Examples per micro-step.")
    # a batch is padded to its longest row: random batches of captions or phrases are half padding
    # off by default (as transformers'): where length follows content, like-length batches are less mixed
    group_by_length: bool = setting(False, "Batch training rows of like length together (each epoch's batches "
                                           "shuffled), so little compute goes to padding.")
    grad_accum: int = setting(1, "Micro-steps per optimizer step.")
    global_batch_size: int | None = setting(None, "Examples per optimizer step, all processes together: sets "
                                                  "grad_accum for the world size (same run on 1 or N processes).")
    fsdp: bool = setting(False, "Under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP.")
    seq_len: int = setting(256, "Most tokens per example (longer ones keep their answer).")
    eval_every: int = setting(100, "Steps between evaluations (0: at the end only).")
    patience: int = setting(0, "Stop after this many evaluations without improvement (0: never).")
    ckpt_every: int = setting(100, "Steps between checkpoints (0: at the end only).")
    log_every: int = setting(10, "Steps between metric rows.")
    precision: str = setting("auto", "bf16 (autocast), fp32, or auto: bf16 where the hardware has bf16 "
                                     "arithmetic (CUDA, AVX512-BF16/AMX CPUs), else fp32.")
    seed: int = setting(0, "Seed for data order, validation split and adapter/head init.")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N.")
    threads: int | None = setting(None, "torch threads (default: torch's).")
    progress: bool = setting(True, "Show progress.")
    force_resume: bool = setting(False, "Resume even where settings that change the run differ from the checkpoint's.")

    def __post_init__(self) -> None:
        checks = [
            (self.task in TASKS, f"task must be one of {', '.join(TASKS)}"),
            (self.mode in MODES, f"mode must be one of {', '.join(MODES)}"),
            (self.head in HEADS, f"head must be one of {', '.join(HEADS)}"),
            (self.lora_r > 0 and self.lora_alpha > 0 and 0 <= self.lora_dropout < 1,
             "need lora_r > 0, lora_alpha > 0 and 0 <= lora_dropout < 1"),
            (bool(self.lora_targets), "lora_targets must name at least one module"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (self.max_val_examples > 0, "max_val_examples must be > 0"),
            (self.dtype in ("float32", "bfloat16"), "dtype must be float32 or bfloat16"),
            (self.epochs > 0 and (self.max_steps is None or self.max_steps > 0), "epochs and max_steps must be > 0"),
            (self.base_dtype in ("float32", "bfloat16"), "base_dtype must be float32 or bfloat16"),
            (self.base_dtype == "float32" or self.mode == "lora", "base_dtype bfloat16 is for mode lora"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.class_weights in CLASS_WEIGHTS, f"class_weights must be one of {', '.join(CLASS_WEIGHTS)}"),
            (self.select_metric in SELECT_METRICS, f"select_metric must be one of {', '.join(SELECT_METRICS)}"),
            (self.class_weights == "none" or (self.task == "classify" and self.head == "classifier"),
             "class_weights balanced needs task classify with head classifier"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"finetune config: {msg}")
        train_config(self, 1, True)  # the trainer core checks the training settings

    @property
    def classifier_head(self) -> bool:
        return self.task == "classify" and self.head == "classifier"

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.mode == "lora" else 2e-5)

    @property
    def best_metric(self) -> tuple[str, str]:
        """The val metric that picks the kept weights, and whether higher ("max") or lower is better."""
        if self.task == "classify":
            return f"val_{self.select_metric}", "max"
        return ("val_tag_f1", "max") if self.task == "tag" else ("val_loss", "min")


# ---------------------------------------------------------------------------------------------------------
# The run


def train_precision(cfg: FinetuneConfig) -> str:
    """The precision the run trains in: auto as the hardware has it (loop.resolve_precision), except that a
    bfloat16 LoRA base asks for bf16 autocast (it computes in bf16 whatever the CPU)."""
    if cfg.precision == "auto" and cfg.base_dtype == "bfloat16":
        return "bf16"
    return resolve_precision(cfg.precision, cfg.device)


def train_config(cfg: FinetuneConfig, n_train: int, has_val: bool) -> TrainConfig:
    """The trainer core's settings for this run: steps from max_steps or epochs over n_train examples,
    learning rates from the mode, and the best validation metric kept when there is validation data."""
    per_step = sequences_per_step(cfg.batch_size, cfg.grad_accum, cfg.global_batch_size)
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * n_train / per_step))
    lr = cfg.peak_lr
    metric, mode = cfg.best_metric
    return TrainConfig(
        max_steps=steps, max_minutes=cfg.max_minutes, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        seq_len=cfg.seq_len, lr=lr, min_lr=lr / 10 if cfg.min_lr is None else cfg.min_lr,
        warmup_fraction=cfg.warmup_fraction, weight_decay=cfg.weight_decay, precision=train_precision(cfg),
        eval_every=cfg.eval_every, ckpt_every=cfg.ckpt_every, log_every=cfg.log_every, patience=cfg.patience,
        best_metric=metric if has_val else None, best_mode=mode, seed=cfg.seed, device=cfg.device,
        threads=cfg.threads, progress=cfg.progress, force_resume=cfg.force_resume,
        global_batch_size=cfg.global_batch_size, fsdp=cfg.fsdp)


def finetune(
    model_dir: str | Path,
    train_path: str | Path,
    out_dir: str | Path,
    cfg: FinetuneConfig,
    val_path: str | Path | None = None,
    resume: bool = True,
    teacher: str | Path | None = None,
    kd: DistillConfig | None = None,
) -> dict:
    """Fine-tune a model directory on task data. Returns the run summary (also written to out/finetune.json).
    teacher (+ kd): distil from this model directory as well (train/distill.py)."""
    md = ModelDir.open(model_dir)
    tok = md.load_tokenizer()
    out = Path(out_dir)
    seq_len = cfg.seq_len
    if seq_len + (cfg.task == "tag") > md.config.max_position_embeddings:  # a tag batch ends in a pad column
        raise SlmforgeError(f"seq_len {seq_len} exceeds the model's context (max_position_embeddings "
                            f"{md.config.max_position_embeddings}{'; task tag takes one token more' if cfg.task == 'tag' else ''})")
    if cfg.task == "chat" and not tok.chat_template:
        raise SlmforgeError(f"{md.path}: the tokenizer has no chat template; use --task lm with prompt/completion")

    # Data: validate everything before any training starts.
    train_recs = read_records(train_path)
    labels = label_set(train_recs, cfg.labels) if cfg.task == "classify" else None
    if val_path is not None:
        val_recs = read_records(val_path)
    elif cfg.val_fraction > 0 and len(train_recs) >= 2:
        order = np.random.default_rng(cfg.seed).permutation(len(train_recs))
        n_val = min(max(1, round(len(train_recs) * cfg.val_fraction)), cfg.max_val_examples, len(train_recs) - 1)
        val_recs = [train_recs[i] for i in sorted(order[:n_val])]
        train_recs = [train_recs[i] for i in sorted(order[n_val:])]
    else:
        val_recs = []
    val_recs = val_recs[:cfg.max_val_examples]
    train_ex = encode_records(train_recs, tok, cfg, seq_len, labels)
    val_ex = encode_records(val_recs, tok, cfg, seq_len, labels)
    if cfg.task in ("lm", "chat") or (cfg.task == "classify" and not cfg.classifier_head):
        empty = next((e for e in train_ex if sum(e.answer[1:]) == 0), None)
        if empty is not None:
            raise SlmforgeError(f"{empty.where}: no answer tokens left after truncation to seq_len {seq_len}")

    # Model: full or LoRA, with or without a classifier or tagger head.
    torch.manual_seed(cfg.seed)  # LoRA and head initialisation
    lm, model = trainable_model(md.load_model().train(), cfg, labels, train_precision(cfg))
    trainable, total = count_params(model)
    loss_fn, distill_info = loss_fn_of(cfg), None
    if teacher is not None:
        from slmforge.train.distill import task_teacher_loss

        loss_fn, distill_info = task_teacher_loss(cfg.task, cfg.classifier_head, teacher, tok, kd or DistillConfig(),
                                                  labels)

    bs, pad = cfg.batch_size, pad_id_of(tok)

    weight = balanced_class_weights(train_ex, len(labels)) if cfg.class_weights == "balanced" else None

    lengths = tuple(len(e.ids) for e in train_ex) if cfg.group_by_length else None

    def get_batch(i: int) -> dict:
        batch = make_batch([train_ex[j] for j in batch_indices(i, len(train_ex), bs, cfg.seed, lengths)], pad, cfg)
        return batch if weight is None else batch | {"weight": weight}

    val_batches = [make_batch(val_ex[s:s + bs], pad, cfg) for s in range(0, len(val_ex), bs)]
    texts = [r["text"] for _, r in val_recs] if cfg.task == "classify" else []
    gold = torch.tensor([e.label for e in val_ex]) if cfg.task == "classify" else None

    @torch.no_grad()
    def val_metrics() -> dict:
        if cfg.task == "tag":
            dev = model.score.weight.device
            pred = [model(b["x"].to(dev)).argmax(-1).cpu().flatten() for b in val_batches]
            return {"val_tag_f1": tag_f1(torch.cat(pred), torch.cat([b["tags"].flatten() for b in val_batches]))}
        if cfg.classifier_head:
            pred = classifier_logits(model, tok, texts, seq_len, bs).argmax(-1)
        else:
            pred = label_logliks(model, tok, texts, labels, seq_len, bs).argmax(-1)
        return {"val_accuracy": (pred == gold).float().mean().item(),
                "val_macro_f1": macro_f1(pred, gold, len(labels))}

    def on_eval(step: int, val_loss: float) -> dict | None:
        if cfg.task not in ("classify", "tag") or not val_ex:
            return None
        was_training = model.training
        model.eval()
        metrics = val_metrics()
        model.train(was_training)
        return metrics

    if not val_ex and cfg.patience:
        raise SlmforgeError("early stopping (patience) needs validation data: give a val file or val_fraction > 0")
    train_cfg = train_config(cfg, len(train_ex), bool(val_ex))  # keeps the best evaluation's weights
    result = train(model, get_batch, train_cfg, out, (lambda: val_batches) if val_ex else None,
                   on_eval=on_eval, loss_fn=loss_fn, resume=resume)
    if dist_env()[0] != 0:  # under torchrun rank 0 writes the outputs
        return {}
    if result.full_state is not None:  # FSDP sharded `model` in place: a plain copy takes the trained weights
        lm, model = trainable_model(md.load_model().train(), cfg, labels, train_precision(cfg))
        model.load_state_dict(result.full_state)
    model.cpu().eval()

    # Metrics of the weights we keep (the best evaluation's, restored by train()).
    rows = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}  # the whole curve, across resumes
    best_row = rows.get(result.best_step, {}) if result.best_step else {}
    metrics = {
        "train_loss": result.loss,
        "val_loss": best_row.get("val_loss", result.val_loss),
        "val_accuracy": best_row.get("val_accuracy"),
        "val_macro_f1": best_row.get("val_macro_f1"),
        "val_tag_f1": best_row.get("val_tag_f1"),
        "best_step": result.best_step, "steps": result.step, "stopped_early": result.stopped_early,
        "train_tokens": result.tokens, "tokens_per_s": round(result.tokens_per_s, 1),
        "train_time_s": round(result.train_time_s, 2),
        "trainable_params": trainable, "total_params": total,
        "trainable_pct": round(100 * trainable / total, 4),
    }
    if metrics["val_loss"] is not None and metrics["val_loss"] < 50:
        metrics["val_ppl"] = math.exp(metrics["val_loss"])
    meta = {
        "stage": "distill" if teacher is not None else "finetune",
        "distill": distill_info,
        "parent": {"path": str(md.path.resolve()), "stage": md.meta.get("stage"),
                   "tokenizer_fingerprint": tok.fingerprint()},
        "data": {"train": str(Path(train_path).resolve()), "train_sha256": file_sha256(Path(train_path)),
                 "val": str(Path(val_path).resolve()) if val_path else None,
                 "val_sha256": file_sha256(Path(val_path)) if val_path else None,
                 "train_examples": len(train_ex), "val_examples": len(val_ex)},
        "finetune": asdict(cfg), "train": asdict(train_cfg), "train_plan": result.plan, "metrics": metrics,
    }
    if cfg.task == "classify":
        meta["classifier"] = {"head": cfg.head, "labels": labels, "seq_len": seq_len, "pooling": "last_token",
                              "prompt": CLASSIFY_PROMPT if cfg.head == "generative" else None}
    if cfg.task == "tag":  # phrases absent from their text (many in Inspec) cannot be tagged: say how many
        pairs = [tag_fields(w, r) for w, r in train_recs]
        n_phrases = sum(len(set(map(str.lower, ph))) for _, ph in pairs)
        found = sum(1 for text, ph in pairs for x in set(map(str.lower, ph)) if phrase_spans(text, [x]))
        meta["tagger"] = {"labels": list(TAGS), "seq_len": seq_len,
                          "train_phrases_in_text_pct": round(100 * found / max(n_phrases, 1), 2)}

    head = model.score if cfg.classifier_head or cfg.task == "tag" else None
    head_file = TAGGER_HEAD_FILE if cfg.task == "tag" else HEAD_FILE
    written = {}
    if cfg.mode == "lora":
        def write_adapter(d: Path) -> None:
            lm.save_pretrained(str(d))
            if head is not None:
                save_head(head, d / head_file)
            write_json(d / "slmforge.json", meta)

        written["adapter"] = str(write_dir_atomically(out / "adapter", write_adapter))
        if cfg.merge and cfg.base_dtype == "bfloat16":  # fold into the fp32 base on disk, not its bf16 copy
            written["model"] = str(merge_lora(md.path, out / "adapter", out / "model", dtype=cfg.dtype))
        elif cfg.merge:
            written["model"] = str(save_with_head(out / "model", lm.merge_and_unload(), tok, head,
                                               {**meta, "merged_lora": True}, cfg.dtype, head_file))
    else:
        written["model"] = str(save_with_head(out / "model", lm, tok, head, meta, cfg.dtype, head_file))
    summary = {**meta, "outputs": written}
    write_json(out / "finetune.json", summary)
    return summary


