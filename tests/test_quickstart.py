import json

import torch

from slmforge.modeldir import ModelDir
from slmforge.quickstart import QuickstartConfig, quickstart


def test_quickstart_tiny_then_rerun_skips_done_stages(tmp_path, capsys):
    torch.set_num_threads(1)
    cfg = QuickstartConfig(out=tmp_path / "qs", n_stories=300, vocab_size=300, preset="200k", seq_len=64,
                           batch_size=8, max_steps=30, lr=3e-3, n_samples=2, sample_tokens=30)
    model_dir = quickstart(cfg)
    md = ModelDir.open(model_dir)
    assert md.meta["stage"] == "pretrain" and md.config.n_params < 1e6
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert summary["val_loss"] < 5.0  # ln(300) = 5.7 at init
    assert len(summary["samples"]) == 2 and summary["samples"][0].startswith("Once upon a time")
    report = (tmp_path / "qs" / "report.md").read_text()
    assert "val_loss" in report and "pretrain/loss_curve.png" in report
    assert (tmp_path / "qs" / "pretrain" / "loss_curve.png").stat().st_size > 1000
    first_weights = (model_dir / "model.safetensors").read_bytes()
    capsys.readouterr()

    quickstart(cfg)  # everything exists: every stage is skipped, the model is untouched
    out = capsys.readouterr().out
    assert out.count("already done") == 4
    assert (model_dir / "model.safetensors").read_bytes() == first_weights


def test_quickstart_reports_bits_per_byte_on_judge_text_beside_references(tmp_path):
    from conftest import save_tiny_llama, small_corpus

    torch.set_num_threads(1)
    ref = save_tiny_llama(tmp_path / "ref")
    text = tmp_path / "real.txt"
    text.write_text("\n\n".join(small_corpus(20, seed=5)), encoding="utf-8")
    cfg = QuickstartConfig(out=tmp_path / "qs", n_stories=200, vocab_size=300, preset="200k", seq_len=64,
                           batch_size=8, max_steps=10, n_samples=1, sample_tokens=10, judge_text=(text,),
                           references=(ref,))
    quickstart(cfg)
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    j = summary["judge"]
    assert 0 < j["val_bits_per_byte"] < 10 and 0 < j["judge_text"][str(text)] < 10
    assert 0 < j["references"][str(ref)][str(text)] < 10
    assert summary["val_bits_per_byte"] == j["val_bits_per_byte"]
    report = (tmp_path / "qs" / "report.md").read_text()
    assert "Bits per byte" in report and f"real.txt ({ref})" in report
