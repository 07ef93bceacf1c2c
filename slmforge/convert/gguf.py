"""Export a model directory to GGUF (v3), the file llama.cpp and Ollama run, with the `gguf` package that
llama.cpp maintains.

    export_gguf("runs/quickstart/pretrain/model", "model.gguf", "q8_0")

Architecture `llama` (or `qwen2` for a model with q/k/v bias and no o_proj bias, as imported Qwen2
models are), llama.cpp's tensor names, and the tokenizer inside the file:

- our byte-level BPE: `tokenizer.ggml.model = "gpt2"` with tokens, merges and pre-tokenizer `gpt-2`
  (the GPT-2 split regex, which is what `pre_tokenizers.ByteLevel(use_regex=True)` applies);
- llama2.c imports (sentencepiece pieces with byte fallback): `"llama"` with per-piece scores.

RoPE layout: our weights are in HF's rotate-half layout (dims i and i + d/2 rotate together). llama.cpp's
`llama` architecture rotates adjacent pairs (2i, 2i+1), so q/k rows are permuted per head exactly as
llama.cpp's convert_hf_to_gguf.py does (`LlamaModel.permute`); `qwen2` uses rotate-half (NEOX) as is.

Types: f32, f16 (1-D norms and biases stay f32, as llama.cpp's converter keeps them), q8_0 and q4_0 (blocks of
32 along each row; a matrix whose rows are not a multiple of 32 long falls back to f16, again as the
converter does). A directory made by `slmforge quantize` exports its own integers and scales as q8_0 (int8)
or q4_0 (int4), block for block, so llama.cpp runs the weights our engine runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from slmforge.config import ModelConfig
from slmforge.errors import SlmforgeError
from slmforge.io import check_out_file, fsync_dir
from slmforge.modeldir import ModelDir, check_state, load_safetensors
from slmforge.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
TYPES = {  # --type: (the type of large matrices, the file type recorded in the header)
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# a quantized directory (compress/quantize.py) exports its own integers and scales in this type
EXACT_TYPE = {8: "q8_0", 4: "q4_0"}
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
SPM_SPACE = "\u2581"


@dataclass
class Vocab:
    """What the tokenizer.ggml.* keys hold."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (sentencepiece)
    tokens: list[str]
    types: list[int]
    merges: list[str] | None = None  # "a b", gpt2 only
    scores: list[float] | None = None  # llama only
    pre: str | None = None  # pre-tokenizer, gpt2 only


# ----------------------------------------------------------------------------------------- weights


def permute_for_llama_cpp(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half rows -> adjacent-pair rows, per head (llama.cpp's convert_hf_to_gguf permute).

    Within a head, row j of the first half pairs with row j + d/2; llama.cpp wants them at 2j and 2j+1.
    Works on a weight (rows, in) and on a bias (rows,).
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def choose_arch(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> str:
    if not cfg.attention_bias:
        return "llama"
    o_bias = [v for k, v in state.items() if k.endswith("o_proj.bias")]
    return "qwen2" if all(not b.any() for b in o_bias) else "llama"  # llama.cpp's qwen2 has no o bias


def gguf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor], arch: str) -> dict[str, np.ndarray]:
    """HF-named weights -> llama.cpp-named float32 arrays, q/k permuted for the `llama` rope layout."""
    def get(k: str) -> torch.Tensor:
        if k not in state:
            raise SlmforgeError(f"model.safetensors: {k} missing")
        return state[k].float()

    def rope_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
        return permute_for_llama_cpp(t, n_heads) if arch == "llama" else t

    out = {"token_embd.weight": get("model.embed_tokens.weight"), "output_norm.weight": get("model.norm.weight")}
    if not cfg.tie_word_embeddings:  # tied: llama.cpp reads the output matrix from token_embd
        out["output.weight"] = get("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = get(p + "input_layernorm.weight")
        out[b + "attn_q.weight"] = rope_rows(get(p + "self_attn.q_proj.weight"), cfg.num_attention_heads)
        out[b + "attn_k.weight"] = rope_rows(get(p + "self_attn.k_proj.weight"), cfg.num_key_value_heads)
        out[b + "attn_v.weight"] = get(p + "self_attn.v_proj.weight")
        out[b + "attn_output.weight"] = get(p + "self_attn.o_proj.weight")
        if cfg.attention_bias:
            out[b + "attn_q.bias"] = rope_rows(get(p + "self_attn.q_proj.bias"), cfg.num_attention_heads)
            out[b + "attn_k.bias"] = rope_rows(get(p + "self_attn.k_proj.bias"), cfg.num_key_value_heads)
            out[b + "attn_v.bias"] = get(p + "self_attn.v_proj.bias")
            if arch == "llama":
                out[b + "attn_output.bias"] = get(p + "self_attn.o_proj.bias")
        out[b + "ffn_norm.weight"] = get(p + "post_attention_layernorm.weight")
        out[b + "ffn_gate.weight"] = get(p + "mlp.gate_proj.weight")
        out[b + "ffn_up.weight"] = get(p + "mlp.up_proj.weight")
        out[b + "ffn_down.weight"] = get(p + "mlp.down_proj.weight")
    return {k: v.contiguous().numpy() for k, v in out.items()}


def gguf_name(hf: str, cfg: ModelConfig) -> str:
    if hf == "lm_head":
        return "token_embd.weight" if cfg.tie_word_embeddings else "output.weight"
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[rest]}.weight"


def quantized_blocks(cfg: ModelConfig, state: dict[str, torch.Tensor], md: ModelDir, arch: str) -> dict[str, np.ndarray]:
    """A quantized directory's integers and scales as GGUF Q8_0 / Q4_0 blocks (so llama.cpp multiplies by the
    very weights our engine does): int8's per-row scale is every block's d; int4 is Q4_0 already."""
    from slmforge.compress.quantize import GROUP, QUANT_FILE

    info = md.meta["quantization"]
    qstate = load_safetensors(md.path / QUANT_FILE)
    model_names = sorted({k.rsplit(".", 1)[0] for k in qstate})
    ints, scales = dict(state), dict(state)  # gguf_tensors maps and permutes them like the weights
    for hf in model_names:
        q, s = qstate[f"{hf}.qweight"], qstate[f"{hf}.scales"]
        key = "model.embed_tokens.weight" if hf == "lm_head" and cfg.tie_word_embeddings else f"{hf}.weight"
        ints[key] = q.float()
        scales[key] = s[:, None].expand(-1, q.shape[1] // GROUP) if info["bits"] == 8 else s
    ints, scales = gguf_tensors(cfg, ints, arch), gguf_tensors(cfg, scales, arch)
    out = {}
    for hf in model_names:
        name = gguf_name(hf, cfg)
        q, d = ints[name], scales[name].astype(np.float16)  # exact: the scales are fp16 values
        rows, n = q.shape
        if n % GROUP:  # no GGUF block fits: written from the dequantized weights (encode_tensor)
            continue
        d = d.reshape(rows, n // GROUP, 1).view(np.uint8)  # (rows, blocks, 2 bytes)
        if info["bits"] == 8:
            body = q.astype(np.int8).reshape(rows, n // GROUP, GROUP).view(np.uint8)
        else:
            nib = q.astype(np.uint8).reshape(rows, n // GROUP, 2, GROUP // 2)
            body = nib[:, :, 0] | (nib[:, :, 1] << 4)  # byte j: value j (low nibble), value j + 16 (high)
        out[name] = np.concatenate([d, body], axis=-1).reshape(rows, -1)
    return out


def encode_tensor(data: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    """(bytes or floats to write, the type they are in): 1-D stays f32, q8_0 needs rows of 32k values."""
    if data.ndim == 1 or qtype == Q.F32:
        return data.astype(np.float32), Q.F32
    if qtype in (Q.Q8_0, Q.Q4_0) and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
        qtype = Q.F16
    return gguf.quants.quantize(data, qtype), qtype


# ---------------------------------------------------------------------------------------- tokenizer


def gguf_vocab(tok: Tokenizer, n_vocab: int) -> Vocab:
    """The tokenizer as GGUF stores it, padded with unused tokens up to the model's embedding rows."""
    spec = json.loads(tok.tok.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise SlmforgeError(f"GGUF export: unsupported tokenizer model {model.get('type')!r} (need BPE)")
    by_id = {i: t for t, i in tok.tok.get_vocab(with_added_tokens=True).items()}
    if len(by_id) > n_vocab:
        raise SlmforgeError(f"GGUF export: the tokenizer has {len(by_id)} tokens, the model only {n_vocab}")
    special = {a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
    added = {a["content"] for a in spec.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]

    if model.get("byte_fallback") and SPM_SPACE in json.dumps(spec.get("normalizer"), ensure_ascii=False):
        # Sentencepiece: llama.cpp merges the adjacent pair whose concatenation scores highest. Our BPE
        # applies the lowest-ranked merge first, so a piece's score is minus the rank of its first merge:
        # both then pick the same merges in the same order. Pieces no merge makes score 0.
        scores = [0.0] * n_vocab
        ranks: dict[str, int] = {}
        for r, m in enumerate(merges):
            ranks.setdefault(m.replace(" ", ""), r)
        for i, t in enumerate(tokens):
            if t in ranks:
                scores[i] = -float(ranks[t] + 1)
        types = [gguf.TokenType.UNKNOWN if t == model.get("unk_token") else
                 gguf.TokenType.CONTROL if t in special else
                 gguf.TokenType.BYTE if len(t) == 6 and t.startswith("<0x") and t.endswith(">") else
                 gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL
                 for i, t in enumerate(tokens)]
        return Vocab("llama", tokens, [int(t) for t in types], scores=scores)

    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        raise SlmforgeError(f"GGUF export: pre-tokenizer {json.dumps(pre)[:120]} has no llama.cpp equivalent "
                            f"known here (supported: ByteLevel with the GPT-2 regex, sentencepiece byte fallback)")
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.USER_DEFINED if t in added else
             gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL for i, t in enumerate(tokens)]
    return Vocab("gpt2", tokens, [int(t) for t in types], merges=merges, pre="gpt-2")


# ------------------------------------------------------------------------------------------- export


def export_gguf(model_dir: str | Path, out: str | Path, type: str = "f16") -> Path:
    """Write `out` (a .gguf file, atomically) from a model directory; type is f32, f16 or q8_0."""
    if type not in TYPES:
        raise SlmforgeError(f"GGUF type {type!r}: choose one of {', '.join(TYPES)}")
    out = Path(out)
    check_out_file(out)
    md = ModelDir.open(model_dir)
    cfg, tok = md.config, md.load_tokenizer()
    state = load_safetensors(md.path / "model.safetensors")
    check_state(cfg, state, str(md.path / "model.safetensors"))  # names, shapes, NaN: as a load would
    arch = choose_arch(cfg, state)
    tensors = gguf_tensors(cfg, state, arch)
    quant = md.meta.get("quantization")
    exact = {}
    if quant:
        if type != EXACT_TYPE[quant["bits"]] and type not in ("f32", "f16"):
            raise SlmforgeError(f"{md.path}: {quant['bits']}-bit weights export exactly as {EXACT_TYPE[quant['bits']]} "
                                f"(or as f32/f16); {type} would quantize them a second time")
        if type == EXACT_TYPE[quant["bits"]]:
            # the integers are written as they are: first the check a load makes (attach_quant: every matrix
            # there, of its shape, and dequantizing to model.safetensors), so a damaged file is an error
            md.load_model()
            exact = quantized_blocks(cfg, state, md, arch)
    vocab = gguf_vocab(tok, cfg.vocab_size)
    qtype, file_type = TYPES[type]

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(md.path.resolve().name)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_vocab_size(cfg.vocab_size)

        w.add_tokenizer_model(vocab.model)
        if vocab.pre:
            w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        if vocab.merges is not None:
            w.add_token_merges(vocab.merges)
        if vocab.scores is not None:
            w.add_token_scores(vocab.scores)
            w.add_unk_token_id(0)
            w.add_add_space_prefix(True)  # sentencepiece's dummy prefix, as our normalizer prepends ▁
        if tok.bos_id is not None:
            w.add_bos_token_id(tok.bos_id)
            w.add_add_bos_token(True)  # slmforge's completions start with bos; its chat template writes it
        if tok.eos_id is not None:
            w.add_eos_token_id(tok.eos_id)
        if tok.pad_id is not None:
            w.add_pad_token_id(tok.pad_id)
        # Other ids that end a reply (<|end|>, or <s> for llama2.c stories, which never emit </s>) become
        # end-of-turn, which llama.cpp and Ollama also stop at.
        eot = [i for i in tok.stop_ids if i != tok.eos_id]
        if eot:
            w.add_eot_token_id(eot[0])
        w.add_add_eos_token(False)
        if tok.chat_template:
            w.add_chat_template(tok.chat_template)

        for name, data in tensors.items():
            encoded, raw_type = (exact[name], qtype) if name in exact else encode_tensor(data, qtype)
            w.add_tensor(name, encoded, raw_dtype=raw_type if raw_type not in (Q.F32, Q.F16) else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a model file is meant to be shared
        with open(tmp, "rb") as f:  # on disk before the name points at it
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError as e:  # (naming `out`: the temp file means nothing to the user)
        Path(tmp).unlink(missing_ok=True)
        raise SlmforgeError(f"{out}: cannot write ({e.strerror or e})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
