"""Import a local Hugging Face Llama / Qwen2 / SmolLM directory into a slmforge model directory.

Our decoder uses transformers' LlamaForCausalLM key names, so importing is mostly checking: the
architecture is one our model computes exactly (SiLU SwiGLU, RMSNorm, plain RoPE, full attention), the
weights match the config, and the tokenizer is a fast one (tokenizer.json) whose special tokens we know.

    Llama, SmolLM (= Llama)   taken as is; tied or untied embeddings, GQA, any rope_theta
    Qwen2                     q/k/v bias: imported as LlamaConfig attention_bias with a zero o_proj bias,
                              which computes the same thing and keeps the directory loadable by transformers

Weights are read from model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin
(torch.load with weights_only=True, so a pickle cannot run code).
"""

from __future__ import annotations

from pathlib import Path

import torch

from slmforge.config import ModelConfig
from slmforge.errors import SlmforgeError
from slmforge.io import read_json
from slmforge.model import LlamaModel
from slmforge.modeldir import load_safetensors, load_state, save_model_dir
from slmforge.tokenizer import Tokenizer

SUPPORTED = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def resolve_source(src: str | Path) -> Path:
    """A local directory, or a hub id already in the local Hugging Face cache (nothing is downloaded)."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists():
        raise SlmforgeError(f"{src}: not a directory (pass the folder holding config.json and the weights)")
    name = str(src)
    if name.count("/") == 1 and not name.startswith((".", "/")):  # looks like a hub id: org/name
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, local_files_only=True))
        except Exception:
            raise SlmforgeError(
                f"{src}: no such local directory, and not in the local Hugging Face cache; slmforge does not "
                f"download: fetch it with `huggingface-cli download {name} --local-dir DIR` and import DIR"
            ) from None
    raise SlmforgeError(f"{src}: no such directory")


def hf_config_to_ours(d: dict, source: str) -> ModelConfig:
    """Check a transformers config.json dict and convert it; errors name the field that is unsupported."""
    if not isinstance(d, dict):
        raise SlmforgeError(f"{source}: expected a JSON object")
    archs = d.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in SUPPORTED:
        raise SlmforgeError(f"{source}: architectures {archs!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED)}; SmolLM is LlamaForCausalLM)")
    d = dict(d)
    d.setdefault("model_type", SUPPORTED[arch])
    rope = d.get("rope_parameters") or {}  # transformers >= 5 (ModelConfig.from_hf_dict reads rope_theta)
    if rope.get("rope_type", "default") != "default":
        raise SlmforgeError(f"{source}: rope_parameters.rope_type {rope['rope_type']!r} is not supported "
                            f"(only default RoPE)")
    checks = [
        ("mlp_bias", not d.get("mlp_bias", False), "MLP biases are not supported"),
        ("use_sliding_window", not d.get("use_sliding_window", False), "sliding-window attention is not supported"),
        ("pretraining_tp", d.get("pretraining_tp", 1) == 1, "pretraining_tp != 1 is not supported"),
        ("layer_types", all(t == "full_attention" for t in d.get("layer_types") or []),
         "only full_attention layers are supported"),
    ]
    for key, ok, msg in checks:
        if not ok:
            raise SlmforgeError(f"{source}: {key} = {d.get(key)!r}: {msg}")
    return ModelConfig.from_hf_dict(d, source=source)


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """HF-named tensors from model.safetensors, its sharded index, or pytorch_model.bin (and its index)."""
    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    pt_single, pt_index = src / "pytorch_model.bin", src / "pytorch_model.bin.index.json"
    if single.is_file():
        return load_safetensors(single)
    if index.is_file() or pt_index.is_file():
        idx_path = index if index.is_file() else pt_index
        shards = sorted(set(read_json(idx_path).get("weight_map", {}).values()))
        if not shards:
            raise SlmforgeError(f"{idx_path}: weight_map is empty")
        state: dict[str, torch.Tensor] = {}
        for name in shards:
            shard = src / name
            if not shard.is_file():
                raise SlmforgeError(f"{shard}: missing (listed in {idx_path.name})")
            state.update(load_safetensors(shard) if idx_path is index else _torch_load(shard))
        return state
    if pt_single.is_file():
        return _torch_load(pt_single)
    raise SlmforgeError(f"{src}: no weights (need model.safetensors, model.safetensors.index.json or "
                        f"pytorch_model.bin)")


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SlmforgeError(f"{path}: unreadable PyTorch weights ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise SlmforgeError(f"{path}: expected a state dict of tensors")
    return state


def read_hf_tokenizer(src: Path, cfg: ModelConfig) -> Tokenizer:
    """tokenizer.json + tokenizer_config.json, with the chat template (also from chat_template.jinja) and
    bos/eos/pad filled from config.json ids where tokenizer_config.json leaves them out (pad falls back to eos)."""
    if not (src / "tokenizer.json").is_file():
        hint = " (only a slow sentencepiece tokenizer.model; save it as a fast tokenizer with transformers' " \
               "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))" if (src / "tokenizer.model").is_file() else ""
        raise SlmforgeError(f"{src / 'tokenizer.json'}: missing{hint}")
    tok = Tokenizer.from_dir(src)  # reads the template from tokenizer_config.json or chat_template.jinja

    def name_of(token: str | None, token_id: int | None) -> str | None:
        if token:
            return token
        return tok.tok.id_to_token(token_id) if isinstance(token_id, int) else None

    bos = name_of(tok.bos, cfg.bos_token_id)
    eos = name_of(tok.eos, cfg.eos_token_id)
    pad = name_of(tok.pad, cfg.pad_token_id) or eos
    stop = [t for t in (tok.tok.id_to_token(i) for i in tok.stop_ids) if t]
    out = Tokenizer(tok.tok, bos=bos, eos=eos, pad=pad, chat_template=tok.chat_template, stop_tokens=stop)
    gen = src / "generation_config.json"
    if gen.is_file():  # the source's own list of ids that end a reply (e.g. Qwen's <|im_end|>, <|endoftext|>)
        ids = read_json(gen).get("eos_token_id")
        ids = ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else []
        out.stop_ids = list(dict.fromkeys([*out.stop_ids, *ids]))
    return out


def import_hf(src_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Convert a local HF Llama/Qwen2/SmolLM directory (or a cached hub id) into a model directory."""
    src = resolve_source(src_dir)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise SlmforgeError(f"{cfg_path}: missing (not a Hugging Face model directory)")
    hf_cfg = read_json(cfg_path)
    cfg = hf_config_to_ours(hf_cfg, str(cfg_path))
    state = read_hf_weights(src)
    # Old checkpoints store RoPE frequencies as a buffer; we recompute them.
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if hf_cfg.get("model_type") == "qwen2":  # Qwen2 has q/k/v bias but none on o_proj: a zero bias is exact
        for i in range(cfg.num_hidden_layers):
            key = f"model.layers.{i}.self_attn.o_proj.bias"
            state.setdefault(key, torch.zeros(cfg.hidden_size))
    if not cfg.tie_word_embeddings and "lm_head.weight" not in state:
        raise SlmforgeError(f"{src}: tie_word_embeddings is false but the weights have no lm_head.weight")
    tokenizer = read_hf_tokenizer(src, cfg)
    model = LlamaModel(cfg)
    load_state(model, state, source=str(src))
    meta = {"stage": "import-hf", "source": str(Path(src_dir)), "architecture": hf_cfg["architectures"][0],
            "source_model_type": hf_cfg.get("model_type")}
    return save_model_dir(out_dir, model, tokenizer, meta, dtype=dtype)
