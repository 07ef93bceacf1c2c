"""Batch inference (`slmforge predict`: generate, classify, deeplog) and `slmforge eval-task` on tiny models."""

import json
import os
import subprocess
import sys

import pytest

from slmforge.config import ModelConfig
from slmforge.errors import SlmforgeError
from slmforge.infer.predict import deeplog_scores, predict_file
from slmforge.model import LlamaModel
from slmforge.modeldir import save_model_dir
from slmforge.tokenizer import train_tokenizer


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "slmforge", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_generate_prompts_and_chat(tiny_model_dir, tmp_path, capfd):
    rows = [{"id": "a", "prompt": "Tom saw the", "completion": " ball."},
            {"id": "b", "messages": [{"role": "user", "content": "Lily liked"},
                                     {"role": "assistant", "content": "the cat."}]},
            {"id": "c", "prompt": "Sam " * 400}]  # longer than the context: keeps its end
    out = tmp_path / "pred.jsonl"
    s = predict_file(tiny_model_dir, "generate", _jsonl(tmp_path / "in.jsonl", rows), out, max_tokens=5,
                     batch_size=2)
    got = _read(out)
    assert s["rows"] == 3 and [r["id"] for r in got] == ["a", "b", "c"]
    assert "predict: 1 of 3 prompts are longer than the context minus max_tokens" in capfd.readouterr().err
    assert all(isinstance(r["prediction"], str) for r in got)
    assert got[0]["completion"] == " ball." and got[1]["completion"] == "the cat."  # references kept
    assert "prompt" not in got[0] and "messages" not in got[1]
    # greedy and batched: the same as one at a time
    out1 = tmp_path / "pred1.jsonl"
    predict_file(tiny_model_dir, "generate", tmp_path / "in.jsonl", out1, max_tokens=5, batch_size=1)
    assert [r["prediction"] for r in _read(out1)] == [r["prediction"] for r in got]


def test_classify_plain_lm_by_label_loglik(tiny_model_dir, tmp_path):
    rows = [{"id": i, "text": t, "label": lab} for i, (t, lab) in enumerate([("good film", "pos"), ("bad", "neg")])]
    out = tmp_path / "pred.jsonl"
    predict_file(tiny_model_dir, "classify", _jsonl(tmp_path / "in.jsonl", rows), out, labels=["neg", "pos"])
    assert {r["prediction"] for r in _read(out)} <= {"neg", "pos"}
    with pytest.raises(SlmforgeError, match="--labels"):
        predict_file(tiny_model_dir, "classify", tmp_path / "in.jsonl", out)


@pytest.fixture(scope="module")
def deeplog_dir(tmp_path_factory):
    sessions = [" ".join(f"E{e}" for e in [5, 5, 22, 11, 9, 11, 9, 26, 26]) for _ in range(50)]
    tok = train_tokenizer(sessions, vocab_size=300)
    model = LlamaModel(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=64))
    model.reset_parameters(seed=0)
    return save_model_dir(tmp_path_factory.mktemp("deeplog") / "model", model, tok, {"stage": "test"})


def test_deeplog_ranks_and_unknown_events(deeplog_dir, tmp_path):
    scored = deeplog_scores(deeplog_dir, [[5, 5, 22], [5, 777]], top_g=1000)
    assert len(scored[0]["ranks"]) == 3 and all(r >= 1 for r in scored[0]["ranks"])  # the first given bos
    assert not scored[0]["anomalous"]  # top_g covers every candidate
    assert scored[1]["anomalous"] and scored[1]["unknown_events"] == 1  # E777 was never seen
    rows = [{"id": "n", "events": [5, 5, 22], "label": "normal"}, {"id": "x", "text": "E5 E777", "label": "anomalous"}]
    out = tmp_path / "pred.jsonl"
    predict_file(deeplog_dir, "deeplog", _jsonl(tmp_path / "in.jsonl", rows), out, top_g=1000)
    assert [r["prediction"] for r in _read(out)] == ["normal", "anomalous"]


def test_deeplog_ranks_the_end_of_a_session(tmp_path):
    """A session cut short ends where the trained model expects another event: its end ranks low, so
    it is anomalous even though every event in it is the likeliest one; the whole session's end is rank 1."""
    import torch

    whole = [5, 5, 22, 11, 9, 26]
    tok = train_tokenizer([" ".join(f"E{e}" for e in whole)] * 20, vocab_size=300)
    model = LlamaModel(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=64))
    model.reset_parameters(seed=0)
    ids = torch.tensor([tok.encode(" ".join(f"E{e}" for e in whole), bos=True, eos=True)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):  # memorise the one normal session, its eos included
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0][0], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    md = save_model_dir(tmp_path / "model", model, tok, {"stage": "test"})
    full, cut = deeplog_scores(md, [whole, whole[:4]], top_g=1)
    assert full["end_rank"] == 1 and not full["anomalous"]
    assert all(r == 1 for r in cut["ranks"]) and cut["end_rank"] > 1 and cut["anomalous"]


def test_bad_input_names_file_and_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": \n')
    with pytest.raises(SlmforgeError, match=r"bad.jsonl:2: invalid JSON"):
        predict_file(tiny_model_dir, "generate", bad, tmp_path / "o.jsonl")
    _jsonl(bad, [{"id": 1, "prompt": "a"}, {"id": 2, "question": "b"}])
    with pytest.raises(SlmforgeError, match=r"bad.jsonl:2: needs a string 'prompt'"):
        predict_file(tiny_model_dir, "generate", bad, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()  # nothing half-written


def test_cli_predict_then_eval_task(tiny_model_dir, tmp_path):
    rows = [{"id": f"r{i}", "prompt": "Tom saw", "completion": " the ball."} for i in range(3)]
    src, pred = _jsonl(tmp_path / "test.jsonl", rows), tmp_path / "pred.jsonl"
    r = cli("predict", tiny_model_dir, "--task", "generate", "--input", src, "--out", pred, "--max-tokens", "4",
            "--stop", "\n")
    assert r.returncode == 0, r.stderr
    assert "wrote 3 predictions" in r.stdout
    _jsonl(pred, [{"id": "r0", "prediction": "the ball."}, {"id": "r1", "prediction": "a cat"},
                  {"id": "r2", "prediction": "the ball."}])
    r = cli("eval-task", "summarization", pred, "--refs", src, "--out", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 3 and 60 < m["rouge1"] < 100 and "rougeL" in r.stdout
    r = cli("eval-task", "translation", pred, "--refs", tmp_path / "missing.jsonl")
    assert r.returncode == 1 and r.stderr.strip().startswith("error: ") and "missing.jsonl" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
