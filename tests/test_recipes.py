"""Task recipes (`slmforge run`): a miniature recipe end to end on a handful of rows, resuming by skipping
done stages, the report, and one-line errors (file:line) for bad recipes and missing data."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from slmforge.errors import SlmforgeError
from slmforge.recipes import find_recipe, load_recipe, run_recipe
from slmforge.tokenizer import Tokenizer, train_tokenizer

TINY_MODEL = ("model: {preset: 200k, vocab_size: 300, context: 64,\n"
              "        overrides: {num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64}}\n")


def _sst2_like(root, n=60, seed=0):
    """A miniature shared-data folder in the SST-2 layout: sst2/train.tsv with a header."""
    rng = random.Random(seed)
    good, bad = ["great", "lovely", "fine", "moving"], ["awful", "dull", "boring", "bad"]
    lines = ["text\tlabel"]
    for i in range(n):
        pos = i % 2 == 0
        lines.append(f"a {rng.choice(good if pos else bad)} film number {i}\t{int(pos)}")
    (root / "sst2").mkdir(parents=True)
    (root / "sst2" / "train.tsv").write_text("\n".join(lines) + "\n")
    return root


def _inspec_like(root, n=30, seed=0):
    """A miniature shared-data folder with keyphrase/Inspec.zip: title + abstract per document, and its
    keyphrases (invented words that occur in the abstract, and one that does not)."""
    import zipfile

    rng = random.Random(seed)
    (root / "keyphrase").mkdir(parents=True)
    with zipfile.ZipFile(root / "keyphrase" / "Inspec.zip", "w") as z:
        for i in range(1, n + 1):
            words = ["Q" + "".join(rng.choice("aeiou") + rng.choice("rlnm") for _ in range(2)) for _ in range(2)]
            z.writestr(f"Inspec/docsutf8/{i}.txt", f"On {words[0]}\n\tWe study {words[0]} and {words[1]} here.\n")
            z.writestr(f"Inspec/keys/{i}.key", f"{words[0]}\n{words[1]}\nabsent phrase\n")
    return root


# a miniature inspec recipe's data, model and pretraining (its variants follow)
MINI_INSPEC = ("data: {loader: inspec, options: {n_test: 6, n_val: 4}}\n" + TINY_MODEL
               + "pretrain: {max_minutes: 5, max_steps: 3, batch_size: 4, seq_len: 32}\n")


def _recipe(tmp_path, text):
    path = tmp_path / "mini.yaml"
    path.write_text(text)
    return path


MINI_SST2 = f"""name: mini-sst2
description: a miniature sst2 recipe for tests
data: {{loader: sst2, options: {{n_test: 10, n_val: 10}}}}
{TINY_MODEL}pretrain: {{max_minutes: 5, max_steps: 3, batch_size: 4, seq_len: 32}}
variants:
  - name: scratch
    init: scratch
    finetune: {{task: classify, head: classifier, max_steps: 3, batch_size: 8, seq_len: 32, eval_every: 2}}
  - name: pretrained-lora
    init: pretrained
    finetune: {{task: classify, head: classifier, mode: lora, max_steps: 2, batch_size: 8, seq_len: 32}}
  - name: pretrained-as-is
    init: variant:pretrained-lora
predict: {{mode: classify}}
eval: {{task: classification, metric: accuracy}}
"""


def test_mini_recipe_end_to_end_and_resume(tmp_path):
    data = _sst2_like(tmp_path / "shared")
    recipe, out = _recipe(tmp_path, MINI_SST2), tmp_path / "run"
    report = run_recipe(recipe, out, data)
    assert [v["variant"] for v in report["variants"]] == ["scratch", "pretrained-lora", "pretrained-as-is"]
    lora = report["variants"][1]
    assert 0 < lora["trainable_params"] < lora["params"] and lora["steps"] == 2
    assert all(0 <= v["metric"] <= 100 and v["metrics"]["n"] == 10 for v in report["variants"])
    assert report["pretrain"]["steps"] == 3 and report["data"]["counts"] == {"train": 40, "val": 10, "test": 10}
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "classifier_head.safetensors").is_file()
    md = (out / "report.md").read_text()
    assert "| scratch | scratch | full | classifier |" in md and "accuracy" in md
    # The shipped variant is the best on validation, whatever the test figures say.
    vals = [v["val_metric"] for v in report["variants"]]
    assert all(0 <= x <= 100 for x in vals) and report["chosen_on"] == "accuracy on val.jsonl"
    assert report["chosen_variant"] == report["variants"][vals.index(max(vals))]["variant"]
    assert json.loads((out / "report.json").read_text())["chosen_variant"] == report["chosen_variant"]
    assert "(val)" in md and "Chosen on validation" in md
    assert set(report["data"]["overlap"]) == {"val", "test"} and report["data"]["overlap"]["test"]["exact"] == 0

    # A second run skips every done stage: nothing is trained or predicted again.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name in ("predictions.jsonl", "model.safetensors",
                                                                          "finetune.json", "metrics.json")}
    stamps = {p: t for p, t in stamps.items() if out / "model" not in p.parents}
    again = run_recipe(recipe, out, data)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert [v["metric"] for v in again["variants"]] == [v["metric"] for v in report["variants"]]
    # ...and reports what its stages cost when they ran, not 0 s
    assert again["timings_s"] == report["timings_s"] and report["timings_s"]["pretrain_s"] > 0
    assert set(report["timings_s"]) >= {"data_s", "tokenizer_s", "pretrain_s", "scratch.finetune_s",
                                         "scratch.predict_s", "pretrained-as-is.finetune_s"}


def test_mini_generate_recipe_with_generated_support_chat(tmp_path):
    recipe = _recipe(tmp_path, f"""name: mini-chat
data: {{loader: support_chat, options: {{n: 24, n_test: 3, n_val: 3}}}}
{TINY_MODEL}variants:
  - name: scratch
    init: scratch
    finetune: {{task: chat, max_steps: 2, batch_size: 4, seq_len: 48, val_fraction: 0.2}}
predict: {{mode: generate, max_tokens: 6, batch_size: 2}}
eval: {{task: summarization, metric: rougeL}}
""")
    report = run_recipe(recipe, tmp_path / "run", tmp_path / "no-data-needed")
    assert report["variants"][0]["metrics"]["n"] == 3 and report["pretrain"] is None
    rows = [json.loads(x) for x in (tmp_path / "run/variants/scratch/predictions.jsonl").read_text().splitlines()]
    assert all(r["completion"] and isinstance(r["prediction"], str) for r in rows)  # the reference turn


def test_length_penalty_is_chosen_on_val_and_used_on_test(tmp_path):
    recipe = _recipe(tmp_path, f"""name: mini-beams
data: {{loader: support_chat, options: {{n: 24, n_test: 3, n_val: 3}}}}
{TINY_MODEL}variants:
  - name: scratch
    init: scratch
    finetune: {{task: chat, max_steps: 2, batch_size: 4, seq_len: 48}}
predict: {{mode: generate, max_tokens: 6, batch_size: 2, beams: 2, sweep_length_penalty: [0.5, 2.0]}}
eval: {{task: summarization, metric: rougeL}}
""")
    report = run_recipe(recipe, tmp_path / "run", tmp_path / "no-data-needed")
    lp = report["variants"][0]["length_penalty"]
    vdir = tmp_path / "run/variants/scratch"
    assert lp["values"] == [0.5, 2.0] and lp["chosen"] in (0.5, 2.0)
    assert lp["val"][f"{lp['chosen']:g}"] == max(lp["val"].values())
    chosen = (vdir / f"val_lp{lp['chosen']:g}" / "val_predictions.jsonl").read_text()
    assert (vdir / "val_predictions.jsonl").read_text() == chosen
    assert json.loads((vdir / "predict.json").read_text())["length_penalty"] == lp["chosen"]


def test_mini_keyphrase_recipe_with_a_tagger_variant(tmp_path):
    data = _inspec_like(tmp_path / "shared")
    recipe = _recipe(tmp_path, f"""name: mini-inspec
{MINI_INSPEC}variants:
  - name: scratch
    init: scratch
    finetune: {{task: lm, max_steps: 2, batch_size: 4, seq_len: 48}}
  - name: pretrained-tagger
    init: pretrained
    finetune: {{task: tag, max_steps: 3, batch_size: 4, seq_len: 63, eval_every: 2}}
    predict: {{mode: extract, top_k: 4}}
predict: {{mode: generate, max_tokens: 6, stop: ["\\n"], batch_size: 4}}
eval: {{task: keyphrase, metric: macro_f1@5}}
""")
    out = tmp_path / "run"
    report = run_recipe(recipe, out, data)
    scratch, tagger = report["variants"]
    assert tagger["head"] == "tagger" and tagger["steps"] == 3 and tagger["val_tag_f1"] is not None
    assert scratch["head"] == "-" and all(v["metrics"]["n"] == 6 for v in report["variants"])
    rows = [json.loads(x) for x in (out / "variants/pretrained-tagger/predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(1 <= len(r["prediction"].split("; ")) <= 4 and r["keyphrases"] for r in rows)
    assert (out / "variants/pretrained-tagger/model/tagger_head.safetensors").is_file()
    assert json.loads((out / "variants/pretrained-tagger/predict.json").read_text())["mode"] == "extract"
    assert json.loads((out / "variants/scratch/predict.json").read_text())["mode"] == "generate"
    assert "| pretrained-tagger | pretrained | full | tagger |" in (out / "report.md").read_text()


def test_tagger_ensemble_variant_averages_its_members(tmp_path):
    from slmforge.infer.predict import decode_keyphrases
    from slmforge.io import read_jsonl
    from slmforge.train.heads import save_tagger_ensemble, tagger_probs
    from slmforge.train.rows import tag_text

    data = _inspec_like(tmp_path / "shared")
    recipe = _recipe(tmp_path, f"""name: mini-ensemble
{MINI_INSPEC}variants:
  - {{name: a, init: pretrained, finetune: {{task: tag, max_steps: 3, batch_size: 4, seq_len: 63}}}}
  - {{name: b, init: scratch, finetune: {{task: tag, max_steps: 2, batch_size: 4, seq_len: 63, lr: 0.01}}}}
  - {{name: a+b, ensemble: [a, b]}}
predict: {{mode: extract, top_k: 4}}
eval: {{task: keyphrase, metric: macro_f1@5}}
""")
    out = tmp_path / "run"
    report = run_recipe(recipe, out, data)
    a, b, ab = report["variants"]
    from slmforge.modeldir import ModelDir
    lm_params = ModelDir.open(out / "variants/a/model").config.n_params
    assert ab["init"] == "ensemble of a + b" and ab["params"] == 2 * lm_params
    assert ab["total_train_s"] == pytest.approx(a["total_train_s"] + b["finetune_s"], abs=0.2)
    model = out / "variants/a+b/model"
    meta = json.loads((model / "slmforge.json").read_text())
    assert meta["ensemble"] == ["ensemble/1"] and (model / "ensemble/1/tagger_head.safetensors").is_file()
    # its predictions are the ranking of the members' mean probabilities
    rows = list(read_jsonl(out / "data/test.jsonl"))
    texts = [tag_text("t", r) for r in rows]
    pa, pb = (tagger_probs(out / f"variants/{n}/model", texts) for n in ("a", "b"))
    assert not torch.allclose(pa[0][1], pb[0][1])
    want = ["; ".join(ph for ph, _ in decode_keyphrases(t, oa, (p + q) / 2, 4))
            for t, (oa, p), (_, q) in zip(texts, pa, pb, strict=True)]
    got = [r["prediction"] for r in read_jsonl(out / "variants/a+b/predictions.jsonl")]
    assert got == want
    # the same directory from the CLI, and an error is one line
    from typer.testing import CliRunner

    from slmforge.cli import app
    res = CliRunner().invoke(app, ["ensemble", str(out / "variants/a/model"), str(out / "variants/b/model"),
                                   "--out", str(tmp_path / "e1")])
    assert res.exit_code == 0 and json.loads((tmp_path / "e1/slmforge.json").read_text())["ensemble"] == ["ensemble/1"]
    res = CliRunner().invoke(app, ["ensemble", str(out / "variants/a/model"), "--out", str(tmp_path / "e0")])
    assert "at least 2 taggers" in str(res.exception) and not (tmp_path / "e0").exists()
    # members must be taggers, not ensembles themselves
    with pytest.raises(SlmforgeError, match="is an ensemble already"):
        save_tagger_ensemble([model, out / "variants/a/model"], tmp_path / "e2")
    with pytest.raises(SlmforgeError, match="no 'tagger' entry"):
        save_tagger_ensemble([out / "variants/a/model", out / "pretrain/model"], tmp_path / "e3")


def test_extra_pretraining_text_joins_the_corpus_not_the_tokenizer_and_is_decontaminated(tmp_path):
    data = _sst2_like(_inspec_like(tmp_path / "shared"))
    recipe = _recipe(tmp_path, f"""name: mini-extra
data:
  loader: inspec
  options: {{n_test: 6, n_val: 4}}
  pretrain_extra:
    - {{loader: sst2, options: {{n_test: 10, n_val: 10}}, files: [train.jsonl]}}
    - {{loader: inspec, options: {{n_test: 6, n_val: 4}}, files: [test.jsonl, val.jsonl]}}
    - {{loader: text, options: {{files: [notes.txt]}}}}
{TINY_MODEL}pretrain: {{max_minutes: 5, max_steps: 2, batch_size: 4, seq_len: 32}}
""")
    (data / "notes.txt").write_text("A plain note.\n\nAnother plain note.\n", encoding="utf-8")
    out = tmp_path / "run"
    run_recipe(recipe, out, data)
    meta = json.loads((out / "pretrain_corpus.jsonl.meta").read_text())
    sst2_train = len((out / "extra/0-sst2/train.jsonl").read_text().splitlines())
    assert meta["documents"] == 20 and sst2_train == 40
    # the same loader's own val and test rows share 13-grams with the held-out inputs: every one is dropped
    assert meta["extra"] == [
        {"loader": "sst2", "files": ["train.jsonl"], "documents": 40, "dropped_sharing_a_held_out_13gram": 0},
        {"loader": "inspec", "files": ["test.jsonl", "val.jsonl"], "documents": 0,
         "dropped_sharing_a_held_out_13gram": 10},
        # no files given: every split the loader wrote (the text loader writes train only)
        {"loader": "text", "files": ["train.jsonl"], "documents": 2, "dropped_sharing_a_held_out_13gram": 0}]
    corpus = [json.loads(x)["text"] for x in (out / "pretrain_corpus.jsonl").read_text().splitlines()]
    assert len(corpus) == 62 and sum("film number" in t for t in corpus) == 40
    assert corpus[-2:] == ["A plain note.", "Another plain note."]
    # the tokenizer is the task's, trained on its 20 training documents only
    tok, text = Tokenizer.from_dir(out / "tokenizer"), "\n".join(corpus)
    assert tok.encode(text) == train_tokenizer(corpus[:20], 300).encode(text)
    assert tok.encode(text) != train_tokenizer(corpus, 300).encode(text)


@pytest.mark.parametrize("text, message", [
    ("name: x\ndata: {loader: sst2\n", r"mini.yaml:\d: invalid YAML"),
    ("name: x\ndata: {loader: sst2}\nvariants: []\npredict: {mode: classify}\neval: {task: classification,"
     " metric: accuracy}\nbogus: 1\n", r"mini.yaml:6: field 'bogus': unknown field"),
    ("name: x\ndata: {loader: sst2}\nvariants:\n  - name: a\n    init: scratch\n    finetune: {max_minutes: fast}\n"
     "predict: {mode: classify}\neval: {task: classification, metric: accuracy}\n",
     r"mini.yaml:6: field 'variants\[0\].finetune.max_minutes': input should be a valid number, got \"fast\""),
    ("name: x\ndata: {loader: nope}\nvariants: [{name: a, init: scratch}]\npredict: {mode: classify}\n"
     "eval: {task: classification, metric: accuracy}\n", r"mini.yaml:2: field 'loader': unknown loader 'nope'"),
    ("name: x\ndata:\n  loader: sst2\n  pretrain_extra:\n    - {loader: sst2}\n    - {loader: nope}\n"
     "variants: [{name: a, init: scratch}]\npredict: {mode: classify}\neval: {task: classification, metric: accuracy}\n",
     r"mini.yaml:6: field 'loader': unknown loader 'nope'"),
    ("name: x\ndata: {loader: inspec}\n" + TINY_MODEL + "variants:\n  - name: a\n    init: scratch\n"
     "    finetune: {task: tag}\n  - {name: b, ensemble: [a]}\npredict: {mode: extract}\n"
     "eval: {task: keyphrase, metric: macro_f1@5}\n", r"mini.yaml:9: field 'ensemble': needs 2 or more"),
    ("name: x\ndata: {loader: sst2}\n" + TINY_MODEL + "variants:\n  - {name: a, init: scratch}\n"
     "  - {name: b, init: 'variant:zzz'}\npredict: {mode: classify}\neval: {task: classification, metric: accuracy}\n",
     r"mini.yaml:7: field 'init': 'variant:zzz': no earlier variant"),
    ("name: x\nvariants: [{name: a}]\npredict: {mode: classify}\neval: {task: classification, metric: a}\n",
     r"mini.yaml:1: field 'data': missing field"),
    ("name: x\ndata: {loader: inspec}\n" + TINY_MODEL + "variants:\n  - name: a\n    init: scratch\n"
     "    finetune: {task: tag}\npredict: {mode: generate}\neval: {task: keyphrase, metric: macro_f1@5}\n",
     r"mini.yaml:6: field 'predict': finetune task tag needs predict mode extract"),
    ("name: x\ndata: {loader: inspec}\n" + TINY_MODEL + "variants:\n  - name: a\n    init: scratch\n"
     "    finetune: {task: lm}\n    predict: {mode: extract, top_k: 0}\npredict: {mode: generate}\n"
     "eval: {task: keyphrase, metric: macro_f1@5}\n", r"mini.yaml:9: field 'top_k': must be > 0"),
    ("name: x\ndata: {loader: sst2}\n" + TINY_MODEL + "variants:\n  - name: a\n    init: scratch\n"
     "    finetune: {task: classify, head: generative, class_weights: balanced}\npredict: {mode: classify}\n"
     "eval: {task: classification, metric: accuracy}\n",
     r"mini.yaml:8: finetune config: class_weights balanced needs task classify with head classifier"),
    ("name: x\ndata: {loader: sst2}\n" + TINY_MODEL + "variants:\n  - name: a\n    init: scratch\n"
     "    finetune: {task: summarize}\npredict: {mode: classify}\n"
     "eval: {task: classification, metric: accuracy}\n", r"mini.yaml:8: finetune config: task must be"),
    ("name: x\ndata: {loader: sst2}\n" + TINY_MODEL + "variants:\n  - name: a\n    init: scratch\n"
     "    finetune: {task: classify, batch_size: '8'}\npredict: {mode: classify}\n"
     "eval: {task: classification, metric: accuracy}\n",
     r"mini.yaml:8: field 'variants\[0\].finetune.batch_size': input should be a valid integer, got \"8\""),
    ("name: x\ndata: {loader: sst2}\n" + TINY_MODEL + "pretrain: {lr: true}\nvariants: [{name: a, init: scratch}]\n"
     "predict: {mode: classify}\neval: {task: classification, metric: accuracy}\n",
     r"mini.yaml:5: field 'pretrain.lr': input should be a valid number, got true"),
    ("name: x\ndata: {loader: sst2}\n" + TINY_MODEL + "pretrain: {seed: 3}\nvariants: [{name: a, init: scratch}]\n"
     "predict: {mode: classify}\neval: {task: classification, metric: accuracy}\n",
     r"mini.yaml:5: field 'seed': the recipe's top-level seed is every stage's seed"),
])
def test_bad_recipe_is_one_error_with_file_and_line(tmp_path, text, message):
    with pytest.raises(SlmforgeError, match=message):
        load_recipe(_recipe(tmp_path, text))


def test_bundled_recipes_load_and_bad_data_is_reported(tmp_path):
    for name in ("sst2", "multi30k", "wmt-biomed", "pubmedqa", "hdfs-logs", "inspec", "dialogsum", "support-chat"):
        assert load_recipe(name).name == name
    assert find_recipe("recipes/sst2.yaml").name == "sst2.yaml"
    with pytest.raises(SlmforgeError, match="no such recipe"):
        find_recipe("nope")
    with pytest.raises(SlmforgeError, match="data folder not found"):
        run_recipe(_recipe(tmp_path, MINI_SST2), tmp_path / "run", tmp_path / "absent")
    broken = tmp_path / "shared" / "sst2"
    broken.mkdir(parents=True)
    (broken / "train.tsv").write_text("text\tlabel\nfine film\t1\nno label here\n")
    with pytest.raises(SlmforgeError, match=r"train.tsv:3: expected 'text<TAB>0\|1'"):
        run_recipe(_recipe(tmp_path, MINI_SST2), tmp_path / "run", tmp_path / "shared")


def test_cli_run_bad_recipe_is_one_line(tmp_path):
    path = _recipe(tmp_path, "name: x\ndata: {loader: sst2}\nvariants: 3\n")
    r = subprocess.run([sys.executable, "-m", "slmforge", "run", str(path)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "mini.yaml:3" in lines[0]
