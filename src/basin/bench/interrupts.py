"""Ctrl-C at safe points: a storage write is never cut in half.

``KeyboardInterrupt`` is raised between any two bytecodes, so a Ctrl-C can land inside a
database call, between a write and its commit. The connection is then left holding SQLite's
write lock and the clean-up that follows (failing and re-queueing the running trial, freeing
a lease) waits on that lock. :func:`hold` defers a first Ctrl-C to the end of its block (a
second one raises at once, so a block stuck on a lock can still be left); :func:`allow`
marks a region inside a held one, such as training, where Ctrl-C raises at once as usual.

Only the main thread receives signals: off it, and while a handler other than Python's
default one is installed (the user's own, or SIGINT ignored), both blocks change nothing."""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, ParamSpec, TypeVar

__all__ = ["allow", "held", "hold"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

_modes: list[bool] = []  # innermost last: True holds Ctrl-C, False lets it through
_pending = False
_previous: Any = None


def _handler(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _modes and _modes[-1] and not _pending:
        _pending = True  # raised where the held block ends
        return
    _pending = False
    raise KeyboardInterrupt


class _Mode:
    def __init__(self, holds: bool) -> None:
        self.holds = holds
        self.active = False

    def __enter__(self) -> None:
        global _previous, _pending
        if threading.current_thread() is not threading.main_thread():
            return
        if not _modes:
            if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                return
            _previous = signal.signal(signal.SIGINT, _handler)
        if not self.holds and _pending:  # held earlier: raise here, as if it came now
            _pending = False  # (only a held block sets it, so _modes is not empty here)
            raise KeyboardInterrupt
        _modes.append(self.holds)
        self.active = True

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        global _pending
        if not self.active:
            return
        self.active = False
        _modes.pop()
        if _modes and _modes[-1]:
            return  # still held: a pending Ctrl-C waits for the enclosing block
        if not _modes:
            signal.signal(signal.SIGINT, _previous)
        if _pending:
            _pending = False
            if not isinstance(exc, KeyboardInterrupt):
                raise KeyboardInterrupt


def hold() -> _Mode:
    """A block in which a first Ctrl-C is held until the block ends (or the next
    :func:`allow` region inside it starts); a second one raises at once."""
    return _Mode(True)


def allow() -> _Mode:
    """A region inside a :func:`hold` block where Ctrl-C raises at once (one held before
    raises on entry)."""
    return _Mode(False)


def held(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` run inside a :func:`hold` block (a fresh one per call)."""

    @functools.wraps(fn)
    def run_held(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with hold():
            return fn(*args, **kwargs)

    return run_held
