"""How far long work got: pretraining epochs and sweep trials report here, and whoever listens
(the CLI's progress bars) hears it. Nothing listens by default."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Listener = Callable[[str, int, int], None]  # (what, completed, total)

_listeners: list[Listener] = []
_lock = threading.Lock()


def report(what: str, completed: int, total: int) -> None:
    """``completed`` of ``total`` units of ``what`` (e.g. "pretrain epochs") are done."""
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(what, completed, total)


def listened() -> bool:
    """Whether anyone listens: work that costs something to measure (a poll) can skip it."""
    with _lock:
        return bool(_listeners)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)
