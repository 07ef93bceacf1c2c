"""Reading raw corpora into one stream of documents, and writing them as JSONL shards.

    text      .txt .md (.gz): a document per blank-line separated paragraph, per line, or per file
    JSONL     .jsonl .ndjson (.gz): the `text_field` of each object; other fields are kept as metadata
    CSV/TSV   .csv .tsv (.gz): the `text_field` column; other columns are kept as metadata
    Parquet   .parquet: the `text_field` column, read one record batch at a time
    HF        a folder written by `datasets.Dataset.save_to_disk` (or DatasetDict: every split)

Every document is a dict {"text": ..., **metadata, "source": "<file>:<where>"}, where <where> is the
1-based line for text, JSONL and CSV files and the 0-based row for Parquet and HF datasets (what
`table[i]` takes). Text is normalised (normalize_text) and empty documents are dropped and counted.
Reading streams: memory stays constant whatever the corpus size.

    out_dir/
      part-00000.jsonl, ...   shard_docs documents each, one JSON object a line
      stats.json              counts and the inputs/options that produced them (written last)
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slmforge.errors import SlmforgeError
from slmforge.io import check_out_dir, parse_json, read_json, write_json

SPLITS = ("paragraph", "line", "file")
NORMAL_FORMS = ("NFC", "NFKC", "none")
ON_ERROR = ("fail", "skip")
MAX_REASONS = 10  # skip reasons kept in the stats, for the report

_TEXT = (".txt", ".md")
_JSONL = (".jsonl", ".ndjson")
_TABLE = (".csv", ".tsv")
_SUFFIXES = (*_TEXT, *_JSONL, *_TABLE, *(s + ".gz" for s in (*_TEXT, *_JSONL, *_TABLE)), ".parquet")


@dataclass
class IngestStats:
    files: int = 0
    docs: int = 0
    bytes: int = 0  # input bytes read so far (what the progress bar shows)
    chars: int = 0  # characters of the documents yielded, after normalisation
    empty: int = 0  # documents dropped because nothing was left after normalisation
    skipped: int = 0  # broken lines (or unreadable files) passed over with on_error="skip"
    skip_reasons: list[str] = field(default_factory=list)  # the first MAX_REASONS of them
    shards: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Normalisation

# C0 and C1 control characters except \t and \n (\r is turned into \n first).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)


def normalize_text(text: str, form: str = "NFC") -> str:
    """Unicode NFC (or NFKC, or "none"), \\r\\n and \\r as \\n, control characters other than \\n and \\t
    removed, trailing whitespace removed from every line, blank lines at either end removed."""
    if form != "none" and not text.isascii():  # ASCII is already in every normal form
        text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("", text)
    return text.strip("\n")


# ---------------------------------------------------------------------------------------------------------
# Finding inputs


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def find_inputs(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Files named directly, HF dataset folders, and corpus files found (sorted) under other folders.
    A path that does not exist is always an error: it is a typo, not bad data to skip."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    for p in map(Path, paths):
        if is_hf_dataset_dir(p):
            found.append(p)
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(_SUFFIXES))
            if not files:
                raise SlmforgeError(f"{p}: no corpus files in this folder (*.txt, *.md, *.jsonl, *.csv, *.tsv, "
                                    f"optionally .gz, *.parquet, or a datasets save_to_disk folder)")
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            raise SlmforgeError(f"{p}: no such file")
    return found


def input_size(path: Path) -> int:
    """Bytes of an input (all files of an HF dataset folder), for progress."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------------------
# Reading


class _Reader:
    """Reads one input: yields (where, record dict) pairs and reports problems per on_error."""

    def __init__(self, path: Path, text_field: str, split: str, on_error: str, stats: IngestStats):
        self.path, self.text_field, self.split, self.on_error, self.stats = path, text_field, split, on_error, stats

    def problem(self, where: str, msg: str) -> None:
        """A broken line or file: raise, or count it and go on."""
        reason = f"{self.path}{where}: {msg}"
        if self.on_error == "fail":
            raise SlmforgeError(reason)
        self.stats.skipped += 1
        if len(self.stats.skip_reasons) < MAX_REASONS:
            self.stats.skip_reasons.append(reason)

    def records(self) -> Iterator[tuple[str, dict]]:
        name = self.path.name.removesuffix(".gz")
        if self.path.is_dir():
            yield from self.hf_dataset()
        elif name.endswith(".parquet"):
            yield from self.parquet()
        elif name.endswith(_JSONL):
            yield from self.jsonl()
        elif name.endswith(_TABLE):
            yield from self.table(delimiter="\t" if name.endswith(".tsv") else ",")
        elif name.endswith(".json"):
            raise SlmforgeError(f"{self.path}: a .json file is not streamable; convert it to JSONL "
                                f"(one object a line)")
        else:  # anything else is read as plain text
            yield from self.text()

    def lines(self) -> Iterator[tuple[int, str]]:
        """(line number, decoded line with its newline); a line that is not UTF-8 is a problem."""
        gz = self.path.name.endswith(".gz")
        try:
            raw = open(self.path, "rb")
        except OSError as e:
            self.problem("", f"cannot read ({e.strerror})")
            return
        with raw:
            f = gzip.GzipFile(fileobj=raw) if gz else raw
            last = 0
            try:
                for lineno, b in enumerate(f, 1):
                    self.stats.bytes += raw.tell() - last if gz else len(b)
                    last = raw.tell() if gz else 0
                    try:
                        line = b.decode("utf-8-sig" if lineno == 1 else "utf-8")  # -sig: drop a leading BOM
                    except UnicodeDecodeError as e:
                        self.problem(f":{lineno}", f"not valid UTF-8 (byte {e.start} of the line)")
                        continue
                    yield lineno, line
            except (OSError, EOFError, zlib.error) as e:  # gzip: truncated, corrupt, or not gzip at all
                self.problem("", f"cannot read ({_one_line(e)})")

    def text(self) -> Iterator[tuple[str, dict]]:
        if self.split == "line":
            for lineno, line in self.lines():
                yield f":{lineno}", {self.text_field: line}
            return
        if self.split == "file":
            parts = [line for _, line in self.lines()]
            yield ":1", {self.text_field: "".join(parts)}
            return
        # Paragraphs: a run of non-blank lines; its source is its first line.
        buf: list[str] = []
        start = 0
        for lineno, line in self.lines():
            if line.strip():
                if not buf:
                    start = lineno
                buf.append(line)
            elif buf:
                yield f":{start}", {self.text_field: "".join(buf)}
                buf = []
        if buf:
            yield f":{start}", {self.text_field: "".join(buf)}

    def jsonl(self) -> Iterator[tuple[str, dict]]:
        for lineno, line in self.lines():
            if not line.strip():
                continue
            try:
                obj = parse_json(line, where=False)
            except ValueError as e:
                self.problem(f":{lineno}", f"invalid JSON ({e})")
                continue
            if not isinstance(obj, dict):
                self.problem(f":{lineno}", f"expected a JSON object, got {type(obj).__name__}")
                continue
            if self.text_field not in obj:
                keys = _names(list(obj)[:8]) or "none"
                self.problem(f":{lineno}", f"no field {self.text_field!r} (fields: {keys}); "
                                           f"choose the text field with --text-field")
                continue
            yield f":{lineno}", obj

    def table(self, delimiter: str) -> Iterator[tuple[str, dict]]:
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents in one cell are the point
        at = [0]

        def lines() -> Iterator[str]:
            for lineno, line in self.lines():
                at[0] = lineno
                yield line

        # TSV files rarely quote, and a stray " at the start of a cell would swallow the lines after it.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(lines(), delimiter=delimiter, quoting=quoting)
        try:
            header = next(reader, None)
        except csv.Error as e:  # e.g. a lone \r inside the header line
            self.problem(":1", f"bad CSV header ({e})")
            return
        if header is None:
            return
        if self.text_field not in header:
            self.problem(":1", f"no column {self.text_field!r} (columns: {_names(header)}); "
                               f"choose the text column with --text-field")
            return
        while True:
            start = at[0] + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                self.problem(f":{start}", f"bad CSV ({e})")
                continue
            if not row:  # a blank line
                continue
            if len(row) != len(header):
                self.problem(f":{start}", f"{len(row)} cells, but the header has {len(header)}")
                continue
            yield f":{start}", dict(zip(header, row, strict=True))

    def parquet(self) -> Iterator[tuple[str, dict]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # A damaged file fails in pyarrow as OSError or ArrowException, or as UnicodeDecodeError where a name or
        # a string value is not UTF-8; from the footer (here) or from a page (below).
        broken = (OSError, pa.ArrowException, UnicodeDecodeError)
        try:
            pf = pq.ParquetFile(self.path)
            columns, n_rows = pf.schema_arrow.names, pf.metadata.num_rows
        except broken as e:
            self.problem("", f"cannot read as Parquet ({_one_line(e)})")
            return
        if self.text_field not in columns:
            self.problem("", f"no column {self.text_field!r} (columns: {_names(columns)}); "
                             f"choose the text column with --text-field")
            return
        size, rows = self.path.stat().st_size, max(n_rows, 1)
        row = 0
        batches = pf.iter_batches(batch_size=1024)  # one batch in memory at a time
        while True:
            try:
                batch = next(batches, None)
                records = batch.to_pylist() if batch is not None else []
            except broken as e:  # a corrupt page or column chunk
                self.problem(f":{row}", f"cannot read as Parquet ({_one_line(e)})")
                return
            if batch is None:
                return
            for rec in records:
                where = f":{row}"
                row += 1
                try:
                    yield where, {k: _json_value(v, k) for k, v in rec.items()}
                except _NotJSON as e:
                    self.problem(where, f"column {e.args[0]!r} holds {e.args[1]}, which a JSONL shard cannot "
                                        f"keep (drop the column, or cast it to text)")
            self.stats.bytes += size * batch.num_rows // rows

    def hf_dataset(self) -> Iterator[tuple[str, dict]]:
        try:
            import datasets
        except ImportError:
            raise SlmforgeError(f"{self.path}: reading a datasets folder needs the `datasets` package "
                                f"(pip install 'slmforge[hf]')") from None
        try:
            loaded = datasets.load_from_disk(str(self.path))
        except (OSError, ValueError, FileNotFoundError) as e:
            self.problem("", f"cannot load with datasets.load_from_disk ({_one_line(e)})")
            return
        parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
        size = input_size(self.path)
        total = max(sum(len(ds) for _, ds in parts), 1)
        for split_name, ds in parts:
            if self.text_field not in ds.column_names:
                self.problem(f"/{split_name}" if split_name else "",
                             f"no column {self.text_field!r} (columns: {_names(ds.column_names)}); "
                             f"choose the text column with --text-field")
                continue
            prefix = f"/{split_name}:" if split_name else ":"
            for i, rec in enumerate(ds):  # Arrow memory-maps the data: iterating does not load it all
                yield f"{prefix}{i}", rec
                if i % 1024 == 1023:
                    self.stats.bytes += size * 1024 // total


class _NotJSON(Exception):
    pass


def _one_line(e: object) -> str:
    """An error's text on one line (the CLI prints `error: ...` as one line; pyarrow's run over several)."""
    return " ".join(str(e).split())


def _names(names: Iterable) -> str:
    """Field or column names for a message: as they are, or quoted where they hold a newline or the like."""
    return ", ".join(n if isinstance(n, str) and n.isprintable() else repr(n) for n in names)


def _json_value(v, column: str | None = None):
    """A Parquet value as JSON can hold it: dates, times and decimals as their ISO/decimal text (what they
    print as); bytes raise _NotJSON (there is no text to give them without guessing an encoding)."""
    import datetime
    import decimal

    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, (decimal.Decimal, datetime.timedelta)):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_value(x, column) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x, column) for x in v]
    raise _NotJSON(column, type(v).__name__)


def iter_documents(
    paths: str | Path | Iterable[str | Path],
    text_field: str = "text",
    split: str = "paragraph",
    normalize: str = "NFC",
    on_error: str = "fail",
    stats: IngestStats | None = None,
) -> Iterator[dict]:
    """Stream documents {"text", **metadata, "source"} from files and folders (see the module docstring).

    split: how plain-text files become documents ("paragraph", "line" or "file"). normalize: "NFC",
    "NFKC" or "none" (see normalize_text). on_error: "fail" raises SlmforgeError naming file:line for a
    broken line or an unreadable file; "skip" counts it in `stats` and goes on.
    """
    if split not in SPLITS:
        raise SlmforgeError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if normalize not in NORMAL_FORMS:
        raise SlmforgeError(f"unknown normal form {normalize!r}; choose one of {', '.join(NORMAL_FORMS)}")
    if on_error not in ON_ERROR:
        raise SlmforgeError(f"unknown on_error {on_error!r}; choose one of {', '.join(ON_ERROR)}")
    stats = stats if stats is not None else IngestStats()
    for path in find_inputs(paths):
        stats.files += 1
        reader = _Reader(path, text_field, split, on_error, stats)
        for where, rec in reader.records():
            text = rec.get(text_field)
            if text is not None and not isinstance(text, str):
                reader.problem(where, f"field {text_field!r} is {type(text).__name__}, not a string")
                continue
            text = normalize_text(text or "", normalize)
            if not text:
                stats.empty += 1
                continue
            # "text" comes first for readable shards; a different text_field replaces any "text" column.
            doc = {"text": text, **{k: v for k, v in rec.items() if k not in (text_field, "text")}}
            doc.setdefault("source", f"{path}{where}")
            stats.docs += 1
            stats.chars += len(text)
            yield doc


# ---------------------------------------------------------------------------------------------------------
# Writing shards


def _fingerprint(files: list[Path], opts: dict) -> dict:
    """What a finished out_dir was made from: the same fingerprint means there is nothing to redo."""
    inputs = []
    for f in files:
        st = f.stat()
        inputs.append({"path": str(f.resolve()), "bytes": input_size(f), "mtime_ns": st.st_mtime_ns})
    return json.loads(json.dumps({"inputs": inputs, "options": opts}, default=str))  # as stats.json has it


def ingest(
    paths: str | Path | Iterable[str | Path],
    out_dir: str | Path,
    shard_docs: int = 50_000,
    progress: bool = True,
    **opts,
) -> IngestStats:
    """Read `paths` (iter_documents options in `opts`) into out_dir/part-NNNNN.jsonl shards.

    Shards are written under out_dir/.partial/ and moved into place at the end, stats.json last: a
    folder with a stats.json is complete, and an interrupted run leaves no shard visible (the next run
    starts over). Running again with the same inputs and options reads stats.json and does nothing.
    """
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    if shard_docs < 1:
        raise SlmforgeError(f"shard_docs must be >= 1, got {shard_docs}")
    files = find_inputs(paths)
    out = Path(out_dir)
    check_out_dir(out)
    opts = {"text_field": "text", "split": "paragraph", "normalize": "NFC", "on_error": "fail", **opts}
    fingerprint = _fingerprint(files, {**opts, "shard_docs": shard_docs})
    if (out / "stats.json").is_file():
        done = read_json(out / "stats.json")
        if done.get("fingerprint") == fingerprint:
            known = set(IngestStats.__dataclass_fields__)
            return IngestStats(**{k: v for k, v in done.items() if k in known})

    partial = out / ".partial"
    created = not out.exists()  # a failed first run leaves no empty output folder behind
    shutil.rmtree(partial, ignore_errors=True)  # left over from an interrupted run
    partial.mkdir(parents=True)
    stats = IngestStats()
    t0 = time.time()
    bar = Progress(TextColumn("ingest"), BarColumn(), DownloadColumn(),
                   TextColumn("{task.fields[docs]:,} docs"), TimeRemainingColumn(),
                   console=Console(stderr=True), disable=not progress)
    writer = _ShardWriter(partial, shard_docs)
    try:
        with bar:
            task = bar.add_task("ingest", total=sum(input_size(p) for p in files), docs=0)
            for doc in iter_documents(files, stats=stats, **opts):
                writer.add(doc)
                if stats.docs % 1000 == 0:
                    bar.update(task, completed=stats.bytes, docs=stats.docs)
            writer.close()
            bar.update(task, completed=stats.bytes, docs=stats.docs)
        stats.shards, stats.seconds = writer.shards, round(time.time() - t0, 3)
        # Swap in the new shards: first unmark the folder as complete, then drop old shards.
        (out / "stats.json").unlink(missing_ok=True)
        for old in out.glob("part-*.jsonl"):
            old.unlink()
        for shard in sorted(partial.glob("part-*.jsonl")):
            os.replace(shard, out / shard.name)
        write_json(out / "stats.json", {**stats.to_dict(), "fingerprint": fingerprint})
    finally:
        writer.abort()
        shutil.rmtree(partial, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    return stats


class _ShardWriter:
    """JSONL shards of n documents: each written to a temp file, fsynced, then renamed part-NNNNN.jsonl."""

    def __init__(self, folder: Path, n: int):
        self.folder, self.n = folder, n
        self.shards = self.in_shard = 0
        self.f, self.tmp = None, ""

    def add(self, doc: dict) -> None:
        if self.f is None:
            fd, self.tmp = tempfile.mkstemp(prefix=".shard.", suffix=".tmp", dir=self.folder)
            self.f = os.fdopen(fd, "w", encoding="utf-8")
        self.f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        self.in_shard += 1
        if self.in_shard == self.n:
            self.close()

    def close(self) -> None:
        if self.f is None:
            return
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.folder / f"part-{self.shards:05d}.jsonl")
        self.f, self.shards, self.in_shard = None, self.shards + 1, 0

    def abort(self) -> None:
        if self.f is not None:
            f, self.f = self.f, None
            try:
                f.close()
            except OSError:  # a full disk: closing flushes the buffer, and fails, again
                pass
