"""Pages served as images, each behind a permission query: the report's site.

Also the endpoints the demo, the tests and the benchmarks need: a one-query view, a
slow view, a streaming view, async variants, and this process's pool statistics.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from typing import Any

from asgiref.sync import SyncToAsync, sync_to_async
from django.db import connection
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    JsonResponse,
    StreamingHttpResponse,
)

from connguard.django import pools
from connguard.scope import current_scope

from .models import Page


def _png(size: int = 50_000) -> bytes:
    # A valid PNG signature followed by incompressible filler: ~50 KB on the wire.
    filler = zlib.compress(bytes(range(256)) * 4)
    body = (filler * (size // len(filler) + 1))[:size]
    return b"\x89PNG\r\n\x1a\n" + body


IMAGE = _png()


def may_view(doc_id: int, page_no: int) -> bool:
    """The report's permission check: one query per image."""
    return bool(
        Page.objects.filter(document_id=doc_id, number=page_no, document__public=True).exists()
    )


def page_image(request: HttpRequest, doc_id: int, page_no: int) -> HttpResponse:
    if not may_view(doc_id, page_no):
        raise Http404("no such page")
    return HttpResponse(IMAGE, content_type="image/png")


async def page_image_async(request: HttpRequest, doc_id: int, page_no: int) -> HttpResponse:
    allowed = await sync_to_async(may_view, thread_sensitive=False)(doc_id, page_no)
    if not allowed:
        raise Http404("no such page")
    return HttpResponse(IMAGE, content_type="image/png")


async def page_image_async_orm(request: HttpRequest, doc_id: int, page_no: int) -> HttpResponse:
    allowed = await Page.objects.filter(
        document_id=doc_id, number=page_no, document__public=True
    ).aexists()
    if not allowed:
        raise Http404("no such page")
    return HttpResponse(IMAGE, content_type="image/png")


def document_stream(request: HttpRequest, doc_id: int) -> StreamingHttpResponse:
    def chunks() -> Iterator[bytes]:
        for page_no in range(1, 4):
            yield b"page %d allowed=%d\n" % (page_no, may_view(doc_id, page_no))

    return StreamingHttpResponse(chunks(), content_type="text/plain")


def slow(request: HttpRequest) -> HttpResponse:
    ms = int(request.GET.get("ms", "200"))
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [ms / 1000])
    return HttpResponse("ok\n", content_type="text/plain")


def one_query(request: HttpRequest) -> HttpResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return HttpResponse("ok\n", content_type="text/plain")


def pool_stats(request: HttpRequest) -> JsonResponse:
    """This process's pools: gauges, counters and the active leases with owners.

    Each entry names the process (``pid``): under several worker processes, a client
    polling this view adds up the latest figures of each.
    """
    data: list[dict[str, Any]] = []
    for pool in pools.pools():
        stats = pool.stats().as_dict()
        stats["pid"] = os.getpid()
        stats["leases"] = [
            {
                "owner": getattr(lease.owner, "kind", None),
                "describe": repr(lease.owner),
                "thread": lease.thread_name,
            }
            for lease in pool.leases()
        ]
        data.append(stats)
    return JsonResponse(data, safe=False)


def _whoami() -> dict[str, str]:
    return {
        "scope": repr(current_scope()),
        "request_context": repr(SyncToAsync.thread_sensitive_context.get(None)),
    }


async def whoami(request: HttpRequest) -> JsonResponse:
    """Which scope the request's code sees, on the event loop and in a pool thread."""
    here = _whoami()
    there = await sync_to_async(_whoami, thread_sensitive=False)()
    return JsonResponse({"loop": here, "thread": there})
