"""Views for ``bench_django.py``, mounted by the demo site under ``/x/`` when it runs
with ``DOCSITE_EXTRA_URLS=benchmarks.bench_views``.

``/x/guc``  like ``/one`` (one statement through ``connection.cursor()``), but the
            statement changes session state: ``set_config('app.tenant', '1', false)``
            lasts for the session, so reset policy ``"auto"`` resets the connection
            at every release.
"""

from __future__ import annotations

from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.urls import path

GUC_SQL = "SELECT set_config('app.tenant', '1', false)"


def guc(request: HttpRequest) -> HttpResponse:
    with connection.cursor() as cursor:
        cursor.execute(GUC_SQL)
        cursor.fetchone()
    return HttpResponse("ok\n", content_type="text/plain")


urlpatterns = [path("guc", guc)]
