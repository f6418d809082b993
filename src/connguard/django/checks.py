"""System checks (``manage.py check``) for connguard's settings.

IDs are stable; each message names the setting and the allowed values.

| id | problem |
|---|---|
| connguard.E001 | ``OPTIONS["pool"]`` is neither a dict nor True |
| connguard.E002 | unknown key in ``OPTIONS["pool"]`` (a typo, or a psycopg_pool-only setting) |
| connguard.E003 | a pool setting has a value outside its allowed range |
| connguard.E004 | ``min_size`` greater than ``max_size`` |
| connguard.E005 | no PostgreSQL driver installed (psycopg 3 or psycopg2) |
| connguard.W001 | ``CONN_MAX_AGE`` is set but has no effect under connguard |
| connguard.W002 | ``ConnguardMiddleware`` missing from ``MIDDLEWARE`` |
| connguard.W003 | ``ConnguardMiddleware`` is not first in ``MIDDLEWARE`` |
| connguard.I001 | ``CONN_HEALTH_CHECKS`` is redundant: the pool checks every checkout |
"""

from __future__ import annotations

import importlib.util
from typing import Any

from django.conf import settings
from django.core import checks

from connguard.pool import PoolConfig, PoolConfigError

from .pools import pool_config

MIDDLEWARE_PATH = "connguard.django.middleware.ConnguardMiddleware"


def connguard_databases() -> dict[str, dict[str, Any]]:
    return {
        alias: db
        for alias, db in getattr(settings, "DATABASES", {}).items()
        if str(db.get("ENGINE", "")).startswith("connguard.backends.")
    }


@checks.register("connguard")
def check_databases(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    messages: list[checks.CheckMessage] = []
    databases = connguard_databases()
    for alias, db in databases.items():
        where = f"DATABASES[{alias!r}]"
        options = db.get("OPTIONS") or {}
        try:
            pool_config(options)
        except PoolConfigError as exc:
            if exc.setting == "pool":
                cid, hint = "E001", "Use a dict such as {'min_size': 1, 'max_size': 10}."
            elif exc.setting not in PoolConfig.settings():
                cid, hint = "E002", f"Allowed keys: {', '.join(PoolConfig.settings())}."
            elif "must not exceed" in str(exc):
                cid, hint = "E004", "Lower min_size or raise max_size."
            else:
                cid, hint = "E003", "See docs/django.md for each setting's allowed values."
            messages.append(checks.Error(f"{where}: {exc}", hint=hint, id=f"connguard.{cid}"))
        max_age = db.get("CONN_MAX_AGE", 0)
        if max_age != 0:
            messages.append(
                checks.Warning(
                    f"{where}['CONN_MAX_AGE'] = {max_age!r} has no effect with connguard: "
                    "connections go back to the pool when each request ends.",
                    hint="Remove it (or set 0); use OPTIONS['pool'] 'max_lifetime' and "
                    "'max_idle' to bound how long physical connections live.",
                    id="connguard.W001",
                )
            )
        if db.get("CONN_HEALTH_CHECKS"):
            messages.append(
                checks.Info(
                    f"{where}['CONN_HEALTH_CHECKS'] is redundant with connguard: every "
                    "checkout gets a liveness test, and a round-trip ping after "
                    "'ping_after_idle' seconds idle.",
                    id="connguard.I001",
                )
            )
    if databases and not any(importlib.util.find_spec(name) for name in ("psycopg", "psycopg2")):
        messages.append(
            checks.Error(
                "No PostgreSQL driver is installed for connguard.backends.postgresql.",
                hint="pip install 'django-connguard[psycopg]' (or [psycopg2]).",
                id="connguard.E005",
            )
        )
    return messages


@checks.register("connguard")
def check_middleware(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    if not connguard_databases():
        return []
    middleware = list(getattr(settings, "MIDDLEWARE", None) or [])
    if MIDDLEWARE_PATH not in middleware:
        return [
            checks.Warning(
                f"{MIDDLEWARE_PATH} is not in MIDDLEWARE: connections come back only when "
                "each request finishes (after a slow client read the response), and pool "
                "overload shows as HTTP 500 instead of 503.",
                hint=f"Add {MIDDLEWARE_PATH!r} first in MIDDLEWARE.",
                id="connguard.W002",
            )
        ]
    if middleware.index(MIDDLEWARE_PATH) != 0:
        return [
            checks.Warning(
                f"{MIDDLEWARE_PATH} is not first in MIDDLEWARE: connections taken by the "
                "middleware before it are not covered, and their errors cannot become 503.",
                hint="Move it to the top of MIDDLEWARE.",
                id="connguard.W003",
            )
        ]
    return []
