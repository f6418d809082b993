"""Fork safety: a child process starts every pool empty, with clean counters and its
housekeeping back, and drops (never closes) the connections inherited from its parent.

Closing an inherited libpq connection in the child sends Terminate on a socket the
parent still uses and ends the parent's session (seen with psycopg 3 and psycopg2), so
the child only forgets them (``Driver.drop``).

In the parent every pool becomes *dormant* until its next acquire: housekeeping keeps
no ``min_size`` warm for it (opening.warm_size_locked). A process that forks and then
serves nothing (a gunicorn ``--preload`` master, a Celery master) would otherwise keep
``min_size`` backends for ever on top of its workers', reopened if the server ends
them. One rule for every forking process, no server-specific hook: a worker that forks
(multiprocessing in a view) comes back with its next request's acquire.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING

from .housekeeper import housekeeper
from .opening import request_open_locked, start_openers

if TYPE_CHECKING:
    from .engine import Pool

# Every pool of this process, for the fork handlers.
_pools: weakref.WeakSet[Pool] = weakref.WeakSet()
_pools_lock = threading.Lock()


def register(pool: Pool) -> None:
    with _pools_lock:
        _pools.add(pool)


def before_fork(pool: Pool) -> None:
    pool._lock.acquire()


def after_fork_in_parent(pool: Pool) -> None:
    """Mark the pool dormant until its next acquire (under the lock taken before
    the fork), and let go of the lock."""
    pool._acquires_at_fork = pool._n_acquires
    pool._lock.release()


def reset_in_child(pool: Pool) -> None:
    """Start empty, with clean counters and housekeeping again: drop (never
    close) every connection inherited from the parent.

    The child has only the forking thread, so waiters, openers and uses in
    progress are gone too; inherited leases are fenced with fresh locks (one held
    by a parent thread at the fork would never be released here).
    """
    inherited = [*pool._idle, *pool._leases.values()]
    for ref in pool._leases:
        lease = ref()
        if lease is not None:
            lease._guard = threading.Lock()
            # Its use count stays: the forking thread may be inside a use, whose
            # exit() here takes its count off.
            lease._ending = True
            lease._conn = None
    pool._lock = threading.Lock()
    pool._wake_opener = threading.Event()
    pool._idle = []
    pool._leases = {}
    pool._dropped = collections.deque()
    pool._on_drop = pool._dropped.append
    pool._waiters = collections.deque()
    pool._size = pool._opening = pool._closing = pool._resetting = 0
    pool._restoring = {}
    pool._aborting = {}
    pool._abort_guard = threading.Lock()
    pool._pid = os.getpid()
    pool._acquires_at_fork = -1  # not dormant (until it forks in turn)
    pool._failed_at = pool._backoff_delay = 0.0
    pool._refused = False
    pool._last_connect_error = None
    pool._reset_counters()
    for conn in inherited:
        pool.driver.drop(conn.raw)
    if pool._closed:
        return
    start_openers(pool, request_open_locked(pool))
    if pool._housekeeping:
        housekeeper().register(pool)


def _before_fork() -> None:
    _pools_lock.acquire()
    for pool in list(_pools):
        before_fork(pool)


def _after_fork_in_parent() -> None:
    for pool in list(_pools):
        after_fork_in_parent(pool)
    _pools_lock.release()


def _after_fork_in_child() -> None:
    global _pools_lock
    _pools_lock = threading.Lock()
    for pool in list(_pools):
        try:
            reset_in_child(pool)
        except Exception:  # never break the child over one pool
            print(f"connguard: resetting pool {pool.name!r} after fork failed", file=sys.stderr)


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
