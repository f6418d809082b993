"""A scope per request, opened and ended by Django's own request signals.

``request_started`` and ``request_finished`` are sent by every handler (WSGI and
ASGI, runserver, gunicorn, uvicorn, daphne...), so this works with no middleware.
Under ASGI the receivers run through ``sync_to_async``, and asgiref carries the
context variable back into the request's task, from where it follows the request
into every thread and task it uses.
"""

from __future__ import annotations

from typing import Any

from django.core import signals

from connguard.scope import Scope, current_scope, enter, leave

_installed = False


def request_started(sender: Any, environ: Any = None, scope: Any = None, **kwargs: Any) -> None:
    stale = current_scope()
    if stale is not None and stale.kind == "request":
        # The previous request in this thread never finished (no response.close()).
        stale.end()
    if environ is not None:  # WSGI
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
    elif scope is not None:  # ASGI
        method, path = scope.get("method", ""), scope.get("path", "")
    else:
        method = path = ""
    enter(
        Scope(
            f"{method} {path}".strip() or "request",
            kind="request",
            info={"method": method, "path": path},
        )
    )


def request_finished(sender: Any, **kwargs: Any) -> None:
    current = current_scope()
    if current is not None and current.kind == "request":
        current.end()
        leave()


def install() -> None:
    """Connect the receivers (idempotent)."""
    global _installed
    if _installed:
        return
    # Ours first on request_started is not needed: Django's close_old_connections
    # only returns this thread's lease, which is what ending the scope does anyway.
    signals.request_started.connect(request_started, dispatch_uid="connguard.request_started")
    signals.request_finished.connect(request_finished, dispatch_uid="connguard.request_finished")
    _installed = True
