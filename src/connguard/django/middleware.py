"""``ConnguardMiddleware``: give connections back as soon as the response is ready,
and turn pool overload or a database outage into a fast HTTP 503 that says which.

Put it first in ``MIDDLEWARE``. Without it connections still come back when the
request finishes (Django's ``request_finished`` signal), but that is after a slow
client has read the whole response; with it they come back before the first byte is
sent. A streaming response that queries later simply acquires again; a connection
with a transaction or a server-side cursor open (a ``QuerySet.iterator()`` export
being streamed) stays with the request until it finishes.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core.signals import got_request_exception
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse

from connguard.pool import ConnectFailed, PoolError, PoolRefused, PoolTimeout
from connguard.pool.errors import chain
from connguard.scope import Scope, current_scope

from .conf import app_settings

_UNAVAILABLE_ATTR = "_connguard_unavailable"


def unavailable_error(exc: BaseException | None) -> PoolError | None:
    """The pool error behind ``exc`` that makes the site unavailable, if there is one:
    overload (``PoolTimeout``), refusal (``PoolRefused``) or an unreachable database
    (``ConnectFailed``).

    Django wraps the pool's error in its own ``OperationalError``, so walk the chain.
    """
    for cause in chain(exc, limit=10):
        if isinstance(cause, PoolTimeout | PoolRefused):
            return cause
    return None


def _note_exception(sender: Any, request: HttpRequest | None = None, **kwargs: Any) -> None:
    """Django turns a view's exception into a 500 before outer middleware sees it;
    remember a pool error on the request so the middleware can answer 503 instead."""
    found = unavailable_error(sys.exc_info()[1])
    if found is not None and request is not None:
        setattr(request, _UNAVAILABLE_ATTR, found)


got_request_exception.connect(_note_exception, dispatch_uid="connguard.note_exception")

CAUSE_HEADER = "Connguard-Cause"
"""Response header naming why a 503 was sent: ``overloaded``, ``refused`` or
``unreachable`` (see :func:`unavailable_response`)."""


def unavailable_response(error: PoolError) -> HttpResponse:
    """A 503 that says why, with ``Retry-After``.

    * ``unreachable`` (``ConnectFailed``): the pool needed a connection and could not
      open one (at the request's ``timeout``, or at once when ``max_waiting`` requests
      already wait during the outage). Nothing is wrong with this server's load; the
      database (or the way to it) is down. ``Retry-After`` is
      ``CONNGUARD["outage_retry_after"]``.
    * ``refused`` (``PoolRefused``): ``max_waiting`` requests already wait and the
      database is not known to be down; refused at once. ``Retry-After`` is
      ``CONNGUARD["retry_after"]``.
    * ``overloaded`` (``PoolTimeout``): every connection stayed busy for ``timeout``
      seconds. ``Retry-After`` is ``CONNGUARD["retry_after"]``.
    """
    conf = app_settings()
    if isinstance(error, ConnectFailed):
        cause, retry_after = "unreachable", conf.outage_retry_after
        text = "the database behind connection pool {pool!r} is unreachable; retry later."
    elif isinstance(error, PoolRefused):
        cause, retry_after = "refused", conf.retry_after
        text = (
            "the database connection pool {pool!r} is overloaded: too many requests "
            "already wait for a connection; retry shortly."
        )
    else:
        cause, retry_after = "overloaded", conf.retry_after
        text = (
            "the database connection pool {pool!r} is overloaded: no connection was "
            "free in time; retry shortly."
        )
    response = HttpResponse(
        "503 Service Unavailable: " + text.format(pool=error.pool) + "\n",
        status=503,
        content_type="text/plain; charset=utf-8",
    )
    response["Retry-After"] = str(retry_after)
    response[CAUSE_HEADER] = cause
    return response


# Each view's name, made once: a site has a few hundred views at most, and making the
# name (three attribute lookups and a format) at every request costs more than the
# lookup here. Bounded all the same (views made on the fly would otherwise pile up).
_VIEW_NAMES: dict[Any, str] = {}
_VIEW_NAMES_MAX = 4096


def _view_name(view_func: Any) -> str:
    try:
        return _VIEW_NAMES[view_func]
    except (KeyError, TypeError):  # TypeError: an unhashable callable
        pass
    func = getattr(view_func, "view_class", view_func)
    name = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"
    if len(_VIEW_NAMES) < _VIEW_NAMES_MAX:
        try:
            _VIEW_NAMES[view_func] = name
        except TypeError:
            pass
    return name


class ConnguardMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)
            # A coroutine, so Django's async handler does not hop to a thread for it.
            self.process_view: Callable[..., Any] = self._aprocess_view
        else:
            self.process_view = self._process_view

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        return self._finish(request, self.get_response(request))

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = await self.get_response(request)
        return self._finish(request, response)

    def _process_view(
        self, request: HttpRequest, view_func: Any, view_args: Any, view_kwargs: Any
    ) -> None:
        scope = current_scope()
        if scope is not None and scope.kind == "request":
            scope.info["view"] = _view_name(view_func)

    async def _aprocess_view(
        self, request: HttpRequest, view_func: Any, view_args: Any, view_kwargs: Any
    ) -> None:
        self._process_view(request, view_func, view_args, view_kwargs)

    def _finish(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        error = getattr(request, _UNAVAILABLE_ATTR, None)
        if error is not None and response.status_code >= 500:
            response = unavailable_response(error)
        scope = current_scope()
        if scope is not None and scope.kind == "request":
            scope.release_all(early=True)
            if isinstance(response, StreamingHttpResponse):
                _end_with_stream(response, scope)
        return response


def _end_with_stream(response: StreamingHttpResponse, scope: Scope) -> None:
    """End the request's scope when its stream ends, however it ends.

    Django ends the scope through ``request_finished`` when it closes the response,
    but under ASGI an exception raised while streaming (a chunk's query timing out)
    escapes the handler: the response is never closed and the scope, with the
    connections taken for the stream, would stay open. Ending it here, in the
    stream's own ``finally``, gives them back (ending twice does nothing).
    """
    content = response.streaming_content
    if response.is_async:

        async def aended() -> AsyncIterator[Any]:
            try:
                async for part in content:
                    yield part
            finally:
                scope.end()

        response.streaming_content = aended()
    else:

        def ended() -> Iterator[Any]:
            try:
                yield from content
            finally:
                scope.end()

        response.streaming_content = ended()


__all__ = ["CAUSE_HEADER", "ConnguardMiddleware", "unavailable_error", "unavailable_response"]
