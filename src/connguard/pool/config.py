"""The pool's settings: one immutable, validated object.

Names follow psycopg_pool wherever the meaning is the same (``min_size``,
``max_size``, ``timeout``, ``max_waiting``, ``max_lifetime``, ``max_idle``), because
Django's native pool passes ``OPTIONS["pool"]`` straight to psycopg_pool and its
users already know them. A bad value is refused at construction with a message
that names the setting and the allowed values; nothing is silently "fixed".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

RESET_POLICIES = ("auto", "always", "rollback")
"""The values of :attr:`PoolConfig.reset`."""


class PoolConfigError(ValueError):
    """A pool setting has a value the pool cannot use.

    ``setting`` names it, so a caller (Django's system checks, for one) can point
    at the exact key.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


@dataclasses.dataclass(frozen=True, slots=True)
class PoolConfig:
    """Settings of one pool. Every time is in seconds.

    See ``docs/pool.md`` for the reasoning behind each default.
    """

    min_size: int = 1
    """Connections kept open even when idle (refilled in the background)."""
    max_size: int = 10
    """Hard bound on physical connections, counting those being opened or closed."""
    timeout: float = 10.0
    """Longest an ``acquire()`` waits before failing with ``PoolTimeout``."""
    max_waiting: int = 0
    """Callers allowed to wait at once; the next is refused at once. 0: no limit."""
    max_lifetime: float | None = 3600.0
    """A connection is retired after this long (minus jitter). None: never."""
    max_idle: float | None = 600.0
    """An idle connection beyond ``min_size`` is closed after this long. None: never."""
    lifetime_jitter: float = 0.1
    """Up to this fraction is taken off each connection's lifetime, at random, so
    connections opened together do not all retire together."""
    ping_after_idle: float | None = 30.0
    """A connection idle longer than this gets a round-trip ping before it is
    handed out; a fresher one only gets the cheap liveness test (no round trip).
    0: always ping. None: never ping."""
    liveness_after_idle: float | None = 0.001
    """A connection not known alive for this long (since it was opened, or last
    passed this test or a ping) gets the cheap liveness test (no round trip) before
    it is handed out. The test is one zero-timeout ``poll()`` that keeps the GIL
    (about 1 µs): it sees a backend terminated while idle (``pg_terminate_backend``,
    ``idle_session_timeout``, a restart), so such a connection is never handed to a
    request. The default, 1 ms, skips it only for a connection tested within the
    last millisecond (back-to-back checkouts under load); a backend's death is not
    instantaneous at the socket either. 0: test every checkout. None: never test
    (HikariCP's bypass window, counted from the last use, is 0.5)."""
    socket_timeout: float | None = None
    """A single call into the driver on a leased connection (a statement, a fetch, a
    COPY) still blocked after this long is aborted: the connection's socket is shut
    down, the caller gets the driver's ``OperationalError`` at once, and the
    connection is closed. The last resort against a server that stopped answering (a
    network black hole, a hung host), which neither PostgreSQL's ``statement_timeout``
    nor a cancel request can reach; like pgjdbc's ``socketTimeout``. Checked by
    housekeeping, so a call is aborted after between this and this plus
    ``housekeeping_interval`` seconds. None (the default): never; set PostgreSQL's
    ``statement_timeout`` below it so slow queries on a healthy server end there."""
    leak_threshold: float | None = 60.0
    """A lease held longer than this is reported as a probable leak. None: off."""
    connect_timeout: float = 10.0
    """Longest one attempt to open a connection may take."""
    reconnect_backoff: float = 0.5
    """Wait after a failed connect before the next attempt; doubles on each
    further failure, up to ``reconnect_backoff_max``."""
    reconnect_backoff_max: float = 10.0
    """Longest wait between connect attempts while the database is unreachable."""
    stack_depth: int = 3
    """Frames of the acquiring code recorded with each lease, for leak reports and
    ``connguard status`` (file:line). About 0.25 µs for the default 3 frames (more
    cost about 0.15 µs each). 0: record nothing."""
    reuse: bool = True
    """False: a connection serves one lease and is closed when it ends (no idle
    connections; ``min_size`` must be 0). Every lease then pays a connect, but keeps
    the bound, the fence, the leak records and the reset guarantees. Django's
    ``OPTIONS["pool"] = False`` means this."""
    reclaim: bool = False
    """Take back a lease whose owner is gone (its scope ended, or its thread died)
    and which is not executing a statement: rolled back, fenced, counted, logged."""
    housekeeping_interval: float = 1.0
    """How often the housekeeping thread visits this pool."""
    reset: str = "auto"
    """What a connection goes through before its next holder gets it, beyond the
    rollback of an open transaction, which always happens:

    * ``"auto"``: a full reset (``DISCARD ALL`` and the per-connection set-up again)
      only when the holder may have changed session state: a statement seen through
      the fence that sets, listens, prepares, locks, creates temporary objects..., a
      procedure call, or a server-side cursor left open. A request that changed
      nothing pays no round trip.
    * ``"always"``: a full reset on every release (one round trip).
    * ``"rollback"``: only the rollback; session state crosses to the next holder.
    """

    background_reset: bool = False
    """Run a full reset on the process's resetter thread when nobody is waiting, so
    its round trip is not on the releasing request's path (the connection is handed
    out again only after it). Off by default: measured under gunicorn at saturation,
    the hand-off to one resetter thread cost more CPU per request than the round trip
    it moved (docs/benchmarks.md); it pays off for sites far from saturation that
    reset often and care about each request's latency."""

    def __post_init__(self) -> None:
        _int(self, "min_size", 0)
        _int(self, "max_size", 1)
        if self.min_size > self.max_size:
            raise PoolConfigError(
                "min_size",
                f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})",
            )
        _seconds(self, "timeout")
        _int(self, "max_waiting", 0)
        _seconds(self, "max_lifetime", optional=True)
        _seconds(self, "max_idle", optional=True)
        _fraction(self, "lifetime_jitter", 0.0, 0.5)
        _seconds(self, "ping_after_idle", optional=True, zero_ok=True)
        _seconds(self, "liveness_after_idle", optional=True, zero_ok=True)
        _seconds(self, "socket_timeout", optional=True)
        _seconds(self, "leak_threshold", optional=True)
        _seconds(self, "connect_timeout")
        _seconds(self, "reconnect_backoff")
        _seconds(self, "reconnect_backoff_max")
        if self.reconnect_backoff_max < self.reconnect_backoff:
            raise PoolConfigError(
                "reconnect_backoff_max",
                f"reconnect_backoff_max ({self.reconnect_backoff_max}) must be at least "
                f"reconnect_backoff ({self.reconnect_backoff})",
            )
        _seconds(self, "housekeeping_interval")
        _int(self, "stack_depth", 0)
        if self.reset not in RESET_POLICIES:
            raise PoolConfigError(
                "reset",
                f"reset must be one of {', '.join(map(repr, RESET_POLICIES))} (got {self.reset!r})",
            )
        if not isinstance(self.background_reset, bool):
            raise PoolConfigError(
                "background_reset",
                f"background_reset must be True or False (got {self.background_reset!r})",
            )
        if not isinstance(self.reuse, bool):
            raise PoolConfigError("reuse", f"reuse must be True or False (got {self.reuse!r})")
        if not self.reuse and self.min_size:
            raise PoolConfigError(
                "min_size",
                f"min_size must be 0 when reuse is False (got {self.min_size}): "
                "connections are not kept",
            )
        if not isinstance(self.reclaim, bool):
            raise PoolConfigError(
                "reclaim", f"reclaim must be True or False (got {self.reclaim!r})"
            )

    @classmethod
    def settings(cls) -> tuple[str, ...]:
        """The names a configuration mapping may use."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, where: str = "pool") -> PoolConfig:
        """Build a config from a mapping such as Django's ``OPTIONS["pool"]``.

        An unknown key is an error (a typo must not pass silently); ``where``
        names the mapping in the message.
        """
        allowed = cls.settings()
        for key in values:
            if key not in allowed:
                raise PoolConfigError(
                    str(key),
                    f"unknown {where} setting {key!r}; allowed: {', '.join(allowed)}",
                )
        return cls(**dict(values))


def _int(cfg: PoolConfig, name: str, lowest: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise PoolConfigError(name, f"{name} must be an integer >= {lowest} (got {value!r})")


def _seconds(cfg: PoolConfig, name: str, *, optional: bool = False, zero_ok: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and optional:
        return
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and (value >= 0 if zero_ok else value > 0)
    )
    if not ok:
        bound = ">= 0" if zero_ok else "> 0"
        extra = " or None" if optional else ""
        raise PoolConfigError(
            name, f"{name} must be a number of seconds {bound}{extra} (got {value!r})"
        )


def _fraction(cfg: PoolConfig, name: str, low: float, high: float) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise PoolConfigError(name, f"{name} must be a number from {low} to {high} (got {value!r})")
