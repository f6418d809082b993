"""``python manage.py connguard status|doctor``.

``status``: this process's pools: settings, gauges, counters, and every current
lease with its holder, request, age and acquiring ``file:line``.
``doctor``: the server's view (``pg_stat_activity``, ``pg_settings``) explained,
with the budget computed from this project's ``max_size`` settings. Exit status 1
when it finds a problem, so it can run in monitoring.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections

from connguard.diagnostics import doctor, status
from connguard.django import pools
from connguard.django.checks import connguard_databases
from connguard.pool import PoolConfigError


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
            raise CommandError(f"unknown database alias {alias!r}")
        try:
            max_size = {
                name: pools.pool_config(db.get("OPTIONS") or {}).max_size
                for name, db in connguard_databases().items()
            }
        except PoolConfigError as exc:
            raise CommandError(f"bad OPTIONS['pool']: {exc}") from None
        connection = connections[alias]
        connection.ensure_connection()
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
