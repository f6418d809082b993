"""System checks (``manage.py check``) for connguard's settings.

IDs are stable; each message names the setting and the allowed values.

| id | problem |
|---|---|
| connguard.E001 | ``OPTIONS["pool"]`` is not a dict, True or False |
| connguard.E002 | unknown key in ``OPTIONS["pool"]`` (a typo, or a psycopg_pool-only setting) |
| connguard.E003 | a pool setting has a value outside its allowed range |
| connguard.E004 | ``min_size`` greater than ``max_size`` |
| connguard.E005 | no PostgreSQL driver installed (psycopg 3 or psycopg2) |
| connguard.E006 | the ``CONNGUARD`` setting is not a dict |
| connguard.E007 | unknown key in ``CONNGUARD`` (a typo: the hint suggests the closest key) |
| connguard.E008 | a ``CONNGUARD`` value of the wrong type or outside its allowed range |
| connguard.E009 | the interpreter runs without the GIL (free-threaded): the fence needs it |
| connguard.W001 | ``CONN_MAX_AGE`` is set but has no effect under connguard |
| connguard.W002 | ``ConnguardMiddleware`` missing from ``MIDDLEWARE`` |
| connguard.W003 | ``ConnguardMiddleware`` is not first in ``MIDDLEWARE`` |
| connguard.W004 | connguard-only keys in ``OPTIONS["pool"]`` under another ``ENGINE`` |
| connguard.I001 | ``CONN_HEALTH_CHECKS`` is redundant: the pool checks every checkout |
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from typing import Any, Final

from django.conf import settings
from django.core import checks

from connguard.pool import PoolConfig, PoolConfigError

from . import conf
from .pools import pool_config

MIDDLEWARE_PATH = "connguard.django.middleware.ConnguardMiddleware"
ENGINE = "connguard.backends.postgresql"

PSYCOPG_POOL_PARAMETERS: Final = frozenset(
    {
        "conninfo", "connection_class", "kwargs", "min_size", "max_size", "open",
        "configure", "check", "reset", "name", "close_returns", "timeout", "max_waiting",
        "max_lifetime", "max_idle", "reconnect_timeout", "reconnect_failed", "num_workers",
    }
)  # fmt: skip
"""The keyword parameters of ``psycopg_pool.ConnectionPool`` (as of psycopg_pool 3.3;
tests/test_checks.py compares them with the installed one): all that Django's native
pool can take in ``OPTIONS["pool"]``, which it passes on as they are. A
:class:`PoolConfig` setting not among them is connguard-only (``connguard.W004``)."""

_PROBLEM_IDS: Final[Mapping[conf.ProblemKind, str]] = {
    "not_a_dict": "connguard.E006",
    "unknown_key": "connguard.E007",
    "bad_value": "connguard.E008",
}


def is_connguard_engine(engine: object) -> bool:
    return str(engine or "").startswith("connguard.backends.")


def connguard_databases() -> dict[str, dict[str, Any]]:
    return {
        alias: db
        for alias, db in getattr(settings, "DATABASES", {}).items()
        if is_connguard_engine(db.get("ENGINE"))
    }


def connguard_only_pool_keys(pool: Mapping[Any, Any]) -> dict[str, str]:
    """The keys (and values) of ``OPTIONS["pool"]`` that only connguard understands,
    each with why psycopg_pool cannot take it."""
    found: dict[str, str] = {}
    for key, value in pool.items():
        if not isinstance(key, str):
            continue
        if key in PoolConfig.settings() and key not in PSYCOPG_POOL_PARAMETERS:
            found[key] = "a connguard setting"
        elif key == "reset" and value is not None and not callable(value):
            found[key] = f"{value!r} is a connguard reset policy; psycopg_pool wants a callable"
        elif key in ("max_lifetime", "max_idle") and value is None:
            found[key] = "None (never) is connguard's; psycopg_pool wants a number"
    return found


def connguard_setting_messages(raw: object) -> list[checks.CheckMessage]:
    """``connguard.E006``-``E008`` for a value of the ``CONNGUARD`` setting."""
    return [
        checks.Error(problem.message, hint=problem.hint, id=_PROBLEM_IDS[problem.kind])
        for problem in conf.validate(raw)
    ]


def misplaced_pool_key_messages(databases: Mapping[str, Any]) -> list[checks.CheckMessage]:
    """``connguard.W004`` for each database not on connguard's ENGINE whose
    ``OPTIONS["pool"]`` holds connguard-only keys."""
    messages: list[checks.CheckMessage] = []
    for alias, db in databases.items():
        if not isinstance(db, Mapping) or is_connguard_engine(db.get("ENGINE")):
            continue
        options = db.get("OPTIONS")
        pool = options.get("pool") if isinstance(options, Mapping) else None
        if not isinstance(pool, Mapping):
            continue
        found = connguard_only_pool_keys(pool)
        if not found:
            continue
        listed = "; ".join(f"{key!r} ({why})" for key, why in found.items())
        messages.append(
            checks.Warning(
                f"DATABASES[{alias!r}]['OPTIONS']['pool'] has connguard-only settings but "
                f"ENGINE is {db.get('ENGINE')!r}, whose pool (psycopg_pool) does not accept "
                f"them: {listed}. The first connection fails with a TypeError.",
                hint=f"Set ENGINE to {ENGINE!r} to use connguard's pool, or remove "
                f"{', '.join(map(repr, found))}.",
                id="connguard.W004",
            )
        )
    return messages


@checks.register("connguard")
def check_connguard_setting(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    if not hasattr(settings, conf.SETTING):
        return []
    return connguard_setting_messages(getattr(settings, conf.SETTING))


@checks.register("connguard")
def check_misplaced_pool_keys(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    return misplaced_pool_key_messages(getattr(settings, "DATABASES", {}))


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


def interpreter_messages(gil_enabled: bool) -> list[checks.CheckMessage]:
    """The fence's uses take no lock: they count on the GIL (see ``Lease.enter``)."""
    if gil_enabled:
        return []
    return [
        checks.Error(
            "connguard needs the GIL, and this free-threaded interpreter runs without it: "
            "a release and a use of the same connection could miss each other.",
            hint="Run with the GIL on (PYTHON_GIL=1 or python -X gil=1), or use a "
            "standard (not free-threaded) build of Python.",
            id="connguard.E009",
        )
    ]


@checks.register("connguard")
def check_interpreter(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    is_gil_enabled = getattr(sys, "_is_gil_enabled", None)  # 3.13+
    return interpreter_messages(is_gil_enabled is None or bool(is_gil_enabled()))
