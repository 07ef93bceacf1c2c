"""llama.cpp's side of the decode comparison, through llama-cpp-python's C bindings (benchmarks/setup_llama_cpp.sh
builds them).

The high-level `Llama.generate` adds Python sampling and bookkeeping per token, which for models this small
would be most of the time; this times llama.cpp itself instead: `llama_decode` on a `llama_batch`, then the
argmax of the logits (greedy). Several sequences go through the same batch API llama.cpp's own server and
`parallel` example use: all prompts prefilled in one batch, then one token per sequence per step, so the
16-request figure is llama.cpp batching its best, not 16 requests queued one after another.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):  # not installed, or its shared library does not load
        return False
    return True


class LlamaCpp:
    """A GGUF model and a context for `n_seq` sequences of up to `seq_len` tokens, on `threads` threads."""

    def __init__(self, gguf: Path, n_seq: int, seq_len: int, threads: int):
        import llama_cpp as ll

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load chatter
        self.ll = ll
        ll.llama_backend_init()
        mp = ll.llama_model_default_params()
        # SLMFORGE_LLAMA_CPP_REPACK=0: no weight repacking (the AMX/AVX-512 repacked Q8_0/Q4_0 paths of some builds
        # crash on this machine's CPU; see benchmarks/results/compress.json's env)
        mp.use_extra_bufts = os.environ.get("SLMFORGE_LLAMA_CPP_REPACK", "1") != "0"
        self.model = ll.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        p = ll.llama_context_default_params()
        p.n_ctx = n_seq * seq_len
        p.n_batch = p.n_ubatch = max(512, n_seq * seq_len)
        p.n_seq_max = n_seq
        # A cache of seq_len cells per sequence, like our slots. (kv_unified=True shares one cache of
        # n_ctx cells, and every token then attends over all of it, masked: 16 sequences ran slower.)
        p.kv_unified = False
        p.n_threads = p.n_threads_batch = threads
        self.ctx = ll.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        self.batch = ll.llama_batch_init(p.n_batch, 0, 1)

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """One llama_decode of (token, position, sequence, wants logits) rows; argmax of each logits row."""
        b = self.batch
        b.n_tokens = len(items)
        for j, (tok, pos, seq, want) in enumerate(items):
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = tok, pos, 1, want
            b.seq_id[j][0] = seq
        if self.ll.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        n_out = sum(want for *_, want in items)
        logits = np.ctypeslib.as_array(self.ll.llama_get_logits(self.ctx), shape=(n_out * self.n_vocab,))
        return logits.reshape(n_out, self.n_vocab).argmax(-1)

    def greedy(self, prompts: list[list[int]], n_new: int) -> list[list[int]]:
        """Greedy continuations of `n_new` tokens for the prompts, decoded together."""
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)
        first = self._decode([(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts)
                              for p, t in enumerate(ids)])
        out = [[int(t)] for t in first]
        for step in range(n_new - 1):
            nxt = self._decode([(seq[-1], len(ids) + step, s, True)
                                for s, (ids, seq) in enumerate(zip(prompts, out, strict=True))])
            for seq, t in zip(out, nxt, strict=True):
                seq.append(int(t))
        return out


def tokens_per_s(gguf: Path, prompts: list[list[int]], n_new: int, threads: int, repeats: int
                 ) -> tuple[float, list[list[int]]]:
    """(generated tokens / best wall time of the whole call, the tokens) for the prompts decoded together."""
    engine = LlamaCpp(gguf, len(prompts), max(map(len, prompts)) + n_new, threads)
    try:
        engine.greedy(prompts, n_new)  # warm up
        best, out = float("inf"), []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = engine.greedy(prompts, n_new)
            best = min(best, time.perf_counter() - t0)
    finally:
        engine.close()
    return len(prompts) * n_new / best, out
