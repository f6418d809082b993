"""The user report, replayed against real servers: it cannot happen with connguard.

A PostgreSQL with ``max_connections=30``; the docsite (a permission query per ~50 KB
page image) under runserver, runserver with daphne, gunicorn gthread, uvicorn and
daphne; the report's settings (``CONN_MAX_AGE`` 15, 0 and None with
``CONN_HEALTH_CHECKS``). 300 image requests at concurrency 40: none fails, the
server never sees more than ``max_size`` backends per process, and shortly after the
burst only ``min_size`` per process remain. Stock Django under uvicorn, same burst,
shows the leak.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connguard.diagnostics.doctor import collect, diagnose
from connguard.diagnostics.tags import parse_tag
from connguard.testing.postgres import EmbeddedPostgres

from .servers import (
    SERVERS,
    BackendSampler,
    burst,
    docsite_database,
    get,
    image_paths,
    running,
    running_command,
)

pytestmark = [pytest.mark.real, pytest.mark.private, pytest.mark.servers]

POOL = {"min_size": 1, "max_size": 5, "max_idle": 1.0, "housekeeping_interval": 0.25}
QUIET = POOL["max_idle"] + POOL["housekeeping_interval"] + 1.0  # + scheduling slack


@pytest.fixture(scope="module")
def site_db() -> Iterator[tuple[EmbeddedPostgres, dict[str, Any]]]:
    with docsite_database(30, "docsite-migrate") as site:
        yield site


def assert_no_request_holds_a_lease(port: int) -> None:
    """Every lease taken for a request has come back. (Code outside requests may
    hold one: daphne's runserver keeps the connection of its start-up migration
    check in the main thread.)"""
    status, _, body = get(port, "/connguard/stats")
    assert status == 200
    for stats in json.loads(body):
        held = [lease for lease in stats["leases"] if lease["owner"] != "thread"]
        assert not held, held
        assert stats["in_use"] <= 1


def site_settings(app: str, **extra: Any) -> dict[str, str]:
    env = {
        "DOCSITE_APP_NAME": app,
        "DOCSITE_HEALTH_CHECKS": "1",
        "DOCSITE_POOL": json.dumps(extra.pop("pool", POOL)),
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.mark.parametrize("max_age", ["15", "0", "None"])
@pytest.mark.parametrize("server", list(SERVERS))
def test_report_burst_is_bounded_and_returns(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], server: str, max_age: str, tmp_path: Path
) -> None:
    pg, db = site_db
    app = f"docsite-{server}-{max_age}"
    env = site_settings(app, DOCSITE_CONN_MAX_AGE=max_age)
    sampler = BackendSampler(pg.dsn, app)
    try:
        with running(server, db, tmp_path, **env) as srv, sampler:
            result = burst(srv.port, image_paths(300), concurrency=40)
            assert result.failed == 0, (
                result.errors[:3], Counter(result.statuses), srv.log_text()[-2000:]
            )  # fmt: skip
            budget = POOL["max_size"] * srv.processes
            assert 1 <= sampler.peak <= budget, f"peak {sampler.peak} > budget {budget}"
            floor = POOL["min_size"] * srv.processes
            backends, idle_in_tx = sampler.wait_for(lambda n: n <= floor, QUIET)
            assert backends <= floor, f"{backends} backends stayed after the burst"
            assert idle_in_tx == 0
            assert_no_request_holds_a_lease(srv.port)
    finally:
        sampler.close()


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
def test_report_burst_with_psycopg2(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], server: str, tmp_path: Path
) -> None:
    pg, db = site_db
    app = f"docsite-pg2-{server}"
    env = site_settings(app, DOCSITE_CONN_MAX_AGE="15", DOCSITE_DRIVER="psycopg2")
    sampler = BackendSampler(pg.dsn, app)
    try:
        with running(server, db, tmp_path, **env) as srv, sampler:
            result = burst(srv.port, image_paths(300), concurrency=40)
            assert result.failed == 0, (result.errors[:3], Counter(result.statuses))
            assert sampler.peak <= POOL["max_size"] * srv.processes
            floor = POOL["min_size"] * srv.processes
            backends, _ = sampler.wait_for(lambda n: n <= floor, QUIET)
            assert backends <= floor
            # Each worker process answers for its own pools, and one that served no
            # request of the burst has none: ask until a worker with pools answers.
            drivers: set[str] = set()
            for _ in range(40):
                _, _, body = get(srv.port, "/connguard/stats")
                drivers |= {stats["driver"] for stats in json.loads(body)}
                if drivers:
                    break
            assert drivers == {"psycopg2"}
    finally:
        sampler.close()


@pytest.mark.parametrize("prefix", ["/async", "/aorm"])
def test_async_views(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, prefix: str
) -> None:
    """``/async``: the ORM through ``sync_to_async(thread_sensitive=False)``, in pooled
    threads that never die; ``/aorm``: Django's async ORM (``aexists()``). Their
    leases still come back when the request ends."""
    pg, db = site_db
    app = f"docsite{prefix.replace('/', '-')}"
    sampler = BackendSampler(pg.dsn, app)
    try:
        with running("uvicorn", db, tmp_path, **site_settings(app)) as srv, sampler:
            result = burst(srv.port, image_paths(300, prefix=prefix), concurrency=40)
            assert result.failed == 0, (result.errors[:3], Counter(result.statuses))
            assert sampler.peak <= POOL["max_size"]
            backends, _ = sampler.wait_for(lambda n: n <= POOL["min_size"], QUIET)
            assert backends <= POOL["min_size"]
    finally:
        sampler.close()


def test_streaming_response_queries_after_early_release(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path
) -> None:
    _, db = site_db
    with running("uvicorn", db, tmp_path, **site_settings("docsite-stream")) as srv:
        for _ in range(5):
            status, _, body = get(srv.port, "/stream/doc/1")
            assert status == 200
            assert body.splitlines() == [b"page 1 allowed=1", b"page 2 allowed=1",
                                         b"page 3 allowed=1"]  # fmt: skip
        assert_no_request_holds_a_lease(srv.port)


def test_stock_django_under_uvicorn_reproduces_the_leak(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path
) -> None:
    """The report itself: without connguard the backends pile up and stay."""
    pg, db = site_db
    app = "docsite-stock"
    env = site_settings(
        app, DOCSITE_ENGINE="stock", DOCSITE_CONN_MAX_AGE="15", DOCSITE_MIDDLEWARE="none"
    )
    sampler = BackendSampler(pg.dsn, app)
    # Opened first: the leak fills every slot (this site connects as a superuser, so
    # even the reserved ones); a real app's role would leave those for the doctor.
    admin = psycopg.connect(pg.dsn, autocommit=True)
    try:
        with running("uvicorn", db, tmp_path, **env) as srv, sampler:
            result = burst(srv.port, image_paths(300), concurrency=40)
            # Same quiet period connguard gets; the stock backends must not go away.
            backends, _ = sampler.wait_for(lambda n: n <= POOL["max_size"], QUIET)
            leaked = backends > POOL["max_size"]
            exhausted = result.failed > 0
            assert leaked or exhausted, (backends, sampler.peak, Counter(result.statuses))
            assert sampler.peak > POOL["max_size"], "stock Django stayed bounded?"
            # connguard doctor names the pattern from the server's side.
            findings = diagnose(collect(admin), idle_threshold=0.5)
            pileup = [f for f in findings if f.code == "idle-pileup"]
            assert pileup and "Django under ASGI" in pileup[0].message, findings
    finally:
        admin.close()
        sampler.close()


def test_overload_is_a_fast_503_and_the_next_burst_succeeds(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path
) -> None:
    pg, db = site_db
    app = "docsite-overload"
    pool = {**POOL, "max_size": 3, "timeout": 0.3}
    sampler = BackendSampler(pg.dsn, app)
    try:
        with running("uvicorn", db, tmp_path, **site_settings(app, pool=pool)) as srv, sampler:
            flood = burst(srv.port, ["/slow?ms=300"] * 60, concurrency=30)  # 10x capacity
            counts = Counter(flood.statuses)
            assert not flood.errors and set(counts) <= {200, 503}, (counts, flood.errors[:3])
            assert counts[503] > 0 and counts[200] > 0, counts
            assert flood.retry_after and set(flood.retry_after) == {"2"}
            assert sampler.peak <= pool["max_size"]
            assert max(flood.latencies) < 5.0, "an overloaded request hung"
            after = burst(srv.port, image_paths(60), concurrency=3)
            assert after.failed == 0, Counter(after.statuses)
    finally:
        sampler.close()


def backends_by_pid(dsn: str, app: str) -> Counter[int]:
    """The site's backends, counted by the pid of the process holding each (from its
    ``application_name`` tag)."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT application_name FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND application_name LIKE %s",
            (f"{app}|cg|%",),
        ).fetchall()
    return Counter(tag.pid for (name,) in rows if (tag := parse_tag(name)) is not None)


def wait_for_backends(dsn: str, app: str, done: Any, timeout: float) -> Counter[int]:
    """Poll the site's backends by pid until ``done(counts)`` or ``timeout``; the last count."""
    deadline = time.monotonic() + timeout
    while True:
        counts = backends_by_pid(dsn, app)
        if done(counts) or time.monotonic() >= deadline:
            return counts
        threading.Event().wait(0.05)


PRELOAD_WORKERS = 2


@pytest.mark.parametrize("give_back", ["close-at-import", "when-ready"])
def test_gunicorn_preload_master_keeps_no_backend(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, give_back: str
) -> None:
    """``gunicorn --preload`` with a query at import time, in the master, which then
    forks the workers and never serves a request. ``close-at-import``: the site gives
    the connection back (``connection.close()``); the master's pool, forked since,
    keeps no connection warm, so its backend goes after ``max_idle`` though
    ``min_size`` is 1. ``when-ready``: the site keeps it, and the gunicorn hook closes
    the master's pools before the fork (docs/django.md), whatever ``max_idle``. Either
    way the server sees the workers' backends only: workers x ``max_size``."""
    pg, db = site_db
    app = f"docsite-preload-{give_back}"
    pool = POOL if give_back == "close-at-import" else {**POOL, "max_idle": 600.0}
    args = [
        "gunicorn", "tests.wsgi_import_query:application", "--preload", "-k", "gthread",
        "--threads", "4", "-w", str(PRELOAD_WORKERS), "-b", "127.0.0.1:{port}",
        "--log-level", "warning",
    ]  # fmt: skip
    env = site_settings(app, pool=pool, DOCSITE_IMPORT_QUERY="close")
    if give_back == "when-ready":
        args += ["-c", "python:tests.gunicorn_close_pools"]
        env["DOCSITE_IMPORT_QUERY"] = "keep"
    with running_command("gunicorn", args, PRELOAD_WORKERS, db, tmp_path, **env) as srv:
        master = srv.process.pid
        result = burst(srv.port, image_paths(40), concurrency=8)
        assert result.failed == 0, (result.errors[:3], Counter(result.statuses))
        counts = wait_for_backends(pg.dsn, app, lambda c: master not in c, QUIET)
        assert master not in counts, (
            f"the gunicorn master {master}, which serves no request, still holds "
            f"{counts[master]} backend(s) {QUIET} s after the burst (max_idle "
            f"{pool['max_idle']} s); backends by pid: {dict(counts)}"
        )
        workers = sum(counts.values())
        assert 1 <= workers <= PRELOAD_WORKERS * POOL["max_size"], dict(counts)
