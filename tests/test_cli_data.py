"""`slmforge synth` and `slmforge data ...` from the command line: outputs, figures, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from openai_stub import serve_stub

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def slm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slmforge", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_synth_diversity_filter(tmp_path):
    r = slm("synth", "stories", "--n", "300", "--out", "st.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = lines(tmp_path / "st.jsonl")
    assert len(rows) == 300 and set(rows[0]["seed_words"]) == {"verb", "noun", "adjective"}
    # re-running with a larger n resumes: the first 300 rows are unchanged
    r = slm("synth", "stories", "--n", "320", "--out", "st.jsonl", cwd=tmp_path)
    assert r.returncode == 0 and "20 new" in r.stdout
    assert lines(tmp_path / "st.jsonl")[:300] == rows
    r = slm("synth", "textbook", "--n", "40", "--out", "tb.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr

    r = slm("data", "diversity", "st.jsonl", "--out", "div", "--sample", "50", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "div" / "report.json").read_text())
    assert rep["texts"] == 320 and 0 < rep["distinct_3"] < 1 and 0 < rep["self_bleu"] < 100
    assert (tmp_path / "div" / "lengths.png").stat().st_size > 0

    # junk mixed in: the quality rules drop it, --set switches a rule off
    with open(tmp_path / "st.jsonl", "a") as f:
        f.write(json.dumps({"text": "$$$ ### @@@ " * 40}) + "\n")
    r = slm("data", "filter", "st.jsonl", "--out", "f1", "--set", "min_words=20", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    stats = json.loads((tmp_path / "f1" / "01-quality" / "stats.json").read_text())
    assert stats["in"]["docs"] == 321 and sum(stats["reasons"].values()) >= 1
    r = slm("data", "filter", "st.jsonl", "--out", "f2", "--set", "min_wordz=20", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: --set 'min_wordz=20'")


def test_annotate_train_classifier_score(tmp_path):
    edu = "Photosynthesis converts light energy into chemical energy stored in glucose molecules. " * 3
    chat = "lol ok see you later then, bring snacks and the charger please thanks " * 3
    docs = [{"id": f"e{i}", "text": f"{i}. {edu}"} for i in range(30)] + \
           [{"id": f"c{i}", "text": f"{i}. {chat}"} for i in range(30)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    with serve_stub(reply=lambda b: "Educational score: 4" if "Photosynthesis" in str(b) else
                    "Educational score: 1") as stub:
        r = slm("data", "annotate", "docs.jsonl", "--teacher", f"openai:{stub.url}#m", "--out", "labels.jsonl",
                "--concurrency", "4", "--price-in", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    labels = lines(tmp_path / "labels.jsonl")
    assert len(labels) == 60 and {x["score"] for x in labels} == {1, 4}
    r = slm("data", "train-classifier", "labels.jsonl", "--embedder", "hashing", "--out", "clf", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "val F1@3 1.000" in r.stdout
    r = slm("data", "score", "docs.jsonl", "--classifier", "clf", "--out", "scored.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    scored = {d["id"]: d["edu_score"] for d in lines(tmp_path / "scored.jsonl")}
    assert min(scored[f"e{i}"] for i in range(30)) > max(scored[f"c{i}"] for i in range(30))
    r = slm("data", "filter", "docs.jsonl", "--out", "f", "--no-quality", "--classifier", "clf", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    kept = [json.loads(x)["id"] for p in sorted((tmp_path / "f" / "final").glob("part-*.jsonl"))
            for x in p.read_text().splitlines()]
    assert sorted(kept) == sorted(f"e{i}" for i in range(30))


def test_bad_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "t.csv").write_text("sentence,label\nhello there,1\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "one two"}\n{"text": oops}\n{"text": "three"}\n')
    cases = [
        (("data", "ingest", "t.csv", "--out", "o1"), "column 'text'"),
        (("data", "ingest", "bad.jsonl", "--out", "o2"), "bad.jsonl:2"),
        (("data", "ingest", "missing.txt", "--out", "o3"), "missing.txt"),
        (("synth", "poems", "--n", "3", "--out", "p.jsonl"), "poems"),
        (("data", "train-classifier", "bad.jsonl", "--embedder", "hashing", "--out", "c"), "bad.jsonl:1: no 'id' field"),
    ]
    for args, needle in cases:
        r = slm(*args, cwd=tmp_path)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        err = r.stderr.strip().splitlines()
        assert err[-1].startswith("error: ") and needle in err[-1], (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2" / "stats.json").exists()
    # skip mode goes on past the broken line and counts it
    r = slm("data", "ingest", "bad.jsonl", "--out", "o4", "--on-error", "skip", cwd=tmp_path)
    assert r.returncode == 0 and "1 skipped" in r.stdout
