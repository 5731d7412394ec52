"""Ctrl-C while the command line starts: held until the heavy imports are done, then acted on.

An interrupt that lands while torch initialises its C++ extension is raised inside a pybind11 callback that
cannot hand it on, and the process aborts (SIGABRT: "terminate called after throwing an instance of
'pybind11::error_already_set'") instead of exiting 130 with one line. So the command line notes SIGINT from its
first line until torch is imported (:func:`hold`), then restores the handler it found and reports whether one
came (:func:`release`). Standard library only: this module is imported before anything heavy.
"""

from __future__ import annotations

import signal
from typing import Any

_held: list[Any] = []  # the handler found by hold(), while holding
_came = False


def _note(signum: int, frame: Any) -> None:
    global _came
    _came = True


def hold() -> None:
    """Note SIGINT instead of raising it. A process started with SIGINT ignored (a background job) keeps
    ignoring it."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN or _held:
        return
    _held.append(previous)
    signal.signal(signal.SIGINT, _note)


def release() -> bool:
    """Give SIGINT back to the handler :func:`hold` found; True when one came while held (a no-op returning
    False when nothing is held, as for a command called in-process)."""
    if not _held:
        return False
    signal.signal(signal.SIGINT, _held.pop())
    return _came
