"""One daemon thread per process that visits every pool.

A thread per pool would multiply with aliases and test databases; one thread is
enough because each visit is short (it never waits on the network: closing and
opening happen outside the pool lock, and opening happens on opener threads).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Pool

logger = logging.getLogger("connguard.pool")


class Housekeeper:
    """Calls :meth:`Pool.housekeep` on each registered pool at its interval."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pools: weakref.WeakKeyDictionary[Pool, float] = weakref.WeakKeyDictionary()
        self._thread: threading.Thread | None = None

    def register(self, pool: Pool) -> None:
        with self._lock:
            self._pools[pool] = time.monotonic() + pool.config.housekeeping_interval
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="connguard-housekeeper", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def unregister(self, pool: Pool) -> None:
        with self._lock:
            self._pools.pop(pool, None)

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            due: list[Pool] = []
            next_due = now + 1.0
            with self._lock:
                for pool, at in list(self._pools.items()):
                    next_at = at
                    if at <= now:
                        due.append(pool)
                        next_at = now + pool.config.housekeeping_interval
                        self._pools[pool] = next_at
                    next_due = min(next_due, next_at)
            for pool in due:
                try:
                    pool.housekeep()
                except Exception:
                    logger.exception("pool %r: housekeeping failed", pool.name)
            del due
            self._wake.wait(max(0.0, next_due - time.monotonic()))
            self._wake.clear()

    def _after_fork_in_child(self) -> None:
        # The thread did not survive the fork; the next register() starts a new one.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None


_housekeeper = Housekeeper()
os.register_at_fork(after_in_child=_housekeeper._after_fork_in_child)


def housekeeper() -> Housekeeper:
    """The process-wide housekeeper."""
    return _housekeeper
