"""Who owns a lease: a unit of work (request, task, job), not a thread.

Django keeps one connection per thread, and under ASGI a request's code runs in
threads that die or are reused with the connection still checked out. connguard
ties each lease to a :class:`Scope` held in a :class:`~contextvars.ContextVar`, so
ownership follows the request through ``sync_to_async``, thread pools, async tasks
and threads started with the request's context; ending the scope gives back every
lease taken inside it, whichever thread took it and whichever thread ends it.

Code outside any scope (a thread you started yourself, a shell) gets an implicit
*thread scope* that ends when the thread dies, so a dead thread never keeps a
connection.

The scope records leases only; what "done" means is decided by the layer above
(the Django layer ends a request's scope when the response is ready or the request
finishes). A later "transaction" policy (give the connection back whenever it is
idle outside a transaction) needs no change here: it releases leases early and the
scope simply has fewer to end.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any, ParamSpec, TypeVar

from .pool import Lease

logger = logging.getLogger("connguard.scope")

P = ParamSpec("P")
R = TypeVar("R")

_ids = itertools.count(1)


def _forget(held: list[weakref.ref[Lease]], ref: weakref.ref[Lease]) -> None:
    """Remove ``ref`` from a scope's list; another thread may have removed it first."""
    try:
        held.remove(ref)
    except ValueError:
        pass


class Scope:
    """A unit of work that owns leases.

    Thread-safe without a lock: leases may be added from any thread that runs in the
    scope's context, and :meth:`end` may be called from any thread. The leases are a
    list of weak references, and each of the list's operations used here (append,
    remove, a copy) is one call into C that no other thread can interleave with;
    what spans two steps is argued where it happens (:meth:`add`, :meth:`end`).
    """

    __slots__ = (
        "_held", "ended", "id", "info", "journal", "kind", "name", "parent", "started_at"
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        kind: str = "scope",
        info: dict[str, Any] | None = None,
        parent: Scope | None = None,
    ) -> None:
        self.id = next(_ids)
        # The scope this one was opened inside (a ``connguard.scope`` block in a view,
        # in a management command's thread), if any: code in this one may go on using
        # the connection that one holds (see :func:`encloses`).
        self.parent = parent
        self.name = name
        self.kind = kind  # "request", "thread", "scope" (user-opened), ...
        self.info: dict[str, Any] = info if info is not None else {}  # method, path, view...
        self.started_at = time.monotonic()
        self.ended = False
        # Weak: a scope never keeps alive a lease its holder dropped (the pool's
        # backstop takes those back and says where they were acquired). A plain list
        # of weak references, not a WeakSet: a scope holds one or two leases, and a
        # WeakSet costs microseconds per request to make and to empty (a set, about
        # 1,000 instructions more than a list). A live reference equals another to
        # the same lease, a dead one only itself, so removing one never removes
        # another lease's; it is read through a copy, never iterated in place (an
        # item removed meanwhile would make the walk skip the next).
        self._held: list[weakref.ref[Lease]] = []
        # When a tool watches this scope (the debug-toolbar panel), a list it reads
        # back: each lease taken in the scope, with the alias and how long the taker
        # waited. None (the default) costs the acquire path one attribute read.
        self.journal: list[dict[str, Any]] | None = None

    def add(self, lease: Lease) -> None:
        """Record ``lease`` as owned by this scope.

        Adding to an ended scope releases the lease at once: work that outlives its
        scope must not keep a connection nobody will return. The lease is recorded
        first and ``ended`` read after: :meth:`end` sets ``ended`` first and reads
        the list after, so of the two threads at least one sees the lease and
        releases it (releasing twice does nothing).

        Leases given back are forgotten here, not at their release (which costs the
        scope nothing): once the list holds eight, those no longer active go. A scope
        that acquires again and again (a thread's, a long task's, a request under
        transaction-level release) keeps a list about as large as what it holds.
        """
        held = self._held
        held.append(weakref.ref(lease))
        if self.ended:
            lease.release()
            return
        if len(held) >= 8:
            for ref in list(held):
                kept = ref()
                if kept is None or not kept.active:  # never active again
                    _forget(held, ref)

    def leases(self) -> list[Lease]:
        return [lease for ref in list(self._held) if (lease := ref()) is not None and lease.active]

    def release_all(self, *, early: bool = False) -> int:
        """Give back every lease taken in the scope; the scope stays open.

        Returns how many were still active. Their holders re-acquire transparently
        on next use (the Django layer checks the lease before every use). ``early``
        (the response is ready but the request is not over): keep the leases that are
        pinned, with a transaction or a server-side cursor open; taking those away
        would break a streaming export half way. They go back when the scope ends.
        """
        count = 0
        held = self._held
        for ref in list(held):
            lease = ref()
            if lease is None or not lease.active:
                _forget(held, ref)
            elif not (early and lease.pinned):
                _forget(held, ref)
                count += 1
                lease.release()
        return count

    def end(self) -> int:
        """End the scope: release every lease and refuse new ones. Idempotent.

        ``ended`` is set before the list is read: a lease :meth:`add` records after
        that read is one whose adder then sees ``ended`` and releases it itself."""
        self.ended = True
        released = 0
        for ref in list(self._held):
            lease = ref()
            if lease is not None and lease.active:
                released += 1
                lease.release()
        if released:
            logger.debug("scope %s ended: released %d lease(s)", self, released)
        return released

    def describe(self) -> str:
        """One line for logs: kind, name and request details if any."""
        extra = " ".join(f"{k}={v}" for k, v in self.info.items() if v)
        return f"{self.kind} {self.name}" + (f" ({extra})" if extra else "")

    def __repr__(self) -> str:
        return f"<Scope #{self.id} {self.describe()}{' ended' if self.ended else ''}>"


_current: ContextVar[Scope | None] = ContextVar("connguard_scope", default=None)


class _ThreadScopes(threading.local):
    """Holds the implicit scope of each thread; its end is tied to the thread's."""

    scope: _ThreadScopeHolder | None = None


class _ThreadScopeHolder:
    """Lives exactly as long as its thread's local storage, ending the scope on death."""

    __slots__ = ("scope",)

    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    def __del__(self) -> None:
        # Runs when the thread dies (CPython clears a thread's locals at exit).
        try:
            self.scope.end()
        except Exception:  # never raise from a finalizer
            pass


_thread_scopes = _ThreadScopes()


# An integration whose unit of work cannot set our context variable in the right
# context may register a way to find the current scope (the Django layer does, for
# ASGI: see connguard.django.scopes).
_ambient: Callable[[], Scope | None] | None = None


def set_ambient_lookup(lookup: Callable[[], Scope | None] | None) -> None:
    """Register how to find the current scope when the context variable is unset."""
    global _ambient
    _ambient = lookup


current_or_none = _current.get
"""The scope made current in this context, or None; no ambient lookup. For a hot path
that checks :func:`owner_scope`'s common answer without a call (see the Django
wrapper's ``connection``)."""


def current_scope() -> Scope | None:
    """The scope of the running code (request, task...), or None outside any."""
    found = _current.get()
    if found is None and _ambient is not None:
        found = _ambient()
    return found


def owner_scope() -> Scope:
    """The scope that should own a lease taken now.

    The current scope if there is one, else the thread's implicit scope (created on
    first use), which ends when the thread dies. A current scope that has *ended* is
    returned as it is (the caller refuses to lease for it): code still running for
    a request whose client hung up must not get a connection that nobody would ever
    give back, as a fallback to an executor thread's never-ending scope would.
    """
    scope = _current.get()
    if scope is None and _ambient is not None:
        scope = _ambient()
    if scope is not None and (not scope.ended or scope.kind != "thread"):
        return scope
    holder = _thread_scopes.scope
    if holder is None or holder.scope.ended:
        thread = threading.current_thread()
        holder = _ThreadScopeHolder(Scope(thread.name, kind="thread"))
        _thread_scopes.scope = holder
    return holder.scope


def enclosing_scope() -> Scope | None:
    """The scope that owns what the running code holds, if there is one open: the
    current scope, else, in the main thread, its implicit scope (never created here).
    A scope opened now is nested in it.

    The main thread's only: a management command (or a script) that queries, then
    calls a task function decorated ``@connguard.scope``, is that task's caller. A
    pool worker's implicit scope holds what earlier, unrelated work left (a tenant
    setting, a transaction left open): a job the worker runs next is no part of it,
    and gets a connection of its own, reset."""
    found = _current.get()
    if found is None and _ambient is not None:
        found = _ambient()
    if found is None and threading.current_thread() is threading.main_thread():
        holder = _thread_scopes.scope
        found = holder.scope if holder is not None else None
    return found if found is not None and not found.ended else None


def encloses(outer: Scope, inner: Scope) -> bool:
    """Whether ``inner`` was opened inside ``outer`` (at any depth) and ``outer`` is
    still open: code working for ``inner`` may then go on using a connection
    ``outer`` holds, as it would with Django's one connection per thread (a view
    calling a function decorated ``@connguard.scope``, inside the view's transaction,
    with its session state and its open server-side cursor). What ``inner`` takes
    itself is still ``inner``'s, given back when it ends."""
    scope = inner.parent
    while scope is not None:
        if scope is outer:
            return not outer.ended
        scope = scope.parent
    return False


def begin(opened: Scope) -> None:
    """Make ``opened`` current in this context, first ending a scope of the same kind
    still current here (a unit of work that never finished: a request whose response
    was never closed). One call per request: the Django layer opens a scope per
    request, so what this costs every request pays."""
    stale = _current.get()
    if stale is not None and stale.kind == opened.kind:
        stale.end()
    _current.set(opened)


def finish(kind: str) -> None:
    """End the current scope (:func:`current_scope`) if it is of ``kind``, and clear
    this context's."""
    found = _current.get()  # current_scope(), inlined: once per request
    if found is None and _ambient is not None:
        found = _ambient()
    if found is not None and found.kind == kind:
        found.end()
        _current.set(None)


def enter(scope: Scope) -> object:
    """Make ``scope`` current in this context; returns a token for :func:`leave`."""
    return _current.set(scope)


def leave(token: object | None = None) -> None:
    """Undo :func:`enter` (with its token), or clear the current scope."""
    if token is not None:
        try:
            _current.reset(token)  # type: ignore[arg-type]
            return
        except ValueError:  # set in another context (asgiref copies contexts)
            pass
    _current.set(None)


class scope:  # lower-case on purpose: used like a function, ``with connguard.scope(...)``
    """Open a scope for code outside requests: a Celery task, a management
    command, a thread of your own. Every lease taken inside is given back when the
    block (or decorated function) ends.

    ``with connguard.scope("nightly-report"): ...`` or ``@connguard.scope("job")``.
    One object may be nested, re-entered and shared between threads and tasks: each
    ``with`` block (each call of a decorated function) opens a scope of its own, and
    which block is leaving is kept per context, not on the object.
    """

    def __init__(self, name: str = "scope", **info: Any) -> None:
        self.name = name
        self.info = info
        # This object's open blocks in the running context, innermost last.
        self._open: ContextVar[tuple[tuple[Scope, Token[Scope | None]], ...]] = ContextVar(
            f"connguard_scope_{id(self)}", default=()
        )

    @contextmanager
    def _opened(self) -> Iterator[Scope]:
        opened = Scope(self.name, kind="scope", info=dict(self.info), parent=enclosing_scope())
        token = _current.set(opened)
        try:
            yield opened
        finally:
            opened.end()
            _current.reset(token)

    def __enter__(self) -> Scope:
        opened = Scope(self.name, kind="scope", info=dict(self.info), parent=enclosing_scope())
        token = _current.set(opened)
        self._open.set((*self._open.get(), (opened, token)))
        return opened

    def __exit__(self, *exc: Any) -> None:
        stack = self._open.get()
        if not stack:
            raise RuntimeError(f"connguard.scope({self.name!r}): __exit__ without __enter__")
        (opened, token), rest = stack[-1], stack[:-1]
        self._open.set(rest)
        try:
            opened.end()
        finally:
            try:
                _current.reset(token)
            except ValueError:  # entered in another context (a copied one)
                _current.set(None)

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def awrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                with self._opened():
                    return await func(*args, **kwargs)

            return awrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with self._opened():
                return func(*args, **kwargs)

        return wrapper
