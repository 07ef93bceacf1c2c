"""Packing a corpus into token files and reading batches back."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from slmforge.data.pack import TokenShards, is_val_document, iter_documents, pack_tokens, token_dtype
from slmforge.errors import SlmforgeError
from slmforge.tokenizer import train_tokenizer

WORDS = "the cat sat on a mat while dog ran far away into green hills under blue sky and rain".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) for _ in range(rng.randint(1, 3))]
        docs.append(f"Doc {i}: " + "\n".join(lines) + (" é€🙂" if i % 7 == 0 else ""))
    return docs


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(make_docs(300, seed=1), vocab_size=300)


def write_txt(path, docs):
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def read_split(out, split):
    index = json.loads((out / "index.json").read_text())
    toks = np.fromfile(out / f"{split}.bin", dtype=index["dtype"])
    offs = np.load(out / f"{split}.docs.npy")
    bounds = [*offs.tolist(), len(toks)]
    return [toks[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def test_round_trip_txt_and_jsonl(tmp_path, tok):
    docs = make_docs(60)
    txt = write_txt(tmp_path / "a.txt", docs[:40])
    jl = tmp_path / "b.jsonl"
    jl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs[40:])) + "\n")
    assert list(iter_documents([txt, jl], text_field="body")) == docs
    out = tmp_path / "packed"
    stats = pack_tokens([txt, jl], tok, out, val_fraction=0.2, seed=3, text_field="body", progress=False)

    assert stats["dtype"] == "uint16" and stats["documents"] == 60
    expect_val = [d for i, d in enumerate(docs) if is_val_document(i, 3, 0.2)]
    expect_train = [d for i, d in enumerate(docs) if not is_val_document(i, 3, 0.2)]
    assert expect_val and expect_train
    for split, expect in (("train", expect_train), ("val", expect_val)):
        got = read_split(out, split)
        assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in got)
        assert [tok.decode(d) for d in got] == expect
        assert stats["splits"][split]["documents"] == len(expect)
        assert stats["splits"][split]["tokens"] == sum(map(len, got)) == len(TokenShards(out, split))
    index = json.loads((out / "index.json").read_text())
    assert index["tokenizer_fingerprint"] == tok.fingerprint()
    assert [s["path"] for s in index["sources"]] == [str(txt.resolve()), str(jl.resolve())]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_one_per_line_and_gz_and_folder(tmp_path, tok):
    import gzip

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.txt").write_text("line one\nline two\n\nline three\n")
    with gzip.open(tmp_path / "c" / "y.txt.gz", "wt") as f:
        f.write("gz doc\n")
    assert list(iter_documents(tmp_path / "c", one_per_line=True)) == ["line one", "line two", "line three", "gz doc"]
    assert list(iter_documents(tmp_path / "c")) == ["line one\nline two", "line three", "gz doc"]


def test_dtype_choice(tmp_path):
    assert token_dtype(512) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32

    class BigVocab:  # pack only needs these members of Tokenizer
        vocab_size, bos_id, eos_id = 100_000, 1, 2

        def encode_batch(self, texts, bos=False, eos=False):
            return [[1, *(70_000 + ord(c) for c in t), 2] for t in texts]

        def fingerprint(self):
            return "big"

    write_txt(tmp_path / "a.txt", ["abc", "xyz", "hello"])
    stats = pack_tokens(tmp_path / "a.txt", BigVocab(), tmp_path / "p", val_fraction=0.0, progress=False)
    assert stats["dtype"] == "uint32"
    shards = TokenShards(tmp_path / "p", "train")
    assert shards.tokens.dtype == np.uint32 and int(shards.tokens.max()) == 70_000 + ord("z")


def test_split_is_deterministic(tmp_path, tok):
    src = write_txt(tmp_path / "a.txt", make_docs(200))
    a = pack_tokens(src, tok, tmp_path / "a", val_fraction=0.1, seed=0, progress=False)
    b = pack_tokens(src, tok, tmp_path / "b", val_fraction=0.1, seed=0, progress=False)
    pack_tokens(src, tok, tmp_path / "c", val_fraction=0.1, seed=1, progress=False)
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == (tmp_path / "b" / f"{split}.bin").read_bytes()
    assert a["splits"] == b["splits"]
    assert read_split(tmp_path / "a", "val") != read_split(tmp_path / "c", "val")
    assert 5 <= a["splits"]["val"]["documents"] <= 40  # ~10% of 200


def test_tiny_corpus_still_gets_a_val_document(tmp_path, tok):
    src = write_txt(tmp_path / "a.txt", ["first doc", "second doc"])
    stats = pack_tokens(src, tok, tmp_path / "p", progress=False)
    assert stats["splits"]["train"]["documents"] == 1 and stats["splits"]["val"]["documents"] == 1
    one = write_txt(tmp_path / "b.txt", ["only doc"])
    stats = pack_tokens(one, tok, tmp_path / "q", val_fraction=0.9, progress=False)
    assert stats["splits"]["train"]["documents"] == 1 and stats["splits"]["val"]["documents"] == 0
    assert len(TokenShards(tmp_path / "q", "val")) == 0
    assert list(TokenShards(tmp_path / "q", "val").iter_eval_batches(2, 8)) == []


def test_errors(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "broken\n')
    with pytest.raises(SlmforgeError, match=r"bad\.jsonl:3: invalid JSON"):
        pack_tokens(bad, tok, tmp_path / "o1", progress=False)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(SlmforgeError, match=r"nofield\.jsonl:2: no field 'text' \(fields: body\)"):
        list(iter_documents(nofield))
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"fine line\ncaf\xe9 au lait\n")
    with pytest.raises(SlmforgeError, match=r"latin\.txt:2: not valid UTF-8"):
        pack_tokens(latin, tok, tmp_path / "o2", progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(SlmforgeError, match="no documents in"):
        pack_tokens(empty, tok, tmp_path / "o3", progress=False)
    with pytest.raises(SlmforgeError, match="no such file"):
        pack_tokens(tmp_path / "missing.txt", tok, tmp_path / "o4", progress=False)
    for o in ("o1", "o2", "o3"):  # failed packs leave no output, no temp files and no folder they made
        assert not (tmp_path / o).exists()


def test_interrupted_pack_keeps_previous_output(tmp_path, tok):
    src = write_txt(tmp_path / "a.txt", make_docs(100))
    out = tmp_path / "p"
    pack_tokens(src, tok, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class Boom:
        vocab_size, bos_id, eos_id = tok.vocab_size, tok.bos_id, tok.eos_id
        calls = 0

        def encode_batch(self, texts, bos=False, eos=False):
            Boom.calls += 1
            if Boom.calls == 2:
                raise KeyboardInterrupt
            return tok.encode_batch(texts, bos, eos)

        def fingerprint(self):
            return "boom"

    with pytest.raises(KeyboardInterrupt):
        pack_tokens(src, Boom(), out, batch_chars=200, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_get_batch_is_deterministic_and_shifted(tmp_path, tok):
    src = write_txt(tmp_path / "a.txt", make_docs(200))
    pack_tokens(src, tok, tmp_path / "p", progress=False)
    s = TokenShards(tmp_path / "p", "train")
    x, y = s.get_batch(5, 4, 16, seed=0)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, y2 = TokenShards(tmp_path / "p", "train").get_batch(5, 4, 16, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, s.get_batch(6, 4, 16, seed=0)[0])
    assert not torch.equal(x, s.get_batch(5, 4, 16, seed=1)[0])
    assert not torch.equal(x, s.get_batch(5, 4, 16, seed=0, rank=1)[0])
    with pytest.raises(SlmforgeError, match="fewer than one window"):
        s.get_batch(0, 1, len(s))

    batches = list(s.iter_eval_batches(4, 16, max_batches=3))
    assert len(batches) == 3 and torch.equal(batches[0][0][0], torch.from_numpy(s.tokens[:16].astype(np.int64)))
    assert torch.equal(batches[1][0][0], torch.from_numpy(s.tokens[64:80].astype(np.int64)))
    ranks = [list(s.iter_eval_batches(4, 16, max_batches=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == 2 and len(ranks[1]) == 1 and torch.equal(ranks[1][0][0], batches[1][0])


def test_mismatched_files_are_detected(tmp_path, tok):
    src = write_txt(tmp_path / "a.txt", make_docs(50))
    pack_tokens(src, tok, tmp_path / "p", progress=False)
    with open(tmp_path / "p" / "train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(SlmforgeError, match="incomplete or mixed pack"):
        TokenShards(tmp_path / "p", "train")
    with pytest.raises(SlmforgeError, match="not a packed token directory"):
        TokenShards(tmp_path, "train")
