"""Small file helpers shared by every stage: atomic writes and JSONL reading with clear errors."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from slmforge.errors import SlmforgeError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SlmforgeError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlmforgeError(f"{path}: invalid JSON ({e})") from None


def read_jsonl_lines(path: str | Path, skip_bad: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line number, dict) per non-blank line; a broken line is an error naming file and line (or
    skipped)."""
    path = Path(path)
    if not path.is_file():
        raise SlmforgeError(f"{path}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                if skip_bad:
                    continue
                raise SlmforgeError(f"{path}:{lineno}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if skip_bad:
                    continue
                raise SlmforgeError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                if skip_bad:
                    continue
                raise SlmforgeError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, obj


def read_jsonl(path: str | Path, skip_bad: bool = False) -> Iterator[dict]:
    """Yield one dict per non-blank line; a broken line is an error naming file and line (or skipped)."""
    for _, obj in read_jsonl_lines(path, skip_bad):
        yield obj


def swap_dir_into_place(tmp: str | Path, out: str | Path) -> None:
    """Replace folder `out` by the finished folder `tmp` (same parent): readers see the old or the new
    folder, never a half-written one."""
    tmp, out = Path(tmp), Path(out)
    if out.exists() and not out.is_dir():
        raise SlmforgeError(f"{out}: exists and is not a directory")
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
