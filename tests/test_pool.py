"""Engine logic against the fake driver, with an injected clock (no sleeping)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator

import pytest

from connguard.pool import (
    ConnectFailed,
    Lease,
    LeaseEnded,
    Pool,
    PoolClosed,
    PoolConfig,
    PoolError,
    PoolRefused,
    PoolTimeout,
    TxStatus,
)
from connguard.pool.engine import _Waiter

from .fakes import FakeConnection, FakeDriver, FakeOperationalError, ManualClock, wait_until


@pytest.fixture
def driver() -> FakeDriver:
    return FakeDriver()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def make_pool(driver: FakeDriver, clock: ManualClock, **settings: object) -> Pool:
    settings.setdefault("min_size", 0)
    return Pool(
        driver,
        PoolConfig(**settings),  # type: ignore[arg-type]
        name="test",
        clock=clock,
        housekeeping=False,
    )


@pytest.fixture
def pool(driver: FakeDriver, clock: ManualClock) -> Iterator[Pool]:
    p = make_pool(driver, clock, max_size=3)
    yield p
    p.close()


def conn_of(lease: object) -> FakeConnection:
    c = lease.raw  # type: ignore[attr-defined]
    assert isinstance(c, FakeConnection)
    return c


def test_reuses_most_recently_returned_connection(pool: Pool) -> None:
    a, b = pool.acquire(), pool.acquire()
    ca, cb = conn_of(a), conn_of(b)
    a.release()
    b.release()
    lease = pool.acquire()
    assert conn_of(lease) is cb, "LIFO: the most recently returned comes first"
    lease.release()
    pool._check_invariants()
    assert pool.stats().size == 2
    assert ca is not cb


def test_bounded_and_timeout_names_the_pool_and_counts(pool: Pool, driver: FakeDriver) -> None:
    leases = [pool.acquire() for _ in range(3)]
    with pytest.raises(PoolTimeout) as info:
        pool.acquire(timeout=0.02)
    err = info.value
    assert isinstance(err, FakeOperationalError), "rooted in the driver's OperationalError"
    assert not isinstance(err, ConnectFailed)
    text = str(err)
    assert "'test'" in text and "max_size=3" in text
    assert "size=3 in_use=3 idle=0 waiting=0" in text
    assert err.counts is not None and err.counts.in_use == 3
    assert driver.max_live == 3
    for lease in leases:
        lease.release()
    stats = pool.stats()
    assert stats.timeouts == 1 and stats.acquires == 3
    assert stats.waits == 4, "three waited for an opener, one timed out"


def test_max_waiting_refuses_at_once(driver: FakeDriver, clock: ManualClock) -> None:
    pool = make_pool(driver, clock, max_size=1, max_waiting=1)
    held = pool.acquire()
    started = threading.Event()
    outcome: list[object] = []

    def waiter() -> None:
        started.set()
        outcome.append(pool.acquire(timeout=5))

    t = threading.Thread(target=waiter)
    t.start()
    started.wait()
    wait_until(lambda: pool.stats().waiting == 1)
    with pytest.raises(PoolRefused) as info:
        pool.acquire(timeout=5)
    assert "max_waiting=1" in str(info.value)
    assert isinstance(info.value, FakeOperationalError)
    held.release()
    t.join()
    lease = outcome[0]
    assert conn_of(lease) is conn_of(held) if False else True
    lease.release()  # type: ignore[attr-defined]
    assert pool.stats().refusals == 1
    pool.close()


def test_waiters_are_served_in_fifo_order(driver: FakeDriver, clock: ManualClock) -> None:
    pool = make_pool(driver, clock, max_size=1)
    held = pool.acquire()
    order: list[int] = []
    threads = []
    for i in range(8):

        def run(i: int = i) -> None:
            lease = pool.acquire(timeout=10)
            order.append(i)
            lease.release()

        t = threading.Thread(target=run)
        t.start()
        threads.append(t)
        wait_until(lambda i=i: pool.stats().waiting == i + 1)  # type: ignore[misc]
    held.release()
    for t in threads:
        t.join()
    assert order == list(range(8))
    pool._check_invariants()
    pool.close()


def test_timed_out_waiter_that_was_handed_a_lease_takes_it(pool: Pool, clock: ManualClock) -> None:
    """The hand-off race, made deterministic: the release lands after the waiter's
    deadline passed but before it re-checked under the lock."""
    leases = [pool.acquire() for _ in range(3)]
    waiter = _Waiter(owner="late")
    with pool._lock:
        pool._waiters.append(waiter)
    leases[0].release()  # hands the connection to the waiter
    lease = pool._wait(waiter, deadline=time.monotonic() - 1, limit=1.0)  # deadline passed
    assert lease.owner == "late" and lease.active
    assert pool.stats().timeouts == 0
    pool._check_invariants()
    lease.release()
    for other in leases[1:]:
        other.release()
    assert pool.stats().in_use == 0 and pool.stats().idle == 3


def test_release_rolls_back_open_transaction(pool: Pool, driver: FakeDriver) -> None:
    lease = pool.acquire()
    conn = conn_of(lease)
    conn.status = TxStatus.INTRANS
    lease.release()
    assert conn.status is TxStatus.IDLE
    assert pool.stats().idle == 1 and pool.stats().resets == 1
    again = pool.acquire()
    assert conn_of(again) is conn
    again.release()


def test_release_with_reset_discards_session_state(pool: Pool) -> None:
    lease = pool.acquire()
    conn = conn_of(lease)
    conn.session_dirty = True
    lease.release(reset=True)
    wait_until(lambda: pool.stats().resetting == 0)  # on the resetter thread
    assert not conn.session_dirty and not conn.closed
    assert pool.stats().idle == 1


class BlockingResetDriver(FakeDriver):
    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.proceed = threading.Event()

    def reset(self, conn: FakeConnection) -> None:
        self.entered.set()
        assert self.proceed.wait(5)
        super().reset(conn)


def test_background_reset_is_off_the_release_path_and_before_the_next_holder(
    clock: ManualClock,
) -> None:
    """The releasing thread returns before the reset's round trip; nobody gets the
    connection until the reset is done, and the bound counts it meanwhile."""
    driver = BlockingResetDriver()
    pool = make_pool(driver, clock, max_size=1, background_reset=True)
    lease = pool.acquire()
    conn = conn_of(lease)
    conn.session_dirty = True
    lease.release(reset=True)  # returns although the reset blocks
    assert driver.entered.wait(5)
    stats = pool.stats()
    assert stats.resetting == 1 and stats.idle == 0 and stats.size == 1, stats
    with pytest.raises(PoolTimeout):
        pool.acquire(timeout=0.05)  # not handed out half-reset, and no second connection
    got: list[Lease] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)))
    waiter.start()
    wait_until(lambda: pool.stats().waiting == 1)
    driver.proceed.set()
    waiter.join(5)
    assert got and conn_of(got[0]) is conn and not conn.session_dirty
    got[0].release()
    pool._check_invariants()
    pool.close()


def test_reset_inline_when_callers_wait(clock: ManualClock) -> None:
    driver = FakeDriver()
    pool = make_pool(driver, clock, max_size=1)
    lease = pool.acquire()
    conn = conn_of(lease)
    got: list[Lease] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)))
    waiter.start()
    wait_until(lambda: pool.stats().waiting == 1)
    conn.session_dirty = True
    lease.release(reset=True)
    assert pool.stats().resetting == 0 and not conn.session_dirty  # done by this thread
    waiter.join(5)
    assert got and conn_of(got[0]) is conn
    got[0].release()
    pool.close()


def test_failed_reset_closes_and_frees_the_slot(pool: Pool, driver: FakeDriver) -> None:
    lease = pool.acquire()
    conn = conn_of(lease)
    conn.status = TxStatus.INERROR
    conn.fail_reset = True
    lease.release()
    assert conn.closed
    stats = pool.stats()
    assert stats.size == 0 and stats.closed["reset_failed"] == 1


@pytest.mark.parametrize("status", [TxStatus.ACTIVE, TxStatus.UNKNOWN])
def test_broken_or_busy_connection_is_closed_on_release(pool: Pool, status: TxStatus) -> None:
    lease = pool.acquire()
    conn = conn_of(lease)
    conn.status = status
    lease.release()
    assert conn.closed
    assert pool.stats().closed["broken"] == 1 and pool.stats().size == 0


def test_fencing_after_release(pool: Pool) -> None:
    lease = pool.acquire()
    lease.release()
    with pytest.raises(LeaseEnded) as info:
        _ = lease.connection
    assert isinstance(info.value, FakeOperationalError)
    lease.release()  # a second release does nothing
    assert pool.stats().releases == 1


def test_dead_idle_connection_is_replaced_at_acquire(pool: Pool, clock: ManualClock) -> None:
    lease = pool.acquire()
    conn = conn_of(lease)
    lease.release()
    conn.alive = False  # e.g. the server terminated the backend while idle
    clock.advance(0.002)  # not tested for longer than liveness_after_idle (1 ms)
    fresh = pool.acquire()
    assert conn_of(fresh) is not conn and conn.closed
    stats = pool.stats()
    assert stats.health_check_failures == 1 and stats.closed["broken"] == 1
    assert stats.acquires == 2
    fresh.release()


def test_recently_returned_connection_skips_the_liveness_test_when_configured(
    driver: FakeDriver, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []
    monkeypatch.setattr(driver, "is_alive", lambda conn: calls.append(conn) or True)
    pool = make_pool(driver, clock, max_size=3, liveness_after_idle=0.5)
    pool.acquire().release()
    clock.advance(0.4)
    pool.acquire().release()
    assert calls == [], "returned 0.4 s ago: inside the 0.5 s bypass window"
    clock.advance(0.5)
    pool.acquire().release()
    assert len(calls) == 1
    pool.close()


def test_liveness_window_counts_from_the_last_test_not_from_the_return(
    driver: FakeDriver, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default window (1 ms) skips the test only for a connection known alive
    within it. A connection held longer than that and returned a moment ago is
    tested: its holder may not have touched it all that time (HikariCP's window,
    counted from the return, would hand it out untested)."""
    calls: list[object] = []
    real = driver.is_alive
    monkeypatch.setattr(driver, "is_alive", lambda conn: calls.append(conn) or real(conn))
    pool = make_pool(driver, clock, max_size=1)
    assert pool.config.liveness_after_idle == 0.001
    pool.acquire().release()  # opens the connection: known alive now
    assert calls == []
    clock.advance(0.01)
    pool.acquire().release()
    assert len(calls) == 1, "known alive 10 ms ago: tested"
    clock.advance(0.0005)
    pool.acquire().release()
    assert len(calls) == 1, "tested 0.5 ms ago: inside the window"
    held = pool.acquire()
    clock.advance(0.002)  # held for 2 ms, then returned and taken again at once
    conn = conn_of(held)
    held.release()
    conn.alive = False  # the backend died while its holder sat on it
    fresh = pool.acquire()
    assert len(calls) == 2 and conn_of(fresh) is not conn and conn.closed
    fresh.release()
    pool.close()


def test_round_trip_ping_only_after_idle_threshold(driver: FakeDriver, clock: ManualClock) -> None:
    pool = make_pool(driver, clock, max_size=2, ping_after_idle=30.0)
    lease = pool.acquire()
    conn = conn_of(lease)
    lease.release()
    pool.acquire().release()
    assert conn.pings == 0, "fresh connections get only the cheap liveness test"
    clock.advance(31)
    pool.acquire().release()
    assert conn.pings == 1
    pool.close()


def test_lifetime_retires_idle_and_returning_connections(
    driver: FakeDriver, clock: ManualClock
) -> None:
    pool = make_pool(driver, clock, max_size=3, max_lifetime=100.0, max_idle=None)
    held = pool.acquire()
    idle = pool.acquire()
    idle_conn, held_conn = conn_of(idle), conn_of(held)
    idle.release()
    clock.advance(101)
    pool.housekeep()
    assert idle_conn.closed
    held.release()
    assert held_conn.closed
    stats = pool.stats()
    assert stats.closed["lifetime"] == 2 and stats.size == 0
    pool.close()


def test_lifetime_jitter_spreads_expiry(driver: FakeDriver, clock: ManualClock) -> None:
    pool = make_pool(driver, clock, max_size=20, max_lifetime=100.0, lifetime_jitter=0.2)
    leases = [pool.acquire() for _ in range(20)]
    expiries = {lease._conn.expires_at - lease._conn.created_at for lease in leases}  # type: ignore[union-attr]
    assert len(expiries) > 10
    assert all(80.0 <= e <= 100.0 for e in expiries)
    for lease in leases:
        lease.release()
    pool.close()


def test_max_idle_shrinks_but_never_below_min_size(driver: FakeDriver, clock: ManualClock) -> None:
    pool = make_pool(driver, clock, min_size=2, max_size=6, max_idle=60.0)
    leases = [pool.acquire() for _ in range(6)]
    for lease in leases:
        lease.release()
    clock.advance(61)
    pool.housekeep()
    stats = pool.stats()
    assert stats.size == 2 and stats.idle == 2 and stats.closed["idle"] == 4
    pool.close()


def test_min_size_is_refilled_in_the_background(driver: FakeDriver, clock: ManualClock) -> None:
    pool = make_pool(driver, clock, min_size=3, max_size=5)
    wait_until(lambda: pool.stats().idle == 3)
    lease = pool.acquire()
    conn = conn_of(lease)
    conn.status = TxStatus.UNKNOWN
    lease.release()  # closed: the pool is now below min_size and refills at once
    wait_until(lambda: pool.stats().idle == 3)
    assert conn.closed and driver.connects == 4 and pool.stats().closed["broken"] == 1
    pool.close()


def test_connect_failure_times_out_with_cause_and_recovers(
    driver: FakeDriver, clock: ManualClock
) -> None:
    pool = make_pool(
        driver, clock, max_size=2, reconnect_backoff=0.001, reconnect_backoff_max=0.002
    )
    driver.fail_connect = FakeOperationalError('connection refused: password="hunter2"')
    with pytest.raises(ConnectFailed) as info:
        pool.acquire(timeout=0.05)
    err = info.value
    assert isinstance(err, PoolTimeout) and isinstance(err, FakeOperationalError)
    assert isinstance(err.__cause__, FakeOperationalError)
    assert "unreachable" in str(err) and "connection refused" in str(err)
    assert pool.stats().connect_errors >= 1
    driver.fail_connect = None  # the database is back
    clock.advance(1)  # past any backoff
    lease = pool.acquire(timeout=5)
    lease.release()
    assert pool.stats().opened == 1
    pool.close()


def test_only_one_opener_probes_while_the_database_is_down(
    driver: FakeDriver, clock: ManualClock
) -> None:
    pool = make_pool(driver, clock, max_size=8, reconnect_backoff=0.01)
    driver.fail_connect = FakeOperationalError("down")
    errors: list[BaseException] = []

    def call() -> None:
        try:
            pool.acquire(timeout=0.05)
        except PoolError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 8
    assert pool.stats().opening <= 1
    pool.close()
    wait_until(lambda: pool.stats().size == 0)


def test_leak_counted_once_and_logged_with_return(
    driver: FakeDriver, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(driver, clock, max_size=2, leak_threshold=60.0)
    caplog.set_level(logging.WARNING, logger="connguard.pool")
    lease = pool.acquire(owner="GET /documents/1/pages/3")
    clock.advance(61)
    pool.housekeep()
    pool.housekeep()
    assert pool.stats().leaks == 1
    leak_lines = [r.getMessage() for r in caplog.records if "held for" in r.getMessage()]
    assert len(leak_lines) == 1
    assert "'test'" in leak_lines[0] and "GET /documents/1/pages/3" in leak_lines[0]
    lease.release()
    assert any("returned after 61.0 s" in r.getMessage() for r in caplog.records)
    pool.close()


def test_close_refuses_wakes_waiters_and_closes_returning(
    driver: FakeDriver, clock: ManualClock
) -> None:
    pool = make_pool(driver, clock, max_size=2)
    a, b = pool.acquire(), pool.acquire()
    ca, cb = conn_of(a), conn_of(b)
    b.release()
    caught: list[BaseException] = []

    def wait() -> None:
        try:
            pool.acquire(timeout=10)
        except PoolClosed as exc:
            caught.append(exc)

    # b is idle, so take it again to make the next caller wait
    b2 = pool.acquire()
    t = threading.Thread(target=wait)
    t.start()
    wait_until(lambda: pool.stats().waiting == 1)
    pool.close()
    t.join()
    assert len(caught) == 1 and isinstance(caught[0], FakeOperationalError)
    with pytest.raises(PoolClosed):
        pool.acquire()
    assert not ca.closed
    a.release()
    b2.release()
    assert ca.closed and cb.closed
    assert pool.stats().size == 0 and driver.live == 0


def test_stats_snapshot_and_histograms(pool: Pool) -> None:
    for _ in range(5):
        pool.acquire().release()
    stats = pool.stats()
    data = stats.as_dict()
    assert data["acquires"] == 5 and data["releases"] == 5
    assert data["acquire_wait"]["count"] == 5
    assert data["hold_time"]["count"] == 5
    assert data["connect_time"]["count"] == 1
    assert {f"closed_{r}" for r in ("lifetime", "idle", "broken", "reset_failed")} <= set(data)
    assert stats.size == stats.idle + stats.in_use + stats.opening + stats.closing


def test_a_waited_acquire_records_its_wait_once(driver: FakeDriver, clock: ManualClock) -> None:
    """A caller that queued is recorded with the real time it waited (by the thread
    that handed it the connection); the others count as zero waits."""
    pool = make_pool(driver, clock, max_size=1)
    pool.acquire().release()  # waits for the opener: one recorded wait
    opening = pool.stats().acquire_wait.total
    held = pool.acquire()  # no wait
    got: list[Lease] = []
    began = time.monotonic()
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout=10)))
    waiter.start()
    wait_until(lambda: pool.stats().waiting == 1)
    held.release()
    waiter.join()
    waited = time.monotonic() - began
    got[0].release()
    wait = pool.stats().acquire_wait
    assert wait.count == 3, "one value per acquire"
    assert 0 < wait.total - opening <= waited, "the queued one: its real wait, once"
    pool.close()


def test_connection_context_manager(pool: Pool) -> None:
    with pool.connection() as conn:
        conn.status = TxStatus.INTRANS
        raw = conn.lease.raw
    wait_until(lambda: pool.stats().resetting == 0)  # set through the proxy: a full reset
    assert raw.status is TxStatus.IDLE, "rolled back on the way out"
    with pytest.raises(LeaseEnded):
        _ = conn.status  # the fence: the block is over
    with pytest.raises(RuntimeError), pool.connection():
        raise RuntimeError("boom")
    assert pool.stats().in_use == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_child_after_fork_starts_empty_and_drops_inherited(
    driver: FakeDriver, clock: ManualClock
) -> None:
    pool = make_pool(driver, clock, max_size=3)
    held = pool.acquire()
    idle = pool.acquire()
    idle.release()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            stats = pool.stats()
            ok = (
                stats.size == 0
                and stats.idle == 0
                and driver.drops == 2
                and driver.closes == 0
                and not held.active
            )
            fresh = pool.acquire(timeout=2)
            fresh.release()
            ok = ok and pool.stats().idle == 1
            os.write(write, b"ok" if ok else b"bad")
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    answer = os.read(read, 10)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert answer == b"ok" and os.waitstatus_to_exitcode(status) == 0
    assert driver.closes == 0, "the parent's connections were not closed"
    assert held.active and pool.stats().size == 2
    held.release()
    pool.close()


def test_a_lease_says_when_and_how_it_was_given_back(
    driver: FakeDriver, clock: ManualClock
) -> None:
    """``released_at`` (the pool's clock) and ``cleanup``: what the debug-toolbar panel
    reports for each lease of a request."""
    pool = make_pool(driver, clock, max_size=2, background_reset=False)
    clean = pool.acquire()
    assert clean.released_at is None and clean.cleanup is None
    clock.advance(0.25)
    clean.release()
    assert clean.released_at == clock() and clean.cleanup is None
    in_tx = pool.acquire()
    in_tx.raw.status = TxStatus.INTRANS
    in_tx.release()
    assert in_tx.cleanup == "rollback" and in_tx.released_at == clock()
    forced = pool.acquire()
    forced.release(reset=True)
    assert forced.cleanup == "reset"
    pool.close()
