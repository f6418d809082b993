"""Probe views for the hang-up and export tests (``tests/test_hangup_servers.py``).

Mounted by the demo site under ``/x/`` when the server runs with
``DOCSITE_EXTRA_URLS=tests.site_hangups``.

``/x/async-slow?ms=N``               an async view whose query (``pg_sleep``) runs in
                                     ``sync_to_async(thread_sensitive=False)``: an
                                     executor thread, not the request's thread
``/x/astream-slow?ms=N&chunks=K``    an async streaming response: ``start`` at once,
                                     then one line per chunk, each chunk's query in
                                     ``sync_to_async(thread_sensitive=False)``
``/x/export?doc=D&rows=N&chunk=C``   a sync streaming export of ``QuerySet.iterator()``
                                     (a server-side cursor), started in the view as an
                                     export that peeks at its first row does; the
                                     last line carries the row count and the sum
``/x/one``                           one quick query
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
from collections.abc import AsyncIterator, Iterator

from asgiref.sync import sync_to_async
from django.db import connection
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import path

from connguard.demo.site.models import Page

MARKER = "hangup-probe:"
"""Starts each line these views write to stderr (the server's log) when their database
work fails. Under ASGI nobody else reports it: the view of a client that hung up was
cancelled, and a streaming response's exception escapes Django's handler, whose
server logger the demo site's ``LOGGING`` disables."""


# The demo site's LOGGING (a dictConfig that keeps disable_existing_loggers) silences
# the servers' own loggers, where an exception escaping Django's handler is reported.
for _name in ("uvicorn.error", "daphne.server", "daphne.http_protocol"):
    logging.getLogger(_name).disabled = False


def _first_line(exc: BaseException) -> str:
    return next((part.strip() for part in str(exc).splitlines() if part.strip()), "")


def _report(where: str, exc: BaseException) -> None:
    detail = _first_line(exc)
    chain = exc.__cause__ or exc.__context__
    cause = f" (from {type(chain).__name__}: {_first_line(chain)})" if chain else ""
    sys.stderr.write(
        f"{MARKER} {where} in {threading.current_thread().name}: "
        f"{type(exc).__name__}: {detail}{cause}\n"
    )
    sys.stderr.flush()


def _sleep(ms: int) -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(%s), pg_backend_pid()", [ms / 1000])
            row = cursor.fetchone()
    except BaseException as exc:
        _report(f"pg_sleep({ms / 1000})", exc)
        raise
    return str(row[1] if row else "")


async def async_slow(request: HttpRequest) -> HttpResponse:
    ms = int(request.GET.get("ms", "1000"))
    pid = await sync_to_async(_sleep, thread_sensitive=False)(ms)
    return HttpResponse(f"slept {ms} ms on backend {pid}\n", content_type="text/plain")


async def astream_slow(request: HttpRequest) -> StreamingHttpResponse:
    ms = int(request.GET.get("ms", "1000"))
    chunks = int(request.GET.get("chunks", "3"))

    async def body() -> AsyncIterator[bytes]:
        yield b"start\n"
        for i in range(chunks):
            pid = await sync_to_async(_sleep, thread_sensitive=False)(ms)
            yield f"chunk {i} backend {pid}\n".encode()
        yield b"end\n"

    return StreamingHttpResponse(body(), content_type="text/plain")


def export(request: HttpRequest) -> StreamingHttpResponse:
    document = int(request.GET["doc"])  # its pages are inserted by the test's fixture
    rows = int(request.GET.get("rows", "1000"))
    chunk = int(request.GET.get("chunk", "100"))
    numbers = (
        Page.objects.filter(document_id=document, number__lte=rows)
        .order_by("number")
        .values_list("number", flat=True)
        .iterator(chunk_size=chunk)
    )
    # Peek at the first row before the response exists (a header, a file name...):
    # the server-side cursor is declared under the request's first lease.
    first = next(numbers, None)

    def lines() -> Iterator[bytes]:
        count = total = 0
        head = [] if first is None else [first]
        try:
            for number in itertools.chain(head, numbers):
                count += 1
                total += number
                yield b"%d\n" % number
        except BaseException as exc:
            _report(f"export after {count} rows", exc)
            raise
        yield b"end rows=%d sum=%d\n" % (count, total)

    return StreamingHttpResponse(lines(), content_type="text/plain")


def one(request: HttpRequest) -> HttpResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return HttpResponse("ok\n", content_type="text/plain")


urlpatterns = [
    path("async-slow", async_slow),
    path("astream-slow", astream_slow),
    path("export", export),
    path("one", one),
]
