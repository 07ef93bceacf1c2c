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
        check_meta(meta, path / "slmforge.json")
        return cls(path, config, meta)

    def load_model(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LlamaModel:
        source = str(self.path / "model.safetensors")
        state = load_safetensors(self.path / "model.safetensors")
        # checked before the model is built: config.json declaring a model larger than the file holds must be
        # an error, not an allocation of that size
        check_state(self.config, state, source)
        model = LlamaModel(self.config)
        load_state(model, state, source=source, checked=True)
        if self.meta.get("quantization"):  # the integer weights the decode fast path multiplies by
            from slmforge.compress.quantize import QUANT_FILE, attach_quant

            attach_quant(model, self.path / QUANT_FILE, self.meta["quantization"])
        model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
        return model.eval()

    def load_tokenizer(self) -> Tokenizer:
        tok = Tokenizer.from_dir(self.path)
        # an id the embedding has no row for would be an IndexError in the middle of generation
        top = max(tok.tok.get_vocab(with_added_tokens=True).values(), default=-1)
        if top >= self.config.vocab_size:
            raise SlmforgeError(f"{self.path / 'tokenizer.json'}: has token id {top}, but config.json's "
                                f"vocab_size is {self.config.vocab_size} (a tokenizer of another model?)")
        return tok

    @property
    def generation_config(self) -> dict:
        p = self.path / "generation_config.json"
        return read_json(p) if p.is_file() else {}


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:  # (its text may quote a newline from the header)
        reason = str(e).replace("\r", "\\r").replace("\n", "\\n")
        raise SlmforgeError(f"{path}: unreadable or corrupt safetensors file ({reason})") from None


# slmforge.json entries that commands index into, and what each must hold: a hand-edited or truncated entry
# is an error naming the file when the directory is opened, not a KeyError or TypeError in a later stage
_META_ENTRIES = {
    "quantization": {"bits": int, "modules": int},
    "classifier": {"head": str, "labels": list[str], "seq_len": int},
    "tagger": {"labels": list[str], "seq_len": int},
}


def check_meta(meta: dict, source: Path) -> None:
    """slmforge.json's quantization, classifier and tagger entries, where present, hold what their readers
    (compress/quantize.py, convert/gguf.py, train/heads.py, infer/predict.py) index into."""
    from slmforge.errors import FieldError, check_types

    for entry, fields in _META_ENTRIES.items():
        info = meta.get(entry)
        if info is None or info is False:  # absent (or recorded as "not one")
            continue
        try:
            if not isinstance(info, dict):
                raise FieldError((entry,), f"expected a mapping, got {info!r}"[:120])
            for key in fields:
                if key not in info:
                    raise FieldError((entry, key), "missing")
            check_types(info, fields, (entry,))
            for key in ("seq_len", "modules"):
                if key in fields and info[key] < 1:
                    raise FieldError((entry, key), f"must be at least 1, got {info[key]}")
            if "labels" in fields and not info["labels"]:
                raise FieldError((entry, "labels"), "is empty")
        except FieldError as e:
            raise SlmforgeError(f"{source}: {e}") from None
    q, c = meta.get("quantization"), meta.get("classifier")
    if q and q["bits"] not in (4, 8):
        raise SlmforgeError(f"{source}: quantization.bits: {q['bits']} (slmforge writes 4 or 8)")
    if c and c["head"] not in ("classifier", "generative"):
        raise SlmforgeError(f"{source}: classifier.head: {c['head']!r} (one of classifier, generative)")


def check_state(config: ModelConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """The weights a model of `config` needs, by name, shape and type (floating point, every value finite),
    checked without building that model (its shapes come from a copy on the meta device)."""
    with torch.device("meta"):
        expected = LlamaModel(config).state_dict()
    if config.tie_word_embeddings:
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
        if not v.is_floating_point():  # integers would be cast to floats and run as a silently wrong model
            raise SlmforgeError(f"{source}: {k} is {str(v.dtype).removeprefix('torch.')}, not floating point")
        if not bool(torch.isfinite(v).all()):  # a NaN or inf weight makes every logit NaN
            raise SlmforgeError(f"{source}: {k} holds NaN or infinite values")


def load_state(model: LlamaModel, state: dict[str, torch.Tensor], source: str, checked: bool = False) -> None:
    """Load HF-named weights, checking names, shapes and values (check_state, unless the caller `checked`
    them already); a tied lm_head may be absent."""
    if not checked:
        check_state(model.config, state, source)
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
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
