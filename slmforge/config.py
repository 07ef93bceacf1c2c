"""Model configuration: one dataclass with Hugging Face LlamaConfig field names, plus size presets."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

from slmforge.errors import SlmforgeError, check_types


@dataclass
class ModelConfig:
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 172
    num_hidden_layers: int = 5
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int | None = None  # defaults to hidden_size // num_attention_heads
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    # Bias on q/k/v/o projections (LlamaConfig semantics). Qwen2 has q/k/v bias only: its import sets
    # this and fills o_proj.bias with zeros, which keeps the directory loadable as LlamaForCausalLM.
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads <= 0 or self.num_key_value_heads <= 0:  # before dividing by them
            raise SlmforgeError("model config: head counts must be positive")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        try:  # as floats: torch takes a Python int as int64, and 2**70 from config.json overflowed in forward
            self.rope_theta, self.rms_norm_eps = float(self.rope_theta), float(self.rms_norm_eps)
            self.initializer_range = float(self.initializer_range)
        except OverflowError:
            raise SlmforgeError("model config: rope_theta, rms_norm_eps and initializer_range must be finite") from None
        checks = [
            (self.vocab_size > 0, "vocab_size must be positive"),
            (min(self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.head_dim) > 0,
             "hidden_size, intermediate_size, num_hidden_layers and head_dim must be positive"),
            (self.rope_theta > 0 and self.rms_norm_eps > 0, "rope_theta and rms_norm_eps must be positive"),
            (self.rms_norm_eps < 1, "rms_norm_eps must be below 1 (it is a guard against dividing by 0: 1e-5, 1e-6)"),
            # inf passes `> 0`: an infinite rope_theta turns RoPE off and an infinite eps zeroes every norm
            (math.isfinite(self.rope_theta) and math.isfinite(self.rms_norm_eps)
             and math.isfinite(self.initializer_range), "rope_theta, rms_norm_eps and initializer_range must be finite"),
            (self.num_attention_heads % self.num_key_value_heads == 0,
             "num_attention_heads must be a multiple of num_key_value_heads"),
            (self.head_dim % 2 == 0, "head_dim must be even (RoPE rotates pairs)"),
            (self.max_position_embeddings > 0, "max_position_embeddings must be positive"),
            # upper bounds far above any real model, so that a corrupt config.json is an error rather than
            # an attempt to allocate (or to build module by module) a model of that size
            *((v <= hi, f"{k} {v:,} is larger than any model's (at most {hi:,})") for k, v, hi in (
                ("vocab_size", self.vocab_size, 1 << 24), ("hidden_size", self.hidden_size, 1 << 17),
                ("intermediate_size", self.intermediate_size, 1 << 20),
                ("num_hidden_layers", self.num_hidden_layers, 1 << 10),
                ("num_attention_heads", self.num_attention_heads, 1 << 12),
                ("num_key_value_heads", self.num_key_value_heads, 1 << 12),
                ("head_dim", self.head_dim, 1 << 12),
                ("max_position_embeddings", self.max_position_embeddings, 1 << 20))),
        ]
        for ok, msg in checks:
            if not ok:
                raise SlmforgeError(f"model config: {msg}")

    @property
    def n_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, h, L, V = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d
        if self.attention_bias:
            attn += q + 2 * kv + d
        per_layer = attn + 3 * d * h + 2 * d
        head = 0 if self.tie_word_embeddings else V * d
        return V * d + L * per_layer + d + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12·L·d_attn·T."""
        # With tied embeddings the lm_head matmul uses the embedding matrix, so 6N still counts it once.
        attn = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6 * self.n_params + attn

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict:
        """config.json for transformers' LlamaForCausalLM."""
        d = dataclasses.asdict(self)
        d.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_act="silu",
            mlp_bias=False,
            attention_dropout=0.0,
            pretraining_tp=1,
            rope_scaling=None,
            use_cache=True,
            torch_dtype=torch_dtype,
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        """Build from a Llama/Qwen2/SmolLM config.json dict; unknown keys are ignored, known ones are
        checked by type (errors start with `source`, the file's name)."""
        if not isinstance(d, dict):
            raise SlmforgeError(f"{source}: expected a JSON object")
        if d.get("hidden_act", "silu") != "silu":
            raise SlmforgeError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (need 'silu')")
        if d.get("rope_scaling"):
            raise SlmforgeError(f"{source}: rope_scaling is not supported yet")
        rope = d.get("rope_parameters") or {}  # transformers >= 5 writes rope_theta in here
        if not isinstance(rope, dict):
            raise SlmforgeError(f"{source}: rope_parameters: expected a mapping, got {rope!r}")
        if rope.get("rope_type", "default") != "default":
            raise SlmforgeError(f"{source}: rope_parameters.rope_type {rope['rope_type']!r} is not supported "
                                f"(only default RoPE)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        if "rope_theta" not in kw and "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        kw.setdefault("num_key_value_heads", d.get("num_attention_heads", cls.num_key_value_heads))
        if d.get("model_type") == "qwen2":
            kw["attention_bias"] = True
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(kw.get(k), list) and kw[k]:  # some configs list several eos ids; keep the first
                kw[k] = kw[k][0]
        try:
            # by type first: a "192" or a null would otherwise surface as a TypeError deep inside torch
            check_types(kw, typing.get_type_hints(cls))
            return cls(**kw)
        except SlmforgeError as e:
            raise SlmforgeError(f"{source}: {str(e).removeprefix('model config: ')}") from None


def _llama2c_hidden(dim: int, multiple_of: int) -> int:
    # llama2.c / Meta Llama: 2/3 of 4·dim, rounded up to a multiple
    h = int(2 * (4 * dim) / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


# name -> (hidden, layers, heads, kv heads, intermediate, ctx, default vocab)
# Sizes span ~0.2M to ~1B parameters. "260k" and "15m" are llama2.c's TinyStories models.
_PRESETS = {
    "200k": (64, 4, 4, 2, 172, 256, 512),
    "260k": (64, 5, 8, 4, _llama2c_hidden(64, 4), 512, 512),
    "1m": (128, 4, 4, 2, 344, 256, 2048),
    "3m": (192, 6, 6, 2, 512, 256, 4096),
    "5m": (256, 6, 8, 4, 688, 256, 4096),
    "15m": (288, 6, 6, 6, _llama2c_hidden(288, 32), 256, 32000),
    "42m": (512, 8, 8, 8, _llama2c_hidden(512, 32), 1024, 32000),
    "110m": (768, 12, 12, 12, _llama2c_hidden(768, 32), 1024, 32000),
    "135m": (576, 30, 9, 3, 1536, 2048, 49152),  # SmolLM-135M shape
    "360m": (960, 32, 15, 5, 2560, 2048, 49152),  # SmolLM-360M shape
    "1b": (2048, 16, 32, 8, 8192, 2048, 32000),  # TinyLlama/Llama-3.2-1B-like
}

PRESET_NAMES = tuple(_PRESETS)


def preset(name: str, vocab_size: int | None = None, **overrides) -> ModelConfig:
    """A named size preset; vocab_size and any other field may be overridden."""
    key = name.lower()
    if key not in _PRESETS:
        raise SlmforgeError(f"unknown preset {name!r}; choose one of: {', '.join(PRESET_NAMES)}")
    d, L, h, kv, inter, ctx, vocab = _PRESETS[key]
    cfg = dict(
        vocab_size=vocab_size or vocab, hidden_size=d, num_hidden_layers=L, num_attention_heads=h,
        num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=ctx,
    )
    if key in ("135m", "360m"):
        cfg["rope_theta"] = 10000.0
    cfg.update(overrides)
    return ModelConfig(**cfg)
