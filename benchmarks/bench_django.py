"""Django request throughput and latency: connguard against the alternatives.

One run, real web servers, real PostgreSQL, real HTTP over loopback::

    python benchmarks/bench_django.py [--quick] [--json PATH]

The site is ``tests/docsite`` (configured by environment variables, see its
``settings.py``); every request is ``GET /one``, a view that runs exactly one
query (``SELECT 1``). Servers (started with ``tests/servers.py``):

* ``gunicorn``: gthread worker, 2 processes x 8 threads (WSGI);
* ``uvicorn``: 1 process (ASGI; Django runs the sync view in a thread).

Variants, per server:

* ``persistent``: stock Django backend, ``CONN_MAX_AGE=None``, no middleware;
* ``native``: Django's own pool (psycopg_pool), ``min_size = max_size = N``,
  ``CONN_MAX_AGE=0`` (Django requires it), no middleware;
* ``close``: stock backend, ``CONN_MAX_AGE=0`` and the report's middleware that
  closes every connection after every request;
* ``connguard``: ``ENGINE = connguard.backends.postgresql``, ``min_size = max_size
  = N``, ``ConnguardMiddleware``;
* ``close+scram`` and ``connguard+scram``: the last two against a second
  PostgreSQL that requires a password (scram-sha-256) on TCP, so that every new
  connection costs an authentication handshake.

N (pool size per process) is the same for ``native`` and ``connguard``.

Load: ``wrk`` (``apt-get install -y wrk``), keep-alive HTTP/1.1, a fixed number of
open connections (the concurrency), for a warm-up (discarded) then a timed window.
Without wrk a Python threaded client is used instead, and the report says so:
on 2 cores it is itself the bottleneck, so its figures are not comparable.

Each (server, variant) is started afresh in every round; rounds interleave the
variants in a rotating order, and each figure is the median over rounds.
Everything (PostgreSQL, the web server, the load generator) shares the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.servers import SERVERS, manage, running  # noqa: E402

from connguard.testing.postgres import EmbeddedPostgres  # noqa: E402

POOL_SIZE = 4  # N: connections per process, native pool and connguard alike
CONCURRENCY = 32  # open HTTP connections of the load generator
PATH = "/one"
PASSWORD = "bench-scram-secret"
MAX_CONNECTIONS = 300  # room for the stock variants (one connection per thread or more)
SERVER_NAMES = ("gunicorn", "uvicorn")


@dataclass(frozen=True)
class Params:
    rounds: int
    warmup_s: float
    duration_s: float


FULL = Params(rounds=2, warmup_s=3.0, duration_s=6.0)
QUICK = Params(rounds=1, warmup_s=1.0, duration_s=3.0)


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    db: str  # "trust" or "scram"
    env: dict[str, str]


_POOL = json.dumps({"min_size": POOL_SIZE, "max_size": POOL_SIZE})
VARIANTS = (
    Variant(
        "persistent",
        "stock, CONN_MAX_AGE=None",
        "trust",
        {"DOCSITE_ENGINE": "stock", "DOCSITE_CONN_MAX_AGE": "None", "DOCSITE_MIDDLEWARE": "none"},
    ),
    Variant(
        "native",
        f"Django native pool (N={POOL_SIZE})",
        "trust",
        {
            "DOCSITE_ENGINE": "native",
            "DOCSITE_CONN_MAX_AGE": "0",
            "DOCSITE_POOL": _POOL,
            "DOCSITE_MIDDLEWARE": "none",
        },
    ),
    Variant(
        "close",
        "stock + close-after-request",
        "trust",
        {"DOCSITE_ENGINE": "stock", "DOCSITE_CONN_MAX_AGE": "0", "DOCSITE_MIDDLEWARE": "close"},
    ),
    Variant(
        "connguard",
        f"connguard (N={POOL_SIZE})",
        "trust",
        {
            "DOCSITE_ENGINE": "connguard",
            "DOCSITE_CONN_MAX_AGE": "0",
            "DOCSITE_POOL": _POOL,
            "DOCSITE_MIDDLEWARE": "connguard",
        },
    ),
    Variant(
        "close+scram",
        "stock + close-after-request, scram",
        "scram",
        {"DOCSITE_ENGINE": "stock", "DOCSITE_CONN_MAX_AGE": "0", "DOCSITE_MIDDLEWARE": "close"},
    ),
    Variant(
        "connguard+scram",
        f"connguard (N={POOL_SIZE}), scram",
        "scram",
        {
            "DOCSITE_ENGINE": "connguard",
            "DOCSITE_CONN_MAX_AGE": "0",
            "DOCSITE_POOL": _POOL,
            "DOCSITE_MIDDLEWARE": "connguard",
        },
    ),
)
BY_KEY = {v.key: v for v in VARIANTS}

# (name, numerator, denominator, target ratio of throughputs, what the target says)
RATIOS = (
    ("connguard / native pool", "connguard", "native", 1.0, ">= 1.00"),
    ("connguard / CONN_MAX_AGE=None", "connguard", "persistent", 0.95, ">= 0.95 (within 5%)"),
    ("connguard / close-middleware (scram)", "connguard+scram", "close+scram", 5.0, ">= 5.00"),
    ("connguard / close-middleware (trust)", "connguard", "close", None, "(information)"),
)


# --------------------------------------------------------------------- load generation

WRK_SCRIPT = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {\"requests\": %d, \"duration_us\": %d, \"connect\": %d, \"read\": %d, " ..
    "\"write\": %d, \"status\": %d, \"timeout\": %d, \"p50_us\": %d, \"p90_us\": %d, " ..
    "\"p99_us\": %d, \"mean_us\": %.1f, \"max_us\": %d}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


@dataclass
class Load:
    """One timed window of load."""

    requests: int  # responses received, any status
    ok: int  # 2xx/3xx responses
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: dict[str, int]

    @property
    def rps(self) -> float:
        """Successful requests per second."""
        return self.ok / self.duration_s


def run_wrk(port: int, seconds: float, script: Path) -> Load:
    cmd = [
        "wrk", "-t", "1", "-c", str(CONCURRENCY), "-d", f"{max(1, round(seconds))}s",
        "--timeout", "10s", "--latency", "-s", str(script), f"http://127.0.0.1:{port}{PATH}",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")
    d = json.loads(line.removeprefix("BENCHJSON "))
    errors = {k: int(d[k]) for k in ("connect", "read", "write", "status", "timeout")}
    return Load(
        requests=d["requests"],
        ok=d["requests"] - errors["status"],
        duration_s=d["duration_us"] / 1e6,
        p50_ms=d["p50_us"] / 1e3,
        p90_ms=d["p90_us"] / 1e3,
        p99_ms=d["p99_us"] / 1e3,
        mean_ms=d["mean_us"] / 1e3,
        max_ms=d["max_us"] / 1e3,
        errors=errors,
    )


def run_python_client(port: int, seconds: float) -> Load:
    """Fallback: CONCURRENCY threads, each with one keep-alive connection."""
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    latencies: list[float] = []
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine: list[float] = []
        bad = 0
        failed = 0
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                conn.request("GET", PATH)
                resp = conn.getresponse()
                resp.read()
            except OSError:
                failed += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            mine.append(time.perf_counter() - t0)
            if resp.status >= 400:
                bad += 1
        conn.close()
        with lock:
            latencies.extend(mine)
            errors["status"] += bad
            errors["read"] += failed

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1e3

    return Load(
        requests=len(latencies),
        ok=len(latencies) - errors["status"],
        duration_s=elapsed,
        p50_ms=pct(50),
        p90_ms=pct(90),
        p99_ms=pct(99),
        mean_ms=statistics.fmean(latencies) * 1e3 if latencies else float("nan"),
        max_ms=latencies[-1] * 1e3 if latencies else float("nan"),
        errors=errors,
    )


class LoadGenerator:
    def __init__(self, workdir: Path) -> None:
        self.wrk = shutil.which("wrk")
        self.script = workdir / "summary.lua"
        self.script.write_text(WRK_SCRIPT)

    @property
    def name(self) -> str:
        if self.wrk is None:
            return "python threaded client (wrk not found: figures client-bound)"
        ver = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
        first = (ver.stdout or ver.stderr).splitlines()
        return f"wrk ({first[0].strip() if first else '?'})"

    def run(self, port: int, seconds: float) -> Load:
        if self.wrk is not None:
            return run_wrk(port, seconds, self.script)
        return run_python_client(port, seconds)


# --------------------------------------------------------------------- database side


class Watcher:
    """Counts the site's backends (peak, every 100 ms) and sessions started."""

    def __init__(self, dsn: str, app_name: str) -> None:
        self.app_name = app_name
        self.conn = psycopg.connect(dsn, autocommit=True, application_name="bench-watcher")
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def backends(self) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (self.app_name,),
        ).fetchone()
        return int(row[0]) if row else 0

    def sessions(self) -> int:
        """Sessions ever started on the site's database (flushed with some lag)."""
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        row = self.conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = 'docsite'"
        ).fetchone()
        return int(row[0]) if row else 0

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.backends())

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        self.peak = self.backends()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join()

    def close(self) -> None:
        self.conn.close()


@dataclass
class Database:
    pg: EmbeddedPostgres
    site: dict[str, Any]  # DOCSITE_DB
    dsn: str  # for the watcher, to the site's database

    def hba_methods(self) -> list[str]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT DISTINCT type, auth_method FROM pg_hba_file_rules ORDER BY 1, 2"
            ).fetchall()
        return [f"{t}:{m}" for t, m in rows]


@contextlib.contextmanager
def database(password: str | None) -> Iterator[Database]:
    pg = EmbeddedPostgres(max_connections=MAX_CONNECTIONS, password=password)
    try:
        pg.start()
        pg.psql("CREATE DATABASE docsite")
        site: dict[str, Any] = {"HOST": pg.host, "PORT": pg.port, "NAME": "docsite"}
        site["USER"] = pg.user
        if password is not None:
            site["PASSWORD"] = password
        dsn = f"host={pg.host} port={pg.port} dbname=docsite user={pg.user}"
        if password is not None:
            dsn += f" password={password}"
        # Also proves the credentials work through the site's own settings.
        manage(site, "migrate", "-v", "0", DOCSITE_APP_NAME="bench-migrate")
        yield Database(pg, site, dsn)
    finally:
        pg.cleanup()


# --------------------------------------------------------------------- one measurement


@dataclass
class Sample:
    load: Load
    warmup: Load
    peak_backends: int
    sessions_started: int
    pool_stats: Any


@dataclass
class Cell:
    server: str
    variant: str
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s.load, attr) for s in self.samples)

    @property
    def rps(self) -> float:
        return self.median("rps")

    @property
    def errors(self) -> int:
        return sum(sum(s.load.errors.values()) for s in self.samples)

    @property
    def peak_backends(self) -> int:
        return max(s.peak_backends for s in self.samples)

    @property
    def sessions_per_1k(self) -> float:
        return statistics.median(
            1000 * s.sessions_started / max(1, s.load.requests) for s in self.samples
        )


def fetch_stats(port: int) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/connguard/stats")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def measure(
    server: str,
    variant: Variant,
    *,
    db: Database,
    load: LoadGenerator,
    params: Params,
    log_dir: Path,
    round_no: int,
) -> Sample:
    app = f"bench-{server}-{variant.key}-{round_no}"
    watcher = Watcher(db.dsn, app)
    try:
        with running(server, db.site, log_dir, DOCSITE_APP_NAME=app, **variant.env) as srv:
            warm = load.run(srv.port, params.warmup_s)
            with watcher.sampling():
                before = watcher.sessions()
                timed = load.run(srv.port, params.duration_s)
                after = watcher.sessions()
            stats = fetch_stats(srv.port)
            if srv.process.poll() is not None:
                raise RuntimeError(f"{server} died:\n{srv.log_text()[-3000:]}")
        return Sample(timed, warm, watcher.peak, after - before, stats)
    finally:
        watcher.close()


# --------------------------------------------------------------------- environment


def environment(load: LoadGenerator, dbs: dict[str, Database]) -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    with psycopg.connect(dbs["trust"].dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0,
        "connguard": f"{version('django-connguard')} ({commit})",
        "django": version("django"),
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__}, libpq {psycopg.pq.version()})",
        "psycopg_pool": version("psycopg-pool"),
        "gunicorn": version("gunicorn"),
        "uvicorn": f"{version('uvicorn')} (uvloop {version('uvloop')}, "
        f"httptools {version('httptools')})",
        "asgiref": version("asgiref"),
        "postgresql_server": str(row[0]) if row else "?",
        "pg_hba_trust_server": ", ".join(dbs["trust"].hba_methods()),
        "pg_hba_scram_server": ", ".join(dbs["scram"].hba_methods()),
        "load_generator": load.name,
    }


# --------------------------------------------------------------------- report


def ratio_table(cells: dict[tuple[str, str], Cell]) -> list[dict[str, Any]]:
    out = []
    for server in SERVER_NAMES:
        for name, num, den, target, says in RATIOS:
            a, b = cells.get((server, num)), cells.get((server, den))
            if a is None or b is None or not b.rps:
                continue
            ratio = a.rps / b.rps
            per_round = [
                sa.load.rps / sb.load.rps
                for sa, sb in zip(a.samples, b.samples, strict=False)
                if sb.load.rps
            ]
            out.append(
                {
                    "server": server,
                    "ratio": name,
                    "value": ratio,
                    "per_round": per_round,
                    "target": says,
                    "met": None if target is None else ratio >= target,
                }
            )
    return out


def print_report(
    cells: dict[tuple[str, str], Cell], env: dict[str, Any], params: Params
) -> list[dict[str, Any]]:
    print()
    print("Environment")
    for key, value in env.items():
        print(f"  {key:20} {value}")
    print()
    print(
        f"GET {PATH} (one SELECT 1), {CONCURRENCY} keep-alive connections, "
        f"{params.warmup_s:g} s warm-up + {params.duration_s:g} s timed, "
        f"median of {params.rounds} round(s); pool N={POOL_SIZE} per process"
    )
    width = max(len(v.label) for v in VARIANTS)
    head = (
        f"  {'server':9} {'variant':{width}} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'errors':>6} {'peak conns':>10} {'new conns/1k req':>16}  req/s per round"
    )
    print(head)
    for server in SERVER_NAMES:
        for v in VARIANTS:
            c = cells.get((server, v.key))
            if c is None:
                continue
            rounds = " ".join(f"{s.load.rps:.0f}" for s in c.samples)
            print(
                f"  {server:9} {v.label:{width}} {c.rps:8.0f} {c.median('p50_ms'):7.2f} "
                f"{c.median('p99_ms'):7.2f} {c.errors:6d} {c.peak_backends:10d} "
                f"{c.sessions_per_1k:16.1f}  {rounds}"
            )
    print()
    print("Ratios of throughput (req/s)")
    table = ratio_table(cells)
    for r in table:
        verdict = {None: "", True: "MET", False: "NOT MET"}[r["met"]]
        rounds = " ".join(f"{x:.2f}" for x in r["per_round"])
        print(
            f"  {r['server']:9} {r['ratio']:38} {r['value']:6.2f}  target {r['target']:20} "
            f"{verdict:8} rounds: {rounds}"
        )
    return table


# --------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 short round (smoke run)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    parser.add_argument(
        "--servers", default=",".join(SERVER_NAMES), help="comma-separated subset to run"
    )
    parser.add_argument(
        "--variants", default=",".join(BY_KEY), help="comma-separated subset to run"
    )
    args = parser.parse_args(argv)
    params = QUICK if args.quick else FULL
    servers = [s for s in SERVER_NAMES if s in args.servers.split(",")]
    variants = [v for v in VARIANTS if v.key in args.variants.split(",")]
    began = time.perf_counter()

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_django-")))
        load = LoadGenerator(workdir)
        if load.wrk is None:
            print("WARNING: wrk not found (apt-get install -y wrk); using a Python client, "
                  "which is the bottleneck on a small machine", flush=True)  # fmt: skip
        print("starting PostgreSQL (trust and scram-sha-256) ...", flush=True)
        dbs = {
            "trust": stack.enter_context(database(None)),
            "scram": stack.enter_context(database(PASSWORD)),
        }
        env = environment(load, dbs)
        cells: dict[tuple[str, str], Cell] = {}
        for round_no in range(params.rounds):
            for server in servers:
                shift = round_no % len(variants)
                for v in [*variants[shift:], *variants[:shift]]:
                    print(
                        f"round {round_no + 1}/{params.rounds}: {server} {v.label} ...",
                        end=" ",
                        flush=True,
                    )
                    sample = measure(
                        server,
                        v,
                        db=dbs[v.db],
                        load=load,
                        params=params,
                        log_dir=workdir,
                        round_no=round_no,
                    )
                    cell = cells.setdefault((server, v.key), Cell(server, v.key))
                    cell.samples.append(sample)
                    print(
                        f"{sample.load.rps:.0f} req/s, p99 {sample.load.p99_ms:.1f} ms, "
                        f"errors {sum(sample.load.errors.values())}",
                        flush=True,
                    )

    elapsed = time.perf_counter() - began
    table = print_report(cells, env, params)
    print(f"\ntotal {elapsed:.0f} s")

    if args.json is not None:
        doc = {
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "mode": "quick" if args.quick else "full",
            "params": {
                "rounds": params.rounds,
                "warmup_s": params.warmup_s,
                "duration_s": params.duration_s,
                "concurrency": CONCURRENCY,
                "path": PATH,
                "pool_size_per_process": POOL_SIZE,
                "processes": {s: SERVERS[s] for s in servers},
                "gunicorn": "gthread, 2 workers x 8 threads",
                "postgres_max_connections": MAX_CONNECTIONS,
            },
            "environment": env,
            "variants": {v.key: {"label": v.label, "db": v.db, "env": v.env} for v in variants},
            "results": [
                {
                    "server": c.server,
                    "variant": c.variant,
                    "rps_median": c.rps,
                    "p50_ms_median": c.median("p50_ms"),
                    "p99_ms_median": c.median("p99_ms"),
                    "peak_backends": c.peak_backends,
                    "new_connections_per_1k_requests": c.sessions_per_1k,
                    "samples": [
                        {
                            "rps": s.load.rps,
                            "requests": s.load.requests,
                            "duration_s": s.load.duration_s,
                            "p50_ms": s.load.p50_ms,
                            "p90_ms": s.load.p90_ms,
                            "p99_ms": s.load.p99_ms,
                            "mean_ms": s.load.mean_ms,
                            "max_ms": s.load.max_ms,
                            "errors": s.load.errors,
                            "warmup_rps": s.warmup.rps,
                            "peak_backends": s.peak_backends,
                            "sessions_started": s.sessions_started,
                            "pool_stats": s.pool_stats,
                        }
                        for s in c.samples
                    ],
                }
                for c in cells.values()
            ],
            "ratios": table,
            "elapsed_s": elapsed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
