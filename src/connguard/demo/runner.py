"""The demo itself: the report's burst against stock Django, then against connguard.

Both runs serve the same site from the same database under the same web server; only
the settings differ (:func:`plans`). Each run starts the server, fires the burst
while sampling ``pg_stat_activity`` and the pool, keeps sampling through a quiet
period (where the leak shows: stock Django's backends stay, connguard's pool shrinks
back to ``min_size``), then stops the server and waits for its backends to go, so
the second run starts from a clean server.

Everything started here (the PostgreSQL, its demo database, the web servers, the
migration, a temporary directory for logs) is registered for removal the moment it
exists, and removed however the demo ends.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psycopg

from connguard import __version__

from . import USER_REPORT, DemoError
from .database import (
    DEMO_DATABASE,
    MONITOR_APP_NAME,
    Postgres,
    check_binaries,
    connect_existing,
    migrate,
    start_embedded,
)
from .figures import DemoResult, RunResult, request_errors
from .interrupts import Interrupts
from .load import Burst, burst, image_paths
from .sampler import BackendSampler, PoolGauges, PoolSampler
from .servers import SERVERS, Launcher, PortInUse, command, free_port
from .view import LiveState, View

__all__ = [
    "POOL_MAX_SIZE",
    "POOL_MIN_SIZE",
    "DemoOptions",
    "RunPlan",
    "min_connections",
    "plans",
    "pool_settings",
    "run_demo",
]

POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 10
SAMPLE_INTERVAL = 0.1
"""Seconds between samples of ``pg_stat_activity``: ~250 points per default run."""
POOL_INTERVAL = 0.25
TICK = 0.25
"""Seconds between updates of the terminal view."""
BACKENDS_GONE_TIMEOUT = 15.0
DEMO_MARGIN = 3
"""Connections beyond the pool's the demo needs: its sampler, and room to spare."""
REPORT_MAX_AGE = 15

_AT_END_SQL = """
SELECT state, round(extract(epoch FROM now() - state_change)::numeric, 1)::float,
       left(query, 400)
FROM pg_stat_activity
WHERE split_part(application_name, '|cg|', 1) = %s
ORDER BY backend_start
"""


@dataclass(frozen=True)
class DemoOptions:
    """What ``connguard demo`` was asked to do (the command line's options)."""

    requests: int = 600
    concurrency: int = 30
    server: str = "uvicorn"
    dsn: str | None = None
    max_connections: int = 40
    quiet_seconds: float = 20.0
    port: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """For the JSON output and the report: no DSN, whose password it may hold."""
        return {
            "requests": self.requests,
            "concurrency": self.concurrency,
            "server": self.server,
            "quiet_seconds": self.quiet_seconds,
            "max_connections": self.max_connections if self.dsn is None else None,
            "dsn": self.dsn is not None,
            "port": self.port,
        }


def min_connections(server: str) -> int:
    """The smallest ``max_connections`` the connguard run fits in under ``server``."""
    return POOL_MAX_SIZE * SERVERS[server] + DEMO_MARGIN


def pool_settings(quiet_seconds: float) -> dict[str, Any]:
    """``OPTIONS["pool"]`` of the connguard run.

    ``max_idle`` is a quarter of the quiet period (at most 5 s, at least 0.5 s), so
    that the quiet period shows the pool shrinking back to ``min_size``; in
    production it would be minutes. ``timeout`` 5 s: a web request should get a
    fast 503 rather than wait long for a connection.
    """
    return {
        "min_size": POOL_MIN_SIZE,
        "max_size": POOL_MAX_SIZE,
        "max_idle": round(min(5.0, max(0.5, quiet_seconds / 4)), 2),
        "housekeeping_interval": 0.5,
        "timeout": 5,
    }


@dataclass(frozen=True)
class RunPlan:
    """One run: the site's settings, as environment for it and as Python for people."""

    key: str
    title: str
    description: str
    app_name: str
    env: dict[str, str]
    engine: str
    middleware: tuple[str, ...]
    pool: dict[str, Any] | None

    def settings(self, pg: Postgres, server: str, port: int) -> dict[str, Any]:
        """The settings that matter, as the site's ``settings.py`` builds them."""
        options: dict[str, Any] = {**pg.options, "application_name": self.app_name}
        if self.pool is not None:
            options["pool"] = self.pool
        argv = command(server, port)
        return {
            "DATABASES": {
                "default": {
                    "ENGINE": self.engine,
                    "HOST": pg.host,
                    "PORT": pg.port,
                    "NAME": DEMO_DATABASE,
                    "USER": pg.user,
                    "PASSWORD": "***" if pg.password else "",
                    "CONN_MAX_AGE": REPORT_MAX_AGE,
                    "CONN_HEALTH_CHECKS": True,
                    "OPTIONS": options,
                }
            },
            "MIDDLEWARE": list(self.middleware),
            "server": " ".join(["python", *argv[1:]]) if argv[0] == sys.executable else argv,
        }


def plans(quiet_seconds: float) -> list[RunPlan]:
    """Stock Django with the report's settings, then the same site on connguard: one
    line of ``ENGINE``, a pool, and the middleware."""
    report = {
        "DOCSITE_CONN_MAX_AGE": str(REPORT_MAX_AGE),
        "DOCSITE_HEALTH_CHECKS": "1",
    }
    pool = pool_settings(quiet_seconds)
    return [
        RunPlan(
            key="stock",
            title="stock Django",
            description=(
                f"django.db.backends.postgresql, CONN_MAX_AGE={REPORT_MAX_AGE}, "
                "CONN_HEALTH_CHECKS=True, no middleware (the user report's settings)"
            ),
            app_name="connguard-demo-stock",
            env={
                **report,
                "DOCSITE_ENGINE": "stock",
                "DOCSITE_MIDDLEWARE": "none",
                "DOCSITE_APP_NAME": "connguard-demo-stock",
            },
            engine="django.db.backends.postgresql",
            middleware=(),
            pool=None,
        ),
        RunPlan(
            key="connguard",
            title="connguard",
            description=(
                f"connguard.backends.postgresql, pool min_size {pool['min_size']} "
                f"max_size {pool['max_size']} max_idle {pool['max_idle']:g} s, "
                "ConnguardMiddleware; the same CONN_MAX_AGE and CONN_HEALTH_CHECKS"
            ),
            app_name="connguard-demo-connguard",
            env={
                **report,
                "DOCSITE_ENGINE": "connguard",
                "DOCSITE_MIDDLEWARE": "connguard",
                "DOCSITE_POOL": json.dumps(pool),
                "DOCSITE_APP_NAME": "connguard-demo-connguard",
            },
            engine="connguard.backends.postgresql",
            middleware=("connguard.django.middleware.ConnguardMiddleware",),
            pool=pool,
        ),
    ]


def run_demo(options: DemoOptions, view: View, interrupts: Interrupts) -> DemoResult:
    """Provide the PostgreSQL, create the site, run both plans; remove everything."""
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="connguard-demo-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        if options.dsn is not None:
            pg = connect_existing(options.dsn, stack, min_connections(options.server))
        else:
            check_binaries()
            view.note(
                f"starting an embedded PostgreSQL (max_connections {options.max_connections})"
            )
            pg = start_embedded(options.max_connections, stack, interrupts)
        view.note(pg.describe())
        view.note(f"creating the demo site in database {DEMO_DATABASE} (10 documents x 30 pages)")
        launcher = Launcher(cwd=work)
        migrate(pg, launcher, work)
        # Said once, before the first line that names it (the stock run's settings).
        view.note(f"reproducing the user report, then fixing it. {USER_REPORT}")
        runs = []
        all_plans = plans(options.quiet_seconds)
        for index, plan in enumerate(all_plans):
            view.start_run(plan.title, plan.description, index, len(all_plans))
            result = _run_once(plan, pg, options=options, launcher=launcher, work=work, view=view)
            view.end_run(result)
            runs.append(result)
        return DemoResult(
            version=__version__,
            postgres=pg.as_dict(),
            options=options.as_dict(),
            runs=runs,
            elapsed_seconds=time.monotonic() - started,
        )


def _run_once(
    plan: RunPlan,
    pg: Postgres,
    *,
    options: DemoOptions,
    launcher: Launcher,
    work: Path,
    view: View,
) -> RunResult:
    """One run, measured; a server lost on the way is one line, not a traceback."""
    try:
        return _measure(plan, pg, options=options, launcher=launcher, work=work, view=view)
    except psycopg.Error as exc:
        raise DemoError(
            f"lost PostgreSQL at {pg.where} during the {plan.title} run: {_first_line(exc)}",
            status=1,
        ) from None


def _measure(
    plan: RunPlan,
    pg: Postgres,
    *,
    options: DemoOptions,
    launcher: Launcher,
    work: Path,
    view: View,
) -> RunResult:
    port = options.port if options.port is not None else free_port()
    sessions_before = pg.sessions()
    sampler = BackendSampler(
        pg.conninfo, plan.app_name, SAMPLE_INTERVAL, own_name=MONITOR_APP_NAME, connect_timeout=5
    )
    result = RunResult(
        key=plan.key,
        title=plan.title,
        settings=plan.settings(pg, options.server, port),
        server=options.server,
        processes=SERVERS[options.server],
        requests=options.requests,
        concurrency=options.concurrency,
        quiet_seconds=options.quiet_seconds,
    )
    try:
        with contextlib.ExitStack() as stack:
            try:
                srv = stack.enter_context(
                    launcher.running(options.server, pg.site_db(), work, plan.env, port=port)
                )
            except PortInUse as exc:
                raise DemoError(f"{exc}: pick another --port, or leave it out") from None
            except RuntimeError as exc:
                tail = [line for line in str(exc).splitlines()[1:] if line.strip()]
                raise DemoError(
                    f"{options.server} did not start for the {plan.title} run: "
                    f"{tail[-1] if tail else exc}",
                    status=1,
                ) from None
            pools = PoolSampler(srv.port, POOL_INTERVAL)
            load = Burst()
            cancel = threading.Event()
            stack.callback(cancel.set)
            stack.callback(pools.halt)
            stack.callback(sampler.halt)
            sampler.record()
            sampler.start()
            if plan.pool is not None:
                # Only a site with a pool is polled: every poll is a request, whose
                # allocations may trigger the garbage collection that closes stock
                # Django's leaked connections, which an idle site never runs.
                pools.start()
            worker = threading.Thread(
                target=burst,
                args=(srv.port, image_paths(options.requests), options.concurrency),
                kwargs={"into": load, "cancel": cancel},
                name="connguard-demo-burst",
                daemon=True,
            )
            t0 = time.monotonic()
            state = _state_reader(
                plan, pg, options=options, sampler=sampler, pools=pools, load=load, t0=t0
            )
            worker.start()
            while worker.is_alive():
                view.update(state("burst", None))
                worker.join(TICK)
            # The burst's last word, however short it was: its peak, for every view.
            view.update(state("burst", None, final=True))
            quiet_end = time.monotonic() + options.quiet_seconds
            while (left := quiet_end - time.monotonic()) > 0:
                view.update(state("quiet", left))
                time.sleep(min(TICK, left))
            sampler.halt()
            pools.halt()
            if sampler.error is not None:
                raise DemoError(
                    f"lost PostgreSQL while sampling: {_first_line(sampler.error)}", status=1
                )
            last = sampler.sample()
            at_end = sampler.query(_AT_END_SQL, (plan.app_name,))
            gauges = None
            if plan.pool is not None:
                try:
                    gauges = pools.poll()
                except OSError:
                    gauges = pools.gauges()
        # The server is stopped: its backends go, so that the next run starts clean.
        sampler.wait_for(lambda n: n == 0, BACKENDS_GONE_TIMEOUT)
        log = srv.log_text()
    finally:
        sampler.close()
    sessions_after = pg.sessions()

    result.ok = sum(1 for s in load.statuses if s == 200)
    result.failed = load.failed
    result.failures = load.failures
    result.server_errors = request_errors(log)
    result.latencies = list(load.latencies)
    result.burst_seconds = (load.finished or t0) - (load.started or t0)
    result.peak_backends = max(sampler.peak, last.backends)
    result.backends_at_end = last.backends
    result.idle_in_transaction_at_end = last.idle_in_transaction
    result.samples = [
        {
            "t": round(s.t - t0, 3),
            "backends": s.backends,
            "active": s.active,
            "idle": s.idle,
            "idle_in_transaction": s.idle_in_transaction,
            "other": s.other,
        }
        for s in [*sampler.samples, last]
    ]
    result.pool_samples = [
        {"t": round(t - t0, 3), **g.as_dict()} for t, g in pools.samples if g is not None
    ]
    if sessions_before is not None and sessions_after is not None:
        result.connections_opened = sessions_after - sessions_before
        result.connections_opened_source = "pg_stat_database.sessions"
    else:
        result.connections_opened = len(sampler.backends_seen)
        result.connections_opened_source = "backends seen in pg_stat_activity"
    result.at_end = [{"state": row[0], "idle_seconds": row[1], "query": row[2]} for row in at_end]
    if gauges is not None:
        series = [g for _, g in pools.samples if g is not None] + [gauges]
        result.processes = max(result.processes, gauges.processes)
        result.pool = {
            "min_size": gauges.min_size,
            "max_size": gauges.max_size,
            "processes": result.processes,
            "peak_size": max(g.size for g in series),
            "peak_in_use": max(g.in_use for g in series),
            "peak_waiting": max(g.waiting for g in series),
            "size_at_end": gauges.size,
            "opened": gauges.opened,
        }
    return result


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class _StateReader(Protocol):
    def __call__(
        self, phase: str, quiet_left: float | None, *, final: bool = False
    ) -> LiveState: ...


def _state_reader(
    plan: RunPlan,
    pg: Postgres,
    *,
    options: DemoOptions,
    sampler: BackendSampler,
    pools: PoolSampler,
    load: Burst,
    t0: float,
) -> _StateReader:
    """What the terminal view shows, read from the samplers without stopping them."""

    def state(phase: str, quiet_left: float | None, *, final: bool = False) -> LiveState:
        samples = sampler.samples[-240:]
        pool: PoolGauges | None = pools.samples[-1][1] if pools.samples else None
        elapsed = time.monotonic() - t0
        if final and load.started is not None and load.finished is not None:
            elapsed = load.finished - load.started  # as the run's summary line counts it
        return LiveState(
            key=plan.key,
            title=plan.title,
            phase=phase,
            elapsed=elapsed,
            quiet_left=quiet_left,
            sample=samples[-1] if samples else None,
            history=[s.backends for s in samples],
            max_connections=pg.max_connections,
            pool=pool,
            requests=options.requests,
            done=load.done,
            failed=load.failed,
            failures=dict(load.failures),
            peak=sampler.peak,
            history_seconds=samples[-1].t - samples[0].t if samples else 0.0,
            final=final,
        )

    return state
