import json

import pytest
import torch

from slmforge.errors import SlmforgeError
from slmforge.modeldir import ModelDir, save_model_dir, update_meta


def test_roundtrip(tiny_model_dir, tiny_model):
    md = ModelDir.open(tiny_model_dir)
    assert md.meta["stage"] == "test" and md.meta["params"] == tiny_model.n_params
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "slmforge.json"]:
        assert (tiny_model_dir / name).is_file()
    m2 = md.load_model()
    x = torch.randint(0, md.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(tiny_model.eval()(x)[0], m2(x)[0])
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert "chat_template" in json.loads((tiny_model_dir / "tokenizer_config.json").read_text())


def test_bf16_save(tmp_path, tiny_model, tiny_tokenizer):
    out = save_model_dir(tmp_path / "bf", tiny_model, tiny_tokenizer, dtype="bfloat16")
    fp32 = save_model_dir(tmp_path / "fp", tiny_model, tiny_tokenizer)
    assert (out / "model.safetensors").stat().st_size < 0.6 * (fp32 / "model.safetensors").stat().st_size
    assert ModelDir.open(out).load_model().model.norm.weight.dtype == torch.float32


def test_missing_file(tiny_model_dir):
    (tiny_model_dir / "tokenizer.json").unlink()
    with pytest.raises(SlmforgeError, match="tokenizer.json: missing"):
        ModelDir.open(tiny_model_dir)


def test_corrupt_safetensors(tiny_model_dir):
    p = tiny_model_dir / "model.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(SlmforgeError, match="corrupt"):
        ModelDir.open(tiny_model_dir).load_model()


def test_corrupt_config(tiny_model_dir):
    (tiny_model_dir / "config.json").write_text("{not json")
    with pytest.raises(SlmforgeError, match="config.json: invalid JSON"):
        ModelDir.open(tiny_model_dir)


def test_shape_mismatch_is_reported(tiny_model_dir):
    p = tiny_model_dir / "config.json"
    cfg = json.loads(p.read_text())
    cfg["intermediate_size"] += 8
    p.write_text(json.dumps(cfg))
    with pytest.raises(SlmforgeError, match="shape"):
        ModelDir.open(tiny_model_dir).load_model()


def test_failed_save_keeps_previous_directory(tiny_model_dir, tiny_model, tiny_tokenizer, monkeypatch):
    before = (tiny_model_dir / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("slmforge.modeldir.write_json", boom)
    with pytest.raises(RuntimeError):
        save_model_dir(tiny_model_dir, tiny_model, tiny_tokenizer)
    assert (tiny_model_dir / "model.safetensors").read_bytes() == before
    assert [p.name for p in tiny_model_dir.parent.iterdir() if p.name.startswith(".")] == []


def test_update_meta(tiny_model_dir):
    update_meta(tiny_model_dir, metrics={"val_loss": 1.5})
    assert ModelDir.open(tiny_model_dir).meta["metrics"] == {"val_loss": 1.5}
    assert ModelDir.open(tiny_model_dir).meta["stage"] == "test"


def test_config_reads_transformers5_rope_parameters():
    from slmforge.config import ModelConfig, preset
    from slmforge.errors import SlmforgeError

    d = preset("200k").to_hf_dict()
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    assert ModelConfig.from_hf_dict(d).rope_theta == 500000.0
    d["rope_parameters"]["rope_type"] = "yarn"
    with pytest.raises(SlmforgeError, match="rope_type 'yarn'"):
        ModelConfig.from_hf_dict(d)
