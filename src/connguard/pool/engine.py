"""The pool: a bounded, thread-safe set of physical connections for one database.

How it keeps the invariants of ARCHITECTURE.md:

* **Bounded.** ``_size`` counts every physical connection that exists or is being
  opened or closed. A slot is reserved under the lock (``_size += 1``) *before* a
  connection is opened and given back only after it is closed, so ``_size <=
  max_size`` holds at every instant.
* **Exclusive.** A connection is either in ``_idle``, or referenced by exactly one
  live :class:`Lease`, or in transit (being opened, checked, reset or closed) and
  reachable from no one else. Hand-off to a waiter happens under the lock.
* **Fencing.** Every use of a lease is bracketed (:mod:`connguard.pool.lease`);
  ending it from any thread sets the fence first, and a use in progress is cancelled,
  never cut: the thread inside finishes the release when it lets go.
* **Clean hand-off.** A connection goes back with its transaction rolled back and,
  per the ``reset`` setting, its session state discarded (one round trip).
* **No hang.** Callers never open connections themselves: opener threads do, and
  a caller only waits on its own lock with a deadline. A connect that outlives
  the caller that asked for it is not wasted; it goes to the next waiter or idle.
* **Hand-off is a protocol.** A waiter that times out re-checks under the pool
  lock whether it was handed a connection meanwhile; if so it takes it. So no
  connection is ever stranded on a waiter that has given up.

Opening lives in :mod:`.opening`, housekeeping in :mod:`.maintenance`, fork safety
in :mod:`.fork`; this module is acquire, hand-off and release.

The lock is held for O(1) work only (housekeeping walks at most ``max_size``
entries). No I/O ever happens under it: connect, close, liveness, ping, rollback
and reset all run outside.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from . import fork
from .config import PoolConfig
from .driver import Driver, TxStatus
from .errors import (
    ConnectFailed,
    LeaseEnded,
    PoolClosed,
    PoolCounts,
    PoolError,
    PoolRefused,
    PoolTimeout,
    one_line,
    specialize,
)
from .housekeeper import housekeeper
from .lease import FencedConnection, Lease, _Conn, capture_stack
from .maintenance import housekeep, housekeeping_now, take_back_dropped
from .opening import request_open_locked, start_openers
from .resetter import REVOKE as _REVOKE
from .resetter import resetter
from .stats import BUCKET_BOUNDS, CLOSE_REASONS, Histogram, PoolStats

logger = logging.getLogger("connguard.pool")

Clock = Callable[[], float]
_monotonic = time.monotonic  # waits and backoff pace real time, never the injected clock
_get_ident = threading.get_ident
_bucket = bisect.bisect_left
_getframe = sys._getframe
# The event loop running in the calling thread, or None: one C call, no exception.
_running_loop = asyncio._get_running_loop

_IDLE = TxStatus.IDLE
_ACTIVE = TxStatus.ACTIVE
_ROLLBACK_STATES = frozenset({TxStatus.INTRANS, TxStatus.INERROR})


class _Waiter:
    """A caller waiting for a connection.

    It sleeps on its own lock; whoever hands it a lease (or an error) sets the
    field first, then releases the lock, always while holding the pool lock.
    """

    __slots__ = ("error", "event", "lease", "owner", "since", "thread_id")

    def __init__(self, owner: object) -> None:
        self.event = threading.Lock()
        self.event.acquire()
        self.since = _monotonic()  # waits are real time, whatever the pool's clock
        self.owner = owner
        self.thread_id = threading.get_ident()
        self.lease: Lease | None = None
        self.error: PoolError | None = None


class Pool:
    """A bounded pool of connections to one database, shared by every thread.

    ``clock`` is injectable so tests drive lifetime, idle, ping and leak timing
    without sleeping; waits and reconnect backoff always use real time because
    they block on real locks. ``housekeeping=False`` keeps the pool off the process-wide
    housekeeping thread; the owner then calls :meth:`housekeep` itself.
    """

    def __init__(
        self,
        driver: Driver,
        config: PoolConfig | None = None,
        *,
        name: str = "default",
        clock: Clock = time.monotonic,
        housekeeping: bool = True,
    ) -> None:
        self.driver = driver
        self.config = config if config is not None else PoolConfig()
        self.name = name
        self._clock = clock
        self._housekeeping = housekeeping
        cfg = self.config
        self._stack_depth = cfg.stack_depth
        # An idle connection idle this long gets a round-trip ping before reuse; one
        # idle at least _live_after gets the cheap liveness test; a fresher one none.
        self._ping_after = math.inf if cfg.ping_after_idle is None else cfg.ping_after_idle
        self._live_after = math.inf if cfg.liveness_after_idle is None else cfg.liveness_after_idle
        self._is_alive = driver.is_alive
        # Why a connection past its expiry is closed: with reuse=False every
        # connection expires as it is opened, so it serves one lease.
        self._expired = "lifetime" if cfg.reuse else "single_use"
        self._reset_always = cfg.reset == "always"
        self._background_reset = cfg.background_reset
        self._reset_auto = cfg.reset == "auto"
        changes = getattr(driver, "changes_session", None)
        self._changes_session: Callable[[Any], bool] = (
            changes if callable(changes) else _any_statement
        )
        self._lock = threading.Lock()
        # Wakes an opener sleeping in reconnect backoff: set on close, and when a
        # caller starts waiting (demand shortens the backoff, see opening.py).
        self._wake_opener = threading.Event()

        # Physical connections that exist, counting those being opened, checked,
        # reset or closed. Invariant: _size <= config.max_size.
        self._size = 0
        self._opening = 0  # of _size: being opened by an opener thread
        self._closing = 0  # of _size: being closed outside the lock
        self._resetting = 0  # of _size: queued for, or in, a reset by the resetter
        # Connections nobody holds that are queued for or in a rollback or reset
        # (socket_timeout set): when that began (pool clock; inf once aborted).
        # Housekeeping shuts down the socket of one stalled past socket_timeout: it
        # marks the entry aborted under _abort_guard, which _restore also holds while
        # it takes the entry out and gives the connection on, and _restore closes,
        # never gives on, a connection marked aborted: an abort never reaches a next
        # holder. The driver's abort runs after the guard, the connection meanwhile
        # in _aborting (-> True once _restore has left its close to the aborter, so
        # it is not closed under the abort); _aborting is read and written only under
        # _abort_guard.
        self._restoring: dict[_Conn, float] = {}
        self._aborting: dict[_Conn, bool] = {}
        self._abort_guard = threading.Lock()
        self._bound_restore = cfg.socket_timeout is not None and hasattr(driver, "abort")
        self._idle: list[_Conn] = []  # LIFO: the end is the most recently returned
        # Every lease not yet ended, held weakly: weak reference -> its connection.
        self._leases: dict[weakref.ref[Lease], _Conn] = {}
        # Weak references whose lease was collected unreleased (appended by the
        # weakref callback, which may run in any thread, even under our lock: so it
        # only appends; housekeeping and the slow acquire path take them back).
        self._dropped: collections.deque[weakref.ref[Lease]] = collections.deque()
        self._on_drop = self._dropped.append
        # FIFO of callers waiting. Invariant: never both _idle and _waiters non-empty.
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._closed = False
        self._pid = os.getpid()
        # _n_acquires when this process last forked (-1: it has not, or this is the
        # child). While they are equal the pool is dormant: housekeeping keeps no
        # connection warm for it (min_size counts as 0; see opening.warm_size_locked).
        self._acquires_at_fork = -1

        # Reconnect backoff: when the last attempt failed (real time) and the delay
        # before the next one while nobody waits (it doubles on each failure).
        self._failed_at = 0.0
        self._backoff_delay = 0.0
        self._backoff_jitter = 1.0
        self._refused = False  # the last connect failed by the server's refusal
        self._last_connect_error: BaseException | None = None  # since the last success
        self._reset_counters()

        op_error = driver.operational_error
        self._errors: dict[type[PoolError], type[PoolError]] = {
            cls: specialize(cls, op_error)
            for cls in (PoolTimeout, ConnectFailed, PoolRefused, PoolClosed, LeaseEnded)
        }

        fork.register(self)
        if self.config.min_size:
            with self._lock:
                openers = request_open_locked(self)
            start_openers(self, openers)
        if housekeeping:
            housekeeper().register(self)

    def _reset_counters(self) -> None:
        """Counters and histograms, written only under _lock (zeroed in a forked child)."""
        self._n_acquires = 0
        self._n_waits = 0
        self._n_timeouts = 0
        self._n_refusals = 0
        self._n_releases = 0
        self._n_resets = 0
        self._n_opened = 0
        self._n_connect_errors = 0
        self._n_health_failures = 0
        self._n_leaks = 0
        self._n_reclaims = 0
        self._n_dropped = 0
        self._n_revoked = 0
        self._n_aborted = 0
        self._n_closed = dict.fromkeys(CLOSE_REASONS, 0)
        self._h_wait = Histogram()
        self._h_hold = Histogram()
        self._h_connect = Histogram()

    # ------------------------------------------------------------------ acquire

    def acquire(
        self,
        timeout: float | None = None,
        *,
        owner: object = None,
        stack: tuple[Any, ...] | None = None,
    ) -> Lease:
        """Lease a connection, returning within ``timeout`` (default: the config's).

        The most recently returned idle connection comes first; else a waiter
        queues (FIFO) while an opener thread makes a new connection if there is
        room. Health checks count against the same deadline. Raises ``PoolTimeout``
        (``ConnectFailed`` when the database is unreachable), ``PoolRefused`` when
        ``max_waiting`` callers already wait (``ConnectFailed`` during an outage),
        ``PoolClosed`` when the pool is closed.
        ``stack`` overrides the recorded acquire site (a layer above that knows which
        frames are its own passes it); by default ``stack_depth`` frames of the caller
        are recorded.
        """
        if stack is None:
            depth = self._stack_depth
            if depth == 3:  # the default, unrolled: about 0.25 µs
                frame = _getframe(1)
                outer = frame.f_back
                outmost = outer.f_back if outer is not None else None
                if outmost is not None:
                    stack = (frame.f_code, frame.f_lasti, outer.f_code, outer.f_lasti,  # type: ignore[union-attr]
                             outmost.f_code, outmost.f_lasti)  # fmt: skip
                else:
                    stack = capture_stack(depth)
            else:
                stack = capture_stack(depth) if depth else ()
        clock = self._clock
        start = clock()
        # The hot path: an idle connection, returned recently enough to need no test.
        with self._lock:
            idle = self._idle
            if idle and not self._closed:
                conn = idle.pop()
                lease = self._new_lease_locked(conn, start, owner, _get_ident())
            else:
                conn = None
        if conn is not None:
            lease.stack = conn.stack = stack
            if (
                start - conn.idle_since < self._ping_after
                and start < conn.expires_at
                and not conn.suspect
            ):
                if start - conn.tested_at < self._live_after:
                    return lease
                # The cheap liveness test, inlined (the common case under load).
                try:
                    alive = self._is_alive(conn.raw)
                except Exception:
                    alive = False  # in doubt, not handed out
                except BaseException:
                    self._end_lease(lease, "broken", health=True)
                    raise
                if alive:
                    conn.tested_at = start
                    return lease
                self._end_lease(lease, "broken", health=True)
            elif self._checked(lease, conn, start, _monotonic() + self._limit(timeout)):
                return lease
        lease = self._acquire_slow(start, timeout, owner)
        lease.stack = stack
        conn = lease._conn
        if conn is not None:
            conn.stack = stack
        return lease

    def _limit(self, timeout: float | None) -> float:
        return self.config.timeout if timeout is None else timeout

    def _new_lease_locked(self, conn: _Conn, now: float, owner: object, thread: int) -> Lease:
        """The one place a lease is made. Caller holds the lock."""
        lease = Lease(self, conn, now, owner, thread)
        ref = lease._ref = weakref.ref(lease, self._on_drop)
        self._leases[ref] = conn
        conn.owner = owner
        self._n_acquires += 1
        return lease

    def _acquire_slow(self, start: float, timeout: float | None, owner: object) -> Lease:
        """Wait in the queue (or retry after a failed health check)."""
        # Waits are real time, whatever the clock: read it once when they agree.
        began = start if self._clock is _monotonic else _monotonic()
        limit = self._limit(timeout)
        deadline = began + limit
        if self._dropped:
            take_back_dropped(self)
        while True:
            openers = 0
            failing = False
            with self._lock:
                if self._closed:
                    raise self._error(PoolClosed, "the pool is closed")
                if self._idle:
                    conn = self._idle.pop()
                    lease = self._new_lease_locked(conn, start, owner, _get_ident())
                    waiter = None
                else:
                    max_waiting = self.config.max_waiting
                    if max_waiting and len(self._waiters) >= max_waiting:
                        self._n_refusals += 1
                        raise self._refusal_locked(max_waiting)
                    waiter = _Waiter(owner)
                    self._waiters.append(waiter)
                    self._n_waits += 1
                    openers = request_open_locked(self)
                    failing = self._last_connect_error is not None
            if waiter is not None:
                if openers:
                    start_openers(self, openers)
                elif failing:  # an opener sleeps in backoff: a caller waits now
                    self._wake_opener.set()
                # A fresh connection or one just returned: no health check needed.
                return self._wait(waiter, deadline, limit)
            if self._checked(lease, conn, start, deadline):
                return lease
            if _monotonic() >= deadline:
                with self._lock:
                    self._n_timeouts += 1
                    raise self._timeout_locked(limit)

    def _checked(self, lease: Lease, conn: _Conn, now: float, deadline: float) -> bool:
        """Health-check the connection behind a new lease; on failure close it (the
        caller then tries another). Whatever happens, the lease is not left half-made.
        A connection past its lifetime is retired, not counted as a failed check."""
        if now >= conn.expires_at:
            self._end_lease(lease, self._expired, health=True)
            return False
        try:
            healthy = self._healthy(conn, now, deadline)
        except BaseException:
            self._end_lease(lease, "broken", health=True)
            raise
        if healthy is None:  # a ping still running on its own thread, which will close it
            self._end_lease(lease, "broken", health=True, close=False)
            return False
        if not healthy:
            self._end_lease(lease, "broken", health=True)
        return healthy

    def _healthy(self, conn: _Conn, now: float, deadline: float) -> bool | None:
        """Decide outside the lock whether an idle connection may be handed out.

        A ping is bounded by what is left of the caller's deadline (and by
        ``connect_timeout``); a connection whose ping would outlast it counts as
        unhealthy, so no acquire overruns its timeout because of health checks.
        """
        cfg = self.config
        idle_for = now - conn.idle_since
        ping_after = cfg.ping_after_idle
        live_after = cfg.liveness_after_idle
        try:
            if ping_after is not None and (conn.suspect or idle_for >= ping_after):
                budget = min(cfg.connect_timeout, deadline - _monotonic())
                if budget <= 0 or not self.driver.is_alive(conn.raw):
                    return False
                if not getattr(self.driver, "ping_bounded", False):
                    healthy = self._ping_off_thread(conn, budget)
                else:
                    self.driver.ping(conn.raw, budget)
                    healthy = True
                if healthy:
                    conn.suspect = False
                    conn.tested_at = now
                return healthy
            elif live_after is not None and now - conn.tested_at >= live_after:
                alive = self.driver.is_alive(conn.raw)
                if alive:
                    conn.tested_at = now
                return alive
        except Exception:
            return False
        return True

    def _ping_off_thread(self, conn: _Conn, budget: float) -> bool | None:
        """Ping with a driver that does not declare ``ping_bounded = True`` (psycopg2
        cannot bound its ping; a driver we do not know may not): on a thread of
        its own, waited for at most ``budget``. None: still running; the connection
        now belongs to that thread, which closes it when the ping returns (its slot
        stays counted until then: the server may still see the backend)."""
        done = threading.Event()
        guard = threading.Lock()
        outcome: list[bool] = []
        abandoned: list[bool] = []

        def run() -> None:
            try:
                self.driver.ping(conn.raw, budget)
                ok = True
            except BaseException:  # whatever it was, this connection is not handed out
                ok = False
            with guard:
                outcome.append(ok)
                gone = bool(abandoned)
            done.set()
            if gone:
                self._close_conn(conn)

        threading.Thread(target=run, name=f"connguard-ping-{self.name}", daemon=True).start()
        done.wait(budget)
        with guard:
            if outcome:
                return outcome[0]
            abandoned.append(True)
        return None

    def _wait(self, waiter: _Waiter, deadline: float, limit: float) -> Lease:
        """Sleep until handed a lease or an error, or until ``deadline``.

        Whatever ends the wait (the timeout, or any exception: a signal handler's,
        ``KeyboardInterrupt``, an asynchronous exception), the waiter leaves the queue
        under the lock, and a lease handed to it at that instant is taken (on success)
        or given back (on an exception): no slot is ever stranded on a waiter.
        """
        try:
            remaining = deadline - _monotonic()
            got = remaining > 0 and waiter.event.acquire(timeout=remaining)
        except BaseException:
            with self._lock:
                handed = waiter.lease
                if handed is None and waiter.error is None:
                    self._waiters.remove(waiter)
            if handed is not None:
                self.release(handed)
            raise
        if not got:
            with self._lock:
                if waiter.lease is None and waiter.error is None:
                    self._waiters.remove(waiter)
                    self._n_timeouts += 1
                    raise self._timeout_locked(_monotonic() + limit - deadline)
                # else: handed off at the instant we gave up: take it
        if waiter.error is not None:
            raise waiter.error
        lease = waiter.lease
        assert lease is not None
        return lease  # its wait was recorded by whoever handed it over

    def _outage_locked(self) -> BaseException | None:
        """The connect error that makes the pool's plight an outage, or None.

        An outage: the pool has no idle connection to give, its last attempt to open
        one failed and none has succeeded since (a success clears the error, so a
        recovered database is told apart at its first new connection), and that
        failure is recent: within ``connect_timeout + reconnect_backoff_max``, the
        longest an ongoing outage goes without a fresh failure while the pool still
        tries. An older one is no news about now (the pool went on serving from the
        connections it had, and nobody asked for a new one since).

        Leases out do not make it overload. The caller needs a *new* connection and
        the pool cannot open one; whether a lease comes back in time the pool cannot
        know, and during a stop or a black hole those leases are as dead as the new
        connects. A database that refuses new connections is one every instance
        sharing it sees: retrying elsewhere does not help, which is what
        "unreachable" tells a load balancer. Caller holds the lock.
        """
        cause = self._last_connect_error
        if cause is None or self._idle:
            return None
        cfg = self.config
        if _monotonic() - self._failed_at > cfg.connect_timeout + cfg.reconnect_backoff_max:
            return None
        return cause

    def _refusal_locked(self, max_waiting: int) -> PoolError:
        """The error for a caller refused because ``max_waiting`` callers wait:
        ``ConnectFailed`` during an outage (see :meth:`_outage_locked`),
        ``PoolRefused`` otherwise (overload).

        Before the first connect of an outage has failed (a black hole: the first
        attempt hangs for up to ``connect_timeout``) a refusal cannot tell: nothing
        has been waited for yet, and a cold pool's first connects to a healthy
        database look the same. It says ``PoolRefused`` then; the callers waiting
        learn the truth at their timeout (see :meth:`_timeout_locked`)."""
        waiting = f"{len(self._waiters)} callers already wait (max_waiting={max_waiting})"
        cause = self._outage_locked()
        if cause is None:
            return self._error(PoolRefused, f"{waiting}; refused at once")
        err = self._error(
            ConnectFailed,
            f"the database is unreachable and {waiting}; refused at once; "
            f"last connect error: {one_line(cause)}",
        )
        err.__cause__ = cause
        return err

    def _timeout_locked(self, waited: float) -> PoolError:
        """The error for a caller that waited in vain: ``ConnectFailed`` during an
        outage (see :meth:`_outage_locked`), or when the pool had no connection in
        use and none idle, only connects under way (nothing failed yet, but for the
        whole wait the pool had only the database to wait for: a black hole, or a
        database too slow to accept a connection within ``timeout``);
        ``PoolTimeout`` when connections were in use (overload)."""
        cause = self._outage_locked()
        if cause is not None:
            err = self._error(
                ConnectFailed,
                f"no connection within {waited:.2f} s: the database is unreachable; "
                f"last connect error: {one_line(cause)}",
            )
        elif self._opening and not self._leases and not self._idle:
            err = self._error(
                ConnectFailed,
                f"no connection within {waited:.2f} s: the database is unreachable; "
                f"no connect has completed (connect_timeout={self.config.connect_timeout})",
            )
        else:
            err = self._error(
                PoolTimeout,
                f"no connection within {waited:.2f} s; raise max_size, hold connections "
                "for less time, or raise timeout",
            )
        err.__cause__ = cause
        return err

    # ------------------------------------------------------------------ release

    def release(self, lease: Lease, *, reset: bool = False) -> None:
        """End ``lease`` and give its connection back; safe from any thread.

        If a use of the lease is in progress (another thread is inside the fence),
        the lease is *revoked*: fenced at once, the running statement cancelled with
        the driver's thread-safe cancel, and the thread that was using it finishes the
        release when it lets go. Otherwise the connection goes back now: to the first
        waiter, else to the idle set, in its baseline state (see the ``reset``
        setting; ``reset=True`` forces a full reset). Releasing an ended lease does
        nothing.
        """
        if lease._pool is not self or lease._conn is None or lease._ending:
            # Not this pool's, or already ending (each for good: ``_ending`` is set
            # once, ``_conn`` only ever cleared), as the check under the guard would
            # find: the common second release (ConnguardMiddleware gives the lease
            # back, then request_finished asks again) takes no lock.
            return
        # This thread's part is decided under the lease's lock, with the use count it
        # reads: finish the release now (the lease is then *claimed*: ``_finishing``)
        # or cancel the use in progress (``_cancelling``). Each flag is set right after
        # its local, with no call between them, and cleared in ``finally``: whatever
        # is raised (a signal's KeyboardInterrupt included), no flag outlives its work.
        claimed = revoking = False
        try:
            with lease._guard:
                # Read again: another release may have begun since the look above.
                if lease._conn is None or lease._ending:
                    return  # type: ignore[unreachable]
                lease._ending = True
                if reset:
                    lease.reset_requested = True
                if lease._busy:
                    revoking = True
                    lease._cancelling = True
                    if lease.ended_by is None:
                        lease.ended_by = "revoked"
                else:
                    claimed = True
                    lease._finishing = True
            if claimed:
                self._finish_release(lease)
            elif _running_loop() is None:
                self._revoke(lease)
            else:
                # On an event loop: the cancel opens a connection to the server (up to
                # seconds on a dead network, the whole loop stopped). The resetter sends
                # it, then ends the revoke (see _end_revoke); _cancelling stays set.
                revoking = False
                try:
                    resetter().submit(self, lease, _REVOKE)
                except BaseException:
                    revoking = True  # not queued (or in doubt): end the revoke here
                    raise
        finally:
            # Not ended after all (see _finish_release), or revoked: clear the mark.
            if revoking or (claimed and lease._conn is not None):
                # Inline, not a call (a signal's exception can land at a function's
                # entry), and retried if a signal interrupts the wait for the lock: a
                # mark left set would keep the lease counted in use for ever.
                interrupted: BaseException | None = None
                while True:
                    try:
                        with lease._guard:
                            if revoking:
                                lease._cancelling = False
                            else:
                                lease._finishing = False
                        break
                    except BaseException as exc:
                        interrupted = exc
                if revoking:  # the cancel is done: the last use out may have gone
                    self._finish_unused(lease)
                if interrupted is not None:
                    raise interrupted

    def _revoke(self, lease: Lease) -> None:
        """A use is in progress in another thread: cancel it. The release waits for
        the cancel (``_cancelling``, set by :meth:`release`, which clears it after this
        returns or raises), or the cancel could reach the connection's next holder;
        then the last of that thread's :meth:`Lease.exit` and this thread finishes it."""
        conn = lease._conn  # nobody ends the lease while _cancelling is set
        with self._lock:
            self._n_revoked += 1
        if conn is not None:
            self.driver.cancel(conn.raw)

    def _end_revoke(self, lease: Lease) -> None:
        """On the resetter thread: send the cancel of a revoke begun on an event loop
        (``_cancelling`` set by the release), then finish as :meth:`release` would.
        The lease is left to housekeeping if its statement still runs outside the
        fence: no second cancel."""
        try:
            self._revoke(lease)
        finally:
            with lease._guard:
                lease._cancelling = False
            self._finish_unused(lease, housekeeping=True)

    def _finish_unused(self, lease: Lease, *, housekeeping: bool = False) -> None:
        """Finish the release of an ending lease if nobody is using it, cancelling on
        it or already finishing it: decided and claimed under the lease's lock, so
        that of the threads that may finish a release (the releasing one after its
        cancel, the last use out, housekeeping, the resetter) exactly one does, never
        under a use or a cancel. ``housekeeping``: leave a connection whose statement
        still runs outside the fence where it is (taken back later)."""
        claimed = False
        try:
            with lease._guard:
                if (
                    lease._conn is not None
                    and lease._ending
                    and not lease._busy
                    and not lease._cancelling
                    and not lease._finishing
                ):
                    claimed = True
                    lease._finishing = True
            if claimed:
                self._finish_release(lease, housekeeping=housekeeping)
        finally:
            if claimed and lease._conn is not None:  # not ended: unclaim, as release() does
                interrupted: BaseException | None = None
                while True:
                    try:
                        with lease._guard:
                            lease._finishing = False
                        break
                    except BaseException as exc:
                        interrupted = exc
                if interrupted is not None:
                    raise interrupted

    def _in_transaction(self, raw: Any) -> bool:
        return self.driver.transaction_status(raw) is not _IDLE

    def _finish_release(self, lease: Lease, *, housekeeping: bool = False) -> None:
        """Give back the connection of a fenced lease nobody is using. The caller has
        claimed the lease (``_finishing``, see :meth:`_finish_unused`): nobody else
        finishes it meanwhile, so a cancel sent here cannot reach a next holder."""
        conn = lease._conn
        if conn is None:
            return
        status = self.driver.transaction_status(conn.raw)
        if (
            status is _ACTIVE
            and not lease._left_active
            and (housekeeping or lease.thread_id != _get_ident())
        ):
            # Someone outside the fence (a caller that kept the raw connection) is
            # running a statement: cancel it (once: housekeeping only looks) and leave
            # the connection where it is, counted, for housekeeping to finish once the
            # statement has ended. The claim keeps housekeeping off until the cancel
            # has been sent. Not when the holder's last fenced use left it ACTIVE
            # (``_left_active``: a stream revoked mid-fetch, half read): nobody will
            # end that statement, so it is abandoned, cancelled and closed below, as
            # on the holder's own thread.
            if housekeeping:
                return
            if _running_loop() is not None:
                # Not on an event loop (network I/O, see _release_dirty): the resetter
                # sends the cancel. _cancelling keeps every other finish off until then.
                with lease._guard:
                    lease._cancelling = True
                try:
                    resetter().submit(self, lease, _REVOKE)
                except BaseException:
                    with lease._guard:
                        lease._cancelling = False
                    raise
                return
            self._revoke(lease)
            return
        reset = (
            self._reset_always
            or lease.reset_requested
            or (lease.dirty and self._reset_auto)
            or (lease.server_cursors is not None and bool(lease.server_cursors))
        )
        if reset or status is not _IDLE:
            self._release_dirty(lease, conn, status, reset, housekeeping)
            return
        now = self._clock()
        with self._lock:
            if lease._conn is not conn:
                return  # ended by someone else meanwhile
            if now < conn.expires_at and not self._closed and conn.pid == self._pid:
                # _retire_lease_locked and _give_back_locked, inlined: the hot path.
                # Retired and given back with no call between them (a signal's
                # exception can land after any call), the figures after.
                lease._conn = None
                lease.released_at = now
                del self._leases[lease._ref]
                lease._ref = None  # dies with no callback: the lease was returned
                self._n_releases += 1
                if self._waiters:
                    self._give_back_locked(conn, now)
                else:
                    conn.idle_since = now
                    self._idle.append(conn)
                hold = now - lease.acquired_at
                hist = self._h_hold
                hist.counts[_bucket(BUCKET_BOUNDS, hold)] += 1
                hist.total += hold
                hist.count += 1
                if hold > hist.max:  # noqa: PLR1730 - cheaper than max() here
                    hist.max = hold
                if lease.leak_reported:
                    self._log_leak_returned(lease, now)
                return
        self._end_lease(lease, "pool_closed" if self._closed else self._expired)

    def _release_dirty(
        self, lease: Lease, conn: _Conn, status: TxStatus, reset: bool, housekeeping: bool = False
    ) -> None:
        """Slow path: the connection needs a rollback or reset (outside the lock).

        A full reset with nobody waiting goes to the process's resetter thread, off
        the releasing request's path; the connection stays counted (``resetting``)
        and reachable by no one until the reset has run, then goes to the first
        waiter. Whatever the connection needs goes there too, waiters or not, when
        the releasing thread runs an event loop (an ASGI server's: a round trip there,
        stalled by a dead network, stops every request of the worker) or is the
        housekeeping thread (which must stay free to abort a stalled reset)."""
        off_thread = (
            housekeeping
            or _running_loop() is not None
            or getattr(housekeeping_now, "active", False)
        )
        now = self._clock()
        with self._lock:
            if lease._conn is not conn:
                return
            self._retire_lease_locked(lease, now)
            lease.cleanup = (
                "reset" if reset
                else "cancel" if status is TxStatus.ACTIVE
                else "broken" if status is TxStatus.UNKNOWN
                else "rollback"
            )  # fmt: skip
            # Still counted in _size, reachable only from this thread.
            defer = off_thread or (
                reset
                and self._background_reset
                and not self._waiters
                and status is not TxStatus.ACTIVE
                and status is not TxStatus.UNKNOWN
            )
            if defer:
                self._resetting += 1
            if self._bound_restore:
                self._restoring[conn] = now
        if defer:
            resetter().submit(self, conn, status, reset)
            return
        self._restore(conn, status, reset)

    def _restore(
        self, conn: _Conn, status: TxStatus, reset: bool, *, deferred: bool = False
    ) -> None:
        """Bring a connection nobody holds back to its baseline, then give it back;
        close it if that fails. Exception-safe: whatever is raised (even
        ``KeyboardInterrupt``), the connection is given back or closed, never lost.
        ``deferred``: called by the resetter for a connection counted in ``resetting``.

        With ``socket_timeout`` set, a rollback or reset that has not returned that
        long after the release (a dead network: nothing else ends it, the connection
        is no longer leased) is ended by housekeeping (see ``_restoring``): its socket
        is shut down, the call fails, and the connection is closed (also should the
        call return by itself once the abort is decided)."""
        reason: str | None = "reset_failed"
        try:
            if status is TxStatus.ACTIVE:
                # Abandoned mid-statement (a stream left half read): cancel first, so
                # the server stops the statement before the slot is freed.
                self.driver.cancel(conn.raw)
                reason = "broken"
            elif status is TxStatus.UNKNOWN:
                reason = "broken"
            else:
                try:
                    if reset:
                        self.driver.reset(conn.raw)
                    elif status in _ROLLBACK_STATES:
                        self.driver.rollback(conn.raw)
                    reason = None
                except Exception as exc:
                    logger.debug("pool %r: reset failed, closing: %s", self.name, one_line(exc))
        finally:
            now = self._clock()
            close = True
            # Under _abort_guard from here to the give-back: no abort decided after
            # it, and one decided before it closes the connection.
            with self._abort_guard, self._lock:
                if self._restoring and self._restoring.pop(conn, None) == math.inf:
                    if reason is None:
                        reason = "reset_failed"  # aborted: returned by itself, too late
                    if conn in self._aborting:  # the abort still runs: it closes
                        self._aborting[conn] = True
                        close = False
                self._n_resets += 1
                if deferred:
                    self._resetting -= 1
                if reason is None:
                    if self._closed:
                        reason = "pool_closed"
                    elif now >= conn.expires_at:
                        reason = self._expired
                    else:
                        self._give_back_locked(conn, now)
                if reason is not None:
                    self._closing += 1
                    self._n_closed[reason] += 1
                    if status is TxStatus.UNKNOWN:  # it died in its holder's hands
                        self._suspect_idle_locked()
            if reason is not None and close:
                self._close_conn(conn)

    def _retire_lease_locked(self, lease: Lease, now: float) -> None:
        lease._conn = None
        lease.released_at = now
        self._leases.pop(lease._ref, None)
        lease._ref = None  # dies with no callback: the lease was returned
        self._n_releases += 1
        self._h_hold.record(now - lease.acquired_at)
        if lease.leak_reported:
            self._log_leak_returned(lease, now)

    def _log_leak_returned(self, lease: Lease, now: float) -> None:
        logger.warning(
            "pool %r: lease reported as a leak was returned after %.1f s (thread %s)",
            self.name,
            now - lease.acquired_at,
            lease.thread_name,
        )

    def _give_back_locked(self, conn: _Conn, now: float) -> None:
        """Hand ``conn`` to the first waiter, or make it idle. Caller holds the lock."""
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.lease = self._new_lease_locked(conn, now, waiter.owner, waiter.thread_id)
            # Recorded here, under the lock this thread already holds: the woken
            # waiter would otherwise take the pool's lock once more, just for this.
            self._h_wait.record(_monotonic() - waiter.since)
            waiter.event.release()
        else:
            conn.idle_since = now
            self._idle.append(conn)

    def _end_lease(
        self, lease: Lease, reason: str, *, health: bool = False, close: bool = True
    ) -> None:
        """End ``lease`` and close its connection (outside the lock). Only for a
        lease nobody is using (a failed health check, a closed pool, a lifetime).
        ``close=False``: another thread owns the connection and closes it."""
        now = self._clock()
        with self._lock:
            conn = lease._conn
            if conn is None:
                return
            lease._conn = None
            lease.released_at = now
            lease.cleanup = reason
            self._leases.pop(lease._ref, None)
            lease._ref = None
            if health:
                self._n_acquires -= 1  # it never reached the caller
                if reason == "broken":
                    self._n_health_failures += 1
            else:
                self._n_releases += 1
                self._h_hold.record(now - lease.acquired_at)
            self._closing += 1
            self._n_closed[reason] += 1
            if reason == "broken":
                self._suspect_idle_locked()
        if close:
            self._close_conn(conn)

    def _suspect_idle_locked(self) -> None:
        """A connection was found dead: ping every idle one before its next use.

        Whatever killed one (a restart, a failover, ``pg_terminate_backend`` of the
        pool's backends, a cut network) has often killed them all; the cheap liveness
        test sees a server that said goodbye, only a round trip sees a silent one.
        O(idle), at most ``max_size``. Caller holds the lock."""
        for conn in self._idle:
            conn.suspect = True

    def _close_conn(self, conn: _Conn) -> None:
        """Close a connection already counted in ``_closing``; free its slot."""
        try:
            if conn.pid == os.getpid():
                self.driver.close(conn.raw)
            else:
                self.driver.drop(conn.raw)
        finally:
            conn.abandoned = None  # streams left half read: finished now, with nothing to do
            with self._lock:
                self._closing -= 1
                self._size -= 1
                openers = request_open_locked(self)
            start_openers(self, openers)

    def housekeep(self) -> None:
        """Retire old and surplus idle connections, refill to ``min_size``, report
        leases held past ``leak_threshold``, and take back leases nobody will return
        (see :mod:`connguard.pool.maintenance`). The housekeeping thread calls it."""
        housekeep(self)

    # ------------------------------------------------------------------ close, stats

    def close(self) -> None:
        """Close the pool: refuse acquires, wake every waiter with ``PoolClosed``,
        close idle connections now and in-use ones as they come back."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle, self._idle = self._idle, []
            self._closing += len(idle)
            self._n_closed["pool_closed"] += len(idle)
            while self._waiters:
                waiter = self._waiters.popleft()
                waiter.error = self._error(PoolClosed, "the pool was closed while waiting")
                waiter.event.release()
        self._wake_opener.set()
        for conn in idle:
            self._close_conn(conn)
        with self._lock:
            done = not self._leases and not self._resetting and not self._restoring
        if done:
            # Otherwise housekeeping keeps visiting: leases dropped or revoked after
            # the close still need their connections closed, and a reset stalled past
            # socket_timeout its abort (it holds the process's resetter).
            housekeeper().unregister(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> PoolStats:
        """One consistent snapshot of gauges, counters and histograms."""
        with self._lock:
            return PoolStats(
                name=self.name,
                driver=self.driver.name,
                size=self._size,
                idle=len(self._idle),
                in_use=len(self._leases),
                waiting=len(self._waiters),
                opening=self._opening,
                closing=self._closing,
                resetting=self._resetting,
                max_size=self.config.max_size,
                min_size=self.config.min_size,
                acquires=self._n_acquires,
                waits=self._n_waits,
                timeouts=self._n_timeouts,
                refusals=self._n_refusals,
                releases=self._n_releases,
                resets=self._n_resets,
                opened=self._n_opened,
                connect_errors=self._n_connect_errors,
                health_check_failures=self._n_health_failures,
                leaks=self._n_leaks,
                reclaims=self._n_reclaims,
                dropped=self._n_dropped,
                revoked=self._n_revoked,
                aborted=self._n_aborted,
                closed=dict(self._n_closed),
                acquire_wait=self._h_wait.snapshot(zeros=self._n_acquires - self._h_wait.count),
                hold_time=self._h_hold.snapshot(),
                connect_time=self._h_connect.snapshot(),
            )

    def leases(self) -> list[Lease]:
        """The active leases, oldest first (a copy)."""
        with self._lock:
            found = [lease for ref in self._leases if (lease := ref()) is not None]
        return sorted(found, key=lambda lease: lease.acquired_at)

    def connection(self, timeout: float | None = None) -> _LeasedConnection:
        """``with pool.connection() as conn:`` leases a connection for the block.

        ``conn`` is a :class:`FencedConnection`. Nothing is committed for you: an open
        transaction left at the end is rolled back when the connection goes back.
        """
        return _LeasedConnection(self, timeout)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Pool {self.name!r} {self._counts_locked()}{' closed' if self._closed else ''}>"

    # ------------------------------------------------------------------ internals

    def _counts_locked(self) -> PoolCounts:
        return PoolCounts(
            size=self._size,
            in_use=len(self._leases),
            idle=len(self._idle),
            waiting=len(self._waiters),
            opening=self._opening,
        )

    def _error(self, cls: type[PoolError], detail: str) -> PoolError:
        """Build a driver-specialized error naming the pool and its counts."""
        counts = self._counts_locked()
        message = (
            f"connguard pool {self.name!r} ({self.driver.name}, max_size="
            f"{self.config.max_size}): {detail} [{counts}]"
        )
        return self._errors[cls](message, pool=self.name, counts=counts)

    def _check_invariants(self) -> None:
        """Assert the bookkeeping adds up (tests call this; cheap enough to keep)."""
        with self._lock:
            in_transit = self._size - len(self._idle) - len(self._leases)
            assert self._size <= self.config.max_size, (self._size, self.config.max_size)
            busy = self._opening + self._closing + self._resetting
            assert in_transit >= busy, self._counts_locked()
            assert not (self._idle and self._waiters), self._counts_locked()
            ids = [id(c) for c in self._idle] + [id(c) for c in self._leases.values()]
            assert len(ids) == len(set(ids)), "a connection is idle and leased, or leased twice"


class _LeasedConnection:
    """What :meth:`Pool.connection` returns (a class: cheaper than a generator)."""

    __slots__ = ("_lease", "_pool", "_timeout")

    def __init__(self, pool: Pool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._lease: Lease | None = None

    def __enter__(self) -> FencedConnection:
        self._lease = lease = self._pool.acquire(self._timeout)
        return lease.connection

    def __exit__(self, *exc: object) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            self._pool.release(lease)


def _any_statement(sql: Any) -> bool:
    """A driver that cannot tell which statements change session state: any may."""
    return True
