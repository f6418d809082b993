"""The pools' figures as metrics, named by OpenTelemetry's semantic conventions for
database client connection pools, plus connguard's own.

One table (:data:`METRICS`) says which figure of a pool's stats becomes which metric;
:func:`families` applies it to process snapshots
(:func:`connguard.diagnostics.snapshots.process_snapshot`). The exporters turn the
result into their own types: Prometheus (:mod:`connguard.django.metrics`, every
worker process of a server, each series labelled with its ``pid``) and
OpenTelemetry (:mod:`connguard.diagnostics.otel`, this process). Nothing here imports
either library.

The OpenTelemetry names (semantic conventions, "Database client connection pool
metrics", as of 1.37): ``db.client.connection.count`` (attribute
``db.client.connection.state``: ``idle`` or ``used``), ``.idle.max``, ``.idle.min``,
``.max``, ``.pending_requests``, ``.timeouts``, and the histograms ``.create_time``,
``.wait_time``, ``.use_time`` (seconds); every series has
``db.client.connection.pool.name``: the pool's name, as ``connguard status`` shows it
(never a password).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["METRICS", "Family", "Histogram", "MetricSpec", "Sample", "families"]

Kind = Literal["gauge", "counter", "histogram"]
POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: its name, kind, unit, meaning, and which stats key feeds it."""

    name: str
    kind: Kind
    unit: str
    description: str
    key: str
    """The key in a pool's ``stats`` (gauges, counters) or ``latency`` (histograms)."""
    attributes: tuple[tuple[str, str], ...] = ()
    """Fixed attributes of this series (``state="idle"``...)."""


def _pool_counters() -> tuple[MetricSpec, ...]:
    own = (
        ("acquires", "{lease}", "Connections leased (checkouts)."),
        ("waits", "{lease}", "Checkouts that queued for a connection."),
        ("refusals", "{request}", "Checkouts refused at once: max_waiting callers waited."),
        ("opened", "{connection}", "Physical connections opened."),
        ("connect_errors", "{error}", "Attempts to open a connection that failed."),
        ("health_check_failures", "{connection}", "Idle connections found dead at checkout."),
        ("resets", "{connection}", "Connections rolled back or reset on their way back."),
        ("leaks", "{lease}", "Leases held past leak_threshold (reported as probable leaks)."),
        ("reclaims", "{lease}", "Leases taken back from their holder (reclaim policy)."),
        ("dropped", "{lease}", "Leases their holder dropped without giving them back."),
        ("revoked", "{lease}", "Leases ended from another thread while in use."),
        ("aborted", "{call}", "Driver calls blocked past socket_timeout, shut down."),
    )
    return tuple(
        MetricSpec(f"connguard.pool.{key}", "counter", unit, text, key) for key, unit, text in own
    )


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "db.client.connection.count", "gauge", "{connection}",
        "Connections that are currently in the state described by the state attribute.",
        "idle", ((STATE, "idle"),),
    ),
    MetricSpec(
        "db.client.connection.count", "gauge", "{connection}",
        "Connections that are currently in the state described by the state attribute.",
        "in_use", ((STATE, "used"),),
    ),
    MetricSpec("db.client.connection.idle.max", "gauge", "{connection}",
               "The maximum number of idle open connections allowed.", "max_size"),
    MetricSpec("db.client.connection.idle.min", "gauge", "{connection}",
               "The minimum number of idle open connections allowed.", "min_size"),
    MetricSpec("db.client.connection.max", "gauge", "{connection}",
               "The maximum number of open connections allowed.", "max_size"),
    MetricSpec("db.client.connection.pending_requests", "gauge", "{request}",
               "The number of current pending requests for an open connection.", "waiting"),
    MetricSpec("db.client.connection.timeouts", "counter", "{timeout}",
               "Connection timeouts that have occurred trying to obtain a connection "
               "from the pool.", "timeouts"),
    MetricSpec("db.client.connection.create_time", "histogram", "s",
               "The time it took to create a new connection.", "connect_time"),
    MetricSpec("db.client.connection.wait_time", "histogram", "s",
               "The time it took to obtain an open connection from the pool.", "acquire_wait"),
    MetricSpec("db.client.connection.use_time", "histogram", "s",
               "The time between borrowing a connection and returning it to the pool.",
               "hold_time"),
    MetricSpec("connguard.pool.opening", "gauge", "{connection}",
               "Connections being opened now (they count toward max_size).", "opening"),
    MetricSpec("connguard.pool.resetting", "gauge", "{connection}",
               "Connections being reset now, off the request path.", "resetting"),
    *_pool_counters(),
)  # fmt: skip
"""Every metric, in the order exporters list them."""

PINNED = MetricSpec(
    "connguard.pool.pinned", "gauge", "{lease}",
    "Leases out now that are pinned: a transaction or a server-side cursor is open on "
    "them, so an early release keeps them until the request ends.",
    "pinned",
)  # fmt: skip
"""Counted from the snapshot's leases (the stats have no such figure)."""

CLOSED = MetricSpec(
    "connguard.pool.closed", "counter", "{connection}",
    "Physical connections closed, by reason (lifetime, idle, broken, reset_failed...).",
    "closed_",
)  # fmt: skip
"""Connections closed, one series per reason (the ``closed_<reason>`` stats keys)."""


@dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative buckets (upper bound, count of values <= it), sum and count."""

    buckets: tuple[tuple[float, int], ...]
    sum: float
    count: int


@dataclass(frozen=True, slots=True)
class Sample:
    attributes: dict[str, str]
    value: float | Histogram


@dataclass(slots=True)
class Family:
    spec: MetricSpec
    samples: list[Sample] = field(default_factory=list)


def _histogram(latency: dict[str, Any]) -> Histogram:
    cumulative = 0
    buckets = []
    for bound, n in latency["buckets"].items():
        cumulative += int(n)
        buckets.append((float("inf") if bound == "+Inf" else float(bound), cumulative))
    return Histogram(tuple(buckets), float(latency["total"]), int(latency["count"]))


def families(
    processes: Iterable[dict[str, Any]], *, process_attributes: bool = True
) -> list[Family]:
    """Every metric over every pool of every process snapshot. ``process_attributes``:
    label each series with its process (``pid``, ``host``), as Prometheus needs to
    tell the workers of one server apart; OpenTelemetry says that with its resource."""
    out: dict[tuple[str, str], Family] = {}
    order = [*METRICS, PINNED, CLOSED]
    for spec in order:
        out.setdefault((spec.name, spec.kind), Family(spec))
    for process in processes:
        base = {"pid": str(process["pid"]), "host": str(process["host"])}
        for entry in process.get("pools") or []:
            attributes = {POOL_NAME: str(entry["pool"])}
            if process_attributes:
                attributes = {**attributes, **base}
            stats, latency = entry["stats"], entry.get("latency") or {}
            for spec in METRICS:
                family = out[(spec.name, spec.kind)]
                if spec.kind == "histogram":
                    data = latency.get(spec.key)
                    if data:
                        family.samples.append(Sample(attributes, _histogram(data)))
                    continue
                if spec.key in stats:
                    labels = {**attributes, **dict(spec.attributes)}
                    family.samples.append(Sample(labels, float(stats[spec.key])))
            pinned = sum(1 for lease in entry.get("leases") or [] if lease.get("pinned"))
            out[(PINNED.name, PINNED.kind)].samples.append(Sample(attributes, float(pinned)))
            closed = out[(CLOSED.name, CLOSED.kind)]
            for key, value in stats.items():
                if key.startswith(CLOSED.key):
                    reason = key[len(CLOSED.key) :]
                    closed.samples.append(Sample({**attributes, "reason": reason}, float(value)))
    return list(out.values())
