"""Beam search (slmforge/infer/beam.py): exact when the beam holds every partial output, greedy at one beam."""

import itertools

import pytest
import torch

from slmforge.config import ModelConfig
from slmforge.infer.beam import beam_search
from slmforge.model import LlamaModel


@pytest.fixture(scope="module")
def model():
    m = LlamaModel(ModelConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))
    m.reset_parameters(seed=3)
    with torch.no_grad():  # sharper distributions, so greedy and the best sequence differ
        m.lm_head.weight.mul_(8)
    return m.eval()


def _logprob(model, prompt, out):
    ids = torch.tensor([prompt + out])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0][0].float(), -1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(out))


def test_full_beam_finds_the_likeliest_sequence(model):
    prompt = [1, 2, 3]
    best = max(itertools.product(range(8), repeat=3), key=lambda out: _logprob(model, prompt, list(out)))
    with torch.no_grad():
        found = beam_search(model, prompt, beam_size=64, max_tokens=3, length_penalty=0.0)
        greedy = beam_search(model, prompt, beam_size=1, max_tokens=3, length_penalty=0.0)
    assert found == list(best)
    assert _logprob(model, prompt, found) >= _logprob(model, prompt, greedy)


def test_one_beam_is_greedy_and_stops(model):
    prompt, out = [4, 5], []
    with torch.no_grad():
        for _ in range(6):
            out.append(int(model(torch.tensor([prompt + out]))[0][0, -1].argmax()))
        assert beam_search(model, prompt, beam_size=1, max_tokens=6) == out
        stop = out[2]
        first = out.index(stop)
        assert beam_search(model, prompt, beam_size=1, max_tokens=6, stop_ids={stop}) == out[:first]
    with pytest.raises(ValueError, match="context"):
        beam_search(model, list(range(8)) * 2, beam_size=2, max_tokens=4)
