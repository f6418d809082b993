"""What Django does once per connection (time zone, ``assume_role``, psycopg2's JSON
adapters), done once per *physical* connection by the pool, and the password as the
driver gets it."""

from __future__ import annotations

import dataclasses
from typing import Any

from django.db.backends.postgresql.psycopg_any import is_psycopg3

from connguard.drivers.session import literal


def _sql_module() -> Any:
    """``psycopg.sql`` or ``psycopg2.sql``, whichever Django's backend uses."""
    if is_psycopg3:
        from psycopg import sql  # noqa: PLC0415

        return sql
    from psycopg2 import sql as sql2  # noqa: PLC0415

    return sql2


class MaskedPassword(str):
    """The password, as the driver needs it, that ``repr()`` shows as stars.

    With ``DEBUG=True`` Django's technical 500 page shows the locals of every frame of
    the traceback (its ``sensitive_variables`` cleansing only runs when ``DEBUG`` is
    off), and a connection error's traceback runs through Django's ``connect()``,
    whose ``conn_params`` we cannot take out of its frame. So the value in those
    parameters is one whose ``repr`` (what the page, ``pprint`` and ``%r`` show) is
    masked, while ``str()``, formatting and comparisons give the password itself, as
    libpq's connect needs.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "'********************'"  # what Django's own cleansing shows


@dataclasses.dataclass(frozen=True)
class ConnectionSetup:
    """What Django does once per connection (time zone, ``assume_role``, psycopg2's
    JSON adapters), as one pool applies it to each of its connections: when opened
    (:meth:`configure`, on an opener thread) and after each reset
    (:meth:`baseline_sql`, in the reset's round trip)."""

    timezone_name: str | None
    role: str | None
    set_time_zone_sql: str

    def baseline_sql(self) -> str:
        """The set-up as SQL, re-applied in the same round trip as a reset."""
        statements = []
        if self.timezone_name:
            statements.append(f"SET TIME ZONE {literal(self.timezone_name)}")
        if self.role:
            statements.append(f"SET ROLE {literal(self.role)}")
        return "; ".join(statements)

    def configure(self, connection: Any) -> bool:
        """Set up a new physical connection; True when it ran statements.

        Runs on the pool's opener thread, so it touches only ``connection``: Django's
        own ``_configure_role`` builds its SQL through the wrapper's connection,
        which would acquire from the pool being filled.
        """
        ran = False
        timezone_name = self.timezone_name
        if timezone_name and session_time_zone(connection) != timezone_name:
            with connection.cursor() as cursor:
                cursor.execute(self.set_time_zone_sql, [timezone_name])
            ran = True
        if self.role:
            with connection.cursor() as cursor:
                sql = _sql_module()
                cursor.execute(sql.SQL("SET ROLE {}").format(sql.Literal(self.role)))
            ran = True
        if not is_psycopg3:
            import psycopg2.extras  # noqa: PLC0415 - only installed when it is the driver

            psycopg2.extras.register_default_jsonb(conn_or_curs=connection, loads=lambda x: x)
        return ran


def session_time_zone(connection: Any) -> str | None:
    """The connection's ``TimeZone`` as the server last reported it; no round trip.

    psycopg 3's ``connection.info`` builds an object and decodes on every read (about
    2 µs); its ``pgconn`` answers in a tenth of that, which matters at every checkout.
    psycopg2's ``info`` is C and cheap."""
    pgconn = getattr(connection, "pgconn", None)
    if pgconn is None:
        zone: str | None = connection.info.parameter_status("TimeZone")
        return zone
    value = pgconn.parameter_status(b"TimeZone")
    return None if value is None else value.decode()
