"""The Llama-family decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention, optional attention bias,
tied embeddings and a preallocated KV cache.

Module and parameter names mirror transformers' LlamaForCausalLM, so `state_dict()` keys are the HF
safetensors keys (model.layers.0.self_attn.q_proj.weight, ...) and no renaming is needed either way.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmforge.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as HF does; under bf16 autocast the mean of squares would lose precision.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cache(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_len, head_dim), in the non-interleaved (rotate-half) layout of HF."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(max_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D) or (B, 1, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys/values for every layer: (layers, B, kv_heads, max_len, head_dim).

    Writing a step copies into the buffer in place, so decoding never reallocates. A batch engine gives
    each request a row (a slot): `rows(a, b)` is a view of rows a..b sharing the same storage.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions filled so far (same for every row of the batch)

    def rows(self, start: int, stop: int) -> KVCache:
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.max_len, view.length = self.max_len, 0
        return view

    def update(self, layer: int, pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, kv_heads, T, head_dim) at pos; return all keys/values to attend to.

        pos is an int (every row at the same place) or, for one new token per row, a (B,) tensor of
        per-row positions; then the first kv_len positions are returned and a mask hides the rest.
        """
        if isinstance(pos, torch.Tensor):
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[layer, rows, :, pos] = k[:, :, 0]
            self.v[layer, rows, :, pos] = v[:, :, 0]
            return self.k[layer, :, :, :kv_len], self.v[layer, :, :, :kv_len]
        T = k.shape[2]
        self.k[layer, :, :, pos:pos + T] = k
        self.v[layer, :, :, pos:pos + T] = v
        return self.k[layer, :, :, :pos + T], self.v[layer, :, :, :pos + T]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=bias)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, pos: int | torch.Tensor,
                mask: torch.Tensor | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            kv_len = mask.shape[-1] if mask is not None else None
            k, v = cache.update(layer, pos, k.to(cache.k.dtype), v.to(cache.v.dtype), kv_len)
            k, v = k.to(q.dtype), v.to(q.dtype)
        # Query heads share kv heads in groups (HF's repeat_kv); SDPA does that without copying k and v.
        gqa = self.n_kv != self.n_heads
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            # Causal when there is no prefix; a single new token attends to the whole prefix.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=(pos == 0 and T > 1), enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, layer, pos, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The `model.` prefix of HF keys: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_cache(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2·layers)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
                continue
            s = std / math.sqrt(2 * self.config.num_hidden_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * s)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        pos: int | torch.Tensor = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, hidden) after the final norm: what lm_head sees (also the features for classifier heads
        and embeddings). Arguments as in forward."""
        B, T = idx.shape
        if isinstance(pos, torch.Tensor):
            # The caller (the batch engine) keeps positions within the context; checking here would sync.
            if cache is None or T != 1:
                raise ValueError("per-row positions need a cache and one token per row")
            if mask is None:
                mask = torch.arange(cache.max_len, device=idx.device) <= pos[:, None]
                mask = mask[:, None, None, :]
            cos, sin = self.rope_cos[pos][:, None, None], self.rope_sin[pos][:, None, None]  # (B, 1, 1, D)
        else:
            if pos + T > self.config.max_position_embeddings:
                raise ValueError(f"sequence of {pos + T} tokens exceeds max_position_embeddings "
                                 f"{self.config.max_position_embeddings}")
            if mask is None and cache is not None and pos > 0 and T > 1:
                # A chunk after a cached prefix: causal within the chunk, full view of the prefix.
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=idx.device).tril(pos)
            cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        x = self.model.embed_tokens(idx)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, cache, i, pos, mask)
        if cache is not None and not isinstance(pos, torch.Tensor):
            cache.length = pos + T
        return self.model.norm(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        pos: int | torch.Tensor = 0,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
        ignore_index: int = -100,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids starting at position `pos`. Returns (logits, loss).

        targets: (B, T) ids, `ignore_index` where no loss is wanted; loss is mean cross-entropy in fp32.
        cache: write keys/values at positions pos..pos+T and attend to everything before.
        pos: an int, or a (B,) tensor of per-row positions for batched decoding (T == 1) of sequences of
            different lengths; then keys are read up to mask's last dimension (default: the whole cache).
        mask: optional boolean (B or 1, 1, T, S) attention mask, True where attending is allowed.
        last_only: compute logits for the last position only (generation).
        """
        x = self.hidden_states(idx, cache, pos, mask)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=ignore_index)
        return logits, loss
