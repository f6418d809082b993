"""One daemon thread per process that resets connections off the request path.

A full reset is a round trip (``DISCARD ALL`` and the baseline set-up). Done by the
releasing thread, it sits on the request's critical path: ``ConnguardMiddleware``
releases before the response is sent. When nobody is waiting for a connection, the
pool hands the reset here instead and the releasing thread returns at once; the
connection stays counted in the pool's size, reachable by no one, until the reset has
run, and only then goes to the first waiter or becomes idle (or is closed if the reset
fails). When callers are waiting, the releasing thread resets inline: a waiter would
only wait longer for a hand-off through this thread. Except on an event loop's thread
(an ASGI server's), which never does database I/O: every rollback, reset and cancel
of its releases comes here, and for the housekeeping thread, which must stay free to
end a reset stalled past ``socket_timeout`` (``maintenance.abort_stalled_restore``).
Such a stall ends every connection queued behind it in the same pass, so one dead
network does not hold this thread's queue for ``socket_timeout`` per connection; a
closed pool's stalled resets too (its housekeeping goes on until they are done).
Work queued is never lost to a failed thread start: the next hand-off or
housekeeping pass starts the thread.

After ``fork()`` the thread is gone; connections queued in the parent are dropped by
the child (never closed: that would end the parent's sessions) and the next hand-off
starts a new thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .driver import TxStatus
    from .engine import Pool
    from .lease import Lease, _Conn

logger = logging.getLogger("connguard.pool")


REVOKE = "revoke"
"""The status of a queued lease whose revoke's cancel the thread sends (a release made
on an event loop, see :meth:`Pool._end_revoke`)."""


class Resetter:
    """Queue of work taken off the caller's path: ``(pool, conn, status, reset)`` is a
    connection to bring back to its baseline (a full reset, or a rollback), ``(pool,
    lease, None, _)`` the end of a revoked lease's release (see :meth:`Lease.exit`),
    ``(pool, lease, REVOKE, _)`` a revoke's cancel and end."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Pool, Any, TxStatus | str | None, bool]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(
        self, pool: Pool, item: _Conn | Lease, status: TxStatus | str | None, reset: bool = True
    ) -> None:
        """Queue a connection for its reset (``reset=False``: its rollback; given back
        or closed by the thread), or a lease whose release the thread finishes.

        Raises only if the item was not queued. Once queued it runs, whatever
        happens to the thread's start: a failure to start it ("can't start new
        thread") is logged and the next :meth:`submit` or housekeeping pass
        (:meth:`start_if_pending`) starts it. A caller told "queued" has handed the
        item on for good (a revoke keeps its ``_cancelling`` until the thread has
        sent the cancel: the cancel can never reach a next holder)."""
        self._queue.put((pool, item, status, reset))
        if self._thread is not None:
            return  # running or being started: it runs this item too
        try:
            self._start()
        except Exception:
            logger.exception(
                "pool %r: the resetter thread could not be started; queued work waits "
                "for the next hand-off or housekeeping pass",
                pool.name,
            )

    def start_if_pending(self) -> None:
        """Start the thread if work is queued and it is not running (its start
        failed). Housekeeping calls it on each pass; it raises nothing."""
        if self._thread is not None or self._queue.empty():
            return
        try:
            self._start()
        except Exception:
            logger.exception("the connguard resetter thread could not be started")

    def _start(self) -> None:
        # Made outside the lock: a collection while it allocates may finish an
        # abandoned use whose release comes back here (SimpleQueue's put() is
        # reentrant, a lock is not); that inner call then starts the thread.
        thread = threading.Thread(target=self._run, name="connguard-resetter", daemon=True)
        with self._lock:
            if self._thread is not None:  # another thread started it meanwhile
                return
            try:
                # Set before the start: from here every submit() returns at once,
                # also one re-entered by a collection in this thread during the start,
                # or in the new thread before it has signalled that it started.
                self._thread = thread
                thread.start()
            except BaseException:
                if thread.ident is None and self._thread is thread:
                    self._thread = None  # it never ran: the next submit() starts one
                raise

    def _run(self) -> None:
        """Run for the process's life (a fork's child starts its own: the thread is
        never restarted otherwise, and never needs to be: nothing here lets an
        exception out of the loop)."""
        get = self._queue.get
        while True:
            pool, item, status, reset = get()
            try:
                if status is None:
                    pool._finish_unused(item)
                elif status is REVOKE:
                    pool._end_revoke(item)
                else:
                    pool._restore(item, status, reset, deferred=True)  # type: ignore[arg-type]
            except BaseException:  # _restore gave back or closed it; this thread lives on
                logger.exception("pool %r: reset failed", pool.name)
            del pool, item

    def _after_fork_in_child(self) -> None:
        pending: list[Any] = []
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread = None
        for pool, item, status, _reset in pending:
            if status is not None and status is not REVOKE:  # a connection: forget it
                pool.driver.drop(item.raw)


_resetter = Resetter()
os.register_at_fork(after_in_child=_resetter._after_fork_in_child)


def resetter() -> Resetter:
    """The process-wide resetter."""
    return _resetter
