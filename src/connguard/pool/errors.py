"""The pool's errors: a small hierarchy that also belongs to the driver's.

Every pool error is raised as a subclass of the driver's DB-API
``OperationalError`` as well as of the classes here, so existing
``except psycopg.OperationalError`` (or, through Django's error wrapper,
``except django.db.OperationalError``) keeps working, while new code can catch
``PoolTimeout`` precisely. The engine does not import any driver: the driver
hands its ``OperationalError`` class over and :func:`specialize` builds the
combined classes once per driver.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


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


class PoolTimeout(PoolError):
    """No connection became available within the acquire timeout."""


class ConnectFailed(PoolTimeout):
    """No connection became available in time *because* the database could not be
    reached: the last attempt to open one failed. The driver's error is chained
    as ``__cause__``."""


class PoolRefused(PoolError):
    """Refused at once: ``max_waiting`` callers are already waiting."""


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


def specialize(base: type[PoolError], operational_error: type[Exception]) -> type[PoolError]:
    """Return ``base`` combined with a driver's ``OperationalError`` (cached)."""
    key = (base, operational_error)
    cls = _cache.get(key)
    if cls is None:
        with _cache_lock:
            cls = _cache.get(key)
            if cls is None:
                parents: tuple[type, ...] = (base,)
                if not issubclass(base, operational_error):
                    # The specialized parent first, so a specialized ConnectFailed
                    # is also caught by ``except`` on the specialized PoolTimeout.
                    for parent in base.__mro__[1:]:
                        if parent in _BASES:
                            parents = (base, specialize(parent, operational_error))
                            break
                    else:
                        parents = (base, operational_error)
                cls = type(base.__name__, parents, {"__module__": __name__})
                _cache[key] = cls
    return cls


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, for logs and error messages."""
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
