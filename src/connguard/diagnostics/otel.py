"""The pools' figures as OpenTelemetry metrics (``opentelemetry-api``).

:func:`instrument` registers observable instruments on a ``MeterProvider`` (the
global one by default): every gauge and counter of :data:`connguard.diagnostics.
metrics.METRICS`, read from this process's pools when the provider's reader
collects. Each process reports its own pools; OpenTelemetry's resource (service,
host, pid) tells the processes apart. In a Django project, ``CONNGUARD =
{"opentelemetry": True}`` calls it at start-up.

The three histograms of the conventions (``db.client.connection.create_time``,
``.wait_time``, ``.use_time``) are not among them: the API has no observable
histogram, and recording every checkout synchronously would put a call into the
pool's hot path. They are exported through Prometheus
(:mod:`connguard.django.metrics`), with their buckets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from connguard import __version__
from connguard.pool import Pool

from .metrics import Family, Histogram, families
from .snapshots import process_snapshot

__all__ = ["instrument"]

FRESH_FOR = 0.5
"""Seconds one reading of the pools serves every instrument of a collection."""


class _Reading:
    """One snapshot of the pools shared by the callbacks of one collection."""

    def __init__(self, pools: Callable[[], Iterable[Pool]]) -> None:
        self._pools = pools
        self._lock = threading.Lock()
        self._at = -1.0
        self._families: dict[str, Family] = {}

    def family(self, name: str) -> Family | None:
        with self._lock:
            now = time.monotonic()
            if now - self._at > FRESH_FOR:
                snapshot = process_snapshot(self._pools())
                self._families = {
                    f.spec.name: f for f in families([snapshot], process_attributes=False)
                }
                self._at = now
            return self._families.get(name)


def instrument(pools: Callable[[], Iterable[Pool]], meter_provider: Any = None) -> list[Any]:
    """Register the pools' observable gauges and counters; returns the instruments.

    ``pools``: what to read at each collection (the Django layer passes its registry
    of this process's pools). ``meter_provider``: default, the global one.
    """
    from opentelemetry import metrics  # noqa: PLC0415 - an optional extra
    from opentelemetry.metrics import CallbackOptions, Observation  # noqa: PLC0415

    provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    meter = provider.get_meter("connguard", __version__)
    reading = _Reading(pools)
    made: list[Any] = []
    seen: set[str] = set()
    for family in families([]):
        spec = family.spec
        if spec.kind == "histogram" or spec.name in seen:
            continue
        seen.add(spec.name)

        def observe(options: CallbackOptions, name: str = spec.name) -> Iterable[Observation]:
            found = reading.family(name)
            if found is None:
                return []
            return [
                Observation(sample.value, sample.attributes)
                for sample in found.samples
                if not isinstance(sample.value, Histogram)
            ]

        create = (
            meter.create_observable_counter
            if spec.kind == "counter"
            else (meter.create_observable_gauge)
        )
        made.append(
            create(spec.name, callbacks=[observe], unit=spec.unit, description=spec.description)
        )
    return made
