"""Leak detection, reclaim and the dropped-lease backstop: fake driver for the logic,
a real PostgreSQL for "never reclaim a connection that is executing"."""

from __future__ import annotations

import gc
import logging
import threading
import uuid
from typing import Any

import pytest

from connguard.drivers import load_driver
from connguard.pool import Pool, PoolConfig, TxStatus
from connguard.scope import Scope

from .fakes import FakeConnection, FakeDriver, ManualClock, wait_until


def make_pool(driver: Any, clock: Any = None, **settings: Any) -> Pool:
    settings.setdefault("min_size", 0)
    kwargs: dict[str, Any] = {"name": "leaky", "housekeeping": False}
    if clock is not None:
        kwargs["clock"] = clock
    return Pool(driver, PoolConfig(**settings), **kwargs)


def acquire_here(pool: Pool, **kwargs: Any) -> Any:
    return pool.acquire(**kwargs)  # the line the lease must point at


def test_lease_records_where_it_was_acquired() -> None:
    pool = make_pool(FakeDriver(), stack_depth=3)
    lease = acquire_here(pool)
    where = lease.where()
    assert len(where) == 3
    assert where[0].startswith(__file__) and "in acquire_here" in where[0]
    assert "in test_lease_records_where_it_was_acquired" in where[1]
    lease.release()
    off = make_pool(FakeDriver(), stack_depth=0)
    assert off.acquire().where() == []
    pool.close()
    off.close()


def test_leak_warning_fires_once_names_request_and_site(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    pool = make_pool(FakeDriver(), clock, leak_threshold=30.0)
    info = {"method": "GET", "path": "/doc/3/page/7.png", "view": "pages.image"}
    request = Scope("GET /doc/3/page/7.png", kind="request", info=info)
    caplog.set_level(logging.WARNING, logger="connguard.pool")
    lease = acquire_here(pool, owner=request)
    clock.advance(31)
    for _ in range(3):
        pool.housekeep()
    leak = [r.getMessage() for r in caplog.records if "held for" in r.getMessage()]
    assert len(leak) == 1, leak
    assert "path=/doc/3/page/7.png" in leak[0] and "view=pages.image" in leak[0]
    assert f"{__file__}:" in leak[0] and "acquire_here" in leak[0]
    assert "thread MainThread" in leak[0]
    clock.advance(4)
    lease.release()
    assert any("returned after 35.0 s" in r.getMessage() for r in caplog.records)
    assert pool.stats().leaks == 1
    pool.close()


def test_dropped_lease_is_taken_back_with_its_site(caplog: pytest.LogCaptureFixture) -> None:
    driver = FakeDriver()
    pool = make_pool(driver, max_size=1)
    caplog.set_level(logging.WARNING, logger="connguard.pool")
    lease = acquire_here(pool)
    conn = lease.raw  # the raw connection does not keep the lease alive
    conn.status = TxStatus.INTRANS
    kept = acquire_here  # noqa: F841 - unrelated references do not matter
    del lease
    gc.collect()
    pool.housekeep()  # hands its rollback to the resetter
    wait_until(lambda: pool.stats().idle == 1)
    stats = pool.stats()
    assert stats.dropped == 1 and stats.in_use == 0
    assert conn.status is TxStatus.IDLE, "rolled back before reuse"
    message = next(r.getMessage() for r in caplog.records if "dropped" in r.getMessage())
    assert "acquire_here" in message
    pool.close()


def test_a_scope_does_not_keep_a_dropped_lease_alive() -> None:
    """A scope holds its leases weakly: a lease its holder dropped while the scope
    is still open is taken back by the backstop, not kept until the scope ends."""
    driver = FakeDriver()
    pool = make_pool(driver, max_size=1)
    scope = Scope("job")
    lease = pool.acquire(owner=scope)
    scope.add(lease)
    del lease
    gc.collect()
    pool.housekeep()
    stats = pool.stats()
    assert stats.dropped == 1 and stats.in_use == 0
    assert scope.leases() == [] and scope.release_all() == 0
    pool.close()


def test_a_scope_that_acquires_again_and_again_keeps_only_what_it_holds() -> None:
    """A long scope (a thread's, a task's, a request under transaction-level
    release) forgets the leases given back once it lists eight: it stays about as
    large as what it holds, however many leases passed through it, and ending it
    still gives back exactly the leases still out."""
    pool = make_pool(FakeDriver(), max_size=12)
    scope = Scope("job")
    kept = pool.acquire(owner=scope)
    scope.add(kept)
    for _ in range(100):  # acquire, release
        lease = pool.acquire(owner=scope)
        scope.add(lease)
        lease.release()
    assert len(scope._held) <= 8
    held, given_back = [], []  # the holders keep those they gave back
    for _ in range(100):  # released out of order: the oldest first
        lease = pool.acquire(owner=scope)
        scope.add(lease)
        held.append(lease)
        if len(held) > 3:
            given_back.append(held.pop(0))
            given_back[-1].release()
    assert len(scope._held) <= 8 + 3
    assert {id(lease) for lease in scope.leases()} == {id(kept), *map(id, held)}
    assert scope.end() == 4
    assert pool.stats().in_use == 0
    pool.close()


def test_held_lease_is_never_taken_back() -> None:
    pool = make_pool(FakeDriver(), reclaim=True)
    lease = pool.acquire()
    holder = {"lease": lease}
    del lease
    for _ in range(3):
        pool.housekeep()
    assert holder["lease"].active and pool.stats().dropped == 0
    assert pool.stats().reclaims == 0, "its thread (this one) is alive, no scope ended"
    holder["lease"].release()
    pool.close()


def test_reclaim_takes_back_a_dead_threads_lease_only_when_enabled() -> None:
    for reclaim in (False, True):
        pool = make_pool(FakeDriver(), reclaim=reclaim)
        box: list[Any] = []
        t = threading.Thread(target=lambda pool=pool, box=box: box.append(pool.acquire()))
        t.start()
        t.join()  # the thread is dead; the lease is still referenced by `box`
        pool.housekeep()
        assert box[0].active is (not reclaim)
        assert pool.stats().reclaims == int(reclaim)
        box[0].release()
        pool.close()


def test_reclaim_takes_back_a_lease_whose_scope_ended() -> None:
    pool = make_pool(FakeDriver(), reclaim=True)
    job = Scope("job")
    lease = pool.acquire(owner=job)
    job.ended = True  # ended without releasing (e.g. a scope owned elsewhere)
    pool.housekeep()
    assert not lease.active and pool.stats().reclaims == 1
    pool.close()


def test_reclaim_skips_a_connection_executing_a_statement() -> None:
    pool = make_pool(FakeDriver(), reclaim=True)
    job = Scope("job")
    lease = pool.acquire(owner=job)
    conn = lease.raw
    assert isinstance(conn, FakeConnection)
    conn.status = TxStatus.ACTIVE
    job.ended = True
    pool.housekeep()
    assert lease.active, "never take back a connection that is executing"
    conn.status = TxStatus.IDLE
    pool.housekeep()
    assert not lease.active
    pool.close()


@pytest.mark.real
@pytest.mark.parametrize("driver_name", ["psycopg", "psycopg2"])
def test_reclaim_never_interrupts_a_running_pg_sleep(pg: Any, driver_name: str) -> None:
    app = f"cg-reclaim-{uuid.uuid4().hex[:8]}"
    pool = Pool(
        load_driver(driver_name, conninfo=pg.dsn, application_name=app),
        PoolConfig(min_size=0, max_size=2, reclaim=True),
        name=app,
        housekeeping=False,
    )
    job = Scope("report")
    started = threading.Event()
    result: list[Any] = []

    def long_query() -> None:
        lease = pool.acquire(owner=job)
        cur = lease.connection.cursor()
        started.set()
        cur.execute("SELECT pg_sleep(0.6), 42")
        result.append(42)  # the statement ran to completion
        lease.release()

    t = threading.Thread(target=long_query)
    t.start()
    started.wait(5)
    job.ended = True  # its owner is gone while the statement runs
    wait_until(lambda: pool.leases() and pool.driver.transaction_status(
        pool.leases()[0].peek()) is TxStatus.ACTIVE)  # fmt: skip
    for _ in range(5):
        pool.housekeep()
    t.join()
    assert result == [42], "the statement ran to completion"
    pool.close()
