"""connguard behind a real PgBouncer: what docs/django.md ("Behind pgbouncer") says.

The docsite runs under gunicorn (2 processes, gthread) against a private PostgreSQL
with Debian's pgbouncer in between. What each side sees is read from each side:
PgBouncer's admin console (``SHOW CLIENTS``, ``SHOW SERVERS``) and PostgreSQL's
``pg_stat_activity``, not connguard's own counters.

* Transaction pooling: the report's burst, every request answered, connguard's
  ``max_size`` bounding the clients at PgBouncer's door and PgBouncer's
  ``default_pool_size`` the server side; the same statements run again and again on
  whatever server connection PgBouncer picks (no server-side prepared statement, as
  Django's defaults promise).
* ``client_idle_timeout`` (transaction pooling): PgBouncer closes connguard's idle
  connections; the next checkout finds each one dead with the cheap liveness test
  and opens a new one, so no request fails. (Housekeeping's idle sweep finds them
  too, racing the checkout; here it is kept from running, so the count is the
  checkout's.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connguard.testing.postgres import EmbeddedPostgres

from .pgbouncer import PgBouncer, running_pgbouncer
from .servers import SERVERS, burst, docsite_database, get, image_paths, running

pytestmark = [pytest.mark.real, pytest.mark.private, pytest.mark.servers]

MAX_SIZE = 3
SERVER_POOL = 2  # PgBouncer's default_pool_size: server connections per database/user
# A housekeeping interval no test outlives: only a checkout can find a dead connection.
HOUSEKEEPING_OFF = 3600


@pytest.fixture(scope="module")
def site_db() -> Iterator[tuple[EmbeddedPostgres, dict[str, Any]]]:
    with docsite_database(max_connections=40, migrate_as="docsite-migrate") as found:
        yield found


def docsite_clients(bouncer: PgBouncer) -> list[dict[str, Any]]:
    return [c for c in bouncer.show("CLIENTS") if c["database"] == "docsite"]


def site_env(app: str, **pool: Any) -> dict[str, str]:
    return {
        "DOCSITE_APP_NAME": app,
        "DOCSITE_POOL": json.dumps({"min_size": 0, "max_size": MAX_SIZE, **pool}),
    }


class ServerPeak:
    """Samples PostgreSQL's own count of the docsite's backends (PgBouncer's server
    connections) in a thread, every 20 ms; ``peak`` is the most seen at once."""

    def __init__(self, dsn: str) -> None:
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._conn = psycopg.connect(dsn, autocommit=True, application_name="peak-sampler")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            (count,) = self._conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'docsite'"
                " AND pid <> pg_backend_pid()"
            ).fetchone() or (0,)
            self.peak = max(self.peak, int(count))
            self.samples += 1
            self._stop.wait(0.02)

    def __enter__(self) -> ServerPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._conn.close()


def test_transaction_pooling_serves_the_burst_within_both_bounds(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path
) -> None:
    pg, db = site_db
    settings = {"pool_mode": "transaction", "default_pool_size": SERVER_POOL}
    with (
        running_pgbouncer(pg.host, pg.port, pg.user, **settings) as bouncer,
        running("gunicorn", bouncer.database(db), tmp_path, **site_env("pgb-tx")) as srv,
        ServerPeak(pg.dsn) as server_side,
    ):
        paths = image_paths(120) + ["/one"] * 80
        result = burst(srv.port, paths, concurrency=24)
        clients = docsite_clients(bouncer)
        servers = [s for s in bouncer.show("SERVERS") if s["database"] == "docsite"]
    assert result.failed == 0, f"{result.failures}\n{srv.log_text()[-3000:]}"
    assert "prepared statement" not in srv.log_text()
    # connguard's bound at PgBouncer's door: its idle connections stay open there.
    assert 1 <= len(clients) <= SERVERS["gunicorn"] * MAX_SIZE, clients
    # PgBouncer's bound on the server side, seen by PostgreSQL during the burst.
    assert server_side.samples > 0
    assert 1 <= server_side.peak <= SERVER_POOL, server_side.peak
    assert len(servers) <= SERVER_POOL


def test_connections_pgbouncer_cuts_for_idleness_are_replaced_unseen(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path
) -> None:
    pg, db = site_db
    # Only a client between transactions counts as idle: under session pooling a
    # client keeps its server connection and PgBouncer never cuts it for idleness.
    settings = {"pool_mode": "transaction", "client_idle_timeout": 1}
    with (
        running_pgbouncer(pg.host, pg.port, pg.user, **settings) as bouncer,
        running(
            "gunicorn",
            bouncer.database(db),
            tmp_path,
            **site_env("pgb-idle", housekeeping_interval=HOUSEKEEPING_OFF),
        ) as srv,
    ):
        first = burst(srv.port, ["/one"] * 40, concurrency=8)
        assert first.failed == 0, first.failures
        before = {c["port"] for c in docsite_clients(bouncer)}
        assert before, "connguard keeps its idle connections open at PgBouncer"
        # PgBouncer closes them once idle a second: wait until it has (a condition
        # polled against a deadline, not a guess at how long that takes).
        deadline = time.monotonic() + 15
        while docsite_clients(bouncer):
            assert time.monotonic() < deadline, docsite_clients(bouncer)
            time.sleep(0.1)
        assert "client_idle_timeout" in bouncer.log_text()
        again = burst(srv.port, ["/one"] * 40, concurrency=8)
        after = {c["port"] for c in docsite_clients(bouncer)}
        # Each worker process answers for its own pools: ask until both have answered.
        by_pid: dict[int, dict[str, Any]] = {}
        for _ in range(200):
            status, _, body = get(srv.port, "/connguard/stats")
            assert status == 200
            by_pid.update((pool["pid"], pool) for pool in json.loads(body))
            if len(by_pid) == SERVERS["gunicorn"]:
                break  # (a worker that served no request has no pool to report)
    assert again.failed == 0, f"{again.failures}\n{srv.log_text()[-3000:]}"
    assert after and not after & before, "new connections, not the ones PgBouncer closed"
    assert by_pid
    # Found at checkout, by the cheap liveness test: the housekeeping sweep, which
    # would otherwise race the burst to find them first, never ran.
    assert sum(pool["health_check_failures"] for pool in by_pid.values()) >= 1, by_pid
    assert all(pool["closed_broken"] == pool["health_check_failures"] for pool in by_pid.values())


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_socket_timeouts_per_connection_set_up_passes_pgbouncer(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, mode: str
) -> None:
    """With ``socket_timeout`` set, each connection gets
    ``client_connection_check_interval`` when opened and again after every reset
    (``reset="always"`` here): as SQL, never as a startup parameter, which PgBouncer
    refuses unless told to ignore it. Every request of a burst succeeds in both
    pooling modes."""
    pg, db = site_db
    with (
        running_pgbouncer(pg.host, pg.port, pg.user, pool_mode=mode) as bouncer,
        running(
            "gunicorn",
            bouncer.database(db),
            tmp_path,
            **site_env(f"pgb-check-{mode}", socket_timeout=30, reset="always"),
        ) as srv,
    ):
        result = burst(srv.port, ["/one"] * 60, concurrency=8)
        log = bouncer.log_text()
    assert result.failed == 0, f"{result.failures}\n{srv.log_text()[-3000:]}"
    assert "unsupported startup parameter" not in log, log[-2000:]


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_doctor_reads_the_pool_mode_from_pgbouncers_console(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], mode: str
) -> None:
    """``connguard doctor --pgbouncer``: the admin console answers only the simple
    query protocol; doctor reads its ``SHOW CONFIG`` through connguard's own driver."""
    pg, _ = site_db
    with running_pgbouncer(pg.host, pg.port, pg.user, pool_mode=mode) as bouncer:
        console = f"host={bouncer.host} port={bouncer.port} dbname=pgbouncer user={pg.user}"
        found = subprocess.run(
            [sys.executable, "-m", "connguard", "doctor", "--dsn", pg.dsn, "--pgbouncer", console],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert found.returncode == 0, found.stderr
    level = "warning" if mode == "session" else "info"
    assert f"[{level}] pgbouncer pool_mode={mode}, max_client_conn=100" in found.stdout
