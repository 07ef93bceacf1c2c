import json
import subprocess
import sys

from slmforge.serve.vllm_compat import CPU_HEAD_SIZES, vllm_attention, vllm_summary


def test_cpu_rule_matches_what_vllm_did():
    # benchmarks/results/vllm.json: 32, 64 and 48 served with equal tokens, 8 (stories260K) and 16 refused
    assert vllm_attention(32)["cpu"] and vllm_attention(64)["cpu"] and vllm_attention(48)["cpu"]
    assert vllm_attention(8)["cpu"] is False and vllm_attention(16)["cpu"] is False
    assert all(vllm_attention(h)["cpu"] for h in CPU_HEAD_SIZES)
    assert vllm_attention(24)["cpu"] is None  # neither declared nor tried: no verdict


def test_gpu_backends_follow_dtype_and_head_size():
    # FlashAttention and FlashInfer take half precision only; Triton needs head_dim >= 32; Flex takes any
    assert vllm_attention(8)["gpu_backends"] == ["FLEX_ATTENTION"]
    assert vllm_attention(8, "bfloat16")["gpu_backends"] == ["FLASH_ATTN", "FLEX_ATTENTION"]
    assert vllm_attention(64, "float16")["gpu_backends"] == ["FLASH_ATTN", "FLASHINFER", "TRITON_ATTN",
                                                             "FLEX_ATTENTION"]
    assert vllm_attention(32)["gpu_backends"] == ["TRITON_ATTN", "FLEX_ATTENTION"]
    assert "FLASH_ATTN" not in vllm_attention(512, "bfloat16")["gpu_backends"]  # > 256 (before FA4)


def test_summary_names_the_verdict():
    assert "CPU build: served;" in vllm_summary(32)
    assert "CPU build: refused" in vllm_summary(8) and "32, 64" in vllm_summary(8)
    assert "not declared, but ran" in vllm_summary(48) and "untried" in vllm_summary(24)


def test_rule_imports_neither_vllm_nor_torch():
    # the project venv has no vLLM, and `slmforge info` should stay quick: the rule is plain Python
    code = "import sys, slmforge.serve.vllm_compat; print('vllm' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_info_says_vllm(tiny_model_dir):
    from typer.testing import CliRunner

    from slmforge.cli import app

    r = CliRunner().invoke(app, ["info", str(tiny_model_dir)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["head_dim"] == 16 and "CPU build: refused" in out["vllm"]  # the 200k preset: 64 / 4 heads
