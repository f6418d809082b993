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
"""

from __future__ import annotations

import sys

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


urlpatterns = [path("one", one), path("lockwait", lockwait)]
