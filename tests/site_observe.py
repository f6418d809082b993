"""Probe views for the live page's test (``tests/test_status_servers.py``).

Mounted by the demo site under ``/x/`` when the server runs with
``DOCSITE_EXTRA_URLS=tests.site_observe``.

``/x/leak``  starts a thread that takes a connection and never gives it back (until
             the server stops): a deliberate leak, acquired at :data:`LEAK_LINE`
``/x/hold``  waits for PostgreSQL advisory lock :data:`GATE`, which the test holds:
             the request's lease stays out until the test lets it go (no timing)
"""

from __future__ import annotations

import threading

from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.urls import path

_forever = threading.Event()


def _hold() -> None:
    connection.ensure_connection()  # LEAK_LINE: the acquire site the page must show
    _forever.wait()


# The line of ensure_connection() above, the acquire site the live page must show.
LEAK_LINE = _hold.__code__.co_firstlineno + 1


def leak(request: HttpRequest) -> HttpResponse:
    thread = threading.Thread(target=_hold, name="leaky-worker", daemon=True)
    thread.start()
    return HttpResponse("leaking\n", content_type="text/plain")


GATE = 71_042  # the advisory lock /x/hold waits for


def hold(request: HttpRequest) -> HttpResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s), pg_advisory_unlock(%s)", [GATE, GATE])
    return HttpResponse("held\n", content_type="text/plain")


urlpatterns = [path("leak", leak), path("hold", hold)]
