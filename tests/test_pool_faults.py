"""The engine when the database has a bad day (issue 10), on the fake driver: dead
idle connections are never handed out, one dead connection makes the others suspect,
a waiting caller is not held back by a backoff grown during an outage, and an outage
is told apart from overload.

The same faults through real servers and a real PostgreSQL are in
``tests/test_fault_servers.py``.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from connguard.pool import ConnectFailed, Pool, PoolConfig, PoolRefused, PoolTimeout, TxStatus

from .fakes import FakeConnection, FakeDriver, FakeOperationalError, ManualClock, wait_until


def make_pool(driver: FakeDriver, clock: ManualClock | None = None, **settings: object) -> Pool:
    settings.setdefault("min_size", 0)
    return Pool(
        driver,
        PoolConfig(**settings),  # type: ignore[arg-type]
        name="faults",
        clock=clock or ManualClock(),
        housekeeping=False,
    )


def conn_of(lease: object) -> FakeConnection:
    c = lease.raw  # type: ignore[attr-defined]
    assert isinstance(c, FakeConnection)
    return c


def fill_idle(pool: Pool, count: int) -> list[FakeConnection]:
    """Open ``count`` connections and leave them idle (most recent last) for 150 ms,
    the issue's scenario: past ``liveness_after_idle`` (1 ms), so checkouts test them."""
    leases = [pool.acquire() for _ in range(count)]
    conns = [conn_of(lease) for lease in leases]
    for lease in leases:
        lease.release()
    clock = pool._clock
    assert isinstance(clock, ManualClock)
    clock.advance(0.15)
    return conns


def test_a_connection_killed_a_moment_ago_is_never_handed_out() -> None:
    """The issue's first break: a backend terminated 150 ms after its connection went
    idle was handed out untested (inside the 0.5 s bypass window) and the request's
    first statement failed. Now a connection not known alive for 1 ms is tested; with
    ``liveness_after_idle=0``, every checkout, with no clock advance at all."""
    driver = FakeDriver()
    pool = make_pool(driver, max_size=2)
    (conn,) = fill_idle(pool, 1)
    conn.alive = False  # pg_terminate_backend: the server said goodbye on the socket
    lease = pool.acquire()
    assert conn_of(lease) is not conn and conn.closed
    stats = pool.stats()
    assert stats.health_check_failures == 1 and stats.closed["broken"] == 1
    lease.release()
    pool.close()

    every = make_pool(FakeDriver(), max_size=2, liveness_after_idle=0)
    first = every.acquire()
    conn = conn_of(first)
    first.release()
    conn.alive = False
    lease = every.acquire()  # the same instant
    assert conn_of(lease) is not conn and conn.closed
    lease.release()
    every.close()


def test_one_dead_connection_makes_every_idle_one_get_a_ping() -> None:
    """A restart or failover kills every connection; a cut network kills them
    silently (no goodbye for the cheap test to see). Once one is found dead, the
    others are pinged before their next use, and the dead ones are replaced."""
    driver = FakeDriver()
    clock = ManualClock()
    pool = make_pool(driver, clock, max_size=4)
    healthy, silent, dead = fill_idle(pool, 3)  # LIFO: `dead` comes out first
    dead.alive = False
    silent.silent = True  # passes the cheap test, fails a round trip
    got = [pool.acquire() for _ in range(3)]
    conns = [conn_of(lease) for lease in got]
    assert dead not in conns and silent not in conns and healthy in conns
    assert dead.closed and silent.closed
    assert silent.pings == 1 and healthy.pings == 1
    assert dead.pings == 0, "found dead without a round trip"
    for lease in got:
        lease.release()
    # A ping that succeeded cleared the suspicion: no further round trips.
    again = [pool.acquire() for _ in range(3)]
    assert healthy in [conn_of(lease) for lease in again]
    assert healthy.pings == 1
    for lease in again:
        lease.release()
    assert pool.stats().closed["broken"] == 2
    pool.close()


def test_a_connection_that_broke_in_use_makes_the_idle_ones_suspect() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, max_size=3)
    held = pool.acquire()
    idle_silent, idle_ok = fill_idle(pool, 2)
    idle_silent.silent = True
    conn_of(held).alive = False  # its statement failed: server gone
    held.release()  # UNKNOWN status: closed as broken
    leases = [pool.acquire(), pool.acquire()]
    conns = [conn_of(lease) for lease in leases]
    assert idle_silent not in conns and idle_silent.closed
    assert idle_ok in conns and idle_ok.pings == 1
    for lease in leases:
        lease.release()
    pool.close()


def test_a_failing_liveness_test_never_strands_the_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever the liveness test raises (here a KeyboardInterrupt from a signal),
    the connection is closed and its slot freed, not left on a half-made lease."""
    driver = FakeDriver()
    pool = make_pool(driver, max_size=1)
    (conn,) = fill_idle(pool, 1)

    def interrupted(c: FakeConnection) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(pool, "_is_alive", interrupted)  # the pool binds it once
    with pytest.raises(KeyboardInterrupt):
        pool.acquire()
    monkeypatch.undo()
    assert conn.closed
    wait_until(lambda: pool.stats().size == 0)
    pool.acquire(timeout=2).release()  # the slot is usable again
    pool.close()


def test_a_waiting_caller_is_not_held_back_by_a_backoff_grown_during_an_outage() -> None:
    """The issue's second break: after a long outage the backoff had grown to its
    maximum, so the site kept failing for seconds after the database returned. A
    caller that waits makes the opener try again ``reconnect_backoff`` after its last
    attempt, whatever the grown backoff."""
    driver = FakeDriver()
    driver.fail_connect = FakeOperationalError("connection refused")  # down at start
    pool = make_pool(
        driver, min_size=1, max_size=2, reconnect_backoff=0.02, reconnect_backoff_max=60.0
    )
    wait_until(lambda: pool.stats().connect_errors >= 1)
    with pool._lock:  # as after a long outage: the next unprompted attempt is 60 s away
        pool._backoff_delay = 60.0
    pool._wake_opener.set()  # the sleeping opener takes the new delay
    attempts = driver.connects
    driver.fail_connect = None  # the database is back
    lease = pool.acquire(timeout=3)  # without the fix: PoolTimeout after 3 s
    assert driver.connects == attempts + 1
    lease.release()
    pool.close()


def test_the_database_is_not_hammered_while_callers_wait() -> None:
    """Waiting callers shorten the backoff to ``reconnect_backoff``, not to zero: one
    opener, one attempt per interval, however many callers wait."""
    driver = FakeDriver()
    pool = make_pool(driver, max_size=8, reconnect_backoff=0.05, reconnect_backoff_max=0.05)
    driver.fail_connect = FakeOperationalError("connection refused")
    errors: list[BaseException] = []

    def call() -> None:
        try:
            pool.acquire(timeout=0.5)
        except ConnectFailed as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    assert len(errors) == 8
    # one attempt at once, then one per >= 0.04 s (0.05 minus at most 20 % jitter)
    assert driver.connects <= 1 + elapsed / 0.04
    pool.close()


def test_an_outage_is_not_called_overload_even_with_leases_out() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, max_size=2, reconnect_backoff=0.01, reconnect_backoff_max=0.01)
    held = pool.acquire()  # a request still holding a connection from before
    driver.fail_connect = FakeOperationalError("connection refused")
    with pytest.raises(ConnectFailed) as info:
        pool.acquire(timeout=0.1)
    assert "unreachable" in str(info.value) and "connection refused" in str(info.value)
    held.release()
    pool.close()


def test_a_full_pool_with_a_healthy_database_is_overload() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, max_size=1)
    held = pool.acquire()
    with pytest.raises(PoolTimeout) as info:
        pool.acquire(timeout=0.05)
    assert not isinstance(info.value, ConnectFailed)
    assert "unreachable" not in str(info.value)
    held.release()
    pool.close()


def start_waiting(pool: Pool, count: int, timeout: float) -> list[threading.Thread]:
    """``count`` callers that wait in ``pool`` (whatever they get in the end is
    ignored); returns once they all wait."""
    before = len(pool._waiters)

    def call() -> None:
        try:
            pool.acquire(timeout=timeout).release()
        except PoolTimeout:
            pass

    threads = [threading.Thread(target=call, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    wait_until(lambda: len(pool._waiters) == before + count)
    return threads


def test_an_outage_is_not_called_overload_when_max_waiting_is_reached() -> None:
    """During an outage the callers past ``max_waiting`` are refused at once as
    before, but with ``ConnectFailed`` ("unreachable"), not ``PoolRefused``
    ("overloaded": this process is saturated, retry elsewhere): every instance sees
    the same database. Once a connect succeeds again, a full queue is overload again."""
    driver = FakeDriver()
    pool = make_pool(
        driver, max_size=2, max_waiting=1, reconnect_backoff=0.01, reconnect_backoff_max=0.01
    )
    driver.fail_connect = FakeOperationalError("connection refused")
    waiters = start_waiting(pool, 1, timeout=0.5)
    wait_until(lambda: pool.stats().connect_errors >= 1)
    started = time.monotonic()
    with pytest.raises(ConnectFailed) as info:
        pool.acquire(timeout=5)
    assert time.monotonic() - started < 0.5, "refused at once, not after a wait"
    assert "unreachable" in str(info.value) and "max_waiting=1" in str(info.value)
    assert "connection refused" in str(info.value)
    assert isinstance(info.value.__cause__, FakeOperationalError)
    assert pool.stats().refusals == 1
    for t in waiters:
        t.join()

    driver.fail_connect = None  # the database is back: the next connect succeeds
    held = [pool.acquire(timeout=5), pool.acquire(timeout=5)]
    waiters = start_waiting(pool, 1, timeout=5)
    with pytest.raises(PoolRefused) as refused:  # full and healthy: overload
        pool.acquire(timeout=5)
    assert not isinstance(refused.value, ConnectFailed)
    for lease in held:
        lease.release()
    for t in waiters:
        t.join()
    pool.close()


def test_an_outage_with_leases_out_is_still_an_outage_at_max_waiting() -> None:
    """A lease opened before the outage does not make it overload: the caller needs
    a new connection and the pool cannot open one (the same answer as a caller
    that waits out its timeout, above)."""
    driver = FakeDriver()
    pool = make_pool(
        driver, max_size=2, max_waiting=1, reconnect_backoff=0.01, reconnect_backoff_max=0.01
    )
    held = pool.acquire()
    driver.fail_connect = FakeOperationalError("connection refused")
    waiters = start_waiting(pool, 1, timeout=0.5)
    wait_until(lambda: pool.stats().connect_errors >= 1)
    with pytest.raises(ConnectFailed):
        pool.acquire(timeout=5)
    for t in waiters:
        t.join()
    held.release()
    pool.close()


def test_an_old_connect_error_does_not_make_a_burst_an_outage() -> None:
    """A connect that failed long ago, while the pool went on serving from the
    connections it had, is no news about now: a burst that fills the queue while the
    next connect is still under way is refused as overload."""
    driver = FakeDriver()
    pool = make_pool(
        driver, max_size=3, max_waiting=1, reconnect_backoff=0.01, reconnect_backoff_max=0.01
    )
    held = [pool.acquire(), pool.acquire()]
    driver.fail_connect = FakeOperationalError("too many clients already")
    with pytest.raises(ConnectFailed):
        pool.acquire(timeout=0.1)
    wait_until(lambda: pool.stats().opening == 0)  # nobody waits: the opener gave up
    with pool._lock:  # as long ago as the pool would have retried in an outage
        pool._failed_at -= pool.config.connect_timeout + pool.config.reconnect_backoff_max + 1
    driver.fail_connect = None
    gate = driver.connect_gate = threading.Event()  # the next connect is under way
    waiters = start_waiting(pool, 1, timeout=5)
    with pytest.raises(PoolRefused) as info:
        pool.acquire(timeout=5)
    assert not isinstance(info.value, ConnectFailed)
    gate.set()
    for t in waiters:
        t.join()
    for lease in held:
        lease.release()
    pool.close()


def test_a_hung_first_connect_is_unreachable_at_timeout_but_refusals_cannot_tell() -> None:
    """A network black hole: the first connect hangs and nothing has failed yet. A
    caller that waits out its timeout with no connection in use (the pool had only
    the database to wait for) is told ``ConnectFailed``. A caller past
    ``max_waiting`` at that moment gets ``PoolRefused``: nothing has been waited for
    yet, and a cold pool's first connects to a healthy database look the same."""
    driver = FakeDriver()
    gate = driver.connect_gate = threading.Event()  # connects hang until set
    pool = make_pool(driver, max_size=2, max_waiting=1, connect_timeout=30)
    waiters = start_waiting(pool, 1, timeout=30)
    with pytest.raises(PoolRefused) as refused:
        pool.acquire(timeout=5)
    assert not isinstance(refused.value, ConnectFailed)
    gate.set()  # the database answers: the waiter is served
    for t in waiters:
        t.join()
    pool.close()

    driver = FakeDriver()
    gate = driver.connect_gate = threading.Event()
    pool = make_pool(driver, max_size=2, connect_timeout=30)
    with pytest.raises(ConnectFailed) as info:
        pool.acquire(timeout=0.1)
    assert "unreachable" in str(info.value) and "no connect has completed" in str(info.value)
    assert info.value.__cause__ is None
    gate.set()
    pool.close()


def test_connect_error_kept_by_the_pool_holds_no_frames() -> None:
    """The error an opener thread caught is chained to the caller's ``ConnectFailed``
    without its traceback: the driver's frames hold the conninfo (with the password),
    and they belong to another thread anyway."""
    driver = FakeDriver()
    pool = make_pool(driver, max_size=1, reconnect_backoff=0.01, reconnect_backoff_max=0.01)
    driver.fail_connect = FakeOperationalError("connection refused")
    with pytest.raises(ConnectFailed) as info:
        pool.acquire(timeout=0.05)
    cause = info.value.__cause__
    assert isinstance(cause, FakeOperationalError)
    assert cause.__traceback__ is None
    pool.close()


def test_lease_ended_says_why() -> None:
    """A holder that finds its lease ended is told whether it released it itself,
    another thread revoked it mid-use, or the pool took it back from an ended owner."""
    from connguard.pool import LeaseEnded

    driver = FakeDriver()
    pool = make_pool(driver, max_size=3)

    released = pool.acquire()
    released.release()
    with pytest.raises(LeaseEnded, match="it was released;"):
        released.enter()

    revoked = pool.acquire()
    revoked.enter()  # a use in progress (a statement running in this thread)
    threading.Thread(target=revoked.release).start()
    wait_until(lambda: conn_of_ended(revoked))
    revoked.exit()  # the use ends; the release finishes
    with pytest.raises(LeaseEnded, match=r"another thread while this code was using it"):
        revoked.enter()

    class Owner:
        ended = False

    owner = Owner()
    orphan = pool.acquire(owner=owner)
    owner.ended = True  # its request ended without giving it back
    pool.housekeep()
    with pytest.raises(LeaseEnded, match="the request or scope it belonged to has ended"):
        orphan.enter()
    pool.close()


def conn_of_ended(lease: object) -> bool:
    return bool(lease._ending)  # type: ignore[attr-defined]


def test_a_call_blocked_past_socket_timeout_is_aborted_once() -> None:
    """``socket_timeout``: a use that has not returned for that long (a server that
    stopped answering) gets its socket shut down, once; a lease whose uses move on,
    or that is merely held, is left alone."""
    driver = FakeDriver()
    clock = ManualClock()
    pool = make_pool(driver, clock, max_size=3, socket_timeout=5.0)
    blocked, working, holding = pool.acquire(), pool.acquire(), pool.acquire()
    blocked.enter()  # a statement sent into a black hole: never returns
    working.enter()
    pool.housekeep()  # first sight of both uses
    for _ in range(6):
        clock.advance(1.0)
        working.exit()  # this one's calls return and new ones begin
        working.enter()
        pool.housekeep()
    assert conn_of(blocked).aborts == 1
    assert conn_of(working).aborts == 0 and conn_of(holding).aborts == 0
    working.exit()  # idle between statements now: held, not blocked
    clock.advance(10.0)
    pool.housekeep()
    assert conn_of(blocked).aborts == 1, "a use is aborted once"
    assert pool.stats().aborted == 1
    # The holder's call fails (its socket is gone); the lease ends; the slot is freed.
    blocked.exit()
    dead = conn_of(blocked)
    blocked.release()
    assert dead.closed and pool.stats().closed["broken"] == 1
    working.release()
    holding.release()
    pool.close()


def test_socket_timeout_off_by_default_aborts_nothing() -> None:
    driver = FakeDriver()
    clock = ManualClock()
    pool = make_pool(driver, clock, max_size=1)
    lease = pool.acquire()
    lease.enter()
    pool.housekeep()
    clock.advance(3600.0)
    pool.housekeep()
    assert conn_of(lease).aborts == 0
    lease.exit()
    lease.release()
    pool.close()


def test_housekeeping_replaces_idle_connections_found_dead() -> None:
    """A pool whose idle backends were terminated refills in the background: nobody
    has to check one out to find it dead, and the server again sees ``min_size``."""
    driver = FakeDriver()
    pool = make_pool(driver, min_size=2, max_size=3)
    wait_until(lambda: pool.stats().idle == 2)
    with pool._lock:
        first, second = (conn.raw for conn in pool._idle)
    first.alive = False
    second.alive = False
    pool.housekeep()
    assert first.closed and second.closed
    wait_until(lambda: pool.stats().idle == 2 and driver.live == 2)
    assert pool.stats().closed["broken"] == 2
    pool.close()


def test_reuse_false_gives_each_lease_its_own_connection() -> None:
    """``reuse=False`` (Django's ``OPTIONS["pool"] = False``): a connection per lease,
    closed when it ends, and still at most ``max_size`` at once."""
    driver = FakeDriver()
    pool = make_pool(driver, max_size=2, reuse=False)
    first = pool.acquire()
    conn = conn_of(first)
    first.release()
    assert conn.closed
    second = pool.acquire()
    assert conn_of(second) is not conn
    third = pool.acquire()
    with pytest.raises(PoolTimeout):
        pool.acquire(timeout=0.05)
    third.release()
    second.release()
    assert driver.live == 0 and driver.max_live == 2
    stats = pool.stats()
    assert stats.closed["single_use"] == 3 and stats.health_check_failures == 0
    pool.close()


def test_reuse_false_with_min_size_is_refused() -> None:
    from connguard.pool import PoolConfigError

    with pytest.raises(PoolConfigError, match="min_size must be 0 when reuse is False"):
        PoolConfig(min_size=1, reuse=False)


def test_an_expired_idle_connection_is_retired_not_counted_broken() -> None:
    """A connection past its lifetime met at checkout is retired ("lifetime"): not a
    failed health check, and no reason to suspect the other idle connections."""
    driver = FakeDriver()
    clock = ManualClock()
    pool = make_pool(driver, clock, max_size=3, max_lifetime=100.0, lifetime_jitter=0.0)
    old, other = fill_idle(pool, 2)
    clock.advance(101.0)
    fresh = pool.acquire()
    stats = pool.stats()
    assert stats.health_check_failures == 0 and stats.closed["broken"] == 0
    assert stats.closed["lifetime"] >= 1
    assert other.pings == 0 and old.pings == 0
    fresh.release()
    pool.close()


def test_a_refusal_fails_the_waiting_callers_at_once() -> None:
    """Bad credentials or a database that does not exist are not an outage: waiting
    would not help, so the callers waiting get ``ConnectFailed`` with the server's
    reason at once, not at their ``timeout``."""
    driver = FakeDriver()
    driver.refused = lambda exc: "FATAL" in str(exc)  # type: ignore[attr-defined]
    driver.fail_connect = FakeOperationalError('FATAL:  database "nope" does not exist')
    pool = make_pool(driver, max_size=2, reconnect_backoff=0.01, reconnect_backoff_max=0.01)
    started = time.monotonic()
    with pytest.raises(ConnectFailed) as info:
        pool.acquire(timeout=30)
    assert time.monotonic() - started < 10, "failed at once, not at its timeout"
    assert "refused" in str(info.value) and "does not exist" in str(info.value)
    assert isinstance(info.value.__cause__, FakeOperationalError)
    driver.fail_connect = None  # fixed: the next caller is served
    pool.acquire(timeout=5).release()
    pool.close()


def test_an_outage_still_waits_for_the_timeout() -> None:
    driver = FakeDriver()
    driver.refused = lambda exc: "FATAL" in str(exc)  # type: ignore[attr-defined]
    driver.fail_connect = FakeOperationalError("connection refused")  # no answer at all
    pool = make_pool(driver, max_size=2, reconnect_backoff=0.01, reconnect_backoff_max=0.01)
    gate = threading.Event()

    def back_soon() -> None:
        wait_until(lambda: pool.stats().connect_errors >= 2)
        driver.fail_connect = None
        gate.set()

    helper = threading.Thread(target=back_soon)
    helper.start()
    pool.acquire(timeout=10).release()  # rode through the outage
    helper.join()
    assert gate.is_set()
    pool.close()


def test_a_refusal_with_leases_out_lets_the_waiters_wait() -> None:
    """At a connection limit the pool's own leases come back: a refused new connection
    must not fail callers that a returned one would serve."""
    driver = FakeDriver()
    driver.refused = lambda exc: "FATAL" in str(exc)  # type: ignore[attr-defined]
    pool = make_pool(driver, max_size=2, reconnect_backoff=0.01, reconnect_backoff_max=0.01)
    held = pool.acquire()
    first = conn_of(held)
    driver.fail_connect = FakeOperationalError("FATAL:  password authentication failed")
    threading.Timer(0.2, held.release).start()
    lease = pool.acquire(timeout=5)  # served by the returned connection
    assert conn_of(lease) is first
    lease.release()
    pool.close()


def test_after_a_refusal_waiting_callers_do_not_shorten_the_backoff() -> None:
    """A bad password must not be tried twice a second because callers keep coming."""
    driver = FakeDriver()
    driver.refused = lambda exc: "FATAL" in str(exc)  # type: ignore[attr-defined]
    driver.fail_connect = FakeOperationalError("FATAL:  password authentication failed")
    pool = make_pool(driver, max_size=2, reconnect_backoff=0.05, reconnect_backoff_max=60.0)
    with pytest.raises(ConnectFailed):
        pool.acquire(timeout=3)
    with pool._lock:  # as after a few refusals: the backoff has grown
        pool._backoff_delay = 60.0
    attempts = driver.connects
    with pytest.raises(ConnectFailed):
        pool.acquire(timeout=0.3)  # within the backoff: no new attempt for it
    assert driver.connects == attempts
    pool.close()


def test_an_aborted_call_gets_a_cancel_and_its_connection_a_reset() -> None:
    """``socket_timeout``: a cancel goes first (a server that still answers stops the
    statement), and should the call have returned just before the abort, the
    connection goes through a full reset (which fails on a shut-down socket, so it is
    closed) instead of back to the idle set as it is."""
    driver = FakeDriver()
    clock = ManualClock()
    pool = make_pool(driver, clock, max_size=1, socket_timeout=1.0)
    lease = pool.acquire()
    conn = conn_of(lease)
    aborted: list[FakeConnection] = []
    driver.abort = aborted.append  # type: ignore[method-assign]  # the socket reads idle
    lease.enter()
    pool.housekeep()
    clock.advance(2.0)
    pool.housekeep()
    assert aborted == [conn]
    wait_until(lambda: conn.cancels == 1)
    lease.exit()
    conn.session_dirty = True
    lease.release()
    assert not conn.session_dirty, "a full reset ran before any reuse"
    pool.close()


def test_housekeeping_goes_on_when_the_liveness_test_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    driver = FakeDriver()
    pool = make_pool(driver, max_size=2)
    fill_idle(pool, 2)

    class Owner:
        ended = True

    orphan = pool.acquire(owner=Owner())

    def broken(conn: FakeConnection) -> bool:
        raise RuntimeError("driver bug")

    monkeypatch.setattr(driver, "is_alive", broken)
    pool.housekeep()  # the idle one is closed in doubt; the orphan still taken back
    assert not orphan.active
    monkeypatch.undo()
    pool.close()


# ------------------------------------------------------------------ the event loop


class IOThreadDriver(FakeDriver):
    """Records which thread made each call that is network I/O on a real driver
    (reset, rollback, cancel): a release made on an event loop's thread must make
    none there, or the whole ASGI worker waits on the database."""

    def __init__(self) -> None:
        super().__init__()
        self.io: list[tuple[str, int]] = []

    def cancel(self, conn: FakeConnection) -> None:
        self.io.append(("cancel", threading.get_ident()))
        super().cancel(conn)

    def rollback(self, conn: FakeConnection) -> None:
        self.io.append(("rollback", threading.get_ident()))
        super().rollback(conn)

    def reset(self, conn: FakeConnection) -> None:
        self.io.append(("reset", threading.get_ident()))
        super().reset(conn)


def on_event_loop(work: Any) -> int:
    """Run ``work()`` inside a coroutine on a running asyncio loop, as an ASGI
    server's middleware does; return that thread's id."""

    async def main() -> int:
        work()
        return threading.get_ident()

    return asyncio.run(main())


def waiting_caller(pool: Pool) -> tuple[threading.Thread, list[Any]]:
    """A thread waiting for a connection (so the release hands its connection on)."""
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)), daemon=True)
    thread.start()
    wait_until(lambda: pool.stats().waiting == 1)
    return thread, got


@pytest.mark.parametrize("state", ["session", "transaction", "both"])
def test_a_release_on_an_event_loop_hands_the_reset_to_a_thread_even_with_a_waiter(
    state: str,
) -> None:
    """The ASGI middleware releases on the event loop. A lease that changed session
    state (the tenant pattern, reset policy "auto") or left a transaction open needs a
    round trip before its connection is handed on: run there, a dead network stops the
    whole worker. It runs on the resetter thread, also with a caller waiting, and that
    caller then gets the connection, clean."""
    driver = IOThreadDriver()
    pool = make_pool(driver, max_size=1)
    lease = pool.acquire()
    conn = conn_of(lease)
    if state in ("session", "both"):
        lease.note_statement("SELECT set_config('app.tenant', '7', false)")
        conn.session_dirty = True
    if state in ("transaction", "both"):
        conn.status = TxStatus.INTRANS
    waiter, got = waiting_caller(pool)
    loop_thread = on_event_loop(lease.release)
    waiter.join(5)
    assert got and conn_of(got[0]) is conn
    assert conn.status is TxStatus.IDLE
    assert not conn.session_dirty or state == "transaction"
    assert driver.io and all(thread != loop_thread for _, thread in driver.io), driver.io
    assert pool.stats().resetting == 0
    got[0].release()
    pool.close()


def test_a_release_on_an_event_loop_of_an_abandoned_statement_cancels_off_the_loop() -> None:
    """A lease released mid-statement (a stream left half read) in the loop's own
    thread: the cancel opens a connection to the server, so it too runs elsewhere;
    the connection is closed and its slot freed."""
    driver = IOThreadDriver()
    pool = make_pool(driver, max_size=1)
    conns: list[FakeConnection] = []

    def take_and_abandon() -> None:
        lease = pool.acquire()
        conns.append(conn_of(lease))
        conns[0].status = TxStatus.ACTIVE
        lease.release()

    loop_thread = on_event_loop(take_and_abandon)
    wait_until(lambda: conns[0].closed)
    assert [name for name, _ in driver.io] == ["cancel"]
    assert driver.io[0][1] != loop_thread
    wait_until(lambda: pool.stats().size == 0)
    pool.close()


def test_a_release_on_an_event_loop_of_a_statement_run_outside_the_fence() -> None:
    """Under ASGI the lease was taken in a worker thread and is released on the loop's:
    a statement still running on the raw connection is cancelled, off the loop, and
    the lease finished once the statement has ended."""
    driver = IOThreadDriver()
    pool = make_pool(driver, max_size=1)
    taken: list[Any] = []
    worker = threading.Thread(target=lambda: taken.append(pool.acquire()))  # sync_to_async's
    worker.start()
    worker.join(5)
    (lease,) = taken
    conn = conn_of(lease)
    conn.status = TxStatus.ACTIVE  # run on the raw connection, outside the fence
    loop_thread = on_event_loop(lease.release)
    wait_until(lambda: conn.cancels == 1)
    assert driver.io[0][1] != loop_thread
    conn.status = TxStatus.IDLE  # the statement ended
    pool.housekeep()
    assert pool.stats().idle == 1 and pool.stats().in_use == 0
    assert conn.cancels == 1, "one cancel"
    pool.close()


def test_a_revoke_on_an_event_loop_cancels_off_the_loop() -> None:
    """A scope ended on the loop while a worker thread runs a statement on its lease
    (an executor job the view stopped waiting for): the lease is fenced at once, the
    cancel goes from another thread, and the last use out gives the connection back."""
    driver = IOThreadDriver()
    pool = make_pool(driver, max_size=1)
    lease = pool.acquire()
    conn = conn_of(lease)
    inside = threading.Event()
    leave = threading.Event()

    def statement() -> None:
        lease.enter()
        inside.set()
        leave.wait(5)
        lease.exit()

    worker = threading.Thread(target=statement, daemon=True)
    worker.start()
    assert inside.wait(5)
    loop_thread = on_event_loop(lease.release)
    assert not lease.active, "fenced at once"
    wait_until(lambda: conn.cancels == 1)
    assert driver.io == [("cancel", driver.io[0][1])] and driver.io[0][1] != loop_thread
    assert pool.stats().revoked == 1
    leave.set()
    worker.join(5)
    wait_until(lambda: pool.stats().idle == 1)
    assert pool.stats().in_use == 0
    pool.close()


class StalledResetDriver(FakeDriver):
    """A reset that never returns until its socket is shut down (a network black
    hole): ``abort`` ends it with the driver's error, as a real socket would."""

    def __init__(self) -> None:
        super().__init__()
        self.unblocked: dict[int, threading.Event] = {}
        self.started = threading.Semaphore(0)

    def _gate(self, conn: FakeConnection) -> threading.Event:
        with self.lock:
            return self.unblocked.setdefault(conn.id, threading.Event())

    def reset(self, conn: FakeConnection) -> None:
        self.started.release()
        self._gate(conn).wait(10)
        if not conn.alive:
            raise FakeOperationalError("server closed the connection unexpectedly")
        super().reset(conn)

    def abort(self, conn: FakeConnection) -> None:
        super().abort(conn)
        self._gate(conn).set()


def test_a_reset_stalled_past_socket_timeout_is_aborted_and_its_slot_freed() -> None:
    """A reset sent into a dead network on a connection nobody holds: housekeeping
    shuts its socket down after ``socket_timeout``, the reset fails, the connection
    is closed and its slot freed. A connection queued behind it on the resetter is
    not left waiting for ever either: it is aborted in the same pass."""
    driver = StalledResetDriver()
    clock = ManualClock()
    pool = make_pool(
        driver, clock, max_size=2, socket_timeout=2.0, reset="always", background_reset=True
    )
    first, second = pool.acquire(), pool.acquire()
    conns = [conn_of(first), conn_of(second)]
    first.release()  # nobody waits: the resetter resets it, and stalls
    second.release()  # queued behind the first
    assert driver.started.acquire(timeout=5)
    assert pool.stats().resetting == 2
    pool.housekeep()
    clock.advance(1.0)
    pool.housekeep()
    assert [c.aborts for c in conns] == [0, 0], "not before socket_timeout"
    clock.advance(1.5)
    pool.housekeep()
    assert [c.aborts for c in conns] == [1, 1]
    wait_until(lambda: all(c.closed for c in conns))
    wait_until(lambda: pool.stats().size == 0)
    stats = pool.stats()
    assert stats.resetting == 0 and stats.closed["reset_failed"] == 2
    assert stats.aborted == 2
    clock.advance(10.0)
    pool.housekeep()
    assert [c.aborts for c in conns] == [1, 1], "aborted once"
    lease = pool.acquire()  # the pool serves again
    driver._gate(conn_of(lease)).set()  # on a network that answers
    lease.release()
    wait_until(lambda: pool.stats().idle == 1)
    pool.close()


def test_a_reset_that_returns_in_time_is_not_aborted() -> None:
    driver = StalledResetDriver()
    clock = ManualClock()
    pool = make_pool(
        driver, clock, max_size=1, socket_timeout=2.0, reset="always", background_reset=True
    )
    lease = pool.acquire()
    conn = conn_of(lease)
    lease.release()
    assert driver.started.acquire(timeout=5)
    clock.advance(1.0)
    pool.housekeep()
    driver._gate(conn).set()  # the server answers
    wait_until(lambda: pool.stats().idle == 1)
    clock.advance(5.0)
    pool.housekeep()
    assert conn.aborts == 0 and not conn.closed
    pool.close()


def _unblock(driver: StalledResetDriver) -> None:
    """Let every stalled reset of ``driver`` return (a test's clean-up)."""
    with driver.lock:
        gates = list(driver.unblocked.values())
    for gate in gates:
        gate.set()
    for conn in driver.opened:
        driver._gate(conn).set()


class CollectingAbortDriver(StalledResetDriver):
    """``abort()`` allocates (libpq's: ``os.dup``, a socket object), and an allocation
    may run the cyclic garbage collector on that thread. Here it always does."""

    def abort(self, conn: FakeConnection) -> None:
        gc.collect()
        super().abort(conn)


def test_an_abandoned_use_collected_during_a_stalled_reset_abort_does_not_deadlock() -> None:
    """Housekeeping aborts a stalled reset; a collection during that abort finishes an
    abandoned use of another lease of the same pool (a generator left in a reference
    cycle, its lease revoked meanwhile), whose exit finishes the release, resets and
    gives the connection back. Housekeeping (the process's one thread) must not
    deadlock on the pool's own locks there."""
    driver = CollectingAbortDriver()
    clock = ManualClock()
    pool = make_pool(driver, clock, max_size=2, socket_timeout=2.0, reset="always")
    stalled = pool.acquire()
    other = pool.acquire()
    driver._gate(conn_of(other)).set()  # its reset answers
    gc.disable()
    try:

        def gen() -> Any:
            with other.using():
                yield 1

        g = gen()
        next(g)  # a use in progress (a stream being read)
        cycle: list[Any] = [g]
        cycle.append(cycle)
        other.release()  # revoked: fenced; the last use out finishes it
        del g, cycle
        releaser = threading.Thread(target=stalled.release, daemon=True)
        releaser.start()  # inline reset (no background_reset): it stalls
        assert driver.started.acquire(timeout=5)
        clock.advance(3.0)
        done = threading.Event()
        hk = threading.Thread(target=lambda: (pool.housekeep(), done.set()), daemon=True)
        hk.start()
        assert done.wait(3.0), "housekeeping deadlocked"
        releaser.join(5)
        wait_until(lambda: pool.stats().in_use == 0 and pool.stats().resetting == 0)
        stats = pool.stats()
        assert stats.closed["reset_failed"] == 1 and stats.idle == 1
    finally:
        gc.enable()
        _unblock(driver)
        pool.close()


class LateAbortDriver(StalledResetDriver):
    """The stalled reset returns by itself (the network healed) just as housekeeping
    aborts it: ``abort()`` lets the reset finish first, then shuts the socket down.
    Records whether the connection had been given on or closed by then."""

    def __init__(self) -> None:
        super().__init__()
        self.pool: Pool | None = None
        self.seen: list[tuple[bool, int]] = []  # (closed, idle count) at the shutdown

    def abort(self, conn: FakeConnection) -> None:
        assert self.pool is not None
        pool = self.pool
        self._gate(conn).set()  # the reset answers, on a live connection
        wait_until(lambda: pool.stats().resetting == 0)  # and _restore has finished
        self.seen.append((conn.closed, pool.stats().idle))
        super().abort(conn)


def test_a_reset_that_returns_while_being_aborted_is_closed_never_given_on() -> None:
    """An abort decided for a stalled reset is never undone and never reaches a next
    holder: the reset returning meanwhile does not give the connection back, and the
    connection is closed only once the abort has let go of its socket."""
    driver = LateAbortDriver()
    clock = ManualClock()
    pool = make_pool(
        driver, clock, max_size=1, socket_timeout=2.0, reset="always", background_reset=True
    )
    driver.pool = pool
    lease = pool.acquire()
    conn = conn_of(lease)
    lease.release()
    assert driver.started.acquire(timeout=5)
    clock.advance(3.0)
    pool.housekeep()
    assert driver.seen == [(False, 0)], "given on, or closed under the abort"
    wait_until(lambda: conn.closed)
    wait_until(lambda: pool.stats().size == 0)
    assert pool.stats().closed["reset_failed"] == 1
    pool.close()


def test_a_reset_stalled_when_the_pool_closes_is_still_aborted_at_socket_timeout() -> None:
    """A reset stalled in a black hole, then the pool is closed (Django's close_pools
    at shutdown, a test's teardown, a settings reload): housekeeping still aborts it
    at ``socket_timeout``, or the process-wide resetter would stay blocked and every
    other pool's deferred resets with it."""
    driver = StalledResetDriver()
    clock = ManualClock()
    pool = make_pool(
        driver, clock, max_size=1, socket_timeout=2.0, reset="always", background_reset=True
    )
    lease = pool.acquire()
    conn = conn_of(lease)
    lease.release()
    assert driver.started.acquire(timeout=5)  # the resetter is in the stalled reset
    try:
        pool.close()
        clock.advance(3.0)
        pool.housekeep()
        pool.housekeep()
        assert conn.aborts == 1, "a stalled reset of a closed pool is never aborted"
        wait_until(lambda: conn.closed)
        wait_until(lambda: pool.stats().size == 0)
    finally:
        _unblock(driver)
        wait_until(lambda: conn.closed)


def housekeeping_hands_off_a_stalled_reset(
    driver: StalledResetDriver,
    clock: ManualClock,
    pool: Pool,
    conn: Any,
    *,
    what: str,
    handed_off: Callable[[], None],
) -> None:
    """Run a housekeeping pass in a thread of its own while the reset of ``conn``
    (a ``what`` lease's) stalls: the pass must return, the reset left to the
    resetter (``handed_off`` checks the pool then); the pass after
    ``socket_timeout`` aborts the reset, and the connection is closed, its slot
    freed. Closes the pool."""
    done = threading.Event()
    hk = threading.Thread(target=lambda: (pool.housekeep(), done.set()), daemon=True)
    hk.start()
    try:
        assert driver.started.acquire(timeout=5)
        assert done.wait(1.0), "the housekeeping thread is stuck in a reset"
        handed_off()
        clock.advance(3.0)
        pool.housekeep()
        assert conn.aborts == 1, f"the {what} lease's stalled reset is not aborted"
        wait_until(lambda: conn.closed)
        wait_until(lambda: pool.stats().size == 0)
    finally:
        _unblock(driver)
        hk.join(15)
        pool.close()


def test_housekeeping_never_resets_an_orphaned_lease_inline() -> None:
    """A lease whose owner has ended unreleased (a request whose client hung up),
    its session changed: housekeeping takes it back ("orphaned") and hands its reset
    to the resetter, stamped for ``socket_timeout``, as for a dropped one; it was
    reset on the housekeeping thread itself (a review)."""
    from connguard.scope import Scope

    driver = StalledResetDriver()
    clock = ManualClock()
    pool = make_pool(driver, clock, max_size=1, socket_timeout=2.0)
    owner = Scope("GET /gone", kind="request")
    lease = pool.acquire(owner=owner)
    conn = conn_of(lease)
    lease.dirty = True  # it changed session state (policy "auto": a full reset)
    owner.ended = True  # its end never reached the lease (a flag, as a collected context sets)

    def handed_off() -> None:
        assert not lease.active and pool.stats().resetting == 1

    housekeeping_hands_off_a_stalled_reset(
        driver, clock, pool, conn, what="orphaned", handed_off=handed_off
    )


def test_housekeeping_never_resets_a_dropped_lease_inline() -> None:
    """A lease collected unreleased (policy "auto", a transaction open: a full reset):
    housekeeping hands its reset to the resetter, stamped for ``socket_timeout``, so
    the process's only housekeeping thread never blocks on a dead network and a
    stalled reset of it is aborted in time."""
    driver = StalledResetDriver()
    clock = ManualClock()
    pool = make_pool(driver, clock, max_size=1, socket_timeout=2.0)
    lease = pool.acquire()
    conn = conn_of(lease)
    conn.status = TxStatus.INTRANS
    del lease
    gc.collect()
    assert pool._dropped, "the lease was collected unreleased"

    def handed_off() -> None:
        stats = pool.stats()
        assert stats.in_use == 0 and stats.resetting == 1 and stats.dropped == 1

    housekeeping_hands_off_a_stalled_reset(
        driver, clock, pool, conn, what="dropped", handed_off=handed_off
    )
