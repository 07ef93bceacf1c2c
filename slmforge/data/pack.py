"""Packing a text corpus into flat token files for pretraining, and reading batches back.

    out_dir/
      train.bin, val.bin             every document as [bos] + ids + [eos], concatenated, raw uint16/uint32
      train.docs.npy, val.docs.npy   int64 start offset of each document in its .bin
      index.json                     dtype, vocab, counts, tokenizer fingerprint, sources (written last)

Packing streams: documents are read lazily, tokenised in batches and appended to the .bin files, so a
corpus larger than RAM packs in constant memory (plus 8 bytes per document for the offsets).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from slmforge.data import ingest
from slmforge.errors import SlmforgeError
from slmforge.io import check_out_dir, read_json, remove_if_empty, write_json
from slmforge.tokenizer import Tokenizer

FORMAT = "slmforge-tokens-v1"
SPLITS = ("train", "val")


# ---------------------------------------------------------------------------------------------------------
# Reading documents


def iter_documents(paths: str | Path | Iterable[str | Path], text_field: str = "text",
                   one_per_line: bool = False) -> Iterator[str]:
    """The texts of the documents `slmforge.data.ingest` reads: .txt files (blank-line separated, or one
    per line with `one_per_line`), .jsonl (the `text_field` of each object), CSV/TSV, Parquet, `.gz`
    variants and folders of such files."""
    split = "line" if one_per_line else "paragraph"
    for doc in ingest.iter_documents(paths, text_field=text_field, split=split):
        yield doc["text"]


# ---------------------------------------------------------------------------------------------------------
# Packing


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_val_document(index: int, seed: int, val_fraction: float) -> bool:
    """Deterministic split: a hash of (seed, document index) so re-packing gives the same split."""
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < val_fraction


class _SplitWriter:
    """Appends documents to a temp .bin file and remembers where each starts."""

    def __init__(self, out_dir: Path, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.bin.", suffix=".tmp", dir=out_dir)
        self.tmp = Path(tmp)
        self.f = os.fdopen(fd, "w+b")
        self.offsets = array("q")
        self.tokens = 0

    def add(self, docs: list[list[int]]) -> None:
        if not docs:
            return
        for d in docs:
            self.offsets.append(self.tokens)
            self.tokens += len(d)
        flat = np.fromiter((t for d in docs for t in d), dtype=self.dtype, count=sum(map(len, docs)))
        self.f.write(flat.tobytes())

    def pop_last(self) -> list[int]:
        """Remove the last document (to move it to the other split)."""
        start = self.offsets.pop()
        self.f.seek(start * self.dtype.itemsize)
        ids = np.frombuffer(self.f.read(), dtype=self.dtype).tolist()
        self.f.seek(start * self.dtype.itemsize)
        self.f.truncate()
        self.tokens = start
        return ids


def pack_tokens(
    paths: str | Path | Iterable[str | Path],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.005,
    seed: int = 0,
    text_field: str = "text",
    one_per_line: bool = False,
    batch_chars: int = 1 << 20,
    progress: bool = True,
) -> dict:
    """Tokenise a corpus into out_dir (see the module docstring). Returns the index plus timing stats.

    Output files are written under temp names and renamed at the end, index.json last: a directory
    with an index.json is always a complete pack, and an interrupted pack leaves the old one intact
    (or nothing).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise SlmforgeError(f"val fraction must be in [0, 1), got {val_fraction}")
    files = ingest.find_inputs(paths)
    out = Path(out_dir)
    created = check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    t0 = time.time()
    writers = {s: _SplitWriter(out, s, dtype) for s in SPLITS}
    try:
        n_docs, n_chars = _stream_into(files, tokenizer, writers, val_fraction, seed, text_field, one_per_line,
                                       batch_chars, progress)
        if n_docs == 0:
            raise SlmforgeError(f"no documents in {', '.join(map(str, files))} (all files empty or blank)")
        tr, va = writers["train"], writers["val"]
        # Tiny corpora: make sure each split has a document when that is possible.
        if val_fraction > 0 and not va.offsets and len(tr.offsets) >= 2:
            va.add([tr.pop_last()])
        if not tr.offsets:
            tr.add([va.pop_last()])
        index = {
            "format": FORMAT, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
            "tokenizer_fingerprint": tokenizer.fingerprint(),
            "seed": seed, "val_fraction": val_fraction, "text_field": text_field, "one_per_line": one_per_line,
            "documents": n_docs, "tokens": tr.tokens + va.tokens, "chars": n_chars,
            "splits": {s: {"file": f"{s}.bin", "tokens": w.tokens, "documents": len(w.offsets),
                           "doc_offsets": f"{s}.docs.npy"} for s, w in writers.items()},
            "sources": [{"path": str(f.resolve()), "bytes": ingest.input_size(f)} for f in files],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _finish(out, writers, index)
    except BaseException:
        for w in writers.values():
            w.f.close()
            w.tmp.unlink(missing_ok=True)
        remove_if_empty(out, created)
        raise
    elapsed = time.time() - t0
    return {**index, "elapsed_s": round(elapsed, 3), "tokens_per_s": round(index["tokens"] / max(elapsed, 1e-9))}


def _stream_into(files, tokenizer, writers, val_fraction, seed, text_field, one_per_line, batch_chars,
                 progress) -> tuple[int, int]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    total_bytes = sum(ingest.input_size(f) for f in files)
    n_docs = n_chars = 0
    bar = Progress(TextColumn("packing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TextColumn("{task.fields[docs]:,} docs {task.fields[toks]:,} tokens"), TimeRemainingColumn(),
                   disable=not progress, transient=False)
    with bar:
        task = bar.add_task("pack", total=total_bytes, docs=0, toks=0)

        def flush(batch: list[str], first_index: int) -> None:
            ids = tokenizer.encode_batch(batch, bos=True, eos=True)
            to_val = [is_val_document(first_index + i, seed, val_fraction) for i in range(len(ids))]
            writers["train"].add([d for d, v in zip(ids, to_val, strict=True) if not v])
            writers["val"].add([d for d, v in zip(ids, to_val, strict=True) if v])

        stats = ingest.IngestStats()  # its byte count drives the progress bar
        split = "line" if one_per_line else "paragraph"
        batch: list[str] = []
        size = 0
        for doc in ingest.iter_documents(files, text_field=text_field, split=split, stats=stats):
            batch.append(doc["text"])
            size += len(doc["text"])
            if size >= batch_chars:
                flush(batch, n_docs)
                n_docs, n_chars = n_docs + len(batch), n_chars + size
                batch, size = [], 0
                toks = writers["train"].tokens + writers["val"].tokens
                bar.update(task, completed=stats.bytes, docs=n_docs, toks=toks)
        if batch:
            flush(batch, n_docs)
            n_docs, n_chars = n_docs + len(batch), n_chars + size
        bar.update(task, completed=total_bytes, docs=n_docs, toks=writers["train"].tokens + writers["val"].tokens)
    return n_docs, n_chars


def _finish(out: Path, writers: dict[str, _SplitWriter], index: dict) -> None:
    # Drop the old index first: while files are being swapped the directory is not a valid pack.
    (out / "index.json").unlink(missing_ok=True)
    for name, w in writers.items():
        w.f.flush()
        os.fsync(w.f.fileno())
        w.f.close()
        fd, tmp_docs = tempfile.mkstemp(prefix=f".{name}.docs.", suffix=".npy.tmp", dir=out)
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.frombuffer(w.offsets, dtype=np.int64) if w.offsets else np.zeros(0, np.int64))
            f.flush()
            os.fsync(f.fileno())
        os.replace(w.tmp, out / f"{name}.bin")
        os.replace(tmp_docs, out / f"{name}.docs.npy")
    write_json(out / "index.json", index)


# ---------------------------------------------------------------------------------------------------------
# Reading batches


def read_index(data_dir: str | Path) -> dict:
    """index.json, checked: every field a reader indexes into is there, of its type, and names a file in
    this folder (a damaged index is an error naming it, not a KeyError in pretraining)."""
    d = Path(data_dir)
    if not (d / "index.json").is_file():
        raise SlmforgeError(f"{d}: not a packed token directory (no index.json; run the pack step first)")
    index = read_json(d / "index.json")
    if not isinstance(index, dict):
        raise SlmforgeError(f"{d / 'index.json'}: expected a JSON object")
    if index.get("format") != FORMAT:
        raise SlmforgeError(f"{d / 'index.json'}: unknown format {index.get('format')!r} (expected {FORMAT})")
    problem = _index_problem(index)
    if problem:
        raise SlmforgeError(f"{d / 'index.json'}: {problem} (a damaged pack: pack again)")
    return index


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _index_problem(index: dict) -> str | None:
    if index.get("dtype") not in ("uint16", "uint32"):
        return f"dtype {index.get('dtype')!r} (uint16 or uint32)"
    if not _count(index.get("vocab_size")) or index["vocab_size"] < 1:
        return f"vocab_size {index.get('vocab_size')!r}"
    splits = index.get("splits")
    if not isinstance(splits, dict):
        return "no 'splits'"
    for name in SPLITS:
        info = splits.get(name)
        if not isinstance(info, dict):
            return f"splits.{name} missing"
        for key in ("tokens", "documents"):
            if not _count(info.get(key)):
                return f"splits.{name}.{key} {info.get(key)!r} (a count)"
        for key in ("file", "doc_offsets"):
            f = info.get(key)
            if not isinstance(f, str) or not f.isprintable() or f != Path(f).name or f in ("", ".", ".."):
                return f"splits.{name}.{key} {f!r} (a file name in this folder)"
    return None


class TokenShards:
    """One split of a packed directory, memory-mapped (opening is instant whatever the size)."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        if split not in SPLITS:
            raise SlmforgeError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        self.dir, self.split = Path(data_dir), split
        self.index = read_index(self.dir)
        info = self.index["splits"][split]
        self.dtype = np.dtype(self.index["dtype"])
        path = self.dir / info["file"]
        n = info["tokens"]
        size = path.stat().st_size if path.is_file() else -1
        if size != n * self.dtype.itemsize:
            raise SlmforgeError(f"{path}: {'missing' if size < 0 else f'{size} bytes'}, but index.json says "
                                f"{n} {self.dtype.name} tokens (incomplete or mixed pack; pack again)")
        # np.memmap refuses empty files; an empty split is a valid (if useless) thing.
        self.tokens = np.memmap(path, dtype=self.dtype, mode="r") if n else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.tokens)

    def doc_offsets(self) -> np.ndarray:
        """Where each document of the split starts: int64, one per document, ascending, within the split."""
        info = self.index["splits"][self.split]
        path = self.dir / info["doc_offsets"]
        if not path.is_file():
            raise SlmforgeError(f"{path}: missing (incomplete pack; pack again)")
        try:
            offsets = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # numpy raises ValueError, EOFError, OSError or SyntaxError for a bad header
            raise SlmforgeError(f"{path}: not a .npy file of offsets ({str(e).strip()[:120]})") from None
        ok = (isinstance(offsets, np.ndarray) and offsets.dtype == np.int64 and offsets.ndim == 1
              and len(offsets) == info["documents"])
        if ok and len(offsets):
            ok = int(offsets[0]) == 0 and int(offsets[-1]) <= info["tokens"] and bool((np.diff(offsets) >= 0).all())
        if not ok:
            raise SlmforgeError(f"{path}: not the offsets of {info['documents']} documents in {info['tokens']} "
                                f"tokens (a damaged pack: pack again)")
        return offsets

    def _check(self, seq_len: int) -> None:
        if len(self) < seq_len + 1:
            raise SlmforgeError(f"{self.dir}: the {self.split} split has {len(self)} tokens, fewer than one "
                                f"window of seq_len + 1 = {seq_len + 1}; use more data or a shorter seq_len")

    def get_batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0,
                  rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows chosen by (seed, step, rank) alone, so a resumed run sees the same batches.

        Returns int64 (x, y) of shape (batch_size, seq_len) with y = x shifted by one token.
        """
        self._check(seq_len)
        rng = np.random.default_rng([seed, step, rank])
        starts = rng.integers(0, len(self) - seq_len, size=batch_size)
        return self._windows(starts, seq_len)

    def _windows(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        buf = np.stack([self.tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
        if buf.size and int(buf.max()) >= self.index["vocab_size"]:  # else an IndexError inside the model
            raise SlmforgeError(f"{self.dir / self.index['splits'][self.split]['file']}: token id {int(buf.max())}, "
                                f"but index.json's vocab_size is {self.index['vocab_size']} (a damaged pack: "
                                f"pack again)")
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def iter_eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None,
                          rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed, non-overlapping windows from the start of the split (the same every evaluation).

        With several ranks, batch i goes to rank i % world_size. A split shorter than one window
        gives a single shorter window rather than nothing.
        """
        if len(self) < 2:
            return
        seq_len = min(seq_len, len(self) - 1)
        n_windows = (len(self) - 1) // seq_len
        n_batches = -(-n_windows // batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(rank, n_batches, world_size):
            starts = np.arange(b * batch_size, min((b + 1) * batch_size, n_windows)) * seq_len
            yield self._windows(starts, seq_len)
