"""The pool's errors: a small hierarchy that also belongs to the driver's.

Every pool error is raised as a subclass of the driver's DB-API
``OperationalError`` as well as of the classes here, so existing
``except psycopg.OperationalError`` (or, through Django's error wrapper,
``except django.db.OperationalError``) keeps working, while new code can catch
``PoolTimeout`` precisely. The engine does not import any driver: the driver
hands its ``OperationalError`` class over and :func:`specialize` builds the
combined classes once per driver.

Every error survives ``pickle`` (Django's parallel test runner, ``multiprocessing``,
Celery result backends): with its class, specialized one included, so it is still
the driver's ``OperationalError`` on the other side, its message, ``pool`` and
``counts``. Like any exception, it leaves its traceback and chain behind, unless
the pickler carries them (tblib does).
"""

from __future__ import annotations

import copyreg
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

_E = TypeVar("_E", bound=BaseException)


@dataclass(frozen=True, slots=True)
class PoolCounts:
    """The pool's gauges at the moment an error was raised."""

    size: int
    in_use: int
    idle: int
    waiting: int
    opening: int

    def __str__(self) -> str:
        return (
            f"size={self.size} in_use={self.in_use} idle={self.idle} "
            f"waiting={self.waiting} opening={self.opening}"
        )


class PoolError(Exception):
    """Base of every error the pool raises.

    ``pool`` is the pool's name and ``counts`` its gauges when it was raised (None
    where they do not apply).
    """

    def __init__(self, message: str, *, pool: str, counts: PoolCounts | None = None) -> None:
        super().__init__(message)
        self.pool = pool
        self.counts = counts

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its class, ``args`` and attributes, rebuilt without ``__init__``.

        The default (``cls(*args)`` then ``__setstate__``) cannot work here: ``pool``
        is keyword-only, and psycopg2's errors have a ``__setstate__`` that keeps only
        their own fields, which would lose ``pool`` and ``counts``. The class itself
        pickles by reference, or, when specialized, as the :func:`specialize` call that
        builds it.
        """
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[PoolError], args: tuple[Any, ...], attrs: dict[str, Any]) -> PoolError:
    """Unpickle a :class:`PoolError` (see :meth:`PoolError.__reduce__`)."""
    err = cls.__new__(cls, *args)
    err.args = args
    err.__dict__.update(attrs)
    return err


class PoolTimeout(PoolError):
    """No connection became available within the acquire timeout."""


class ConnectFailed(PoolTimeout):
    """No connection became available *because* the database could not be reached:
    the last attempt to open one failed (its driver error is chained as
    ``__cause__``), or the caller's whole timeout passed with no connection in use,
    only a connect that had not completed (no ``__cause__``). Raised at the caller's
    timeout, or at once instead of :class:`PoolRefused` when ``max_waiting`` callers
    already wait during an outage."""


class PoolRefused(PoolError):
    """Refused at once: ``max_waiting`` callers are already waiting, and the database
    is not known to be down (overload)."""


class PoolClosed(PoolError):
    """The pool is closed (or was closed while the caller waited)."""


class LeaseEnded(PoolError):
    """The lease was released or taken back; its connection is no longer the
    holder's to use (fencing)."""


_BASES: tuple[type[PoolError], ...] = (
    PoolTimeout,
    ConnectFailed,
    PoolRefused,
    PoolClosed,
    LeaseEnded,
)
_cache: dict[tuple[type[PoolError], type[Exception]], type[PoolError]] = {}
_cache_lock = threading.Lock()


class Specialized(type):
    """The type of the classes :func:`specialize` builds.

    They exist only at run time, so ``pickle`` cannot find them by name ("it's not
    the same object as connguard.pool.errors.ConnectFailed"): this type is registered
    with :mod:`copyreg`, which pickles such a class as the :func:`specialize` call that
    returns it, in this process or a fresh one (where it builds it).
    """

    _specialized_from: tuple[type[PoolError], type[Exception]]


def _reduce_specialized(cls: Specialized) -> str | tuple[Any, ...]:
    origin = cls.__dict__.get("_specialized_from")
    if origin is None:  # a subclass someone derived from a specialized class
        return cls.__qualname__  # by reference, as for any class
    return (specialize, origin)


copyreg.pickle(Specialized, _reduce_specialized)


def specialize(base: type[PoolError], operational_error: type[Exception]) -> type[PoolError]:
    """Return ``base`` combined with a driver's ``OperationalError`` (cached: the same
    class every time, from any thread)."""
    key = (base, operational_error)
    cls = _cache.get(key)
    if cls is not None:
        return cls
    parents: tuple[type, ...] = (base,)
    if not issubclass(base, operational_error):
        # The specialized parent first, so a specialized ConnectFailed is also caught
        # by ``except`` on the specialized PoolTimeout. Built before taking the lock,
        # which is not reentrant (an unpickler may ask for ConnectFailed first).
        for parent in base.__mro__[1:]:
            if parent in _BASES:
                parents = (base, specialize(parent, operational_error))
                break
        else:
            parents = (base, operational_error)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
        namespace = {"__module__": __name__, "_specialized_from": key}
        built = cast("type[PoolError]", Specialized(base.__name__, parents, namespace))
        _cache[key] = built
    return built


_DETACH_LIMIT = 64


def detach(exc: _E) -> _E:
    """Drop the traceback of ``exc`` and of every exception chained to it; return ``exc``.

    A traceback keeps every frame it passes through alive, locals included. A driver's
    connect error holds the driver's own frames, whose locals hold the conninfo and so
    the password: kept by the pool (the last connect error, chained as ``__cause__``
    of ``ConnectFailed``/``PoolTimeout``) it would reach Django's debug page, error
    trackers that record locals, and pickles made with tblib; it would also keep an
    opener thread's frames alive. The message, type and chain are what tell the user
    what happened, and they stay.

    Walks ``__cause__``, ``__context__`` and the members of exception groups, each
    exception once (cycles are possible), at most 64 of them.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < _DETACH_LIMIT:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        if current.__cause__ is not None:
            todo.append(current.__cause__)
        if current.__context__ is not None:
            todo.append(current.__context__)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
    return exc


def chain(exc: BaseException | None, limit: int = 100) -> Iterator[BaseException]:
    """``exc`` and the exceptions behind it (each one's ``__cause__``, else its
    ``__context__``), outermost first; stops at a cycle or after ``limit``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < limit:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, for logs and error messages."""
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
