"""Progress of long operations: :class:`ProgressEvent`, what a ``progress=`` callback gets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    """Where a long operation (a template build, …) is. Events come in order; ``done`` never
    decreases, and the last event has ``finished=True`` and ``done == total``."""

    stage: str
    """What it is doing now, in a few words (``"run step 2: import pandas"``)."""
    done: int
    """How much of the whole operation is done, in ``unit``."""
    total: int | None
    """How much there is in all, when known."""
    unit: str
    """``"steps"``, ``"bytes"`` or ``"chunks"``."""
    finished: bool
    """Whether this is the operation's last event."""


ProgressCallback = Callable[[ProgressEvent], object]


def _native_progress(
    progress: ProgressCallback | None,
) -> Callable[[str, int, int | None, str, bool], None] | None:
    """The callback the native module calls, as a call of ``progress`` with an event."""
    if progress is None:
        return None
    if not callable(progress):
        raise TypeError(f"progress must be callable, not {type(progress).__name__}")

    def call(stage: str, done: int, total: int | None, unit: str, finished: bool) -> None:
        progress(ProgressEvent(stage, done, total, unit, finished))

    return call
