"""One typed config per stage: the CLI options and the recipe YAML both come from the dataclass, so a
default lives in one place and both paths build the same config."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from slmforge import cli, cli_train
from slmforge.errors import SlmforgeError
from slmforge.stage_config import build, read_yaml
from slmforge.train.finetune import FinetuneConfig
from slmforge.train.pretrain import PretrainConfig


@pytest.mark.parametrize("cls, command", [(FinetuneConfig, cli_train.finetune), (PretrainConfig, cli.pretrain)])
def test_every_field_is_an_option_with_the_configs_default(cls, command):
    params = inspect.signature(command).parameters
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, list):
            default = ",".join(default)
        assert params[f.name].default == default, f.name
        assert f.metadata["help"], f"{cls.__name__}.{f.name} has no help text"


def test_the_cli_and_the_yaml_build_the_same_config(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("slmforge.train.finetune.finetune", lambda *a, cfg=None, **k: seen.append(a[3]) or {
        "metrics": {"trainable_params": 1, "trainable_pct": 1.0, "steps": 1}, "outputs": {}})
    args = ["finetune", "--model", "m", "--data", "d.jsonl", "--out", "o", "--mode", "lora", "--lr", "0.003",
            "--lora-targets", "q_proj,k_proj", "--steps", "7", "--minutes", "2.5", "--merge", "--labels", "a,b",
            "--task", "classify", "--no-progress"]  # a bool defaulting to True turns off as --no-NAME
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    (tmp_path / "ft.yaml").write_text("mode: lora\nlr: 0.003\nlora_targets: [q_proj, k_proj]\nmax_steps: 7\n"
                                      "max_minutes: 2.5\nmerge: true\nlabels: [a, b]\ntask: classify\nprogress: false\n")
    from_yaml = build(FinetuneConfig, read_yaml(tmp_path / "ft.yaml"), tmp_path / "ft.yaml")
    assert seen == [from_yaml]
    assert from_yaml.peak_lr == 0.003 and FinetuneConfig(mode="lora").peak_lr == 1e-3 and FinetuneConfig().peak_lr == 2e-5


@pytest.mark.parametrize("text, message", [
    ("batch_size: '16'\n", r"ft.yaml:1: field 'batch_size': input should be a valid integer, got \"16\""),
    ("lr: 0.1\nmerge: 1\n", r"ft.yaml:2: field 'merge': input should be a valid boolean, got 1"),
    ("lora_targets: q_proj\n", r"ft.yaml:1: field 'lora_targets': input should be a valid (list|array)"),
    ("lr: 3e-4\nbogus: 2\n", r"ft.yaml:2: field 'bogus': unknown field"),
    ("mode: qlora\n", r"ft.yaml:1: finetune config: mode must be one of full, lora"),
    ("max_minutes: 0\n", r"ft.yaml:1: train config: max_minutes must be > 0"),
])
def test_bad_config_is_one_error_with_file_line_and_field(tmp_path, text, message):
    (tmp_path / "ft.yaml").write_text(text)
    with pytest.raises(SlmforgeError, match=message):
        build(FinetuneConfig, read_yaml(tmp_path / "ft.yaml"), tmp_path / "ft.yaml")


def test_a_bad_option_is_one_error_line_before_anything_is_read(tmp_path):
    r = subprocess.run([sys.executable, "-m", "slmforge", "finetune", "--model", "absent", "--data", "absent.jsonl",
                        "--out", str(tmp_path / "o"), "--mode", "qlora"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == "error: finetune config: mode must be one of full, lora"
    assert not (tmp_path / "o").exists()


def test_numbers_in_e_notation_are_numbers(tmp_path):
    (tmp_path / "ft.yaml").write_text("lr: 1e-3\nmin_lr: 5E-05\nmax_steps: 1_000\n")
    cfg = build(FinetuneConfig, read_yaml(tmp_path / "ft.yaml"), tmp_path / "ft.yaml")
    assert (cfg.lr, cfg.min_lr, cfg.max_steps) == (1e-3, 5e-5, 1000)


def test_non_utf8_yaml_is_an_error(tmp_path):
    (tmp_path / "r.yaml").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(SlmforgeError, match=r"r.yaml: not UTF-8 text \(byte 9\)"):
        read_yaml(tmp_path / "r.yaml")
