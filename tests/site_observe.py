"""Probe views for the live page's test (``tests/test_status_servers.py``).

Mounted by the demo site under ``/x/`` when the server runs with
``DOCSITE_EXTRA_URLS=tests.site_observe``.

``/x/leak``  starts a thread that takes a connection and never gives it back (until
             the server stops): a deliberate leak, acquired at :data:`LEAK_LINE`
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


LEAK_LINE = 22  # the line of ensure_connection() above (checked by the test)


def leak(request: HttpRequest) -> HttpResponse:
    thread = threading.Thread(target=_hold, name="leaky-worker", daemon=True)
    thread.start()
    return HttpResponse("leaking\n", content_type="text/plain")


urlpatterns = [path("leak", leak)]
