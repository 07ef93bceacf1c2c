"""Educational-value classifier: teacher annotation over a real HTTP endpoint, labels, embeddings,
training, saving and scoring."""

from __future__ import annotations

import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from conftest import shared_data
from slmforge.data.edu import (
    Embedder,
    annotate,
    embed_texts,
    filter_by_score,
    labelled_texts,
    load_classifier,
    load_labels,
    parse_edu_score,
    score_documents,
    train_classifier,
)
from slmforge.errors import SlmforgeError

# ------------------------------------------------------------------------------------ teacher server


class Teacher(BaseHTTPRequestHandler):
    """An OpenAI-style /v1/chat/completions: the score is read from a `grade=N` marker in the extract;
    `grade=none` gets an unparseable reply and `grade=bad` an HTTP 400."""

    calls: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        grade = re.search(r"grade=(\w+)", prompt).group(1)
        type(self).calls.append(grade)
        if self.path != "/v1/chat/completions" or grade == "bad":
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "bad request"}')
            return
        reply = "I cannot judge this." if grade == "none" else f"It explains a topic.\nEducational score: {grade}"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}],
                           "usage": {"prompt_tokens": 100, "completion_tokens": 10}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def teacher_url():
    Teacher.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Teacher)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"openai:http://127.0.0.1:{server.server_address[1]}/v1#m"
    server.shutdown()
    server.server_close()


def test_parse_edu_score():
    assert parse_edu_score("blah\nEducational score: 4") == 4
    assert parse_edu_score("**Educational Score:** 2") == 2
    assert parse_edu_score("Educational score: 1 ... on reflection, Educational score: 3") == 3
    assert parse_edu_score("Educational score: 3.0") == 3
    for bad in ("Educational score: 7", "Educational score: 2.5", "score 4", "", None):
        assert parse_edu_score(bad) is None


def test_annotate_records_scores_failures_and_usage(tmp_path, teacher_url):
    docs = [{"id": i, "text": f"Document {i}. grade={g}"} for i, g in enumerate(["4", "0", "bad", "5", "none"])]
    out = tmp_path / "labels.jsonl"
    r = annotate(docs, teacher_url, out, batch_size=2, progress=False, price_in=1.0, price_out=2.0)
    assert (r.asked, r.scored, r.failed, r.skipped) == (5, 3, 2, 0)
    recs = {rec["id"]: rec for rec in map(json.loads, out.read_text().splitlines())}
    assert [recs[str(i)]["score"] for i in range(5)] == [4, 0, None, 5, None]
    assert recs["4"]["error"] == "unparseable reply" and recs["2"]["error"].startswith("request failed")
    assert recs["0"]["teacher"] == teacher_url and recs["0"]["text"] == docs[0]["text"]
    # four answered requests (the unparseable reply included), the HTTP 400 one not billed
    assert r.usage["prompt_tokens"] == 400 and r.usage["completion_tokens"] == 40
    assert r.usage["cost_usd"] == pytest.approx((400 * 1.0 + 40 * 2.0) / 1e6)
    summary = json.loads((tmp_path / "labels.summary.json").read_text())
    assert summary["scored"] == 3 and summary["teachers"] == [teacher_url]
    assert load_labels(out) == {"0": 4.0, "1": 0.0, "3": 5.0}


def test_annotate_resumes_skipping_done_ids(tmp_path, teacher_url):
    out = tmp_path / "labels.jsonl"
    first = [{"id": f"d{i}", "text": f"grade={i % 6}"} for i in range(4)] + [{"id": "dx", "text": "grade=none"}]
    annotate(first, teacher_url, out, progress=False)
    Teacher.calls = []
    with open(out, "a") as f:
        f.write('{"id": "torn", "sco')  # a run killed mid-write leaves half a line
    more = first + [{"id": f"d{i}", "text": f"grade={i % 6}"} for i in range(4, 7)]
    r = annotate(more, teacher_url, out, progress=False)
    assert (r.skipped, r.asked) == (5, 3) and sorted(Teacher.calls) == ["0", "4", "5"]
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 8 and "torn" not in ids
    # failed ones are asked again only when asked to
    Teacher.calls = []
    r = annotate(more, teacher_url, out, progress=False, retry_failed=True)
    assert r.asked == 1 and Teacher.calls == ["none"]


def test_annotate_stops_when_every_request_fails(tmp_path, teacher_url):
    docs = [{"id": i, "text": "grade=bad"} for i in range(3)] + [{"id": 9, "text": "grade=4"}]
    with pytest.raises(SlmforgeError, match="3 requests in a row failed; last: .*HTTP 400"):
        annotate(docs, teacher_url, tmp_path / "l.jsonl", progress=False, max_consecutive_errors=3)
    assert len((tmp_path / "l.jsonl").read_text().splitlines()) == 2  # the first two failures are kept
    with pytest.raises(SlmforgeError, match="document 1: no 'id' field"):
        annotate([{"text": "x"}], teacher_url, tmp_path / "l.jsonl", progress=False)


def test_load_labels_errors_name_the_line(tmp_path):
    p = tmp_path / "labels.jsonl"
    p.write_text('{"id": 1, "score": 3}\n{"id": 2, "score": null}\n{"id": 3, "score": "high"}\n')
    with pytest.raises(SlmforgeError, match=r"labels\.jsonl:3: score 'high' is not a number"):
        load_labels(p)
    p.write_text('{"id": 1, "score": 3}\n\n{"id": 2, "score": 4\n')
    with pytest.raises(SlmforgeError, match=r"labels\.jsonl:3: invalid JSON"):
        load_labels(p)
    p.write_text('{"id": 1, "grade": 3}\n')
    with pytest.raises(SlmforgeError, match=r"labels\.jsonl:1: no 'score' field"):
        load_labels(p)
    p.write_text('{"doc": "a", "grade": 7}\n')
    with pytest.raises(SlmforgeError, match=r":1: grade 7.0 is outside 0-5"):
        load_labels(p, id_field="doc", score_field="grade")
    c = tmp_path / "labels.csv"
    c.write_text("doc,grade\na,3\nb,\nc,x\n")
    with pytest.raises(SlmforgeError, match=r"labels\.csv:4: grade 'x'"):
        load_labels(c, "doc", "grade")
    c.write_text("doc,grade\na,3\nb,\n")
    assert load_labels(c, "doc", "grade") == {"a": 3.0}
    t = tmp_path / "labels.tsv"
    t.write_text("id\tscore\n7\t2.5\n")
    assert load_labels(t) == {"7": 2.5}
    assert labelled_texts([{"id": 7, "text": "x"}, {"id": 8, "text": "y"}], {"7": 2.5}) == (["x"], [2.5])


# ------------------------------------------------------------------------------- embed and classify

SCIENCE = ("photosynthesis chlorophyll energy molecule cell equation gravity velocity theorem proof "
           "experiment hypothesis enzyme protein electron atom").split()
CHATTER = ("lol haha omg party tonight yeah cool awesome dude weekend pizza movie bored tired sleepy "
           "whatever").split()


def synthetic(n: int, seed: int = 0) -> tuple[list[str], list[float]]:
    """Two separable kinds of text: science words (score 4 or 5) and chit-chat words (0 or 1)."""
    rng = random.Random(seed)
    texts, scores = [], []
    for i in range(n):
        edu = i % 2 == 0
        words = SCIENCE if edu else CHATTER
        texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(6, 20))) + ".")
        scores.append(float(rng.choice([4, 5]) if edu else rng.choice([0, 1])))
    return texts, scores


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory):
    from slmforge.config import ModelConfig
    from slmforge.model import LlamaModel
    from slmforge.modeldir import save_model_dir
    from slmforge.tokenizer import train_tokenizer

    texts, _ = synthetic(200, seed=1)
    tok = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return save_model_dir(tmp_path_factory.mktemp("emb") / "model", LlamaModel(cfg), tok, {"stage": "test"})


def test_llama_embeddings_ignore_padding_and_truncate(embedder_dir):
    emb = Embedder(embedder_dir, batch_size=4, max_tokens=16)
    texts = ["energy", "a much longer text about the atom and the electron and the cell " * 3, "", "proof"]
    together = emb(texts)
    alone = np.concatenate([emb([t]) for t in texts])
    assert together.shape == (4, 32) and together.dtype == np.float32
    assert np.allclose(together, alone, atol=2e-2)  # padding does not leak into the mean (bf16 tolerance)
    assert np.isfinite(together).all()
    assert embed_texts(texts[:2], "hashing:64", progress=False).shape == (2, 64)


def test_train_save_load_score_round_trip(tmp_path, embedder_dir):
    texts, scores = synthetic(120)
    clf = train_classifier(texts, scores, embedder_dir, tmp_path / "clf", progress=False, max_tokens=32)
    val = clf.metrics["val"]
    assert val["f1"] > 0.8 and val["n"] == 24 and len(val["confusion_rounded"]) == 6
    assert clf.metrics["train"]["n"] == 96 and "mse" in val and 0 <= val["precision"] <= 1
    meta = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert meta["embedder_kind"] == "llama" and meta["threshold"] == 3 and meta["metrics"]["val"]["f1"] == val["f1"]

    loaded = load_classifier(tmp_path / "clf")
    docs = [{"id": i, "text": t} for i, t in enumerate(texts[:10])]
    a = [d["edu_score"] for d in score_documents(docs, clf)]
    b = [d["edu_score"] for d in score_documents(docs, loaded, batch_size=3)]
    assert a == pytest.approx(b, abs=1e-3) and all(0 <= s <= 5 for s in a)
    kept = list(filter_by_score(docs, min_score=3, clf=tmp_path / "clf"))
    assert {d["id"] for d in kept} <= {0, 2, 4, 6, 8} and len(kept) >= 4
    assert all(d["edu_int_score"] >= 3 for d in kept) and "edu_score" not in docs[0]
    with pytest.raises(SlmforgeError, match="no edu_score"):
        list(filter_by_score(docs))


def test_classifier_dir_problems_are_one_line_errors(tmp_path):
    texts, scores = synthetic(40)
    train_classifier(texts, scores, "hashing:256", tmp_path / "clf", progress=False)
    npz = tmp_path / "clf" / "classifier.npz"
    npz.write_bytes(npz.read_bytes()[:-10])
    with pytest.raises(SlmforgeError, match="checksum differs"):
        load_classifier(tmp_path / "clf")
    with pytest.raises(SlmforgeError, match="classifier.json: missing"):
        load_classifier(tmp_path / "nowhere")
    with pytest.raises(SlmforgeError, match="need at least 10"):
        train_classifier(texts[:5], scores[:5], "hashing", None)
    with pytest.raises(SlmforgeError, match="2 texts but 3 scores"):
        train_classifier(texts[:2], scores[:3], "hashing", None)
    with pytest.raises(SlmforgeError, match="not a directory"):
        Embedder(tmp_path / "no-model")


def test_sentence_transformers_is_a_lazy_optional_dependency(tmp_path):
    try:
        import sentence_transformers  # noqa: F401
        pytest.skip("sentence-transformers is installed")
    except ImportError:
        pass
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "modules.json").write_text("[]")
    with pytest.raises(SlmforgeError, match="pip install sentence-transformers"):
        Embedder(tmp_path / "st")


def test_source_labelled_sample_on_real_data():
    from slmforge.data.edu_sample import SOURCES, source_labelled_sample

    data = shared_data("medical/pubmedqa_ori_pqal.json").parents[1]
    for rel in ("keyphrase/Inspec.zip", "loghub/HDFS/HDFS_2k.log", "summarization/dialogsum.dev.jsonl",
                "tinyshakespeare/input.txt", "tinystories/tinystories_valid_part1.txt"):
        shared_data(rel)
    docs = source_labelled_sample(data, n_per_source=30, seed=0)
    assert len(docs) == 30 * len(SOURCES) and len({d["id"] for d in docs}) == len(docs)
    assert {d["source"]: d["score"] for d in docs} == {k: v[1] for k, v in SOURCES.items()}
    later = source_labelled_sample(data, n_per_source=30, seed=0, skip=30)
    assert not {d["id"] for d in docs} & {d["id"] for d in later}
    clf = train_classifier([d["text"] for d in docs], [d["score"] for d in docs], "hashing", None,
                           progress=False)
    assert clf.metrics["val"]["f1"] > 0.8
