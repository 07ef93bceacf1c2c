"""Input fuzzing (issue 16), binary formats: llama2.c checkpoints and tokenizer.bin (`import llama2c`), packed
token directories (index.json, the .bin shards and their .docs.npy offsets: what pretraining reads) and
training checkpoints (last.pt, read on resume); and the CLI in a real process for one broken file of each
kind of input (exit 1, one `error:` line naming the file, no traceback). The other formats are in
test_fuzz_data.py, test_fuzz_models.py and test_fuzz_configs.py; helpers and budget in input_fuzz.py."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from input_fuzz import edited, file_bytes, fuzz_settings, mutated, read_or_error, single_thread

from conftest import DATA, small_corpus

# ------------------------------------------------------------------------------------------------ llama2.c

DIM, HIDDEN, LAYERS, HEADS, KV, SEQ = 8, 16, 1, 2, 1, 16
PIECES = ["<unk>", "\n<s>\n", "\n</s>\n", *(f"<0x{b:02X}>" for b in range(256)), " ", "a", "b", " a", "ab", " ab"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # torch on one thread here: two threads on the two shared cores spin-wait (input_fuzz.single_thread)
    yield from single_thread()


def llama2c_tokenizer_bin(pieces: list[str] = PIECES) -> bytes:
    """A tokenizer.bin as llama2.c's export writes it: max length, then (score, length, bytes) per piece."""
    body = b"".join(struct.pack("<fi", -float(i), len(p.encode())) + p.encode() for i, p in enumerate(pieces))
    return struct.pack("<i", max(len(p.encode()) for p in pieces)) + body


def llama2c_checkpoint_bin(vocab: int = len(PIECES), version: int = 0, shared: bool = True) -> bytes:
    """A tiny fp32 checkpoint in llama2.c's legacy (version 0) or version 1 layout, random weights."""
    rng = np.random.default_rng(0)
    hd = DIM // HEADS
    n = (vocab * DIM + 2 * LAYERS * DIM + LAYERS * DIM * DIM * 2 + 2 * LAYERS * KV * hd * DIM
         + 3 * LAYERS * HIDDEN * DIM + DIM + (0 if shared else vocab * DIM))
    if version == 0:
        n += 2 * SEQ * hd // 2
        head = struct.pack("<7i", DIM, HIDDEN, LAYERS, HEADS, KV, vocab if shared else -vocab, SEQ)
    else:
        head = struct.pack("<Ii7iB", 0x616B3432, 1, DIM, HIDDEN, LAYERS, HEADS, KV, vocab, SEQ, int(shared))
        head += b"\0" * (256 - len(head))
    return head + (rng.standard_normal(n).astype(np.float32) * 0.1).tobytes()


@fuzz_settings(40)
@given(st.sampled_from([(0, True), (1, True), (0, False), (1, False)]), st.data())
@example((0, True), struct.pack("<7i", 2**20, 2**20, 2**20, 2**20, 2**20, 2**20, 2**20))  # ~2**61 floats claimed
@example((0, True), struct.pack("<7i", 8, 16, 1, 2, 1, -(2**31), 16))  # abs(-2**31) overflows an int32
@example((1, True), struct.pack("<Ii", 0x616B3432, 1))
def test_llama2c_checkpoint(version_shared, data):
    """read_llama2c_checkpoint, then the weights loaded into a model (what `import llama2c` does)."""
    from slmforge.convert.llama2c import read_llama2c_checkpoint
    from slmforge.model import LlamaModel
    from slmforge.modeldir import load_state

    valid = llama2c_checkpoint_bin(version=version_shared[0], shared=version_shared[1])
    # the header is 28 or 256 bytes of a ~20 KB file: aim most edits at it
    raw = (data.draw(st.one_of(file_bytes(valid), mutated(valid[:300]).map(lambda h: h + valid[300:])))
           if isinstance(data, st.DataObject) else data)
    p = Path(tempfile.mkdtemp(prefix="fuzz-")) / "model.bin"
    p.write_bytes(raw)

    def read():
        cfg, state = read_llama2c_checkpoint(p)
        load_state(LlamaModel(cfg), state, str(p))
        return cfg

    read_or_error(read, str(p))


@fuzz_settings(40)
@given(st.data())
@example(struct.pack("<i", 8) + struct.pack("<fi", float("nan"), 1) + b"a")
@example(struct.pack("<i", 2**31 - 1))
def test_llama2c_tokenizer(data):
    from slmforge.convert.llama2c import read_llama2c_tokenizer

    raw = data.draw(file_bytes(llama2c_tokenizer_bin())) if isinstance(data, st.DataObject) else data
    p = Path(tempfile.mkdtemp(prefix="fuzz-")) / "tok.bin"
    p.write_bytes(raw)
    tok, _ = read_or_error(lambda: read_llama2c_tokenizer(p), str(p))
    if tok is not None:
        assert tok.decode(tok.encode("ab a")) == "ab a"


@fuzz_settings(12)
@given(st.sampled_from(["model.bin", "tok.bin"]), st.data())
def test_import_llama2c(name, data):
    """The whole import: a model directory from both files, or an error and no directory."""
    from slmforge.convert.llama2c import import_llama2c
    from slmforge.modeldir import ModelDir

    d = Path(tempfile.mkdtemp(prefix="fuzz-"))
    files = {"model.bin": llama2c_checkpoint_bin(), "tok.bin": llama2c_tokenizer_bin()}
    files[name] = data.draw(file_bytes(files[name]))
    for k, v in files.items():
        (d / k).write_bytes(v)
    out, err = read_or_error(lambda: import_llama2c(d / "model.bin", d / "tok.bin", d / "out"), str(d / name))
    if err is None:
        assert ModelDir.open(out).load_model() is not None
    else:
        assert not (d / "out").exists()


@fuzz_settings(8)
@given(st.sampled_from(["tinystories/stories260K.bin", "tinystories/tok512.bin"]), st.data())
def test_llama2c_real_files(name, data):
    """Mutations of llama2.c's published stories260K and its tokenizer (skipped without ../shared/data)."""
    from slmforge.convert.llama2c import read_llama2c_checkpoint, read_llama2c_tokenizer

    src = DATA / name
    if not src.exists():
        pytest.skip(f"{src} not available")
    valid = src.read_bytes()
    raw = data.draw(st.one_of(mutated(valid), mutated(valid[:512]).map(lambda h: h + valid[512:])))
    p = Path(tempfile.mkdtemp(prefix="fuzz-")) / src.name
    p.write_bytes(raw)
    reader = read_llama2c_tokenizer if name.endswith("tok512.bin") else read_llama2c_checkpoint
    read_or_error(lambda: reader(p), str(p))


# ------------------------------------------------------------------------------------------ packed tokens


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    from slmforge.data.pack import pack_tokens
    from slmforge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("fuzz-pack")
    (root / "c.txt").write_text("\n\n".join(small_corpus(60)))
    tok = train_tokenizer(small_corpus(), vocab_size=320)
    pack_tokens(root / "c.txt", tok, root / "packed", val_fraction=0.2, progress=False)
    return root / "packed"


def read_pack(d: Path) -> int:
    """What pretraining and its evaluation read: both splits, random and fixed windows, document offsets."""
    from slmforge.data.pack import TokenShards

    n = 0
    for split in ("train", "val"):
        s = TokenShards(d, split)
        if len(s) > 9:
            x, y = s.get_batch(0, 2, 8)
            assert x.shape == y.shape == (2, 8) and int(x.min()) >= 0
            n += int(x.numel())
        for x, _ in s.iter_eval_batches(2, 8, max_batches=2):
            assert int(x.min()) >= 0
        offsets = s.doc_offsets()
        assert offsets.ndim == 1
    return n


@fuzz_settings(40)
@given(st.data())
@example({"dtype": "float64"})
@example({"dtype": "object"})
@example({"splits": None})  # a TypeError in TokenShards
@example({"splits.train": {}})  # a KeyError
@example({"splits.train.file": "../../etc/passwd"})
@example({"splits.train.file": "\n"})  # an error message of two lines
@example({"splits.train.tokens": -3})
@example({"vocab_size": 3})  # ids in the shards beyond the vocabulary: an IndexError inside the model
def test_pack_index(packed, data):
    """index.json with fields deleted, retyped, set to junk."""
    d = Path(tempfile.mkdtemp(prefix="fuzz-")) / "packed"
    shutil.copytree(packed, d)
    index = json.loads((d / "index.json").read_text())
    if isinstance(data, st.DataObject):
        new = data.draw(edited(index, max_edits=2))
    else:  # an explicit example: {"dotted.path": value}
        new = index
        for dotted, value in data.items():
            *parents, key = dotted.split(".")
            node = new
            for k in parents:
                node = node[k]
            node[key] = value
    (d / "index.json").write_text(json.dumps(new))
    read_or_error(lambda: read_pack(d), str(d))


@fuzz_settings(25)
@given(st.sampled_from(["train.bin", "val.bin", "train.docs.npy", "val.docs.npy", "index.json"]), st.data())
def test_pack_files(packed, name, data):
    """A shard, its offsets (.npy) or the index with bytes flipped, cut, inserted; random bytes; empty."""
    d = Path(tempfile.mkdtemp(prefix="fuzz-")) / "packed"
    shutil.copytree(packed, d)
    (d / name).write_bytes(data.draw(file_bytes((d / name).read_bytes())))
    read_or_error(lambda: read_pack(d), str(d))


# -------------------------------------------------------------------------------------- train checkpoints


def _load_checkpoint(p: Path):
    from slmforge.train.loop import load_checkpoint

    return load_checkpoint(p)


@fuzz_settings(20)
@given(st.data())
@example(b"PK\x03\x04")
def test_training_checkpoint(data):
    """last.pt (torch.save of the run's state), read by finetune and pretrain on resume."""
    import torch

    d = Path(tempfile.mkdtemp(prefix="fuzz-"))
    p = d / "last.pt"
    torch.save({"step": 3, "model": {"w": torch.ones(4, 4)}, "optimizer": {"state": {}}, "rng": {"py": 1}}, p)
    p.write_bytes(data.draw(file_bytes(p.read_bytes())) if isinstance(data, st.DataObject) else data)
    read_or_error(lambda: _load_checkpoint(p), str(p))


def test_checkpoint_error_without_a_message(tmp_path, monkeypatch):
    import torch

    from slmforge.errors import SlmforgeError
    from slmforge.train.loop import load_checkpoint

    def no_memory(*a, **k):
        raise MemoryError  # what torch.load raised for last.pt with byte 255 flipped

    (tmp_path / "last.pt").write_bytes(b"x")
    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(SlmforgeError, match="last.pt"):
        load_checkpoint(tmp_path / "last.pt")


# ----------------------------------------------------------------------------- the CLI in a real process

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cli_case(tmp: Path, case: str) -> tuple[list, Path]:
    """(command line, the broken file it must name)."""
    if case == "ingest-jsonl":
        p = tmp / "c.jsonl"
        p.write_bytes(b'{"text": "ok"}\n{"text": "x", "n": ' + b"7" * 4400 + b"}\n")
        return ["data", "ingest", p, "--out", tmp / "out"], p
    if case == "ingest-parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp / "c.parquet"
        pq.write_table(pa.table({"text": ["a", "b"], "blob": [b"\x00", b"\xff"]}), p)
        return ["data", "ingest", p, "--out", tmp / "out"], p
    if case == "recipe":
        p = tmp / "r.yaml"
        p.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{c}: &{c} [{', '.join([f'*{q}'] * 9)}]\n" for q, c in zip("abcdefgh", "bcdefghi", strict=True)))
        return ["run", p], p
    if case == "model-config":
        from conftest import save_tiny_llama

        d = save_tiny_llama(tmp / "m")
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 2**40}))
        return ["generate", d, "hi", "-n", 2], d / "config.json"
    if case == "llama2c":
        (tmp / "m.bin").write_bytes(struct.pack("<7i", 8, 16, 1, 2, 1, -(2**31), 16))
        (tmp / "t.bin").write_bytes(llama2c_tokenizer_bin())
        return ["import", "llama2c", tmp / "m.bin", tmp / "t.bin", tmp / "out"], tmp / "m.bin"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["ingest-jsonl", "ingest-parquet", "recipe", "model-config", "llama2c"])
def test_cli_process_one_error_line(tmp_path, case):
    args, bad = _cli_case(tmp_path, case)
    r = subprocess.run([sys.executable, "-m", "slmforge", *map(str, args)], capture_output=True, text=True,
                       env=ENV, timeout=120)
    # (a progress bar may have drawn its line before the error: the error itself is one line)
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}"), r.stderr
    assert r.stderr.strip().endswith(lines[0]), r.stderr
    assert not (tmp_path / "out").exists()
