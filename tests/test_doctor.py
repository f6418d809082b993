"""``connguard doctor``: the rules on snapshots, and every pattern created for real."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from connguard.diagnostics import doctor
from connguard.diagnostics.doctor import Backend, Snapshot, classify, collect, diagnose
from connguard.diagnostics.tags import make_tag, parse_tag
from connguard.drivers import load_driver
from connguard.pool import Pool, PoolConfig

from .fakes import wait_until


def backend(pid: int, app: str = "", state: str = "idle", idle: float = 4000.0, *,
            query: str | None = None, addr: str | None = "10.0.0.5") -> Backend:  # fmt: skip
    return Backend(
        pid=pid, user="web", database="app", application_name=app, client_addr=addr,
        state=state, state_seconds=idle, xact_seconds=idle if "transaction" in state else None,
        query=query if query is not None else f"SELECT * FROM page WHERE id = {pid}",
        tag=parse_tag(app),
    )  # fmt: skip


def snapshot(*backends: Backend, max_connections: int = 100, **kw: Any) -> Snapshot:
    settings = {"max_connections": str(max_connections), "superuser_reserved_connections": "3"}
    return Snapshot("18.0", settings, list(backends), can_see_all=True, **kw)


def codes(findings: list[doctor.Finding]) -> dict[str, doctor.Finding]:
    return {f.code: f for f in findings}


def test_untagged_idle_pileup_is_the_django_asgi_pattern() -> None:
    found = codes(diagnose(snapshot(*(backend(pid) for pid in range(100, 137)))))
    pileup = found["idle-pileup"]
    assert pileup.severity == "problem"
    assert pileup.message.startswith("37 backends idle for over 1.1 h from 10.0.0.5")
    assert "no connguard tag" in pileup.message and "CONN_MAX_AGE > 0" in pileup.message
    assert len(pileup.pids) == 37


def test_idle_in_transaction_names_pid_age_query_and_holder() -> None:
    tag = make_tag("shop", "default", host="web-2", pid=77)
    found = codes(diagnose(snapshot(
        backend(4711, app=tag, state="idle in transaction", idle=720,
                query="UPDATE stock SET n = n - 1 WHERE id = 5"),
    )))  # fmt: skip
    finding = found["idle-in-transaction"]
    assert finding.message.startswith("pid 4711 idle in transaction for 12 min")
    assert "UPDATE stock" in finding.message and "web-2 pid 77 alias default" in finding.message


def test_connguard_pool_idle_is_healthy() -> None:
    tags = [make_tag("shop", "default", host="web-1", pid=p) for p in (1, 2)]
    snap = snapshot(*(backend(i, app=tags[i % 2]) for i in range(6)))
    assert not doctor.has_problem(diagnose(snap))
    assert {classify(b, 300) for b in snap.backends} == {"idle in pool"}


def test_budget_over_max_connections() -> None:
    tags = [make_tag("shop", "default", host=h, pid=p)
            for h in ("web-1", "web-2", "web-3") for p in (10, 11, 12, 13)]  # fmt: skip
    snap = snapshot(*(backend(i, app=t) for i, t in enumerate(tags)))
    budget = codes(diagnose(snap, max_size={"default": 10}))["budget"]
    assert budget.severity == "problem"
    assert (
        "3 hosts x 4 processes x max_size 10 = 120 (shop/default): 120 > max_connections "
        "100 - 3 reserved = 97" in budget.message
    )
    fine = codes(diagnose(snap, max_size={"default": 5}))["budget"]
    assert fine.severity == "info"


def test_pgbouncer_seen_from_the_server_and_from_its_console() -> None:
    snap = snapshot(*(backend(i, app="pgbouncer", idle=5, addr="10.0.0.9") for i in range(8)),
                    pgbouncer={"pool_mode": "session", "max_client_conn": "100",
                               "default_pool_size": "20"})  # fmt: skip
    found = codes(diagnose(snap))
    assert "10.0.0.9 look like pgbouncer" in found["pgbouncer"].message
    mode = found["pgbouncer-mode"]
    assert mode.severity == "warning" and "pool_mode=session" in mode.message


def test_near_limit_and_limited_view() -> None:
    hidden = Backend(9, None, None, "", None, None, None, None, doctor.HIDDEN, None)
    snap = snapshot(*(backend(i, idle=1) for i in range(9)), hidden, max_connections=13)
    found = codes(diagnose(snap))
    assert "near-limit" in found and "limited-view" in found


# ---------------------------------------------------------------- real patterns


@pytest.mark.real
@pytest.mark.private
def test_doctor_classifies_real_patterns(private_pg: Any) -> None:
    dsn = private_pg.dsn
    held: list[Any] = []

    # Threads that die holding connections, each after a different query: the
    # leak Django's thread-local connections make under ASGI.
    def leak(i: int) -> None:
        conn = psycopg.connect(dsn, autocommit=True, application_name="legacy-django")
        conn.execute(f"SELECT {i} AS page_id")
        held.append(conn)

    threads = [threading.Thread(target=leak, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # A session idle in transaction.
    stuck = psycopg.connect(dsn, application_name="report-job")
    stuck.execute("SELECT count(*) FROM pg_class")
    held.append(stuck)
    # A connguard application: tagged, idle in its pool.
    pool = Pool(
        load_driver("psycopg", conninfo=dsn, application_name=make_tag("shop", "default")),
        PoolConfig(min_size=3, max_size=3),
        name="shop",
    )
    wait_until(lambda: pool.stats().idle == 3)
    try:
        with psycopg.connect(dsn, autocommit=True) as admin:
            wait_until(lambda: _min_idle(admin) >= 0.3)
            snap = collect(admin)
        findings = codes(diagnose(snap, idle_threshold=0.3, idle_in_transaction_threshold=0.3,
                                  max_size={"default": 3}))  # fmt: skip
        by_app = {b.application_name: classify(b, 0.3) for b in snap.backends}
        assert by_app["legacy-django"] == "likely leak"
        assert by_app["report-job"] == "idle in transaction"
        assert {classify(b, 0.3) for b in snap.backends if b.tag} == {"idle in pool"}
        pileup = findings["idle-pileup"]
        assert pileup.message.startswith("5 backends idle for over")
        assert "'legacy-django'" in pileup.message and "each with a different last query" in (
            pileup.message
        )
        stuck_pid = stuck.info.backend_pid
        assert findings["idle-in-transaction"].pids == [stuck_pid]
        assert findings["budget"].severity == "info"
        assert "limited-view" not in findings
        text, code = doctor.run(admin_conn := psycopg.connect(dsn, autocommit=True),
                                idle_threshold=0.3)  # fmt: skip
        admin_conn.close()
        assert code == 1 and "likely leak" in text and "idle in pool" in text
    finally:
        pool.close()
        for conn in held:
            conn.close()


def _min_idle(admin: Any) -> float:
    row = admin.execute(
        "SELECT min(extract(epoch FROM now() - state_change)) FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
    ).fetchone()
    return float(row[0] or 0)


@pytest.mark.real
@pytest.mark.private
def test_without_pg_monitor_doctor_says_what_it_cannot_see(private_pg: Any) -> None:
    private_pg.psql("CREATE ROLE watcher LOGIN; CREATE ROLE monitor LOGIN; "
                    "GRANT pg_monitor TO monitor")  # fmt: skip
    other = psycopg.connect(private_pg.dsn, autocommit=True, application_name="someone")
    other.execute("SELECT 1")
    try:
        for role, limited in (("watcher", True), ("monitor", False)):
            dsn = private_pg.dsn.replace("user=postgres", f"user={role}")
            with psycopg.connect(dsn, autocommit=True) as conn:
                text, _ = doctor.run(conn, as_json_output=True)
            data = json.loads(text)
            assert ("limited-view" in {f["code"] for f in data["findings"]}) is limited, role
            (someone,) = [b for b in data["backends"] if b["application_name"] == "someone"]
            assert (someone["query"] == doctor.HIDDEN) is limited, (role, someone)
    finally:
        other.close()


# ---------------------------------------------------------------- the command line


def run_cli(*args: str) -> tuple[int, str, str]:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "connguard", "doctor", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return result.returncode, result.stdout, result.stderr


@pytest.mark.real
@pytest.mark.private
def test_cli_doctor_exit_status_follows_the_findings(private_pg: Any) -> None:
    code, out, err = run_cli("--dsn", private_pg.dsn)
    assert code == 0, err
    assert "No problems found." in out and "max_connections 50" in out
    held = [psycopg.connect(private_pg.dsn, autocommit=True, application_name="legacy")
            for _ in range(3)]  # fmt: skip
    try:
        for i, conn in enumerate(held):
            conn.execute(f"SELECT {i}")
        code, out, err = run_cli("--dsn", private_pg.dsn, "--idle-threshold", "0", "--json")
        assert code == 1, (out, err)
        data = json.loads(out)
        assert data["problem"] and "idle-pileup" in {f["code"] for f in data["findings"]}
    finally:
        for conn in held:
            conn.close()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it) but
    not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def test_cli_doctor_unreachable_server_is_one_masked_line(refused_port: int) -> None:
    """The demo's wording (test_cli.py checks the two agree): where, and libpq's
    reason without its preamble; no password, no traceback, exit status 2."""
    for dsn in (f"host=127.0.0.1 port={refused_port} user=x password=hunter2",
                f"postgresql://x:hunter2@127.0.0.1:{refused_port}/db"):  # fmt: skip
        code, out, err = run_cli("--dsn", dsn)
        assert (code, out) == (2, "")
        assert err == (
            f"connguard: error: cannot connect to PostgreSQL at 127.0.0.1:{refused_port}: "
            "Connection refused\n"
        )


@pytest.mark.real
def test_cli_doctor_unreachable_pgbouncer_is_one_line(pg: Any, refused_port: int) -> None:
    bouncer = f"host=127.0.0.1 port={refused_port} password=pw"
    code, out, err = run_cli("--dsn", pg.dsn, "--pgbouncer", bouncer)
    assert (code, out) == (2, "")
    assert err == (
        f"connguard: error: cannot connect to pgbouncer at 127.0.0.1:{refused_port}: "
        "Connection refused\n"
    )


def test_cli_doctor_bad_options_are_one_line() -> None:
    code, out, err = run_cli("--dsn", "hots=db password=hunter2")
    assert (code, out) == (2, "")
    assert err == 'connguard: error: invalid --dsn: invalid connection option "hots"\n'
    code, out, err = run_cli("--dsn", "host=db", "--pgbouncer", "nonsense")
    assert (code, out) == (2, "")
    assert err.startswith("connguard: error: invalid --pgbouncer: ") and err.count("\n") == 1
    code, _, err = run_cli("--dsn", "x", "--max-size", "default=zero")
    assert code == 2 and "ALIAS=N" in err


class _LibpqError(Exception):
    pass


@pytest.mark.parametrize(
    ("conninfo", "error", "message"),
    [
        # libpq says where it tried: that wins over the conninfo.
        ("host=db port=6432",
         'connection failed: connection to server at "10.0.0.2", port 6432 failed: '
         "Connection refused\n\tIs the server running on that host and accepting TCP/IP "
         "connections?",
         "cannot connect to PostgreSQL at 10.0.0.2:6432: Connection refused"),
        ("host=db",
         'connection to server at "db" (10.0.0.2), port 5432 failed: FATAL:  password '
         'authentication failed for user "app"',
         'cannot connect to PostgreSQL at db:5432: FATAL: password authentication failed '
         'for user "app"'),
        ("user=app",
         'connection is bad: connection to server on socket "/run/postgresql/.s.PGSQL.5433" '
         "failed: No such file or directory",
         "cannot connect to PostgreSQL at /run/postgresql:5433: No such file or directory"),
        ("host=::1 port=5",
         'connection failed: connection to server at "::1", port 5 failed: Connection refused',
         "cannot connect to PostgreSQL at [::1]:5: Connection refused"),
        # libpq does not say: the conninfo does, never with its password.
        ("postgresql://app:hunter2@db.example:6543/x",
         "failed to resolve host 'db.example': [Errno -2] Name or service not known",
         "cannot connect to PostgreSQL at db.example:6543: failed to resolve host "
         "'db.example': [Errno -2] Name or service not known"),
        ("host=db password=hunter2", "connection failed: connection timeout expired",
         "cannot connect to PostgreSQL at db:5432: connection timeout expired"),
        ("not a conninfo", "missing \"=\" after \"not\" in connection info string",
         'cannot connect to PostgreSQL: missing "=" after "not" in connection info string'),
        ("host=db", "", "cannot connect to PostgreSQL at db:5432: _LibpqError"),
    ],
)  # fmt: skip
def test_cannot_connect_wording(
    monkeypatch: pytest.MonkeyPatch, conninfo: str, error: str, message: str
) -> None:
    monkeypatch.delenv("PGHOST", raising=False)
    monkeypatch.delenv("PGPORT", raising=False)
    text = doctor.cannot_connect("PostgreSQL", conninfo, _LibpqError(error))
    assert text == message
    assert "hunter2" not in text


@pytest.mark.parametrize("module", ["psycopg", "psycopg2"])
def test_cannot_connect_wording_from_either_driver(refused_port: int, module: str) -> None:
    """Both drivers' real errors, read the same way."""
    driver = pytest.importorskip(module)
    dsn = f"host=127.0.0.1 port={refused_port} user=x password=hunter2 dbname=x"
    with pytest.raises(driver.OperationalError) as caught:
        driver.connect(dsn, connect_timeout=5)
    assert doctor.cannot_connect("PostgreSQL", dsn, caught.value) == (
        f"cannot connect to PostgreSQL at 127.0.0.1:{refused_port}: Connection refused"
    )
