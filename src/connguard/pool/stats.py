"""Counters and latency histograms, read as one consistent snapshot.

The pool updates these while it holds its lock anyway, so recording costs a few
integer increments and one ``bisect`` and never takes a lock of its own. Readers
get a :class:`PoolStats` copied under that same lock: every number in it belongs
to the same instant. ``docs/stats.md`` documents every key.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

# Bucket upper bounds in seconds: 50 µs to 60 s, roughly x2.5 apart. A value
# above the last bound lands in the overflow bucket.
BUCKET_BOUNDS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

CLOSE_REASONS: tuple[str, ...] = (
    "lifetime",
    "idle",
    "broken",
    "reset_failed",
    "pool_closed",
    "single_use",
)
"""Why a connection was closed; each has a ``closed_<reason>`` counter."""


class Histogram:
    """A fixed-bucket latency histogram (not thread-safe: the pool's lock guards it)."""

    __slots__ = ("count", "counts", "max", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKET_BOUNDS) + 1)
        self.total = 0.0
        self.count = 0
        self.max = 0.0

    def record(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKET_BOUNDS, seconds)] += 1
        self.total += seconds
        self.count += 1
        if seconds > self.max:  # noqa: PLR1730 - cheaper than max() on the hot path
            self.max = seconds

    def snapshot(self, zeros: int = 0) -> HistogramSnapshot:
        """Freeze it; ``zeros`` adds that many zero values (counted elsewhere so the
        hot path need not record them one by one)."""
        counts = list(self.counts)
        counts[0] += zeros
        return HistogramSnapshot(tuple(counts), self.total, self.count + zeros, self.max)


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A histogram frozen at one instant.

    ``buckets[i]`` counts values ``<= BUCKET_BOUNDS[i]`` (and above the previous
    bound); the last entry counts values above every bound.
    """

    buckets: tuple[int, ...]
    total: float
    count: int
    max: float

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the ``q`` quantile (0 when empty).

        Bucketed, so it over-estimates by at most one bucket width; ``max`` caps
        it for the overflow bucket.
        """
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= rank and n:
                return min(BUCKET_BOUNDS[i], self.max) if i < len(BUCKET_BOUNDS) else self.max
        return self.max

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "total": self.total,
            "mean": self.mean,
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
            "max": self.max,
            "buckets": dict(zip([*map(str, BUCKET_BOUNDS), "+Inf"], self.buckets, strict=True)),
        }


@dataclass(frozen=True, slots=True)
class PoolStats:
    """One consistent snapshot of a pool. Keys are documented in ``docs/stats.md``."""

    name: str
    driver: str
    # gauges
    size: int
    idle: int
    in_use: int
    waiting: int
    opening: int
    closing: int
    max_size: int
    min_size: int
    # counters
    acquires: int
    waits: int
    timeouts: int
    refusals: int
    releases: int
    resets: int
    opened: int
    connect_errors: int
    health_check_failures: int
    leaks: int
    reclaims: int
    dropped: int
    revoked: int = 0
    aborted: int = 0
    """Calls blocked past ``socket_timeout`` whose connection was shut down."""
    resetting: int = 0
    closed: dict[str, int] = field(default_factory=dict)
    # latency histograms
    acquire_wait: HistogramSnapshot | None = None
    hold_time: HistogramSnapshot | None = None
    connect_time: HistogramSnapshot | None = None

    def as_dict(self) -> dict[str, Any]:
        """Flat JSON-ready mapping: gauges, counters, ``closed_<reason>``, histograms."""
        out: dict[str, Any] = {}
        for key in (
            "name", "driver", "size", "idle", "in_use", "waiting", "opening", "closing",
            "resetting",
            "max_size", "min_size", "acquires", "waits", "timeouts", "refusals", "releases",
            "resets", "opened", "connect_errors", "health_check_failures", "leaks",
            "reclaims", "dropped", "revoked", "aborted",
        ):  # fmt: skip
            out[key] = getattr(self, key)
        for reason in CLOSE_REASONS:
            out[f"closed_{reason}"] = self.closed.get(reason, 0)
        for key in ("acquire_wait", "hold_time", "connect_time"):
            hist: HistogramSnapshot | None = getattr(self, key)
            out[key] = hist.as_dict() if hist else None
        return out
