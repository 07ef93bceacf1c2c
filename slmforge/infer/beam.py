"""Beam search for one prompt at a time: the beams are the rows of one batch sharing a KV cache.

Translation and summaries are scored against one reference, where the likeliest whole output beats the
likeliest next token (greedy): beam search keeps the `beam_size` best partial outputs at every step and
returns the best finished one, its log-probability divided by length**length_penalty (fairseq's and
transformers' normalisation; 0 means the raw sum, which favours short outputs).
"""
from __future__ import annotations

import torch

from slmforge.model import KVCache, LlamaModel


def beam_search(model: LlamaModel, prompt_ids: list[int], beam_size: int = 4, max_tokens: int = 64,
                stop_ids: set[int] | frozenset[int] = frozenset(), length_penalty: float = 1.0) -> list[int]:
    """The best continuation of prompt_ids (without the stop token that ended it). An output ends at a
    token of stop_ids or after max_tokens; the prompt must leave room for max_tokens in the context."""
    if beam_size < 1 or max_tokens < 1:
        raise ValueError("beam_size and max_tokens must be >= 1")
    cfg = model.config
    if not prompt_ids or len(prompt_ids) + max_tokens > cfg.max_position_embeddings:
        raise ValueError(f"a prompt of {len(prompt_ids)} tokens plus {max_tokens} new ones does not fit the "
                         f"context of {cfg.max_position_embeddings}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, beam_size, len(prompt_ids) + max_tokens, device=device, dtype=dtype)
    first = cache.rows(0, 1)
    logits, _ = model(torch.tensor([prompt_ids], device=device), cache=first, pos=0, last_only=True)
    n = len(prompt_ids)
    cache.k[:, 1:, :, :n] = cache.k[:, :1, :, :n]  # every beam starts from the prompt
    cache.v[:, 1:, :, :n] = cache.v[:, :1, :, :n]

    def normalised(score: float, length: int) -> float:
        return score / (length ** length_penalty)

    finished: list[tuple[float, list[int]]] = []  # (normalised score, tokens without the stop token)
    seqs: list[list[int]] = [[]]
    scores = torch.zeros(1, device=device)
    logp = torch.log_softmax(logits[:, -1].float(), -1)  # (alive beams, vocab)
    for step in range(max_tokens):
        vocab = logp.shape[-1]
        total = (scores[:, None] + logp).view(-1)
        top_scores, top_idx = total.topk(min(2 * beam_size, total.numel()))  # room for stopped candidates
        alive_rows, alive_seqs, alive_scores = [], [], []
        for sc, ix in zip(top_scores.tolist(), top_idx.tolist(), strict=True):
            row, tok = divmod(ix, vocab)
            if tok in stop_ids or step == max_tokens - 1:
                out = seqs[row] if tok in stop_ids else [*seqs[row], tok]
                finished.append((normalised(sc, step + 1), out))
            elif len(alive_rows) < beam_size:
                alive_rows.append(row)
                alive_seqs.append([*seqs[row], tok])
                alive_scores.append(sc)
            if len(alive_rows) == beam_size and len(finished) >= beam_size:
                break
        finished.sort(key=lambda f: -f[0])
        finished = finished[:beam_size]
        if not alive_rows or step == max_tokens - 1:
            break
        best_alive = normalised(max(alive_scores), step + 1)
        if len(finished) >= beam_size and finished[-1][0] >= best_alive:
            break  # no live beam can overtake the worst kept finished one (transformers' heuristic)
        order = torch.tensor(alive_rows, device=device)
        k = len(alive_rows)
        cache.k[:, :k, :, :n + step] = cache.k[:, order, :, :n + step]
        cache.v[:, :k, :, :n + step] = cache.v[:, order, :, :n + step]
        seqs, scores = alive_seqs, torch.tensor(alive_scores, device=device)
        last = torch.tensor([[s[-1]] for s in seqs], device=device)
        logits, _ = model(last, cache=cache.rows(0, k), pos=n + step, last_only=True)
        logp = torch.log_softmax(logits[:, -1].float(), -1)
    return max(finished, key=lambda f: f[0])[1] if finished else seqs[0]
