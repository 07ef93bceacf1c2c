"""Importing tiny random transformers Llama/Qwen2 models: same logits as transformers, and back again."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import small_corpus
from slmforge.convert.hf import import_hf
from slmforge.errors import SlmforgeError
from slmforge.modeldir import ModelDir

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A byte-level BPE made with `tokenizers`, wrapped as transformers' PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(small_corpus(), trainers.BpeTrainer(
        vocab_size=290, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", chat_template=CHAT)


def _make_hf(path, arch: str, tokenizer, **kw):
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**SMALL, rope_theta=500000.0, **kw)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**SMALL, **kw)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # random norms and biases, so a wrong mapping cannot hide behind ones and zeros
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def _logits_equal(ours_dir, hf_model, ids):
    ours = ModelDir.open(ours_dir).load_model()
    with torch.no_grad():
        a = ours(ids)[0]
        b = hf_model(ids).logits
    assert (a - b).abs().max().item() < 1e-4
    return a


@pytest.mark.parametrize("arch,tied,weights", [("llama", True, "sharded"), ("qwen2", False, "safetensors"),
                                               ("qwen2", True, "bin")])
def test_import_matches_transformers(tmp_path, hf_tokenizer, arch, tied, weights):
    src = tmp_path / "hf"
    hf_model = _make_hf(src, arch, hf_tokenizer, tie_word_embeddings=tied)
    if weights == "sharded":
        os.remove(src / "model.safetensors")
        hf_model.save_pretrained(src, max_shard_size="40KB")
        assert (src / "model.safetensors.index.json").is_file() and not (src / "model.safetensors").exists()
    if weights == "bin":
        torch.save(hf_model.state_dict(), src / "pytorch_model.bin")
        os.remove(src / "model.safetensors")
    out = import_hf(src, tmp_path / "ours")
    ids = torch.tensor([hf_tokenizer.encode("Tom saw the big boat. Lily liked the cat.")])
    ours_logits = _logits_equal(out, hf_model, ids)

    md = ModelDir.open(out)
    assert md.meta["stage"] == "import-hf" and md.config.tie_word_embeddings == tied
    assert md.config.attention_bias == (arch == "qwen2")
    assert md.config.rope_theta == (500000.0 if arch == "llama" else 10000.0)
    tok = md.load_tokenizer()
    assert tok.eos == "<|im_end|>" and tok.pad == "<|endoftext|>" and tok.chat_template == CHAT
    assert tok.encode("Tom saw the cat.") == hf_tokenizer.encode("Tom saw the cat.", add_special_tokens=False)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == hf_tokenizer.apply_chat_template(msgs, tokenize=False,
                                                                              add_generation_prompt=True)
    # The imported directory loads back in transformers with the same logits.
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (back(ids).logits - ours_logits).abs().max().item() < 1e-4


def test_import_errors(tmp_path, hf_tokenizer):
    src = tmp_path / "hf"
    _make_hf(src, "llama", hf_tokenizer)
    cfg = json.loads((src / "config.json").read_text())

    def broken(**changes):
        (src / "config.json").write_text(json.dumps({**cfg, **changes}))
        with pytest.raises(SlmforgeError) as e:
            import_hf(src, tmp_path / "out")
        return str(e.value)

    assert "architectures" in broken(architectures=["GPT2LMHeadModel"]) and "GPT2LMHeadModel" in broken(
        architectures=["GPT2LMHeadModel"])
    assert "hidden_act" in broken(hidden_act="gelu")
    assert "rope_type" in broken(rope_parameters={"rope_type": "llama3", "rope_theta": 1.0})
    assert "mlp_bias" in broken(mlp_bias=True)
    (src / "config.json").write_text(json.dumps(cfg))
    os.remove(src / "model.safetensors")
    with pytest.raises(SlmforgeError, match="no weights"):
        import_hf(src, tmp_path / "out")
    with pytest.raises(SlmforgeError, match="not in the local Hugging Face cache.*--local-dir"):
        import_hf("nobody-here/no-such-model-xyz", tmp_path / "out")
    with pytest.raises(SlmforgeError, match="no such directory"):
        import_hf(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_cli(tmp_path, hf_tokenizer):
    from typer.testing import CliRunner

    from slmforge.cli import app

    _make_hf(tmp_path / "hf", "qwen2", hf_tokenizer)
    r = CliRunner().invoke(app, ["import", "hf", str(tmp_path / "hf"), str(tmp_path / "ours")])
    assert r.exit_code == 0, r.output
    assert ModelDir.open(tmp_path / "ours").config.attention_bias


@pytest.mark.parametrize("template", ["smollm2", "qwen2"])
def test_imported_template_renders_and_encodes_as_transformers(tmp_path, hf_tokenizer, template):
    """SmolLM2's and Qwen2.5's published templates (saved by transformers as chat_template.jinja): the imported
    directory renders transformers' exact string, and gives its sanitized ids when the user types control tokens."""
    import copy

    from test_chat_template import HOSTILE, QWEN2, SMOLLM2

    hf_tok = copy.deepcopy(hf_tokenizer)
    hf_tok.chat_template = {"smollm2": SMOLLM2, "qwen2": QWEN2}[template]
    _make_hf(tmp_path / "hf", "qwen2", hf_tok)
    tok = ModelDir.open(import_hf(tmp_path / "hf", tmp_path / "ours")).load_tokenizer()
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    convs = [[{"role": "user", "content": "hi"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tom saw"},
              {"role": "assistant", "content": "the cat."}, {"role": "user", "content": "Zoë" + HOSTILE}]]
    for msgs in convs:
        for gen in (True, False):
            assert tok.apply_chat_template(msgs, gen) == hf.apply_chat_template(msgs, tokenize=False,
                                                                              add_generation_prompt=gen)
        assert tok.encode_chat(msgs) == list(hf.apply_chat_template(
            msgs, add_generation_prompt=True, return_dict=False, sanitize_control_tokens=True))
