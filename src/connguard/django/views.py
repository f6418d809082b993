"""The status view: every worker process's pools and leases, as JSON.

Mount it with ``path("connguard/", include("connguard.django.urls"))``; then
``connguard status --url https://host/connguard/status`` reads it from a terminal.
Each worker publishes its pools once a second to a directory the workers share
(:mod:`connguard.diagnostics.snapshots`; ``CONNGUARD["status_dir"]``), and the worker
that answers adds its own, taken now: the answer shows every worker of the server,
each with its pid.

Who may read it: a staff user logged in to the site (``request.user.is_staff``), or a
request carrying ``Authorization: Bearer <CONNGUARD["status_token"]>``. Anyone else
gets 403. The answer holds no password and no query string: the pools' settings, their
figures, and per lease its age, thread, request (method, path, view) and acquire site.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.urls import NoReverseMatch, reverse
from django.views.decorators.cache import never_cache

from connguard.diagnostics.snapshots import Board, Publisher, default_directory, process_snapshot

from . import pools
from .conf import app_settings

STALE_AFTER = 5.0
"""Seconds after which a worker's unrefreshed snapshot is left out (stuck or gone)."""

_publisher: Publisher | None = None


def board() -> Board:
    """The directory this server's workers share, as configured now."""
    configured = app_settings().status_dir
    if configured:
        return Board(Path(configured), stale_after=STALE_AFTER)
    site = f"{settings.SETTINGS_MODULE or ''}|{os.getcwd()}"
    return Board(default_directory(site), stale_after=STALE_AFTER)


def publisher() -> Publisher:
    """This process's publisher (one per directory setting; made on first use)."""
    global _publisher
    current = board()
    if _publisher is None or _publisher.board.directory != current.directory:
        if _publisher is not None:
            _publisher.stop()
        _publisher = Publisher(current, pools.pools)
    return _publisher


def mounted() -> bool:
    """True when the site's URLconf includes this view (``connguard:status``)."""
    try:
        reverse("connguard:status")
    except (NoReverseMatch, ImproperlyConfigured, AttributeError, ImportError):
        return False  # not mounted, or no URLconf at all (a script, a worker process)
    return True


COOKIE = "connguard_status"
"""The live page's cookie: a digest of the token, set when the page is opened with
``?token=``, so the page's own requests for the status are let in."""


def _token_digest(token: str) -> str:
    return hashlib.sha256(("connguard-status:" + token).encode()).hexdigest()


def allowed(request: HttpRequest) -> bool:
    """Staff, the configured bearer token, or the live page's cookie for it (each
    compared in constant time)."""
    user = getattr(request, "user", None)
    if user is not None and getattr(user, "is_active", False) and getattr(user, "is_staff", False):
        return True
    token = app_settings().status_token
    cookie = request.COOKIES.get(COOKIE, "")
    if token and cookie and hmac.compare_digest(cookie.encode(), _token_digest(token).encode()):
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    return (
        bool(token)
        and scheme.lower() == "bearer"
        and hmac.compare_digest(given.strip().encode(), str(token).encode())
    )


def processes() -> list[dict[str, Any]]:
    """Every worker's snapshot: this process's taken now, first; then the others'."""
    publishing = publisher()
    publishing.ensure()
    own = process_snapshot(pools.pools())
    return [own, *publishing.board.read(exclude=os.getpid())]


def _forbidden(what: str) -> HttpResponse:
    return HttpResponse(
        f"403 Forbidden: connguard {what} is for staff users, or a request with "
        "'Authorization: Bearer <CONNGUARD[\"status_token\"]>'.\n",
        status=403,
        content_type="text/plain; charset=utf-8",
    )


@never_cache
def status(request: HttpRequest) -> HttpResponse:
    """``{"taken_at": ..., "processes": [snapshot, ...]}``, this process first."""
    if not allowed(request):
        return _forbidden("status")
    return JsonResponse({"taken_at": time.time(), "processes": processes()})


@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    """Every worker's pools in Prometheus's text format (:mod:`connguard.django.metrics`);
    501 when ``prometheus_client`` is not installed."""
    if not allowed(request):
        return _forbidden("metrics")
    try:
        from .metrics import exposition  # noqa: PLC0415 - prometheus_client on demand

        body, content_type = exposition()
    except ImportError:
        return HttpResponse(
            "501 Not Implemented: connguard's Prometheus metrics need prometheus_client "
            "(pip install 'django-connguard[prometheus]').\n",
            status=501,
            content_type="text/plain; charset=utf-8",
        )
    return HttpResponse(body, content_type=content_type)


@never_cache
def health(request: HttpRequest) -> HttpResponse:
    """200 when every connguard pool of this process can serve (``ok``) or is saturated
    (``warn``), 503 when one cannot connect (``fail``): for a load balancer. The body
    is ``{"status": ...}``; staff users and the status token also get each pool's
    detail (:mod:`connguard.django.health`)."""
    from . import health as pool_health  # noqa: PLC0415

    results = pool_health.check_all()
    status = pool_health.worst(results)
    body: dict[str, Any] = {"status": status}
    if allowed(request):
        body["pools"] = [dataclasses.asdict(result) for result in results]
    return JsonResponse(body, status=503 if status == "fail" else 200)


@never_cache
def live(request: HttpRequest) -> HttpResponse:
    """The live page: every worker's pools, a chart of their last minutes, and every
    lease with its age, thread, request and acquire site; leaked and pinned leases
    highlighted. It refreshes itself from the status view every 2 s.

    Staff users, or whoever opens it once with ``?token=<status_token>``: that answer
    sets an HttpOnly cookie holding a digest of the token (never the token) and
    redirects to the page without the query, so the token stays out of the address
    bar and of later requests' logs."""
    token = app_settings().status_token
    given = request.GET.get("token")
    if given is not None:
        if not token or not hmac.compare_digest(given.encode(), token.encode()):
            return _forbidden("live page")
        response = HttpResponseRedirect(request.path)
        response.set_cookie(
            COOKIE, _token_digest(token), httponly=True, samesite="Strict",
            secure=request.is_secure(), path=request.path.rsplit("/", 1)[0] + "/",
        )  # fmt: skip
        return response
    if not allowed(request):
        return _forbidden("live page")
    page = resources.files(__package__).joinpath("live.html").read_text(encoding="utf-8")
    html = page.replace("__STATUS_URL__", json.dumps(reverse("connguard:status")))
    return HttpResponse(html, content_type="text/html; charset=utf-8")
