"""The engine at its edges (issue 9, items 2 and 4 to 8): each test states behaviour only,
so it holds for any engine that keeps ARCHITECTURE.md's invariants.

* a lease whose holder kept only the raw connection is never handed on (item 4);
* a forked child's pools get housekeeping back and start with clean counters (item 5);
* a pool whose process forked and has not acquired since keeps no connection warm
  (a gunicorn ``--preload`` or Celery master), until its next acquire;
* ``acquire(timeout)`` returns by its deadline whatever the health checks do (item 6);
* a waiter interrupted by any exception strands no slot; neither does a release or a
  health check interrupted by one (item 7);
* a ``connguard.scope`` object may be nested, re-entered and shared by threads (item 8);
* ending a lease from another thread while its statement runs cancels the statement and
  never lets the server see more than ``max_size`` backends (item 2, at engine level).

Fake driver where logic suffices; a real PostgreSQL with psycopg 3 and psycopg2 where
the behaviour is the driver's or the server's.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import select
import signal
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

import connguard
from connguard.drivers import load_driver
from connguard.pool import Lease, Pool, PoolConfig, PoolTimeout, TxStatus
from connguard.scope import Scope, current_scope, owner_scope

from .fakes import FakeConnection, FakeDriver, FakeOperationalError, ManualClock, wait_until
from .proxy import FaultProxy
from .test_pool_real import query

DRIVERS = ["psycopg", "psycopg2"]
DEADLINE_MARGIN = 0.3  # what acquire(timeout) may overrun by, whatever the driver does


class Interrupted(BaseException):
    """Not an ``Exception``: stands for KeyboardInterrupt, SystemExit, a cancellation."""


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def driver() -> FakeDriver:
    return FakeDriver()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def app() -> str:
    return f"cg-edge-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=DRIVERS)
def driver_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def fake_pool(driver: FakeDriver, clock: ManualClock, **settings: Any) -> Pool:
    settings.setdefault("min_size", 0)
    return Pool(driver, PoolConfig(**settings), name="edges", clock=clock, housekeeping=False)


def real_pool(dsn: str, driver_name: str, app: str, **settings: Any) -> Pool:
    settings.setdefault("min_size", 0)
    return Pool(
        load_driver(driver_name, conninfo=dsn, application_name=app),
        PoolConfig(**settings),
        name=app,
        housekeeping=False,
    )


def try_acquire(pool: Pool, timeout: float) -> Lease | None:
    try:
        return pool.acquire(timeout=timeout)
    except PoolTimeout:
        return None


def acquire_eventually(pool: Pool, within: float) -> Lease:
    """Collect garbage and run housekeeping until an acquire succeeds, or fail."""
    deadline = time.monotonic() + within
    while True:
        gc.collect()
        pool.housekeep()
        lease = try_acquire(pool, 0.05)
        if lease is not None:
            return lease
        if time.monotonic() > deadline:
            raise AssertionError(f"no connection came back within {within} s: {pool.stats()}")


def take(pool: Pool) -> Lease:
    """Acquire the way the Django layer does: owned by (and recorded in) the current scope."""
    owner = owner_scope()
    lease = pool.acquire(owner=owner, timeout=2)
    owner.add(lease)
    return lease


def _acquire_and_drop_everything(pool: Pool, use: Callable[[Any], object]) -> None:
    lease = pool.acquire(timeout=2)
    use(lease.connection)
    # returns without releasing: the lease and the connection become garbage


def _acquire_keep_only_connection(pool: Pool) -> Any:
    return pool.acquire(timeout=2).connection  # the Lease object is dropped at once


# -- item 4: the dropped-lease backstop must not misfire ----------------------------------


def test_raw_connection_kept_without_its_lease_is_never_handed_on(
    driver: FakeDriver, clock: ManualClock
) -> None:
    pool = fake_pool(driver, clock, max_size=1)
    raw = _acquire_keep_only_connection(pool)
    (physical,) = driver.opened  # what the holder reaches through `raw`
    gc.collect()
    pool.housekeep()
    pool.housekeep()
    other = try_acquire(pool, 0.1)
    assert other is None, (
        "a second holder got a connection while the first still holds its raw connection "
        f"(same one: {other.peek() is raw if other else None}); {pool.stats()}"
    )
    raw.use()  # still the holder's, still open
    assert not physical.closed and not physical.dropped
    del raw
    lease = acquire_eventually(pool, within=2.0)  # once truly dropped, it comes back
    lease.release()
    pool._check_invariants()
    pool.close()


def test_lease_dropped_with_its_connection_is_taken_back(
    driver: FakeDriver, clock: ManualClock
) -> None:
    pool = fake_pool(driver, clock, max_size=1)
    _acquire_and_drop_everything(pool, lambda conn: conn.use())
    lease = acquire_eventually(pool, within=2.0)
    conn = lease.connection
    conn.use()
    lease.release()
    stats = pool.stats()
    assert stats.in_use == 0 and stats.size <= 1, stats
    pool._check_invariants()
    pool.close()


@pytest.mark.real
def test_raw_connection_kept_without_its_lease_real(pg: Any, driver_name: str, app: str) -> None:
    pool = real_pool(pg.dsn, driver_name, app, max_size=1)
    try:
        raw = _acquire_keep_only_connection(pool)
        mine = query(raw, "SELECT pg_backend_pid()")
        gc.collect()
        pool.housekeep()
        pool.housekeep()
        other = try_acquire(pool, 0.2)
        if other is not None:
            theirs = query(other.connection, "SELECT pg_backend_pid()")
            other.release()
            pytest.fail(
                f"a second holder got backend {theirs} while the first still holds backend "
                f"{mine} through its raw connection (max_size=1); {pool.stats()}"
            )
        assert query(raw, "SELECT pg_backend_pid()") == mine, "the holder's connection works"
        del raw
        lease = acquire_eventually(pool, within=2.0)
        assert query(lease.connection, "SELECT 1") == 1
        lease.release()
    finally:
        pool.close()


@pytest.mark.real
def test_lease_dropped_with_its_connection_is_taken_back_real(
    pg: Any, driver_name: str, app: str
) -> None:
    pool = real_pool(pg.dsn, driver_name, app, max_size=1)
    try:
        _acquire_and_drop_everything(pool, lambda conn: query(conn, "SELECT 1"))
        lease = acquire_eventually(pool, within=2.0)
        assert query(lease.connection, "SELECT 1") == 1
        lease.release()
        assert pool.stats().size <= 1
    finally:
        pool.close()


# -- item 5: a forked child gets housekeeping back and clean counters ---------------------

_COUNTERS = (
    "acquires", "releases", "waits", "timeouts", "refusals", "resets", "opened",
    "connect_errors", "health_check_failures", "leaks", "reclaims",
)  # fmt: skip


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _child_after_fork(pool: Pool, clock: ManualClock) -> dict[str, Any]:
    """What the forked child sees; runs in the child only."""
    records = _Records()
    logging.getLogger("connguard").addHandler(records)
    stats = pool.stats()
    out: dict[str, Any] = {"counters": {name: getattr(stats, name) for name in _COUNTERS}}
    held = pool.acquire(timeout=2)  # will be held past leak_threshold
    spare = pool.acquire(timeout=2)
    spare.release()  # will sit idle past max_idle
    clock.advance(1000)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        stats = pool.stats()
        if stats.leaks >= 1 and stats.idle == 0 and stats.size == 1:
            break
        time.sleep(0.01)
    stats = pool.stats()
    out["leaks"] = stats.leaks
    out["idle"] = stats.idle
    out["size"] = stats.size
    out["closed_idle"] = stats.closed.get("idle", 0)
    out["warnings"] = records.messages
    held.release()
    return out


def _run_in_child(body: Callable[[], dict[str, Any]], within: float = 10.0) -> dict[str, Any]:
    """Fork, run ``body`` in the child, return what it reported (bounded wait)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            try:
                answer = body()
            except BaseException as exc:
                answer = {"error": repr(exc)}
            os.write(write, json.dumps(answer).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    chunks: list[bytes] = []
    deadline = time.monotonic() + within
    try:
        while True:
            ready, _, _ = select.select([read], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"the child did not answer within {within} s")
            chunk = os.read(read, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    result: dict[str, Any] = json.loads(b"".join(chunks))
    assert "error" not in result, result.get("error")
    return result


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_a_use_in_progress_at_a_fork_ends_quietly_in_the_child(
    driver: FakeDriver, clock: ManualClock
) -> None:
    """(From a review.) A process forked inside ``with lease.using():`` (a task queue
    forking from a view): in the child the inherited lease is fenced, and the use's
    end there finds its count (the fork keeps the count as it was)."""
    pool = fake_pool(driver, clock, max_size=1)
    lease = pool.acquire()

    def child() -> dict[str, Any]:
        lease.exit()  # the use begun before the fork ends in the child
        return {"active": lease.active, "in_use": pool.stats().in_use}

    lease.enter()
    try:
        answer = _run_in_child(child)
    finally:
        lease.exit()
    assert answer == {"active": False, "in_use": 0}
    lease.release()
    assert pool.stats().idle == 1
    pool.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_forked_child_gets_housekeeping_and_clean_counters(
    driver: FakeDriver, clock: ManualClock
) -> None:
    pool = Pool(
        driver,
        PoolConfig(
            min_size=0,
            max_size=3,
            leak_threshold=30.0,
            max_idle=60.0,
            max_lifetime=None,
            housekeeping_interval=0.05,
        ),
        name="forked",
        clock=clock,
        housekeeping=True,  # on the process-wide housekeeping thread
    )
    leases = [pool.acquire(timeout=2) for _ in range(3)]
    with pytest.raises(PoolTimeout):
        pool.acquire(timeout=0.01)
    leases.pop().release()
    leases.pop().release()
    before = pool.stats()
    assert before.acquires == 3 and before.timeouts == 1 and before.releases == 2

    child = _run_in_child(lambda: _child_after_fork(pool, clock))

    leases.pop().release()
    after = pool.stats()
    pool.close()
    problems = []
    nonzero = {k: v for k, v in child["counters"].items() if v}
    if nonzero:
        problems.append(f"the child's counters did not start clean: {nonzero}")
    if child["leaks"] < 1 or not child["warnings"]:
        problems.append("no leak reported or logged in the child: no housekeeping after fork")
    if child["idle"] != 0 or child["closed_idle"] < 1:
        problems.append("the child's idle connection past max_idle was not retired")
    if after.acquires != 3 or after.releases != 3:
        problems.append(f"the parent's counters changed: {after}")
    assert not problems, (problems, child)


# -- the parent after a fork: min_size is kept warm only for a process that acquires ---


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_a_pool_that_forked_and_never_acquired_since_keeps_no_connection_warm(
    driver: FakeDriver, clock: ManualClock
) -> None:
    """A gunicorn ``--preload`` (or Celery) master: one query at import, given back,
    then it forks its workers and never serves anything. Its idle connection is
    retired past ``max_idle`` though ``min_size`` is 1, and no other is opened, not
    even when the server ends the backend: the workers' pools are the budget."""
    pool = fake_pool(driver, clock, min_size=1, max_size=2, max_idle=1.0, max_lifetime=None)
    try:
        pool.acquire(timeout=2).release()
        assert pool.stats().idle == 1
        _run_in_child(dict)
        clock.advance(0.5)
        pool.housekeep()
        assert pool.stats().idle == 1, "retired before max_idle"
        clock.advance(1.0)
        pool.housekeep()
        stats = pool.stats()
        assert (stats.size, stats.closed["idle"]) == (0, 1), stats
        pool.housekeep()
        assert (pool.stats().size, pool.stats().opened) == (0, 1), "refilled to min_size"

        # Its connection ended by the server (a DBA's pg_terminate_backend) before
        # max_idle: closed, and not replaced either.
        lease = pool.acquire(timeout=2)
        raw = lease.raw
        lease.release()
        _run_in_child(dict)
        raw.alive = False
        pool.housekeep()
        stats = pool.stats()
        assert (stats.size, stats.closed["broken"]) == (0, 1), stats
        assert pool.stats().opened == 2, "a dead idle connection was replaced"
    finally:
        pool.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_a_pool_that_forked_keeps_min_size_again_from_its_next_acquire(
    driver: FakeDriver, clock: ManualClock
) -> None:
    """A worker whose view forks a child (multiprocessing) while it holds a lease:
    until the worker's next acquire its pool behaves as a master's (the connection
    may be retired past ``max_idle``); from that acquire on, ``min_size`` is kept
    warm again, refilled when a connection dies."""
    pool = fake_pool(driver, clock, min_size=1, max_size=2, max_idle=1.0, max_lifetime=None)
    try:
        lease = pool.acquire(timeout=2)
        _run_in_child(dict)
        lease.release()
        clock.advance(1.5)
        pool.housekeep()
        assert pool.stats().size == 0
        lease = pool.acquire(timeout=2)  # the next request
        raw = lease.raw
        lease.release()
        clock.advance(1.5)
        pool.housekeep()
        stats = pool.stats()
        assert (stats.idle, stats.closed["idle"]) == (1, 1), "min_size not kept again"
        raw.alive = False
        pool.housekeep()
        wait_until(lambda: pool.stats().opened == 3 and pool.stats().idle == 1)
    finally:
        pool.close()


# -- item 6: one deadline for acquire(timeout) --------------------------------------------


class SlowPingDriver(FakeDriver):
    """Pings that hang (a partitioned network) until ``answer`` is set.

    ``bounded``: the ping gives up after the timeout it is given (psycopg 3); otherwise
    it ignores it (psycopg2) and only a safety bound ends it.
    """

    def __init__(self, bounded: bool) -> None:
        super().__init__()
        self.bounded = bounded
        self.hang = False
        self.answer = threading.Event()

    def ping(self, conn: FakeConnection, timeout: float) -> None:
        if self.hang and not self.answer.wait(timeout if self.bounded else 0.7):
            raise FakeOperationalError("ping: no answer")
        super().ping(conn, timeout)


@pytest.mark.parametrize("bounded", [True, False], ids=["ping-bounded", "ping-unbounded"])
def test_acquire_deadline_holds_when_health_checks_hang(bounded: bool, clock: ManualClock) -> None:
    driver = SlowPingDriver(bounded)
    pool = fake_pool(driver, clock, max_size=3, ping_after_idle=0, connect_timeout=0.5, timeout=5.0)
    leases = [pool.acquire(timeout=2) for _ in range(3)]
    for lease in leases:
        lease.release()
    assert pool.stats().idle == 3
    driver.hang = True
    clock.advance(60)
    started = time.monotonic()
    try:
        got = try_acquire(pool, 0.1)
        elapsed = time.monotonic() - started
    finally:
        driver.answer.set()  # let every hanging ping finish
    if got is not None:
        got.release()
    assert elapsed <= 0.1 + DEADLINE_MARGIN, (
        f"acquire(timeout=0.1) took {elapsed:.2f} s with 3 idle connections whose ping hangs"
    )
    wait_until(lambda: pool.stats().in_use == 0)
    pool._check_invariants()
    pool.close()


@pytest.mark.real
@pytest.mark.private
def test_acquire_deadline_holds_when_pings_hang_real(
    private_pg: Any, proxy: FaultProxy, driver_name: str, app: str
) -> None:
    pool = real_pool(
        proxy.dsn(private_pg.dsn),
        driver_name,
        app,
        max_size=3,
        ping_after_idle=0,
        connect_timeout=1.0,
        timeout=5.0,
    )
    leases = [pool.acquire(timeout=5) for _ in range(3)]
    for lease in leases:
        assert query(lease.connection, "SELECT 1") == 1
    for lease in leases:
        lease.release()
    assert pool.stats().idle == 3
    proxy.blackhole()

    def heal() -> None:  # bounds today's psycopg2 ping, which nothing else would end
        proxy.blackhole(False)
        proxy.reset_all()

    watchdog = threading.Timer(2.5, heal)
    watchdog.start()
    got = None
    started = time.monotonic()
    try:
        got = try_acquire(pool, 0.1)
        elapsed = time.monotonic() - started
    finally:
        watchdog.cancel()
        watchdog.join()
        heal()
        if got is not None:
            got.release()
        pool.close()
    assert elapsed <= 0.1 + DEADLINE_MARGIN, (
        f"acquire(timeout=0.1) took {elapsed:.2f} s with 3 idle connections behind a "
        f"partitioned network ({driver_name})"
    )


# -- item 7: exceptions that are not the timeout -------------------------------------------


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="POSIX only")
def test_interrupted_waiter_strands_no_slot(driver: FakeDriver, clock: ManualClock) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers run in the main thread only")
    pool = fake_pool(driver, clock, max_size=1)
    held = pool.acquire(timeout=2)
    main = threading.get_ident()
    errors: list[BaseException] = []

    def handler(signum: int, frame: object) -> None:
        raise Interrupted

    def interrupter() -> None:
        try:
            wait_until(lambda: pool.stats().waiting == 1, timeout=3)
            signal.pthread_kill(main, signal.SIGUSR1)
        except BaseException as exc:
            errors.append(exc)

    previous = signal.signal(signal.SIGUSR1, handler)
    thread = threading.Thread(target=interrupter)
    thread.start()
    try:
        with pytest.raises(Interrupted):
            pool.acquire(timeout=3)
    finally:
        thread.join()
        signal.signal(signal.SIGUSR1, previous)
    assert not errors, errors
    assert pool.stats().waiting == 0, f"the interrupted waiter is still queued: {pool.stats()}"
    held.release()
    fresh = try_acquire(pool, 0.5)
    assert fresh is not None, f"the released connection went to nobody: {pool.stats()}"
    fresh.connection.use()
    fresh.release()
    stats = pool.stats()
    assert stats.waiting == 0 and stats.in_use == 0, stats
    pool._check_invariants()
    pool.close()


class InterruptingDriver(FakeDriver):
    """Raises :class:`Interrupted` once from the named driver call."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.armed = False

    def _maybe_interrupt(self, where: str) -> None:
        if self.armed and self.where == where:
            self.armed = False
            raise Interrupted

    def rollback(self, conn: FakeConnection) -> None:
        self._maybe_interrupt("rollback")
        super().rollback(conn)

    def reset(self, conn: FakeConnection) -> None:
        self._maybe_interrupt("reset")
        super().reset(conn)

    def ping(self, conn: FakeConnection, timeout: float) -> None:
        self._maybe_interrupt("ping")
        super().ping(conn, timeout)


@pytest.mark.parametrize("where", ["rollback", "reset"])
def test_base_exception_during_release_leaks_no_slot(where: str, clock: ManualClock) -> None:
    driver = InterruptingDriver(where)
    pool = fake_pool(driver, clock, max_size=1)
    lease = pool.acquire(timeout=2)
    (conn,) = driver.opened
    conn.status = TxStatus.INTRANS  # the holder left a transaction open
    driver.armed = True
    try:
        lease.release(reset=where == "reset")
    except Interrupted:
        pass  # it may propagate; what matters is what the pool is left with
    wait_until(lambda: pool.stats().resetting == 0)  # a reset may run in the background
    assert not driver.armed, "the driver call under test did not run"
    assert not lease.active, "the lease was half-ended"
    fresh = try_acquire(pool, 0.5)
    assert fresh is not None, f"the slot leaked: {pool.stats()}"
    fresh.connection.use()
    unclean = [c for c in driver.opened if not c.closed and c.status is not TxStatus.IDLE]
    assert not unclean, f"an unclean connection was kept or handed on: {unclean}"
    fresh.release()
    stats = pool.stats()
    assert stats.in_use == 0 and stats.size <= 1, stats
    pool._check_invariants()
    pool.close()


def test_base_exception_during_health_check_leaks_no_slot(clock: ManualClock) -> None:
    driver = InterruptingDriver("ping")
    pool = fake_pool(driver, clock, max_size=1, ping_after_idle=0)
    pool.acquire(timeout=2).release()
    driver.armed = True
    try:
        pool.acquire(timeout=0.5).release()
    except Interrupted:
        pass
    assert not driver.armed, "the ping under test did not run"
    fresh = try_acquire(pool, 0.5)
    assert fresh is not None, f"the slot leaked: {pool.stats()}"
    fresh.release()
    stats = pool.stats()
    assert stats.in_use == 0 and stats.waiting == 0 and stats.size <= 1, stats
    pool._check_invariants()
    pool.close()


# -- item 8: connguard.scope objects ------------------------------------------------------


@pytest.fixture
def scoped_pool(driver: FakeDriver, clock: ManualClock) -> Iterator[Pool]:
    pool = fake_pool(driver, clock, max_size=4)
    yield pool
    pool.close()


def test_scope_object_can_be_nested(scoped_pool: Pool) -> None:
    s = connguard.scope("job")
    assert current_scope() is None
    with s as outer:
        assert current_scope() is outer
        a = take(scoped_pool)
        assert a.owner is outer
        with s as inner:
            assert current_scope() is inner
            b = take(scoped_pool)
            assert b.owner is inner
        assert not b.active, "the inner block's lease was not returned at its end"
        assert a.active, "the inner block's end returned the outer block's lease"
        assert current_scope() is outer, "the outer scope is not current after the inner block"
        c = take(scoped_pool)
    assert not a.active and not c.active, "the outer block's leases were not returned"
    assert current_scope() is None, f"a scope is still current after the block: {current_scope()}"
    assert scoped_pool.stats().in_use == 0
    scoped_pool._check_invariants()


def test_a_nested_scope_knows_the_scopes_it_was_opened_in(scoped_pool: Pool) -> None:
    """What lets code in a nested scope go on with a connection an enclosing one
    holds (the Django layer's owner check): each scope opened records the open scope
    it was opened in, the thread's implicit one included, at any depth; an ended one
    encloses nothing."""
    from connguard.scope import encloses, owner_scope

    thread_scope = owner_scope()  # this thread's implicit scope, as a query makes it
    try:
        with connguard.scope("outer") as outer, connguard.scope("inner") as inner:
            assert inner.parent is outer and outer.parent is thread_scope
            assert encloses(outer, inner) and encloses(thread_scope, inner)
            assert not encloses(inner, outer) and not encloses(inner, inner)
            outer.end()
            assert not encloses(outer, inner), "an ended scope still encloses"
        with connguard.scope("sibling") as sibling:
            assert not encloses(inner, sibling)
    finally:
        thread_scope.end()
    with connguard.scope("alone") as alone:
        assert alone.parent is None, "an ended thread scope was taken as the enclosing one"
    assert scoped_pool.stats().in_use == 0


def test_scope_object_can_be_reentered_in_sequence(scoped_pool: Pool) -> None:
    s = connguard.scope("job")
    seen: list[Scope] = []
    for _ in range(2):
        with s as opened:
            assert current_scope() is opened and not opened.ended
            lease = take(scoped_pool)
            seen.append(opened)
        assert not lease.active
        assert current_scope() is None
    assert seen[0] is not seen[1], "the second block reused the first block's ended scope"
    assert scoped_pool.stats().in_use == 0


def test_scope_object_can_be_shared_by_threads(scoped_pool: Pool) -> None:
    s = connguard.scope("job")
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    errors: list[str] = []
    leases: dict[str, Lease] = {}
    scopes: dict[str, Scope] = {}

    def check(ok: bool, what: str) -> None:
        if not ok:
            errors.append(what)

    def first() -> None:
        try:
            with s as opened:
                scopes["first"] = opened
                check(current_scope() is opened, "first: its scope is not current")
                leases["first"] = take(scoped_pool)
                first_in.set()
                check(second_in.wait(3), "first: the second thread never entered")
                check(current_scope() is opened, "first: the second thread's scope is current")
            check(not leases["first"].active, "first: its lease outlived its block")
            check(current_scope() is None, "first: a scope is current after its block")
        except BaseException as exc:
            errors.append(f"first: {exc!r}")
        finally:
            first_in.set()
            first_out.set()

    def second() -> None:
        try:
            check(first_in.wait(3), "second: the first thread never entered")
            with s as opened:
                scopes["second"] = opened
                check(current_scope() is opened, "second: its scope is not current")
                leases["second"] = take(scoped_pool)
                second_in.set()
                check(first_out.wait(3), "second: the first thread never left")
                check(
                    leases["second"].active,
                    "second: the first thread's block end returned the second's lease",
                )
                check(current_scope() is opened, "second: its scope is not current any more")
            check(not leases["second"].active, "second: its lease outlived its block")
            check(current_scope() is None, "second: a scope is current after its block")
        except BaseException as exc:
            errors.append(f"second: {exc!r}")
        finally:
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert scopes["first"] is not scopes["second"]
    assert scoped_pool.stats().in_use == 0, scoped_pool.stats()


# -- item 2 at engine level: revoke from another thread ------------------------------------

_BACKENDS = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
_RUNNING_SLEEP = (
    "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
    "AND state = 'active' AND query LIKE %s"
)


@pytest.mark.real
@pytest.mark.parametrize("how", ["scope_end", "release"])
def test_revoke_from_another_thread_cancels_and_keeps_the_bound(
    pg: Any, driver_name: str, app: str, how: str
) -> None:
    max_size = 1
    pool = real_pool(pg.dsn, driver_name, app, max_size=max_size, timeout=5.0)
    job = Scope("report", kind="request")
    started = threading.Event()
    outcome: dict[str, Any] = {}
    peak = [0]
    stop_sampling = threading.Event()

    def holder() -> None:
        try:
            lease = pool.acquire(owner=job, timeout=5)
            job.add(lease)
            outcome["lease"] = lease
            cur = lease.connection.cursor()
            started.set()
            try:
                cur.execute("SELECT pg_sleep(5)")
                outcome["result"] = "completed"
            except BaseException as exc:
                outcome["result"] = exc
            try:
                cur.close()
            except Exception:
                pass
        except BaseException as exc:
            outcome["setup"] = exc
        finally:
            started.set()

    def sampler() -> None:
        with psycopg.connect(pg.dsn, autocommit=True) as admin:
            while not stop_sampling.is_set():
                row = admin.execute(_BACKENDS, (app,)).fetchone()
                peak[0] = max(peak[0], int(row[0]) if row else 0)
                stop_sampling.wait(0.01)

    # Daemons: under a broken engine the holder can block on a socket closed under it.
    sampling = threading.Thread(target=sampler, daemon=True)
    sampling.start()
    worker = threading.Thread(target=holder, daemon=True)
    worker.start()
    admin = psycopg.connect(pg.dsn, autocommit=True)
    try:
        assert started.wait(5) and "setup" not in outcome, outcome.get("setup")
        deadline = time.monotonic() + 5
        backend = None
        while backend is None and time.monotonic() < deadline:
            row = admin.execute(_RUNNING_SLEEP, (app, "%pg_sleep%")).fetchone()
            backend = row[0] if row else None
        assert backend is not None, "the holder's pg_sleep never showed up as running"

        revoked_at = time.monotonic()
        if how == "scope_end":
            job.end()
        else:
            outcome["lease"].release()
        revoke_took = time.monotonic() - revoked_at
        size_after = pool.stats().size  # read before the backend's state, see below
        still_running = admin.execute(_RUNNING_SLEEP, (app, "%pg_sleep%")).fetchone()

        # The slot comes back within a bounded wait; the server never sees more.
        lease = acquire_eventually(pool, within=4.0)
        assert query(lease.connection, "SELECT 1") == 1
        row = admin.execute(_BACKENDS, (app,)).fetchone()
        peak[0] = max(peak[0], int(row[0]) if row else 0)  # one sample while it is held
        lease.release()
        worker.join(3)
        stats = pool.stats()
    finally:
        stop_sampling.set()
        sampling.join(5)
        admin.close()
        pool.close()
    result = outcome.get("result")
    problems = []
    if revoke_took >= 1.0:
        problems.append(f"ending the lease from another thread took {revoke_took:.2f} s")
    # The backend still ran pg_sleep after size_after was read, so it did then too.
    if still_running and size_after < 1:
        problems.append("the pool freed the slot while its backend still ran the statement")
    if peak[0] > max_size:
        problems.append(f"the server saw {peak[0]} backends for max_size={max_size}")
    if "canceling statement due to user request" not in str(result):
        problems.append(f"the running statement did not end by a cancel: {result!r}")
    if stats.size > max_size or stats.in_use:
        problems.append(f"afterwards: {stats}")
    assert not problems, problems


@pytest.fixture(autouse=True)
def _collect_after() -> Iterator[None]:
    yield
    gc.collect()


@pytest.mark.parametrize("held_before", [False, True], ids=["first-lease", "second-lease"])
def test_a_lease_added_while_its_scope_ends_elsewhere_is_released(
    scoped_pool: Pool, monkeypatch: pytest.MonkeyPatch, held_before: bool
) -> None:
    """A scope takes no lock. The interleaving that could lose a lease: add() is
    about to record it when end() runs in another thread, finds nothing active and
    returns. add() must then see the scope ended and release the lease itself.
    Forced here by pausing add() where it makes the weak reference it records
    (``held_before``: the scope already lists a lease given back)."""
    import sys

    scope_module = sys.modules["connguard.scope"]  # the package's name is the class
    job = Scope("job")
    if held_before:  # listed, then given back
        first = scoped_pool.acquire(owner=job)
        job.add(first)
        first.release()
    in_add, go = threading.Event(), threading.Event()
    weakref_ref = scope_module.weakref.ref

    class PausingWeakref:
        @staticmethod
        def ref(obj: Any) -> Any:
            if threading.current_thread().name == "adder":
                in_add.set()
                go.wait(5)
            return weakref_ref(obj)

    monkeypatch.setattr(scope_module, "weakref", PausingWeakref)
    lease = scoped_pool.acquire(owner=job)
    adder = threading.Thread(target=job.add, args=(lease,), name="adder")
    adder.start()
    try:
        assert in_add.wait(5)
        ender = threading.Thread(target=job.end)
        ender.start()
        ender.join(5)
        assert not ender.is_alive(), "end() waited for the add() in progress"
        assert not job.leases(), "end() saw a lease add() had not recorded yet"
    finally:
        go.set()
        adder.join(5)
    assert not lease.active, "a lease added as its scope ended was never released"
    assert scoped_pool.stats().in_use == 0


def test_leases_added_from_many_threads_as_their_scope_ends_are_all_released(
    driver: FakeDriver, clock: ManualClock
) -> None:
    """The same race left to the scheduler, many times: eight threads acquire into one
    scope (giving some back, so add() prunes) while the main thread ends it at a moment
    of its choosing. Whatever the interleaving, no lease of an ended scope stays active
    (checked from the pool's side: nothing in use)."""
    import random
    import sys

    pool = fake_pool(driver, clock, max_size=8 * 4, max_waiting=0)
    rng = random.Random(11)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between nearly any two bytecodes
    try:
        for _ in range(60):
            job = Scope("job")
            started = threading.Barrier(9)
            taken: list[Lease] = []

            def work(
                job: Scope = job, started: threading.Barrier = started, taken: list[Lease] = taken
            ) -> None:
                started.wait(5)
                for turn in range(4):
                    lease = pool.acquire(owner=job, timeout=2)
                    taken.append(lease)
                    job.add(lease)
                    if turn % 2:
                        lease.release()

            threads = [threading.Thread(target=work) for _ in range(8)]
            for thread in threads:
                thread.start()
            started.wait(5)
            # A moment of the main thread's choosing: right after some of the 32
            # acquires (spinning: a wait of a millisecond would let them all finish).
            after = rng.randrange(1, 32)
            while len(taken) < after and any(thread.is_alive() for thread in threads):
                pass
            job.end()
            for thread in threads:
                thread.join(5)
            assert [lease for lease in taken if lease.active] == []
            assert pool.stats().in_use == 0
    finally:
        sys.setswitchinterval(interval)
        pool.close()


def test_release_all_keeps_a_pinned_lease_only_when_early(scoped_pool: Pool) -> None:
    """``release_all(early=True)`` (the response is ready) keeps a lease with a
    transaction open; without ``early`` every active lease goes, pinned or not, and
    those given back already are not counted."""
    job = Scope("job")
    pinned, plain, returned = (scoped_pool.acquire(owner=job) for _ in range(3))
    for lease in (pinned, plain, returned):
        job.add(lease)
    returned.release()
    raw = pinned.raw
    assert isinstance(raw, FakeConnection)
    raw.status = TxStatus.INTRANS
    assert job.release_all(early=True) == 1
    assert pinned.active and not plain.active
    assert job.leases() == [pinned]
    assert job.release_all() == 1
    assert not pinned.active and job.leases() == []
    assert scoped_pool.stats().in_use == 0


# -- a revoke on an event loop whose resetter could not be started ----------------------


def held_raw(lease: Lease) -> Any:
    """The driver's connection ``lease`` still holds (ending or not), else None."""
    conn = lease._conn
    return None if conn is None else conn.raw


class CancelRecordingDriver(FakeDriver):
    """Records, for each cancel sent, whether the revoked lease still held the
    connection (so nobody else can have been handed it) and whether a later holder
    of the connection was in a use."""

    def __init__(self) -> None:
        super().__init__()
        self.revoked: Lease | None = None
        self.later: list[Lease] = []
        self.sent: list[tuple[bool, bool]] = []

    def cancel(self, conn: FakeConnection) -> None:
        held = self.revoked is not None and held_raw(self.revoked) is conn
        hit = any(bool(lease._busy) and lease._conn is not None for lease in self.later)
        self.sent.append((held, hit))
        super().cancel(conn)


@pytest.mark.parametrize("started_by", ["a_later_release", "housekeeping"])
def test_a_revoke_whose_resetter_failed_to_start_never_cancels_a_next_holder(
    monkeypatch: pytest.MonkeyPatch, started_by: str
) -> None:
    """A release on an event loop revokes a lease whose statement runs: its cancel is
    queued for the resetter thread, which cannot be started ("can't start new thread",
    under exactly the load that makes pools revoke). The release neither raises nor
    lets the lease end before the cancel is sent: the cancel goes out once a thread
    runs (the next hand-off, or the next housekeeping pass), still on the revoked
    lease's connection, never on a next holder's statement."""
    import connguard.pool.resetter as resetter_module

    from .test_pool_faults import make_pool, on_event_loop

    monkeypatch.setattr(resetter_module, "_resetter", resetter_module.Resetter())
    failing = {"left": 1}

    class FailingThread(threading.Thread):
        def start(self) -> None:
            if failing["left"]:
                failing["left"] -= 1
                raise RuntimeError("can't start new thread")
            super().start()

    only_here = types.SimpleNamespace(Thread=FailingThread, Lock=threading.Lock)
    monkeypatch.setattr(resetter_module, "threading", only_here)  # the resetter's thread
    driver = CancelRecordingDriver()
    pool = make_pool(driver, max_size=2)
    first = pool.acquire()
    conn = held_raw(first)
    driver.revoked = first
    first.enter()  # a statement runs (a worker thread's, in the real case)
    on_event_loop(first.release)  # queued; the thread failed to start: no raise
    assert failing["left"] == 0, "the start did not fail"
    assert first._cancelling, "the cancel is still owed"
    first.exit()  # the statement ends: the lease does not end before its cancel
    assert held_raw(first) is conn and pool.stats().in_use == 1
    assert driver.sent == []
    if started_by == "a_later_release":
        other = pool.acquire()
        held_raw(other).status = TxStatus.INTRANS
        on_event_loop(other.release)  # starts the thread: the queued cancel goes first
    else:
        pool.housekeep()
    wait_until(lambda: first._conn is None)
    assert driver.sent == [(True, False)]
    nxt = pool.acquire(timeout=2)
    driver.later.append(nxt)
    nxt.enter()  # the next holder's statement runs: nothing is owed to it
    nxt.exit()
    nxt.release()
    wait_until(lambda: pool.stats().in_use == 0 and pool.stats().resetting == 0)
    assert driver.sent == [(True, False)]
    pool.close()
