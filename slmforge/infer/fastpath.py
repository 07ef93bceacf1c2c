"""The decode fast path: the batch engine's one-token-per-slot step on an inference copy of the weights.

Training keeps nn.Linear's (out, in) weights and runs ~150 small ops per token. Decoding one token per
row is a matrix-vector product per weight, and for small models per-op overhead is most of a step, so
the engine decodes with `DecodeModel` instead:

  - weights in the layout decode wants: q/k/v fused into one (in, out) matrix and gate/up into another,
    o/down/lm_head transposed and contiguous (`x @ wt` streams rows; MKL runs the (out, in) layout of
    F.linear at half the speed for one row);
  - each matrix multiplied by whichever backend timed fastest for its shape and batch at build time:
    plain `mm`, or a prepacked oneDNN/MKL weight (oneDNN wins by 2-3x for a batch of 16 rows of a large
    matrix, MKL's packed gemv for one row of the 32k-vocabulary lm_head);
  - `compiled=True` builds a step of fixed shapes (every slot, the whole cache behind a mask) for
    torch.compile (inductor fuses norms, RoPE, the cache writes and attention into a few C++ kernels).

The training model and the saved format are untouched; `decode_model(model, batch)` builds the copy
once per model and batch size and rebuilds it when the model's parameters change.
"""

from __future__ import annotations

import itertools
import time
import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmforge.model import LlamaModel

__all__ = ["DecodeModel", "decode_model"]


def _mkldnn_ok() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _fbgemm_ok() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def _mkl_ok() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops, "mkl") and hasattr(torch.ops.mkl, "_mkl_linear")


COLD_BYTES = 8 << 20  # twice a core's L2 on the machines we measured (4 MiB for 2 cores)

_choices: dict[tuple, str] = {}  # (in, out, batch, dtype, bias) -> fastest backend, timed once per process
_packed: weakref.WeakValueDictionary[int, Proj] = weakref.WeakValueDictionary()  # handle -> projection
_handles = itertools.count()


@torch.library.custom_op("slmforge::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, wt: torch.Tensor, handle: int) -> torch.Tensor:
    """x @ wt by the prepacked weight of projection `handle`. An opaque op, so that a compiled step calls
    the packed oneDNN/MKL kernel (torch.compile cannot trace the packed tensor itself)."""
    return _packed[handle].packed_mm(x)


@packed_linear.register_fake
def _(x: torch.Tensor, wt: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], wt.shape[1])


class Proj(nn.Module):
    """y = x @ w.T + b for x (B, in), with w stored for the fastest backend at batch size `batch`."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, batch: int, backends: tuple[str, ...],
                 quant=None):
        super().__init__()
        self.register_buffer("wt", w.t().contiguous())  # (in, out)
        self.register_buffer("b", None if b is None else b.detach().clone())
        self.w = w.detach()  # (out, in), for MKL's packed path (shares the training model's storage)
        self.batch = batch
        self.kind, self.packed = "mm", None
        self.handle = next(_handles)
        self.quant = quant  # compress.quantize.QuantWeight: w is its dequantized self; int kernels compete
        # torch's int8/int4 CPU kernels crash (not raise) on row or column counts that are not multiples of 16
        if quant is not None and w.device.type == "cpu" and b is None and w.shape[0] % 16 == 0 \
                and w.shape[1] % 16 == 0:
            backends = (*backends, f"int{quant.bits}")
        # fbgemm's int8 x int8 kernel (VNNI) quantizes activations per tensor, so only for one row: a
        # row's result must not depend on the other rows of its batch
        if quant is not None and quant.bits == 8 and batch == 1 and w.device.type == "cpu" and _fbgemm_ok():
            backends = (*backends, "int8dyn")
        if w.device.type == "cpu" and len(backends) > 1:
            _packed[self.handle] = self
            self.kind = self._pick(backends)
            self.packed = self._pack(self.kind)
            if self.kind.startswith("int"):  # the integers serve: drop the dense copies (wt keeps the shape)
                self.wt, self.w = self.wt.new_empty(0, self.wt.shape[1]), None

    def _pack(self, kind: str):
        if kind == "int8":
            return self.quant.q, self.quant.scale.to(torch.bfloat16)
        if kind == "int8dyn":
            q = self.quant
            zeros = torch.zeros(q.q.shape[0], dtype=torch.long)
            with warnings.catch_warnings():  # torch deprecates quantized tensors; fbgemm's op still takes them
                warnings.simplefilter("ignore", UserWarning)
                qw = torch._make_per_channel_quantized_tensor(q.q, q.scale.double(), zeros, 0)
            return torch.ops.quantized.linear_prepack(qw, None)
        if kind == "int4":
            q, d = self.quant.q, self.quant.scale  # (out, in) 0..15, (out, in/32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            # the kernel computes (q - 8) * scale + zero; Q4_0 has no zero
            scales_zeros = torch.stack([d.t(), torch.zeros_like(d.t())], dim=-1).to(torch.bfloat16).contiguous()
            return packed, scales_zeros
        if kind == "mkldnn":
            return torch.ops.mkldnn._reorder_linear_weight(self.w, self.batch)
        if kind == "mkl":
            return torch.ops.mkl._mkl_reorder_linear_weight(self.w, self.batch)
        return None

    def _pick(self, backends: tuple[str, ...]) -> str:
        key = (*self.wt.shape, self.batch, self.wt.dtype, self.b is not None, self.quant.bits if self.quant else 0)
        if key not in _choices:
            x = torch.randn(self.batch, self.wt.shape[0], dtype=self.wt.dtype)
            # Timed on enough copies of the weight to overflow the L2 cache: in a decode step every matrix
            # arrives from L3 or memory, where reading fewer bytes (int8/int4) wins; one copy timed hot
            # made fp32 win the 1 MB matrices of the 15M model that int8 serves faster in a real step.
            n_copies = max(1, min(16, int(COLD_BYTES // (self.wt.numel() * self.wt.element_size()))))
            own = (self.wt, self.w, self.quant)
            copies = [own] + [(self.wt.clone(), self.w.clone(), self.quant and self.quant.clone())
                              for _ in range(n_copies - 1)]
            best = (float("inf"), "mm")
            for kind in backends:
                try:
                    states = []
                    for wt, w, quant in copies:
                        self.wt, self.w, self.quant = wt, w, quant
                        states.append((wt, w, quant, self._pack(kind)))
                    self.kind = kind
                    t = _time(lambda: self._run_copies(x, states))  # noqa: B023 (called right here)
                except RuntimeError:  # a backend without a kernel for this dtype or shape
                    continue
                best = min(best, (t, kind))
            self.wt, self.w, self.quant = own
            _choices[key] = best[1]
        return _choices[key]

    def _run_copies(self, x: torch.Tensor, states: list) -> None:
        for self.wt, self.w, self.quant, self.packed in states:
            self(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind != "mm":
            # the opaque op only where inductor traces; eager, its dispatch cost ~10 us a call (a third
            # of a 1 MB int8 matmul)
            if torch.compiler.is_compiling():
                return packed_linear(x, self.wt, self.handle)
            return self.packed_mm(x)
        return x @ self.wt if self.b is None else torch.addmm(self.b, x, self.wt)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        # the integer kernels take bf16 activations (their fp32 paths are ~10x slower)
        if self.kind == "int8":
            q, scale = self.packed
            return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scale).to(x.dtype)
        if self.kind == "int8dyn":
            return torch.ops.quantized.linear_dynamic(x.float(), self.packed, False).to(x.dtype)
        if self.kind == "int4":
            packed, scales_zeros = self.packed
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, 32, scales_zeros).to(x.dtype)
        if self.kind == "mkldnn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.b, "none", [], "")
        if self.kind == "mkl":
            return torch.ops.mkl._mkl_linear(x, self.packed, self.w, self.b, self.batch)
        return x @ self.wt if self.b is None else torch.addmm(self.b, x, self.wt)


def _time(fn, repeats: int = 5) -> float:
    fn(), fn()  # warm up (first calls allocate and JIT)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class Layer(nn.Module):
    def __init__(self, block: nn.Module, batch: int, backends: tuple[str, ...]):
        super().__init__()
        a, m = block.self_attn, block.mlp
        self.register_buffer("ln1", block.input_layernorm.weight.detach())
        self.register_buffer("ln2", block.post_attention_layernorm.weight.detach())
        bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        self.qkv = Proj(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(), bias, batch, backends,
                        _quant_of(a.q_proj, a.k_proj, a.v_proj))
        self.o = Proj(a.o_proj.weight.detach(), a.o_proj.bias, batch, backends, _quant_of(a.o_proj))
        self.gate_up = Proj(torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(), None, batch, backends,
                            _quant_of(m.gate_proj, m.up_proj))
        self.down = Proj(m.down_proj.weight.detach(), None, batch, backends, _quant_of(m.down_proj))


def _quant_of(*linears: nn.Module):
    """The quantized weight of these linears stacked by rows (None unless every one is quantized)."""
    quants = [getattr(lin, "quant", None) for lin in linears]
    if any(q is None for q in quants):
        return None
    return quants[0] if len(quants) == 1 else type(quants[0]).cat(quants)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # The training model's RMSNorm for fp32/bf16 activations: statistics in fp32, weight after.
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, D); cos/sin (B, 1, D): rotate-half RoPE as in slmforge.model.apply_rope."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _attend_fixed(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  before: torch.Tensor) -> torch.Tensor:
    """Attention of q (B, H, D) over the cache k/v (B, KV, S, D) at positions where `before` (B, S) is True,
    plus the new key/value (B, KV, D) not yet written. Spelled out rather than SDPA so that, compiled, the
    cache is read where it lies and then written in place (SDPA on the updated cache made inductor copy
    every layer's cache each step)."""
    B, H, D = q.shape
    KV = k.shape[1]
    qg = q.view(B, KV, H // KV, D) * D ** -0.5  # query heads grouped by the kv head they share
    s_old = (qg @ k.transpose(-1, -2)).masked_fill(~before[:, None, None], float("-inf"))  # (B, KV, G, S)
    s_new = (qg * k_new[:, :, None]).sum(-1, keepdim=True)  # (B, KV, G, 1)
    p = torch.cat([s_old, s_new], dim=-1).softmax(-1)
    y = p[..., :-1] @ v + p[..., -1:] * v_new[:, :, None]  # (B, KV, G, D)
    return y.view(B, H, D)


class DecodeModel(nn.Module):
    """One decode step for B rows, one token each, at per-row positions, on an inference weight copy.

    forward(tokens (B,), pos (B,), k, v, kv_len) -> logits (B, vocab). k/v are the KV cache's
    (layers, B, kv_heads, S, head_dim) buffers (or row views of them); each row attends to its first
    kv_len positions (those up to its own) and its new key/value is written at `pos`.

    fixed=False (eager): write each layer's key/value, then SDPA over the cache.
    fixed=True (for torch.compile, `step`): every shape fixed by (B, kv_len), attention spelled out over
    the cache as it was plus the new key/value, and the cache written once at the end.
    """

    def __init__(self, model: LlamaModel, batch: int, packed: bool = True, fixed: bool = False):
        super().__init__()
        cfg = model.config
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps, self.batch, self.fixed = cfg.rms_norm_eps, batch, fixed
        backends = ("mm",)
        if packed:
            backends += ("mkldnn",) if _mkldnn_ok() else ()
            backends += ("mkl",) if _mkl_ok() and model.lm_head.weight.dtype == torch.float32 else ()
        self.register_buffer("embed", model.model.embed_tokens.weight.detach())
        self.register_buffer("rope_cos", model.rope_cos.to(self.embed.dtype))
        self.register_buffer("rope_sin", model.rope_sin.to(self.embed.dtype))
        self.register_buffer("rows", torch.arange(batch, device=self.embed.device))
        self.register_buffer("arange", torch.arange(cfg.max_position_embeddings, device=self.embed.device))
        self.layers = nn.ModuleList(Layer(b, batch, backends) for b in model.model.layers)
        self.register_buffer("norm", model.model.norm.weight.detach())
        self.lm_head = Proj(model.lm_head.weight.detach(), None, batch, backends, _quant_of(model.lm_head))
        self._compiled = None

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_len: int) -> torch.Tensor:
        B, H, KV, D = tokens.shape[0], self.n_heads, self.n_kv, self.head_dim
        rows = self.rows[:B]
        # eager attends after writing, to positions <= pos; fixed attends to the cache before pos + the new one
        seen = self.arange[:kv_len] < pos[:, None] if self.fixed else self.arange[:kv_len] <= pos[:, None]
        cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # (B, 1, D)
        x = F.embedding(tokens, self.embed)  # (B, hidden)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            q, kk, vv = layer.qkv(_rms(x, layer.ln1, self.eps)).split([H * D, KV * D, KV * D], dim=-1)
            q, kk, vv = _rope(q.view(B, H, D), cos, sin), _rope(kk.view(B, KV, D), cos, sin), vv.view(B, KV, D)
            if self.fixed:
                y = _attend_fixed(q, kk, vv, k[i, :, :, :kv_len], v[i, :, :, :kv_len], seen)
                new_k.append(kk)
                new_v.append(vv)
            else:
                k[i, rows, :, pos], v[i, rows, :, pos] = kk, vv
                y = F.scaled_dot_product_attention(q[:, :, None], k[i, :, :, :kv_len], v[i, :, :, :kv_len],
                                                   attn_mask=seen[:, None, None], enable_gqa=KV != H)
            x = x + layer.o(y.reshape(B, H * D))
            g, u = layer.gate_up(_rms(x, layer.ln2, self.eps)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(g) * u)
        if self.fixed:
            # Every layer's new key/value in one write after the last read of the cache: compiled, inductor
            # then writes into the cache in place (a write between reads made it copy the cache each step).
            k[:, rows, :, pos], v[:, rows, :, pos] = torch.stack(new_k, 1), torch.stack(new_v, 1)
        return self.lm_head(_rms(x, self.norm, self.eps))

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             kv_len: int) -> torch.Tensor:
        """forward, compiled by inductor: fused C++ kernels for the norms, RoPE, attention and cache writes,
        called from a C++ wrapper (a Python wrapper cost ~40% more per step on the 260K model), the packed
        matmuls as opaque calls. One graph per batch size: kv_len is a symbolic size, so the step reads only
        the cache it needs (buckets of 128/256 positions made 16 rows of the 15M model ~15% slower)."""
        if self._compiled is None:
            # Each model and batch size is a graph of the same function, and dynamo keeps 8 per function
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._compiled = torch.compile(self._forward_span, dynamic=False, fullgraph=True,
                                           options={"cpp_wrapper": True})
        span = self.arange[:max(kv_len, 2)]  # >= 2: dynamo specialises sizes 0 and 1
        torch._dynamo.maybe_mark_dynamic(span, 0)
        return self._compiled(tokens, pos, k, v, span)

    def _forward_span(self, tokens: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      span: torch.Tensor) -> torch.Tensor:
        return self.forward(tokens, pos, k, v, span.shape[0])


# model -> {(batch, packed, fixed): (parameter signature, DecodeModel)}; weak: a dropped model frees its copy
_built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(model: LlamaModel) -> tuple:
    # Storage and in-place version of every parameter: training steps or load_state_dict change them.
    return tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())


def decode_model(model: LlamaModel, batch: int, packed: bool = True, fixed: bool = False) -> DecodeModel:
    """The inference copy of `model`'s weights for decoding `batch` rows, built once and reused while the
    model's parameters are unchanged (generate_ids builds an engine per call; a compiled step is kept)."""
    per_model = _built.setdefault(model, {})
    sig = _signature(model)
    hit = per_model.get((batch, packed, fixed))
    if hit is None or hit[0] != sig:
        with torch.no_grad():
            hit = per_model[(batch, packed, fixed)] = (sig, DecodeModel(model, batch, packed, fixed).eval())
    return hit[1]
