"""Input fuzzing (issue 16), data files: JSONL, CSV/TSV, text, gzip and Parquet corpora (data ingest, pack),
task rows (finetune, predict), predictions (eval-task) and eval ppl documents. Each malformed file is read
or refused with a SlmforgeError naming it (and the line where there is one); the helpers and the example
budget are in tests/input_fuzz.py."""

from __future__ import annotations

import gzip
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from input_fuzz import apply_ops, deep, edited, file_bytes, fuzz_settings, junk, read_or_error, single_thread

from conftest import small_corpus

ROWS = [{"id": i, "text": t, "label": ["cat", "dog"][i % 2], "prompt": t[:20], "completion": t[20:40],
         "messages": [{"role": "user", "content": t[:15]}, {"role": "assistant", "content": t[15:30]}],
         "events": [5, 5, 22], "phrases": ["the cat"], "keyphrases": ["cat"], "answers": [t[:5]]}
        for i, t in enumerate(small_corpus(4))]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
CSV = ("text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in ROWS)).encode()
TSV = ("text\tlabel\n" + "".join(f'{r["text"]}\t{r["label"]}\n' for r in ROWS)).encode()
TXT = "\n\n".join(small_corpus(4)).encode()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # torch on one thread here: two threads on the two shared cores spin-wait (input_fuzz.single_thread)
    yield from single_thread()


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="fuzz-"))


# ------------------------------------------------------------------------------------------------- JSONL


@fuzz_settings(60)
@given(file_bytes(JSONL))
@example(b'{"text": ' + deep().encode() + b"}\n")  # was a RecursionError
@example(b'{"text": "x", "n": ' + b"1" * 4400 + b"}\n")  # was a ValueError (int digits limit)
@example(b'{"text": "x"}\r\n\x00\n[1]\n')
def test_jsonl_lines(data):
    """io.read_jsonl_lines, what predict, finetune, eval-task and route read rows with."""
    from slmforge.io import read_jsonl_lines

    p = _tmp() / "rows.jsonl"
    p.write_bytes(data)
    rows, err = read_or_error(lambda: list(read_jsonl_lines(p)), f"{p}:")  # file:line
    if err is None:
        assert all(isinstance(r, dict) and isinstance(n, int) for n, r in rows)


# ------------------------------------------------------------------------------------- ingest (and pack)


def _gz(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:
        f.write(data)
    return buf.getvalue()


CORPORA = {"c.jsonl": JSONL, "c.csv": CSV, "c.tsv": TSV, "c.txt": TXT, "c.jsonl.gz": _gz(JSONL)}


def _ingest(name: str, data: bytes, **opts) -> None:
    """data ingest, shards written (a value JSON cannot hold fails there, not in the reader); a failed run
    leaves no output folder."""
    from slmforge.data.ingest import ingest

    d = _tmp()
    p = d / name
    p.write_bytes(data)
    stats, err = read_or_error(lambda: ingest(p, d / "out", progress=False, **opts), str(p))
    if err is None:
        docs = [json.loads(line) for s in sorted((d / "out").glob("part-*.jsonl")) for line in s.open()]
        assert len(docs) == stats.docs and all(isinstance(x["text"], str) and x["text"] for x in docs)
    else:
        assert not (d / "out").exists()


@fuzz_settings(25)
@given(st.sampled_from(sorted(CORPORA)), st.data())
@example("c.jsonl", b'{"text": "ok", "n": ' + b"9" * 4400 + b"}\n")
@example("c.jsonl", b'{"text": "ok", "deep": ' + deep().encode() + b"}\n")
@example("c.csv", b'"text,b\nx,y\n')  # a header of two lines, quoted in the message as they were
@example("c.tsv", TSV.replace(b"\t", b"\r", 1))  # csv.Error from the header line
def test_ingest_corpus_files(name, data):
    raw = data.draw(file_bytes(CORPORA[name])) if isinstance(data, st.DataObject) else data
    _ingest(name, raw)


@fuzz_settings(10)
@given(st.sampled_from(sorted(CORPORA)), st.data())
def test_ingest_skip_mode_never_fails_on_a_line(name, data):
    """on_error=skip: a broken line is counted, not raised (the file as a whole may still be refused)."""
    _ingest(name, data.draw(file_bytes(CORPORA[name])), on_error="skip")


def _parquet(columns: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def _column_values():
    """A Parquet column of some type: what a data set hands over beside its text."""
    import datetime
    import decimal

    n = 3
    return st.sampled_from([
        ["a", None, "c"], [b"\x00\xff", b"x", None], [1, 2, None], [1.5, float("nan"), float("inf")],
        [True, False, None], [datetime.datetime(2024, 1, 2, 3, 4, 5)] * n, [datetime.date(2024, 1, 2)] * n,
        [decimal.Decimal("1.25")] * n, [[1, 2], [], None], [{"a": 1}, {"a": None}, None], [None] * n,
        [datetime.timedelta(seconds=5)] * n,
    ])


@fuzz_settings(20)
@given(text=_column_values(), other=_column_values(), data=st.data())
@example(text=["a", "b", "c"], other=[b"\x00\xff", b"x", None], data=None)  # bytes: a TypeError in the shard writer
# a footer whose column name is not UTF-8: UnicodeDecodeError from pyarrow's schema
@example(text=[1, 2, None], other=[[1, 2], [], None], data=[("delete", 0, 1), ("delete", 0, 1), ("set", 244, 255)])
def test_ingest_parquet_column_types(text, other, data):
    """Parquet with a text column of any type and a metadata column of any type, then byte mutations."""
    raw = _parquet({"text": text, "meta": other})
    _ingest("c.parquet", raw)
    if isinstance(data, list):
        _ingest("c.parquet", apply_ops(raw, data))
    elif data is not None:
        _ingest("c.parquet", data.draw(file_bytes(raw)))


@fuzz_settings(6)
@given(st.sampled_from(["c.jsonl", "c.csv", "c.txt"]), st.data())
def test_pack_reads_what_ingest_reads(tiny_tokenizer, name, data):
    """pack: the same reader, then tokens written; a refused input leaves no folder."""
    from slmforge.data.pack import TokenShards, pack_tokens

    d = _tmp()
    p = d / name
    p.write_bytes(data.draw(file_bytes(CORPORA[name])))
    _, err = read_or_error(lambda: pack_tokens(p, tiny_tokenizer, d / "packed", progress=False), str(p))
    if err is None:
        assert len(TokenShards(d / "packed", "train")) > 0
    else:
        assert not (d / "packed").exists()


# ------------------------------------------------------------------------------- task rows: finetune, predict


@fuzz_settings(40)
@given(st.sampled_from(["rows.jsonl", "rows.csv", "rows.tsv"]), st.data())
@example("rows.csv", b"text,label\nx,cat,extra,cells\ny\n")
def test_task_rows(name, data):
    """train.rows.read_records (finetune --data, predict --input) and the field readers behind them."""
    from slmforge.train.rows import label_set, read_records, text_field

    valid = {"rows.jsonl": JSONL, "rows.csv": CSV, "rows.tsv": TSV}[name]
    raw = data.draw(file_bytes(valid)) if isinstance(data, st.DataObject) else data
    p = _tmp() / name
    p.write_bytes(raw)

    def read():
        recs = read_records(p)
        for where, rec in recs:
            text_field(where, rec, "text")
        return recs, label_set(recs, None)

    out, _ = read_or_error(read, str(p))
    if out is not None:
        recs, labels = out
        assert all(isinstance(r, dict) for _, r in recs) and all(isinstance(x, str) for x in labels)


@fuzz_settings(30)
@given(st.sampled_from(range(len(ROWS))), st.data())
@example(0, {"text": "x", "label": ["a"]})
@example(0, {"text": "x", "label": 1.5})
@example(0, {"text": "x", "label": None})
def test_task_row_fields(i, data):
    """One row with a field deleted, retyped or set to junk: labels, texts, chat messages, tag phrases."""
    from slmforge.train.rows import _label_of, _messages_of, label_set, tag_fields, text_field

    row = data.draw(edited(ROWS[i])) if isinstance(data, st.DataObject) else data
    p = _tmp() / "rows.jsonl"
    p.write_text(json.dumps(row) + "\n")
    where = f"{p}:1"

    def check():
        text_field(where, row, "text")
        label_set([(where, row)], None)
        _label_of(where, row)
        _messages_of(where, row)
        tag_fields(where, row)

    read_or_error(check, where)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("fuzz-model") / "m")


@fuzz_settings(8)
@given(st.sampled_from(["generate", "classify", "deeplog"]), st.sampled_from(range(len(ROWS))), st.data())
def test_predict_rows(model_dir, mode, i, data):
    """predict over a file with one edited row: predictions for every row, or one error naming the row."""
    from slmforge.infer.predict import predict_file

    row = data.draw(edited(ROWS[i]))
    d = _tmp()
    p, out = d / "in.jsonl", d / "pred.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [ROWS[0], row]))
    s, err = read_or_error(lambda: predict_file(model_dir, mode, p, out, labels=["cat", "dog"], max_tokens=2,
                                                top_g=3), str(p), str(model_dir))
    if err is None:
        assert s["rows"] == 2 and len(out.read_text().splitlines()) == 2
    else:
        assert not out.exists()


# --------------------------------------------------------------------------------------- eval-task, eval ppl

EVAL_TASKS = ["classification", "binary", "translation", "summarization", "qa", "keyphrase"]


@fuzz_settings(40)
@given(st.sampled_from(EVAL_TASKS), st.sampled_from(range(len(ROWS))), st.data())
@example("translation", 0, {"prediction": "a", "completion": [1, 2]})
@example("keyphrase", 0, {"prediction": [None, 3], "keyphrases": [{"a": 1}]})
@example("qa", 0, {"prediction": "a", "answers": [None]})
@example("summarization", 0, {"prediction": "a", "completion": None})
@example("translation", 0, {"prediction": "a", "completion": []})  # no reference: a TypeError in sacrebleu
def test_eval_task_predictions(task, i, data):
    """eval-task on predictions whose fields were deleted or retyped: metrics, or an error naming the file."""
    from slmforge.evaluate.tasks import evaluate_predictions

    base = {**ROWS[i], "prediction": ROWS[i]["completion"], "label": "cat"}
    row = data.draw(edited(base)) if isinstance(data, st.DataObject) else data
    p = _tmp() / "pred.jsonl"
    p.write_text(json.dumps(base) + "\n" + json.dumps(row) + "\n")
    m, err = read_or_error(lambda: evaluate_predictions(task, p), str(p))
    if err is None:
        assert m["task"] == task


@fuzz_settings(25)
@given(st.sampled_from(["docs.jsonl", "docs.txt"]), st.data())
@example("docs.jsonl", b'{"text": ' + deep().encode() + b"}\n")
@example("docs.jsonl", b'{"text": "x", "n": ' + b"1" * 4400 + b"}\n")
def test_eval_ppl_documents(name, data):
    from slmforge.evaluate.perplexity import read_documents

    raw = data.draw(file_bytes(JSONL if name.endswith("jsonl") else TXT)) if isinstance(data, st.DataObject) else data
    p = _tmp() / name
    p.write_bytes(raw)
    docs, _ = read_or_error(lambda: read_documents(p), str(p))
    if docs is not None:
        assert docs and all(isinstance(x, str) and x for x in docs)


@fuzz_settings(10)
@given(junk())
def test_jsonl_text_field_of_any_type(value):
    """The text field itself of the wrong type, in every corpus reader."""
    from slmforge.data.ingest import iter_documents
    from slmforge.evaluate.perplexity import read_documents

    p = _tmp() / "c.jsonl"
    p.write_text(json.dumps({"text": value}) + "\n" + json.dumps({"text": "fine"}) + "\n")
    read_or_error(lambda: list(iter_documents(p)), f"{p}:1")
    read_or_error(lambda: read_documents(p), f"{p}:1")


# ----------------------------------------------------------------------------- task-data sources (raw sets)


def _task_sources(root: Path) -> dict[str, Path]:
    """Small stand-ins for two of the raw data sets `slmforge task-data` reads: SST-2's TSV, PubMedQA's JSON."""
    (root / "sst2").mkdir(parents=True)
    sst2 = root / "sst2" / "train.tsv"
    sst2.write_text("text\tlabel\n" + "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(small_corpus(60, seed=5))))
    (root / "medical").mkdir()
    texts = small_corpus(40, seed=6)
    ori = {str(i): {"QUESTION": f"Does {t[:20]} help?", "CONTEXTS": [t, t[::-1]], "LABELS": ["BACKGROUND", "RESULTS"],
                    "final_decision": ["yes", "no", "maybe"][i % 3]} for i, t in enumerate(texts)}
    pq = root / "medical" / "pubmedqa_ori_pqal.json"
    pq.write_text(json.dumps(ori))
    truth = root / "medical" / "pubmedqa_test_ground_truth.json"
    truth.write_text(json.dumps({str(i): ori[str(i)]["final_decision"] for i in range(0, 40, 2)}))
    return {"sst2": sst2, "pubmedqa": pq, "pubmedqa-truth": truth}


TASK_OPTIONS = {"sst2": {"n_test": 5, "n_val": 5}, "pubmedqa": {"n_val": 3}}


@fuzz_settings(20)
@given(st.sampled_from(["sst2", "pubmedqa", "pubmedqa-truth"]), st.sampled_from(["bytes", "fields"]), st.data())
@example("pubmedqa", "fields", [1, 2])  # a list where the entries' mapping was: AttributeError .items()
@example("pubmedqa", "fields", {"1": {"QUESTION": "q", "CONTEXTS": [1], "LABELS": [None], "final_decision": "yes"}})
@example("pubmedqa", "fields", {"1": {"QUESTION": "q", "CONTEXTS": "abc", "LABELS": "xyz", "final_decision": "yes"}})
def test_task_data_sources(which, how, data):
    """`task-data sst2|pubmedqa` over a source file with bytes or fields mutated: splits, or an error naming it."""
    from slmforge.data.tasks import prepare

    root = _tmp()
    files = _task_sources(root / "data")
    p = files[which]
    if not isinstance(data, st.DataObject):
        p.write_text(json.dumps(data))
    elif how == "bytes" or which == "sst2":
        p.write_bytes(data.draw(file_bytes(p.read_bytes())))
    else:
        p.write_text(json.dumps(data.draw(edited(json.loads(p.read_text()), max_edits=3))))
    name = "sst2" if which == "sst2" else "pubmedqa"
    # (a PubMedQA problem may be between its two files, named by the one that disagrees)
    names = [str(files["sst2"])] if name == "sst2" else [str(files["pubmedqa"]), str(files["pubmedqa-truth"])]
    stats, err = read_or_error(lambda: prepare(name, root / "data", root / "out", 0, **TASK_OPTIONS[name]), *names)
    if err is None:
        assert all((root / "out" / f"{s}.jsonl").is_file() for s in ("train", "test"))
    else:
        assert not (root / "out").exists()
