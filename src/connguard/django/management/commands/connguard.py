"""``python manage.py connguard status|doctor``.

``status``: this process's pools: settings, gauges, counters, and every current
lease with its holder, request, age and acquiring ``file:line``.
``doctor``: the server's view (``pg_stat_activity``, ``pg_settings``) explained,
with the budget computed from this project's ``max_size`` settings. Exit status 1
when it finds a problem, so it can run in monitoring; 2, with one line and no
traceback, when it cannot run at all (an unknown alias, bad pool settings, a server
it cannot reach: worded as ``connguard doctor`` words it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

from connguard.diagnostics import doctor, status
from connguard.django import pools
from connguard.django.checks import connguard_databases
from connguard.pool import PoolConfigError
from connguard.pool.errors import ConnectFailed

# A command that cannot run exits 2 (one line on stderr, no traceback), like the
# ``connguard`` CLI; 1 stays doctor's "found a problem".
_CANNOT_RUN = 2


class Command(BaseCommand):
    help = "connguard: this process's pools (status) or the server's connections (doctor)."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        st = sub.add_parser("status", help="this process's pools and leases")
        st.add_argument("--json", action="store_true", help="print JSON")
        dr = sub.add_parser("doctor", help="read pg_stat_activity and explain it")
        dr.add_argument("--json", action="store_true", help="print JSON")
        dr.add_argument("--database", default=DEFAULT_DB_ALIAS, help="alias to read through")
        dr.add_argument(
            "--idle-threshold", type=float, default=300.0,
            help="seconds idle before an untagged backend counts as a likely leak",
        )  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        if options["action"] == "status":
            entries = status.report(pools.pools())
            if options["json"]:
                self.stdout.write(json.dumps(entries, indent=2, default=str))
            else:
                self.stdout.write(status.format_report(entries), ending="")
            return
        alias = options["database"]
        if alias not in connections:
            raise CommandError(f"unknown database alias {alias!r}", returncode=_CANNOT_RUN)
        try:
            max_size = {
                name: pools.pool_config(db.get("OPTIONS") or {}).max_size
                for name, db in connguard_databases().items()
            }
        except PoolConfigError as exc:
            raise CommandError(f"bad OPTIONS['pool']: {exc}", returncode=_CANNOT_RUN) from None
        connection = connections[alias]
        try:
            with _held_pool_logs():
                connection.ensure_connection()
        except DatabaseError as exc:
            raise CommandError(_cannot_connect(connection, exc), returncode=_CANNOT_RUN) from None
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc), returncode=_CANNOT_RUN) from None
        try:
            text, code = doctor.run(
                connection.connection,
                as_json_output=options["json"],
                idle_threshold=options["idle_threshold"],
                max_size=max_size,
            )
        finally:
            connection.close()
        self.stdout.write(text, ending="")
        if code:
            sys.exit(code)


@contextlib.contextmanager
def _held_pool_logs() -> Iterator[None]:
    """Hold back the pool's log records while the command connects: if it cannot,
    they only repeat the one line the command prints ("cannot connect ...; retrying
    with backoff" for every attempt); if it can, they are logged after all."""
    logger = logging.getLogger("connguard.pool")
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    logger.addFilter(hold)
    try:
        yield
    finally:
        logger.removeFilter(hold)
    for record in held:  # reached only when connecting worked
        logger.handle(record)


def _cannot_connect(connection: Any, exc: BaseException) -> str:
    """``cannot connect to PostgreSQL at HOST:PORT: <reason>``, as ``connguard doctor``
    says it (:func:`connguard.diagnostics.doctor.cannot_connect`).

    Through a connguard pool the driver's error arrives as Django's
    ``OperationalError`` wrapping the pool's :class:`ConnectFailed` (no connection
    within the pool's ``timeout`` because the server is unreachable), which chains the
    driver's error as its cause: the reason is that last one. Only HOST and PORT are
    taken from the settings, so no password can reach the message.
    """
    reason: BaseException = exc
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectFailed) and current.__cause__ is not None:
            reason = current.__cause__
            break
        current = current.__cause__ or current.__context__
    settings = connection.settings_dict
    conninfo = " ".join(
        f"{key}={_quote(str(value))}"
        for key, value in (("host", settings.get("HOST")), ("port", settings.get("PORT")))
        if value
    )
    return doctor.cannot_connect("PostgreSQL", conninfo, reason)


def _quote(value: str) -> str:
    """A libpq conninfo value, quoted when it needs it."""
    if value and not any(c.isspace() or c in "'\\" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
