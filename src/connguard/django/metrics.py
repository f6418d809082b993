"""Prometheus metrics of every worker process's pools (``prometheus_client``).

Mount ``connguard.django.urls`` and scrape ``/connguard/metrics``, or register
:func:`collector` in the registry your own metrics view serves. Either way the
figures come from the same place as the status view: this process's pools, taken
now, and the snapshots the server's other workers publish every second
(:mod:`connguard.diagnostics.snapshots`). So whichever worker a scrape reaches, it
returns every worker, each series labelled with the worker's ``pid`` and ``host``:
sum over ``pid`` for the server (``sum by (db_client_connection_pool_name)
(db_client_connection_count)``). A worker that restarts starts new series under its
new pid, which ``rate()`` and ``increase()`` handle as they handle any counter reset.
This is the per-process-label way, not ``prometheus_client``'s multiprocess mode:
that mode needs ``PROMETHEUS_MULTIPROC_DIR`` set before the server starts and
aggregates gauges by a mode chosen per metric, while the snapshots already exist
for the status view and need no setting.

Names follow OpenTelemetry's semantic conventions as Prometheus spells them
(``db.client.connection.wait_time`` in seconds is
``db_client_connection_wait_time_seconds``; counters end in ``_total``); connguard's
own are ``connguard_pool_*``. See :mod:`connguard.diagnostics.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from connguard.diagnostics.metrics import Family, Histogram, families


def prometheus_name(family: Family) -> str:
    """The OpenTelemetry name as Prometheus spells it (dots to underscores, the unit
    ``s`` as ``_seconds``, annotations such as ``{connection}`` dropped)."""
    name = family.spec.name.replace(".", "_")
    return name + "_seconds" if family.spec.unit == "s" else name


def _label(key: str) -> str:
    return key.replace(".", "_")


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


class ConnguardCollector:
    """A ``prometheus_client`` collector over process snapshots (see the module)."""

    def __init__(self, processes: Callable[[], list[dict[str, Any]]]) -> None:
        self._processes = processes

    def describe(self) -> list[Any]:
        return []  # figures come and go with workers: no fixed description

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (  # noqa: PLC0415 - an optional extra
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        for family in families(self._processes()):
            if not family.samples:
                continue
            keys = sorted({key for sample in family.samples for key in sample.attributes})
            labels = [_label(key) for key in keys]
            name, text = prometheus_name(family), family.spec.description
            metric: Any
            if family.spec.kind == "histogram":
                metric = HistogramMetricFamily(name, text, labels=labels)
            elif family.spec.kind == "counter":
                metric = CounterMetricFamily(name, text, labels=labels)
            else:
                metric = GaugeMetricFamily(name, text, labels=labels)
            for sample in family.samples:
                values = [sample.attributes.get(key, "") for key in keys]
                if isinstance(sample.value, Histogram):
                    buckets = [(_bound(b), n) for b, n in sample.value.buckets]
                    metric.add_metric(values, buckets, sample.value.sum)
                else:
                    metric.add_metric(values, sample.value)
            yield metric


def collector() -> ConnguardCollector:
    """A collector of every worker's pools, for a registry of your own."""
    from . import views  # noqa: PLC0415 - the status view's sources

    return ConnguardCollector(views.processes)


def exposition() -> tuple[bytes, str]:
    """The Prometheus text exposition of every worker's pools, and its content type."""
    from prometheus_client import (  # noqa: PLC0415 - an optional extra
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        generate_latest,
    )

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
