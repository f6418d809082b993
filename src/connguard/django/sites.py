"""Where a lease was acquired: the first frames of the code that wanted the
connection (the view, the task), not Django's, asgiref's or connguard's machinery
that the query passed through.

Captured at every acquire as (code, offset) pairs, which cost no formatting; they
become ``file:line in function`` only when something reports them (a leak, the
status page, the toolbar panel).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from typing import Any

import asgiref
import django
from asgiref.current_thread_executor import CurrentThreadExecutor
from asgiref.sync import SyncToAsync

import connguard


def _package_dir(module: Any) -> str:
    return str(os.path.dirname(module.__file__)) + os.sep


def _installed_dirs(*names: str) -> list[str]:
    """Directories of the installed packages among ``names`` (without importing them)."""
    dirs = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.origin:
            dirs.append(os.path.dirname(spec.origin) + os.sep)
    return dirs


# Frames from these files are machinery, not the code that wanted the connection.
_MACHINERY = (
    _package_dir(django),
    _package_dir(asgiref),
    sysconfig.get_paths()["stdlib"] + os.sep,
    *_installed_dirs(
        "gunicorn",
        "uvicorn",
        "daphne",
        "twisted",
        "granian",
        "celery",
        "kombu",
        "billiard",
        "h11",
        "anyio",
        "starlette",
    ),
    *(
        os.path.join(_package_dir(connguard), part)
        for part in ("django" + os.sep, "backends" + os.sep, "pool" + os.sep, "scope.py")
    ),
)


# Each source file's verdict, decided once: a dict lookup on the file name (whose
# hash the string keeps) instead of a dozen startswith() per frame per acquire.
_MACHINERY_FILES: dict[str, bool] = {}

# Where the walk stops: the frame of Django's handler that calls the view. Above it
# are only the middleware chain, Django's handler and the server, whose frames a walk
# to the top of the stack (a view's query usually has one or two frames of user
# code, so the walk would go on looking for more) turned into objects at about 1,500
# instructions each: some 25 frames under a default middleware stack and a WSGI
# server. Found once Django's handler module is loaded (before, no request can be on
# the stack); None until then.
_HANDLER_CODE: Any = None


# The other place the walk stops: asgiref's hand-over to code ``sync_to_async`` runs,
# once that code gave a frame of its own (a sync view under ASGI, a function passed
# to sync_to_async). Above it are an executor thread's machinery (asgiref,
# concurrent.futures, threading), or, in the thread waiting in ``async_to_sync``,
# code that started an event loop. Under ASGI every query of a view runs below one:
# walking on to the top of the thread's stack made some ten frames into objects at
# every acquire. With nothing recorded yet (the code run was Django's own: the async
# ORM), the walk goes on in a thread waiting in ``async_to_sync`` (whose caller, a
# Celery task or a view, is the site) and stops in an executor's.
_HAND_OVER_CODE: Any = getattr(getattr(SyncToAsync, "thread_handler", None), "__code__", None)
_WAITING_CODE: Any = getattr(
    getattr(CurrentThreadExecutor, "run_until_future", None), "__code__", None
)


def _waiting_above(frame: Any) -> bool:
    """Whether ``frame`` (a hand-over's) runs in a thread waiting in ``async_to_sync``:
    asgiref's work item, then its executor's wait, above it."""
    item = frame.f_back
    waiting = item.f_back if item is not None else None
    return waiting is not None and waiting.f_code is _WAITING_CODE


def _handler_code() -> Any:
    global _HANDLER_CODE
    base = sys.modules.get("django.core.handlers.base")
    if base is not None:
        _HANDLER_CODE = base.BaseHandler._get_response.__code__
    return _HANDLER_CODE


def user_stack(depth: int, skip: int = 2) -> tuple[Any, ...]:
    """(code, line) pairs of the first ``depth`` frames outside Django, asgiref, the
    standard library and connguard's machinery: the view or task that queried.

    The walk starts ``skip`` frames up (2: the caller's caller). A caller that knows
    how many of connguard's own frames are above it says so: each frame walked is
    made into a Python object, about 1,500 instructions, at every acquire. It stops
    at the frame of Django's handler that called the view: a middleware above it is
    not where a view's query comes from (a query made in a middleware itself is
    still found: its frame is not under the view's); and at asgiref's hand-over to
    code run by ``sync_to_async`` (see ``_HAND_OVER_CODE``).

    Runs once per acquire (per request, not per query); a few microseconds."""
    stop = _HANDLER_CODE
    if stop is None:
        stop = _handler_code()
    hand_over = _HAND_OVER_CODE
    frame: Any = sys._getframe(skip)
    out: list[Any] = []
    walked = 0
    known = _MACHINERY_FILES
    while frame is not None and depth and walked < 80:
        code = frame.f_code
        if code is stop:
            break
        if code is hand_over and (out or not _waiting_above(frame)):
            break
        filename = code.co_filename
        machinery = known.get(filename)
        if machinery is None:
            machinery = known[filename] = filename.startswith(_MACHINERY)
        if not machinery:
            out.append(code)
            out.append(frame.f_lasti)  # made a line number only when reported
            depth -= 1
        frame = frame.f_back
        walked += 1
    return tuple(out)
