"""Ctrl-C and SIGTERM: finish the unit of work in hand, keep it, and exit with one line saying how to resume.

The trainer core has its own handler (train/loop.py: the step in hand, a checkpoint, then
TrainingInterrupted). Stages that work in other units use StopRequest: synth stops after the batch of rows
it is writing, data curation after the shard in hand. Inside `with StopRequest() as stop:` the first
SIGINT or SIGTERM only sets `stop.requested`; the stage calls `stop.check(...)` where its files are whole,
which raises Interrupted (a SlmforgeError: the CLI prints one line and exits 1). A second signal raises
KeyboardInterrupt at once, for a user who will not wait; what was written is whole then too, since every
write is atomic or cut back on resume.

Everywhere else the CLI makes SIGTERM raise KeyboardInterrupt, as Ctrl-C does (sigterm_as_interrupt): by
default SIGTERM ends Python on the spot, so `finally` blocks that remove temp files would never run.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from slmforge.errors import SlmforgeError


class Interrupted(SlmforgeError):
    """Stopped by SIGINT/SIGTERM between units of work: what is written is whole; re-running resumes."""


class StopRequest:
    """SIGINT/SIGTERM set `requested` (the signal's name); `check()` raises Interrupted where the caller's
    files are whole. Signals reach only the main thread, so elsewhere this never fires (and installs nothing)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def check(self, progress: str) -> None:
        """Raise Interrupted if a stop was asked for. `progress` says what is saved, e.g. "3 of 9 shards
        written"; the message adds how to resume."""
        if self.requested:
            raise Interrupted(f"interrupted by {self.requested}: {progress}; run the same command again to resume")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within it, SIGTERM raises KeyboardInterrupt (where no StopRequest or trainer handler has taken it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt
