"""Stopping a training cleanly on SIGINT (Ctrl-C) or SIGTERM.

:class:`StopSignals` turns the first signal into a request that the trainer honours between iterations (it writes
``checkpoints/last`` and raises :class:`TrainingInterrupted`); a second signal aborts at once with
``KeyboardInterrupt``. Data-loader workers ignore both signals (:func:`e2edet.data.loader.seed_worker`).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["StopSignals", "TrainingInterrupted"]


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT (Ctrl-C) or SIGTERM after writing ``checkpoints/last`` of the current iteration.

    ``str(exc)`` is the one-line message for the user (where the checkpoint is and how to resume); the command
    line exits with :attr:`exit_code` (130, the shell's code for an interrupted command).
    """

    exit_code = 130


class StopSignals:
    """Context manager: while inside, SIGINT/SIGTERM set :attr:`requested` (the signal number) instead of
    interrupting; a second signal raises ``KeyboardInterrupt``. The previous handlers are restored on exit.

    Handlers can only be installed from the main thread; elsewhere the block runs with the usual handlers.

    Args:
        notice: called with the signal number on the first signal; returns a line printed to stderr (or ``None``).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, notice: Callable[[int], str | None] | None = None) -> None:
        self.notice = notice
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:  # second signal: abort now, without a checkpoint
            raise KeyboardInterrupt
        self.requested = signum
        line = self.notice(signum) if self.notice is not None else None
        if line:
            print(line, file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        self.requested = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, old in self._previous.items():
            signal.signal(signum, old)
        self._previous = {}
