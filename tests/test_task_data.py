"""Task data loaders on the real files in ../shared/data (skipped when absent): counts against the
sources, disjoint and deterministic splits, formats, the HDFS template parser; errors on bad input."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import shared_data
from slmforge.data import tasks as task_data
from slmforge.data.tasks import (
    hdfs_parse_agreement,
    hdfs_sessions_from_log,
    hdfs_template,
    holdout,
    parse_hdfs_lines,
    prepare,
    prepare_dialogsum,
    prepare_hdfs,
    prepare_inspec,
    prepare_multi30k,
    prepare_pubmedqa,
    prepare_sst2,
    prepare_translation_domain,
    prepare_wmt_biomed,
)
from slmforge.errors import SlmforgeError


def _data() -> Path:
    return shared_data("SOURCES.md").parent


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _ids(out: Path, split: str) -> set[str]:
    ids = [r["id"] for r in _rows(out / f"{split}.jsonl")]
    assert len(ids) == len(set(ids)), f"duplicate ids in {split}"
    return set(ids)


def test_holdout_is_stratified_deterministic_and_disjoint():
    labels = ["a"] * 70 + ["b"] * 25 + ["c"] * 5
    train, test = holdout(labels, 20, seed=0)
    assert len(test) == 20 and len(train) == 80 and not set(train) & set(test)
    assert Counter(labels[i] for i in test) == {"a": 14, "b": 5, "c": 1}
    assert holdout(labels, 20, seed=0) == (train, test) and holdout(labels, 20, seed=1)[1] != test
    assert train == sorted(train) and test == sorted(test)
    with pytest.raises(SlmforgeError, match="test size 100"):
        holdout(labels, 100, seed=0)


def test_sst2_holds_out_whole_sentences_and_drops_their_phrases(tmp_path):
    stats = prepare_sst2(_data(), tmp_path / "a")
    assert stats["rows_read"] == 67349
    assert stats["duplicates_dropped"] == 371 and stats["conflicting_dropped"] == 5
    assert stats["phrases"] == 67349 - 371 - 5 and stats["sentences"] == 6885
    assert stats["counts"] == {"train": 66973 - 1500 - stats["phrases_inside_held_dropped"], "val": 500, "test": 1000}
    train, val, test = (_rows(tmp_path / "a" / f"{s}.jsonl") for s in ("train", "val", "test"))
    assert set(train[0]) == {"id", "text", "label"} and {r["label"] for r in test} == {"negative", "positive"}
    # No training phrase is a word span of a held-out sentence: nothing of theirs is trained on.
    held = [" " + r["text"] + " " for r in val + test]
    blob = "\n".join(held)
    assert not any(f" {r['text']} " in blob for r in train)
    assert stats["overlap"]["test"]["contained"] == 0 and stats["overlap"]["test"]["train_inside_held"] == 0
    # val and test are stratified draws from the same sentences: the same label shares
    assert abs(sum(r["label"] == "positive" for r in test) / 1000 - sum(r["label"] == "positive" for r in val) / 500) < 0.01
    prepare_sst2(_data(), tmp_path / "b")
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = prepare_sst2(_data(), tmp_path / "c", seed=1, n_test=500, n_val=0, fmt="prompt")
    assert other["counts"]["test"] == 500 and _ids(tmp_path / "c", "test") != _ids(tmp_path / "a", "test")
    row = _rows(tmp_path / "c" / "test.jsonl")[0]
    assert row["prompt"].startswith("Review: ") and row["completion"] == " " + row["label"]


def test_sst2_phrase_split_leaks_as_the_review_found(tmp_path):
    """The old random-phrase split, kept to measure the leak: 1,816 of 2,000 held-out phrases are word spans
    of a training phrase (1,091 of those with 5+ words)."""
    stats = prepare_sst2(_data(), tmp_path, unit="phrase", n_test=2000, n_val=0)
    o = stats["overlap"]["test"]
    assert stats["counts"] == {"train": 66973 - 2000, "test": 2000}
    assert (o["exact"], o["contained"], o["contained_5plus_words"]) == (0, 1816, 1091)


def test_multi30k_official_split(tmp_path):
    stats = prepare_multi30k(_data(), tmp_path, target="fr", fmt="chat")
    dropped = stats["train_dropped_as_held"]  # training captions equal to a val or test caption
    assert stats["counts"] == {"train": 29000 - 1000 - dropped, "val": 1000, "test": 1014} and stats["pair"] == "en-fr"
    assert dropped < 10 and stats["overlap"]["test"]["exact"] == 0
    first = _rows(tmp_path / "train.jsonl")[0]
    i = int(first["id"].rsplit("-", 1)[1])
    with gzip.open(_data() / "multi30k/train.fr.gz", "rt", encoding="utf-8") as f:
        fr = f.read().split("\n")[i].strip()
    assert first["messages"][1] == {"role": "assistant", "content": fr}
    assert first["messages"][0]["content"].startswith("Translate English to French:\n")
    small = prepare_multi30k(_data(), tmp_path / "small", max_train=100, seed=3)
    assert small["counts"]["train"] == 100
    assert _rows(tmp_path / "small" / "train.jsonl")[0]["prompt"].endswith("\nGerman:")
    with pytest.raises(SlmforgeError, match="unknown language 'xx'"):
        prepare_multi30k(_data(), tmp_path / "x", target="xx")


def test_wmt_biomed_split_by_abstract_without_headings(tmp_path):
    stats = prepare_wmt_biomed(_data(), tmp_path)
    docs = stats["documents"]
    assert docs["train"] + docs["val"] + docs["test"] == 75  # 6 + 9 titled abstracts, 28 + 32 "Abstract" ones
    train, val, test = (_rows(tmp_path / f"{s}.jsonl") for s in ("train", "val", "test"))
    assert len(train) + len(val) + len(test) + stats["train_dropped_as_held"] == 782
    assert stats["counts"] == {"train": len(train), "val": len(val), "test": len(test)}
    docs_of = [{r["doc"] for r in rows} for rows in (train, val, test)]
    assert not docs_of[0] & docs_of[1] and not docs_of[0] & docs_of[2] and not docs_of[1] & docs_of[2]
    sources = [r["prompt"].split("\n")[1] for r in train + val + test]
    assert not {"Title", "Abstract", "Background", "Methods", "RESULTS"} & set(sources)
    assert test[0]["prompt"].endswith("\nFrench:") or train[0]["prompt"].endswith("\nFrench:")
    assert prepare_wmt_biomed(_data(), tmp_path / "again")["counts"] == stats["counts"]
    fr_en = prepare_wmt_biomed(_data(), tmp_path / "fr-en", source="fr", target="en")
    assert fr_en["counts"] == stats["counts"]
    assert _rows(tmp_path / "fr-en" / "test.jsonl")[0]["prompt"].startswith("Translate French to English:")
    both = prepare_translation_domain(_data(), tmp_path / "domain", max_general_train=50)
    assert both["general"]["counts"]["train"] == 50 and both["medical"]["counts"] == stats["counts"]
    assert (tmp_path / "domain" / "general" / "test.jsonl").is_file()


def test_pubmedqa_official_test_ids(tmp_path):
    stats = prepare_pubmedqa(_data(), tmp_path)
    assert stats["questions"] == 1000 and stats["counts"] == {"train": 450, "val": 50, "test": 500}
    truth = json.loads((_data() / "medical/pubmedqa_test_ground_truth.json").read_text())
    test = _rows(tmp_path / "test.jsonl")
    assert {r["id"].removeprefix("pubmedqa-"): r["label"] for r in test} == truth
    train, val = _ids(tmp_path, "train"), _ids(tmp_path, "val")
    assert not train & val and not (train | val) & _ids(tmp_path, "test") and len(train | val) == 500
    assert test[0]["text"].startswith("Question: ") and "\nContext:\n" in test[0]["text"]
    prompt = prepare_pubmedqa(_data(), tmp_path / "p", n_val=0, fmt="prompt")
    assert prompt["counts"] == {"train": 500, "test": 500}
    assert _rows(tmp_path / "p" / "test.jsonl")[0]["prompt"].endswith("Answer (yes, no or maybe):")


def test_hdfs_sessions_normal_train_and_labelled_test(tmp_path):
    stats = prepare_hdfs(_data(), tmp_path)
    assert stats["normal_sessions"] == 4855 and stats["abnormal_sessions"] == 16838
    assert stats["distinct_normal"] == 839 and stats["distinct_abnormal"] == 4123
    d = stats["test_normal_distinct"]
    assert d["unseen_in_train"] + d["seen_in_train"] + d["duplicates_dropped"] == 1000
    n = d["unseen_in_train"]
    counts = dict(stats["counts"])
    full = counts.pop("test_deeplog")
    assert counts == {"train": 4855 - 1500, "val": 2 * stats["val_labels"]["normal"], "test": 2 * n,
                      "test_seen": d["seen_in_train"]}
    # DeepLog's protocol: every held-out normal session and every abnormal one not in val, with counts;
    # 36.9% of those abnormal sessions are proper prefixes of normal training sessions (sessions cut short).
    deeplog = _rows(tmp_path / "test_deeplog.jsonl")
    assert len(deeplog) == full
    normal = [r for r in deeplog if r["label"] == "normal"]
    abnormal = [r for r in deeplog if r["label"] == "anomalous"]
    assert sum(r["count"] for r in normal) == 1000
    assert sum(r["count"] for r in normal if r["seen_in_train"]) == 1000 - d["unseen_in_train"] - sum(
        r["count"] - 1 for r in normal if not r["seen_in_train"])
    val_abnormal = {r["text"] for r in _rows(tmp_path / "val.jsonl") if r["label"] == "anomalous"}
    assert not val_abnormal & {r["text"] for r in abnormal}
    cut = sum(r["count"] for r in abnormal if r["prefix_of_train"]) / sum(r["count"] for r in abnormal)
    assert 0.36 < cut < 0.38
    train, test, seen = (_rows(tmp_path / f"{s}.jsonl") for s in ("train", "test", "test_seen"))
    assert "label" not in train[0] and train[0]["text"].split()[0].startswith("E")
    assert [int(t[1:]) for t in train[0]["text"].split()] == train[0]["events"]
    # Each distinct session once; the ones a training session equals are set apart in test_seen.
    trained = {r["text"] for r in train}
    assert len({r["text"] for r in test}) == len(test) and not trained & {r["text"] for r in test}
    assert {r["text"] for r in seen} <= trained and len({r["text"] for r in seen}) == len(seen)
    assert Counter(r["label"] for r in test) == {"normal": n, "anomalous": n}
    ratio = prepare_hdfs(_data(), tmp_path / "r", n_test_normal=500, abnormal_per_normal=0.5, n_val=100,
                         seed=1)
    r = ratio["counts"]
    assert r["train"] == 4255 and r["test"] == ratio["test_normal_distinct"]["unseen_in_train"] + ratio["test_labels"]["anomalous"]
    assert ratio["test_labels"]["anomalous"] == round(0.5 * ratio["test_normal_distinct"]["unseen_in_train"])
    val_texts = {x["text"] for x in _rows(tmp_path / "r" / "val.jsonl")}
    assert not val_texts & ({x["text"] for x in _rows(tmp_path / "r" / "test.jsonl")} | {
        x["text"] for x in _rows(tmp_path / "r" / "train.jsonl")})
    with pytest.raises(SlmforgeError, match="must be below 4855"):
        prepare_hdfs(_data(), tmp_path / "x", n_test_normal=5000)


def test_hdfs_parser_agrees_with_loghub_structured_csv():
    shared_data("loghub/HDFS/HDFS_2k.log_structured.csv")
    m = hdfs_parse_agreement(_data())
    assert m["n"] == 2000
    assert m["template_agreement"] >= 95.0 and m["grouping_accuracy"] >= 95.0
    assert m["event_id_agreement"] >= 95.0
    assert m["template_agreement"] == 100.0  # measured: all 2,000 lines, 14 templates


def test_hdfs_raw_log_to_deeplog_sessions(tmp_path):
    folder = shared_data("loghub/HDFS")
    sessions = hdfs_sessions_from_log(folder / "HDFS_2k.log", folder / "HDFS_templates.csv")
    assert len(sessions) == 2200  # 2,000 lines sampled across the whole log: mostly one event per block
    assert sum(map(len, sessions.values())) == 2206  # some lines name several blocks
    assert Counter(e for s in sessions.values() for e in s)[22] == 115  # allocateBlock: E22 as in hdfs_train
    log = tmp_path / "x.log"
    log.write_text("081109 203615 148 INFO dfs.DataNode: Something new for blk_1\n")
    with pytest.raises(SlmforgeError, match="x.log:1: matches no template"):
        hdfs_sessions_from_log(log, folder / "HDFS_templates.csv")


def test_hdfs_template_and_parse_errors(tmp_path):
    assert hdfs_template("BLOCK* ask 10.250.17.177:50010 to delete  blk_-85 blk_91 blk_7") == \
        "BLOCK* ask <*>:<*> to delete  blk_<*>"
    path = "/user/root/rand/_temporary/_task_2008_0001_m_000590_0/part-00590."
    assert hdfs_template(f"BLOCK* NameSystem.allocateBlock: {path} blk_-17") == \
        "BLOCK* NameSystem.allocateBlock: /<*>/part-<*>. blk_<*>"
    log = tmp_path / "x.log"
    log.write_text("081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_3 "
                   "terminating\n"
                   "081109 203616 149 INFO dfs.DataNode$PacketResponder: PacketResponder 2 for block "
                   "blk_-4 terminating\n"
                   "081109 203617 150 WARN dfs.DataNode: Verification succeeded for blk_5\n")
    lines = parse_hdfs_lines(log, {"Verification succeeded for blk_<*>": "E14"})
    assert [p["event_id"] for p in lines] == ["T1", "T1", "E14"] and lines[2]["level"] == "WARN"
    assert lines[0]["template"] == "PacketResponder <*> for block blk_<*> terminating"
    assert lines[1]["pid"] == "149"
    log.write_text("not a log line\n")
    with pytest.raises(SlmforgeError, match=r"x.log:1: not an HDFS log line"):
        parse_hdfs_lines(log)


def test_inspec_from_zip(tmp_path):
    stats = prepare_inspec(_data(), tmp_path, n_val=100)
    assert stats["documents"] == 2000 and stats["counts"] == {"train": 1400, "val": 100, "test": 500}
    rows = {r["id"]: r for s in ("train", "val", "test") for r in _rows(tmp_path / f"{s}.jsonl")}
    assert len(rows) == 2000
    doc = rows["inspec-695"]  # its key file has tab-indented lines, a tab inside a key and CRLF
    assert "prototype filters" in doc["keyphrases"] and "filter banks" in doc["keyphrases"]
    keys = [k for r in rows.values() for k in r["keyphrases"]]
    assert all("\t" not in k and "\r" not in k and k == k.strip() for k in keys)
    assert doc["completion"] == " " + "; ".join(doc["keyphrases"])
    assert "\t" not in doc["prompt"] and doc["prompt"].startswith("Give the keyphrases")
    assert "(0,1)-matrices" in rows["inspec-1932"]["completion"]  # ";" inside a key cannot split it
    assert sum(len(r["keyphrases"]) for r in rows.values()) == stats["keyphrases"]
    again = prepare_inspec(_data(), tmp_path / "again", n_val=100)
    assert _ids(tmp_path / "again", "test") == _ids(tmp_path, "test") and again["counts"] == stats["counts"]


def test_dialogsum_split(tmp_path):
    stats = prepare_dialogsum(_data(), tmp_path, fmt="chat")
    assert stats["dialogues"] == 500 and stats["counts"] == {"train": 350, "val": 50, "test": 100}
    assert not _ids(tmp_path, "train") & _ids(tmp_path, "test")
    row = _rows(tmp_path / "test.jsonl")[0]
    assert row["messages"][0]["content"].startswith("Summarize the dialogue.\n#Person1#:")
    assert row["topic"] and row["messages"][1]["content"] == row["messages"][1]["content"].strip()
    more = prepare_dialogsum(_data(), tmp_path / "more", add_samsum=True)
    assert more["counts"] == {"train": 350 + 818, "val": 50, "test": 100} and len(more["sources"]) == 2
    assert _ids(tmp_path / "more", "test") == _ids(tmp_path, "test")  # the test split stays DialogSum's
    samsum = [r for r in _rows(tmp_path / "more" / "train.jsonl") if r["id"].startswith("samsum-")]
    assert len(samsum) == 818 and all(r["prompt"].endswith("\nSummary:") and r["completion"].strip() for r in samsum)


def test_missing_and_bad_sources(tmp_path):
    with pytest.raises(SlmforgeError, match=r"sst2/train.tsv: missing"):
        prepare_sst2(tmp_path, tmp_path / "out")
    for name in ("multi30k", "wmt_biomed", "pubmedqa", "hdfs", "inspec", "dialogsum"):
        with pytest.raises(SlmforgeError, match="missing"):
            prepare(name, tmp_path, tmp_path / "out")
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("text\tlabel\ngood\t1\nbad\tx\n")
    with pytest.raises(SlmforgeError, match=r"train.tsv:3: expected 'text<TAB>0\|1'"):
        prepare_sst2(tmp_path, tmp_path / "out")
    with pytest.raises(SlmforgeError, match="unknown format 'xml'"):
        prepare_sst2(tmp_path, tmp_path / "out", fmt="xml")
    with pytest.raises(SlmforgeError, match="option add_samsum must be bool, got 'maybe'"):
        prepare("dialogsum", tmp_path, tmp_path / "out", add_samsum="maybe")
    with pytest.raises(SlmforgeError, match="option n_test must be int"):
        prepare("dialogsum", tmp_path, tmp_path / "out", n_test=True)
    with pytest.raises(SlmforgeError, match="unknown task data 'imdb'"):
        prepare("imdb", tmp_path, tmp_path / "out")
    with pytest.raises(SlmforgeError, match="unknown option.*n_tset"):
        prepare("sst2", tmp_path, tmp_path / "out", n_tset=5)
    assert not (tmp_path / "out").exists()


def test_failed_write_keeps_previous_output(tmp_path, monkeypatch):
    (tmp_path / "sst2").mkdir()
    rows = "".join(f"t{i}\t{i % 2}\n" for i in range(10))
    (tmp_path / "sst2" / "train.tsv").write_text("text\tlabel\n" + rows)
    prepare_sst2(tmp_path, tmp_path / "out", n_test=2, n_val=2)
    before = (tmp_path / "out" / "test.jsonl").read_bytes()

    def broken(path, text):
        raise OSError("disk full")

    monkeypatch.setattr(task_data.splits, "atomic_write_text", broken)
    with pytest.raises(OSError):
        prepare_sst2(tmp_path, tmp_path / "out", n_test=3, n_val=2)
    assert (tmp_path / "out" / "test.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sst2"]  # no temp folder left


# Every loader, as the recipes call it: no test (or val) input may be a training input. Inputs are compared
# in the form the model sees them (the same template wraps every row, so equal prompts mean equal inputs).


def _input_of(row: dict) -> str:
    if "messages" in row:
        return "\n".join(m["content"] for m in row["messages"][:-1])
    return row.get("prompt") or row["text"]


def _recipe_data_options():
    import yaml

    from slmforge.recipes import RECIPE_DIR

    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())["data"]
        yield pytest.param(data["loader"], data.get("options") or {}, id=path.stem)


@pytest.mark.parametrize("loader,options", list(_recipe_data_options()))
def test_no_loader_puts_a_held_out_input_in_train(tmp_path, loader, options):
    stats = task_data.prepare(loader, None if loader == "support_chat" else _data(), tmp_path, **options)
    stats = {k: v for k, v in stats.items() if isinstance(v, dict) and "counts" in v} or {"": stats}
    for sub, st in stats.items():
        folder = tmp_path / sub
        train = {task_data.normalize(_input_of(r)) for r in _rows(folder / "train.jsonl")}
        for held in ("val", "test"):
            if (folder / f"{held}.jsonl").is_file():
                rows = _rows(folder / f"{held}.jsonl")
                assert rows and not train & {task_data.normalize(_input_of(r)) for r in rows}, (sub, held)
                assert st["overlap"][held]["exact"] == 0


def test_overlap_report_counts_exact_contained_and_ngrams():
    train = ["the cat sat on the mat today", "a dog ran", "One Two three four five six seven eight nine ten "
             "eleven twelve thirteen fourteen"]
    held = ["The  CAT sat", "a dog ran", "nothing here", "sat on the mat", "x one two three four five six seven "
            "eight nine ten eleven twelve thirteen"]
    o = task_data.overlap_report(train, held)
    assert o["exact"] == 1 and o["contained"] == 3 and o["contained_5plus_words"] == 0
    assert o["train_inside_held"] == 1  # "a dog ran"
    assert o["13gram_inputs"] == 1 and o["with_13gram_overlap"] == 1 and o["mean_13gram_share"] == 0.5


def test_text_loader_reads_corpora_as_pretraining_rows(tmp_path):
    src = tmp_path / "src"
    (src / "plays").mkdir(parents=True)
    (src / "plays/a.txt").write_text("First:\nSpeak.\n\nSecond:\nNo.\n\n\n", encoding="utf-8")
    with gzip.open(src / "captions.en.gz", "wt", encoding="utf-8") as f:
        f.write("A dog runs.\nTwo men talk.\n")
    (src / "q.csv").write_text('prompt,right\n"What is 2+2?\nA. 4",True\n', encoding="utf-8")
    stats = prepare("text", src, tmp_path / "a", files=["plays/a.txt"])
    assert stats["documents"] == 2 and stats["counts"] == {"train": 2}
    assert _rows(tmp_path / "a/train.jsonl") == [{"id": "text-0", "text": "First:\nSpeak."},
                                                 {"id": "text-1", "text": "Second:\nNo."}]
    prepare("text", src, tmp_path / "b", files=["captions.en.gz", "plays"], split="line", max_docs=3)
    assert [r["text"] for r in _rows(tmp_path / "b/train.jsonl")] == ["A dog runs.", "Two men talk.", "First:"]
    prepare("text", src, tmp_path / "c", files=["q.csv"], text_field="prompt")
    assert [r["text"] for r in _rows(tmp_path / "c/train.jsonl")] == ["What is 2+2?\nA. 4"]
    assert not (tmp_path / "c/val.jsonl").exists() and not (tmp_path / "c/test.jsonl").exists()
    with pytest.raises(SlmforgeError, match="option files must be a list"):
        prepare("text", src, tmp_path / "d", files="plays/a.txt")
    with pytest.raises(SlmforgeError, match=r"nope.txt: missing"):
        prepare("text", src, tmp_path / "d", files=["nope.txt"])
    (src / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(SlmforgeError, match="no text in"):
        prepare("text", src, tmp_path / "d", files=["empty.txt"])
    assert not (tmp_path / "d").exists()
