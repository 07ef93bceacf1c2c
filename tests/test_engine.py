import pytest
import torch

from slmforge.errors import SlmforgeError
from slmforge.infer.engine import SamplingParams, generate_ids, generate_text, sample_next, stream_text


def test_greedy_matches_argmax_of_full_forward(tiny_model):
    m = tiny_model.eval()
    prompt = [1, 40, 41, 42]
    got = list(generate_ids(m, prompt, SamplingParams(max_new_tokens=12, temperature=0)))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(m(torch.tensor([ids]))[0][0, -1].argmax()))
    assert got == ids[len(prompt):]


def test_seed_reproducible_and_varies(tiny_model, tiny_tokenizer):
    p = SamplingParams(max_new_tokens=20, temperature=1.0, seed=3)
    a = generate_text(tiny_model, tiny_tokenizer, "Tom", p)
    assert a == generate_text(tiny_model, tiny_tokenizer, "Tom", p)
    assert a != generate_text(tiny_model, tiny_tokenizer, "Tom", SamplingParams(max_new_tokens=20, temperature=1.0, seed=4))


def test_top_k_and_top_p_filter():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, SamplingParams(top_k=2, temperature=1.0), g)) for _ in range(200)}
    assert picks == {0, 1}
    # softmax ≈ [.72, .26, .013, .005]: top_p 0.5 keeps only the best token
    picks = {int(sample_next(logits, SamplingParams(top_p=0.5, temperature=1.0), g)) for _ in range(100)}
    assert picks == {0}


def test_repetition_penalty_changes_choice():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    p = SamplingParams(temperature=0, repetition_penalty=1.5)
    assert int(sample_next(logits, p, None, context=torch.tensor([[0]]))) == 1


def test_stop_string_and_max_tokens(tiny_model, tiny_tokenizer):
    p = SamplingParams(max_new_tokens=30, temperature=1.0, seed=0)
    full = generate_text(tiny_model, tiny_tokenizer, "Lily", p)
    assert len(list(generate_ids(tiny_model, tiny_tokenizer.encode("Lily", bos=True), p))) <= 30
    stop = full[5:7]
    assert stop
    cut = generate_text(tiny_model, tiny_tokenizer, "Lily",
                        SamplingParams(max_new_tokens=30, temperature=1.0, seed=0, stop=[stop]))
    assert cut == full[:full.index(stop)]
    assert "".join(stream_text(tiny_model, tiny_tokenizer, "Lily", p)) == full


def test_long_prompt_is_truncated_to_context(tiny_model, tiny_tokenizer):
    ctx = tiny_model.config.max_position_embeddings
    ids = list(generate_ids(tiny_model, [5] * (ctx + 50), SamplingParams(max_new_tokens=8, temperature=0)))
    assert len(ids) <= 8


def test_bad_params():
    with pytest.raises(SlmforgeError):
        SamplingParams(top_p=0)
    with pytest.raises(SlmforgeError):
        SamplingParams(max_new_tokens=0)
