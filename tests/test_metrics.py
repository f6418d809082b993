"""Metrics (issue 12): the OpenTelemetry-named families built from process snapshots,
their Prometheus exposition (every worker, labelled by pid) and the OpenTelemetry
instruments, read back through an in-memory reader. Real servers scrape the
Prometheus endpoint in tests/test_status_servers.py."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from connguard.diagnostics.metrics import POOL_NAME, families
from connguard.diagnostics.snapshots import process_snapshot
from connguard.django.metrics import ConnguardCollector
from connguard.pool import Pool, PoolConfig, TxStatus

from .fakes import FakeDriver


@pytest.fixture
def pool() -> Any:
    p = Pool(FakeDriver(), PoolConfig(min_size=0, max_size=3), name="m", housekeeping=False)
    yield p
    p.close()


def two_workers(pool: Pool) -> list[dict[str, Any]]:
    """The pool's snapshot as two workers would publish it (pids 101 and 102)."""
    a = process_snapshot([pool])
    return [{**a, "pid": 101}, {**a, "pid": 102}]


def exposition(processes: list[dict[str, Any]]) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ConnguardCollector(lambda: processes))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_families_follow_the_conventions(pool: Pool) -> None:
    held = pool.acquire()
    pool.acquire().release()
    by_name = {f.spec.name: f for f in families([process_snapshot([pool])])}
    count = by_name["db.client.connection.count"]
    states = {s.attributes["db.client.connection.state"]: s.value for s in count.samples}
    assert states == {"used": 1.0, "idle": 1.0}
    assert all(s.attributes[POOL_NAME] == "m" for s in count.samples)
    assert by_name["db.client.connection.max"].samples[0].value == 3.0
    assert by_name["connguard.pool.acquires"].samples[0].value == 2.0
    assert by_name["connguard.pool.pinned"].samples[0].value == 0.0
    held.raw.status = TxStatus.INTRANS  # a transaction open on the held lease
    again = {f.spec.name: f for f in families([process_snapshot([pool])])}
    assert again["connguard.pool.pinned"].samples[0].value == 1.0
    held.raw.status = TxStatus.IDLE
    held.release()


def test_prometheus_exposition_sums_over_workers(pool: Pool) -> None:
    held = pool.acquire()
    pool.acquire().release()
    metrics = exposition(two_workers(pool))
    count = metrics["db_client_connection_count"]
    used = [s for s in count.samples if s.labels["db_client_connection_state"] == "used"]
    assert sorted(s.labels["pid"] for s in used) == ["101", "102"]
    assert sum(s.value for s in used) == 2.0, "one used connection per worker"
    acquires = metrics["connguard_pool_acquires"]
    assert acquires.type == "counter"
    assert {s.name for s in acquires.samples} >= {"connguard_pool_acquires_total"}
    wait = metrics["db_client_connection_wait_time_seconds"]
    assert wait.type == "histogram"
    per_pid = [s for s in wait.samples if s.labels["pid"] == "101"]
    buckets = [s for s in per_pid if s.name.endswith("_bucket")]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 2.0
    assert [s.value for s in buckets] == sorted(s.value for s in buckets), "cumulative"
    (count_sample,) = [s for s in per_pid if s.name.endswith("_count")]
    assert count_sample.value == 2.0
    closed = metrics["connguard_pool_closed"]
    assert {s.labels["reason"] for s in closed.samples} >= {"lifetime", "broken"}
    held.release()


def test_opentelemetry_instruments_read_back(pool: Pool) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from connguard.diagnostics import otel

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    otel.instrument(lambda: [pool], meter_provider=provider)
    held = pool.acquire()
    pool.acquire().release()
    data = reader.get_metrics_data()
    points: dict[str, list[Any]] = {}
    for resource_metrics in data.resource_metrics:
        for scope in resource_metrics.scope_metrics:
            assert scope.scope.name == "connguard"
            for metric in scope.metrics:
                points[metric.name] = list(metric.data.data_points)
    used = [
        p for p in points["db.client.connection.count"]
        if p.attributes["db.client.connection.state"] == "used"
    ]  # fmt: skip
    assert [p.value for p in used] == [1]
    assert used[0].attributes[POOL_NAME] == "m" and "pid" not in used[0].attributes
    assert [p.value for p in points["connguard.pool.acquires"]] == [2]
    assert "db.client.connection.wait_time" not in points, "no observable histograms"
    held.release()
    provider.shutdown()


def test_the_grafana_dashboard_queries_only_metrics_that_exist(pool: Pool) -> None:
    """docs/grafana/connguard-dashboard.json: every metric its queries name is in the
    exposition (a renamed metric would leave an empty panel)."""
    import json
    import re
    from pathlib import Path

    pool.acquire().release()
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ConnguardCollector(lambda: two_workers(pool)))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    dashboard = Path(__file__).resolve().parent.parent / "docs/grafana/connguard-dashboard.json"
    data = json.loads(dashboard.read_text())
    queries = [t["expr"] for panel in data["panels"] for t in panel["targets"]]
    queries.append(data["templating"]["list"][0]["query"])
    named = {m for q in queries for m in re.findall(r"\b(?:db_client|connguard)_\w+", q)}
    assert named, queries
    labels = {"db_client_connection_pool_name", "db_client_connection_state"}
    assert named - labels, queries
    assert named - labels - exported == set()
