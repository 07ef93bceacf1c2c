"""ONNX export: the graph onnxruntime runs gives our logits for a prefill and for decode steps fed the
cache it returned, greedy decoding through it gives our engine's tokens, and bad input is one error line."""

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

from conftest import run_cli  # noqa: E402 - after the skips
from slmforge.config import ModelConfig  # noqa: E402
from slmforge.convert.onnx import OnnxLM, export_onnx, onnx_generate, onnx_tokens_per_s  # noqa: E402
from slmforge.infer.engine import SamplingParams, generate_ids  # noqa: E402
from slmforge.model import LlamaModel  # noqa: E402
from slmforge.modeldir import ModelDir, save_model_dir  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    # GQA (4 query heads on 2 kv heads) so the grouped cache shape is what the graph carries.
    cfg = ModelConfig(vocab_size=tiny_tokenizer.vocab_size, hidden_size=64, intermediate_size=172,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=False)
    model = LlamaModel(cfg)
    model.reset_parameters(seed=0)
    with torch.no_grad():  # sharp logits, as a trained model has: few near-ties for greedy decoding
        model.lm_head.weight.mul_(8)
    return save_model_dir(tmp_path_factory.mktemp("onnx") / "tiny", model, tiny_tokenizer)


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    return export_onnx(model_dir, tmp_path_factory.mktemp("onnx-out") / "tiny.onnx")


@pytest.fixture(scope="module")
def ours(model_dir):
    return ModelDir.open(model_dir).load_model()


def logits_of(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].numpy()


def test_graph_names_axes_and_metadata(exported):
    m = onnx.load(str(exported), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*m.graph.input, *m.graph.output]}
    assert [v.name for v in m.graph.input] == ["input_ids", "attention_mask", "position_ids",
                                               "past_key_values.0.key", "past_key_values.0.value",
                                               "past_key_values.1.key", "past_key_values.1.value"]
    assert [v.name for v in m.graph.output] == ["logits", "present.0.key", "present.0.value",
                                                "present.1.key", "present.1.value"]
    assert dims["input_ids"] == ["batch", "sequence"] and dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert dims["logits"][:2] == ["batch", "sequence"] and dims["present.0.key"][:2] == ["batch", 2]
    meta = {p.key: p.value for p in m.metadata_props}
    assert {k: meta[k] for k in ("num_layers", "num_kv_heads", "head_dim", "bos_token_id", "eos_token_id")} == \
        {"num_layers": "2", "num_kv_heads": "2", "head_dim": "16", "bos_token_id": "1", "eos_token_id": "2"}
    assert not list(exported.parent.glob(".*tmp"))  # the temp folder went away


def test_prefill_and_decode_logits_match_ours(exported, ours):
    lm = OnnxLM(exported)
    ids = [1, 17, 40, 99, 5, 230, 64, 8, 12]
    ref = logits_of(ours, ids)
    one = np.ones((1, 9), np.int64)
    # prefill of 6, then one decode step and a 2-token chunk, each fed the cache the previous one returned
    logits, past = lm.step(np.array([ids[:6]]), one[:, :6], np.arange(6)[None], lm.empty_past(1))
    prefill = np.abs(logits[0] - ref[:6]).max()
    assert past[0].shape == (1, 2, 6, 16)
    logits, past = lm.step(np.array([ids[6:7]]), one[:, :7], np.array([[6]]), past)
    decode = np.abs(logits[0, 0] - ref[6]).max()
    logits, past = lm.step(np.array([ids[7:]]), one, np.array([[7, 8]]), past)
    chunk = np.abs(logits[0] - ref[7:]).max()
    assert past[3].shape == (1, 2, 9, 16)
    assert max(prefill, decode, chunk) < TOL, (prefill, decode, chunk)


def test_left_padded_batch_matches_each_prompt_alone(exported, ours):
    lm = OnnxLM(exported)
    long, short = [1, 17, 40, 99, 5, 230], [1, 64, 8]
    ids = np.array([long, [0, 0, 0, *short]])
    mask = np.array([[1] * 6, [0, 0, 0, 1, 1, 1]])
    pos = np.array([list(range(6)), [0, 0, 0, 0, 1, 2]])
    logits, past = lm.step(ids, mask, pos, lm.empty_past(2))
    assert np.abs(logits[0] - logits_of(ours, long)).max() < TOL
    assert np.abs(logits[1, 3:] - logits_of(ours, short)).max() < TOL
    assert np.isfinite(logits).all()  # padding queries see themselves, so no all-masked row gives NaN


def test_greedy_matches_our_engine(exported, ours, tiny_tokenizer):
    prompts = [tiny_tokenizer.encode("Tom saw the cat. Lily found", bos=True), [1, 64, 8]]
    want = [list(generate_ids(ours, p, SamplingParams(max_new_tokens=20, temperature=0))) for p in prompts]
    assert onnx_generate(exported, prompts[0], 20, threads=1) == want[0]
    rate, got = onnx_tokens_per_s(exported, prompts, 20, threads=1, repeats=1)
    assert got == want and rate > 0  # the shorter prompt left-padded in the same batch


def slm(capsys, monkeypatch, *args) -> tuple[int, str]:
    """`slmforge ARGS` in this process: (exit code, stderr)."""
    rc, _, err = run_cli(capsys, monkeypatch, *args)
    return rc, err


def one_error(rc: int, err: str, needle: str) -> None:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err


def test_cli_bad_input_is_one_error_line(capsys, monkeypatch, model_dir, tmp_path):
    out = tmp_path / "m.onnx"
    (tmp_path / "notamodel").mkdir()
    one_error(*slm(capsys, monkeypatch, "export", "onnx", tmp_path / "notamodel", out), "config.json")
    one_error(*slm(capsys, monkeypatch, "export", "onnx", model_dir, out, "--opset", "12"), "--opset 12")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the extra were not installed
    one_error(*slm(capsys, monkeypatch, "export", "onnx", model_dir, out), "slmforge[onnx]")
    assert list(tmp_path.iterdir()) == [tmp_path / "notamodel"]  # no output, no temp file
