import pytest

from conftest import small_corpus
from slmforge.errors import SlmforgeError
from slmforge.tokenizer import MIN_VOCAB, SPECIAL_TOKENS, Tokenizer, train_tokenizer


def test_special_tokens_have_fixed_ids(tiny_tokenizer):
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tiny_tokenizer.tok.token_to_id(t) == i
    assert (tiny_tokenizer.pad_id, tiny_tokenizer.bos_id, tiny_tokenizer.eos_id) == (0, 1, 2)
    assert tiny_tokenizer.vocab_size == 320


def test_roundtrip_any_unicode(tiny_tokenizer):
    for s in ["Lily saw the cat.", "naïve café — 東京 🚀", "  spaces\n\nand\ttabs ", ""]:
        assert tiny_tokenizer.decode(tiny_tokenizer.encode(s)) == s


def test_bos_eos(tiny_tokenizer):
    ids = tiny_tokenizer.encode("Tom", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tiny_tokenizer.encode_batch(["Tom"], bos=True, eos=True) == [ids]


def test_compression_improves_with_vocab():
    texts = small_corpus(400, seed=1)
    small = train_tokenizer(texts, MIN_VOCAB)
    big = train_tokenizer(texts, 400)
    assert small.bytes_per_token(texts) < big.bytes_per_token(texts)
    assert big.bytes_per_token(texts) > 2.0


def test_save_load(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save(tmp_path)
    t2 = Tokenizer.from_dir(tmp_path)
    assert t2.encode("Mia lost the ball.") == tiny_tokenizer.encode("Mia lost the ball.")
    assert t2.chat_template == tiny_tokenizer.chat_template and t2.stop_ids == tiny_tokenizer.stop_ids


def test_chat_template(tiny_tokenizer):
    s = tiny_tokenizer.apply_chat_template([{"role": "system", "content": "Be kind."},
                                            {"role": "user", "content": "Hi"}])
    assert s == "<s><|system|>\nBe kind.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    ids = tiny_tokenizer.encode(s)
    assert ids[0] == 1 and 4 in ids and 5 in ids  # bos, user and assistant are single tokens
    with pytest.raises(SlmforgeError, match="role"):
        tiny_tokenizer.apply_chat_template([{"content": "x"}])


def test_vocab_too_small():
    with pytest.raises(SlmforgeError, match="too small"):
        train_tokenizer(["abc"], 100)


def test_empty_corpus():
    with pytest.raises(SlmforgeError, match="empty"):
        train_tokenizer(["", ""], 300)


def test_corrupt_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{oops")
    with pytest.raises(SlmforgeError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
