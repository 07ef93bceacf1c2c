"""The curate chain: stages in order, removal reasons, report, resume, 2 workers, datatrove executor, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slmforge.data.curate import CurateConfig, curate, load_curate_config, shard_paths
from slmforge.data.storygen import generate_stories
from slmforge.errors import SlmforgeError
from slmforge.io import read_jsonl

JUNK = [
    "#### $$$ ### @@@ %%% ^^^ &&& *** ((( ))) ### $$$ ### @@@ %%% ^^^ &&& *** ((( ))) " * 3,
    "Click here. Click here. Click here. Click here. Click here. Click here. Click here. " * 4,
    "081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_38865049064139660 "
    "terminating 081109 203807 222 INFO dfs.DataNode$PacketResponder: PacketResponder 0 for block",
]
EVAL = ("The little dragon found a golden key under the old oak tree and carried it all the way "
        "home to show his mother before the sun went down.")


def make_corpus(tmp: Path) -> tuple[list[Path], Path, int]:
    stories = [s["text"] for s in generate_stories(121, seed=3)]
    a = [{"text": t, "n": i} for i, t in enumerate(stories[:80])]
    b = [{"text": t, "n": 100 + i} for i, t in enumerate(stories[80:120])]
    b += [{"text": stories[i], "n": 200 + i} for i in range(10)]  # 10 exact duplicates of a's stories
    b += [{"text": stories[20].replace(" the ", " a ", 1) + " The end.", "n": 300}]  # a near duplicate
    b += [{"text": j, "n": 400 + i} for i, j in enumerate(JUNK)]
    b += [{"text": stories[120] + " " + EVAL, "n": 500}]  # contaminated
    paths = [tmp / "a.jsonl", tmp / "b.jsonl"]
    for p, rows in zip(paths, (a, b), strict=True):
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = tmp / "eval.jsonl"
    ev.write_text(json.dumps({"text": EVAL}) + "\n")
    return paths, ev, len(a) + len(b)


def config(tmp: Path, out: str, **kw) -> CurateConfig:
    paths, ev, _ = make_corpus(tmp)
    stages = [{"dedup": {}}, {"quality": {"min_words": 20}}, {"decontam": {"eval": [str(ev)]}}]
    return CurateConfig(out=str(tmp / out), inputs=[str(p) for p in paths], stages=stages, shard_docs=40, **kw)


def final_docs(out: Path) -> list[dict]:
    return [d for p in shard_paths(out / "final") for d in read_jsonl(p)]


def test_curate_chain_removes_each_kind_and_reports(tmp_path):
    cfg = config(tmp_path, "run")
    report = curate(cfg)
    names = [s["stage"] for s in report["stages"]]
    assert names == ["source", "dedup", "quality", "decontam"]
    by = {s["stage"]: s for s in report["stages"]}
    assert by["source"]["out"]["docs"] == 135
    assert by["dedup"]["reasons"] == {"dedup:exact": 10, "dedup:near": 1}
    assert by["dedup"]["clusters"] == 11  # each duplicate here copies a different story
    assert sum(by["quality"]["reasons"].values()) == 3  # the three junk documents, nothing else
    assert by["decontam"]["reasons"] == {"decontam": 1}
    kept = final_docs(Path(cfg.out))
    assert len(kept) == 135 - 10 - 1 - 3 - 1
    assert {d["n"] for d in kept} == set(range(80)) | set(range(100, 140)) - {500}
    assert all("source" in d for d in kept)  # metadata and provenance pass through
    removed = [d for p in sorted((Path(cfg.out) / "01-dedup").glob("removed-*.jsonl")) for d in read_jsonl(p)]
    assert all(d["duplicate_of"].startswith(str(tmp_path / "a.jsonl")) for d in removed)
    for f in ("report.md", "report.json", "funnel.png"):
        assert (Path(cfg.out) / f).stat().st_size > 0
    md = (Path(cfg.out) / "report.md").read_text()
    assert "| dedup | 135 | 124 | 11 |" in md and "decontam" in md


def test_curate_resumes_an_interrupted_stage_without_loss_or_duplicates(tmp_path):
    cfg = config(tmp_path, "run")
    curate(cfg)
    expected = final_docs(Path(cfg.out))
    # simulate a kill inside the quality stage: one shard written, the others and the marker missing
    q = Path(cfg.out) / "02-quality"
    (q / "stats.json").unlink()
    for p in sorted(q.glob("part-*"))[1:]:
        p.unlink()
    for p in sorted(q.glob("removed-*"))[1:]:
        p.unlink()
    (Path(cfg.out) / "03-decontam" / "stats.json").unlink()
    report = curate(cfg)
    assert final_docs(Path(cfg.out)) == expected
    assert [s["out"]["docs"] for s in report["stages"]][-1] == len(expected)


def test_two_workers_and_datatrove_executor_give_the_same_result(tmp_path):
    pytest.importorskip("datatrove")
    one = curate(config(tmp_path, "one"))
    two = curate(config(tmp_path, "two", workers=2))
    dt = curate(config(tmp_path, "dt", workers=2, executor="datatrove"))
    texts = [d["text"] for d in final_docs(tmp_path / "one")]
    assert [d["text"] for d in final_docs(tmp_path / "two")] == texts
    assert sorted(d["text"] for d in final_docs(tmp_path / "dt")) == sorted(texts)
    for a, b in ((one, two), (one, dt)):
        assert [s["out"]["docs"] for s in a["stages"]] == [s["out"]["docs"] for s in b["stages"]]
        assert [s["reasons"] for s in a["stages"]] == [s["reasons"] for s in b["stages"]]


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("inputs: [x.jsonl]\nstages:\n  - dedupe: {}\n")
    with pytest.raises(SlmforgeError, match="c.yaml:3: stages\\[0\\]: must be one of"):
        load_curate_config(bad)
    bad.write_text("inputs: [x.jsonl]\nworkerz: 2\n")
    with pytest.raises(SlmforgeError, match="unknown field 'workerz'"):
        load_curate_config(bad)
    bad.write_text("inputs: [nope/*.jsonl]\nstages: [{quality: {min_words: 3}}]\n")
    with pytest.raises(SlmforgeError, match="no such file"):
        curate(load_curate_config(bad))
    # the whole config is checked when it is loaded, before any input is looked at
    bad.write_text("inputs: [nope/*.jsonl]\nstages: [{quality: {min_wordz: 3}}]\n")
    with pytest.raises(SlmforgeError, match="c.yaml:2: stages\\[0\\].quality: unknown option 'min_wordz'"):
        load_curate_config(bad)
    (tmp_path / "x.jsonl").write_text('{"text": "a b c"}\n')
    bad.write_text("inputs: [x.jsonl]\nstages: [{quality: {min_wordz: 3}}]\n")
    with pytest.raises(SlmforgeError, match="unknown option 'min_wordz'"):
        curate(load_curate_config(bad, out=str(tmp_path / "o")))


def test_cli_curate_and_bad_input(tmp_path):
    paths, ev, _ = make_corpus(tmp_path)
    cfg = tmp_path / "curate.yaml"
    cfg.write_text(f"out: out\ninputs: [a.jsonl, b.jsonl]\nstages:\n  - dedup: {{}}\n"
                   f"  - decontam: {{eval: [{ev.name}]}}\n")
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "slmforge", "data", "curate", str(cfg)], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and (tmp_path / "out" / "final").is_dir()
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    r = subprocess.run([sys.executable, "-m", "slmforge", "data", "dedup", "broken.jsonl", "--out", "o2"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "broken.jsonl:2" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list((tmp_path / "o2").glob("final"))
