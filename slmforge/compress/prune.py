"""Structured pruning: a smaller, valid model directory cut from a larger one, ranked on calibration data.

    slmforge prune runs/model runs/pruned --data packed/ --mlp 0.5 --heads 0.5
    slmforge distill pretrain --teacher runs/model --init runs/pruned --data packed/ --out runs/healed

Minitron's recipe (Muralidharan et al. 2024): run the model on a few calibration batches, score every
structure by its activations, keep the most important, then heal the cut model by distilling from the
uncut one.

    width   MLP neurons        mean |input of down_proj| per neuron
            attention heads    mean L2 norm of each head's output (input of o_proj), summed over the query
                               heads of a kv group: whole kv groups go, so the grouping of query heads stays
            embedding channels mean |output| of every RMSNorm per channel (the residual stream's channels)
    depth   layers             block influence, 1 - cos(block input, block output) (ShortGPT); the least
                               influential blocks go

The pruned directory loads in transformers like any other (its config.json names the new sizes; head_dim
is kept and written out).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from pydantic import with_config

from slmforge.config import ModelConfig
from slmforge.errors import ConfigError, SlmforgeError
from slmforge.model import LlamaModel
from slmforge.stage_config import STRICT, setting


@with_config(STRICT)
@dataclass
class PruneConfig:
    """How much `slmforge prune` keeps, and the calibration it ranks on."""

    mlp: float = setting(1.0, "Share of MLP neurons kept.")
    heads: float = setting(1.0, "Share of kv groups (with their query heads) kept.")
    hidden: float = setting(1.0, "Share of embedding (residual) channels kept.")
    layers: int | None = setting(None, "Layers kept (default: all).")
    batches: int = setting(16, "Calibration batches (from the data's train split).")
    batch_size: int = setting(8, "Sequences per calibration batch.")
    seq_len: int = setting(256, "Tokens per calibration sequence.")
    seed: int = setting(0, "Seed of the calibration batches.")
    multiple_of: int = setting(8, "Round kept neuron and channel counts to a multiple of this (kernels like it).")

    def __post_init__(self) -> None:
        for name in ("mlp", "heads", "hidden"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"prune config: {name} must be in (0, 1]")
        if self.layers is not None and self.layers < 1:
            raise ConfigError("prune config: layers must be >= 1")
        if min(self.batches, self.batch_size, self.seq_len, self.multiple_of) < 1:
            raise ConfigError("prune config: batches, batch_size, seq_len and multiple_of must be >= 1")


@torch.no_grad()
def importance(model: LlamaModel, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Activation importance of every prunable structure over the calibration batches."""
    cfg = model.config
    L, H, KV, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    neurons = torch.zeros(L, cfg.intermediate_size)
    heads = torch.zeros(L, H)
    channels = torch.zeros(cfg.hidden_size)
    influence = torch.zeros(L)
    hooks = []

    def on(module: nn.Module, fn):
        def hook(m, args, output):
            fn(m, args, output)  # returns None: a forward hook that returns a value replaces the output
        hooks.append(module.register_forward_hook(hook))

    for i, block in enumerate(model.model.layers):
        on(block.mlp.down_proj, lambda m, a, o, i=i: neurons[i].add_(a[0].float().abs().mean((0, 1))))
        on(block.self_attn.o_proj, lambda m, a, o, i=i: heads[i].add_(
            a[0].float().unflatten(-1, (H, D)).norm(dim=-1).mean((0, 1))))
        on(block, lambda m, a, o, i=i: influence.__setitem__(
            i, influence[i] + 1 - torch.cosine_similarity(a[0].float(), o.float(), dim=-1).mean()))
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            on(norm, lambda m, a, o: channels.add_(o.float().abs().mean((0, 1))))
    on(model.model.norm, lambda m, a, o: channels.add_(o.float().abs().mean((0, 1))))
    try:
        model.eval()
        for x in batches:
            model.hidden_states(x)
    finally:
        for h in hooks:
            h.remove()
    n = len(batches)
    groups = (heads / n).view(L, KV, H // KV).sum(-1)
    return {"neurons": neurons / n, "kv_groups": groups, "channels": channels / n, "layers": influence / n}


def _keep(n: int, share: float, multiple: int) -> int:
    if share >= 1:
        return n
    k = max(multiple, round(n * share / multiple) * multiple) if n >= multiple else max(1, round(n * share))
    return min(n, k)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k).indices.sort().values


def prune_model(model: LlamaModel, scores: dict[str, torch.Tensor], cfg: PruneConfig) -> tuple[LlamaModel, dict]:
    """A new, smaller LlamaModel with the most important structures of `model`; and what was kept."""
    c = model.config
    H, KV, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    layers = _top(scores["layers"], cfg.layers) if cfg.layers and cfg.layers < c.num_hidden_layers else \
        torch.arange(c.num_hidden_layers)
    n_kv = max(1, round(KV * cfg.heads))
    inter = _keep(c.intermediate_size, cfg.mlp, cfg.multiple_of)
    hidden = _keep(c.hidden_size, cfg.hidden, cfg.multiple_of)
    ch = _top(scores["channels"], hidden)
    new = ModelConfig(**{**asdict(c), "hidden_size": hidden, "intermediate_size": inter,
                         "num_hidden_layers": len(layers), "num_attention_heads": n_kv * (H // KV),
                         "num_key_value_heads": n_kv, "head_dim": D})
    out = LlamaModel(new)
    g = H // KV
    with torch.no_grad():
        out.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight[:, ch])
        out.model.norm.weight.copy_(model.model.norm.weight[ch])
        if not c.tie_word_embeddings:
            out.lm_head.weight.copy_(model.lm_head.weight[:, ch])
        kept = {"layers": layers.tolist(), "kv_groups": [], "hidden": hidden, "intermediate": inter}
        for j, i in enumerate(layers.tolist()):
            src, dst = model.model.layers[i], out.model.layers[j]
            kv = _top(scores["kv_groups"][i], n_kv)
            q_heads = (kv[:, None] * g + torch.arange(g)).flatten()
            q_rows = (q_heads[:, None] * D + torch.arange(D)).flatten()
            kv_rows = (kv[:, None] * D + torch.arange(D)).flatten()
            neur = _top(scores["neurons"][i], inter)
            a, b = src.self_attn, dst.self_attn
            b.q_proj.weight.copy_(a.q_proj.weight[q_rows][:, ch])
            b.k_proj.weight.copy_(a.k_proj.weight[kv_rows][:, ch])
            b.v_proj.weight.copy_(a.v_proj.weight[kv_rows][:, ch])
            b.o_proj.weight.copy_(a.o_proj.weight[ch][:, q_rows])
            if c.attention_bias:
                b.q_proj.bias.copy_(a.q_proj.bias[q_rows])
                b.k_proj.bias.copy_(a.k_proj.bias[kv_rows])
                b.v_proj.bias.copy_(a.v_proj.bias[kv_rows])
                b.o_proj.bias.copy_(a.o_proj.bias[ch])
            dst.mlp.gate_proj.weight.copy_(src.mlp.gate_proj.weight[neur][:, ch])
            dst.mlp.up_proj.weight.copy_(src.mlp.up_proj.weight[neur][:, ch])
            dst.mlp.down_proj.weight.copy_(src.mlp.down_proj.weight[ch][:, neur])
            dst.input_layernorm.weight.copy_(src.input_layernorm.weight[ch])
            dst.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight[ch])
            kept["kv_groups"].append(kv.tolist())
    return out.eval(), kept


def prune_dir(src: str | Path, data: str | Path, out: str | Path, cfg: PruneConfig) -> Path:
    """Rank on calibration batches of packed tokens `data`, cut, and write the pruned model directory."""
    from slmforge.data.pack import TokenShards, read_index
    from slmforge.modeldir import ModelDir, save_model_dir

    md = ModelDir.open(src)
    if md.meta.get("quantization"):
        raise SlmforgeError(f"{md.path}: quantized; prune the float model, then quantize")
    tok = md.load_tokenizer()
    index = read_index(data)
    if index.get("tokenizer_fingerprint") != tok.fingerprint():
        raise SlmforgeError(f"{data}: packed with another tokenizer than {md.path}'s")
    seq = min(cfg.seq_len, md.config.max_position_embeddings)
    split = TokenShards(data, "train")
    if len(split) < seq + 1:
        raise SlmforgeError(f"{data}: the train split has {len(split)} tokens, fewer than one calibration window")
    batches = [split.get_batch(i, cfg.batch_size, seq, seed=cfg.seed)[0] for i in range(cfg.batches)]
    model = md.load_model()
    scores = importance(model, batches)
    pruned, kept = prune_model(model, scores, cfg)
    meta = {"stage": "prune", "parent": {"path": str(md.path.resolve()), "stage": md.meta.get("stage"),
                                         "params": md.config.n_params},
            "prune": {**asdict(cfg), "kept": kept, "params": pruned.config.n_params,
                      "params_pct": round(100 * pruned.config.n_params / md.config.n_params, 2),
                      "calibration_tokens": cfg.batches * cfg.batch_size * seq}}
    return save_model_dir(out, pruned, tok, meta, generation=md.generation_config)
