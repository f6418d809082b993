"""TCP keepalives and ``tcp_user_timeout`` on every connection the libpq drivers open,
unless the user chose any of them: checked on the socket itself, where the kernel
applies them, and in the parameters libpq reports."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg2
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from connguard.django.driver import DjangoDriver
from connguard.drivers import DRIVER_NAMES, load_driver
from connguard.drivers.libpq import TCP_KEEPALIVES, tcp_keepalives
from connguard.pool.driver import Driver
from connguard.testing.postgres import EmbeddedPostgres

pytestmark = pytest.mark.real

DRIVERS = list(DRIVER_NAMES)


def kernel_defaults() -> dict[str, int]:
    """What a socket shows when nobody set them: the host's sysctls (Linux)."""
    proc = "/proc/sys/net/ipv4/tcp_keepalive_"
    values = {}
    for key, name in (("idle", "time"), ("interval", "intvl"), ("count", "probes")):
        with open(proc + name) as f:
            values[key] = int(f.read())
    return {**values, "user_timeout": 0}


KERNEL_DEFAULTS = kernel_defaults()
OURS = {"keepalive": 1, "idle": 30, "interval": 10, "count": 3, "user_timeout": 30000}


def tcp_options(fd: int) -> dict[str, int]:
    """What the kernel applies to the connection's socket."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        return {
            "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            "user_timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        }
    finally:
        sock.close()  # the duplicate only


def reported(conn: Any) -> dict[str, str]:
    """The keepalive parameters libpq reports for the connection."""
    if isinstance(conn, psycopg.Connection):
        params = conn.info.get_parameters()
    else:
        params = conn.get_dsn_parameters()
    return {k: v for k, v in params.items() if k in TCP_KEEPALIVES}


def fd_of(conn: Any) -> int:
    return int(conn.pgconn.socket if isinstance(conn, psycopg.Connection) else conn.fileno())


@pytest.fixture
def opened() -> Iterator[list[Any]]:
    conns: list[Any] = []
    yield conns
    for conn in conns:
        conn.close()


def open_with(driver: Driver, opened: list[Any]) -> Any:
    conn = driver.connect(5.0)
    opened.append(conn)
    return conn


@pytest.mark.parametrize("name", DRIVERS)
def test_connections_get_the_keepalives(pg: Any, name: str, opened: list[Any]) -> None:
    conn = open_with(load_driver(name, conninfo=pg.dsn), opened)
    assert tcp_options(fd_of(conn)) == OURS
    assert reported(conn) == {k: str(v) for k, v in TCP_KEEPALIVES.items()}


@pytest.mark.parametrize(
    "user",
    [
        {"keepalives_idle": 17},
        {"keepalives": 0},
        {"tcp_user_timeout": 12345},
    ],
    ids=lambda u: next(iter(u)),
)
@pytest.mark.parametrize("where", ["kwargs", "conninfo", "uri"])
@pytest.mark.parametrize("name", DRIVERS)
def test_a_user_value_wins_and_leaves_the_rest_to_libpq(
    pg: Any, name: str, where: str, user: dict[str, int], opened: list[Any]
) -> None:
    if where == "kwargs":
        driver = load_driver(name, conninfo=pg.dsn, connect_kwargs=user)
    elif where == "conninfo":
        driver = load_driver(name, conninfo=make_conninfo(pg.dsn, **user))
    else:
        parts = conninfo_to_dict(pg.dsn)
        query = "&".join(f"{k}={v}" for k, v in user.items())
        uri = (
            f"postgresql://{parts['user']}@{parts['host']}:{parts['port']}/{parts['dbname']}"
            f"?{query}"
        )
        if "password" in parts:
            uri += f"&password={parts['password']}"
        driver = load_driver(name, conninfo=uri)
    conn = open_with(driver, opened)
    assert reported(conn) == {k: str(v) for k, v in user.items()}
    expected = {"keepalive": 1, **KERNEL_DEFAULTS}
    if "keepalives_idle" in user:
        expected["idle"] = 17
    if "keepalives" in user:
        expected["keepalive"] = 0
    if "tcp_user_timeout" in user:
        expected["user_timeout"] = 12345
    assert tcp_options(fd_of(conn)) == expected


@pytest.mark.parametrize("name", DRIVERS)
def test_django_connections_get_them_unless_options_set_any(
    pg: Any, name: str, opened: list[Any]
) -> None:
    """Django hands every parameter (OPTIONS included) over as keywords."""
    params: dict[str, Any] = dict(conninfo_to_dict(pg.dsn))
    connect = psycopg.connect if name == "psycopg" else psycopg2.connect

    def django_driver(conn_params: dict[str, Any]) -> DjangoDriver:
        return DjangoDriver(
            load_driver(name),
            connect=connect,
            conn_params=conn_params,
            configure=lambda conn: False,
            baseline=lambda: "",
            autocommit=True,
        )

    plain = open_with(django_driver(params), opened)
    assert tcp_options(fd_of(plain)) == OURS
    chosen = open_with(django_driver({**params, "keepalives_count": 5}), opened)
    assert tcp_options(fd_of(chosen)) == {"keepalive": 1, **KERNEL_DEFAULTS, "count": 5}


@pytest.mark.parametrize("name", DRIVERS)
def test_unix_socket_connections_accept_them(pg: Any, name: str, opened: list[Any]) -> None:
    """libpq ignores them on a Unix-domain socket rather than failing."""
    if not isinstance(pg, EmbeddedPostgres):
        pytest.skip("needs the embedded server's socket directory")
    dsn = make_conninfo(pg.dsn, host=str(pg.socket_dir))
    conn = open_with(load_driver(name, conninfo=dsn), opened)
    assert reported(conn) == {k: str(v) for k, v in TCP_KEEPALIVES.items()}


def test_which_defaults_apply() -> None:
    assert tcp_keepalives({"host": "db", "password": "x"}, 170000) == TCP_KEEPALIVES
    assert tcp_keepalives({"host": "db"}, 110000) == {
        k: v for k, v in TCP_KEEPALIVES.items() if k != "tcp_user_timeout"
    }  # libpq 11 rejects tcp_user_timeout as an unknown option
    for key in (*TCP_KEEPALIVES, "service"):
        assert tcp_keepalives({"host": "db", key: "1"}, 170000) == {}


@pytest.mark.parametrize("name", DRIVERS)
def test_a_malformed_conninfo_is_reported_by_connect_as_before(name: str) -> None:
    driver = load_driver(name, conninfo="host=db port")
    error = psycopg.ProgrammingError if name == "psycopg" else psycopg2.ProgrammingError
    with pytest.raises(error):
        driver.connect(1.0)
