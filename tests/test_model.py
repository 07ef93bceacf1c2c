import pytest
import torch

from slmforge.config import PRESET_NAMES, ModelConfig, preset
from slmforge.errors import SlmforgeError
from slmforge.model import KVCache, LlamaModel


def _randomize_norms(model):
    # init sets norm weights to 1 and biases to 0; perturb them so parity checks cover those paths too
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name else 0.0))


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_param_counts(name):
    cfg = preset(name)
    assert cfg.n_params > 0
    if name == "260k":
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                cfg.max_position_embeddings, cfg.intermediate_size) == (64, 5, 8, 4, 512, 172)
        assert 250_000 < cfg.n_params < 270_000
    if name == "15m":
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.max_position_embeddings) == (288, 6, 6, 256)
        assert 14e6 < cfg.n_params < 16e6
    if name == "200k":
        assert cfg.n_params < 250_000
    if name == "1b":
        assert 0.9e9 < cfg.n_params < 1.3e9


def test_unknown_preset_is_a_user_error():
    with pytest.raises(SlmforgeError, match="unknown preset"):
        preset("7x")


def test_bad_head_config():
    with pytest.raises(SlmforgeError, match="multiple"):
        ModelConfig(num_attention_heads=6, num_key_value_heads=4, hidden_size=48)


def test_n_params_matches_module():
    for cfg in [preset("200k"), preset("200k", attention_bias=True, tie_word_embeddings=False)]:
        assert LlamaModel(cfg).n_params == cfg.n_params


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    cfg = preset("200k", vocab_size=300)
    m = LlamaModel(cfg).eval()
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        full, _ = m(x)
        cache = KVCache(cfg, 2, 64)
        a, _ = m(x[:, :25], cache=cache, pos=0)  # prefill
        b, _ = m(x[:, 25:33], cache=cache, pos=25)  # a chunk after the prefix
        steps = [m(x[:, i:i + 1], cache=cache, pos=i)[0] for i in range(33, 40)]  # one token at a time
    got = torch.cat([a, b, *steps], 1)
    assert (got - full).abs().max() < 1e-5
    assert cache.length == 40


def test_loss_is_cross_entropy_and_decreases():
    torch.manual_seed(0)
    m = LlamaModel(preset("200k", vocab_size=64))
    x = torch.randint(0, 64, (4, 32))
    _, loss = m(x[:, :-1], x[:, 1:])
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.3  # near uniform at init
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(30):
        _, loss = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 2.0


@pytest.mark.parametrize("qwen_style", [False, True])
def test_hf_logits_parity(tmp_path, tiny_tokenizer, qwen_style):
    transformers = pytest.importorskip("transformers")
    from slmforge.modeldir import save_model_dir

    cfg = preset("200k", vocab_size=tiny_tokenizer.vocab_size, attention_bias=qwen_style,
                 tie_word_embeddings=not qwen_style, rope_theta=50000.0 if qwen_style else 10000.0)
    torch.manual_seed(0)
    m = LlamaModel(cfg).eval()
    _randomize_norms(m)
    out = save_model_dir(tmp_path / "m", m, tiny_tokenizer, {"stage": "test"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        ours, _ = m(x)
        theirs = hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    # and the tokenizer agrees with transformers' view of the same directory
    htok = transformers.AutoTokenizer.from_pretrained(out)
    s = "Lily saw the big boat. Zoë drew a kite!"
    assert htok(s)["input_ids"] == tiny_tokenizer.encode(s, bos=True)
    msgs = [{"role": "user", "content": "hi"}]
    assert htok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tiny_tokenizer.apply_chat_template(msgs)
