"""The quickstart is the bundled recipe slmforge/recipes/quickstart.yaml, run by the recipe runner with the
command's options as overrides: stories -> tokenizer -> pretrain -> judge (bits per byte, samples) -> report."""

import json
import os
import subprocess
import sys

import torch

from slmforge.modeldir import ModelDir
from slmforge.recipes import load_recipe, run_recipe

TINY = {"data.options.n": 300, "model.vocab_size": 300, "model.preset": "200k", "model.context": 64,
        "pretrain.seq_len": 64, "pretrain.batch_size": 8, "pretrain.max_steps": 30, "pretrain.max_minutes": None,
        "pretrain.lr": 3e-3, "judge.samples": 2, "judge.sample_tokens": 30}


def test_quickstart_tiny_then_rerun_skips_done_stages(tmp_path, capsys):
    torch.set_num_threads(1)
    report = run_recipe(load_recipe("quickstart", TINY), tmp_path / "qs")
    model_dir = tmp_path / "qs" / "pretrain" / "model"
    md = ModelDir.open(model_dir)
    assert md.meta["stage"] == "pretrain" and md.config.n_params < 1e6
    assert report["pretrain"]["val_loss"] < 5.0 and report["pretrain"]["steps"] == 30  # ln(300) = 5.7 at init
    assert report["data"]["counts"] == {"train": 294, "val": 6}  # 2% of the stories held out, never pretrained on
    samples = report["judge"]["samples"]
    assert len(samples) == 2 and samples[0].startswith("Once upon a time")
    assert 0 < report["judge"]["val_bits_per_byte"] < 10
    md_text = (tmp_path / "qs" / "report.md").read_text()
    assert "Bits per byte" in md_text and "pretrain/loss_curve.png" in md_text
    assert (tmp_path / "qs" / "pretrain" / "loss_curve.png").stat().st_size > 1000
    first_weights = (model_dir / "model.safetensors").read_bytes()
    capsys.readouterr()

    run_recipe(load_recipe("quickstart", TINY), tmp_path / "qs")  # everything exists: every stage is skipped
    err = capsys.readouterr().err
    assert err.count("done, skipping") == 5, err  # data, tokenizer, packing, pretraining, judge
    assert (model_dir / "model.safetensors").read_bytes() == first_weights


def test_quickstart_command_reports_bits_per_byte_on_judge_text_beside_references(tmp_path):
    from conftest import save_tiny_llama, small_corpus

    ref = save_tiny_llama(tmp_path / "ref")
    text = tmp_path / "real.txt"
    text.write_text("\n\n".join(small_corpus(20, seed=5)), encoding="utf-8")
    # the options of `slmforge quickstart` are overrides of the recipe; the rest comes from the same run
    args = ["--out", tmp_path / "qs", "--stories", 200, "--vocab-size", 300, "--preset", "200k", "--steps", 10,
            "--batch-size", 8, "--judge-text", text, "--reference", ref]
    r = subprocess.run([sys.executable, "-m", "slmforge", "quickstart", *map(str, args)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "qs" / "report.json").read_text())
    cfg = report["recipe_config"]
    assert cfg["data"]["options"] == {"n": 200, "teacher": "builtin"} and cfg["pretrain"]["max_minutes"] is None
    assert cfg["pretrain"]["max_steps"] == 10 and cfg["seed"] == 1337  # not given: the recipe's
    j = report["judge"]
    assert 0 < j["val_bits_per_byte"] < 10 and 0 < j["files"][str(text)] < 10
    assert 0 < j["references"][str(ref)][str(text)] < 10
    md_text = (tmp_path / "qs" / "report.md").read_text()
    assert "Bits per byte" in md_text and f"| real.txt ({ref}) |" in md_text
