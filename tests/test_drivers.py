"""The psycopg 3 and psycopg2 drivers, against a real PostgreSQL.

Every test runs once per driver: the two libraries differ exactly where these tests
look (who tracks the transaction state, what ``close()`` sends, what ``DISCARD ALL``
does to a client-side cache), and the pool engine must not be able to tell them apart.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from connguard.drivers import DRIVER_NAMES, load_driver
from connguard.pool.driver import Driver, TxStatus

from .proxy import FaultProxy

DRIVERS = list(DRIVER_NAMES)
APP_NAME = "connguard-test-drivers"
real = pytest.mark.real


# -- helpers ---------------------------------------------------------------------------


def query(conn: Any, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run ``sql`` through the connection's own DB-API cursor (either driver)."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return list(cur.fetchall()) if cur.description is not None else []


def scalar(conn: Any, sql: str, params: Any = None) -> Any:
    return query(conn, sql, params)[0][0]


def backend_pid(conn: Any) -> int:
    pid: int = conn.info.backend_pid
    return pid


def terminate(admin: psycopg.Connection[Any], conn: Any) -> None:
    """End ``conn``'s session from another connection and wait until its socket shows it.

    No fixed sleep: select() returns as soon as the server's error/EOF arrives.
    """
    row = admin.execute("SELECT pg_terminate_backend(%s)", [backend_pid(conn)]).fetchone()
    assert row == (True,)
    readable, _, _ = select.select([conn.fileno()], [], [], 2.0)
    assert readable, "the server did not hang up within 2 s"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dsn_with_port(dsn: str, port: int) -> str:
    params = conninfo_to_dict(dsn)
    params.update(host="127.0.0.1", port=str(port))
    return " ".join(f"{k}='{v}'" for k, v in params.items())


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(params=DRIVERS)
def driver_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(params=[True, False], ids=["autocommit", "transactional"])
def autocommit(request: pytest.FixtureRequest) -> bool:
    value: bool = request.param
    return value


@pytest.fixture
def driver(pg: Any, driver_name: str) -> Driver:
    return load_driver(driver_name, conninfo=pg.dsn, application_name=APP_NAME)


@pytest.fixture
def conn(driver: Driver) -> Iterator[Any]:
    c = driver.connect(5)
    try:
        yield c
    finally:
        driver.close(c)


@pytest.fixture
def tx_driver(pg: Any, driver_name: str, autocommit: bool) -> Driver:
    """The driver in both baselines: autocommit on (the pool default) and off."""
    return load_driver(
        driver_name, conninfo=pg.dsn, autocommit=autocommit, application_name=APP_NAME
    )


@pytest.fixture
def tx_conn(tx_driver: Driver) -> Iterator[Any]:
    c = tx_driver.connect(5)
    try:
        yield c
    finally:
        tx_driver.close(c)


@pytest.fixture
def admin(pg: Any) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.Connection.connect(pg.dsn, autocommit=True) as c:
        yield c


@pytest.fixture
def pg_proxy(pg: Any) -> Iterator[FaultProxy]:
    params = conninfo_to_dict(pg.dsn)
    p = FaultProxy(str(params.get("host", "127.0.0.1")), int(str(params.get("port", 5432))))
    p.start()
    try:
        yield p
    finally:
        p.close()


# -- load_driver -----------------------------------------------------------------------


@pytest.mark.parametrize("name", DRIVERS)
def test_load_driver_by_name(name: str) -> None:
    d = load_driver(name, conninfo="host=nowhere", autocommit=False, application_name="x")
    assert isinstance(d, Driver)
    assert d.name == name
    expected = psycopg.OperationalError if name == "psycopg" else _psycopg2().OperationalError
    assert d.operational_error is expected


def test_load_driver_prefers_psycopg3() -> None:
    assert load_driver().name == "psycopg"


def _hide_module(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """Make ``import module`` fail, and forget our driver module built on it."""
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delitem(sys.modules, f"connguard.drivers.{module}", raising=False)


def test_load_driver_falls_back_to_psycopg2(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_module(monkeypatch, "psycopg")
    assert load_driver().name == "psycopg2"
    with pytest.raises(ImportError, match=r"django-connguard\[psycopg\]"):
        load_driver("psycopg")


def test_load_driver_without_any_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_module(monkeypatch, "psycopg")
    _hide_module(monkeypatch, "psycopg2")
    with pytest.raises(ImportError) as info:
        load_driver()
    assert "django-connguard[psycopg]" in str(info.value)
    assert "django-connguard[psycopg2]" in str(info.value)


def test_load_driver_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"'psycopg', 'psycopg2'") as info:
        load_driver("mysqlclient")
    assert "mysqlclient" in str(info.value)


def test_drivers_package_imports_no_driver() -> None:
    """Importing connguard.drivers must work (and stay cheap) with neither installed."""
    code = (
        "import sys, connguard.drivers\n"
        "bad = {'psycopg', 'psycopg2'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_connect_kwargs_are_copied() -> None:
    kwargs = {"options": "-c statement_timeout=4321"}
    d = load_driver("psycopg", connect_kwargs=kwargs)
    kwargs["options"] = "changed"
    assert d.connect_kwargs == {"options": "-c statement_timeout=4321"}  # type: ignore[attr-defined]


def _psycopg2() -> Any:
    import psycopg2

    return psycopg2


# -- connecting ------------------------------------------------------------------------


@real
def test_connect_ping_close(tx_driver: Driver, autocommit: bool) -> None:
    conn = tx_driver.connect(5)
    try:
        assert conn.autocommit is autocommit
        assert tx_driver.transaction_status(conn) is TxStatus.IDLE
        assert tx_driver.is_alive(conn)
        tx_driver.ping(conn, 5)
        assert tx_driver.transaction_status(conn) is TxStatus.IDLE
        assert scalar(conn, "SELECT 1") == 1
    finally:
        tx_driver.close(conn)
    assert tx_driver.transaction_status(conn) is TxStatus.UNKNOWN
    assert not tx_driver.is_alive(conn)
    with pytest.raises(tx_driver.operational_error):
        tx_driver.ping(conn, 1)
    with pytest.raises(tx_driver.operational_error):
        tx_driver.reset(conn)
    tx_driver.close(conn)  # idempotent, never raises
    tx_driver.drop(conn)


@real
def test_connect_applies_application_name_and_kwargs(pg: Any, driver_name: str) -> None:
    kwargs = {"options": "-c statement_timeout=4321"}
    d = load_driver(driver_name, conninfo=pg.dsn, connect_kwargs=kwargs, application_name="cg-x")
    conn = d.connect(5)
    try:
        assert scalar(conn, "SHOW application_name") == "cg-x"
        assert scalar(conn, "SHOW statement_timeout") == "4321ms"
    finally:
        d.close(conn)
    assert kwargs == {"options": "-c statement_timeout=4321"}, "connect() mutated the kwargs"


@real
def test_connect_refused_fails_fast(pg: Any, driver_name: str) -> None:
    d = load_driver(driver_name, conninfo=dsn_with_port(pg.dsn, free_port()))
    start = time.monotonic()
    with pytest.raises(d.operational_error):
        d.connect(5)
    assert time.monotonic() - start < 2


@real
def test_connect_times_out_on_a_silent_server(pg: Any, driver_name: str) -> None:
    """A listener that never answers: libpq's connect_timeout must fire (2 s minimum)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel completes the handshake; nobody ever replies
        d = load_driver(driver_name, conninfo=dsn_with_port(pg.dsn, listener.getsockname()[1]))
        start = time.monotonic()
        with pytest.raises(d.operational_error):
            d.connect(1)
        elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 5  # libpq gives up right at 1 s (measured 0.9997 s)


# -- transaction status ----------------------------------------------------------------


@real
def test_transaction_status_in_every_state(
    tx_driver: Driver, tx_conn: Any, autocommit: bool, admin: psycopg.Connection[Any]
) -> None:
    d, conn = tx_driver, tx_conn
    assert d.transaction_status(conn) is TxStatus.IDLE
    if autocommit:
        query(conn, "SELECT 1")
        assert d.transaction_status(conn) is TxStatus.IDLE
        query(conn, "BEGIN")
    else:
        query(conn, "SELECT 1")  # the driver opens the transaction itself
    assert d.transaction_status(conn) is TxStatus.INTRANS
    with pytest.raises(Exception, match="division by zero"):
        query(conn, "SELECT 1/0")
    assert d.transaction_status(conn) is TxStatus.INERROR
    d.rollback(conn)
    assert d.transaction_status(conn) is TxStatus.IDLE

    terminate(admin, conn)
    # No I/O in transaction_status: libpq has not read the hang-up yet...
    assert d.transaction_status(conn) is TxStatus.IDLE
    with pytest.raises(d.operational_error):
        query(conn, "SELECT 1")
    # ...and once a query has failed on it, the connection is known to be bad.
    assert d.transaction_status(conn) is TxStatus.UNKNOWN


# -- liveness --------------------------------------------------------------------------


@real
def test_is_alive_and_ping_after_the_backend_is_terminated(
    driver: Driver, admin: psycopg.Connection[Any]
) -> None:
    conn = driver.connect(5)
    try:
        query(conn, "SELECT 1")
        assert driver.is_alive(conn)
        terminate(admin, conn)
        assert not driver.is_alive(conn)
        with pytest.raises(driver.operational_error):
            driver.ping(conn, 2)
        assert not driver.is_alive(conn)
    finally:
        driver.close(conn)

    for method in (driver.rollback, driver.reset):
        conn = driver.connect(5)
        try:
            query(conn, "BEGIN")
            terminate(admin, conn)
            with pytest.raises(driver.operational_error):
                method(conn)
        finally:
            driver.close(conn)


def test_socket_readable_polls_without_waiting_and_keeps_the_gil() -> None:
    """The cheap liveness test is a zero-timeout poll that never releases the GIL
    (``ctypes.PyDLL``): releasing it costs a queued GIL hand-off per checkout under
    many threads (docs/benchmarks.md)."""
    import ctypes

    from connguard.drivers import libpq

    assert libpq._poll is not None, "libc poll() is available on Linux"
    assert libpq._poll._flags_ & ctypes._FUNCFLAG_PYTHONAPI, "called with the GIL held"
    a, b = socket.socketpair()
    try:
        assert not libpq.socket_readable(a.fileno())
        b.send(b"E")  # what a server's goodbye (an ErrorResponse) looks like
        assert libpq.socket_readable(a.fileno())
        a.recv(1)
        assert not libpq.socket_readable(a.fileno())
        b.close()  # hung up: readable (EOF)
        assert libpq.socket_readable(a.fileno())
    finally:
        a.close()


@real
def test_abort_ends_a_call_blocked_in_another_thread(
    driver: Driver, admin: psycopg.Connection[Any]
) -> None:
    """``abort()`` (setting ``socket_timeout``) shuts the socket down under a thread
    blocked reading it: that thread gets the driver's error at once, and the
    connection is dead (libpq then closes its own descriptor)."""
    import threading

    conn = driver.connect(5)
    pid = backend_pid(conn)
    outcome: list[BaseException | None] = []
    done = threading.Event()

    def blocked() -> None:
        try:
            query(conn, "SELECT pg_sleep(30)")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        done.set()

    thread = threading.Thread(target=blocked)
    thread.start()
    try:
        # Synchronise on the server: the statement is running.
        for _ in range(2000):
            row = admin.execute(
                "SELECT state FROM pg_stat_activity WHERE pid = %s", [pid]
            ).fetchone()
            if row == ("active",):
                break
            done.wait(0.005)
        assert row == ("active",)
        driver.abort(conn)  # type: ignore[attr-defined]
        assert done.wait(5), "the blocked call did not return"
        assert isinstance(outcome[0], driver.operational_error)
        assert not driver.is_alive(conn)
    finally:
        admin.execute("SELECT pg_cancel_backend(%s)", [pid])
        thread.join(10)
        driver.close(conn)


@real
def test_client_connection_check_interval_is_set_and_survives_every_reset(
    pg: Any, driver_name: str, autocommit: bool
) -> None:
    """``client_connection_check_interval`` (what the Django backend sets with
    ``socket_timeout``) is on each new connection, in either baseline, and back after a
    reset (``DISCARD ALL`` takes a ``SET`` back); a value the session starts with (here
    the conninfo's ``options``) wins; without it the server's value stays."""

    def make(**kwargs: Any) -> Driver:
        return load_driver(
            driver_name, conninfo=pg.dsn, autocommit=autocommit, application_name=APP_NAME,
            **kwargs,
        )  # fmt: skip

    watched = make(client_connection_check_interval=0.25)
    conn = watched.connect(5)
    try:
        if watched.server_version(conn) < 140000:  # type: ignore[attr-defined]
            pytest.skip("client_connection_check_interval needs PostgreSQL 14")
        assert watched.transaction_status(conn) is TxStatus.IDLE
        assert scalar(conn, "SHOW client_connection_check_interval") == "250ms"
        query(conn, "SET client_connection_check_interval = 0")
        watched.reset(conn)
        assert scalar(conn, "SHOW client_connection_check_interval") == "250ms"
    finally:
        watched.close(conn)
    chosen = make(
        client_connection_check_interval=0.25,
        connect_kwargs={"options": "-c client_connection_check_interval=5000"},
    )
    conn = chosen.connect(5)
    try:
        assert scalar(conn, "SHOW client_connection_check_interval") == "5s"
        chosen.reset(conn)
        assert scalar(conn, "SHOW client_connection_check_interval") == "5s"
    finally:
        chosen.close(conn)
    plain = make()
    conn = plain.connect(5)
    try:
        assert scalar(conn, "SHOW client_connection_check_interval") == "0"
    finally:
        plain.close(conn)
    with pytest.raises(ValueError, match="client_connection_check_interval"):
        make(client_connection_check_interval=0)


@real
def test_refused_tells_a_refusal_from_an_outage(pg: Any, driver_name: str) -> None:
    """``refused()``: the server answered and said no (a database or role that does
    not exist, a role that may not be assumed) against nobody answering."""
    host = str(conninfo_to_dict(pg.dsn).get("host", "127.0.0.1"))
    d = load_driver(driver_name, conninfo=pg.dsn)
    refused = d.refused  # type: ignore[attr-defined]
    for conninfo in (f"{pg.dsn} dbname=no_such_db", f"{pg.dsn} user=no_such_role"):
        bad = load_driver(driver_name, conninfo=conninfo)
        with pytest.raises(bad.operational_error) as info:
            bad.connect(5)
        assert refused(info.value), str(info.value)
    nobody = load_driver(driver_name, conninfo=f"host={host} port={free_port()}")
    with pytest.raises(nobody.operational_error) as info:
        nobody.connect(5)
    assert not refused(info.value), str(info.value)
    conn = d.connect(5)
    try:
        with pytest.raises(Exception) as info:
            query(conn, "SET ROLE no_such_role")
        assert refused(info.value), str(info.value)
    finally:
        d.close(conn)
    for passing in (
        "FATAL:  sorry, too many clients already",
        'FATAL:  too many connections for role "app"',
        "FATAL:  the database system is starting up",
        "FATAL:  no more connections allowed (max_client_conn)",  # pgbouncer
        "FATAL:  pgbouncer cannot connect to server",
        "FATAL:  server login has been failing, try again later (server_login_retry)",
    ):
        assert not refused(d.operational_error(passing)), passing


@real
def test_is_alive_after_a_network_reset(pg: Any, driver_name: str, pg_proxy: FaultProxy) -> None:
    d = load_driver(driver_name, conninfo=pg_proxy.dsn(pg.dsn))
    conn = d.connect(5)
    try:
        assert d.is_alive(conn)
        pg_proxy.reset_all()
        readable, _, _ = select.select([conn.fileno()], [], [], 2.0)
        assert readable
        assert not d.is_alive(conn)
    finally:
        d.close(conn)


@real
def test_ping_keeps_the_transaction_state(tx_driver: Driver, tx_conn: Any) -> None:
    d, conn = tx_driver, tx_conn
    d.ping(conn, 5)
    assert d.transaction_status(conn) is TxStatus.IDLE
    assert conn.autocommit is d.autocommit  # type: ignore[attr-defined]
    query(conn, "CREATE TEMP TABLE cg_ping (x int)")
    if d.autocommit:  # type: ignore[attr-defined]
        query(conn, "BEGIN")
    query(conn, "INSERT INTO cg_ping VALUES (1)")
    d.ping(conn, 5)
    assert d.transaction_status(conn) is TxStatus.INTRANS
    assert scalar(conn, "SELECT count(*) FROM cg_ping") == 1
    with pytest.raises(Exception, match="division by zero"):
        query(conn, "SELECT 1/0")
    d.ping(conn, 5)  # an empty query is answered even in a failed transaction
    assert d.transaction_status(conn) is TxStatus.INERROR
    d.rollback(conn)
    assert d.transaction_status(conn) is TxStatus.IDLE


@real
def test_ping_is_bounded_by_its_timeout_psycopg(pg: Any, pg_proxy: FaultProxy) -> None:
    """psycopg 3 only: psycopg2 offers no way to bound the round trip (documented)."""
    d = load_driver("psycopg", conninfo=pg_proxy.dsn(pg.dsn))
    conn = d.connect(5)
    try:
        d.ping(conn, 5)
        pg_proxy.blackhole()
        start = time.monotonic()
        with pytest.raises(d.operational_error, match="no answer within"):
            d.ping(conn, 0.3)
        assert 0.25 <= time.monotonic() - start < 1.5
    finally:
        d.close(conn)


# -- rollback and reset ----------------------------------------------------------------


@real
def test_rollback_after_manual_begin_under_autocommit(driver: Driver, conn: Any) -> None:
    """psycopg2's own conn.rollback() is a no-op here: it thinks no transaction is open."""
    query(conn, "SET statement_timeout = 1234")
    query(conn, "CREATE TEMP TABLE cg_rb (x int)")
    query(conn, "BEGIN")
    query(conn, "INSERT INTO cg_rb VALUES (1)")
    assert driver.transaction_status(conn) is TxStatus.INTRANS
    driver.rollback(conn)
    assert driver.transaction_status(conn) is TxStatus.IDLE
    assert scalar(conn, "SELECT count(*) FROM cg_rb") == 0
    assert scalar(conn, "SHOW statement_timeout") == "1234ms", "rollback lost session state"
    driver.rollback(conn)  # nothing open: a no-op
    assert driver.transaction_status(conn) is TxStatus.IDLE


@real
def test_rollback_in_transactional_mode(tx_driver: Driver, tx_conn: Any) -> None:
    d, conn = tx_driver, tx_conn
    query(conn, "SELECT 1")
    if d.transaction_status(conn) is TxStatus.IDLE:  # autocommit baseline
        query(conn, "BEGIN")
    with pytest.raises(Exception, match="division by zero"):
        query(conn, "SELECT 1/0")
    assert d.transaction_status(conn) is TxStatus.INERROR
    d.rollback(conn)
    assert d.transaction_status(conn) is TxStatus.IDLE
    assert scalar(conn, "SELECT 2") == 2


@real
def test_reset_discards_session_state(tx_driver: Driver, tx_conn: Any, autocommit: bool) -> None:
    d, conn = tx_driver, tx_conn
    default_timeout = scalar(conn, "SHOW statement_timeout")
    pid = backend_pid(conn)
    if not autocommit:
        conn.rollback()
    conn.autocommit = True  # what a holder may do; reset must restore the baseline
    query(conn, "SET statement_timeout = 1234")
    query(conn, "CREATE TEMP TABLE cg_reset (x int)")
    query(conn, "PREPARE cg_stmt AS SELECT 1")
    query(conn, "LISTEN cg_channel")
    query(conn, "SELECT pg_advisory_lock(4242)")
    query(conn, "DECLARE cg_hold CURSOR WITH HOLD FOR SELECT generate_series(1, 10)")
    conn.autocommit = False  # psycopg2 wants its own BEGIN before a named cursor
    named = conn.cursor("cg_named")
    named.execute("SELECT generate_series(1, 10)")
    assert named.fetchone() == (1,)
    query(conn, "INSERT INTO cg_reset VALUES (1)")
    assert scalar(conn, "SELECT count(*) FROM pg_cursors") == 2
    assert d.transaction_status(conn) is TxStatus.INTRANS

    d.reset(conn)

    assert d.transaction_status(conn) is TxStatus.IDLE
    assert conn.autocommit is autocommit
    assert backend_pid(conn) == pid, "reset must keep the session, not reconnect"
    if not autocommit:
        conn.rollback()
    conn.autocommit = True
    assert scalar(conn, "SHOW statement_timeout") == default_timeout
    assert scalar(conn, "SHOW application_name") == APP_NAME, "startup settings must survive"
    assert scalar(conn, "SELECT to_regclass('pg_temp.cg_reset')") is None
    assert scalar(conn, "SELECT count(*) FROM pg_cursors") == 0
    assert scalar(conn, "SELECT count(*) FROM pg_prepared_statements") == 0
    assert scalar(conn, "SELECT count(*) FROM pg_listening_channels()") == 0
    assert (
        scalar(
            conn,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s",
            [pid],
        )
        == 0
    )
    # The cursor died with the transaction: psycopg 3 closes the object without I/O,
    # psycopg2 refuses ("named cursor isn't valid anymore"), as after any rollback.
    with contextlib.suppress(Exception):
        named.close()


@real
def test_reset_keeps_connect_time_settings(pg: Any, driver_name: str) -> None:
    """DISCARD ALL resets to the session's startup values, not the server defaults."""
    d = load_driver(
        driver_name,
        conninfo=pg.dsn,
        connect_kwargs={"options": "-c statement_timeout=4321"},
        application_name="cg-startup",
    )
    conn = d.connect(5)
    try:
        query(conn, "SET statement_timeout = 1234")
        query(conn, "SET application_name = 'changed'")
        d.reset(conn)
        assert scalar(conn, "SHOW statement_timeout") == "4321ms"
        assert scalar(conn, "SHOW application_name") == "cg-startup"
    finally:
        d.close(conn)


@real
def test_reset_restores_the_autocommit_baseline(tx_driver: Driver, tx_conn: Any) -> None:
    d, conn = tx_driver, tx_conn
    baseline = conn.autocommit
    conn.autocommit = not baseline
    if baseline:  # now transactional: open a transaction to make it harder
        query(conn, "SELECT 1")
        assert d.transaction_status(conn) is TxStatus.INTRANS
    d.reset(conn)
    assert conn.autocommit is baseline
    assert d.transaction_status(conn) is TxStatus.IDLE


@real
def test_reset_forgets_prepared_statements(tx_driver: Driver, tx_conn: Any) -> None:
    """psycopg 3 prepares a query on its 5th run; DISCARD ALL deallocates it server-side.

    psycopg 3.3 only notices the first DISCARD ALL it sees, and auto-prepares DISCARD ALL
    itself: without the driver's workaround the 2nd round (or the 5th reset) fails with
    'prepared statement "_pg3_0" does not exist'.
    """
    d, conn = tx_driver, tx_conn
    for _ in range(8):
        d.reset(conn)
        for i in range(8):
            assert query(conn, "SELECT %s::int + 1", [i]) == [(i + 1,)]
        d.rollback(conn)


# -- fork ------------------------------------------------------------------------------


def _in_child(action: Any) -> int:
    """Fork, run ``action`` in the child, return the child's exit code.

    The child never returns into pytest: whatever happens it leaves with os._exit, so
    no finalizer or atexit hook of the parent's objects runs there.
    """
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            code = int(action())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@real
def test_drop_in_a_forked_child_keeps_the_parents_session(driver: Driver, conn: Any) -> None:
    pid = backend_pid(conn)
    assert scalar(conn, "SELECT 1") == 1

    def child() -> int:
        driver.drop(conn)
        # dropped on the child's side: closed, and no longer reported alive
        return 0 if driver.transaction_status(conn) is TxStatus.UNKNOWN else 3

    assert _in_child(child) == 0
    assert scalar(conn, "SELECT pg_backend_pid()") == pid
    assert driver.is_alive(conn)
    driver.ping(conn, 5)


@real
def test_plain_close_in_a_forked_child_kills_the_parents_session(driver: Driver, conn: Any) -> None:
    """The counter-test: proves the test above would fail without drop()'s dup2."""
    assert scalar(conn, "SELECT 1") == 1

    def child() -> int:
        conn.close()
        return 0

    assert _in_child(child) == 0
    with pytest.raises(driver.operational_error):
        query(conn, "SELECT 1")


@real
def test_drop_without_fork_and_on_closed_connections(driver: Driver) -> None:
    conn = driver.connect(5)
    driver.drop(conn)
    assert driver.transaction_status(conn) is TxStatus.UNKNOWN
    assert not driver.is_alive(conn)
    driver.drop(conn)  # already closed: nothing to do, never raises
    driver.close(conn)
