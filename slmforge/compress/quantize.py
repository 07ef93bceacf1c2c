"""Weight-only quantization for CPU decoding: int8 per output channel, int4 in groups of 32.

    slmforge quantize runs/model runs/model-int8 --bits 8
    slmforge export gguf runs/model-int8 model.gguf --type q8_0      # the same weights, for llama.cpp

Every linear layer of the blocks and the output matrix (with tied embeddings, the embedding matrix too)
become integers and scales; norms and (untied) embeddings stay float. The schemes are the two llama.cpp
formats written so that the numbers are the same ones:

    int8   q in [-127, 127] per row scale s:    w = s * q            GGUF Q8_0 with every block's d = s
    int4   q in [0, 15] per 32 values scale d:  w = d * (q - 8)      GGUF Q4_0 as is (d = extreme / -8)

Scales are rounded to values that bfloat16 and float16 both represent exactly: torch's CPU kernels take
bf16 scales (aten._weight_int8pack_mm, aten._weight_int4pack_mm_for_cpu) and GGUF stores fp16 ones, so our
engine and llama.cpp multiply by the same weights.

The quantized directory is a normal model directory whose model.safetensors holds the dequantized weights
(float32: transformers loads it and computes with exactly the quantized values) plus quantized.safetensors
(the integers and scales) and a "quantization" entry in slmforge.json. The decode fast path
(infer/fastpath.py) multiplies by the integer weights where that times faster; everything else (prefill,
training, predict) uses the dequantized weights, which are the same numbers.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from pydantic import with_config
from safetensors.torch import load_file, save_file

from slmforge.errors import ConfigError, SlmforgeError
from slmforge.model import LlamaModel
from slmforge.stage_config import STRICT, setting

QUANT_FILE = "quantized.safetensors"
GROUP = 32  # int4 group size: llama.cpp's Q4_0 block
MIN_SCALE = 2.0 ** -14  # the smallest normal float16: below it fp16 would round the scale
HEAD_FILES = ("classifier_head.safetensors", "tagger_head.safetensors")
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@with_config(STRICT)
@dataclass
class QuantizeConfig:
    """How `slmforge quantize` quantizes a model directory."""

    bits: int = setting(8, "8 (per-channel int8, GGUF Q8_0) or 4 (groups of 32, GGUF Q4_0).")
    lm_head: bool = setting(True, "Quantize the output matrix too (with tied embeddings: the embedding matrix).")

    def __post_init__(self) -> None:
        if self.bits not in (8, 4):
            raise ConfigError("quantize config: bits must be 8 or 4")


@dataclass
class QuantWeight:
    """A quantized (out, in) matrix: int8 q with (out,) scales, or int4 q (uint8 0..15) with (out, in/32)."""

    bits: int
    q: torch.Tensor
    scale: torch.Tensor  # float32, exactly representable in bf16 and fp16

    def dequantize(self) -> torch.Tensor:
        if self.bits == 8:
            return self.q.float() * self.scale[:, None]
        out, n = self.q.shape
        return ((self.q.float().view(out, n // GROUP, GROUP) - 8) * self.scale[..., None]).view(out, n)

    def clone(self) -> QuantWeight:
        return QuantWeight(self.bits, self.q.clone(), self.scale.clone())

    @staticmethod
    def cat(parts: list[QuantWeight]) -> QuantWeight:
        """Rows of several matrices stacked (the fused q/k/v and gate/up projections of the decode path)."""
        return QuantWeight(parts[0].bits, torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))


def exact_scale(s: torch.Tensor) -> torch.Tensor:
    """s rounded to bf16 (which fp16 then holds exactly, being in its normal range), sign kept."""
    mag = s.abs().clamp(min=MIN_SCALE).to(torch.bfloat16).float()
    return torch.where(s < 0, -mag, mag)


def quantize_weight(w: torch.Tensor, bits: int) -> QuantWeight:
    w = w.detach().float()
    if bits == 8:
        s = exact_scale(w.abs().amax(1) / 127)
        return QuantWeight(8, torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8), s)
    out, n = w.shape
    if n % GROUP:
        raise SlmforgeError(f"int4: rows of {n} values are not a multiple of the group size {GROUP}")
    g = w.view(out, n // GROUP, GROUP)
    extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)  # the signed value of largest size
    d = exact_scale(torch.where(extreme == 0, torch.full_like(extreme, MIN_SCALE), extreme / -8))
    q = (torch.round(g / d[..., None]) + 8).clamp(0, 15).to(torch.uint8)
    return QuantWeight(4, q.view(out, n), d)


def quantizable(model: LlamaModel, lm_head: bool = True) -> dict[str, nn.Linear]:
    """The linear layers that are quantized, by HF name prefix."""
    mods = {}
    for i, block in enumerate(model.model.layers):
        for name in LAYER_LINEARS:
            mods[f"model.layers.{i}.{name}"] = block.get_submodule(name)
    if lm_head:
        mods["lm_head"] = model.lm_head
    return mods


def quantize_model(model: LlamaModel, cfg: QuantizeConfig) -> dict[str, QuantWeight]:
    """Quantize in place: each chosen linear's weight becomes its dequantized self and carries `.quant`."""
    quants = {}
    with torch.no_grad():
        for name, lin in quantizable(model, cfg.lm_head).items():
            if cfg.bits == 4 and lin.weight.shape[1] % GROUP:  # stays float, as llama.cpp's converter does
                continue
            qw = quantize_weight(lin.weight, cfg.bits)
            lin.weight.copy_(qw.dequantize())
            lin.quant = qw
            quants[name] = qw
    return quants


def save_quant(path: Path, quants: dict[str, QuantWeight]) -> None:
    state = {}
    for name, qw in quants.items():
        state[f"{name}.qweight"], state[f"{name}.scales"] = qw.q.contiguous(), qw.scale.contiguous()
    save_file(state, str(path), metadata={"format": "slmforge-quant", "bits": str(next(iter(quants.values())).bits)})


def attach_quant(model: LlamaModel, path: Path, info: dict) -> None:
    """Give the model's linears the `.quant` of a quantized directory (ModelDir.load_model calls this),
    checking that the integers are the weights model.safetensors holds."""
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds
        reason = str(e).replace("\r", "\\r").replace("\n", "\\n")  # (it may quote a newline from the header)
        raise SlmforgeError(f"{path}: unreadable or corrupt ({reason})") from None
    bits = info.get("bits")
    mods = quantizable(model, info.get("lm_head", True))
    names = sorted({k.rsplit(".", 1)[0] for k in state})
    if len(names) != info.get("modules"):
        raise SlmforgeError(f"{path}: holds {len(names)} quantized matrices, slmforge.json says {info.get('modules')}")
    for name in names:
        q, s = state.get(f"{name}.qweight"), state.get(f"{name}.scales")
        if name not in mods or q is None or s is None:
            raise SlmforgeError(f"{path}: {name} is not a quantizable matrix of this model, or lacks its "
                                f"qweight/scales")
        lin = mods[name]
        qw = QuantWeight(bits, q, s)
        if q.shape != lin.weight.shape or not torch.equal(qw.dequantize(), lin.weight.detach().float()):
            raise SlmforgeError(f"{path}: {name} does not match model.safetensors (a file was replaced or "
                                f"edited); quantize the model again")
        lin.quant = qw


def quantize_dir(src: str | Path, out: str | Path, cfg: QuantizeConfig) -> Path:
    """Write a quantized copy of model directory `src` at `out`."""
    from slmforge.modeldir import ModelDir, save_model_dir

    md = ModelDir.open(src)
    if md.meta.get("quantization"):
        raise SlmforgeError(f"{md.path}: already quantized ({md.meta['quantization']['scheme']}); quantize the "
                            f"original model")
    model, tok = md.load_model(), md.load_tokenizer()
    quants = quantize_model(model, cfg)
    scheme = {8: "int8 per channel (Q8_0-exact)", 4: f"int4 groups of {GROUP} (Q4_0-exact)"}[cfg.bits]
    info = {**asdict(cfg), "scheme": scheme, "modules": len(quants),
            "kept_float": sorted(set(quantizable(model, cfg.lm_head)) - set(quants)),
            "quantized_params": sum(q.q.numel() for q in quants.values())}
    meta = {**md.meta, "stage": "quantize", "quantization": info,
            "parent": {"path": str(md.path.resolve()), "stage": md.meta.get("stage")}}
    def extra(tmp: Path) -> None:
        save_quant(tmp / QUANT_FILE, quants)
        for head in HEAD_FILES:  # a classifier or tagger head stays float, as it was
            if (md.path / head).is_file():
                shutil.copy2(md.path / head, tmp / head)

    return save_model_dir(out, model, tok, meta, generation=md.generation_config, extra=extra)


def weights_bytes(model_dir: str | Path) -> int:
    """Bytes of weights a runtime needs: model.safetensors for a float directory; for a quantized one its
    integers and scales plus the float tensors it leaves (norms, unquantized linears; a tied embedding is
    covered by the quantized lm_head, as in GGUF). The directory also keeps the dequantized floats in
    model.safetensors, for transformers; those are not counted here."""
    from safetensors import safe_open

    d = Path(model_dir)
    if not (d / QUANT_FILE).is_file():
        return (d / "model.safetensors").stat().st_size
    with safe_open(str(d / QUANT_FILE), "pt") as f:
        quantized = {k.rsplit(".", 1)[0] for k in f.keys()}  # noqa: SIM118 - safe_open has keys(), not iteration
    if "lm_head" in quantized:
        quantized.add("model.embed_tokens")
    floats = 0
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        for k in f.keys():  # noqa: SIM118
            if k.rsplit(".", 1)[0] not in quantized:
                s = f.get_slice(k)
                floats += math.prod(s.get_shape()) * 4
    return (d / QUANT_FILE).stat().st_size + floats
