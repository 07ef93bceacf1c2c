"""Weight-only quantization: the schemes, the quantized model directory, the integer kernels of the decode
path, and GGUF files that hold exactly our weights."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import small_corpus
from slmforge.compress.quantize import GROUP, QUANT_FILE, QuantizeConfig, quantize_dir, quantize_weight
from slmforge.config import ModelConfig
from slmforge.convert.gguf import export_gguf, permute_for_llama_cpp
from slmforge.errors import SlmforgeError
from slmforge.infer.fastpath import DecodeModel
from slmforge.model import KVCache, LlamaModel
from slmforge.modeldir import ModelDir, save_model_dir
from slmforge.tokenizer import train_tokenizer

# every matrix a multiple of 32 wide and 16 tall: the int4 kernel takes them all
SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaModel(ModelConfig(**SHAPE))
    model.reset_parameters(seed=0)
    return save_model_dir(tmp_path_factory.mktemp("q") / "base", model, train_tokenizer(small_corpus(), 320), {})


@pytest.mark.parametrize("bits", [8, 4])
def test_schemes_round_to_the_nearest_step_with_exact_scales(bits):
    torch.manual_seed(0)
    w = torch.randn(48, 96) * 0.05
    qw = quantize_weight(w, bits)
    deq = qw.dequantize()
    # scales survive both bf16 (torch's kernels) and fp16 (GGUF) unchanged
    assert torch.equal(qw.scale.to(torch.bfloat16).float(), qw.scale)
    assert torch.equal(qw.scale.to(torch.float16).float(), qw.scale)
    step = qw.scale.abs()[:, None] if bits == 8 else qw.scale.abs().repeat_interleave(GROUP, 1)
    # only clamped values are off by more than half a step: int8's extreme (bf16-rounded scale), and for
    # Q4_0 values near minus the group's extreme (its range is [-8, 7] steps)
    assert ((deq - w).abs() <= step * 0.5 + 1e-7).float().mean() > (0.999 if bits == 8 else 0.98)
    assert ((deq - w).abs() <= step * 1.05).all()  # one step, plus the scale's bf16 rounding
    assert qw.q.dtype == (torch.int8 if bits == 8 else torch.uint8) and int(qw.q.max()) <= (127 if bits == 8 else 15)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_dir_decodes_with_the_integer_kernels(base, tmp_path, bits):
    out = quantize_dir(base, tmp_path / f"q{bits}", QuantizeConfig(bits=bits))
    md = ModelDir.open(out)
    assert md.meta["quantization"]["bits"] == bits and (out / QUANT_FILE).is_file()
    model = md.load_model()
    q = model.model.layers[0].mlp.gate_proj
    assert torch.equal(q.weight, q.quant.dequantize())  # model.safetensors holds the quantized values
    # the integer kernels, forced on every matrix, give the dequantized model's logits (bf16 activations)
    fast = DecodeModel(model, 1, packed=False)
    projs = [p for layer in fast.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [fast.lm_head]
    for p in projs:
        assert p.quant is not None
        p.kind, p.packed = f"int{bits}", p._pack(f"int{bits}")
    tokens = [1, 17, 42, 99, 7]
    cache = KVCache(model.config, 1, 64)
    steps = [fast(torch.tensor([t]), torch.tensor([i]), cache.k, cache.v, i + 1) for i, t in enumerate(tokens)]
    with torch.no_grad():  # the reference: the dequantized floats, the plain forward over the whole sequence
        dense = model(torch.tensor([tokens]))[0][0]
    logits = [dense, torch.cat(steps)]
    scale = logits[0].abs().max()
    assert (logits[1] - logits[0]).abs().max() < 0.02 * scale
    assert (logits[1].argmax(-1) == logits[0].argmax(-1)).float().mean() >= 0.8

    with pytest.raises(SlmforgeError, match="already quantized"):
        quantize_dir(out, tmp_path / "again", QuantizeConfig(bits=bits))


@pytest.mark.parametrize("bits,kind", [(8, gguf.GGMLQuantizationType.Q8_0), (4, gguf.GGMLQuantizationType.Q4_0)])
def test_gguf_holds_exactly_our_quantized_weights(base, tmp_path, bits, kind):
    out = quantize_dir(base, tmp_path / "q", QuantizeConfig(bits=bits))
    path = export_gguf(out, tmp_path / "m.gguf", {8: "q8_0", 4: "q4_0"}[bits])
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    ours = ModelDir.open(out).load_model().state_dict()
    cfg = ModelConfig(**SHAPE)
    pairs = {"blk.1.ffn_gate.weight": ours["model.layers.1.mlp.gate_proj.weight"],
             "blk.0.attn_q.weight": permute_for_llama_cpp(ours["model.layers.0.self_attn.q_proj.weight"],
                                                          cfg.num_attention_heads),
             "blk.0.attn_k.weight": permute_for_llama_cpp(ours["model.layers.0.self_attn.k_proj.weight"],
                                                          cfg.num_key_value_heads),
             "token_embd.weight": ours["model.embed_tokens.weight"]}
    for name, w in pairs.items():
        t = tensors[name]
        assert t.tensor_type == kind
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        np.testing.assert_array_equal(deq, w.numpy(), err_msg=name)

    other = {8: "q4_0", 4: "q8_0"}[bits]
    with pytest.raises(SlmforgeError, match="would quantize them a second time"):
        export_gguf(out, tmp_path / "x.gguf", other)
    assert not (tmp_path / "x.gguf").exists()


def test_edited_quantized_weights_are_refused_and_cli(base, tmp_path):
    from slmforge.cli import app

    r = CliRunner().invoke(app, ["quantize", str(base), str(tmp_path / "q8"), "--bits", "8"])
    assert r.exit_code == 0, r.output
    assert "8-bit weights" in r.output
    from safetensors.torch import load_file, save_file

    f = tmp_path / "q8" / QUANT_FILE
    state = load_file(str(f))
    state["lm_head.qweight"][0, 0] += 1
    save_file(state, str(f))
    with pytest.raises(SlmforgeError, match="does not match model.safetensors"):
        ModelDir.open(tmp_path / "q8").load_model()
    r = CliRunner().invoke(app, ["quantize", str(base), str(tmp_path / "q3"), "--bits", "3"])
    assert r.exit_code != 0
