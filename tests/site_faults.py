"""Probe view for the fault tests (``tests/test_fault_servers.py``, issue 10).

Mounted by the demo site under ``/x/`` when the server runs with
``DOCSITE_EXTRA_URLS=tests.site_faults``.

``/x/one?rid=N``    one small query (``SELECT pg_backend_pid()``); answers ``ok <pid>``.
                    When the query fails, one line ``fault-probe: rid=N <error>`` goes to
                    stderr (the server's log) and the error is re-raised, so Django and
                    ``ConnguardMiddleware`` answer as they would for any view: the test
                    then knows why each request failed, not only that it got a 500.
``/x/lockwait``     in a transaction: lock row 1 of ``fault_rows`` (UPDATE), then
                    ``SELECT`` row 2 ``FOR UPDATE``, which blocks while a test's own
                    session holds row 2; a failure is logged as for ``/x/one``.
``/x/tenant?hold=P``  an async view that sets a session setting (the docs' tenant pattern,
                    ``set_config(..., false)``: reset policy "auto" resets the connection
                    at its release), then holds its response until the file ``P`` exists
``/x/query?hold=P``   the same with a plain query (no session state changed)
``/x/nodb``         an async view that touches no database: answers at once unless the
                    event loop is blocked
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from asgiref.sync import sync_to_async
from django.db import connection, transaction
from django.http import HttpRequest, HttpResponse
from django.urls import path

MARKER = "fault-probe:"


def _first_line(exc: BaseException) -> str:
    return next((part.strip() for part in str(exc).splitlines() if part.strip()), "")


def one(request: HttpRequest) -> HttpResponse:
    rid = request.GET.get("rid", "-")
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            row = cursor.fetchone()
    except BaseException as exc:
        chain = exc.__cause__ or exc.__context__
        cause = f" (from {type(chain).__name__}: {_first_line(chain)})" if chain else ""
        sys.stderr.write(f"{MARKER} rid={rid} {type(exc).__name__}: {_first_line(exc)}{cause}\n")
        sys.stderr.flush()
        raise
    return HttpResponse(f"ok {row[0] if row else '?'}\n", content_type="text/plain")


def lockwait(request: HttpRequest) -> HttpResponse:
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("UPDATE fault_rows SET v = v + 1 WHERE id = 1")
            cursor.execute("SELECT v FROM fault_rows WHERE id = 2 FOR UPDATE")
            row = cursor.fetchone()
    except BaseException as exc:
        sys.stderr.write(f"{MARKER} lockwait {type(exc).__name__}: {_first_line(exc)}\n")
        sys.stderr.flush()
        raise
    return HttpResponse(f"ok {row[0] if row else '?'}\n", content_type="text/plain")


def _run(sql: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        row = cursor.fetchone()
    return int(row[-1])


async def _held(request: HttpRequest, sql: str) -> HttpResponse:
    pid = await sync_to_async(_run)(sql)
    hold = Path(request.GET["hold"])
    deadline = time.monotonic() + 30.0
    while not hold.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return HttpResponse(f"ok {pid}\n", content_type="text/plain")


async def tenant(request: HttpRequest) -> HttpResponse:
    return await _held(request, "SELECT set_config('app.tenant', '7', false), pg_backend_pid()")


async def query(request: HttpRequest) -> HttpResponse:
    return await _held(request, "SELECT pg_backend_pid()")


async def nodb(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok\n", content_type="text/plain")


urlpatterns = [
    path("one", one),
    path("lockwait", lockwait),
    path("tenant", tenant),
    path("query", query),
    path("nodb", nodb),
]
