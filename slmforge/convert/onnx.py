"""Export a model directory to ONNX, with the KV cache as inputs and outputs, and decode it greedily with
onnxruntime.

    export_onnx("runs/quickstart/pretrain/model", "model.onnx")
    onnx_generate("model.onnx", prompt_ids, max_new_tokens=32, threads=4)

The graph follows the Hugging Face optimum / onnxruntime-genai convention for decoder-only models, so
their runtimes and ours feed it the same way:

    inputs   input_ids                 int64 [batch, sequence]
             attention_mask            int64 [batch, past_sequence + sequence]  1 = a real token
             position_ids              int64 [batch, sequence]
             past_key_values.{i}.key   float [batch, num_kv_heads, past_sequence, head_dim]  (and .value)
    outputs  logits                    float [batch, sequence, vocab]
             present.{i}.key           float [batch, num_kv_heads, past_sequence + sequence, head_dim]

A prefill passes past tensors with past_sequence = 0; each decode step feeds the presents back as the next
step's past. Cache shapes and the special ids are in the model's metadata_props (num_layers, num_kv_heads,
head_dim, vocab_size, bos/eos_token_id, ...), so a runtime needs nothing but the .onnx file.

Exporter: torch.onnx.export(dynamo=True) (torch.export, then onnxscript's ATen-to-ONNX library). The old
TorchScript exporter has no translation for SDPA's enable_gqa, which our attention uses; the dynamo one
does, and it names the dynamic axes as given below.

The attention code traced is the model's own (model.py's Block / Attention); only the cache differs:
model.py's KVCache writes into a preallocated buffer in place, which has no ONNX form, so `_PastKV` below
stands in for it and concatenates past and new keys instead. A quantized directory exports its weights as
floats (the dequantized values its nn.Linear weights hold).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from slmforge.errors import SlmforgeError
from slmforge.io import check_out_file, fsync_dir
from slmforge.model import LlamaModel
from slmforge.modeldir import ModelDir

DEFAULT_OPSET = 18  # the dynamo exporter's library is written for 18; onnxruntime >= 1.14 runs it


def _require_onnx() -> None:
    """One clear line instead of an ImportError traceback when the optional extra is missing."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise SlmforgeError(f"ONNX export needs the {name} package: pip install 'slmforge[onnx]'") from None


@contextmanager
def _quiet(logger: str):
    """The exporter logs a warning per optional op library it skips (torchvision): noise for a CLI."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# ----------------------------------------------------------------------------------- the traced graph


class _PastKV:
    """Stands in for model.py's KVCache while tracing: `update` returns past + new keys/values
    (torch.cat), and remembers them, which become the present.{i} outputs."""

    def __init__(self, past: list[torch.Tensor]):
        self.past, self.present = past, []
        self.k = self.v = past[0]  # Attention casts new keys to cache.k.dtype

    def update(self, layer: int, pos, k: torch.Tensor, v: torch.Tensor, kv_len=None):
        k = torch.cat([self.past[2 * layer], k], dim=2)
        v = torch.cat([self.past[2 * layer + 1], v], dim=2)
        self.present += [k, v]
        return k, v


class OnnxDecoder(nn.Module):
    """forward(input_ids, attention_mask, position_ids, past) -> (logits, present...), past and present
    being flat lists [key 0, value 0, key 1, value 1, ...]."""

    def __init__(self, model: LlamaModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        m = self.model
        T, S = input_ids.shape[1], attention_mask.shape[1]
        # Query t sits at key position S - T + t: it sees keys up to there (causal) that are real tokens
        # (attention_mask). A padding query would see nothing, and SDPA turns an empty row into NaN, so
        # every query also sees itself; real queries never see padding either way.
        q_pos = torch.arange(T, device=input_ids.device) + (S - T)
        k_pos = torch.arange(S, device=input_ids.device)
        causal = k_pos[None, :] <= q_pos[:, None]
        mask = (causal[None] & attention_mask.bool()[:, None, :]) | (k_pos[None, :] == q_pos[:, None])[None]
        x = m.model.embed_tokens(input_ids)
        # Per-row positions (left padding shifts them); (B, 1, T, D) broadcasts over heads in apply_rope.
        cos = m.rope_cos[position_ids][:, None].to(x.dtype)
        sin = m.rope_sin[position_ids][:, None].to(x.dtype)
        cache = _PastKV(past)
        for i, block in enumerate(m.model.layers):
            x = block(x, cos, sin, cache, i, 0, mask[:, None])
        logits = m.lm_head(m.model.norm(x))
        return (logits, *cache.present)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names, in order."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_onnx(model_dir: str | Path, out: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write `out` (an .onnx file, atomically) from a model directory; returns its path. A model whose
    weights pass 1.5 GB also gets `out.data` beside it (ONNX's external data: protobuf stops at 2 GB)."""
    if not 18 <= opset <= 23:  # 18: the exporter's own op library; below it, conversion may fail
        raise SlmforgeError(f"--opset {opset}: choose 18 to 23")
    out = Path(out)
    check_out_file(out)
    md = ModelDir.open(model_dir)
    _require_onnx()
    cfg = md.config
    model = md.load_model(dtype=torch.float32)
    wrapper = OnnxDecoder(model).eval()

    # Example inputs of sizes >= 2 everywhere: torch.export specialises dimensions of size 0 and 1.
    B, T, P = 2, 3, 2
    L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.ones(B, P + T, dtype=torch.long)
    pos = torch.arange(P, P + T).repeat(B, 1)
    past = [torch.zeros(B, H, P, D) for _ in range(2 * L)]
    # Named axes (strings: the exporter makes them torch.export Dim.DYNAMIC and names the ONNX dims so).
    b_t, b_p = {0: "batch", 1: "sequence"}, {0: "batch", 2: "past_sequence"}
    dynamic = (b_t, {0: "batch", 1: "total_sequence"}, b_t, [b_p] * (2 * L))
    inputs, outputs = io_names(L)

    with torch.no_grad(), warnings.catch_warnings(), _quiet("torch.onnx"):
        warnings.simplefilter("ignore")  # torch.export's deprecation chatter, not the user's to fix
        program = torch.onnx.export(wrapper, (ids, mask, pos, past), dynamo=True, opset_version=opset,
                                    input_names=inputs, output_names=outputs, dynamic_shapes=dynamic,
                                    verbose=False)
    meta = {"num_layers": L, "num_attention_heads": cfg.num_attention_heads, "num_kv_heads": H, "head_dim": D,
            "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
            "name": md.path.resolve().name, "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    program.model.metadata_props.update({k: "" if v is None else str(v) for k, v in meta.items()})
    _save_atomically(program, out)
    return out


def _save_atomically(program, out: Path) -> None:
    """Save into a temp folder beside `out`, then rename: external data (if any) first, the .onnx last, so
    the .onnx name never points at a half-written file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        program.save(tmp / out.name)
        for name in sorted((p.name for p in tmp.iterdir()), key=lambda n: n == out.name):  # .onnx last
            with open(tmp / name, "rb") as f:  # on disk before the name points at it
                os.fsync(f.fileno())
            os.replace(tmp / name, out.parent / name)
        fsync_dir(out.parent)
    except OSError as e:  # (naming `out`: the temp folder means nothing to the user)
        raise SlmforgeError(f"{out}: cannot write ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------- onnxruntime


class OnnxLM:
    """An onnxruntime session over an exported model, with the cache shapes from its metadata."""

    def __init__(self, onnx_path: str | Path, threads: int = 1):
        _require_onnx()
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise SlmforgeError(f"{path}: no such ONNX file")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise SlmforgeError(f"{path}: onnxruntime cannot load it ({e})") from None
        props = self.session.get_modelmeta().custom_metadata_map
        try:
            self.num_layers, self.num_kv_heads, self.head_dim = (int(props[k]) for k in
                                                                 ("num_layers", "num_kv_heads", "head_dim"))
        except (KeyError, ValueError):
            raise SlmforgeError(f"{path}: not an slmforge ONNX export (no cache shapes in its metadata)") from None
        self.max_len = int(props.get("max_position_embeddings", 0)) or 1 << 62
        self.inputs, self.outputs = io_names(self.num_layers)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.num_kv_heads, 0, self.head_dim), np.float32)
                for _ in range(2 * self.num_layers)]

    def step(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray,
             past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward: (logits [B, T, V], present keys/values) for ids [B, T] after the past ones."""
        feed = dict(zip(self.inputs, [ids, mask, pos, *past], strict=True))
        logits, *present = self.session.run(self.outputs, feed)
        return logits, present

    def greedy(self, prompts: list[list[int]], n_new: int) -> list[list[int]]:
        """Greedy continuations of `n_new` tokens for the prompts, decoded together. Shorter prompts are
        left-padded: the mask hides the padding and each row's positions start at 0 at its first token."""
        if not prompts or not all(prompts):
            raise SlmforgeError("ONNX decoding needs at least one prompt, and no empty one")
        B, T = len(prompts), max(map(len, prompts))
        if T + n_new > self.max_len:
            raise SlmforgeError(f"{T} prompt + {n_new} new tokens exceed the model's context of {self.max_len}")
        if n_new <= 0:
            return [[] for _ in prompts]
        ids, mask = np.zeros((B, T), np.int64), np.zeros((B, T), np.int64)
        for row, p in enumerate(prompts):
            ids[row, T - len(p):], mask[row, T - len(p):] = p, 1
        pos = np.maximum(mask.cumsum(1) - 1, 0)  # a pad's position is never used: any valid one does
        logits, past = self.step(ids, mask, pos, self.empty_past(B))
        out = [logits[:, -1].argmax(-1)]
        for _ in range(n_new - 1):
            mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
            pos = pos[:, -1:] + 1
            logits, past = self.step(out[-1][:, None].astype(np.int64), mask, pos, past)
            out.append(logits[:, -1].argmax(-1))
        return np.stack(out, 1).tolist()


def onnx_generate(onnx_path: str | Path, prompt_ids: list[int], max_new_tokens: int,
                  threads: int = 1) -> list[int]:
    """Greedy decoding of one prompt with onnxruntime, the KV cache fed back step by step: the
    `max_new_tokens` ids that follow (no stop on eos, as tokens_per_s needs a fixed count)."""
    return OnnxLM(onnx_path, threads).greedy([list(prompt_ids)], max_new_tokens)[0]


def onnx_tokens_per_s(onnx_path: str | Path, prompts: list[list[int]], n_new: int, threads: int,
                      repeats: int) -> tuple[float, list[list[int]]]:
    """(generated tokens / best wall time of the whole call, the tokens) for the prompts decoded together,
    as benchmarks/llama_cpp_bench.py's tokens_per_s (greedy, no stop on eos; unequal prompts left-padded)."""
    lm = OnnxLM(onnx_path, threads)
    lm.greedy(prompts, n_new)  # warm up
    best, out = float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = lm.greedy(prompts, n_new)
        best = min(best, time.perf_counter() - t0)
    return len(prompts) * n_new / best, out
