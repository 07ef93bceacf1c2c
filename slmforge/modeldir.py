"""The model directory: the one artifact every stage reads and writes.

    config.json              LlamaForCausalLM config (transformers loads the directory as is)
    model.safetensors        weights under HF key names; lm_head.weight omitted when tied
    tokenizer.json, tokenizer_config.json (chat template), special_tokens_map.json
    generation_config.json   bos/eos ids and default sampling
    slmforge.json            provenance and metrics: what stage made it, from what, how well it does

A directory is written whole into a temp sibling and renamed into place, so an interrupted save never
leaves a half-written model where a good one was.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slmforge import __version__
from slmforge.config import ModelConfig
from slmforge.errors import SlmforgeError
from slmforge.io import read_json, recover_dir_swap, write_dir_atomically, write_json
from slmforge.model import LlamaModel
from slmforge.tokenizer import Tokenizer

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelDir:
    """An opened model directory: config and provenance read, weights loaded on demand."""

    path: Path
    config: ModelConfig
    meta: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> ModelDir:
        path = Path(path)
        recover_dir_swap(path)  # a save that crashed between its two renames is finished first
        if not path.is_dir():
            raise SlmforgeError(f"{path}: not a model directory (no such folder)")
        for name in REQUIRED_FILES:
            if not (path / name).is_file():
                raise SlmforgeError(f"{path / name}: missing (a model directory needs {', '.join(REQUIRED_FILES)})")
        config = ModelConfig.from_hf_dict(read_json(path / "config.json"), source=str(path / "config.json"))
        meta = read_json(path / "slmforge.json") if (path / "slmforge.json").is_file() else {}
        if not isinstance(meta, dict):
            raise SlmforgeError(f"{path / 'slmforge.json'}: expected a JSON object")
        return cls(path, config, meta)

    def load_model(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LlamaModel:
        model = LlamaModel(self.config)
        state = load_safetensors(self.path / "model.safetensors")
        load_state(model, state, source=str(self.path / "model.safetensors"))
        if self.meta.get("quantization"):  # the integer weights the decode fast path multiplies by
            from slmforge.compress.quantize import QUANT_FILE, attach_quant

            attach_quant(model, self.path / QUANT_FILE, self.meta["quantization"])
        model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
        return model.eval()

    def load_tokenizer(self) -> Tokenizer:
        return Tokenizer.from_dir(self.path)

    @property
    def generation_config(self) -> dict:
        p = self.path / "generation_config.json"
        return read_json(p) if p.is_file() else {}


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SlmforgeError(f"{path}: unreadable or corrupt safetensors file ({e})") from None


def load_state(model: LlamaModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Load HF-named weights, checking names and shapes; a tied lm_head may be absent."""
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise SlmforgeError(f"{source}: weights do not match config.json "
                            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise SlmforgeError(f"{source}: {k} has shape {tuple(v.shape)}, config.json implies "
                                f"{tuple(expected[k].shape)}")
    with torch.no_grad():
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)


def save_model_dir(
    out: str | Path,
    model: LlamaModel,
    tokenizer: Tokenizer,
    meta: dict | None = None,
    dtype: str = "float32",
    generation: dict | None = None,
    extra=None,
) -> Path:
    """Write a complete model directory atomically (replacing any previous one at `out`); extra(tmp) may
    write more files into it (a classifier head, quantized weights) before it is swapped into place."""
    out = Path(out)
    if dtype not in _DTYPES:
        raise SlmforgeError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    cfg = model.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise SlmforgeError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id

    def fill(tmp: Path) -> None:
        state = {k: v.detach().to("cpu", _DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", cfg.to_hf_dict(torch_dtype=dtype))
        tokenizer.save(tmp)
        gen = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.stop_ids or tokenizer.eos_id,
               "pad_token_id": tokenizer.pad_id, "do_sample": True, "temperature": 0.8, "top_p": 0.95,
               "max_new_tokens": 256}
        gen.update(generation or {})
        write_json(tmp / "generation_config.json", gen)
        full_meta = {"slmforge_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "params": cfg.n_params, "tokenizer_fingerprint": tokenizer.fingerprint()}
        full_meta.update(meta or {})
        write_json(tmp / "slmforge.json", full_meta)
        if extra is not None:
            extra(tmp)

    return write_dir_atomically(out, fill)


def update_meta(path: str | Path, **fields) -> dict:
    """Merge fields into slmforge.json (atomically), e.g. metrics added by an evaluation."""
    p = Path(path) / "slmforge.json"
    meta = read_json(p) if p.is_file() else {}
    meta.update(fields)
    write_json(p, meta)
    return meta


def describe(path: str | Path) -> str:
    md = ModelDir.open(path)
    c = md.config
    return json.dumps({"path": str(md.path), "params": c.n_params, "layers": c.num_hidden_layers,
                       "hidden": c.hidden_size, "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
                       "vocab": c.vocab_size, "ctx": c.max_position_embeddings, "stage": md.meta.get("stage")},
                      indent=2)
