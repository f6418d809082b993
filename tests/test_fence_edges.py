"""The fence and the clean hand-off at their edges, from an adversarial review.

Each test reproduced one problem in the first version of the fence (all failed there):
a revoke's cancel racing the holder's own release (also, found later, a use ending in
the moment before the cancel is sent, and housekeeping finishing a lease under the
cancel), leases dropped after the pool
closed, statements the "auto" reset could not see through the pool's own proxy, a
WITH HOLD cursor or client-side settings crossing to the next holder, a slot freed
under a statement still running on the server. Fake-driver tests are deterministic (a
hook inside the fake pauses one thread at the exact point of the race); real-PostgreSQL
tests use the session ``pg`` fixture.
"""

from __future__ import annotations

import gc
import linecache
import logging
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from connguard.drivers import load_driver
from connguard.drivers.session import changes_session
from connguard.pool import Lease, LeaseEnded, Pool, PoolConfig, PoolTimeout, TxStatus, maintenance
from connguard.pool.lease import fenced_rows

from .fakes import FakeConnection, FakeDriver, ManualClock, wait_until
from .test_pool_faults import on_event_loop


def fake_pool(driver: FakeDriver, clock: ManualClock | None = None, **settings: Any) -> Pool:
    settings.setdefault("min_size", 0)
    settings.setdefault("max_size", 1)
    settings.setdefault("timeout", 2.0)
    return Pool(driver, PoolConfig(**settings), clock=clock or ManualClock(), housekeeping=False)


# --------------------------------------------------------------------------- 1
# A revoke's cancel can land on the NEXT holder's statement.


class SlowCancelDriver(FakeDriver):
    """cancel() takes time before it reaches the server (a real cancel request opens a
    new connection to the server first); the hook records whose statement it hits."""

    def __init__(self) -> None:
        super().__init__()
        self.cancel_started = threading.Event()
        self.cancel_go = threading.Event()
        self.revoked: Any = None
        self.hit_other_holder = False

    def cancel(self, conn: FakeConnection) -> None:
        self.cancel_started.set()
        assert self.cancel_go.wait(5)
        # The cancel arrives now: whose statement is running on this backend?
        lease = self.revoked
        if lease is not None and (lease._conn is None or lease._conn.raw is not conn):
            self.hit_other_holder = True
        super().cancel(conn)


def test_a_revoke_cancel_never_reaches_the_next_holder() -> None:
    """The holder's statement ends on its own while the revoking thread's cancel is
    still on its way: the connection is not handed on until the cancel has arrived."""
    driver = SlowCancelDriver()
    pool = fake_pool(driver)
    first = pool.acquire()
    driver.revoked = first
    first.enter()  # the holder is running a statement
    releaser = threading.Thread(target=pool.release, args=(first,))
    releaser.start()
    assert driver.cancel_started.wait(5)
    first.exit()  # its statement ended: the release must still wait for the cancel
    got: list[Any] = []
    taker = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)))
    taker.start()
    wait_until(lambda: pool.stats().waiting == 1)
    assert not got, "handed on while a cancel was in flight"
    driver.cancel_go.set()
    releaser.join(5)
    taker.join(5)
    assert got, "the connection never came back after the cancel"
    pool.release(got[0])
    pool.close()
    assert not driver.hit_other_holder, "the cancel reached the next holder's statement"


class StatusHookDriver(SlowCancelDriver):
    """transaction_status(), which a release reads first, pauses the holder's thread
    until the revoking thread's cancel has started."""

    def __init__(self, holder: int) -> None:
        super().__init__()
        self.holder = holder
        self.finishing = threading.Event()  # the holder's thread started a release

    def transaction_status(self, conn: FakeConnection) -> TxStatus:
        if threading.get_ident() == self.holder:
            self.finishing.set()
            assert self.cancel_started.wait(5)
        return super().transaction_status(conn)


def test_a_use_ending_before_its_revoke_starts_leaves_the_release_to_the_revoker() -> None:
    """The releasing thread has seen a use in progress (so it will cancel), but the
    use ends before the cancel is on its way: the holder's thread must not give the
    connection back then, or the cancel sent next reaches whoever takes it."""
    driver = StatusHookDriver(threading.get_ident())
    pool = fake_pool(driver)
    first = pool.acquire()
    driver.revoked = first
    first.enter()  # the holder is running a statement
    exited = threading.Event()
    real_revoke = pool._revoke

    def revoke_later(lease: Any) -> None:
        # The holder ends its use now, before the cancel starts: wait until its thread
        # is either giving the connection back or has left exit().
        wait_until(lambda: driver.finishing.is_set() or exited.is_set())
        real_revoke(lease)

    pool._revoke = revoke_later  # type: ignore[method-assign]
    releaser = threading.Thread(target=pool.release, args=(first,))
    releaser.start()
    wait_until(lambda: first._ending)
    first.exit()  # its statement ended; the release was decided with it running
    exited.set()
    driver.cancel_go.set()  # the cancel arrives now
    releaser.join(5)
    assert not releaser.is_alive()
    assert not driver.hit_other_holder, "the connection was given back under the cancel"
    assert pool.stats().in_use == 0 and pool.stats().revoked == 1
    pool.close()


def test_housekeeping_leaves_a_lease_under_a_cancel_to_the_revoker() -> None:
    """While a revoke's cancel is on its way and the holder has let go, the lease is
    ending and not in use: housekeeping, which finishes such leases, must still
    leave it to the revoking thread, or it hands the connection on under the cancel."""
    driver = SlowCancelDriver()
    pool = fake_pool(driver)
    first = pool.acquire()
    driver.revoked = first
    first.enter()
    releaser = threading.Thread(target=pool.release, args=(first,))
    releaser.start()
    assert driver.cancel_started.wait(5)
    first.exit()
    pool.housekeep()
    assert first._conn is not None, "housekeeping gave the connection back under the cancel"
    driver.cancel_go.set()
    releaser.join(5)
    assert not driver.hit_other_holder
    assert pool.stats().in_use == 0
    pool.close()


def test_a_cancel_of_a_statement_run_outside_the_fence_is_waited_for_too() -> None:
    """Released from another thread while a statement runs outside the fence (a caller
    that kept the raw connection): the release cancels it and leaves the lease to
    housekeeping. If the statement ends while that cancel is still on its way,
    housekeeping must wait for the cancel before handing the connection on."""
    driver = SlowCancelDriver()
    pool = fake_pool(driver)
    taken: list[Any] = []
    done = threading.Event()

    def take() -> None:
        taken.append(pool.acquire())
        done.wait(10)  # alive till the end: a dead thread's ident may be reused

    taker = threading.Thread(target=take)
    taker.start()
    wait_until(lambda: bool(taken))
    (first,) = taken
    driver.revoked = first
    raw = first.raw
    raw.status = TxStatus.ACTIVE  # a statement started outside the fence
    releaser = threading.Thread(target=pool.release, args=(first,))
    releaser.start()
    assert driver.cancel_started.wait(5)
    raw.status = TxStatus.IDLE  # the statement ended on its own
    pool.housekeep()
    assert first._conn is not None, "housekeeping gave the connection back under the cancel"
    driver.cancel_go.set()
    releaser.join(5)
    pool.housekeep()
    done.set()
    taker.join(5)
    assert not driver.hit_other_holder
    assert pool.stats().in_use == 0
    pool.close()


class HandedOnCancelDriver(SlowCancelDriver):
    """Records a cancel sent while its connection is idle or leased to another
    holder than the revoked lease (the pool's own cancel of a connection it has taken
    back and reaches alone, before closing it, is not one)."""

    pool: Pool

    def cancel(self, conn: FakeConnection) -> None:
        self.cancel_started.set()
        assert self.cancel_go.wait(5)
        FakeDriver.cancel(self, conn)  # the cancel arrives now: whose is the connection?
        pool = self.pool
        with pool._lock:
            if any(c.raw is conn for c in pool._idle) or any(
                c.raw is conn and ref() is not self.revoked for ref, c in pool._leases.items()
            ):
                self.hit_other_holder = True


@pytest.mark.parametrize("on_loop", [False, True], ids=["off-the-loop", "on-the-loop"])
def test_a_stream_revoked_mid_fetch_and_left_half_read_is_cancelled_and_closed(
    on_loop: bool,
) -> None:
    """A holder reads a stream (psycopg 3 ``stream()``: between fetches the
    connection is ACTIVE), each fetch a fenced use. Another thread (or the event
    loop, whose revoke the resetter ends) releases the lease during a fetch: revoked.
    The fetch returns while the cancel is on its way, leaving the result half read,
    and the holder, fenced, never reads again: nothing will end that statement. The
    lease must still end, its connection cancelled and closed as an abandoned
    statement's is (never handed on mid-result), not left ACTIVE and counted in use
    for ever as one run outside the fence."""
    driver = HandedOnCancelDriver()
    clock = ManualClock()
    pool = driver.pool = fake_pool(driver, clock)
    taken: list[Any] = []
    inside, leave, done = threading.Event(), threading.Event(), threading.Event()

    def holder() -> None:
        lease = pool.acquire()
        taken.append(lease)
        lease.enter()  # a fetch of the stream
        lease.raw.status = TxStatus.ACTIVE
        inside.set()
        assert leave.wait(5)
        lease.exit()  # the fetch returned a row: the rest of the result is never read
        done.wait(10)  # alive till the end (thread ident not reused)

    taker = threading.Thread(target=holder)
    taker.start()
    assert inside.wait(5)
    (lease,) = taken
    driver.revoked = lease
    raw = lease._conn.raw
    releaser = threading.Thread(
        target=(lambda: on_event_loop(lease.release)) if on_loop else lease.release
    )
    releaser.start()
    assert driver.cancel_started.wait(5)  # revoked: fenced, the cancel on its way
    leave.set()
    wait_until(lambda: not lease._busy)  # the fetch has returned under the cancel
    driver.cancel_go.set()
    releaser.join(5)
    for _ in range(3):
        clock.advance(1.0)
        pool.housekeep()
    wait_until(lambda: pool.stats().in_use == 0, timeout=2.0)
    assert raw.closed and lease.cleanup == "cancel" and raw.cancels == 2
    assert not driver.hit_other_holder
    with pool.connection() as conn:  # the slot serves a fresh connection
        assert conn.lease.raw is not raw
    done.set()
    taker.join(5)
    pool._check_invariants()
    pool.close()


def test_a_revoked_stream_dropped_by_its_reader_is_finished_only_after_the_close() -> None:
    """psycopg 3's ``stream()`` generator, when closed half read, drains the result
    in its ``finally``: I/O on the connection, outside the fence. A reader revoked
    mid-fetch that fetches again (``LeaseEnded``) or drops the stream would run that
    drain while the pool cancels and closes the connection in another thread (libpq
    used from two threads at once). The driver's generator must be finished only
    once the pool has closed the connection (the drain then finds it closed)."""
    driver = SlowCancelDriver()
    pool = fake_pool(driver)
    lease = pool.acquire()  # this thread is the reader
    raw = lease.raw
    in_fetch, go = threading.Event(), threading.Event()
    drained: list[bool] = []

    def driver_rows() -> Any:
        try:
            yield 1
            in_fetch.set()
            assert go.wait(5)  # the second fetch, in progress inside the fence
            yield 2
            yield 3
        finally:
            drained.append(raw.closed)  # psycopg drains here: open means two threads

    def revoke() -> None:
        assert in_fetch.wait(5)
        threading.Thread(target=pool.release, args=(lease,)).start()
        assert driver.cancel_started.wait(5)  # revoked, the cancel on its way
        go.set()

    stream = fenced_rows(lease, driver_rows())
    assert next(stream) == 1
    raw.status = TxStatus.ACTIVE  # a stream's result being read
    revoker = threading.Thread(target=revoke)
    revoker.start()
    assert next(stream) == 2  # returned under the revoke: the result left half read
    revoker.join(5)
    with pytest.raises(LeaseEnded):
        next(stream)  # fenced
    del stream
    gc.collect()
    assert drained == [], "the driver's stream was finished before the pool was done"
    driver.cancel_go.set()
    wait_until(lambda: pool.stats().in_use == 0)
    assert raw.closed
    wait_until(lambda: drained == [True])
    pool.close()


def test_a_stream_dropped_half_read_after_a_release_between_fetches_is_closed() -> None:
    """Released from another thread between two fetches of a stream read through
    the fence (no use in progress: no revoke), then dropped by its reader half read:
    its result will never be read, so the lease ends, the connection cancelled and
    closed, and the driver's stream is finished only after that close."""
    driver = FakeDriver()
    pool = fake_pool(driver)
    lease = pool.acquire()  # this thread is the reader
    raw = lease.raw
    drained: list[bool] = []

    def driver_rows() -> Any:
        try:
            yield 1
            yield 2
        finally:
            drained.append(raw.closed)  # psycopg drains here: open means two threads

    stream = fenced_rows(lease, driver_rows())
    assert next(stream) == 1
    raw.status = TxStatus.ACTIVE  # the rest of the result is on its way
    releaser = threading.Thread(target=pool.release, args=(lease,))
    releaser.start()
    releaser.join(5)
    assert lease._conn is not None and raw.cancels == 1  # taken for a statement outside
    del stream  # the reader lets go, half read
    gc.collect()
    assert drained == []
    pool.housekeep()  # finishes it on the resetter thread
    wait_until(lambda: raw.closed)
    assert pool.stats().in_use == 0 and raw.cancels == 2
    wait_until(lambda: drained == [True])
    pool.close()


# --------------------------------------------------------------------------- 1b
# A second review of the fence's cancel (each test failed before the claim:
# Pool._finish_unused decides who ends a release, under the lease's lock).


def _keep_taker(pool: Any) -> tuple[Any, threading.Event, threading.Thread]:
    taken: list[Any] = []
    done = threading.Event()

    def take() -> None:
        taken.append(pool.acquire())
        done.wait(10)  # alive till the end (thread ident not reused)

    taker = threading.Thread(target=take)
    taker.start()
    wait_until(lambda: bool(taken))
    return taken[0], done, taker


class StaleStatusDriver(SlowCancelDriver):
    """transaction_status() on the releasing thread reads ACTIVE, then that thread is
    preempted (before it marks the lease cancelling) until told to go on."""

    def __init__(self) -> None:
        super().__init__()
        self.releaser: int | None = None
        self.read = threading.Event()
        self.go = threading.Event()

    def transaction_status(self, conn: FakeConnection) -> TxStatus:
        status = super().transaction_status(conn)
        if threading.get_ident() == self.releaser:
            self.releaser = None
            self.read.set()
            assert self.go.wait(5)
        return status


def test_outside_fence_statement_ends_between_status_read_and_cancel() -> None:
    """The release reads ACTIVE (a statement run outside the fence) and is about to
    cancel it when the statement ends and housekeeping runs: housekeeping must not
    hand the connection on before the cancel has been sent, nor while it is on its
    way; once it has been, housekeeping gives the connection back."""
    driver = StaleStatusDriver()
    pool = fake_pool(driver)
    first, done, taker = _keep_taker(pool)
    driver.revoked = first
    raw = first.raw
    raw.status = TxStatus.ACTIVE  # statement run outside the fence

    def release() -> None:
        driver.releaser = threading.get_ident()
        pool.release(first)

    releaser = threading.Thread(target=release)
    releaser.start()
    assert driver.read.wait(5)  # the releasing thread has read ACTIVE, not yet cancelled
    raw.status = TxStatus.IDLE  # the statement ends on its own
    pool.housekeep()
    assert first._conn is not None, "handed on before the release's cancel was sent"
    driver.go.set()
    assert driver.cancel_started.wait(5)
    pool.housekeep()
    assert first._conn is not None, "handed on while the release's cancel was on its way"
    driver.cancel_go.set()
    releaser.join(5)
    pool.housekeep()  # the statement ended and the cancel was sent: now it goes back
    second = pool.acquire(timeout=5)
    assert second.raw is raw and not driver.hit_other_holder
    done.set()
    taker.join(5)
    pool.release(second)
    pool.close()


def test_housekeeping_acting_on_a_stale_use_count_hands_nothing_on() -> None:
    """(3) take_back reads _busy, _cancelling, _ending without the guard: preempted
    after reading busy=0/cancelling=False, a use starts and a release revokes it;
    housekeeping then sees _ending and finishes the release under the running use
    and the revoke's cancel."""
    driver = SlowCancelDriver()
    pool = fake_pool(driver)
    first = pool.acquire()
    driver.revoked = first
    code = maintenance.take_back.__code__
    target = next(
        ln
        for ln in range(code.co_firstlineno, code.co_firstlineno + 40)
        if "if lease._ending:" in linecache.getline(code.co_filename, ln)
    )
    at_line, go = threading.Event(), threading.Event()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is code:

            def local(f: Any, e: str, a: Any) -> Any:
                if e == "line" and f.f_lineno == target and not at_line.is_set():
                    at_line.set()
                    assert go.wait(5)
                return local

            return local
        return None

    def hk() -> None:
        sys.settrace(tracer)
        try:
            pool.housekeep()
        finally:
            sys.settrace(None)

    h = threading.Thread(target=hk)
    h.start()
    assert at_line.wait(5)  # read conn, _busy=0, _cancelling=False
    first.enter()  # the holder starts a use (status still IDLE: no statement sent yet)
    releaser = threading.Thread(target=pool.release, args=(first,))
    releaser.start()
    assert driver.cancel_started.wait(5)  # revoke: _ending, _cancelling, cancel in flight
    go.set()
    h.join(5)
    handed = first._conn is None
    first.exit()
    driver.cancel_go.set()
    releaser.join(5)
    pool.close()
    assert not handed, "housekeeping gave back a connection inside a use, under a cancel"


def recover(pool: Pool) -> None:
    """Everything that may end a lease left behind: housekeeping, close, housekeeping."""
    pool.housekeep()
    pool.close()
    pool.housekeep()


def release_interrupted(pool: Pool, lease: Any, tracer: Any) -> None:
    """Release ``lease`` (which is in use) while ``tracer`` raises a signal's
    KeyboardInterrupt somewhere inside; then end the use, and run everything that may
    end a lease left behind."""
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.release(lease)
    finally:
        sys.settrace(None)
    lease.exit()
    recover(pool)


def test_an_interrupt_before_the_revoke_starts_leaves_no_lease_counted_for_ever() -> None:
    """(4) release() now sets _cancelling before calling _revoke(); an asynchronous
    exception (KeyboardInterrupt from a signal handler) between that and _revoke's
    try/finally leaves _cancelling True: exit() and take_back() both defer to a
    revoker that is gone, and the connection stays counted in use for ever."""
    driver = FakeDriver()
    pool = fake_pool(driver)
    first = pool.acquire()
    first.enter()
    code = Pool._revoke.__code__
    target = next(
        ln
        for ln in range(code.co_firstlineno, code.co_firstlineno + 30)
        if "with self._lock:" in linecache.getline(code.co_filename, ln)
    )

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is code:

            def local(f: Any, ev: str, a: Any) -> Any:
                if ev == "line" and f.f_lineno == target:
                    raise KeyboardInterrupt  # as a signal handler would, at this bytecode
                return local

            return local
        return None

    release_interrupted(pool, first, tracer)
    assert pool.stats().in_use == 0, (first._cancelling, pool.stats().in_use)


def test_housekeeping_waits_for_a_statement_run_outside_the_fence_without_cancelling() -> None:
    """The release cancels a statement run outside the fence once; housekeeping then
    only waits for it to end (no cancel of its own at each pass) and gives the
    connection back once it has."""
    driver = FakeDriver()
    pool = fake_pool(driver)
    first, done, taker = _keep_taker(pool)
    raw = first.raw
    raw.status = TxStatus.ACTIVE
    pool.release(first)  # from another thread than the one that acquired
    pool.housekeep()
    pool.housekeep()
    assert raw.cancels == 1 and first._conn is not None
    raw.status = TxStatus.IDLE
    pool.housekeep()
    assert first._conn is None and pool.stats().revoked == 1
    done.set()
    taker.join(5)
    pool.close()


def test_a_signal_as_a_revoke_finishes_leaves_no_mark_behind() -> None:
    """A signal's exception raised as the revoking release, its cancel sent, goes on
    to finish (at the entry of the call that would): the lease must still end once
    its use does, not wait for ever for a revoker that is gone."""
    pool = fake_pool(FakeDriver())
    first = pool.acquire()
    first.enter()
    code, release = Pool._finish_unused.__code__, Pool.release.__code__

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code is code and frame.f_back.f_code is release:
            raise KeyboardInterrupt  # as a signal handler would, at the callee's entry
        return None

    release_interrupted(pool, first, tracer)
    assert pool.stats().in_use == 0, (first._cancelling, pool.stats())


class InterruptedGuard:
    """A lease's lock whose ``n``-th acquire is interrupted by a signal's exception
    before it takes the lock (as a blocked ``with lock:`` is when a handler raises)."""

    def __init__(self, n: int) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.n = n

    def __enter__(self) -> None:
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


@pytest.mark.parametrize("busy", [False, True], ids=["outside-the-fence", "revoked"])
def test_a_signal_while_a_release_clears_its_mark_leaves_no_mark_behind(busy: bool) -> None:
    """The release's last step clears its mark under the lease's lock; a signal that
    interrupts the wait for that lock must not leave the mark set (the lease would
    stay counted in use for ever): the clear is retried, then the exception raised."""
    driver = FakeDriver()
    pool = fake_pool(driver)
    first, done, taker = _keep_taker(pool)
    raw = first.raw
    if busy:
        first.enter()
    else:
        raw.status = TxStatus.ACTIVE  # a statement run outside the fence
    first._guard = InterruptedGuard(n=2)  # 1: release decides; 2: it clears its mark
    with pytest.raises(KeyboardInterrupt):
        pool.release(first)
    assert first._guard.calls >= 3, "the interrupted clear was not retried"
    if busy:
        first.exit()
    raw.status = TxStatus.IDLE
    recover(pool)
    done.set()
    taker.join(5)
    assert pool.stats().in_use == 0, (first._finishing, first._cancelling, pool.stats())


class SignalOnLog(logging.Handler):
    """Sends SIGINT to the main thread from inside a log call (made under the lock)."""

    def emit(self, record: logging.LogRecord) -> None:
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)


def test_a_signal_under_the_pool_lock_of_a_release_loses_no_connection() -> None:
    """A signal's exception raised while the release holds the pool's lock (here: as
    it logs that a lease reported as a leak came back) must not leave the connection
    neither idle nor leased, counted in the pool's size for ever."""
    pool = fake_pool(FakeDriver())
    first = pool.acquire()
    first.leak_reported = True
    handler = SignalOnLog()
    log = logging.getLogger("connguard.pool")
    log.addHandler(handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.release(first)
    finally:
        log.removeHandler(handler)
    stats = pool.stats()
    assert (stats.size, stats.idle, stats.in_use) == (1, 1, 0)
    pool.acquire(timeout=1).release()
    pool.close()


def abandon_a_use(lease: Any) -> None:
    """Begin a use of ``lease`` in a generator left in a reference cycle: only the
    garbage collector closes it, and so calls the use's exit()."""

    def gen() -> Any:
        with lease.using():
            yield

    stuck = gen()
    next(stuck)
    cycle: list[Any] = [stuck]
    cycle.append(cycle)


def collect_at_first_call(code: Any, collected: list[bool]) -> Any:
    """A trace function that runs the garbage collector once, when ``code`` is first
    called (as an allocation there may), and notes it in ``collected``."""

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code is code and not collected:
            collected.append(True)
            gc.collect()
        return None

    return tracer


def ends_with_gc_off(target: Callable[[], None]) -> bool:
    """Run ``target`` in a thread with automatic collection off (only the tracer
    collects, where it means to); False if that thread is still blocked after 10 s."""
    gc.disable()
    try:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(10)
    finally:
        gc.enable()
    return not thread.is_alive()


def test_the_garbage_collector_finishing_a_use_inside_enter_does_not_deadlock() -> None:
    """enter() on an ended lease makes its LeaseEnded outside the lease's lock: the
    allocation may run the garbage collector, which may close an abandoned generator
    inside ``with lease.using():`` of the same lease, whose exit() takes that lock."""
    pool = fake_pool(FakeDriver())
    lease = pool.acquire()
    result: list[str] = []
    collected: list[bool] = []

    def run() -> None:
        abandon_a_use(lease)
        releaser = threading.Thread(target=pool.release, args=(lease,))
        releaser.start()
        releaser.join(5)  # revoked: ending, waits for the use to end
        sys.settrace(collect_at_first_call(type(lease)._ended.__code__, collected))
        try:
            lease.enter()
        except Exception as exc:
            result.append(type(exc).__name__)
        finally:
            sys.settrace(None)

    assert ends_with_gc_off(run), "deadlocked: exit() from the collector inside enter()"
    assert result == ["LeaseEnded"] and collected
    pool.close()


def test_the_garbage_collector_finishing_a_use_during_an_abort_does_not_deadlock() -> None:
    """``socket_timeout``'s abort starts a thread for its cancel. A collection during
    that start may close the abandoned generator whose use is the blocked one; its
    exit() takes the lease's lock, so the thread must not be started under it (this
    runs on the process's housekeeping thread: a deadlock there stops every pool's)."""
    clock = ManualClock()
    pool = fake_pool(FakeDriver(), clock, socket_timeout=1.0)
    lease = pool.acquire()
    collected: list[bool] = []

    def housekeep() -> None:
        abandon_a_use(lease)  # a use in progress that never returns
        pool.housekeep()  # first sight of the use
        clock.advance(2.0)
        sys.settrace(collect_at_first_call(threading.Thread.start.__code__, collected))
        try:
            pool.housekeep()  # aborts the blocked use
        finally:
            sys.settrace(None)

    assert ends_with_gc_off(housekeep), "deadlocked: exit() from the collector inside the abort"
    assert collected and pool.stats().aborted == 1
    lease.release()
    assert pool.stats().in_use == 0 and pool.stats().closed["broken"] == 1
    pool.close()


# --------------------------------------------------------------------------- 2
# Leases dropped (or revoked) after the pool closed are never taken back: their
# physical connections stay open forever.


def test_closed_pool_still_closes_a_dropped_lease() -> None:
    driver = FakeDriver()
    pool = fake_pool(driver)
    lease = pool.acquire()
    conn = lease._conn.raw  # type: ignore[union-attr]
    pool.close()  # "in-use connections are closed as they come back"
    del lease  # ... but this one never comes back: its holder dropped it
    gc.collect()
    pool.housekeep()  # what the housekeeping thread would do
    # Handed to the resetter, which closes it (the pool is closed):
    wait_until(lambda: conn.closed or conn.dropped)


# --------------------------------------------------------------------------- 3
# Reset policy "auto": statements that reach the server through the pool's fenced
# proxies without being shown to the detector.


class SessionConnection(FakeConnection):
    """A fake connection with a cursor; any statement the detector would flag marks
    the session dirty, as the server would."""

    def execute(self, query: str, params: Any = None) -> SessionCursor:
        cur = SessionCursor(self)
        cur.execute(query, params)
        return cur

    def cursor(self) -> SessionCursor:
        return SessionCursor(self)


class SessionCursor:
    def __init__(self, conn: SessionConnection) -> None:
        self.conn = conn

    def execute(self, query: str, params: Any = None) -> SessionCursor:
        if changes_session(query):
            self.conn.session_dirty = True
        return self

    def callproc(self, procname: str, params: Any = None) -> None:
        self.conn.session_dirty = True  # a procedure may SET anything

    def stream(self, query: str, params: Any = None) -> Any:
        self.execute(query, params)
        yield (1,)

    def fetchone(self) -> Any:
        return (1,)

    def close(self) -> None:
        pass


class SessionDriver(FakeDriver):
    changes_session = staticmethod(changes_session)

    def connect(self, timeout: float) -> SessionConnection:
        with self.lock:
            self.connects += 1
            conn = SessionConnection()
            self.opened.append(conn)
            self.live += 1
            self.max_live = max(self.max_live, self.live)
            return conn


def _handed_on_dirty(use: Any) -> bool:
    driver = SessionDriver()
    pool = fake_pool(driver, reset="auto", background_reset=False)
    lease = pool.acquire()
    use(lease.connection)
    raw = lease._conn.raw  # type: ignore[union-attr]
    pool.release(lease)
    handed_on_dirty = bool(raw.session_dirty) and raw in [c.raw for c in pool._idle]
    pool.close()
    return handed_on_dirty


def test_auto_reset_sees_sql_passed_by_keyword() -> None:
    assert not _handed_on_dirty(
        lambda conn: conn.cursor().execute(query="SET search_path TO tenant_7")
    ), "cursor.execute(query=...) bypasses note_statement: handed on with search_path set"


def test_auto_reset_after_callproc_on_pool_cursor() -> None:
    # The Django layer marks any callproc dirty; the pool's FencedCursor judges the
    # procedure *name* as if it were SQL ("set_tenant" is not a statement).
    assert not _handed_on_dirty(lambda conn: conn.cursor().callproc("set_tenant", ["t7"])), (
        "FencedCursor.callproc is judged by the procedure name: handed on dirty"
    )


def test_auto_reset_sees_psycopg3_stream_on_pool_cursor() -> None:
    assert not _handed_on_dirty(
        lambda conn: list(conn.cursor().stream("SELECT set_config('app.tenant', '7', false)"))
    ), "FencedCursor.stream() is not in _SQL_METHODS: handed on with app.tenant set"


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE pg_temp.scratch (id int)",  # a temporary table, schema-qualified
        "CREATE VIEW pg_temp.v AS SELECT 1",
        "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE TEMP RECURSIVE VIEW v (n) AS SELECT 1",
        "SET/**/search_path TO tenant_7",
    ],
)
def test_auto_detector_sees_qualified_temp_objects_and_commented_commands(sql: str) -> None:
    assert changes_session(sql), f"not seen as changing session state: {sql!r}"


# --------------------------------------------------------------------------- real PG


@pytest.fixture
def app() -> str:
    return f"cg-review-{uuid.uuid4().hex[:10]}"


def real_pool(pg: Any, app: str, **settings: Any) -> Pool:
    settings.setdefault("min_size", 0)
    settings.setdefault("max_size", 1)
    settings.setdefault("timeout", 3.0)
    return Pool(
        load_driver("psycopg", conninfo=pg.dsn, application_name=app),
        PoolConfig(**settings),
        name=app,
        housekeeping=False,
    )


@pytest.mark.real
@pytest.mark.filterwarnings("ignore:.*was deleted while still open:ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_withhold_cursor_through_fenced_connection_never_reaches_next_holder(
    pg: Any, app: str
) -> None:
    """Invariant 3: no open server-side cursor reaches the next holder. The Django layer
    pins/forces a reset for named cursors; the pool's own FencedConnection does not."""
    pool = real_pool(pg, app, reset="auto", background_reset=False)
    try:
        lease = pool.acquire()
        cur = lease.connection.cursor("leftover", withhold=True)
        cur.execute("SELECT generate_series(1, 10)")
        cur.fetchone()  # left open, not closed
        pool.release(lease)
        with pool.connection() as conn:
            row = conn.execute("SELECT count(*) FROM pg_cursors WHERE name = 'leftover'").fetchone()
        assert row[0] == 0, "the previous holder's WITH HOLD cursor reached the next holder"
    finally:
        pool.close()


@pytest.mark.real
def test_client_side_session_settings_never_reach_next_holder(pg: Any, app: str) -> None:
    """Attributes set through FencedConnection (read_only, autocommit, isolation...)
    are neither noted as dirty nor restored: the next holder inherits them."""
    pool = real_pool(pg, app, reset="auto", background_reset=False)
    try:
        with pool.connection() as conn:
            conn.read_only = True
            conn.autocommit = False
            conn.execute("SELECT 1")
            conn.commit()
        with pool.connection() as conn:
            inherited = (conn.read_only, conn.autocommit)
        assert inherited == (None, True), f"next holder got read_only/autocommit {inherited}"
    finally:
        pool.close()


@pytest.mark.real
def test_release_under_running_statement_cancels_before_freeing_the_slot(pg: Any, app: str) -> None:
    """Invariant 7: a slot is free only when its backend is idle or gone. Released by its
    own thread while a statement is still running (an abandoned psycopg 3 stream), the
    connection is closed as "broken" without a cancel and its slot freed at once; the
    backend keeps running the statement (it only notices the hang-up when it next sends)."""
    pool = real_pool(pg, app, reset="auto", background_reset=False)
    try:
        lease = pool.acquire()
        cur = lease.connection.cursor()
        rows = cur.stream(
            # row 1 is big enough (> libpq's 8 kB output buffer) to be flushed at once
            "SELECT i, repeat('x', 20000), pg_sleep(CASE WHEN i > 1 THEN 3 ELSE 0 END) "
            "FROM generate_series(1, 2) i"
        )
        assert next(iter(rows))[0] == 1  # row 1 arrived; the server now computes row 2
        assert pool.driver.transaction_status(lease._conn.raw) is TxStatus.ACTIVE  # type: ignore[union-attr]
        pool.release(lease)  # same thread: closed as broken, slot freed
        assert pool.stats().size == 0
        with psycopg.connect(pg.dsn, autocommit=True) as admin:
            active = admin.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = %s AND state = 'active'",
                (app,),
            ).fetchone()
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (app,),
            )
        assert active is not None
        assert active[0] == 0, (
            "the pool freed the slot while the server still runs the statement: "
            "max_size no longer bounds what the server sees"
        )
        del rows, cur
    finally:
        pool.close()


@pytest.mark.real
def test_a_stream_half_read_outside_the_fence_keeps_its_slot_till_its_reader_lets_go(
    pg: Any, app: str
) -> None:
    """docs/pool.md: released from another thread while a psycopg 3 stream run on
    ``lease.raw`` (outside the fence) is half read, the connection stays active in
    libpq after the cancel: its slot stays counted and it goes to nobody, whatever
    housekeeping does, until the reader lets go of the stream; then housekeeping
    gives it back, and the next holder's session works."""
    pool = real_pool(pg, app)
    read, let_go, gone = threading.Event(), threading.Event(), threading.Event()
    box: dict[str, Any] = {}

    def reader() -> None:
        lease = box["lease"] = pool.acquire()
        cur = lease.raw.cursor()
        rows = cur.stream("SELECT generate_series(1, 1000000)")
        for n, _ in enumerate(rows):
            if n == 5:
                break
        read.set()
        let_go.wait(30)
        del rows, cur
        gc.collect()
        gone.set()

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert read.wait(30)
        lease = box["lease"]
        raw = lease._conn.raw
        assert pool.driver.transaction_status(raw) is TxStatus.ACTIVE
        pool.release(lease)  # another thread: cancelled, left to housekeeping
        for _ in range(3):
            pool.housekeep()
            assert lease._conn is not None and pool.stats().in_use == 1
        with pytest.raises(PoolTimeout):
            pool.acquire(timeout=0.2)  # nobody gets it meanwhile
        let_go.set()
        assert gone.wait(30)
        pool.housekeep()
        assert lease._conn is None and pool.stats().in_use == 0
        with pool.connection() as conn:
            assert conn.execute("SELECT 42").fetchone() == (42,)
    finally:
        let_go.set()
        thread.join(30)
        pool.close()


@pytest.mark.real
def test_a_stream_revoked_mid_fetch_is_cancelled_and_closed_while_its_reader_holds_it(
    pg: Any, app: str
) -> None:
    """A psycopg 3 ``stream()`` read through the fence is revoked during a fetch (row
    6 waits on the server for an advisory lock the test holds); the fetch returns its
    row before the revoke's cancel reaches the server, leaving the result half read,
    and the reader, fenced, keeps the stream without reading it. The release must not
    wait for a reader that will never finish: the connection is cancelled and closed
    (its backend gone), the slot freed, and the next holder gets a working one."""
    pool = real_pool(pg, app)
    driver: Any = pool.driver
    fetched, read, let_go, gone = (threading.Event() for _ in range(4))
    send_cancel = driver.cancel

    def cancel_after_the_fetch(raw: Any) -> None:  # still on its way as the fetch returns
        assert fetched.wait(30)
        send_cancel(raw)

    driver.cancel = cancel_after_the_fetch
    key = uuid.uuid4().int % 2**62
    box: dict[str, Any] = {}

    def reader() -> None:
        lease = box["lease"] = pool.acquire()
        box["pid"] = lease.raw.info.backend_pid
        rows = lease.connection.cursor().stream(
            # Rows of 16 kB: the server flushes each one (it buffers 8 kB).
            "SELECT n, CASE WHEN n = 6 THEN pg_advisory_lock(%s)::text END,"
            " repeat('x', 16384) FROM generate_series(1, 1000000) n",
            (key,),
        )
        for _ in range(5):
            next(rows)
        read.set()
        box["row"] = next(rows)  # row 6: waits for the lock, inside the fence
        fetched.set()
        let_go.wait(30)  # keeps the half-read stream, never reads it again
        del rows
        gc.collect()
        gone.set()

    locker = psycopg.connect(pg.dsn, autocommit=True)
    thread = threading.Thread(target=reader)
    try:
        locker.execute("SELECT pg_advisory_lock(%s)", (key,))
        thread.start()
        assert read.wait(30)
        lease, pid = box["lease"], box["pid"]

        def waits_for_the_lock() -> bool:
            row = locker.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            return row is not None and row[0] == "Lock"

        wait_until(waits_for_the_lock, timeout=30)
        assert lease._busy, "the fetch is in progress"
        releaser = threading.Thread(target=pool.release, args=(lease,))
        releaser.start()  # revoked: fenced; its cancel waits for the fetch to return
        wait_until(lambda: pool.stats().revoked == 1)
        locker.execute("SELECT pg_advisory_unlock(%s)", (key,))
        releaser.join(30)
        assert box["row"][0] == 6
        wait_until(lambda: pool.stats().in_use == 0, timeout=5)
        assert not let_go.is_set(), "ended while its reader still holds the stream"

        def backend_gone() -> bool:
            row = locker.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            return row is not None and row[0] == 0

        wait_until(backend_gone, timeout=10)
        let_go.set()
        assert gone.wait(30)  # the stream, dropped now, does nothing to a closed connection
        with pool.connection() as conn:
            assert conn.execute("SELECT 42").fetchone() == (42,)
    finally:
        fetched.set()
        let_go.set()
        thread.join(30)
        locker.close()
        pool.close()


def test_a_use_ending_under_the_pool_lock_defers_the_release() -> None:
    """A revoked lease's last use may end where the pool's lock is held (a generator
    closed by the garbage collector during an allocation under it): the release is
    handed to the resetter instead of deadlocking."""
    driver = FakeDriver()
    pool = fake_pool(driver)
    lease = pool.acquire()
    lease.enter()
    revoker = threading.Thread(target=pool.release, args=(lease,))
    revoker.start()
    revoker.join(5)
    assert not lease.active and lease._conn is not None  # revoked, waiting for the holder
    with pool._lock:
        lease.exit()  # would deadlock if it finished the release right here
    wait_until(lambda: lease._conn is None)
    assert pool.stats().idle == 1
    pool._check_invariants()
    pool.close()


def test_returned_leases_leave_nothing_for_the_dropped_lease_backstop() -> None:
    """Only a lease collected *unreleased* reaches the backstop: returned ones leave
    no trace (no queue that grows between housekeeping passes, nothing to drain on the
    slow acquire path)."""
    pool = fake_pool(FakeDriver(), max_size=2)
    for _ in range(1000):
        pool.acquire().release()
    assert not pool._dropped
    lease = pool.acquire()
    del lease
    gc.collect()
    assert len(pool._dropped) == 1
    pool.housekeep()
    assert pool.stats().dropped == 1 and pool.stats().in_use == 0
    pool.close()


# --------------------------------------------------------------------------- 9
# Uses take no lock (a query makes three): a use is counted before it reads the fence,
# a release sets the fence before it counts the uses. Each test pauses one side at the
# point between its two steps and runs the other side through.


class Pauses:
    """Pause the thread that runs :meth:`run` at the first time it reaches each of
    ``points`` ((code, text): the first line of ``code`` holding ``text``), in any
    order: ``at(i)`` is set there, and the thread waits for ``go(i)``."""

    def __init__(self, *points: tuple[Any, str]) -> None:
        self._targets: list[tuple[Any, int, threading.Event, threading.Event]] = []
        for code, text in points:
            line = next(
                line
                for line in range(code.co_firstlineno, code.co_firstlineno + 80)
                if text in linecache.getline(code.co_filename, line)
            )
            self._targets.append((code, line, threading.Event(), threading.Event()))
        self._codes = {target[0] for target in self._targets}

    def at(self, index: int) -> threading.Event:
        return self._targets[index][2]

    def go(self, index: int) -> None:
        self._targets[index][3].set()

    def go_all(self) -> None:
        for index in range(len(self._targets)):
            self.go(index)

    def _tracer(self, frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code not in self._codes:
            return None

        def local(f: Any, e: str, a: Any) -> Any:
            if e == "line":
                for code, line, at, go in self._targets:
                    if f.f_code is code and f.f_lineno == line and not at.is_set():
                        at.set()
                        assert go.wait(5)
            return local

        return local

    def run(self, function: Callable[..., Any], *args: Any) -> Any:
        sys.settrace(self._tracer)
        try:
            return function(*args)
        finally:
            sys.settrace(None)


def outcome_of(function: Callable[..., Any], *args: Any) -> tuple[threading.Thread, list[Any]]:
    """Run ``function`` in a thread of its own; its result or exception lands in the
    list."""
    out: list[Any] = []

    def body() -> None:
        try:
            out.append(function(*args))
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def test_a_use_counted_before_a_release_is_waited_for_and_finishes_it() -> None:
    """enter() has counted its use but not read the fence when a release runs through:
    the release sees the use, so it revokes and leaves the connection where it is; the
    use then reads the fence set, backs out with LeaseEnded, and, being the last use
    out, finishes the release."""
    pool = fake_pool(FakeDriver())
    lease = pool.acquire()
    user = Pauses((Lease.enter.__code__, "if not self._ending:"))
    thread, used = outcome_of(user.run, lease.enter)
    try:
        assert user.at(0).wait(5)  # counted, fence not read yet
        pool.release(lease)
        assert lease._conn is not None, "the release handed on a connection with a use counted"
    finally:
        user.go_all()
        thread.join(5)
    assert isinstance(used[0], LeaseEnded)
    assert lease._conn is None and pool.stats().idle == 1 and pool.stats().in_use == 0
    pool._check_invariants()
    pool.close()


def test_a_use_starting_as_a_release_counts_backs_out_and_the_release_finishes() -> None:
    """The release has set the fence but not counted the uses when enter() runs: the
    use reads the fence set and backs out (its finish waits for the release's lock);
    the release then counts no use and finishes, once."""
    pool = fake_pool(FakeDriver())
    lease = pool.acquire()
    releaser = Pauses((Pool.release.__code__, "if lease._busy:"))
    releasing, _ = outcome_of(releaser.run, pool.release, lease)
    threads = [releasing]
    try:
        assert releaser.at(0).wait(5)  # fence set, uses not counted yet
        using, used = outcome_of(lease.enter)
        threads.append(using)
        # The use backs out, then waits for the lease's lock to learn who finishes.
        wait_until(lambda: used or not lease._busy)
    finally:
        releaser.go_all()
        for thread in threads:
            thread.join(5)
    assert isinstance(used[0], LeaseEnded)
    stats = pool.stats()
    assert lease._conn is None and stats.idle == 1 and stats.in_use == 0
    assert stats.revoked == 0, "a use that backed out was taken for one in progress"
    pool._check_invariants()
    pool.close()


def test_a_use_ending_as_a_release_runs_through_is_finished_once() -> None:
    """exit() has uncounted its use but not read the fence when a release runs
    through: the release counts no use and finishes; the exit then sees the fence
    and a finished lease, and does nothing more (the connection is given back once)."""
    pool = fake_pool(FakeDriver())
    lease = pool.acquire()
    lease.enter()
    user = Pauses((Lease.exit.__code__, "if self._ending and not busy:"))
    thread, _ = outcome_of(user.run, lease.exit)
    try:
        assert user.at(0).wait(5)
        pool.release(lease)
        assert lease._conn is None, "the release waited for a use that had ended"
    finally:
        user.go_all()
        thread.join(5)
    stats = pool.stats()
    assert stats.idle == 1 and stats.in_use == 0 and stats.revoked == 0
    pool._check_invariants()
    pool.close()


def test_uses_from_many_threads_as_their_lease_is_released_never_outlive_it() -> None:
    """The same races left to the scheduler, many times: four threads use one lease
    in a loop while the main thread releases it at a moment of its choosing. No use
    that entered ever sees the lease ended under it, and the connection comes back
    exactly once."""
    import random

    rng = random.Random(7)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between nearly any two bytecodes
    try:
        for _ in range(40):
            pool = fake_pool(FakeDriver())
            lease = pool.acquire()
            started = threading.Barrier(5)
            uses: list[int] = []
            broken: list[str] = []

            def work(
                lease: Any = lease, started: Any = started, uses: Any = uses, broken: Any = broken
            ) -> None:
                started.wait(5)
                while True:
                    try:
                        lease.enter()
                    except LeaseEnded:
                        return
                    try:
                        uses.append(1)
                        for _ in range(3):
                            if lease._conn is None:
                                broken.append("the lease ended under a use in progress")
                    finally:
                        lease.exit()

            threads = [threading.Thread(target=work) for _ in range(4)]
            for thread in threads:
                thread.start()
            started.wait(5)
            after = rng.randrange(1, 200)
            while len(uses) < after:
                pass
            pool.release(lease)
            for thread in threads:
                thread.join(5)
            assert not broken, broken[0]
            stats = pool.stats()
            assert lease._conn is None and stats.idle == 1 and stats.in_use == 0
            pool._check_invariants()
            pool.close()
    finally:
        sys.setswitchinterval(interval)


def test_socket_timeouts_abort_spares_a_lease_whose_release_is_claimed() -> None:
    """(From a review.) Housekeeping found a use blocked past ``socket_timeout``; the
    call returns, a release claims the lease (it counted no use) and a late use,
    already past its first read of the fence, is counted before backing out. Under
    the lease's lock housekeeping then sees a use counted and no progress, but the
    connection is about to go to its next holder: it must not be aborted."""
    clock = ManualClock()
    pool = fake_pool(FakeDriver(), clock, socket_timeout=1.0)
    lease = pool.acquire()
    conn = lease.raw
    lease.enter()  # a call blocked in the driver
    pool.housekeep()  # first sight of it
    clock.advance(2.0)
    keeper = Pauses((maintenance.abort_stuck.__code__, "with lease._guard:"))
    late = Pauses(
        (Lease.enter.__code__, "busy.append(None)"),
        (Lease.enter.__code__, "if not self._ending:"),
    )
    releaser = Pauses((Pool._finish_release.__code__, "now = self._clock()"))
    threads: list[threading.Thread] = []
    try:
        thread, _ = outcome_of(keeper.run, pool.housekeep)
        threads.append(thread)
        assert keeper.at(0).wait(5)  # found stuck; not under the lease's lock yet
        lease.exit()  # the call returns after all
        thread, used = outcome_of(late.run, lease.enter)
        threads.append(thread)
        assert late.at(0).wait(5)  # past the first read of the fence
        thread, _ = outcome_of(releaser.run, pool.release, lease)
        threads.append(thread)
        assert releaser.at(0).wait(5)  # claimed: no use was counted
        late.go(0)
        assert late.at(1).wait(5)  # counted now, about to read the fence again
        keeper.go(0)
        threads[0].join(5)
        assert not threads[0].is_alive()
        assert conn.aborts == 0, "socket_timeout aborted a connection whose release was claimed"
    finally:
        keeper.go_all()
        late.go_all()
        releaser.go_all()
        for thread in threads:
            thread.join(5)
    assert isinstance(used[0], LeaseEnded)
    assert pool.stats().idle == 1 and pool.stats().aborted == 0
    pool._check_invariants()
    pool.close()


def test_the_garbage_collector_ending_a_use_during_an_abort_does_not_deadlock() -> None:
    """(From a review.) ``socket_timeout``'s abort calls the driver under the lease's
    lock, and a real driver allocates there. A collection may then close the abandoned
    generator whose use is the blocked one, of a lease already revoked: that use's
    exit() is the last one out, and must not wait for the lock its own thread holds."""
    clock = ManualClock()
    pool = fake_pool(FakeDriver(), clock, socket_timeout=1.0)
    lease = pool.acquire()
    collected: list[bool] = []

    def housekeep() -> None:
        abandon_a_use(lease)  # a use that only the collector ends
        pool.release(lease)  # revoked: left to that use's exit()
        pool.housekeep()  # first sight of the use
        clock.advance(2.0)
        sys.settrace(collect_at_first_call(FakeDriver.abort.__code__, collected))
        try:
            pool.housekeep()  # aborts it, calling the driver under the lease's lock
        finally:
            sys.settrace(None)

    assert ends_with_gc_off(housekeep), "deadlocked: exit() from the collector inside the abort"
    assert collected
    wait_until(lambda: lease._conn is None)  # finished, by the resetter
    assert pool.stats().in_use == 0
    pool.close()


def test_a_signal_in_a_late_use_of_a_revoked_lease_strands_no_count() -> None:
    """(From a review.) A use of a lease whose release waits for another use reads the
    fence before it counts itself: a signal's exception landing anywhere in its
    enter() leaves nothing counted, and the lease is finished when the real use ends.
    Each line of enter() in turn raises KeyboardInterrupt, as a SIGINT handler would."""
    code = Lease.enter.__code__
    lines = sorted({line for _, _, line in code.co_lines() if line is not None})
    for raise_at in lines:
        pool = fake_pool(FakeDriver())
        lease = pool.acquire()
        lease.enter()  # a use in progress
        pool.release(lease)  # revoked: left to that use's exit()

        def tracer(frame: Any, event: str, arg: Any, raise_at: int = raise_at) -> Any:
            if frame.f_code is not code:
                return None

            def local(f: Any, e: str, a: Any) -> Any:
                if e == "line" and f.f_lineno == raise_at:
                    raise KeyboardInterrupt
                return local

            return local

        sys.settrace(tracer)
        try:
            lease.enter()
        except (KeyboardInterrupt, LeaseEnded):
            pass
        finally:
            sys.settrace(None)
        lease.exit()  # the real use ends
        assert lease._conn is None, f"a signal at line {raise_at} stranded a count"
        assert pool.stats().in_use == 0
        pool.close()


def test_a_use_just_begun_is_not_aborted_as_a_blocked_one() -> None:
    """(From a second review.) Housekeeping saw a use in progress long ago; that use
    ended, and the holder's next one is counted just now. The progress mark
    (``socket_timeout``) moves before the count shows, so housekeeping never sees a
    fresh use as the old one, blocked since."""
    clock = ManualClock()
    pool = fake_pool(FakeDriver(), clock, socket_timeout=1.0)
    lease = pool.acquire()
    conn = lease.raw
    lease.enter()
    pool.housekeep()  # sees a use in progress
    lease.exit()  # which returns at once
    clock.advance(5.0)  # the holder works without the database for a while
    late = Pauses((Lease.enter.__code__, "if not self._ending:"))
    thread, used = outcome_of(late.run, lease.enter)  # the holder's next query
    try:
        assert late.at(0).wait(5)  # counted, fence not read again yet
        pool.housekeep()
    finally:
        late.go_all()
        thread.join(5)
    assert used == [conn]
    assert conn.aborts == 0, "socket_timeout aborted a use that had just begun"
    lease.exit()
    lease.release()
    pool.close()


def test_peek_gives_nothing_once_a_release_has_claimed_the_lease() -> None:
    """(From a second review.) A late use counted after a release counted none (and
    claimed the lease) is backing out, not in progress: ``peek()`` (the Django
    wrapper's ``connection``) must not give out a connection about to be handed on."""
    pool = fake_pool(FakeDriver())
    lease = pool.acquire()
    late = Pauses(
        (Lease.enter.__code__, "busy.append(None)"),
        (Lease.enter.__code__, "if not self._ending:"),
    )
    releaser = Pauses((Pool._finish_release.__code__, "now = self._clock()"))
    threads: list[threading.Thread] = []
    try:
        thread, used = outcome_of(late.run, lease.enter)
        threads.append(thread)
        assert late.at(0).wait(5)  # past the first read of the fence
        thread, _ = outcome_of(releaser.run, pool.release, lease)
        threads.append(thread)
        assert releaser.at(0).wait(5)  # claimed: no use was counted
        late.go(0)
        assert late.at(1).wait(5)  # counted, about to back out
        seen = lease.peek()
    finally:
        late.go_all()
        releaser.go_all()
        for thread in threads:
            thread.join(5)
    assert isinstance(used[0], LeaseEnded)
    assert seen is None, "peek() gave out the connection of a lease whose release is claimed"
    assert pool.stats().idle == 1
    pool.close()


def test_the_collector_inside_the_resetters_start_does_not_deadlock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(From a second review.) The first hand-off of a process (or of a forked worker)
    starts the resetter's thread; a collection while that thread is made may finish an
    abandoned use of a revoked lease, whose release is handed to the resetter too: from
    the same thread, while it starts the resetter."""
    from connguard.pool import resetter as resetter_module

    monkeypatch.setattr(resetter_module, "_resetter", resetter_module.Resetter())
    pool = fake_pool(FakeDriver(), max_size=2, reset="always", background_reset=True)
    first, second = pool.acquire(), pool.acquire()
    collected: list[bool] = []

    def run() -> None:
        abandon_a_use(first)
        releaser = threading.Thread(target=pool.release, args=(first,))
        releaser.start()
        releaser.join(5)  # revoked: its abandoned use finishes it
        sys.settrace(collect_at_first_call(threading.Thread.__init__.__code__, collected))
        try:
            pool.release(second)  # reset "always": handed to the resetter, started now
        finally:
            sys.settrace(None)

    assert ends_with_gc_off(run), "deadlocked: the resetter's start re-entered"
    assert collected
    wait_until(lambda: first._conn is None and pool.stats().idle == 2)
    pool.close()


def test_a_collection_in_the_resetters_new_thread_does_not_deadlock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(From a third review.) As above, but the collection runs in the thread being
    started, before it has told the starting thread so (on 3.12 any thread may run a
    collection another scheduled): its hand-off must not wait for the starter, which
    waits for it."""
    from connguard.pool import resetter as resetter_module

    monkeypatch.setattr(resetter_module, "_resetter", resetter_module.Resetter())
    pool = fake_pool(FakeDriver(), max_size=2, reset="always", background_reset=True)
    first, second = pool.acquire(), pool.acquire()
    collected: list[bool] = []
    set_native_id = threading.Thread._set_native_id  # type: ignore[attr-defined]

    def collecting(self: threading.Thread) -> None:
        # Stands for an allocation in the new thread's start that collects.
        if self.name == "connguard-resetter" and not collected:
            collected.append(True)
            gc.collect()
        set_native_id(self)

    monkeypatch.setattr(threading.Thread, "_set_native_id", collecting)

    def run() -> None:
        abandon_a_use(first)
        releaser = threading.Thread(target=pool.release, args=(first,))
        releaser.start()
        releaser.join(5)  # revoked: its abandoned use finishes it
        pool.release(second)  # reset "always": handed to the resetter, started now

    assert ends_with_gc_off(run), "deadlocked: the resetter's new thread waited for its starter"
    assert collected
    wait_until(lambda: first._conn is None and pool.stats().idle == 2)
    pool.close()


def test_a_resetter_that_could_not_start_is_started_by_the_next_hand_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The resetter's thread is started once per process; a start that failed (the
    system refused a thread) is logged, not raised (the work is queued: the caller
    has handed it on), leaves nothing behind that would stop the next hand-off from
    starting it, and the work queued meanwhile is done then."""
    from connguard.pool import resetter as resetter_module

    monkeypatch.setattr(resetter_module, "_resetter", resetter_module.Resetter())
    pool = fake_pool(FakeDriver(), max_size=2, reset="always", background_reset=True)
    first, second = pool.acquire(), pool.acquire()
    start = threading.Thread.start

    def refused(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refused)
    pool.release(first)
    assert pool.stats().resetting == 1  # queued, waiting for a thread
    monkeypatch.setattr(threading.Thread, "start", start)
    pool.release(second)
    wait_until(lambda: pool.stats().idle == 2)
    pool.close()


@pytest.mark.parametrize("state", ["given back", "revoked, its use still running"])
def test_releasing_a_lease_already_ending_takes_no_lock(state: str) -> None:
    """The common second release (ConnguardMiddleware gave the lease back; Django's
    ``request_finished`` asks again) returns at once, without the lease's lock: here
    another thread holds that lock the whole time, and the second release still
    returns, doing nothing."""
    driver = FakeDriver()
    pool = fake_pool(driver)
    lease = pool.acquire()
    if state == "given back":
        pool.release(lease)
    else:
        lease.enter()  # a use in progress: the release revokes it, the lease stays out
        pool.release(lease)
    assert lease._ending and (lease._conn is None) == (state == "given back")
    before = pool.stats()
    outcome: list[str] = []
    with lease._guard:  # held by this thread throughout: a release that took it would wait
        second = threading.Thread(target=lambda: (pool.release(lease), outcome.append("done")))
        second.start()
        second.join(10)
    assert outcome == ["done"], "the second release waited for the lease's lock"
    after = pool.stats()
    assert (after.releases, after.revoked, after.idle) == (
        before.releases,
        before.revoked,
        before.idle,
    )
    if state != "given back":
        lease.exit()  # the last use out finishes the revoked release
    wait_until(lambda: pool.stats().idle == 1)
    pool.close()
