"""Ctrl-C and SIGTERM during the demo: one interrupt, then a clean-up nobody interrupts.

The demo starts a PostgreSQL, web servers and a migration, and must remove every one
of them however it ends. A second Ctrl-C during that clean-up (people press it
twice) must not abort it half-way, leaving a postmaster or a data directory behind.
So the first SIGINT or SIGTERM raises KeyboardInterrupt in the main thread and every
later one is ignored; and during the few moments where an interrupt would do harm
(initdb or the postmaster starting), it is held back until the step is done.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType, TracebackType
from typing import Any

__all__ = ["Interrupts"]


class Interrupts:
    """While active (a ``with`` block in the main thread), SIGINT and SIGTERM raise
    KeyboardInterrupt once; ``signum`` says which arrived first."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferring = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            return  # already interrupted: let the clean-up finish
        self.signum = signum
        if not self._deferring:
            raise KeyboardInterrupt

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def terminated(self) -> bool:
        """True when the interrupt was SIGTERM (exit 143) rather than Ctrl-C (130)."""
        return self.signum == signal.SIGTERM

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold an interrupt back until the block ends, then raise KeyboardInterrupt.

        For server start-up: interrupting initdb or the postmaster half-way makes its
        children die uncleanly, leaving shared memory behind. A failure inside the
        block after an interrupt (from a terminal, the server's processes get the
        signal too) is reported as the interrupt it is.
        """
        self._deferring += 1
        try:
            yield
        except Exception:
            if self.signum is not None:
                raise KeyboardInterrupt from None
            raise
        finally:
            self._deferring -= 1
        if self.signum is not None:
            raise KeyboardInterrupt
