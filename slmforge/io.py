"""Small file helpers shared by every stage: atomic writes and JSONL reading with clear errors."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from slmforge.errors import SlmforgeError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file.
    Errors name `path`, never the temp file (which the user does not know of)."""
    path = Path(path)
    if path.is_dir():
        raise SlmforgeError(f"{path}: is a directory (expected a file path)")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; a written file gets the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)  # the rename itself is durable only once the folder is
    except OSError as e:
        raise SlmforgeError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def fsync_dir(path: str | Path) -> None:
    """fsync a folder, so that renames and new files in it survive a power cut (a no-op where the OS or
    the filesystem cannot fsync folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under root, deepest first: a finished folder, before it is renamed into
    place, so that a crash cannot leave the new name pointing at data still only in the page cache."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            p = os.path.join(folder, name)
            if not os.path.islink(p):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(folder)


def check_out_dir(path: str | Path) -> bool:
    """Check an output folder before any work: an existing file there is an error naming it. Returns
    whether the folder is still to be created (so a failed run can remove it again: remove_if_empty)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SlmforgeError(f"{path}: exists and is not a directory (the output is a folder)")
    for parent in path.parents:  # mkdir would fail on a file half-way up with a less clear message
        if parent.exists():
            if not parent.is_dir():
                raise SlmforgeError(f"{parent}: is a file, so {path} cannot be created")
            break
    return not path.exists()


def check_out_file(path: str | Path) -> None:
    """Check an output file's path before any work: a folder there is an error naming it."""
    if Path(path).is_dir():
        raise SlmforgeError(f"{path}: is a directory (expected a file path)")


def remove_if_empty(path: str | Path, created: bool) -> None:
    """After a failure: remove the output folder this run created, if nothing is in it."""
    path = Path(path)
    if created and path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def file_sha256(path: str | Path, chars: int = 16) -> str:
    """The first `chars` hex digits of a file's SHA-256 (provenance and cache keys)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:chars]


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def parse_json(text: str | bytes, where: bool = True):
    """json.loads for a user's file: anything it cannot read is a ValueError with a short reason (and, with
    `where`, its line and column). json.loads itself raises RecursionError for deeply nested arrays and a
    plain ValueError for an integer of more than 4300 digits (Python's int_max_str_digits), neither of which
    a reader's `except JSONDecodeError` catches."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{e.msg}: line {e.lineno} column {e.colno}" if where else e.msg) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as e:  # an integer too long to convert
        raise ValueError(str(e).split(";")[0]) from None


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SlmforgeError(f"{path}: missing")
    try:
        return parse_json(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SlmforgeError(f"{path}: invalid JSON (not UTF-8 at byte {e.start})") from None
    except ValueError as e:
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
                obj = parse_json(line, where=False)
            except ValueError as e:
                if skip_bad:
                    continue
                raise SlmforgeError(f"{path}:{lineno}: invalid JSON ({e})") from None
            if not isinstance(obj, dict):
                if skip_bad:
                    continue
                raise SlmforgeError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, obj


def read_jsonl(path: str | Path, skip_bad: bool = False) -> Iterator[dict]:
    """Yield one dict per non-blank line; a broken line is an error naming file and line (or skipped)."""
    for _, obj in read_jsonl_lines(path, skip_bad):
        yield obj


def write_dir_atomically(out: str | Path, fill) -> Path:
    """fill(staging) writes a new folder beside `out` (a unique temp folder in the same parent), which then
    replaces `out` whole (swap_dir_into_place); on any failure the staging folder is removed and `out` is as
    it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_dir_swap(out)  # (a swap a crash cut short may need its staging folder: finish it first)
    for stale in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
        if stale.is_dir():  # a staging folder a killed run was filling: only a writer of `out` makes these
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the finished folder gets the usual mode
    try:
        fill(tmp)
        swap_dir_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_journal(out: Path) -> Path:
    return out.with_name(f".{out.name}.swap.json")


def swap_dir_into_place(tmp: str | Path, out: str | Path) -> None:
    """Replace folder `out` by the finished folder `tmp` (same parent): readers see the old or the new
    folder, never a half-written one.

    Two renames (out -> backup, tmp -> out) are not one atomic step, so a journal beside `out` names both
    folders first; a crash between the renames leaves `out` missing, and `recover_dir_swap` (run here and
    when a model directory is opened) finishes the swap from the journal."""
    tmp, out = Path(tmp), Path(out)
    recover_dir_swap(out)
    if out.exists() and not out.is_dir():
        raise SlmforgeError(f"{out}: exists and is not a directory")
    fsync_tree(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        journal = _swap_journal(out)
        write_json(journal, {"new": tmp.name, "old": old.name})
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)  # an error, not a crash: put the old folder back at once
            journal.unlink(missing_ok=True)
            raise
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
        journal.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)


def recover_dir_swap(out: str | Path) -> bool:
    """Finish a directory swap that a crash interrupted (see swap_dir_into_place); True if there was one.

    The journal is written only once the new folder is complete, so the swap is rolled forward: the new
    folder takes `out`'s place while it is still there; else `out` already is the new folder (or, if it is
    missing too, the backup is put back)."""
    out = Path(out)
    journal = _swap_journal(out)
    if not journal.is_file():
        return False
    try:
        names = json.loads(journal.read_text(encoding="utf-8"))
        new, old = out.with_name(names["new"]), out.with_name(names["old"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not a journal of ours (ours are written atomically): leave it alone
    if new.is_dir():
        if out.is_dir() and not old.exists():
            os.replace(out, old)  # the crash came before the first rename
        if not out.exists():
            os.replace(new, out)
    elif not out.exists() and old.is_dir():
        os.replace(old, out)
    fsync_dir(out.parent)
    if out.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    journal.unlink(missing_ok=True)
    return True
