"""The PostgreSQL the demo runs against: a throwaway embedded one, or ``--dsn``.

Either way the site gets a database of its own, ``connguard_demo``, created and
migrated (which seeds it) before the runs, and dropped afterwards if the demo
created it. An existing server is described by host and port, never by its DSN, so
that no message, report or JSON document can carry its password.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from connguard.diagnostics.doctor import cannot_connect

from . import DemoError
from .interrupts import Interrupts
from .servers import Launcher

__all__ = [
    "DEMO_DATABASE",
    "MONITOR_APP_NAME",
    "Postgres",
    "check_binaries",
    "connect_existing",
    "migrate",
    "start_embedded",
]

DEMO_DATABASE = "connguard_demo"
MONITOR_APP_NAME = "connguard-demo-monitor"
"""``application_name`` of the demo's own connections, which it never counts."""
OWNED_COMMENT = "created by connguard demo; dropped when the demo ends"
"""Marks a ``connguard_demo`` database the demo created: it may drop it again, even
one left behind by an earlier run that could not clean up."""
CONNECT_TIMEOUT = 5
# conninfo keys the demo sets itself; everything else (sslmode...) goes to Django too.
_OWN_KEYS = frozenset(
    {"host", "hostaddr", "port", "user", "password", "dbname", "application_name",
     "connect_timeout"}
)  # fmt: skip


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


# 'connection failed: connection to server at "h", port 5 failed: FATAL: ...' -> 'FATAL: ...'
_CONNECT_PREFIX = re.compile(r"^(connection failed: )?connection to server (at|on) .*? failed: ")


def _reason(exc: BaseException) -> str:
    """The first line of an error, without libpq's "connection to server at" preamble:
    the message it goes in names the server already."""
    return _CONNECT_PREFIX.sub("", _first_line(str(exc))) or type(exc).__name__


@dataclass
class Postgres:
    """A server the demo may use, and how to reach it (the password stays in here)."""

    source: Literal["embedded", "dsn"]
    conninfo: str
    """For the demo's own connections (the server's maintenance database)."""
    host: str
    port: int
    user: str
    password: str | None
    version: str
    max_connections: int
    free_connections: int
    """What the site may open: max_connections minus connections in use minus, for a
    role that is not a superuser, the superuser reserve."""
    options: dict[str, str] = field(default_factory=dict)
    created_database: bool = False

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def describe(self) -> str:
        """One line for people: which server, where, how many connections."""
        kind = "embedded PostgreSQL" if self.source == "embedded" else "PostgreSQL"
        origin = "" if self.source == "embedded" else " (--dsn)"
        return (
            f"{kind} {self.version} at {self.where}{origin}, user {self.user}, "
            f"max_connections {self.max_connections}"
        )

    def site_db(self) -> dict[str, Any]:
        """``DOCSITE_DB`` for the site: the demo database on this server."""
        db: dict[str, Any] = {
            "HOST": self.host,
            "PORT": self.port,
            "NAME": DEMO_DATABASE,
            "USER": self.user,
            "PASSWORD": self.password or "",
        }
        if self.options:
            db["OPTIONS"] = dict(self.options)
        return db

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self.conninfo,
            autocommit=True,
            application_name=MONITOR_APP_NAME,
            connect_timeout=CONNECT_TIMEOUT,
        )

    def sessions(self) -> int | None:
        """Sessions ever opened on the demo database (``pg_stat_database.sessions``,
        PostgreSQL 14+): the exact number of connections a run opened, as the server
        counted them. None when the server cannot tell."""
        try:
            with self.connect() as conn:
                row = conn.execute(
                    "SELECT sessions FROM pg_stat_database WHERE datname = %s", (DEMO_DATABASE,)
                ).fetchone()
        except psycopg.Error:
            return None
        return None if row is None or row[0] is None else int(row[0])

    def as_dict(self) -> dict[str, Any]:
        """What the JSON output and the report say about the server (no password)."""
        return {
            "source": self.source,
            "version": self.version,
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "database": DEMO_DATABASE,
            "max_connections": self.max_connections,
            "free_connections": self.free_connections,
        }


def _inspect(conn: psycopg.Connection[Any]) -> tuple[str, int, int]:
    """Server version, max_connections, and the connections the site may open."""
    row = conn.execute(
        "SELECT current_setting('server_version'), current_setting('max_connections')::int, "
        "current_setting('superuser_reserved_connections')::int, "
        "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user), "
        "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
    ).fetchone()
    assert row is not None
    version, max_connections, reserved, superuser, in_use = row
    free = int(max_connections) - int(in_use) - (0 if superuser else int(reserved))
    return str(version).split()[0], int(max_connections), free


def check_binaries() -> None:
    """Fail with one clear line, before anything starts, when there is no PostgreSQL
    to embed. The test bed is imported lazily: ``--dsn`` does not need it."""
    from connguard.testing.postgres import find_bin_dir  # noqa: PLC0415

    try:
        find_bin_dir()
    except RuntimeError as exc:
        raise DemoError(f"{_reason(exc)}; or pass --dsn to use a running server") from None


def start_embedded(
    max_connections: int, stack: contextlib.ExitStack, interrupts: Interrupts
) -> Postgres:
    """Start a throwaway server; its removal goes on ``stack`` before it starts."""
    from connguard.testing.postgres import EmbeddedPostgres  # noqa: PLC0415

    check_binaries()
    server = EmbeddedPostgres(max_connections=max_connections)
    stack.callback(server.cleanup)
    try:
        with interrupts.deferred():
            server.start()
    except RuntimeError as exc:
        raise DemoError(f"cannot start the embedded PostgreSQL: {_reason(exc)}", status=1) from None
    server.psql(f"CREATE DATABASE {DEMO_DATABASE}")
    with psycopg.connect(server.dsn, autocommit=True, application_name=MONITOR_APP_NAME) as conn:
        version, max_conn, free = _inspect(conn)
    return Postgres(
        source="embedded",
        conninfo=server.dsn,
        host=server.host,
        port=server.port,
        user=server.user,
        password=None,
        version=version,
        max_connections=max_conn,
        free_connections=free,
        created_database=True,
    )


def connect_existing(dsn: str, stack: contextlib.ExitStack, need: int) -> Postgres:
    """Use the server ``dsn`` names: check it has ``need`` free connections, create
    (or reuse) the demo database, and drop it at the end if the demo owns it."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise DemoError(f"invalid --dsn: {_reason(exc)}") from None
    try:
        conn = psycopg.connect(
            dsn,
            autocommit=True,
            application_name=MONITOR_APP_NAME,
            connect_timeout=CONNECT_TIMEOUT,
        )
    except psycopg.Error as exc:
        raise DemoError(cannot_connect("PostgreSQL", dsn, exc)) from None
    with conn:
        info = conn.info
        host, port, user, password = info.host, info.port, info.user, info.password
        where = f"{host}:{port}"
        version, max_connections, free = _inspect(conn)
        if free < need:
            raise DemoError(
                f"PostgreSQL at {where} has {max(free, 0)} free connections "
                f"(max_connections {max_connections}); the demo needs at least {need}"
            )
        pg = Postgres(
            source="dsn",
            conninfo=dsn,
            host=host,
            port=port,
            user=user,
            password=password or None,
            version=version,
            max_connections=max_connections,
            free_connections=free,
            options={k: str(v) for k, v in params.items() if k not in _OWN_KEYS and v is not None},
        )
        pg.created_database = _ensure_database(conn, where, user)
    if pg.created_database:
        stack.callback(_drop_database, pg)
    return pg


def _ensure_database(conn: psycopg.Connection[Any], where: str, user: str) -> bool:
    """Create the demo database unless it exists; True when the demo owns it."""
    row = conn.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
        (DEMO_DATABASE,),
    ).fetchone()
    if row is not None:
        return bool(row[0] == OWNED_COMMENT)
    try:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DEMO_DATABASE)))
    except psycopg.errors.InsufficientPrivilege:
        raise DemoError(
            f"user {user} may not create databases on {where}: create one for the demo "
            f"(CREATE DATABASE {DEMO_DATABASE} OWNER {user}) or use a --dsn whose user may"
        ) from None
    except psycopg.Error as exc:
        raise DemoError(
            f"cannot create the database {DEMO_DATABASE} on {where}: {_reason(exc)}"
        ) from None
    with contextlib.suppress(psycopg.Error):
        conn.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(DEMO_DATABASE), sql.Literal(OWNED_COMMENT)
            )
        )
    return True


def _drop_database(pg: Postgres) -> None:
    """Drop the demo database (after the sites are stopped); best effort, since the
    next run reuses a database marked as the demo's and drops it then."""
    drop = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(DEMO_DATABASE))
    with contextlib.suppress(psycopg.Error), pg.connect() as conn:
        try:
            conn.execute(drop + sql.SQL(" WITH (FORCE)"))  # PostgreSQL 13+
        except psycopg.errors.SyntaxError:
            conn.execute(drop)


def migrate(pg: Postgres, launcher: Launcher, cwd: Path) -> None:
    """Create and seed the site's tables (10 documents x 30 pages) with Django's
    ``migrate``; idempotent on a database an earlier run left behind."""
    try:
        launcher.manage(
            pg.site_db(),
            ["migrate", "-v", "0"],
            {"DOCSITE_ENGINE": "stock", "DOCSITE_APP_NAME": MONITOR_APP_NAME},
            cwd=cwd,
        )
    except RuntimeError as exc:
        detail = [line for line in str(exc).splitlines() if line.strip()]
        raise DemoError(
            f"creating the demo site's tables failed: {detail[-1] if detail else exc}", status=1
        ) from None
