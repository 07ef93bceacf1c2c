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


# ------------------------------------------------------------------------------- batch engine

import random  # noqa: E402

from slmforge.config import preset  # noqa: E402
from slmforge.infer.engine import BatchEngine, Request, run  # noqa: E402
from slmforge.model import KVCache, LlamaModel  # noqa: E402


@pytest.fixture(scope="module")
def sharp_model(tiny_tokenizer):
    # A larger init than training uses: logits far from uniform, so argmax has no near-ties to flip.
    torch.manual_seed(0)
    return LlamaModel(preset("200k", vocab_size=tiny_tokenizer.vocab_size, initializer_range=0.1)).eval()


def _mixed_requests(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = SamplingParams(max_new_tokens=rng.randint(1, 24), temperature=rng.choice([0.0, 0.7, 1.3]),
                           top_k=rng.choice([0, 5, 40]), top_p=rng.choice([1.0, 0.9]),
                           repetition_penalty=rng.choice([1.0, 1.3]), seed=i)
        out.append(([rng.randrange(7, vocab) for _ in range(rng.randint(1, 40))], p))
    return out


def test_per_row_positions_match_full_forward():
    torch.manual_seed(0)
    cfg = preset("200k", vocab_size=300)
    m = LlamaModel(cfg).eval()
    lens = [5, 17, 9]
    seqs = [torch.randint(0, 300, (n + 1,)) for n in lens]
    cache = KVCache(cfg, 3, 32)
    with torch.no_grad():
        for i, s in enumerate(seqs):  # prefill each row to its own length
            m(s[None, :-1], cache=cache.rows(i, i + 1), pos=0)
        pos = torch.tensor(lens)
        got, _ = m(torch.stack([s[-1] for s in seqs])[:, None], cache=cache, pos=pos)
        for i, s in enumerate(seqs):
            want, _ = m(s[None])
            assert (got[i, -1] - want[0, -1]).abs().max() < 1e-5


@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_continuous_batching_equals_single_stream(sharp_model, tiny_tokenizer, max_batch):
    reqs = _mixed_requests(10, tiny_tokenizer.vocab_size)
    single = [list(generate_ids(sharp_model, ids, p)) for ids, p in reqs]
    engine = BatchEngine(sharp_model, max_batch=max_batch)
    batched = [engine.add(Request(ids, p)) for ids, p in reqs]  # more requests than slots: they queue
    seen_batch = 0
    while engine.has_work:
        engine.step()
        seen_batch = max(seen_batch, engine.n_active)
    assert [r.output_ids for r in batched] == single
    assert all(r.finish_reason == "length" for r in batched)
    assert seen_batch == min(max_batch, 10)


def test_requests_join_between_steps(sharp_model, tiny_tokenizer):
    reqs = _mixed_requests(6, tiny_tokenizer.vocab_size, seed=1)
    single = [list(generate_ids(sharp_model, ids, p)) for ids, p in reqs]
    engine = BatchEngine(sharp_model, max_batch=4)
    out = []
    for ids, p in reqs:  # a new request arrives every other step while others decode
        out.append(engine.add(Request(ids, p)))
        engine.step()
        engine.step()
    list(run(engine))
    assert [r.output_ids for r in out] == single


def test_engine_stop_ids_strings_and_cancel(sharp_model, tiny_tokenizer):
    tok = tiny_tokenizer
    p = SamplingParams(max_new_tokens=30, temperature=1.0, seed=0)
    full = generate_text(sharp_model, tok, "Lily", p)
    # a stop string from the middle of the output (not from an undecodable byte, whose text changes)
    i = next(i for i in range(4, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    stop_p = SamplingParams(max_new_tokens=30, temperature=1.0, seed=0, stop=[full[i:i + 2]])
    want = generate_text(sharp_model, tok, "Lily", stop_p)
    assert full[i:i + 2] not in want and len(want) < len(full)
    engine = BatchEngine(sharp_model, tok, max_batch=2)
    a = engine.add(Request(tok.encode("Lily", bos=True), stop_p, stop_ids=tok.stop_ids))
    # no stop ids for b: its sampled tokens cannot end it, only the cancel can (as c, it stops on length alone)
    b = engine.add(Request(tok.encode("Tom", bos=True), SamplingParams(max_new_tokens=30, seed=1)))
    c = engine.add(Request(tok.encode("Sam", bos=True), SamplingParams(max_new_tokens=5, temperature=0)))
    first = engine.step()
    engine.cancel(b)  # a client went away: its slot goes to the waiting request
    texts = {}
    for u in [*first, *run(engine)]:
        texts[u.request.id] = texts.get(u.request.id, "") + u.text
    assert a.finish_reason == "stop" and texts[a.id] == want  # the same deltas as alone
    assert b.finish_reason == "cancelled" and c.finish_reason == "length" and len(c.output_ids) == 5
    assert engine.n_active == 0


def test_logprobs_match_full_forward(sharp_model):
    prompt = [1, 40, 41, 42, 43]
    engine = BatchEngine(sharp_model, max_batch=2)
    r = engine.add(Request(prompt, SamplingParams(max_new_tokens=6, temperature=1.0, seed=5), logprobs=3,
                           prompt_logprobs=True))
    engine.add(Request([1, 50], SamplingParams(max_new_tokens=9, temperature=0)))  # company in the batch
    list(run(engine))
    ids = prompt + r.output_ids
    with torch.no_grad():
        logp = sharp_model(torch.tensor([ids]))[0][0].float().log_softmax(-1)
    want = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert r.prompt_token_logprobs[0] is None
    assert r.prompt_token_logprobs[1:] == pytest.approx(want[:len(prompt) - 1], abs=1e-4)
    assert r.token_logprobs == pytest.approx(want[len(prompt) - 1:], abs=1e-4)
    for i, top in enumerate(r.top_logprobs):
        best = logp[len(prompt) - 1 + i].topk(3)
        assert [t for t, _ in top] == best.indices.tolist()


def test_engine_rejects_what_does_not_fit(sharp_model):
    engine = BatchEngine(sharp_model, max_batch=1)
    ctx = sharp_model.config.max_position_embeddings
    with pytest.raises(SlmforgeError, match="exceeds the context"):
        engine.add(Request([1] * ctx, SamplingParams(max_new_tokens=1)))
    with pytest.raises(SlmforgeError, match="empty prompt"):
        engine.add(Request([], SamplingParams()))


# ------------------------------------------------------------------------------- decode fast path

from slmforge.infer.fastpath import decode_model  # noqa: E402


def test_fast_path_matches_model_forward(sharp_model, tiny_tokenizer):
    """The engine's default decode (an inference weight copy) gives the tokens of the model's own forward."""
    reqs = _mixed_requests(8, tiny_tokenizer.vocab_size, seed=2)
    outs = {}
    for fast in (True, False):
        engine = BatchEngine(sharp_model, max_batch=4, fast=fast)
        rs = [engine.add(Request(ids, p)) for ids, p in reqs]
        list(run(engine))
        outs[fast] = [r.output_ids for r in rs]
    assert outs[True] == outs[False]


def test_decode_model_follows_weight_changes(tiny_tokenizer):
    torch.manual_seed(0)
    m = LlamaModel(preset("200k", vocab_size=tiny_tokenizer.vocab_size)).eval()
    a = decode_model(m, 2)
    assert decode_model(m, 2) is a  # reused across engines
    with torch.no_grad():
        m.lm_head.weight.mul_(2)  # a training step or load_state_dict
    b = decode_model(m, 2)
    assert b is not a and torch.equal(b.lm_head.wt, m.lm_head.weight.t())


def test_compiled_step_equals_single_stream(sharp_model, tiny_tokenizer):
    """compile=True (the fast path's step compiled by torch.compile): continuous batching still gives each
    request's single-stream tokens. One batch size keeps it to a single compile."""
    reqs = _mixed_requests(5, tiny_tokenizer.vocab_size, seed=3)
    single = [list(generate_ids(sharp_model, ids, p)) for ids, p in reqs]
    engine = BatchEngine(sharp_model, max_batch=3, compile=True)
    batched = [engine.add(Request(ids, p)) for ids, p in reqs]
    list(run(engine))
    assert [r.output_ids for r in batched] == single


# ------------------------------------------------------------------------------- issue 11


def _greedy_with_penalties(model, prompt, n, freq, pres):
    """OpenAI's definition, spelled out: logits[j] -= count[j] * freq + (count[j] > 0) * pres, count over
    the tokens generated so far."""
    ids, out = list(prompt), []
    counts = torch.zeros(model.config.vocab_size)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0][0, -1].float()
            logits = logits - counts * freq - (counts > 0).float() * pres
            t = int(logits.argmax())
            out.append(t)
            ids.append(t)
            counts[t] += 1
    return out


@pytest.mark.parametrize("freq,pres", [(1.5, 0.0), (0.0, 2.0), (0.7, -0.5)])
def test_frequency_and_presence_penalties(sharp_model, freq, pres):
    prompt = [1, 40, 41, 42]
    p = SamplingParams(max_new_tokens=16, temperature=0, frequency_penalty=freq, presence_penalty=pres)
    want = _greedy_with_penalties(sharp_model, prompt, 16, freq, pres)
    assert want != _greedy_with_penalties(sharp_model, prompt, 16, 0.0, 0.0)  # the penalty matters here
    assert list(generate_ids(sharp_model, prompt, p)) == want
    engine = BatchEngine(sharp_model, max_batch=3)  # in company, with and without penalties
    a = engine.add(Request(prompt, p))
    b = engine.add(Request([1, 50, 51], SamplingParams(max_new_tokens=9, temperature=0)))
    c = engine.add(Request(prompt, SamplingParams(max_new_tokens=16, temperature=0.9, seed=1, frequency_penalty=1)))
    list(run(engine))
    assert a.output_ids == want
    assert b.output_ids == list(generate_ids(sharp_model, [1, 50, 51], SamplingParams(max_new_tokens=9, temperature=0)))
    assert c.output_ids == list(generate_ids(sharp_model, prompt, c.params))


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(sharp_model, tiny_tokenizer):
    """A long prompt takes several steps to prefill (prefill_budget tokens a step); the request already
    decoding gets a token every one of those steps, and both give their single-stream tokens."""
    rng = random.Random(0)
    long_ids = [1] + [rng.randrange(7, tiny_tokenizer.vocab_size) for _ in range(150)]
    p_long = SamplingParams(max_new_tokens=8, temperature=0.8, seed=3, repetition_penalty=1.2)
    p_short = SamplingParams(max_new_tokens=30, temperature=0)
    engine = BatchEngine(sharp_model, max_batch=2, prefill_chunk=32, prefill_budget=32)
    short = engine.add(Request([1, 40, 41], p_short))
    engine.step()
    long = engine.add(Request(long_ids, p_long, logprobs=2, prompt_logprobs=True))
    steps_to_first = 0
    while not long.output_ids:
        n = len(short.output_ids)
        engine.step()
        steps_to_first += 1
        assert len(short.output_ids) == n + 1  # not stalled by the long prefill
    assert steps_to_first == 5  # ceil(151 / 32) chunks, one a step
    list(run(engine))
    assert short.output_ids == list(generate_ids(sharp_model, [1, 40, 41], p_short))
    assert long.output_ids == list(generate_ids(sharp_model, long_ids, p_long))
    alone = BatchEngine(sharp_model, max_batch=1)
    ref = alone.add(Request(long_ids, p_long, logprobs=2, prompt_logprobs=True))
    list(run(alone))
    assert long.prompt_token_logprobs[0] is None and len(long.prompt_token_logprobs) == len(long_ids)
    assert long.prompt_token_logprobs[1:] == pytest.approx(ref.prompt_token_logprobs[1:], abs=1e-4)


def test_compile_in_background_serves_eager_until_ready(sharp_model, tiny_tokenizer, monkeypatch):
    """compile=True with a background compile: steps run eager (same tokens) until the compiled step is
    built, and `compiling` says so."""
    import threading

    gate = threading.Event()
    monkeypatch.setattr(BatchEngine, "_compile_step", lambda self: gate.wait(30))
    engine = BatchEngine(sharp_model, max_batch=2, compile=True)
    engine.compile_in_background()
    assert engine.compiling
    r = engine.add(Request([1, 40, 41], SamplingParams(max_new_tokens=6, temperature=0)))
    list(run(engine))
    assert r.output_ids == list(generate_ids(sharp_model, [1, 40, 41], SamplingParams(max_new_tokens=6, temperature=0)))
    gate.set()
    engine.compile_thread.join(5)
    assert not engine.compiling and engine.compiled_ready


def test_text_stream_is_incremental_and_exact(tiny_tokenizer, monkeypatch):
    """TextStream does not re-decode every id per token (quadratic), and its text is still decode(ids),
    for random ids too (bytes that do not form characters)."""
    from slmforge.infer.engine import TextStream

    tok = tiny_tokenizer
    decoded = []
    real = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: (decoded.append(len(list(ids))), real(ids, **kw))[1])
    rng = random.Random(0)
    ids = [rng.randrange(7, tok.vocab_size) for _ in range(400)]
    ts = TextStream(tok)
    deltas = "".join(ts.push(i)[0] for i in ids) + ts.flush()
    assert sum(decoded) <= 2 * len(ids), sum(decoded)  # was 400 * 401 / 2
    monkeypatch.undo()
    assert deltas == ts.text == tok.decode(ids)
    assert ts.offsets == sorted(ts.offsets) and ts.offsets[-1] <= len(ts.text)


def test_a_prompt_too_long_for_the_context_is_trimmed_with_a_warning(tiny_model):
    ctx = tiny_model.config.max_position_embeddings
    with pytest.warns(UserWarning, match=f"does not fit the context \\({ctx}\\) with 8 new tokens: keeping its last"):
        out = list(generate_ids(tiny_model, [1] + [5] * (ctx + 10), SamplingParams(max_new_tokens=8, temperature=0)))
    assert len(out) == 8
