"""Pretraining: a freshly initialised LlamaModel trained on a packed token directory (data/pack.py).

    out_dir/metrics.jsonl, checkpoints/last.pt    written by the training loop (resumable)
    out_dir/loss_curve.png
    out_dir/model/                                the final model directory (modeldir.py)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pydantic import with_config

from slmforge.config import ModelConfig
from slmforge.data.pack import TokenShards, read_index
from slmforge.errors import ConfigError, SlmforgeError
from slmforge.io import file_sha256
from slmforge.model import LlamaModel
from slmforge.modeldir import ModelDir, save_model_dir
from slmforge.stage_config import STRICT, setting
from slmforge.tokenizer import Tokenizer
from slmforge.train.kd import DistillConfig
from slmforge.train.loop import (
    TrainConfig,
    dist_env,
    plot_loss_curve,
    resolve_precision,
    sequences_per_step,
    train,
)


@with_config(STRICT)
@dataclass
class PretrainConfig:
    """Every setting of a pretraining run, in one place: `slmforge pretrain`'s options and a recipe's
    `pretrain:` section are made from these fields (slmforge/stage_config.py). The model is not here: it
    is a preset (CLI) or a recipe's `model:` section."""

    max_steps: int = setting(2000, "Optimizer steps (at most).", aliases=("--steps",))
    max_minutes: float | None = setting(None, "Time budget: fewer steps when they do not fit (timed at the start and as it runs).",
                                        aliases=("--minutes",))
    max_epochs: float | None = setting(None, "Never more passes than this over the training tokens.")
    batch_size: int = setting(32, "Sequences per micro-step (per rank).")
    grad_accum: int = setting(1, "Micro-steps per optimizer step.")
    global_batch_size: int | None = setting(None, "Sequences per optimizer step, all processes together: sets "
                                                  "grad_accum for the world size (same run on 1 or N processes).")
    fsdp: bool = setting(False, "Under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP.")
    seq_len: int = setting(256, "Training window length.")
    lr: float = setting(1e-3, "Peak learning rate.")
    min_lr: float | None = setting(None, "Final learning rate (default: lr/10).")
    warmup_steps: int | None = setting(None, "Warmup steps (default: warmup_fraction of the steps).",
                                         aliases=("--warmup",))
    warmup_fraction: float = setting(0.05, "Warmup as a share of the steps, when warmup_steps is not given.")
    schedule: str = setting("cosine", "cosine, wsd or constant.")
    weight_decay: float = setting(0.1, "AdamW weight decay.")
    grad_clip: float = setting(1.0, "Gradient norm clip (0: off).")
    precision: str = setting("auto", "bf16 (autocast, CPU and GPU), fp32, or auto: bf16 where the hardware has "
                                     "bf16 arithmetic (CUDA, AVX512-BF16/AMX CPUs), else fp32.")
    compile: bool = setting(False, "torch.compile the model.")
    eval_every: int = setting(200, "Steps between val-loss evaluations (0: at the end only).")
    eval_batches: int = setting(20, "Batches per evaluation.")
    ckpt_every: int = setting(200, "Steps between checkpoints (0: at the end only).")
    log_every: int = setting(10, "Steps between metric rows.")
    seed: int = setting(0, "Seed for init and data order.")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N.")
    threads: int | None = setting(None, "torch threads (default: torch's).")
    progress: bool = setting(True, "Show progress.")
    force_resume: bool = setting(False, "Resume even where settings that change the run differ from the checkpoint's.")

    def __post_init__(self) -> None:
        if self.max_epochs is not None and self.max_epochs <= 0:
            raise ConfigError("pretrain config: max_epochs must be > 0")
        self.train_config(10**9)  # the trainer core checks the rest

    def train_config(self, train_tokens: int) -> TrainConfig:
        """The trainer core's settings: max_steps capped by max_epochs over `train_tokens`."""
        steps = self.max_steps
        if self.max_epochs is not None:
            per_step = sequences_per_step(self.batch_size, self.grad_accum, self.global_batch_size) * self.seq_len
            steps = max(1, min(steps, int(self.max_epochs * train_tokens / per_step)))
        return TrainConfig(
            max_steps=steps, max_minutes=self.max_minutes, batch_size=self.batch_size, grad_accum=self.grad_accum,
            seq_len=self.seq_len, lr=self.lr, min_lr=self.lr / 10 if self.min_lr is None else self.min_lr,
            warmup_steps=self.warmup_steps or 0,
            warmup_fraction=self.warmup_fraction if self.warmup_steps is None else None,
            schedule=self.schedule, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
            precision=resolve_precision(self.precision, self.device), compile=self.compile, eval_every=self.eval_every,
            eval_batches=self.eval_batches, ckpt_every=self.ckpt_every, log_every=self.log_every, seed=self.seed,
            device=self.device, threads=self.threads, progress=self.progress, force_resume=self.force_resume,
            global_batch_size=self.global_batch_size, fsdp=self.fsdp)


def pretrain(
    data_dir: str | Path,
    out_dir: str | Path,
    model_config: ModelConfig,
    tokenizer: Tokenizer,
    cfg: PretrainConfig,
    resume: bool = True,
    init: str | Path | None = None,
    teacher: str | Path | None = None,
    kd: DistillConfig | None = None,
) -> Path:
    """Train from scratch (or resume) and write out_dir/model. Returns the model directory path.

    init: start from this model directory's weights instead of a fresh init (model_config is then its
      config; continued pretraining, healing a pruned model). teacher (+ kd): distil from this model
      directory as well (train/distill.py)."""
    data_dir, out = Path(data_dir), Path(out_dir)
    init_md = ModelDir.open(init) if init is not None else None
    if init_md is not None:
        model_config = init_md.config
        if init_md.load_tokenizer().fingerprint() != tokenizer.fingerprint():
            raise SlmforgeError(f"{init_md.path}: its tokenizer is not the one the data was packed with")
    index = read_index(data_dir)
    index_sha = file_sha256(data_dir / "index.json")
    train_cfg = cfg.train_config(index["splits"]["train"]["tokens"])
    fp = tokenizer.fingerprint()
    if index.get("tokenizer_fingerprint") != fp:
        raise SlmforgeError(f"{data_dir}: packed with a different tokenizer (fingerprint "
                            f"{index.get('tokenizer_fingerprint')}, this tokenizer {fp}); pack the corpus "
                            f"again with this tokenizer")
    if tokenizer.vocab_size > model_config.vocab_size:
        raise SlmforgeError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model config only "
                            f"vocab_size {model_config.vocab_size}")
    T, bs = train_cfg.seq_len, train_cfg.batch_size
    if T > model_config.max_position_embeddings:
        raise SlmforgeError(f"seq_len {T} exceeds the model's context (max_position_embeddings "
                            f"{model_config.max_position_embeddings})")
    train_split, val_split = TokenShards(data_dir, "train"), TokenShards(data_dir, "val")
    if len(train_split) < T + 1:
        raise SlmforgeError(f"{data_dir}: the train split has {len(train_split)} tokens, fewer than one "
                            f"window of seq_len + 1 = {T + 1}; use more data or a shorter seq_len")
    rank, world, _ = dist_env()

    if init_md is not None:
        model = init_md.load_model().train()
    else:
        model = LlamaModel(model_config)
        model.reset_parameters(seed=train_cfg.seed)  # same init on every rank and every run
    loss_fn, distill_info = None, None
    if teacher is not None:
        from slmforge.train.distill import lm_teacher_loss

        batches = {"data_index_sha256": index_sha, "seed": train_cfg.seed,
                   "batch_size": bs, "seq_len": T}
        loss_fn, distill_info = lm_teacher_loss(teacher, tokenizer, kd or DistillConfig(), batches)

    def get_batch(i: int):
        x, y = train_split.get_batch(i, bs, T, seed=train_cfg.seed)
        return (x, y, torch.tensor(i)) if loss_fn is not None else (x, y)  # a top-k cache reads batch i

    def eval_batches():
        return val_split.iter_eval_batches(bs, T, train_cfg.eval_batches, rank=rank, world_size=world)

    result = train(model, get_batch, train_cfg, out, eval_batches if len(val_split) >= 2 else None,
                   loss_fn=loss_fn, resume=resume)
    model_dir = out / "model"
    if rank != 0:
        return model_dir
    if result.full_state is not None:  # FSDP sharded `model` in place: a plain copy takes the trained weights
        model = LlamaModel(model_config)
        model.load_state_dict(result.full_state)
    val = result.val_loss
    meta = {
        "stage": "distill" if teacher is not None else "pretrain",
        "init": {"path": str(init_md.path.resolve()), "stage": init_md.meta.get("stage"),
                 "params": init_md.config.n_params} if init_md is not None else None,
        "distill": distill_info,
        "data": {
            "dir": str(data_dir.resolve()),
            "index_sha256": index_sha,
            "tokenizer_fingerprint": index["tokenizer_fingerprint"],
            "documents": index["documents"],
            "train_tokens": index["splits"]["train"]["tokens"],
            "val_tokens": index["splits"]["val"]["tokens"],
        },
        "pretrain": asdict(cfg),
        "train": asdict(train_cfg),
        "train_plan": result.plan,
        "metrics": {
            "val_loss": val,
            "val_ppl": math.exp(val) if val is not None and val < 50 else None,
            "train_loss": result.loss,
            "steps": result.step,
            "train_tokens": result.tokens,
            "tokens_per_s": round(result.tokens_per_s, 1),
            "train_time_s": round(result.train_time_s, 2),
        },
    }
    save_model_dir(model_dir, model, tokenizer, meta)
    plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png",
                    title=f"{meta['stage']} {model_config.n_params / 1e6:.2f}M params")
    return model_dir
