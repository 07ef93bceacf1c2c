"""Extractive keyphrase tagging: BIO tags from character offsets, a tagger head trained by finetune (full
and LoRA + merge), span decoding and ranking, `slmforge predict --task extract`, bad rows, and the share
of Inspec's gold keyphrases a tagger can find in their text."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import slmforge.train.heads as ft_heads
import slmforge.train.rows as ft_rows
from conftest import TINY_LLAMA, save_tiny_llama, shared_data, small_corpus
from slmforge.errors import SlmforgeError
from slmforge.evaluate.tasks import evaluate_predictions
from slmforge.infer.predict import decode_keyphrases, extract_keyphrases, predict_file
from slmforge.modeldir import ModelDir
from slmforge.train.finetune import FinetuneConfig, finetune

TINY = TINY_LLAMA
FAST = dict(batch_size=16, seq_len=63, lr=5e-3, min_lr=5e-4, warmup_fraction=0.1, threads=1, progress=False,
            log_every=10, ckpt_every=0)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("base") / "model")


def _word(rng):
    """An invented capitalised word: no sentence of small_corpus has a word starting with Q, X or V."""
    return rng.choice("QXV") + "".join(rng.choice("aeiou") + rng.choice("rlnmk") for _ in range(2))


def _keyphrase_rows(n, seed):
    """Sentences with three keyphrases (invented words, one or two of them) at varying places, plus a
    gold phrase that is absent from the text, as Inspec has many."""
    rng = random.Random(seed)
    sentences = [s for doc in small_corpus(200, seed) for s in doc.split(". ")]
    rows = []
    for i in range(n):
        phrases = [_word(rng) if rng.random() < 0.6 else f"{_word(rng)} {_word(rng)}" for _ in range(3)]
        a, b, c = (rng.choice(sentences).rstrip(".") for _ in range(3))
        text = f"{a} {phrases[0]}. {b} and {phrases[1]}. {phrases[2]} {c}."
        rows.append({"id": f"d{i}", "text": text, "phrases": [*phrases, "absent thing"], "keyphrases": phrases})
    return rows


@pytest.fixture(scope="module")
def tagger_run(tmp_path_factory, base_dir):
    tmp = tmp_path_factory.mktemp("tagger")
    train_f = _jsonl(tmp / "train.jsonl", _keyphrase_rows(300, 0))
    val_f = _jsonl(tmp / "val.jsonl", _keyphrase_rows(40, 1))
    s = finetune(base_dir, train_f, tmp / "run", FinetuneConfig(task="tag", max_steps=80, eval_every=20, **FAST), val_path=val_f)
    return tmp, s


# ---------------------------------------------------------------------------------------------- labels


def test_bio_tags_from_offsets_are_exact(base_dir):
    tok = ModelDir.open(base_dir).load_tokenizer()
    text = "The Red Kite saw a red  kite. Tom liked the little bird, not the kites."
    phrases = ["red kite", "little bird", "blue whale", "tom"]  # twice, once, absent, case differs
    spans = ft_rows.phrase_spans(text, phrases)
    assert [text[s:e] for s, e in spans] == ["Red Kite", "red  kite", "Tom", "little bird"]  # not "kites"

    def groups(ex, offsets):
        """The text of each tagged run: B starts one, I continues it."""
        out = []
        for (s, e), t in zip(offsets, ex.tags, strict=False):
            if t == 1:
                out.append(text[s:e])
            elif t == 2:
                out[-1] += text[s:e]
        return [g.strip() for g in out]

    ids, offsets = tok.encode_with_offsets(text, bos=True)
    ex = ft_rows.tag_example(tok, text, phrases, seq_len=64)
    assert ex.ids == ids and ex.tags[0] == ft_rows.IGNORE and len(ex.tags) == len(ids)
    assert tok.decode(ids) == text and all(s < e for s, e in offsets[1:])
    assert groups(ex, offsets) == ["Red Kite", "red  kite", "Tom", "little bird"]
    assert all(t == 0 for (s, e), t in zip(offsets, ex.tags, strict=True) if s >= text.index("not"))

    # Truncation keeps the beginning: a phrase cut off keeps the tags of its first tokens.
    bird = next(i for i, (s, e) in enumerate(offsets) if text[s:e].strip() == "bird")
    cut = ft_rows.tag_example(tok, text, phrases, seq_len=bird)
    assert cut.ids == ids[:bird] and cut.tags == ex.tags[:bird]
    assert groups(cut, offsets) == ["Red Kite", "red  kite", "Tom", "little"]

    # inspec rows: the prompt is the text, "keyphrases" the phrases
    rec = {"prompt": "Find Red Kite here", "completion": " x", "keyphrases": ["red kite"]}
    assert ft_rows.tag_fields("f:1", rec) == ("Find Red Kite here", ["red kite"])


def test_decode_ranks_spans_by_the_probability_of_tagging_them():
    text = "Neural nets, neural nets and trees. Big data."
    #       tokens: "Neural" " nets" "," " neural" " nets" " and" " trees" "." " Big" " data" "."
    offsets = [(0, 6), (6, 11), (11, 12), (12, 19), (19, 24), (24, 28), (28, 34), (34, 35), (35, 39), (39, 44),
               (44, 45)]
    out, beg, ins = [0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]
    probs = torch.tensor([beg, ins, out, beg, [0.3, 0.1, 0.6], out, [0.4, 0.3, 0.3], out, [0.5, 0.3, 0.2],
                          [0.6, 0.1, 0.3], out])

    def p(*factors):  # the geometric mean of P(B), P(I)..., P(not I after)
        return math.exp(sum(math.log(f) for f in factors) / len(factors))

    got = dict(decode_keyphrases(text, offsets, probs, top_k=100))
    # "neural nets" twice (same stems) is one phrase, written and scored as its best occurrence
    assert got["Neural nets"] == pytest.approx(p(0.8, 0.8, 0.95))
    assert "neural nets" not in got
    assert got["trees"] == pytest.approx(p(0.3, 0.95))
    assert got["Big data"] == pytest.approx(p(0.3, 0.3, 0.95))
    # "Neural" then " nets" (P(I) 0.8) and "neural" then " nets" (0.6): one phrase, the second occurrence
    assert got["neural"] == pytest.approx(p(0.8, 1 - 0.6)) and "Neural" not in got
    assert got["data"] == pytest.approx(p(0.1, 0.95))
    # no candidate crosses punctuation, none is longer than max_words
    assert "nets, neural" not in got and "trees. Big" not in got and "nets neural" not in got
    assert "neural nets and trees" in got
    assert "neural nets and trees" not in dict(decode_keyphrases(text, offsets, probs, top_k=100, max_words=3))
    ranked = decode_keyphrases(text, offsets, probs, top_k=3)
    assert [ph for ph, _ in ranked] == sorted(got, key=lambda k: -got[k])[:3] and ranked[0][0] == "Neural nets"
    assert [sc for _, sc in ranked] == sorted((sc for _, sc in ranked), reverse=True)
    # a span that ends inside a word is widened to the whole word (tokens "Ki" "tes"); edge punctuation never
    # enters a phrase
    kites = decode_keyphrases("Kites, fly", [(0, 2), (2, 5), (5, 6), (6, 10)], torch.tensor([beg, ins, out, out]),
                              top_k=1)
    assert kites == [("Kites", pytest.approx(p(0.8, 0.8, 0.95)))]


# ------------------------------------------------------------------------------------------- training


def test_tagger_learns_and_extracts_held_out_keyphrases(tagger_run, tmp_path):
    tmp, s = tagger_run
    assert s["metrics"]["val_tag_f1"] > 0.8 and s["train"]["best_metric"] == "val_tag_f1"
    model_dir = tmp / "run" / "model"
    meta = ModelDir.open(model_dir).meta
    assert meta["tagger"]["labels"] == ["O", "B", "I"] and meta["tagger"]["seq_len"] == 63
    assert meta["tagger"]["train_phrases_in_text_pct"] == 75.0  # 3 of the 4 phrases of every row occur
    assert (model_dir / ft_heads.TAGGER_HEAD_FILE).is_file()

    test_f = _jsonl(tmp_path / "test.jsonl", _keyphrase_rows(40, 2))
    stats = predict_file(model_dir, "extract", test_f, tmp_path / "pred.jsonl", top_k=10)
    rows = _read(tmp_path / "pred.jsonl")
    assert stats["rows"] == 40 and [r["id"] for r in rows] == [f"d{i}" for i in range(40)]
    assert all(len(r["prediction"].split("; ")) == 10 == len(r["scores"]) for r in rows)  # filled up to k
    assert "text" not in rows[0] and rows[0]["keyphrases"]
    m = evaluate_predictions("keyphrase", tmp_path / "pred.jsonl")
    # Perfect is 75 (3 gold, 5 predicted); 5 of a row's ~20 words at random would score about 10.
    assert m["n"] == 40 and m["macro_f1@5"] > 45, m

    # The same rows as inspec writes them (prompt + keyphrases, no text); and the CLI
    inspec_like = [{"id": r["id"], "prompt": r["text"], "completion": " x", "keyphrases": r["keyphrases"]}
                   for r in _keyphrase_rows(40, 2)]
    src = _jsonl(tmp_path / "inspec.jsonl", inspec_like)
    out = tmp_path / "cli.jsonl"
    r = subprocess.run([sys.executable, "-m", "slmforge", "predict", str(model_dir), "--task", "extract", "--input",
                        str(src), "--out", str(out), "--top-k", "3"], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == 0, r.stderr
    cli_rows = _read(out)
    assert [c["prediction"].split("; ") for c in cli_rows] == [p["prediction"].split("; ")[:3] for p in rows]
    assert "prompt" not in cli_rows[0] and cli_rows[0]["completion"] == " x"


def test_tagger_lora_adapter_and_merge_keep_the_head(tmp_path, base_dir):
    from peft import PeftModel

    from slmforge.cli import app

    train_f = _jsonl(tmp_path / "train.jsonl", _keyphrase_rows(120, 0))
    r = CliRunner().invoke(app, ["finetune", "--model", str(base_dir), "--data", str(train_f), "--out",
                                 str(tmp_path / "run"), "--task", "tag", "--mode", "lora", "--lora-r", "4",
                                 "--lora-targets", "q_proj,v_proj,down_proj", "--lora-dropout", "0", "--merge",
                                 "--steps", "12", "--lr", "5e-3", "--seq-len", "63", "--eval-every", "6",
                                 "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    assert "val tag F1" in r.output
    adapter, merged_in_run = tmp_path / "run" / "adapter", tmp_path / "run" / "model"
    assert (adapter / ft_heads.TAGGER_HEAD_FILE).is_file() and (merged_in_run / ft_heads.TAGGER_HEAD_FILE).is_file()
    assert json.loads((adapter / "slmforge.json").read_text())["tagger"]["labels"] == ["O", "B", "I"]
    r = CliRunner().invoke(app, ["merge-lora", str(base_dir), str(adapter), str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output

    # base + adapter + head, the run's merged model and merge-lora's give the same tag probabilities
    texts = [row["text"] for row in _keyphrase_rows(3, 5)]
    md = ModelDir.open(base_dir)
    with_adapter = ft_heads.TokenTagger(PeftModel.from_pretrained(md.load_model(), str(adapter)))
    with_adapter.score.weight.data = load_file(str(adapter / ft_heads.TAGGER_HEAD_FILE))["score.weight"]
    ref = ft_heads.tag_probs(with_adapter.eval(), md.load_tokenizer(), texts, 63)
    for d in (merged_in_run, tmp_path / "merged"):
        model, tok, info = ft_heads.load_tagger(d)
        got = ft_heads.tag_probs(model, tok, texts, info["seq_len"])
        assert all(o1 == o2 and torch.allclose(p1, p2, atol=1e-5)
                   for (o1, p1), (o2, p2) in zip(ref, got, strict=True))
    rows = [("x:1", {"text": t}) for t in texts]
    assert extract_keyphrases(tmp_path / "merged", rows, top_k=4) == extract_keyphrases(merged_in_run, rows, top_k=4)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_tag_rows_name_file_and_line(tmp_path, base_dir):
    def run(*rows):
        f = tmp_path / "train.jsonl"
        f.write_text("".join(r + "\n" for r in rows))
        with pytest.raises(SlmforgeError) as e:
            finetune(base_dir, f, tmp_path / "run", FinetuneConfig(task="tag", max_steps=1, **FAST))
        return str(e.value)

    ok = json.dumps({"text": "Tom saw the ball.", "phrases": ["ball"]})
    assert run(ok, json.dumps({"phrases": ["ball"]})).endswith("train.jsonl:2: missing field 'text'")
    assert run(ok, ok, json.dumps({"text": " ", "phrases": []})).endswith("train.jsonl:3: field 'text' is empty")
    assert run(json.dumps({"text": "a b"})).endswith("train.jsonl:1: missing field 'phrases'")
    assert run(json.dumps({"text": "a b", "phrases": "a"})).endswith(
        "train.jsonl:1: field 'phrases' must be a list of strings")
    assert run(ok, json.dumps({"text": "a b", "keyphrases": ["a", 3]})).endswith(
        "train.jsonl:2: field 'keyphrases' must be a list of strings")

    src = _jsonl(tmp_path / "in.jsonl", [{"text": "Tom saw the ball."}, {"prompt": 3}])
    with pytest.raises(SlmforgeError, match=r"in.jsonl:2: field 'prompt' must be a string"):
        predict_file(base_dir, "extract", src, tmp_path / "o.jsonl")
    _jsonl(src, [{"text": "Tom saw the ball."}])
    with pytest.raises(SlmforgeError, match="no 'tagger' entry"):
        predict_file(base_dir, "extract", src, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------------------------------- real data


def test_inspec_rows_serve_the_tagger(tmp_path):
    """Inspec's rows (prompt + keyphrases) are tag rows. 58.5% of the training documents' distinct gold
    keyphrases occur in their title and abstract (56.4% in val, 57.7% in test); the rest can only be
    generated. 100 of Inspec's 1,500 training documents are held out as the validation split."""
    from slmforge.data.tasks import prepare_inspec

    prepare_inspec(shared_data("keyphrase/Inspec.zip").parents[1], tmp_path)
    recs = ft_rows.read_records(tmp_path / "train.jsonl")
    pairs = [ft_rows.tag_fields(where, rec) for where, rec in recs]
    assert len(pairs) == 1400 and all(phrases for _, phrases in pairs)
    n = found = 0
    for text, phrases in pairs:
        for p in {x.lower() for x in phrases}:
            n += 1
            found += bool(ft_rows.phrase_spans(text, [p]))
    assert 0.57 < found / n < 0.6, found / n
