"""Pretraining: a freshly initialised LlamaModel trained on a packed token directory (data/pack.py).

    out_dir/metrics.jsonl, checkpoints/last.pt    written by the training loop (resumable)
    out_dir/loss_curve.png
    out_dir/model/                                the final model directory (modeldir.py)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict
from pathlib import Path

from slmforge.config import ModelConfig
from slmforge.data.pack import TokenShards, read_index
from slmforge.errors import SlmforgeError
from slmforge.model import LlamaModel
from slmforge.modeldir import save_model_dir
from slmforge.tokenizer import Tokenizer
from slmforge.train.loop import TrainConfig, dist_env, plot_loss_curve, train


def pretrain(
    data_dir: str | Path,
    out_dir: str | Path,
    model_config: ModelConfig,
    tokenizer: Tokenizer,
    train_cfg: TrainConfig,
    resume: bool = True,
) -> Path:
    """Train from scratch (or resume) and write out_dir/model. Returns the model directory path."""
    data_dir, out = Path(data_dir), Path(out_dir)
    index = read_index(data_dir)
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

    model = LlamaModel(model_config)
    model.reset_parameters(seed=train_cfg.seed)  # same init on every rank and every run

    def get_batch(i: int):
        return train_split.get_batch(i, bs, T, seed=train_cfg.seed)

    def eval_batches():
        return val_split.iter_eval_batches(bs, T, train_cfg.eval_batches, rank=rank, world_size=world)

    result = train(model, get_batch, train_cfg, out, eval_batches if len(val_split) >= 2 else None,
                   resume=resume)
    model_dir = out / "model"
    if rank != 0:
        return model_dir
    val = result.val_loss
    meta = {
        "stage": "pretrain",
        "data": {
            "dir": str(data_dir.resolve()),
            "index_sha256": hashlib.sha256((data_dir / "index.json").read_bytes()).hexdigest()[:16],
            "tokenizer_fingerprint": index["tokenizer_fingerprint"],
            "documents": index["documents"],
            "train_tokens": index["splits"]["train"]["tokens"],
            "val_tokens": index["splits"]["val"]["tokens"],
        },
        "train": asdict(train_cfg),
        "metrics": {
            "val_loss": val,
            "val_ppl": math.exp(val) if val is not None and val < 50 else None,
            "train_loss": result.loss,
            "train_tokens": result.tokens,
            "tokens_per_s": round(result.tokens_per_s, 1),
            "train_time_s": round(result.train_time_s, 2),
        },
    }
    save_model_dir(model_dir, model, tokenizer, meta)
    plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png",
                    title=f"pretrain {model_config.n_params / 1e6:.2f}M params")
    return model_dir
