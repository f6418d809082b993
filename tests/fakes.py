"""A fake DB-API driver and a manual clock, to test the engine's logic exhaustively.

The fake keeps score of what a real server would see: how many connections are
physically open at once (``max_live``) and whether two holders ever used one
connection at the same time (``FakeConnection.use``).
"""

from __future__ import annotations

import copy
import functools
import itertools
import os
import threading
from collections.abc import Callable
from typing import Any

from connguard.pool import TxStatus


class FakeOperationalError(Exception):
    """Stands in for a driver's DB-API OperationalError."""


class FakeConnection:
    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self._ids)
        self.status = TxStatus.IDLE
        self.alive = True
        # Dead without a goodbye (a cut network, a failover): the no-round-trip
        # liveness test sees nothing, only a round trip fails.
        self.silent = False
        self.closed = False
        self.dropped = False
        self.session_dirty = False
        self.fail_reset = False
        self.pid = os.getpid()
        self.pings = 0
        self.cancels = 0
        self.aborts = 0
        self._holder_lock = threading.Lock()
        self.holder: int | None = None

    def use(self) -> None:
        """Claim the connection for the current thread, check it, let go.

        Raises AssertionError if another thread holds it right now (exclusivity)
        or it has been closed (use after close).
        """
        me = threading.get_ident()
        if not self._holder_lock.acquire(blocking=False):
            raise AssertionError(f"connection {self.id} used by two holders at once")
        try:
            assert not self.closed and not self.dropped, f"connection {self.id} used after close"
            self.holder = me
        finally:
            self.holder = None
            self._holder_lock.release()

    def __repr__(self) -> str:
        return f"<FakeConnection {self.id} {self.status.name}{' closed' if self.closed else ''}>"


class FakeDriver:
    name = "fake"
    operational_error: type[Exception] = FakeOperationalError

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live = 0
        self.max_live = 0
        self.connects = 0
        self.closes = 0
        self.drops = 0
        self.fail_connect: Exception | None = None
        self.connect_gate: threading.Event | None = None  # when set, connect waits on it
        self.opened: list[FakeConnection] = []

    def connect(self, timeout: float) -> FakeConnection:
        gate = self.connect_gate
        if gate is not None and not gate.wait(timeout):
            raise FakeOperationalError("connect timed out (gate)")
        with self.lock:
            self.connects += 1
            if self.fail_connect is not None:
                # a new exception each time, as a real driver raises
                raise copy.copy(self.fail_connect)
            conn = FakeConnection()
            self.opened.append(conn)
            self.live += 1
            self.max_live = max(self.max_live, self.live)
            return conn

    def close(self, conn: FakeConnection) -> None:
        with self.lock:
            assert not conn.closed, "closed twice"
            conn.closed = True
            self.live -= 1
            self.closes += 1

    def drop(self, conn: FakeConnection) -> None:
        with self.lock:
            conn.dropped = True
            self.drops += 1

    def is_alive(self, conn: FakeConnection) -> bool:
        return conn.alive and not conn.closed

    def ping(self, conn: FakeConnection, timeout: float) -> None:
        conn.pings += 1
        if not conn.alive or conn.silent:
            raise FakeOperationalError("server closed the connection")

    def cancel(self, conn: FakeConnection) -> None:
        conn.cancels += 1

    def prepare_cancel(self, conn: FakeConnection) -> Callable[[], None]:
        return functools.partial(self.cancel, conn)

    def abort(self, conn: FakeConnection) -> None:
        conn.aborts += 1
        conn.alive = False  # its socket is shut down: the connection is dead

    def transaction_status(self, conn: FakeConnection) -> TxStatus:
        return TxStatus.UNKNOWN if not conn.alive else conn.status

    def rollback(self, conn: FakeConnection) -> None:
        if conn.fail_reset or not conn.alive:
            raise FakeOperationalError("rollback failed")
        conn.status = TxStatus.IDLE

    def reset(self, conn: FakeConnection) -> None:
        self.rollback(conn)
        conn.session_dirty = False


class ManualClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    """Wait (polling every millisecond) until ``predicate()`` is true, or fail.

    For background work we cannot hook into (opener threads); the bound only
    matters when the code is broken.
    """
    event = threading.Event()
    for _ in range(int(timeout * 1000)):
        if predicate():
            return
        event.wait(0.001)
    raise AssertionError(f"condition not met within {timeout} s")
