"""Import llama2.c checkpoints (model .bin + tokenizer .bin) into a model directory.

Weights: llama2.c's "legacy" export (version 0: a 7-int header, then raw fp32 arrays in run.c's order)
and its "version 1" export (256-byte header with magic "ak42", fp32, a different array order).
llama2.c applies RoPE to interleaved pairs (x0,x1),(x2,x3)...; our model, like HF Llama, rotates
halves (x_i, x_{i+d/2}), so q/k rows are permuted per head exactly as transformers'
convert_llama_weights_to_hf.py does. After that the checkpoint is an ordinary LlamaForCausalLM.

Tokenizer: llama2.c's tokenizer.bin (sentencepiece pieces with scores) becomes a HF `tokenizers`
BPE with byte fallback that reproduces run.c's `encode` (dummy-prefix space, per-character lookup,
byte fallback, then greedy merging of the highest-scoring adjacent pair).
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch
from tokenizers import AddedToken, decoders, models, normalizers, processors
from tokenizers import Tokenizer as HFTokenizer

from slmforge.config import ModelConfig
from slmforge.errors import SlmforgeError
from slmforge.model import LlamaModel
from slmforge.modeldir import load_state, save_model_dir
from slmforge.tokenizer import Tokenizer

MAGIC = 0x616B3432  # "ak42": llama2.c's versioned export
V1_HEADER_BYTES = 256
SPM_SPACE = "\u2581"  # sentencepiece's '▁', which llama2.c's export turned back into ' '
SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 in every llama2.c tokenizer (run.c hard-codes them)


# -----------------------------------------------------------------------------
# weights


def _read_file(path: str | Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise SlmforgeError(f"{path}: no such {what} file")
    return path.read_bytes()


def _permute_rope(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Interleaved-pair RoPE rows -> rotate-half rows: per head, even rows first, then odd rows."""
    dim = w.shape[1]
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def read_llama2c_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a llama2.c fp32 checkpoint (version 0 or 1) into a config and HF-named state dict."""
    path = Path(path)
    data = _read_file(path, "llama2.c checkpoint")
    if len(data) < 28:
        raise SlmforgeError(f"{path}: too short for a llama2.c checkpoint ({len(data)} bytes)")
    magic = struct.unpack_from("<I", data, 0)[0]
    if magic == MAGIC:
        version = struct.unpack_from("<i", data, 4)[0]
        if version != 1:
            raise SlmforgeError(f"{path}: llama2.c export version {version} is not supported "
                                f"(re-export with export.py --version 0 or 1, fp32)")
        if len(data) < V1_HEADER_BYTES:
            raise SlmforgeError(f"{path}: truncated llama2.c header ({len(data)} bytes)")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", data, 8)
        shared = bool(data[36])
        offset = V1_HEADER_BYTES
    else:
        version = 0
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", data, 0)
        shared = vocab > 0  # the legacy format flags an unshared classifier with a negative vocab size
        vocab = abs(vocab)
        offset = 28

    header = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                  vocab_size=vocab, seq_len=seq_len)
    bad = [k for k, v in header.items() if not 0 < v <= 1 << 20]
    if bad or dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise SlmforgeError(f"{path}: not a llama2.c checkpoint (implausible header {header})")
    head_dim = dim // n_heads
    kv_dim = n_kv * head_dim
    L = n_layers

    # (name, shape) in file order; freq tables are llama2.c's precomputed RoPE, which we recompute.
    emb = [("emb", (vocab, dim))]
    attn_norm, ffn_norm, final_norm = [("attn_norm", (L, dim))], [("ffn_norm", (L, dim))], [("norm", (dim,))]
    mats = [("wq", (L, dim, dim)), ("wk", (L, kv_dim, dim)), ("wv", (L, kv_dim, dim)), ("wo", (L, dim, dim))]
    ffn = [("w1", (L, hidden, dim)), ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim))]
    cls = [] if shared else [("wcls", (vocab, dim))]
    if version == 0:
        freqs = [("freq_real", (seq_len, head_dim // 2)), ("freq_imag", (seq_len, head_dim // 2))]
        layout = emb + attn_norm + mats + ffn_norm + ffn + final_norm + freqs + cls
    else:
        layout = attn_norm + ffn_norm + final_norm + emb + mats + ffn + cls
    n_floats = sum(torch.Size(shape).numel() for _, shape in layout)
    expected = offset + 4 * n_floats
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "too long"
        raise SlmforgeError(f"{path}: {kind} llama2.c checkpoint: {len(data)} bytes, the header "
                            f"({header}) implies {expected}")

    flat = torch.frombuffer(bytearray(data[offset:]), dtype=torch.float32)
    t: dict[str, torch.Tensor] = {}
    pos = 0
    for name, shape in layout:
        n = torch.Size(shape).numel()
        t[name] = flat[pos:pos + n].view(shape)
        pos += n

    cfg = ModelConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=L,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
        max_position_embeddings=seq_len, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=shared,
    )
    sd = {"model.embed_tokens.weight": t["emb"], "model.norm.weight": t["norm"]}
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t["attn_norm"][i]
        sd[p + "self_attn.q_proj.weight"] = _permute_rope(t["wq"][i], n_heads, head_dim)
        sd[p + "self_attn.k_proj.weight"] = _permute_rope(t["wk"][i], n_kv, head_dim)
        sd[p + "self_attn.v_proj.weight"] = t["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = t["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = t["ffn_norm"][i]
        sd[p + "mlp.gate_proj.weight"] = t["w1"][i]
        sd[p + "mlp.down_proj.weight"] = t["w2"][i]
        sd[p + "mlp.up_proj.weight"] = t["w3"][i]
    sd["lm_head.weight"] = t["emb"] if shared else t["wcls"]
    return cfg, {k: v.contiguous().clone() for k, v in sd.items()}


# -----------------------------------------------------------------------------
# tokenizer


def read_llama2c_pieces(path: str | Path) -> tuple[list[str], list[float]]:
    """The raw pieces (with ' ', as run.c sees them) and scores of a llama2.c tokenizer.bin."""
    path = Path(path)
    data = _read_file(path, "llama2.c tokenizer")
    if len(data) < 4:
        raise SlmforgeError(f"{path}: too short for a llama2.c tokenizer")
    max_len = struct.unpack_from("<i", data, 0)[0]
    if not 0 < max_len <= 1 << 16:
        raise SlmforgeError(f"{path}: not a llama2.c tokenizer (max_token_length {max_len})")
    pieces, scores = [], []
    off = 4
    while off < len(data):
        if off + 8 > len(data):
            raise SlmforgeError(f"{path}: truncated at token {len(pieces)}")
        score, n = struct.unpack_from("<fi", data, off)
        off += 8
        if not 0 < n <= max_len or off + n > len(data):
            raise SlmforgeError(f"{path}: token {len(pieces)} has a bad length {n} (truncated or not a "
                                f"llama2.c tokenizer)")
        try:
            pieces.append(data[off:off + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise SlmforgeError(f"{path}: token {len(pieces)} is not valid UTF-8") from None
        scores.append(score)
        off += n
    return pieces, scores


def read_llama2c_tokenizer(path: str | Path) -> Tokenizer:
    """Convert a llama2.c tokenizer.bin into a HF `tokenizers` BPE that encodes exactly like run.c."""
    path = Path(path)
    pieces, scores = read_llama2c_pieces(path)
    # run.c hard-codes <unk>/<s>/</s> at 0..2 (the export wrote bos/eos as "\n<s>\n") and byte b at b+3.
    byte_names = [f"<0x{b:02X}>" for b in range(256)]
    if len(pieces) < 259 or [p.strip() for p in pieces[1:3]] != ["<s>", "</s>"] or pieces[3:259] != byte_names:
        raise SlmforgeError(f"{path}: unexpected llama2.c vocabulary layout (need <unk>, <s>, </s>, then the "
                            f"256 byte pieces <0x00>..<0xFF>, as sentencepiece with byte_fallback makes)")
    names = [*SPECIALS, *(p.replace(" ", SPM_SPACE) for p in pieces[3:])]
    vocab: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in vocab:
            raise SlmforgeError(f"{path}: duplicate piece {name!r} (ids {vocab[name]} and {i})")
        vocab[name] = i

    # run.c merges the adjacent pair whose concatenation is the highest-scoring piece. As BPE merges:
    # one rule per way of splitting a piece into two pieces, ranked by the piece's score (what
    # transformers' SentencePieceExtractor does). Specials never take part, as in run.c.
    merges = []
    for i in range(3, len(names)):
        p = names[i]
        splits = [(vocab[p[:k]], vocab[p[k:]]) for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab]
        merges += [(-scores[i], i, a, b) for a, b in splits if a >= 3 and b >= 3]
    merges.sort()
    bpe = models.BPE(vocab=vocab, merges=[(names[a], names[b]) for _, _, a, b in merges],
                     unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok = HFTokenizer(bpe)
    # run.c prepends one ' ' to non-empty text (sentencepiece's dummy prefix); Prepend skips empty text too.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPM_SPACE), normalizers.Replace(" ", SPM_SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    # For transformers users (add_special_tokens=True) prepend <s> as Llama does; slmforge adds bos itself.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    # TinyStories models start every story with <s> and never emit </s>: like run.c, stop at either.
    return Tokenizer(tok, bos="<s>", eos="</s>", pad=None, chat_template=None, stop_tokens=("<s>",))


# -----------------------------------------------------------------------------
# import


def import_llama2c(model_bin: str | Path, tokenizer_bin: str | Path, out_dir: str | Path) -> Path:
    """Convert a llama2.c checkpoint and its tokenizer.bin into a model directory (HF layout)."""
    cfg, state = read_llama2c_checkpoint(model_bin)
    tokenizer = read_llama2c_tokenizer(tokenizer_bin)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise SlmforgeError(f"{tokenizer_bin}: {tokenizer.vocab_size} tokens, but {model_bin} has a vocabulary "
                            f"of {cfg.vocab_size} (wrong tokenizer for this model?)")
    model = LlamaModel(cfg)
    load_state(model, state, source=str(model_bin))
    meta = {"stage": "import-llama2c", "source": str(model_bin), "tokenizer_source": str(tokenizer_bin)}
    return save_model_dir(out_dir, model, tokenizer, meta)
