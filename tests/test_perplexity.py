import json
import math

import pytest
import torch

from conftest import save_tiny_llama, small_corpus
from slmforge.errors import SlmforgeError
from slmforge.evaluate.perplexity import judge, read_documents, windows


def test_windows_predict_every_token_once_with_half_a_context():
    ids = list(range(300))
    for ctx in (8, 9, 64, 299, 300):
        scored = []
        for i, (w, n) in enumerate(windows(ids, ctx)):
            assert len(w) <= ctx + 1 and 0 < n <= len(w) - 1
            assert i == 0 or len(w) - n >= ctx // 2  # a later window keeps half a context before its targets
            scored += w[len(w) - n:]
        assert scored == ids[1:]  # every target once, in order


def _write_docs(tmp_path):
    docs = small_corpus(12, seed=3)
    docs.append(" ".join(small_corpus(30, seed=4)))  # far longer than the 64-token context: windows
    (tmp_path / "docs.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return docs


def test_bits_per_byte_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_llama(tmp_path / "m")
    docs = _write_docs(tmp_path)
    rep = judge(model_dir, [tmp_path / "docs.txt"], batch_size=4)
    f = rep["files"][0]
    assert f["docs"] == len(docs) and f["bytes"] == sum(len(d.encode()) for d in docs)

    # the reference: transformers on the same directory, one window at a time, no batching or padding
    from slmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ctx = hf.config.max_position_embeddings
    nll, n = 0.0, 0
    with torch.inference_mode():
        for d in docs:
            ids = tok.encode(d, bos=True)
            for w, k in windows(ids, ctx):
                logits = hf(torch.tensor([w[:-1]])).logits[0].float()
                lp = logits.log_softmax(-1)[-k:].gather(1, torch.tensor(w[-k:])[:, None])
                nll -= float(lp.sum())
                n += k
    assert len(tok.encode(docs[-1], bos=True)) > 2 * ctx  # the long document really was windowed
    assert f["tokens"] == n == sum(len(tok.encode(d)) for d in docs)  # every token predicted once
    assert f["nll_nats"] == pytest.approx(nll, rel=1e-4)
    assert f["bits_per_byte"] == pytest.approx(nll / (math.log(2) * f["bytes"]), rel=1e-4)
    assert f["loss_per_token"] == pytest.approx(nll / n, rel=1e-4)


def test_read_documents_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo lines\n\n\n\nthree\n", encoding="utf-8")
    assert read_documents(tmp_path / "a.txt") == ["one\ntwo lines", "three"]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "y y"}\n', encoding="utf-8")
    assert read_documents(tmp_path / "b.jsonl") == ["x", "y y"]
    assert read_documents(tmp_path / "b.jsonl", max_docs=1) == ["x"]


@pytest.mark.parametrize("name,content,where", [
    ("missing.txt", None, "missing.txt: no such file"),
    ("empty.txt", "\n\n \n", "empty.txt:1: no documents"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": broken\n', "bad.jsonl:2: invalid JSON"),
    ("nofield.jsonl", '{"text": "ok"}\n{"body": "x"}\n', "nofield.jsonl:2: no string field 'text'"),
])
def test_bad_input_names_file_and_line(tmp_path, name, content, where):
    if content is not None:
        (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(SlmforgeError, match=where.replace("(", r"\(")):
        read_documents(tmp_path / name)


def test_cli_table_json_and_errors(tmp_path):
    import subprocess
    import sys

    model_dir = save_tiny_llama(tmp_path / "m")
    _write_docs(tmp_path)
    cmd = [sys.executable, "-m", "slmforge", "eval", "ppl", str(model_dir), str(tmp_path / "docs.txt"),
           "--max-docs", "5", "--json", str(tmp_path / "out.json")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "bits/byte" in r.stdout
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["files"][0]["docs"] == 5 and 0 < out["files"][0]["bits_per_byte"] < 20
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    r = subprocess.run(cmd[:6] + [str(tmp_path / "bad.jsonl")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: ") and "bad.jsonl:2:" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
