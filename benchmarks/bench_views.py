"""Views for ``bench_django.py``, mounted by the demo site under ``/x/`` when it runs
with ``DOCSITE_EXTRA_URLS=benchmarks.bench_views``.

``/x/guc``  like ``/one`` (one statement through ``connection.cursor()``), but the
            statement changes session state: ``set_config('app.tenant', '1', false)``
            lasts for the session, so reset policy ``"auto"`` resets the connection
            at every release.
``/x/one``  one ``SELECT 1`` (as the site's ``/one``; for ``bench_asgi.py --sync``).
``/x/async`` an async view (issue 11's async path): one query through the async ORM
            (``aexists()``, which Django runs with ``sync_to_async``) and one
            statement through ``sync_to_async``, the way async views reach the database.
"""

from __future__ import annotations

import functools
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connection, models
from django.http import HttpRequest, HttpResponse
from django.urls import path

GUC_SQL = "SELECT set_config('app.tenant', '1', false)"


def guc(request: HttpRequest) -> HttpResponse:
    with connection.cursor() as cursor:
        cursor.execute(GUC_SQL)
        cursor.fetchone()
    return HttpResponse("ok\n", content_type="text/plain")


@functools.cache
def _database_model() -> Any:
    """PostgreSQL's own catalog of databases as an unmanaged, read-only model, so the
    async ORM has a table to read without a migration. Made on first use: this
    module is also imported by bench_django.py, where Django is not set up."""

    class Database(models.Model):
        oid = models.IntegerField(primary_key=True)
        datname = models.CharField(max_length=64)

        class Meta:
            app_label = "docsite"
            managed = False
            db_table = "pg_database"

    return Database


def _select_one() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


async def async_view(request: HttpRequest) -> HttpResponse:
    found = await _database_model().objects.filter(datname="postgres").aexists()
    await sync_to_async(_select_one)()
    return HttpResponse("ok\n" if found else "none\n", content_type="text/plain")


def one(request: HttpRequest) -> HttpResponse:
    _select_one()
    return HttpResponse("ok\n", content_type="text/plain")


urlpatterns = [path("guc", guc), path("async", async_view), path("one", one)]
