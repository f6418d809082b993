"""A scope per request, opened and ended by Django's own request signals.

``request_started`` and ``request_finished`` are sent by every handler (WSGI and
ASGI, runserver, gunicorn, uvicorn, daphne...), so this works with no middleware.

Under WSGI the receivers run in the request's thread and simply set the scope's
context variable. Under ASGI that is not enough: ``Signal.asend`` runs receivers in
child tasks of ``asyncio.gather``, whose context changes never reach the request's
task. What every context of the request does share is asgiref's per-request
``ThreadSensitiveContext`` (set by ``ASGIHandler``, copied into every thread and task
the request uses), so the scope is recorded against it and found through it.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

from asgiref.sync import SyncToAsync
from django.core import signals

from connguard.scope import Scope, begin, current_or_none, finish, set_ambient_lookup

logger = logging.getLogger("connguard.django")

_installed = False
_thread_sensitive_context = SyncToAsync.thread_sensitive_context


class _Requests:
    """The requests an ASGI request context serves (see ``_request_contexts``):
    ``open``, those whose ``request_finished`` has not come yet, oldest first, and
    ``last``, the newest one that has had it.

    Usually one request per context. Under HTTP/1.1 pipelining uvicorn and daphne
    start the next request from inside the previous one's last ``send()``, in a copy
    of its context, where Django 5.2's handler keeps the asgiref context it finds:
    the next request starts before the previous one has finished (Django closes its
    response, which sends ``request_finished``, after that send), and both find the
    same context. Code that looks its scope up is the newest request's (the previous
    one has sent its response). A ``request_finished`` is the oldest open request's,
    whether or not its scope has already ended: ``ConnguardMiddleware`` ends a
    streamed response's scope when the stream ends, before that last send, and a
    ``request_finished`` matched to the oldest scope not yet *ended* would end the
    next request's.

    Each step is one list operation (``append``, ``remove``), which no other thread
    splits: a request's ``request_finished`` runs in its executor thread while the
    next request starts on the event loop."""

    __slots__ = ("last", "open")

    def __init__(self, scope: Scope) -> None:
        self.open = [scope]
        self.last: Scope | None = None


# Each ASGI request's context, weakly, to its requests (``_Requests``). One weak
# reference per context whose callback (the context collected: its requests are
# over, finished or not) both forgets the entry and ends the scopes: a
# WeakKeyDictionary entry and a weakref.finalize cost some 11,000 instructions more
# per request. A reference hashes and compares as its context, so a new reference to
# it finds the entry.
_request_contexts: dict[weakref.ref[Any], _Requests] = {}


def _context_collected(ref: weakref.ref[Any]) -> None:
    # Runs in whichever thread collects the context, at any moment: a dict operation
    # and flags only, no lock (the pool's housekeeping takes back the scopes' leases
    # that are not in use, "orphaned").
    requests = _request_contexts.pop(ref, None)
    if requests is not None:
        for scope in list(requests.open):
            scope.ended = True


def asgi_request_scope() -> Scope | None:
    """The scope of the ASGI request this code runs for, if any: the newest of its
    context's (see ``_Requests``); once all have finished, the last one, ended, so
    that code still running for it in an executor thread finds it ended rather than
    falling back to its thread's scope."""
    context = _thread_sensitive_context.get(None)
    if context is None:
        return None
    requests = _request_contexts.get(weakref.ref(context))
    if requests is None:
        return None
    found = requests.open
    return found[-1] if found else requests.last


def _finish_asgi_request() -> bool:
    """End the oldest open request of this ASGI request's context (see
    ``_Requests``); False when this is not an ASGI request's code."""
    context = _thread_sensitive_context.get(None)
    if context is None:
        return False
    requests = _request_contexts.get(weakref.ref(context))
    if requests is None:
        return False
    found = requests.open
    if found:
        scope = found[0]
        requests.last = scope  # before it leaves the list: a lookup always finds one
        try:
            found.remove(scope)  # this one, whatever another thread did meanwhile
        except ValueError:  # a second request_finished for it, in another thread
            return True
        scope.end()
    return True


_publishing = False  # this process publishes its status (reset in a forked child)


def _forked() -> None:
    global _publishing
    _publishing = False


os.register_at_fork(after_in_child=_forked)


def _start_publishing() -> None:
    """A process that serves requests, on a site that mounts the status view,
    publishes its pools for whichever worker answers it (connguard.django.views);
    decided once per process. A site without the view writes nothing anywhere."""
    global _publishing
    _publishing = True
    from . import views  # noqa: PLC0415 - Django's URL and HTTP machinery, on first request

    try:
        if views.mounted():
            views.publisher().ensure()
    except Exception as exc:  # observability must never fail a request
        logger.warning("connguard: cannot publish this process's status: %s", exc)


def request_started(sender: Any, environ: Any = None, scope: Any = None, **kwargs: Any) -> None:
    if not _publishing:
        _start_publishing()
    if environ is not None:  # WSGI
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
    elif scope is not None:  # ASGI
        method, path = scope.get("method", ""), scope.get("path", "")
    else:
        method = path = ""
    opened = Scope(
        f"{method} {path}".strip() or "request", "request", {"method": method, "path": path}
    )
    begin(opened)  # ends the previous request's, if it never finished (no response.close())
    context = _thread_sensitive_context.get(None)
    if context is not None:
        # If the request never finishes (a client that hung up mid-stream: Django's
        # ASGI handler then never closes the response), the scope still ends when the
        # request's context is collected (_context_collected).
        ref = weakref.ref(context, _context_collected)
        requests = _request_contexts.get(ref)
        if requests is None:
            _request_contexts[ref] = _Requests(opened)
        else:  # a pipelined request in its predecessor's context
            requests.open.append(opened)


def request_finished(sender: Any, **kwargs: Any) -> None:
    if current_or_none() is None and _finish_asgi_request():
        return
    finish("request")
    # The ended scope stays registered against the request's context (until the
    # context is collected, as ``_Requests.last``): code still running for the
    # request in an executor thread must find it ended, not fall back to its thread's
    # scope.


def install() -> None:
    """Connect the receivers (idempotent)."""
    global _installed
    if _installed:
        return
    # Ours first on request_started is not needed: Django's close_old_connections
    # only returns this thread's lease, which is what ending the scope does anyway.
    set_ambient_lookup(asgi_request_scope)
    # Strong references (weak=False): module functions live for ever anyway, and a weak
    # one costs each request a dereference per signal.
    signals.request_started.connect(
        request_started, dispatch_uid="connguard.request_started", weak=False
    )
    signals.request_finished.connect(
        request_finished, dispatch_uid="connguard.request_finished", weak=False
    )
    _installed = True
