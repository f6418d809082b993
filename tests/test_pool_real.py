"""The pool against a real PostgreSQL, with psycopg 3 and with psycopg2.

What a fake driver cannot show: the server's own count of backends stays within
``max_size``; a connection comes back clean; forked children never harm the
parent's sessions; an outage gives a clear error within ``timeout`` and the pool
heals by itself when the server returns.
"""

from __future__ import annotations

import gc
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from connguard.drivers import load_driver
from connguard.pool import ConnectFailed, Pool, PoolConfig, PoolError, PoolTimeout

from .fakes import ManualClock, wait_until
from .proxy import FaultProxy

pytestmark = pytest.mark.real

DRIVERS = ["psycopg", "psycopg2"]


def query(conn: Any, sql: str, params: tuple[Any, ...] = ()) -> Any:
    """Run ``sql`` and fetch the first column of the first row (both drivers)."""
    cur = conn.cursor()
    try:
        cur.execute(sql, params)
        row = cur.fetchone()
        return row[0] if row else None
    finally:
        cur.close()


def execute(conn: Any, sql: str) -> None:
    cur = conn.cursor()
    try:
        cur.execute(sql)
    finally:
        cur.close()


def backends(dsn: str, app: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
        ).fetchone()
        assert row is not None
        return int(row[0])


def make_pool(dsn: str, driver: str, app: str, **settings: Any) -> Pool:
    return Pool(
        load_driver(driver, conninfo=dsn, application_name=app),
        PoolConfig(**settings),
        name=app,
    )


@pytest.fixture
def app() -> str:
    return f"cg-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=DRIVERS)
def driver_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_threads_share_a_bounded_pool_and_get_clean_connections(
    pg: Any, driver_name: str, app: str
) -> None:
    pool = make_pool(pg.dsn, driver_name, app, min_size=1, max_size=4, timeout=10.0)
    peak = 0
    stop = threading.Event()
    errors: list[BaseException] = []

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.01):
            peak = max(peak, backends(pg.dsn, app))

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(15):
                lease = pool.acquire()
                conn = lease.connection
                # What the previous holder left behind must not be visible.
                assert query(conn, "SELECT current_setting('connguard.mark', true)") in (None, "")
                # A transaction left open by the previous holder would still own its xid.
                assert query(conn, "SELECT pg_current_xact_id_if_assigned() IS NULL") is True
                roll = rng.random()
                if roll < 0.3:
                    execute(conn, "BEGIN")
                    query(conn, "SELECT pg_current_xact_id()")  # left open: must be rolled back
                    lease.release()
                elif roll < 0.5:
                    query(conn, "SELECT set_config('connguard.mark', 'dirty', false)")
                    lease.release(reset=True)  # session state changed: full reset
                else:
                    query(conn, "SELECT pg_sleep(0.001)")
                    lease.release()
        except BaseException as exc:
            errors.append(exc)

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sampler.join()
    assert not errors, errors[:3]
    stats = pool.stats()
    assert stats.acquires == 24 * 15 and stats.in_use == 0 and stats.timeouts == 0
    assert 1 <= peak <= 4, f"server saw {peak} backends for max_size=4"
    assert stats.size <= 4 and backends(pg.dsn, app) == stats.size
    pool.close()
    wait_until(lambda: backends(pg.dsn, app) == 0)


def test_terminated_idle_backends_are_replaced_without_errors(
    pg: Any, driver_name: str, app: str
) -> None:
    pool = make_pool(pg.dsn, driver_name, app, min_size=3, max_size=3, liveness_after_idle=0)
    wait_until(lambda: pool.stats().idle == 3)
    with psycopg.connect(pg.dsn, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE application_name = %s",
            (app,),
        )
    leases = [pool.acquire(timeout=5) for _ in range(3)]
    for lease in leases:
        assert query(lease.connection, "SELECT 1") == 1
        lease.release()
    assert pool.stats().health_check_failures == 3
    pool.close()


def test_forked_children_never_harm_the_parents_sessions(
    pg: Any, driver_name: str, app: str
) -> None:
    pool = make_pool(pg.dsn, driver_name, app, min_size=2, max_size=4)
    wait_until(lambda: pool.stats().idle == 2)
    held = pool.acquire()
    parent_pids = {query(held.connection, "SELECT pg_backend_pid()")}
    idle = pool.acquire()
    parent_pids.add(query(idle.connection, "SELECT pg_backend_pid()"))
    idle.release()

    children = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # the child: use the pool, close it, collect garbage, exit
            code = 1
            try:
                lease = pool.acquire(timeout=10)
                mine = query(lease.connection, "SELECT pg_backend_pid()")
                lease.release()
                pool.close()
                gc.collect()
                code = 0 if mine not in parent_pids else 3
            finally:
                os._exit(code)
        children.append(pid)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    # The parent's sessions survived: same backends, still answering.
    assert query(held.connection, "SELECT pg_backend_pid()") in parent_pids
    held.release()
    again = [pool.acquire(), pool.acquire()]
    assert {query(lease.connection, "SELECT pg_backend_pid()") for lease in again} == parent_pids
    for lease in again:
        lease.release()
    assert pool.stats().health_check_failures == 0
    pool.close()


@pytest.mark.private
def test_outage_fails_fast_with_clear_error_and_heals(
    private_pg: Any, driver_name: str, app: str
) -> None:
    timeout = 1.0
    pool = make_pool(
        private_pg.dsn,
        driver_name,
        app,
        min_size=2,
        max_size=4,
        timeout=timeout,
        connect_timeout=2.0,
        reconnect_backoff=0.05,
        reconnect_backoff_max=0.2,
    )
    wait_until(lambda: pool.stats().idle == 2)
    stop = threading.Event()
    failures: list[tuple[float, BaseException]] = []
    successes = [0]
    lock = threading.Lock()

    def load() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                with pool.connection() as conn:
                    query(conn, "SELECT 1")
                with lock:
                    successes[0] += 1
            except PoolError as exc:
                with lock:
                    failures.append((time.monotonic() - started, exc))
            except Exception:
                pass  # a query cut off by the outage: the driver's own error
            stop.wait(0.005)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: successes[0] > 20)
    private_pg.stop("fast")
    wait_until(lambda: len(failures) >= 6, timeout=15)
    for elapsed, exc in failures:
        assert elapsed <= timeout + 0.5, f"an acquire took {elapsed:.2f} s for timeout={timeout}"
        assert isinstance(exc, PoolTimeout)
        assert isinstance(exc, pool.driver.operational_error)
        assert app in str(exc)
    assert any(isinstance(exc, ConnectFailed) and exc.__cause__ for _, exc in failures)
    private_pg.start()  # same port: the database is back
    before = successes[0]
    wait_until(lambda: successes[0] > before + 20, timeout=15)
    stop.set()
    for t in threads:
        t.join()
    stats = pool.stats()
    assert stats.connect_errors >= 1 and stats.in_use == 0
    assert stats.size <= 4
    pool.close()


@pytest.mark.private
def test_blackholed_network_bounded_by_timeout(
    private_pg: Any, proxy: FaultProxy, driver_name: str, app: str
) -> None:
    pool = make_pool(
        proxy.dsn(private_pg.dsn), driver_name, app, min_size=0, max_size=2, connect_timeout=2.0
    )
    lease = pool.acquire(timeout=5)
    assert query(lease.connection, "SELECT 1") == 1
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(PoolTimeout):
        pool.acquire(timeout=0.5)  # the other slot must be opened: the connect hangs
    assert time.monotonic() - started < 1.0
    proxy.blackhole(False)
    lease.release()
    pool.close()


# -- socket_timeout on a call blocked on a row lock -------------------------------------


class CancelAfterFailure:
    """A driver whose pool-sent cancel goes out only once the blocked call has failed.

    The worst order for ``socket_timeout``'s abort: the socket is shut down, the holder's
    thread wakes and libpq marks the connection bad, and only then does the cancel
    thread run. Left to the scheduler this happened about half the time with psycopg 3;
    here it happens every time. ``cancel=False`` sends no cancel at all, so only the
    server's own check of the client socket can end the backend.
    """

    def __init__(self, base: Any, failed: threading.Event, *, cancel: bool = True) -> None:
        self._base = base
        self._failed = failed
        if cancel:
            self.prepare_cancel = self._prepare_cancel

    def __getattr__(self, name: str) -> Any:
        if name == "prepare_cancel":  # reached only when cancel=False
            raise AttributeError(name)
        return getattr(self._base, name)

    def cancel(self, conn: Any) -> None:
        self._failed.wait(10)
        self._base.cancel(conn)

    def _prepare_cancel(self, conn: Any) -> Any:
        send = getattr(self._base, "prepare_cancel", lambda conn: None)(conn)  # taken now
        if send is None:
            return None

        def late() -> None:
            self._failed.wait(10)
            send()

        return late


LOCK_TABLE = "cg_lock_rows"


def lock_wait_aborted(dsn: str, base: Any, app: str, *, cancel: bool = True) -> str:
    """A transaction locks row 1, then blocks on row 2 (held by another session) until
    ``socket_timeout``'s abort ends the call; the lease is then released. Return what
    is left of its backend on the server 3 s later ("" when nothing is)."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"CREATE TABLE IF NOT EXISTS {LOCK_TABLE} (id int PRIMARY KEY, v int)")
        admin.execute(f"INSERT INTO {LOCK_TABLE} VALUES (1, 0), (2, 0) ON CONFLICT DO NOTHING")
    failed = threading.Event()
    clock = ManualClock()
    pool = Pool(
        CancelAfterFailure(base, failed, cancel=cancel),
        PoolConfig(min_size=0, max_size=1, socket_timeout=1.0),
        name=app,
        clock=clock,
        housekeeping=False,
    )
    holder = psycopg.connect(dsn, application_name=f"{app}-holder")
    outcome: list[BaseException | None] = []
    try:
        holder.execute(f"SELECT v FROM {LOCK_TABLE} WHERE id = 2 FOR UPDATE")  # stays open
        lease = pool.acquire(timeout=5)
        pid = int(lease.raw.info.backend_pid)
        with lease.using() as raw:
            execute(raw, f"BEGIN; UPDATE {LOCK_TABLE} SET v = v + 1 WHERE id = 1")

        def blocked() -> None:
            try:
                with lease.using() as raw:
                    execute(raw, f"SELECT v FROM {LOCK_TABLE} WHERE id = 2 FOR UPDATE")
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)
            failed.set()

        thread = threading.Thread(target=blocked, name="lock-waiter")
        thread.start()
        with psycopg.connect(dsn, autocommit=True) as admin:

            def waiting_on_lock() -> bool:
                row = admin.execute(
                    "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone()
                return row == ("Lock",)

            wait_until(waiting_on_lock)
            pool.housekeep()  # housekeeping first sees the call
            clock.advance(2.0)
            pool.housekeep()  # still the same call, past socket_timeout: aborted
            assert failed.wait(5), "the aborted call did not return"
            thread.join(5)
            assert isinstance(outcome[0], base.operational_error), outcome
            lease.release()
            assert pool.stats().aborted == 1

            def left() -> str:
                row = admin.execute(
                    "SELECT state || ' ' || coalesce(wait_event_type, '') "
                    "FROM pg_stat_activity WHERE pid = %s",
                    (pid,),
                ).fetchone()
                return "" if row is None else str(row[0])

            deadline = time.monotonic() + 3.0
            while left() and time.monotonic() < deadline:
                failed.wait(0.02)
            still = left()
            if still:
                return f"backend {pid} still there ({still})"
            admin.execute("SET lock_timeout = '500ms'")
            try:
                admin.execute(f"SELECT v FROM {LOCK_TABLE} WHERE id = 1 FOR UPDATE")
            except psycopg.errors.LockNotAvailable:
                return "row 1 still locked"
            return ""
    finally:
        failed.set()
        holder.close()
        pool.close()


@pytest.mark.private
def test_a_call_aborted_while_waiting_on_a_row_lock_is_cancelled_even_once_broken(
    private_pg: Any, app: str
) -> None:
    """psycopg 3: ``socket_timeout``'s abort of a call blocked on a row lock (its
    transaction holds another row) also cancels it on the server, even when the cancel
    thread runs only after the call has failed and libpq has marked the connection bad
    (a cancel taken from the connection then is a no-op). PostgreSQL does not read the
    client socket while it waits on a lock: without the cancel the backend stays,
    holding row 1, until the other session lets go, while the pool opens another."""
    base = load_driver("psycopg", conninfo=private_pg.dsn, application_name=app)
    left = lock_wait_aborted(private_pg.dsn, base, app)
    assert not left, f"3 s after the aborted call's lease ended: {left}"


@pytest.mark.private
def test_client_connection_check_interval_ends_an_aborted_lock_wait_without_a_cancel(
    private_pg: Any, driver_name: str, app: str
) -> None:
    """With ``client_connection_check_interval`` (the driver sets it on each connection,
    PostgreSQL 14 and later), the backend of a call aborted while waiting on a row lock
    notices its client is gone and ends, releasing its locks, even when no cancel is
    sent (psycopg2's has no bound, so the pool sends none)."""
    base = load_driver(
        driver_name,
        conninfo=private_pg.dsn,
        application_name=app,
        client_connection_check_interval=0.25,
    )
    left = lock_wait_aborted(private_pg.dsn, base, app, cancel=False)
    assert not left, f"3 s after the aborted call's lease ended: {left}"


# -- socket_timeout on a reset stalled when its pool closes -------------------------------


@pytest.mark.private
@pytest.mark.parametrize("close_first", [False, True])
def test_a_closed_pools_stalled_reset_does_not_hold_the_resetter(
    private_pg: Any, proxy: FaultProxy, app: str, close_first: bool
) -> None:
    """Pool A's reset stalls in a black hole (``socket_timeout=1``); pool B, healthy,
    hands a reset to the same (process-wide) resetter thread. Whether or not A is
    closed meanwhile, housekeeping aborts A's reset at ``socket_timeout`` and B's
    reset runs: B's connection becomes idle."""
    a = make_pool(proxy.dsn(private_pg.dsn), "psycopg", app + "a", min_size=0, max_size=1,
                  socket_timeout=1.0, reset="always", background_reset=True)  # fmt: skip
    b = make_pool(private_pg.dsn, "psycopg", app + "b", min_size=0, max_size=1,
                  reset="always", background_reset=True)  # fmt: skip
    try:
        lease = a.acquire(timeout=5)
        assert query(lease.connection, "SELECT 1") == 1
        proxy.blackhole()
        lease.release()  # nobody waits: the resetter resets it, into the black hole
        if close_first:
            a.close()
        lb = b.acquire(timeout=5)
        assert query(lb.connection, "SELECT 1") == 1
        lb.release()  # queued on the resetter behind A's reset
        wait_until(lambda: b.stats().resetting == 0, timeout=8.0)
        assert b.stats().idle == 1
        wait_until(lambda: a.stats().size == 0, timeout=5.0)
        assert a.stats().aborted == 1
    finally:
        proxy.blackhole(False)
        proxy.reset_all()
        a.close()
        b.close()


@pytest.fixture(autouse=True)
def _no_pool_left(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    gc.collect()
