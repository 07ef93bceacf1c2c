"""Fuzzing the files slmforge reads (issue 16): mutations of valid files, a hard deadline per example, the
check every reader must pass, and the example budget. Used by tests/test_fuzz_*.py; needs `hypothesis`.

The check: a reader given any bytes either reads them (and the result is usable) or raises SlmforgeError
whose message names the file; never another exception (a traceback in the CLI), never a hang.

Budget: `make test` runs few examples per test, derandomized (the same ones every run, so a shared suite is
not flaky); SLMFORGE_FUZZ=long (25x, random) or SLMFORGE_FUZZ=<factor> runs more: benchmarks/fuzz_long.sh.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from slmforge.errors import SlmforgeError

_MODE = os.environ.get("SLMFORGE_FUZZ", "")
LONG = bool(_MODE)
FACTOR = 25 if _MODE == "long" else int(_MODE) if _MODE.isdigit() else 1
DEADLINE_S = 30.0  # per example: generous for a loaded 2-core machine, far below "hung"


def fuzz_settings(examples: int) -> settings:
    """`examples` per test in the normal suite (the same ones each run), FACTOR times that and random with
    SLMFORGE_FUZZ set. hypothesis' own deadline is off: timings on a shared machine vary, and a real hang is
    caught by hard_deadline instead."""
    return settings(max_examples=examples * FACTOR, deadline=None, derandomize=not LONG, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])


def single_thread() -> Iterator[None]:
    """For a module-scoped fixture: torch on one thread while the module runs, then as it was. The examples
    are tiny, and with two threads on two shared cores oneDNN/MKL spin-wait: the decode fast path's first
    kernel timing (infer/fastpath.py) took 20 s instead of 1 when other work was running."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class Hang(BaseException):
    """An example ran past its deadline. A BaseException, so that no reader's `except Exception` turns a hang
    into a tidy error."""


@contextlib.contextmanager
def hard_deadline(seconds: float = DEADLINE_S) -> Iterator[None]:
    """Interrupt the body (from Python code: a loop, not one long C call) after `seconds`."""
    def fire(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def read_or_error(fn: Callable[[], Any], *names: str, seconds: float = DEADLINE_S) -> tuple[Any, str | None]:
    """(fn's result, None), or (None, the message) when fn raised SlmforgeError naming one of `names` (the
    file, or the folder it is in). Any other exception, or a hang, fails the example."""
    with hard_deadline(seconds):
        try:
            return fn(), None
        except SlmforgeError as e:
            msg = str(e)
            assert msg.strip(), "an empty error message"
            # the CLI prints `error: {msg}`: a newline in it (from quoted file content) would break the one line
            assert "\n" not in msg and "\r" not in msg, f"a message of several lines: {msg!r}"
            assert not names or any(n in msg for n in names), f"the error names none of {names}: {msg}"
            return None, msg


# ------------------------------------------------------------------------------------------- byte mutations

_INTERESTING = [0x00, 0xFF, 0x7F, 0x80, 0x0A, 0x22, 0x2C, 0x7B, 0x5B, 0x39, 0x2D, 0xC3]


def apply_ops(data: bytes, ops: list[tuple]) -> bytes:
    """The edits `mutated` draws, applied (also how an @example replays a shrunk failure)."""
    out = bytearray(data)
    for op, pos, arg in ops:
        pos = min(pos, len(out))
        if op == "flip" and pos < len(out):
            out[pos] ^= arg
        elif op == "set" and pos < len(out):
            out[pos] = arg
        elif op == "truncate":
            del out[pos:]
        elif op == "delete":
            del out[pos:pos + arg]
        elif op == "insert":
            out[pos:pos] = arg
        elif op == "repeat":
            out[pos:pos] = out[pos:pos + arg] * 3
    return bytes(out)


def mutated(data: bytes, max_ops: int = 4) -> st.SearchStrategy[bytes]:
    """A valid file's bytes with 1..max_ops edits: bit flips, interesting bytes (NUL, 0xFF, quotes, braces,
    digits, a UTF-8 lead byte), truncation, deleted, inserted or repeated runs."""
    pos = st.integers(0, max(len(data) - 1, 0))
    op = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(1, 255)),
        st.tuples(st.just("set"), pos, st.sampled_from(_INTERESTING)),
        st.tuples(st.just("truncate"), pos, st.just(0)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("repeat"), pos, st.integers(1, 64)),
    )
    return st.lists(op, min_size=1, max_size=max_ops).map(lambda ops: apply_ops(data, ops))


def file_bytes(valid: bytes) -> st.SearchStrategy[bytes]:
    """Mostly mutations of `valid`, sometimes random bytes or nothing at all."""
    return st.one_of(mutated(valid), mutated(valid), mutated(valid), st.binary(max_size=200), st.just(b""))


# -------------------------------------------------------------------------------------- value mutations

NASTY = [None, True, False, 0, -1, -(2**31), 2**31, 2**63, 10**30, 1.5, -0.5, math.nan, math.inf, -math.inf,
         1e308, "", "x", "192", "\n", "\x00", [], [1, "a"], {}, {"a": 1}]


def junk() -> st.SearchStrategy:
    """A value of the wrong type or an out-of-range one: nulls, booleans, huge and negative numbers, NaN and
    infinities, strings that look like numbers, empty and odd containers."""
    return st.one_of(st.sampled_from(NASTY), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
                     st.lists(st.integers(-3, 400), max_size=3))


def paths(obj: Any, prefix: tuple = (), depth: int = 4) -> list[tuple]:
    """Every place in a JSON-like value (keys and list indexes), parents before children; lists are sampled
    at their first and last item (a 300-row list has no more kinds of place than a 2-row one)."""
    out = [prefix] if prefix else []
    if depth == 0:
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k), depth - 1)
    elif isinstance(obj, list) and obj:
        for i in sorted({0, len(obj) - 1}):
            out += paths(obj[i], (*prefix, i), depth - 1)
    return out


def _edit(obj: Any, path: tuple, op: str, value: Any) -> Any:
    obj = json.loads(json.dumps(obj))  # a copy (the valid value is shared by every example)
    node = obj
    for key in path[:-1]:
        node = node[key]
    last = path[-1]
    if op == "delete":
        del node[last]
    elif op == "set":
        node[last] = value
    elif op == "wrap":  # the value one level deeper: a list where a scalar was, and so on
        node[last] = [node[last]]
    elif op == "add" and isinstance(node[last], dict):
        node[last]["unknown_field"] = value
    elif op == "add" and isinstance(node[last], list):
        node[last].append(value)
    return obj


def edited(obj: Any, max_edits: int = 2) -> st.SearchStrategy:
    """A JSON-like value (a parsed config, a row) with 1..max_edits edits: a field deleted, set to junk,
    wrapped in a list, or an unknown field or item added."""
    places = paths(obj)
    if not places:
        return st.just(obj)
    edit = st.tuples(st.sampled_from(places), st.sampled_from(["delete", "set", "set", "wrap", "add"]), junk())

    def apply(edits: list[tuple]) -> Any:
        out = obj
        for path, op, value in edits:
            try:
                out = _edit(out, path, op, value)
            except (KeyError, IndexError, TypeError):  # an earlier edit removed or replaced this place
                pass
        return out

    return st.lists(edit, min_size=1, max_size=max_edits).map(apply)


def deep(n: int = 3000) -> str:
    """A value nested n levels deep: what overflows a recursive parser's stack (Python's limit is 1000)."""
    return "[" * n + "]" * n
