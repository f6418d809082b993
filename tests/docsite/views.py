"""Pages served as images, each behind a permission query: the report's site."""

import json
import zlib

from asgiref.sync import sync_to_async
from django.db import connection
from django.http import Http404, HttpResponse, JsonResponse, StreamingHttpResponse

from connguard.django import pools

from .models import Page


def _png(size: int = 50_000) -> bytes:
    # A valid PNG header followed by incompressible filler: ~50 KB on the wire.
    filler = zlib.compress(bytes(range(256)) * 4)
    body = (filler * (size // len(filler) + 1))[:size]
    return b"\x89PNG\r\n\x1a\n" + body


IMAGE = _png()


def may_view(doc_id: int, page_no: int) -> bool:
    return Page.objects.filter(document_id=doc_id, number=page_no, document__public=True).exists()


def page_image(request, doc_id: int, page_no: int):
    if not may_view(doc_id, page_no):
        raise Http404("no such page")
    return HttpResponse(IMAGE, content_type="image/png")


async def page_image_async(request, doc_id: int, page_no: int):
    allowed = await sync_to_async(may_view, thread_sensitive=False)(doc_id, page_no)
    if not allowed:
        raise Http404("no such page")
    return HttpResponse(IMAGE, content_type="image/png")


async def page_image_async_orm(request, doc_id: int, page_no: int):
    allowed = await Page.objects.filter(
        document_id=doc_id, number=page_no, document__public=True
    ).aexists()
    if not allowed:
        raise Http404("no such page")
    return HttpResponse(IMAGE, content_type="image/png")


def document_stream(request, doc_id: int):
    def chunks():
        for page_no in range(1, 4):
            yield b"page %d allowed=%d\n" % (page_no, may_view(doc_id, page_no))

    return StreamingHttpResponse(chunks(), content_type="text/plain")


def slow(request):
    ms = int(request.GET.get("ms", "200"))
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [ms / 1000])
    return HttpResponse("ok\n", content_type="text/plain")


def one_query(request):
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return HttpResponse("ok\n", content_type="text/plain")


def pool_stats(request):
    data = []
    for pool in pools.pools():
        stats = pool.stats().as_dict()
        stats["leases"] = [
            {"owner": getattr(lease.owner, "kind", None), "describe": repr(lease.owner),
             "thread": lease.thread_name}
            for lease in pool.leases()
        ]  # fmt: skip
        data.append(stats)
    return JsonResponse(json.loads(json.dumps(data, default=str)), safe=False)


def _whoami() -> dict:
    from asgiref.sync import SyncToAsync
    from django.core import signals

    from connguard.django import scopes
    from connguard.scope import current_scope

    return {
        "installed": scopes._installed,
        "contexts": len(scopes._request_contexts),
        "receivers": [repr(r) for r in signals.request_started.receivers],
        "scope": repr(current_scope()),
        "tsc": repr(SyncToAsync.thread_sensitive_context.get(None)),
    }


async def whoami(request):
    here = _whoami()
    there = await sync_to_async(_whoami, thread_sensitive=False)()
    return JsonResponse({"loop": here, "thread": there})
