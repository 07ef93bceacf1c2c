"""GGUF export: metadata and tensors read back with the gguf package's own reader, the q/k permutation
checked against llama.cpp's RoPE written out in numpy, and (where llama-cpp-python is installed:
benchmarks/setup_llama_cpp.sh) llama.cpp itself tokenizing and decoding greedily exactly as we do."""

import gguf
import numpy as np
import pytest
import torch

from conftest import shared_data
from slmforge.config import preset
from slmforge.convert.gguf import export_gguf
from slmforge.errors import SlmforgeError
from slmforge.infer.engine import SamplingParams, generate_ids
from slmforge.model import LlamaModel, apply_rope, rope_cache
from slmforge.modeldir import ModelDir, save_model_dir

PROMPT = "Tom saw the cat. Lily found the red kite."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    torch.manual_seed(0)
    cfg = preset("200k", vocab_size=tiny_tokenizer.vocab_size + 5, initializer_range=0.1,  # 5 padding rows
                 tie_word_embeddings=False)
    model = LlamaModel(cfg)
    with torch.no_grad():  # sharp logits, as a trained model has: few near-ties for greedy decoding
        model.lm_head.weight.mul_(8)
    return save_model_dir(tmp_path_factory.mktemp("gguf") / "tiny", model, tiny_tokenizer)


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-out")
    return {t: export_gguf(model_dir, out / f"tiny-{t}.gguf", t) for t in ("f32", "f16", "q8_0")}


def read(path) -> tuple[dict, dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]]:
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: (gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))),
                        t.tensor_type) for t in r.tensors}
    return fields, tensors


def test_metadata(model_dir, exported, tiny_tokenizer):
    cfg = ModelDir.open(model_dir).config
    f, tensors = read(exported["f32"])
    assert f["general.architecture"] == "llama" and f["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert f["llama.context_length"] == cfg.max_position_embeddings
    assert f["llama.embedding_length"] == cfg.hidden_size and f["llama.block_count"] == cfg.num_hidden_layers
    assert f["llama.feed_forward_length"] == cfg.intermediate_size
    assert f["llama.attention.head_count"] == cfg.num_attention_heads
    assert f["llama.attention.head_count_kv"] == cfg.num_key_value_heads
    assert f["llama.rope.dimension_count"] == cfg.head_dim and f["llama.rope.freq_base"] == cfg.rope_theta
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert f["llama.vocab_size"] == cfg.vocab_size
    # tokenizer: byte-level BPE as llama.cpp's gpt2 model with the GPT-2 pre-tokenizer regex
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"
    assert tokens[:tiny_tokenizer.vocab_size] == [tiny_tokenizer.tok.id_to_token(i)
                                                  for i in range(tiny_tokenizer.vocab_size)]
    types = f["tokenizer.ggml.token_type"]
    assert types[tiny_tokenizer.bos_id] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    assert types[tiny_tokenizer.vocab_size - 1] == gguf.TokenType.NORMAL
    assert len(f["tokenizer.ggml.merges"]) > 0 and all(m.count(" ") == 1 for m in f["tokenizer.ggml.merges"])
    assert f["tokenizer.ggml.bos_token_id"] == tiny_tokenizer.bos_id
    assert f["tokenizer.ggml.eos_token_id"] == tiny_tokenizer.eos_id
    assert f["tokenizer.ggml.eot_token_id"] == tiny_tokenizer.stop_ids[1]  # <|end|>
    assert f["tokenizer.chat_template"] == tiny_tokenizer.chat_template
    assert "output.weight" in tensors and len(tensors) == 3 + 9 * cfg.num_hidden_layers


def test_tensors_round_trip(model_dir, exported):
    state = ModelDir.open(model_dir).load_model().state_dict()
    cfg = ModelDir.open(model_dir).config
    _, f32 = read(exported["f32"])
    # unpermuted tensors are ours exactly; permuted ones hold the same values in another row order
    np.testing.assert_array_equal(f32["blk.1.ffn_down.weight"][0], state["model.layers.1.mlp.down_proj.weight"])
    np.testing.assert_array_equal(f32["token_embd.weight"][0], state["model.embed_tokens.weight"])
    q = state["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert not np.array_equal(f32["blk.0.attn_q.weight"][0], q)
    np.testing.assert_array_equal(np.sort(f32["blk.0.attn_q.weight"][0], axis=0), np.sort(q, axis=0))
    for t, tol in (("f16", 1e-3), ("q8_0", 1e-2)):
        f, tensors = read(exported[t])
        assert f["general.file_type"] == {"f16": gguf.LlamaFileType.MOSTLY_F16,
                                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[t]
        for name, (ref, _) in f32.items():
            data, qtype = tensors[name]
            scale = np.abs(ref).max()
            np.testing.assert_allclose(data, ref, atol=tol * scale, err_msg=f"{t} {name}")
            if ref.ndim == 1:
                assert qtype == gguf.GGMLQuantizationType.F32  # norms stay f32
        if t == "q8_0":  # rows of 64 quantise; ffn_down's rows of 172 (not a multiple of 32) fall back to f16
            assert tensors["blk.0.attn_q.weight"][1] == gguf.GGMLQuantizationType.Q8_0
            assert tensors["blk.0.ffn_down.weight"][1] == gguf.GGMLQuantizationType.F16
    assert cfg.intermediate_size % 32  # (what the fallback check above relies on)


def rope_adjacent_pairs(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """llama.cpp's LLAMA_ROPE_TYPE_NORM on one head: dims (2i, 2i+1) rotate by pos·theta^(-2i/d)."""
    d = x.shape[-1]
    ang = pos * theta ** (-np.arange(0, d, 2) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)
    return out


def test_permuted_qk_give_our_attention_scores(model_dir, exported):
    """Attention scores from the GGUF's q/k under llama.cpp's RoPE equal ours under rotate-half RoPE."""
    model = ModelDir.open(model_dir).load_model()
    cfg = model.config
    _, t = read(exported["f32"])
    attn = model.model.layers[2].self_attn
    wq, wk = t["blk.2.attn_q.weight"][0], t["blk.2.attn_k.weight"][0]
    x = torch.randn(cfg.hidden_size)
    pq, pk = 7, 3
    cos, sin = rope_cache(cfg.head_dim, 16, cfg.rope_theta)
    H, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    with torch.no_grad():
        q_ours = apply_rope(attn.q_proj(x).view(H, 1, D), cos[pq:pq + 1], sin[pq:pq + 1])[:, 0]
        k_ours = apply_rope(attn.k_proj(x).view(K, 1, D), cos[pk:pk + 1], sin[pk:pk + 1])[:, 0]
    q_cpp = rope_adjacent_pairs((wq @ x.numpy()).reshape(H, D), pq, cfg.rope_theta)
    k_cpp = rope_adjacent_pairs((wk @ x.numpy()).reshape(K, D), pk, cfg.rope_theta)
    group = H // K
    for h in range(H):
        ours = float(q_ours[h] @ k_ours[h // group])
        np.testing.assert_allclose(q_cpp[h] @ k_cpp[h // group], ours, rtol=1e-4, atol=1e-5)


def test_llama2c_sentencepiece_vocab(tmp_path):
    from slmforge.convert.llama2c import import_llama2c

    d = import_llama2c(shared_data("tinystories/stories260K.bin"), shared_data("tinystories/tok512.bin"),
                       tmp_path / "s260k")
    f, tensors = read(export_gguf(d, tmp_path / "s260k.gguf", "f32"))
    assert f["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in f
    tokens, scores, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and len(tokens) == 512
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == gguf.TokenType.CONTROL
    assert types[3 + 255] == gguf.TokenType.BYTE and types[300] == gguf.TokenType.NORMAL
    assert max(scores) == 0 and min(scores) < -100 and f["tokenizer.ggml.eot_token_id"] == 1  # stop at <s>
    assert "output.weight" not in tensors and "tokenizer.chat_template" not in f  # tied; no chat template


def test_bad_input(model_dir, tmp_path):
    with pytest.raises(SlmforgeError, match="q4_k"):
        export_gguf(model_dir, tmp_path / "x.gguf", "q4_k")
    with pytest.raises(SlmforgeError, match="not a model directory"):
        export_gguf(tmp_path / "nope", tmp_path / "x.gguf", "f32")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))


def test_cli(model_dir, tmp_path):
    from typer.testing import CliRunner

    from slmforge.cli import app

    r = CliRunner().invoke(app, ["export", "gguf", str(model_dir), str(tmp_path / "m.gguf"), "--type", "q8_0"])
    assert r.exit_code == 0, r.output
    assert read(tmp_path / "m.gguf")[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


# ----------------------------------------------------------------------------------- llama.cpp itself


def need_llama_cpp():
    try:
        import llama_cpp
    except (ImportError, OSError) as e:  # not installed, or its shared library does not load
        pytest.skip(f"llama-cpp-python not usable ({e}); benchmarks/setup_llama_cpp.sh builds it")
    return llama_cpp


def llama_cpp_greedy(path, prompt: str, n: int) -> tuple[list[int], list[int]]:
    llama_cpp = need_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_batch=64, verbose=False)
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    out = []
    for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(t)
        if len(out) == n:
            break
    return ids, out


def clear_prefix(model: LlamaModel, prompt: list[int], ours: list[int], margin: float) -> int:
    """How many of our greedy tokens came with a lead over the runner-up of at least `margin` logits,
    counting up to the first near-tie (where rounding in another runtime may rightly pick the other)."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt + ours]))
    top2 = logits[0, len(prompt) - 1:-1].topk(2).values
    close = ((top2[:, 0] - top2[:, 1]) < margin).nonzero()
    return int(close[0]) if len(close) else len(ours)


@pytest.mark.parametrize("qtype,margin", [("f32", 1e-2), ("f16", 5e-2)])
def test_llama_cpp_greedy_matches_ours(model_dir, exported, tiny_tokenizer, qtype, margin):
    model = ModelDir.open(model_dir).load_model()
    if qtype == "f16":  # the weights llama.cpp computes with
        model = model.half().float()
    chat = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Tom saw it."}])
    # the chat's own markers are control tokens for both (a plain str is plain text to our encode)
    for prompt, expect in ((PROMPT, tiny_tokenizer.encode(PROMPT, bos=True)), (chat, tiny_tokenizer.encode(chat))):
        ids, theirs = llama_cpp_greedy(exported[qtype], prompt.removeprefix("<s>"), 24)
        assert ids == expect
        ours = list(generate_ids(model, ids, SamplingParams(max_new_tokens=24, temperature=0)))
        n = clear_prefix(model, ids, ours, margin)
        assert n >= 12 and theirs[:n] == ours[:n], (n, theirs, ours)


def test_llama_cpp_stories260k_matches_ours(tmp_path):
    from slmforge.convert.llama2c import import_llama2c

    need_llama_cpp()
    d = import_llama2c(shared_data("tinystories/stories260K.bin"), shared_data("tinystories/tok512.bin"),
                       tmp_path / "s260k")
    md = ModelDir.open(d)
    tok = md.load_tokenizer()
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside ünïcode."
    ids, theirs = llama_cpp_greedy(export_gguf(d, tmp_path / "s.gguf", "f32"), text, 32)
    assert ids == tok.encode(text, bos=True)
    model = md.load_model()
    ours = list(generate_ids(model, ids, SamplingParams(max_new_tokens=32, temperature=0)))
    n = clear_prefix(model, ids, ours, 1e-2)
    assert n >= 16 and theirs[:n] == ours[:n], (n, theirs, ours)


@pytest.mark.parametrize("o_bias,arch", [(0.0, "qwen2"), (0.05, "llama")])
def test_attention_bias(tmp_path, tiny_tokenizer, o_bias, arch):
    """q/k/v bias without o bias (imported Qwen2) is llama.cpp's qwen2 (rotate-half RoPE, no permutation);
    with an o bias it stays llama, biases permuted like the weights."""
    torch.manual_seed(0)
    model = LlamaModel(preset("200k", vocab_size=tiny_tokenizer.vocab_size, initializer_range=0.1,
                              attention_bias=True))
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
        for layer in model.model.layers:
            a = layer.self_attn
            for p in (a.q_proj, a.k_proj, a.v_proj):
                p.bias.normal_(0, 0.3)
            a.o_proj.bias.normal_(0, o_bias) if o_bias else a.o_proj.bias.zero_()
    d = save_model_dir(tmp_path / "m", model, tiny_tokenizer)
    path = export_gguf(d, tmp_path / "m.gguf", "f32")
    f, tensors = read(path)
    assert f["general.architecture"] == arch and f[f"{arch}.attention.head_count"] == 4
    assert "blk.0.attn_q.bias" in tensors and ("blk.0.attn_output.bias" in tensors) == (arch == "llama")
    need_llama_cpp()
    ids, theirs = llama_cpp_greedy(path, PROMPT, 24)
    ours = list(generate_ids(model, ids, SamplingParams(max_new_tokens=24, temperature=0)))
    n = clear_prefix(model, ids, ours, 1e-2)
    assert n >= 12 and theirs[:n] == ours[:n], (n, theirs, ours)
