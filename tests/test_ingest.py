"""Reading corpora of every format into documents, normalisation, errors, and sharded ingest."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from slmforge.data import ingest as ingest_mod
from slmforge.data.ingest import IngestStats, ingest, iter_documents, normalize_text
from slmforge.errors import SlmforgeError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_normalize_text():
    assert normalize_text("a\r\nb\rc") == "a\nb\nc"
    assert normalize_text("bell\x07 and \x00nul\x1b[0m\tok\u0085") == "bell and nul[0m\tok"
    assert normalize_text("trail  \t\nline \n\n\n") == "trail\nline"
    assert normalize_text("cafe\u0301") == "caf\u00e9"  # NFC composes
    assert normalize_text("\ufb01ne \u2460") == "\ufb01ne \u2460"  # NFC keeps compatibility characters
    assert normalize_text("\ufb01ne \u2460", "NFKC") == "fine 1"
    assert normalize_text("cafe\u0301", "none") == "cafe\u0301"
    assert normalize_text(" \n\t\n") == ""


def test_text_splits_sources_and_empty_docs(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"one a\r\none b  \r\n\r\n\r\ntwo\x07\n\n  \x01 \n\nthree\n")
    stats = IngestStats()
    docs = list(iter_documents(f, stats=stats))
    assert docs == [{"text": "one a\none b", "source": f"{f}:1"}, {"text": "two", "source": f"{f}:5"},
                    {"text": "three", "source": f"{f}:9"}]
    assert stats.empty == 1 and stats.docs == 3 and stats.files == 1 and stats.bytes == f.stat().st_size
    assert [d["text"] for d in iter_documents(f, split="line")] == ["one a", "one b", "two", "three"]
    assert [d["source"] for d in iter_documents(f, split="line")][-1] == f"{f}:9"
    assert list(iter_documents(f, split="file")) == [{"text": "one a\none b\n\n\ntwo\n\n\n\nthree",
                                                      "source": f"{f}:1"}]
    with pytest.raises(SlmforgeError, match="unknown split 'word'"):
        list(iter_documents(f, split="word"))


def test_jsonl_keeps_metadata_and_gz_and_folders(tmp_path):
    (tmp_path / "d").mkdir()
    f = tmp_path / "d" / "a.jsonl"
    f.write_text(json.dumps({"id": 7, "text": "hello\u00a0 ", "lang": "en"}) + "\n\n"
                 + json.dumps({"text": "there", "source": "web/42", "tags": ["x"]}) + "\n")
    with gzip.open(tmp_path / "d" / "b.jsonl.gz", "wt") as g:
        g.write(json.dumps({"body": "zipped", "text": "other"}) + "\n")
    docs = list(iter_documents(f))
    assert docs == [{"text": "hello", "id": 7, "lang": "en", "source": f"{f}:1"},
                    {"text": "there", "source": "web/42", "tags": ["x"]}]  # an existing source is kept
    assert list(iter_documents(tmp_path / "d" / "b.jsonl.gz", text_field="body")) == [
        {"text": "zipped", "source": f"{tmp_path / 'd' / 'b.jsonl.gz'}:1"}]
    assert [d["text"] for d in iter_documents(tmp_path / "d")] == ["hello", "there", "other"]  # sorted files


def test_broken_json_line_fails_or_is_skipped(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "broken\n[1, 2]\n{"body": "x"}\n{"text": 3}\n{"text": "fine"}\n')
    with pytest.raises(SlmforgeError, match=r"bad\.jsonl:2: invalid JSON"):
        list(iter_documents(f))
    stats = IngestStats()
    assert [d["text"] for d in iter_documents(f, on_error="skip", stats=stats)] == ["ok", "fine"]
    assert stats.skipped == 4 and len(stats.skip_reasons) == 4
    assert stats.skip_reasons[0].startswith(f"{f}:2: invalid JSON")
    assert stats.skip_reasons[1] == f"{f}:3: expected a JSON object, got list"
    assert stats.skip_reasons[2].startswith(f"{f}:4: no field 'text' (fields: body)")
    assert stats.skip_reasons[3] == f"{f}:5: field 'text' is int, not a string"


def test_non_utf8_line(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes(b"fine line\n\ncaf\xe9 au lait\n\nlast\n")
    with pytest.raises(SlmforgeError, match=r"latin\.txt:3: not valid UTF-8"):
        list(iter_documents(f))
    stats = IngestStats()
    assert [d["text"] for d in iter_documents(f, on_error="skip", stats=stats)] == ["fine line", "last"]
    assert stats.skipped == 1 and "latin.txt:3" in stats.skip_reasons[0]


def test_missing_and_unreadable_inputs(tmp_path):
    with pytest.raises(SlmforgeError, match=r"nope\.txt: no such file"):
        list(iter_documents(tmp_path / "nope.txt", on_error="skip"))  # a typo is never skipped
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlmforgeError, match="no corpus files in this folder"):
        list(iter_documents(tmp_path / "empty"))
    bad_gz = tmp_path / "x.txt.gz"
    bad_gz.write_bytes(b"not gzip at all\n")
    with pytest.raises(SlmforgeError, match=r"x\.txt\.gz: cannot read"):
        list(iter_documents(bad_gz))
    bad_pq = tmp_path / "x.parquet"
    bad_pq.write_bytes(b"PAR1 nonsense")
    stats = IngestStats()
    assert list(iter_documents([bad_pq], on_error="skip", stats=stats)) == []
    assert stats.skipped == 1 and "cannot read as Parquet" in stats.skip_reasons[0]


def test_csv_and_tsv(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text('id,text,label\n1,"multi\nline, quoted",pos\n\n2,plain,neg\n3,"x"\n', encoding="utf-8")
    with pytest.raises(SlmforgeError, match=r"a\.csv:6: 2 cells, but the header has 3"):
        list(iter_documents(f))
    stats = IngestStats()
    docs = list(iter_documents(f, on_error="skip", stats=stats))
    assert docs == [{"text": "multi\nline, quoted", "id": "1", "label": "pos", "source": f"{f}:2"},
                    {"text": "plain", "id": "2", "label": "neg", "source": f"{f}:5"}]
    assert stats.skipped == 1
    with pytest.raises(SlmforgeError, match=r"a\.csv:1: no column 'body' \(columns: id, text, label\)"):
        list(iter_documents(f, text_field="body"))
    t = tmp_path / "b.tsv"
    t.write_text('sentence\tlabel\n"quoted start but no end\t1\nnext line\t0\n')  # SST-2 style: no quoting
    assert [(d["text"], d["label"]) for d in iter_documents(t, text_field="sentence")] == [
        ('"quoted start but no end', "1"), ("next line", "0")]
    big = tmp_path / "big.csv"
    big.write_text("text\n" + "w" * 200_000 + "\n")  # over the csv module's default field limit (131072)
    assert len(next(iter_documents(big))["text"]) == 200_000


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "a.parquet"
    n = 2500  # more than one record batch
    table = pa.table({"content": [f"doc {i}" if i != 5 else None for i in range(n)], "n": list(range(n))})
    pq.write_table(table, f, row_group_size=1000)
    stats = IngestStats()
    docs = list(iter_documents(f, text_field="content", stats=stats))
    assert len(docs) == n - 1 and stats.empty == 1  # a null text is an empty document
    assert docs[0] == {"text": "doc 0", "n": 0, "source": f"{f}:0"}
    assert docs[-1] == {"text": f"doc {n - 1}", "n": n - 1, "source": f"{f}:{n - 1}"}
    assert stats.bytes == pytest.approx(f.stat().st_size, rel=0.01)
    with pytest.raises(SlmforgeError, match=r"a\.parquet: no column 'text' \(columns: content, n\)"):
        list(iter_documents(f))


def test_hf_datasets_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "hf"
    datasets.Dataset.from_dict({"text": ["first", "", "third"], "label": [1, 0, 2]}).save_to_disk(str(d))
    docs = list(iter_documents(d))
    assert docs == [{"text": "first", "label": 1, "source": f"{d}:0"},
                    {"text": "third", "label": 2, "source": f"{d}:2"}]
    dd = tmp_path / "hfdict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"q": ["a", "b"]}),
                          "test": datasets.Dataset.from_dict({"q": ["c"]})}).save_to_disk(str(dd))
    assert sorted((x["text"], x["source"]) for x in iter_documents(dd, text_field="q")) == [
        ("a", f"{dd}/train:0"), ("b", f"{dd}/train:1"), ("c", f"{dd}/test:0")]
    with pytest.raises(SlmforgeError, match=r"no column 'text' \(columns: q\)"):
        list(iter_documents(dd))


def _shard_docs(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(out.glob("part-*.jsonl")) for line in p.open(encoding="utf-8")]


def test_ingest_shards_rerun_and_interrupt(tmp_path, monkeypatch):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i} é", "i": i}) + "\n" for i in range(25)))
    out = tmp_path / "out"
    stats = ingest([src], out, shard_docs=10, progress=False)
    assert stats.docs == 25 and stats.shards == 3
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl",
                                                      "stats.json"]
    docs = _shard_docs(out)
    assert [d["i"] for d in docs] == list(range(25)) and docs[3]["text"] == "doc 3 é"
    saved = json.loads((out / "stats.json").read_text())
    assert saved["docs"] == 25 and saved["fingerprint"]["options"]["shard_docs"] == 10

    # A finished folder: nothing is read or written again.
    monkeypatch.setattr(ingest_mod, "iter_documents", lambda *a, **k: pytest.fail("re-read a finished ingest"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = ingest([src], out, shard_docs=10, progress=False)
    assert again.docs == 25 and again.shards == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    monkeypatch.undo()

    # Interrupted after two shards with other options: the old complete ingest stays as it was.
    def interrupted(*a, **k):
        for j, doc in enumerate(iter_documents(*a, **k)):
            if j == 15:
                raise KeyboardInterrupt
            yield doc

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(ingest_mod, "iter_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest([src], out, shard_docs=7, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no partial shard, no .partial
    monkeypatch.undo()
    stats = ingest([src], out, shard_docs=7, progress=False)
    assert stats.shards == 4 and sorted(p.name for p in out.glob("part-*")) == [f"part-0000{i}.jsonl" for i in range(4)]
    assert [d["i"] for d in _shard_docs(out)] == list(range(25))


def test_ingest_interrupted_first_run_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "a.txt"
    src.write_text("\n\n".join(f"para {i}" for i in range(30)))

    def interrupted(*a, **k):
        for j, doc in enumerate(iter_documents(*a, **k)):
            if j == 20:
                raise KeyboardInterrupt
            yield doc

    monkeypatch.setattr(ingest_mod, "iter_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest(src, tmp_path / "out", shard_docs=5, progress=False)
    assert not (tmp_path / "out").exists()  # not even an empty folder


def test_real_tinystories_paragraphs(tmp_path):
    f = DATA / "tinystories" / "tinystories_valid_part1.txt"
    if not f.is_file():
        pytest.skip(f"{f} not available")
    stats = IngestStats()
    docs = list(iter_documents(f, stats=stats))
    raw = f.read_text(encoding="utf-8")
    assert len(docs) == len([p for p in raw.split("\n\n") if p.strip()])
    assert all(d["text"] and "\n\n" not in d["text"] and d["text"] == d["text"].strip() for d in docs)
    assert stats.bytes == len(raw.encode()) and stats.skipped == 0
