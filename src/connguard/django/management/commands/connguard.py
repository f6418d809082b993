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

import argparse
import json
import sys
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

from connguard.diagnostics import doctor, status
from connguard.django import pools
from connguard.django.checks import connguard_databases
from connguard.drivers.libpq import forget_attempt
from connguard.pool import PoolConfigError
from connguard.pool.errors import ConnectFailed, chain, detach

# A command that cannot run exits 2 (one line on stderr, no traceback), like the
# ``connguard`` CLI; 1 stays doctor's "found a problem".
_CANNOT_RUN = 2


class Command(BaseCommand):
    help = "connguard: this process's pools (status) or the server's connections (doctor)."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        # Django's own options (--settings, -v...) belong to the command's parser; a
        # user who writes them after the action ("connguard status --settings=x")
        # reaches the action's parser instead, which must take them too. Django has
        # already applied --settings and --pythonpath before the command runs.
        common = argparse.ArgumentParser(add_help=False)
        for flag in ("--settings", "--pythonpath"):
            common.add_argument(flag, default=argparse.SUPPRESS)
        for flag in ("--traceback", "--no-color", "--force-color"):
            common.add_argument(flag, action="store_true", default=argparse.SUPPRESS)
        common.add_argument(
            "-v", "--verbosity", type=int, choices=[0, 1, 2, 3], default=argparse.SUPPRESS
        )
        st = sub.add_parser(
            "status", help="a running server's pools (--url), or this process's", parents=[common]
        )
        st.add_argument("--json", action="store_true", help="print JSON")
        st.add_argument(
            "--url",
            help="a running server's status view (connguard.django.urls), e.g. "
            "http://127.0.0.1:8000/connguard/status: every worker process",
        )
        st.add_argument(
            "--token", help=f"the view's CONNGUARD['status_token'] (default: ${status.TOKEN_ENV})"
        )
        dr = sub.add_parser("doctor", help="read pg_stat_activity and explain it", parents=[common])
        dr.add_argument("--json", action="store_true", help="print JSON")
        dr.add_argument("--database", default=DEFAULT_DB_ALIAS, help="alias to read through")
        dr.add_argument(
            "--idle-threshold", type=float, default=300.0,
            help="seconds idle before an untagged backend counts as a likely leak",
        )  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        if options["action"] == "status":
            self._status(options)
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
            raw = _own_connection(connection)
        except DatabaseError as exc:
            raise CommandError(_cannot_connect(connection, exc), returncode=_CANNOT_RUN) from None
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc), returncode=_CANNOT_RUN) from None
        try:
            text, code = doctor.run(
                raw,
                as_json_output=options["json"],
                idle_threshold=options["idle_threshold"],
                max_size=max_size,
            )
        finally:
            raw.close()
        self.stdout.write(text, ending="")
        if code:
            sys.exit(code)

    def _status(self, options: dict[str, Any]) -> None:
        if options["url"]:
            try:
                data = status.fetch(options["url"], token=options["token"])
            except status.StatusUnavailable as exc:
                raise CommandError(str(exc), returncode=_CANNOT_RUN) from None
            if options["json"]:
                self.stdout.write(json.dumps(data, indent=2))
            else:
                self.stdout.write(status.format_processes(data["processes"]), ending="")
            return
        entries = status.report(pools.pools())
        if options["json"]:
            self.stdout.write(json.dumps(entries, indent=2, default=str))
            return
        self.stdout.write(status.format_report(entries), ending="")
        # This command is a process of its own: a server's pools are not here.
        self.stdout.write(status.HOW_TO_SEE_A_SERVER)


def _own_connection(connection: Any) -> Any:
    """One driver connection of the command's own, made with the alias's parameters
    but outside any pool. Through the alias's pool (connguard's or Django's native
    one) the command would open ``min_size`` connections and then count all but the
    one it queries on among the server's client backends and in the budget: doctor
    reports what the server sees, so it must not add to it. Errors come as Django's
    (``DatabaseError``); libpq's ``connect_timeout`` defaults to 10 s here, so a
    server that does not answer cannot hold the command."""
    params = connection.get_connection_params()
    params.setdefault("connect_timeout", 10)
    with connection.wrap_database_errors:
        try:
            return connection.Database.connect(**params)
        except Exception as exc:
            # The driver's frames hold the conninfo, password included: the error
            # leaves without them (see connguard.pool.errors.detach).
            detach(exc)
            forget_attempt(exc)
            raise


def _cannot_connect(connection: Any, exc: BaseException) -> str:
    """``cannot connect to PostgreSQL at HOST:PORT: <reason>``, as ``connguard doctor``
    says it (:func:`connguard.diagnostics.doctor.cannot_connect`).

    The driver's error arrives as Django's ``OperationalError``; one that wraps a
    pool's :class:`ConnectFailed` (no connection within the pool's ``timeout``
    because the server is unreachable) chains the driver's error as its cause: the
    reason is then that last one. Only HOST and PORT are
    taken from the settings, so no password can reach the message.
    """
    reason = next(
        (c.__cause__ for c in chain(exc) if isinstance(c, ConnectFailed) and c.__cause__), exc
    )
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
