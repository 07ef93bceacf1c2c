"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""

from collections.abc import Iterator
from contextlib import contextmanager


class SlmforgeError(Exception):
    """A problem with the user's input (a file, a flag, a config field), not a bug in slmforge."""


class ConfigError(SlmforgeError, ValueError):
    """A stage config's own check failed. A ValueError too, so that pydantic, validating a recipe, reports it
    at the config's place in the YAML file (stage_config.build)."""


class FieldError(SlmforgeError):
    """A config field with a bad value. `loc` is the field's path (keys and list indexes), so that a loader
    can put the file and line in front of the message."""

    def __init__(self, loc: tuple, msg: str):
        self.loc, self.msg = tuple(loc), msg
        super().__init__(f"{format_loc(self.loc)}: {msg}")


def first_line(e: BaseException) -> str:
    """An exception's first line for a one-line error, or its type where it has no message (MemoryError)."""
    return (str(e).splitlines() or [type(e).__name__])[0]


def format_loc(loc: tuple) -> str:
    """("stages", 0, "dedup", "threshold") -> "stages[0].dedup.threshold"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def check_types(values: dict, hints: dict, loc: tuple = ()) -> None:
    """Check each value against its type hint as JSON/YAML data, strictly: "192" is not an integer and
    1 is not a boolean, but 1 is a number and a list is a tuple. Raises FieldError for the first bad one.

    pydantic does the checking; values are round-tripped through JSON because pydantic's strict mode for
    Python objects wants tuples as tuples and dataclasses as instances, while its JSON mode has exactly the
    rules a config file needs."""
    import json

    from pydantic import ValidationError

    for key, value in values.items():
        if key not in hints:
            continue
        try:
            _adapter(hints[key]).validate_json(json.dumps(value, default=str), strict=True)
        except ValidationError:
            raise FieldError((*loc, key), f"expected {describe_type(hints[key])}, got {_show(value)}") from None


def describe_type(tp) -> str:
    """int -> "an integer", float | None -> "a number or null", list[str] -> "a list of strings"."""
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        return f"a list of {_PLURAL.get(inner[0], 'values')}" if len(set(inner)) == 1 else "a list"
    return _WORDS.get(origin or tp, getattr(tp, "__name__", str(tp)))


_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
          list: "a list", tuple: "a list", type(None): "null"}
_PLURAL = {int: "integers", float: "numbers", bool: "booleans", str: "strings", dict: "mappings"}


def _show(value) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _adapter(tp):
    from pydantic import TypeAdapter

    if tp not in _ADAPTERS:
        _ADAPTERS[tp] = TypeAdapter(tp)
    return _ADAPTERS[tp]


_ADAPTERS: dict = {}


# --- the user's disk and paths --------------------------------------------------------------------------------
#
# An OSError with one of these errnos is the user's to fix (a full disk, a read-only or unwritable output, a file
# where a folder should be, a missing input, no network), so the CLI prints it as one line. Any other errno
# (EBADF, EINVAL, ...) is a bug in slmforge and keeps its traceback.

def _errnos(*names: str) -> frozenset[int]:
    import errno

    return frozenset(getattr(errno, n) for n in names if hasattr(errno, n))  # (EDQUOT is not on every OS)


WRITE_ERRNOS = _errnos("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "ENOTDIR", "EISDIR", "EIO")
USER_ERRNOS = WRITE_ERRNOS | _errnos("ENOENT", "EEXIST", "ENAMETOOLONG", "ELOOP", "ENOTEMPTY", "EMFILE", "ENFILE",
                                     "EBUSY", "ETXTBSY", "EXDEV", "ENXIO", "ENODEV")


def os_error_behind(exc: BaseException | None, errnos: frozenset[int] = USER_ERRNOS) -> OSError | None:
    """The OSError with an errno in `errnos` that `exc` is, or was raised from or while handling; None if none.

    Libraries wrap them: torch.save turns a full disk into a RuntimeError raised while handling the OSError, and
    safetensors raises SafetensorError("... (os error 28)") with no OSError at all (its errno is read from the
    message). Connection errors and timeouts (the network) count as the user's too."""
    import os
    import re

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and (exc.errno in errnos or isinstance(exc, (ConnectionError, TimeoutError))):
            return exc
        if type(exc).__name__ == "SafetensorError":
            m = re.search(r"\(os error (\d+)\)", str(exc))
            if m and int(m.group(1)) in errnos:
                return OSError(int(m.group(1)), os.strerror(int(m.group(1))))
        exc = exc.__cause__ or exc.__context__
    return None


def describe_os_error(e: OSError, path: object = None) -> str:
    """"PATH: reason" for an OSError, naming the file it names, else `path` (a failed write() names no file:
    the caller says what it was writing); just the reason when neither is known."""
    reason = e.strerror or str(e)
    where = e.filename if e.filename is not None else path
    return f"{where}: {reason}" if where is not None else reason


@contextmanager
def writes_into(out: object) -> Iterator[None]:
    """Around code that writes under `out`: a user's OSError (os_error_behind) becomes one SlmforgeError naming
    the file, or `out` when the error names none, so the CLI prints one line and no traceback."""
    try:
        yield
    except SlmforgeError:
        raise
    except Exception as e:
        err = os_error_behind(e)
        if err is None:
            raise
        raise SlmforgeError(describe_os_error(err, out)) from None
