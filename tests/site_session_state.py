"""Probe views for issue 8 ("session state crosses from one request to the next").

Mounted by the demo site under ``/x/`` when it runs with
``DOCSITE_EXTRA_URLS=tests.site_session_state`` (see ``tests/test_handoff_servers.py``).

``/x/dirty/<kind>?tenant=N``  one statement that changes session state, through
                              ``django.db.connection.cursor()``; never cleaned up
                              here: handing the connection over clean is the pool's
                              job. ``role`` takes ``&role=<name>`` (default tenant_N).
``/x/probe``                  what the request's connection carries at its start
                              (JSON); ``?strict=1`` answers 409 instead of 200 when
                              anything differs from the baseline (``&user=<role>``:
                              the role requests should run as), and logs the finding
                              on stderr, so a load generator that keeps only statuses
                              can count foreign state.
``/x/lock_cycle?key=K&hold_ms=M``  ``pg_advisory_lock(K)`` (blocking), hold it M ms,
                              ``pg_advisory_unlock(K)``: waits forever (here: until the
                              database's ``lock_timeout``) when an idle pooled
                              connection still holds K.
``/x/rows[?tenant=N]``        the rows of ``tenant_doc`` (row-level security on the
                              ``app.tenant`` setting) this request may see; with
                              ``tenant`` the view first sets the tenant for the session
                              (``set_config(..., false)``), as a careless app would.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path

from tests.handoff_state import LOGIN_ROLE, PROBE_FIELDS, PROBE_SQL, foreign_state

_ROLE = re.compile(r"[a-z_][a-z0-9_]*\Z")


def _tenant(request: HttpRequest) -> int:
    return int(request.GET.get("tenant", "1"))


def _dirty_sql(kind: str, tenant: int, role: str | None) -> tuple[str, list[Any] | None]:
    n = tenant
    if kind == "search_path":
        return f"SET search_path TO tenant_{n}, public", None
    if kind == "role":
        name = role or f"tenant_{n}"
        if not _ROLE.match(name):
            raise ValueError(f"bad role name {name!r}")
        return f"SET ROLE {name}", None
    if kind == "statement_timeout":
        return "SET statement_timeout = 12345", None
    if kind == "guc":
        return "SELECT set_config('app.tenant', %s, false)", [str(n)]
    if kind == "temp":
        return f"CREATE TEMP TABLE leak_{n} (id int)", None
    if kind == "advisory":
        return "SELECT pg_advisory_lock(%s)", [n]  # session-level, not the try form
    if kind == "listen":
        return f"LISTEN chan_{n}", None
    if kind == "prepare":
        return f"PREPARE p_{n} AS SELECT 1", None
    if kind == "reset_role":
        return "RESET ROLE", None
    if kind == "withhold":
        return f"DECLARE c_{n} CURSOR WITH HOLD FOR SELECT 1", None
    raise ValueError(f"unknown kind {kind!r}")


def dirty(request: HttpRequest, kind: str) -> JsonResponse:
    sql, params = _dirty_sql(kind, _tenant(request), request.GET.get("role"))
    with connection.cursor() as cursor:
        if params is None:
            cursor.execute(sql)
        else:
            cursor.execute(sql, params)
    return JsonResponse({"kind": kind, "worker": os.getpid()})


def probe(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute(PROBE_SQL)
        row = cursor.fetchone()
    data: dict[str, Any] = dict(zip(PROBE_FIELDS, row, strict=True))
    data["worker"] = os.getpid()
    status = 200
    if request.GET.get("strict") == "1":
        foreign = foreign_state(data, request.GET.get("user", LOGIN_ROLE))
        if foreign:
            status = 409
            print(f"FOREIGN-STATE {json.dumps(foreign)}", file=sys.stderr, flush=True)
    return JsonResponse(data, status=status)


def lock_cycle(request: HttpRequest) -> JsonResponse:
    key = int(request.GET.get("key", "1"))
    hold = int(request.GET.get("hold_ms", "0")) / 1000
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
        cursor.execute("SELECT pg_advisory_lock(%s)", [key])
        if hold:
            cursor.execute("SELECT pg_sleep(%s)", [hold])
        cursor.execute("SELECT pg_advisory_unlock(%s)", [key])
        unlocked = cursor.fetchone()[0]
    return JsonResponse({"backend": backend, "unlocked": unlocked, "worker": os.getpid()})


def rows(request: HttpRequest) -> HttpResponse:
    with connection.cursor() as cursor:
        if "tenant" in request.GET:
            cursor.execute("SELECT set_config('app.tenant', %s, false)", [request.GET["tenant"]])
        cursor.execute("SELECT tenant, body FROM tenant_doc ORDER BY tenant, body")
        found = [list(r) for r in cursor.fetchall()]
    return JsonResponse({"rows": found, "worker": os.getpid()})


urlpatterns = [
    path("dirty/<str:kind>", dirty),
    path("probe", probe),
    path("lock_cycle", lock_cycle),
    path("rows", rows),
]
