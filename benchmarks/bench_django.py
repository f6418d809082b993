"""Django request throughput and latency: connguard against the alternatives.

One run, real web servers, real PostgreSQL, real HTTP over loopback::

    python benchmarks/bench_django.py [--quick] [--json PATH] [--rounds R]
                                      [--servers gunicorn,uvicorn] [--variants K,...]
    python benchmarks/bench_django.py --resets [--servers ...]   # reset policies
    python benchmarks/bench_django.py --cycle                    # the same, in-process

The site is the demo/test site that ``tests/servers.py`` serves (its ``SETTINGS``;
configured by environment variables, see that ``settings.py``); every request is
``GET /one``, a view that runs exactly one query (``SELECT 1``). Servers (started
with ``tests/servers.py``):

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

N (pool size per process) is the same for ``native`` and ``connguard`` (4; fewer
than gunicorn's 8 threads, so requests do queue for a connection). Not run by
default: ``native-n8`` and ``connguard-n8``, the same with N = 8, to tell the cost
of queueing from per-request overhead (``--variants persistent,native-n8,connguard-n8``).

Load: ``wrk`` (``apt-get install -y wrk``), keep-alive HTTP/1.1, a fixed number of
open connections (the concurrency). Without wrk a Python threaded client is used
instead and the report says so: on 2 cores it is itself the bottleneck, so its
figures are not comparable with wrk's.

gunicorn gets ``--worker-connections 16`` (via ``GUNICORN_CMD_ARGS``): with
keep-alive, a gthread worker keeps every connection it accepts, and without a cap
one worker typically grabs 25-31 of wrk's 32 connections, so the other idles and
throughput swings by +-30 % from start to start. The cap (= concurrency / workers)
splits them 16/16.

Procedure, per server: start every variant's server at once (idle ones cost
nothing), warm each up, then run R rounds; a round gives each variant one timed
window, in a rotating order. Figures are medians over the rounds, and every
ratio is also computed per round (adjacent windows), so that slow drifts of the
machine's load (other jobs on a shared box) hit both sides of a ratio alike.

``--resets`` runs, instead of the default variants, connguard under each reset
policy (``OPTIONS["pool"]["reset"]``: ``rollback``, ``auto``, ``always``) against
``persistent`` and ``native``, plus two variants whose view changes session state at
every request (``GET /x/guc``, ``benchmarks/bench_views.py``: ``SELECT
set_config('app.tenant', '1', false)``), with ``rollback`` (no reset) and ``auto``
(which then resets at every release). ``--cycle`` measures the same variants
in-process with no HTTP: ``request_started``, ``connection.ensure_connection()``, one
statement through ``connection.cursor()``, ``request_finished``, each cycle timed,
median over thousands of cycles.

``--inprocess`` measures something else, with no server and no load generator:
the CPU time one thread spends per request, calling Django's WSGI handler
directly for ``GET /one`` (one child process per variant, min over batches), so
the per-request overhead of each variant shows without the noise of a loaded,
shared machine. ``--inprocess --profile`` adds a cProfile of the connguard variant.

For each window the script also records CPU time: of the web server's process
tree and of the PostgreSQL cluster's (the postmaster's tree, including exited
backends), per request, which other load on the machine barely affects; and the
CPU used by everything else on the machine ("foreign" load, in cores).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import math
import os
import random
import resource
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

from tests.servers import SERVERS, Server, manage, running  # noqa: E402

from bench_views import GUC_SQL  # noqa: E402
from connguard.testing.postgres import EmbeddedPostgres  # noqa: E402
from machine import dist_version, git_commit, machine  # noqa: E402

POOL_SIZE = 4  # N: connections per process, native pool and connguard alike
CONCURRENCY = 32  # open HTTP connections of the load generator
PATH = "/one"
PASSWORD = "bench-scram-secret"
MAX_CONNECTIONS = 600  # room for the stock variants: under ASGI, CONN_MAX_AGE=None leaks
SERVER_NAMES = ("gunicorn", "uvicorn")
# gthread keeps each keep-alive connection in the worker that accepted it: cap it.
SERVER_ENV = {
    "gunicorn": {"GUNICORN_CMD_ARGS": f"--worker-connections {CONCURRENCY // SERVERS['gunicorn']}"},
    "uvicorn": {},
}


@dataclass(frozen=True)
class Params:
    rounds: int
    warmup_s: int  # per server, once, before the rounds
    window_s: int  # one timed window per variant per round (wrk takes whole seconds)


FULL = Params(rounds=14, warmup_s=3, window_s=1)
QUICK = Params(rounds=3, warmup_s=1, window_s=1)


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    db: str  # "trust" or "scram"
    env: dict[str, str]
    path: str = PATH  # what every request asks for


def _pooled(engine: str, size: int, **pool: str) -> dict[str, str]:
    return {
        "DOCSITE_ENGINE": engine,
        "DOCSITE_CONN_MAX_AGE": "0",
        "DOCSITE_POOL": json.dumps({"min_size": size, "max_size": size, **pool}),
        "DOCSITE_MIDDLEWARE": "connguard" if engine == "connguard" else "none",
    }


_PERSISTENT = {
    "DOCSITE_ENGINE": "stock",
    "DOCSITE_CONN_MAX_AGE": "None",
    "DOCSITE_MIDDLEWARE": "none",
}
_CLOSE = {"DOCSITE_ENGINE": "stock", "DOCSITE_CONN_MAX_AGE": "0", "DOCSITE_MIDDLEWARE": "close"}
N8 = 8  # = gunicorn's threads per worker: no request ever queues for a connection
VARIANTS = (
    Variant("persistent", "stock, CONN_MAX_AGE=None", "trust", _PERSISTENT),
    Variant("native", f"Django native pool (N={POOL_SIZE})", "trust", _pooled("native", POOL_SIZE)),
    Variant("close", "stock + close-after-request", "trust", _CLOSE),
    Variant("connguard", f"connguard (N={POOL_SIZE})", "trust", _pooled("connguard", POOL_SIZE)),
    Variant("close+scram", "stock + close-after-request, scram", "scram", _CLOSE),
    Variant(
        "connguard+scram",
        f"connguard (N={POOL_SIZE}), scram",
        "scram",
        _pooled("connguard", POOL_SIZE),
    ),
)
# Not run by default (--variants): the same pools sized like gunicorn's thread count,
# to tell queueing for a connection apart from per-request overhead.
EXTRA_VARIANTS = (
    Variant("native-n8", f"Django native pool (N={N8})", "trust", _pooled("native", N8)),
    Variant("connguard-n8", f"connguard (N={N8})", "trust", _pooled("connguard", N8)),
    # Without ConnguardMiddleware: the lease goes back at request_finished, as the
    # native pool's connection does, not as soon as the response is ready.
    Variant(
        "connguard-signals",
        f"connguard (N={POOL_SIZE}), no middleware",
        "trust",
        {**_pooled("connguard", POOL_SIZE), "DOCSITE_MIDDLEWARE": "none"},
    ),
)
# --resets: what each reset policy (OPTIONS["pool"]["reset"]) costs per request. The
# "+guc" variants ask for GUC_PATH instead of /one: one statement that changes session
# state (set_config(..., false)), so that "auto" resets at every release; with
# "rollback" the same statement costs no reset (and its state crosses to the next
# request), which isolates the reset's cost from the statement's.
GUC_PATH = "/x/guc"
_BENCH_VIEWS = {"DOCSITE_EXTRA_URLS": "benchmarks.bench_views"}
RESET_VARIANTS = tuple(
    Variant(
        f"connguard-{policy}{suffix}",
        f"connguard (N={POOL_SIZE}), reset={policy}{label}",
        "trust",
        {**_pooled("connguard", POOL_SIZE, reset=policy), **(_BENCH_VIEWS if suffix else {})},
        GUC_PATH if suffix else PATH,
    )
    for policy, suffix, label in (
        ("rollback", "", ""),
        ("auto", "", ""),
        ("always", "", ""),
        ("rollback", "+guc", ", view sets a GUC"),
        ("auto", "+guc", ", view sets a GUC"),
    )
)
RESET_RUN = (
    "persistent",
    "native",
    "connguard-rollback",
    "connguard-auto",
    "connguard-always",
    "connguard-rollback+guc",
    "connguard-auto+guc",
)
# Issue 11's async path (--variants persistent+async,native+async,connguard+async
# --servers uvicorn): an async view that reaches the database through the async ORM
# and sync_to_async (benchmarks/bench_views.py), instead of the sync /one.
ASYNC_PATH = "/x/async"
ASYNC_VARIANTS = tuple(
    Variant(
        f"{v.key}+async", f"{v.label}, async view", "trust", {**v.env, **_BENCH_VIEWS}, ASYNC_PATH
    )
    for v in VARIANTS
    if v.key in ("persistent", "native", "connguard")
)
BY_KEY = {v.key: v for v in (*VARIANTS, *EXTRA_VARIANTS, *RESET_VARIANTS, *ASYNC_VARIANTS)}
# Order of the windows in a round (then rotated round by round): each ratio's two
# sides run next to each other, so a change in the machine's load hits both alike.
RUN_ORDER = (
    "native-n8",
    "connguard-n8",
    "native",
    "connguard",
    "connguard-signals",
    "connguard-rollback",
    "connguard-auto",
    "connguard-always",
    "persistent",
    "connguard-rollback+guc",
    "connguard-auto+guc",
    "close",
    "close+scram",
    "connguard+scram",
    "native+async",
    "connguard+async",
    "persistent+async",
)

# (name, numerator, denominator, target ratio of throughputs, what the target says)
RATIOS = (
    ("connguard / native pool", "connguard", "native", 1.0, ">= 1.00"),
    ("connguard / CONN_MAX_AGE=None", "connguard", "persistent", 0.95, ">= 0.95 (within 5%)"),
    ("connguard / close-middleware (scram)", "connguard+scram", "close+scram", 5.0, ">= 5.00"),
    ("connguard / close-middleware (trust)", "connguard", "close", None, "(information)"),
    ("connguard N=8 / native pool N=8", "connguard-n8", "native-n8", None, "(information)"),
    ("no middleware / native pool", "connguard-signals", "native", None, "(information)"),
    ("connguard N=8 / CONN_MAX_AGE=None", "connguard-n8", "persistent", None, "(information)"),
    ("reset=rollback / native pool", "connguard-rollback", "native", None, "(information)"),
    ("reset=auto / native pool", "connguard-auto", "native", None, "(information)"),
    ("reset=always / native pool", "connguard-always", "native", None, "(information)"),
    (
        "reset=rollback / CONN_MAX_AGE=None",
        "connguard-rollback",
        "persistent",
        None,
        "(information)",
    ),
    ("reset=auto / CONN_MAX_AGE=None", "connguard-auto", "persistent", None, "(information)"),
    ("reset=always / CONN_MAX_AGE=None", "connguard-always", "persistent", None, "(information)"),
    ("reset=auto / reset=rollback", "connguard-auto", "connguard-rollback", None, "(information)"),
    (
        "reset=always / reset=rollback",
        "connguard-always",
        "connguard-rollback",
        None,
        "(information)",
    ),
    (
        "GUC view: auto / rollback",
        "connguard-auto+guc",
        "connguard-rollback+guc",
        None,
        "(information)",
    ),
    ("GUC view: auto / /one auto", "connguard-auto+guc", "connguard-auto", None, "(information)"),
    ("async view: connguard / native pool", "connguard+async", "native+async", 1.0, ">= 1.00"),
    (
        "async view: connguard / CONN_MAX_AGE=None",
        "connguard+async",
        "persistent+async",
        0.95,
        ">= 0.95 (within 5%)",
    ),
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


def run_wrk(port: int, seconds: int, script: Path, path: str = PATH) -> Load:
    cmd = [
        "wrk", "-t", "1", "-c", str(CONCURRENCY), "-d", f"{seconds}s",
        "--timeout", "10s", "--latency", "-s", str(script), f"http://127.0.0.1:{port}{path}",
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


def run_python_client(port: int, seconds: float, path: str = PATH) -> Load:
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
                conn.request("GET", path)
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

    def run(self, port: int, seconds: int, path: str = PATH) -> Load:
        if self.wrk is not None:
            return run_wrk(port, seconds, self.script, path)
        return run_python_client(port, seconds, path)


# --------------------------------------------------------------------- CPU accounting

_TICK = os.sysconf("SC_CLK_TCK")


def _all_stats() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, own CPU ticks, reaped children's CPU ticks), from /proc."""
    out: dict[int, tuple[int, int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2 :].split()  # after "pid (comm) "
        # fields[0] is state (field 3); ppid is field 4; utime..cstime are 14..17
        out[int(entry.name)] = (
            int(fields[1]),
            int(fields[11]) + int(fields[12]),
            int(fields[13]) + int(fields[14]),
        )
    return out


def tree_cpu(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each root's process tree, exited members included
    (their time is in their reaper's "children" counters)."""
    stats = _all_stats()
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (ppid, _, _) in stats.items():
        children[ppid].append(pid)
    out: dict[str, float] = {}
    for name, root in roots.items():
        ticks, todo = 0, [root]
        while todo:
            pid = todo.pop()
            if pid in stats:
                ticks += stats[pid][1] + stats[pid][2]
                todo.extend(children.get(pid, ()))
        out[name] = ticks / _TICK
    return out


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores)."""
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    idle = cpu[3] + cpu[4]  # idle + iowait
    return (sum(cpu[:8]) - idle) / _TICK  # user..steal (guest time is in user)


def own_cpu() -> float:
    """CPU seconds of this process and its reaped children (wrk)."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


# --------------------------------------------------------------------- database side


class Watcher:
    """A side connection to a cluster: counts a site's backends (peak, every 100 ms)
    and the sessions started on the site's database."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, application_name="bench-watcher")
        self.peak = 0
        self._stop = threading.Event()

    def backends(self, app: str) -> int:
        # connguard tags its connections "<application_name>|cg|host|pid|alias".
        row = self.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %(app)s "
            "OR starts_with(application_name, %(app)s || '|')",
            {"app": app},
        ).fetchone()
        return int(row[0]) if row else 0

    def sessions(self) -> int:
        """Sessions ever started on the site's database (flushed with some lag)."""
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        row = self.conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = 'docsite'"
        ).fetchone()
        return int(row[0]) if row else 0

    def settled_sessions(self, timeout: float = 1.0) -> int:
        """:meth:`sessions` once two readings 50 ms apart agree: backends report
        their session when they flush statistics, a little after they start."""
        deadline = time.monotonic() + timeout
        last = self.sessions()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.sessions()
            if now == last:
                break
            last = now
        return last

    @contextlib.contextmanager
    def sampling(self, app: str) -> Iterator[None]:
        self.peak = self.backends(app)
        self._stop.clear()

        def run() -> None:
            while not self._stop.wait(0.1):
                self.peak = max(self.peak, self.backends(app))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()

    def close(self) -> None:
        self.conn.close()


@dataclass
class Database:
    pg: EmbeddedPostgres
    site: dict[str, Any]  # DOCSITE_DB
    dsn: str  # to the site's database, for the watcher
    watcher: Watcher

    @property
    def postmaster(self) -> int:
        pid = self.pg.pid
        if pid is None:
            raise RuntimeError("PostgreSQL is not running")
        return pid

    def hba_methods(self) -> list[str]:
        rows = self.watcher.conn.execute(
            "SELECT DISTINCT type, auth_method FROM pg_hba_file_rules ORDER BY 1, 2"
        ).fetchall()
        return [f"{t}:{m}" for t, m in rows]

    def password_encryption(self) -> str:
        row = self.watcher.conn.execute("SHOW password_encryption").fetchone()
        return str(row[0]) if row else "?"


@contextlib.contextmanager
def database(password: str | None) -> Iterator[Database]:
    pg = EmbeddedPostgres(max_connections=MAX_CONNECTIONS, password=password)
    try:
        pg.start()
        pg.psql("CREATE DATABASE docsite")
        site: dict[str, Any] = {"HOST": pg.host, "PORT": pg.port, "NAME": "docsite"}
        site["USER"] = pg.user
        dsn = f"host={pg.host} port={pg.port} dbname=docsite user={pg.user}"
        if password is not None:
            site["PASSWORD"] = password
            dsn += f" password={password}"
        # Also proves the credentials work through the site's own settings.
        manage(site, "migrate", "-v", "0", DOCSITE_APP_NAME="bench-migrate")
        watcher = Watcher(dsn)
        try:
            yield Database(pg, site, dsn, watcher)
        finally:
            watcher.close()
    finally:
        pg.cleanup()


# --------------------------------------------------------------------- measurements


@dataclass
class Sample:
    """One timed window of one variant."""

    round_no: int
    load: Load
    web_cpu_s: float  # the web server's process tree
    pg_cpu_s: float  # the PostgreSQL cluster serving it
    bench_cpu_s: float  # this script and wrk
    foreign_cores: float  # everything else on the machine, in cores
    sessions_started: int
    peak_backends: int

    def per_request_us(self, seconds: float) -> float:
        return 1e6 * seconds / max(1, self.load.requests)

    def as_dict(self) -> dict[str, Any]:
        return {
            "round": self.round_no,
            "rps": self.load.rps,
            "requests": self.load.requests,
            "duration_s": self.load.duration_s,
            "p50_ms": self.load.p50_ms,
            "p90_ms": self.load.p90_ms,
            "p99_ms": self.load.p99_ms,
            "mean_ms": self.load.mean_ms,
            "max_ms": self.load.max_ms,
            "errors": self.load.errors,
            "web_cpu_us_per_request": self.per_request_us(self.web_cpu_s),
            "pg_cpu_us_per_request": self.per_request_us(self.pg_cpu_s),
            "bench_and_wrk_cpu_s": self.bench_cpu_s,
            "foreign_load_cores": self.foreign_cores,
            "sessions_started": self.sessions_started,
            "peak_backends": self.peak_backends,
        }


@dataclass
class Cell:
    server: str
    variant: str
    samples: list[Sample] = field(default_factory=list)
    warmup: Load | None = None
    pool_stats: Any = None

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s.load, attr) for s in self.samples)

    @property
    def rps(self) -> float:
        return self.median("rps")

    @property
    def web_us(self) -> float:
        return statistics.median(s.per_request_us(s.web_cpu_s) for s in self.samples)

    @property
    def pg_us(self) -> float:
        return statistics.median(s.per_request_us(s.pg_cpu_s) for s in self.samples)

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

    @property
    def foreign(self) -> float:
        return statistics.median(s.foreign_cores for s in self.samples)


def fetch_stats(port: int) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/connguard/stats")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def window(
    srv: Server,
    app: str,
    db: Database,
    *,
    load: LoadGenerator,
    seconds: int,
    round_no: int,
    path: str = PATH,
) -> Sample:
    roots = {"web": srv.process.pid, "pg": db.postmaster}
    with db.watcher.sampling(app):
        sessions0 = db.watcher.settled_sessions()
        cpu0, busy0, own0 = tree_cpu(roots), machine_busy(), own_cpu()
        t0 = time.monotonic()
        timed = load.run(srv.port, seconds, path)
        elapsed = time.monotonic() - t0
        cpu1, busy1, own1 = tree_cpu(roots), machine_busy(), own_cpu()
        sessions1 = db.watcher.settled_sessions()
    if srv.process.poll() is not None:
        raise RuntimeError(f"{srv.name} died:\n{srv.log_text()[-3000:]}")
    web, pg, own = cpu1["web"] - cpu0["web"], cpu1["pg"] - cpu0["pg"], own1 - own0
    foreign = max(0.0, (busy1 - busy0) - web - pg - own) / elapsed
    return Sample(
        round_no=round_no,
        load=timed,
        web_cpu_s=web,
        pg_cpu_s=pg,
        bench_cpu_s=own,
        foreign_cores=foreign,
        sessions_started=sessions1 - sessions0,
        peak_backends=db.watcher.peak,
    )


def bench_server(
    server: str,
    variants: list[Variant],
    dbs: dict[str, Database],
    *,
    load: LoadGenerator,
    params: Params,
    log_dir: Path,
) -> dict[str, Cell]:
    """Every variant's server up at once; warm-up, then rounds of windows."""
    cells = {v.key: Cell(server, v.key) for v in variants}
    apps = {v.key: f"bench-{server}-{v.key}" for v in variants}
    with contextlib.ExitStack() as stack:
        srvs: dict[str, Server] = {}
        for v in variants:
            env = {**SERVER_ENV[server], **v.env, "DOCSITE_APP_NAME": apps[v.key]}
            srvs[v.key] = stack.enter_context(running(server, dbs[v.db].site, log_dir, **env))
        for v in variants:
            cells[v.key].warmup = load.run(srvs[v.key].port, params.warmup_s, v.path)
        for r in range(params.rounds):
            shift = r % len(variants)
            order = [*variants[shift:], *variants[:shift]]
            line = []
            for v in order:
                sample = window(
                    srvs[v.key],
                    apps[v.key],
                    dbs[v.db],
                    load=load,
                    seconds=params.window_s,
                    round_no=r,
                    path=v.path,
                )
                cells[v.key].samples.append(sample)
                line.append(f"{v.key} {sample.load.rps:.0f}")
            print(f"  {server} round {r + 1}/{params.rounds}: " + ", ".join(line), flush=True)
        for v in variants:
            cells[v.key].pool_stats = fetch_stats(srvs[v.key].port)
    return cells


# --------------------------------------------------------------------- environment


def _connguard_src() -> Path:
    """The source tree the servers import connguard from (PYTHONPATH may name a
    worktree of another commit)."""
    import connguard

    return Path(connguard.__file__).parents[1]


def environment(load: LoadGenerator, dbs: dict[str, Database]) -> dict[str, Any]:
    version = dist_version
    row = dbs["trust"].watcher.conn.execute("SHOW server_version").fetchone()
    return {
        **machine(),
        "connguard": f"{version('django-connguard')} (git {git_commit(_connguard_src())})",
        "connguard_src": str(_connguard_src()),
        "django": version("django"),
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__}, libpq {psycopg.pq.version()})",
        "psycopg_pool": version("psycopg-pool"),
        "gunicorn": version("gunicorn"),
        "uvicorn": f"{version('uvicorn')} (uvloop {version('uvloop')}, "
        f"httptools {version('httptools')})",
        "asgiref": version("asgiref"),
        "postgresql_server": str(row[0]) if row else "?",
        "pg_hba_trust_server": ", ".join(dbs["trust"].hba_methods()),
        "pg_hba_scram_server": ", ".join(dbs["scram"].hba_methods())
        + f" (password_encryption={dbs['scram'].password_encryption()})",
        "load_generator": load.name,
        "loadavg_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# --------------------------------------------------------------------- report


BOOTSTRAP = 2000  # resamples for the interval of a paired median


def median_interval(values: list[float], *, seed: int = 0) -> tuple[float, float]:
    """A 95 % interval for the median of ``values`` (per-round paired ratios), by
    the bootstrap: the median of ``values`` resampled with replacement, BOOTSTRAP
    times, and the 2.5th and 97.5th percentiles of those medians. Seeded, so a
    report reads the same twice. On this machine one window's ratio moves by tens of
    percent; the interval says whether the rounds run are enough to tell."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (math.nan, math.nan)
    rng = random.Random(seed)
    medians = sorted(
        statistics.median(rng.choices(values, k=len(values))) for _ in range(BOOTSTRAP)
    )
    return medians[int(0.025 * BOOTSTRAP)], medians[int(0.975 * BOOTSTRAP) - 1]


def verdict(low: float, high: float, target: float, *, at_least: bool = True) -> str:
    """MET when the whole interval is on the target's side, NOT MET when none of it
    is, else UNDECIDED (more rounds would tell)."""
    if not at_least:  # "at most": the same question, mirrored
        low, high, target = -high, -low, -target
    if low >= target:
        return "MET"
    if high < target:
        return "NOT MET"
    return "UNDECIDED"


def paired_ratios(a: Cell, b: Cell, attr: str) -> list[float]:
    """Per round, ``a``'s figure ``attr`` (of its load) over ``b``'s."""
    return [
        getattr(sa.load, attr) / getattr(sb.load, attr)
        for sa, sb in zip(a.samples, b.samples, strict=True)
        if getattr(sb.load, attr)
    ]


def ratio_table(cells: dict[tuple[str, str], Cell]) -> list[dict[str, Any]]:
    out = []
    for server in SERVER_NAMES:
        for name, num, den, target, says in RATIOS:
            a, b = cells.get((server, num)), cells.get((server, den))
            if a is None or b is None or not b.rps:
                continue
            ratio = a.rps / b.rps
            paired = paired_ratios(a, b, "rps")
            low, high = median_interval(paired)
            cpu_a, cpu_b = a.web_us + a.pg_us, b.web_us + b.pg_us
            row = {
                "server": server,
                "ratio": name,
                "value": ratio,
                "paired_median": statistics.median(paired),
                "paired_interval_95": [low, high],
                "paired_min": min(paired),
                "paired_max": max(paired),
                "per_round": paired,
                "cpu_per_request_other_over_connguard": cpu_b / cpu_a if cpu_a else None,
                "cpu_us_per_request_difference": cpu_a - cpu_b,
                "target": says,
                "met": None if target is None else ratio >= target,
                "verdict": None if target is None else verdict(low, high, target),
            }
            if (num, den) in (("connguard", "native"), ("connguard+async", "native+async")):
                # The other end-to-end target: a p99 no worse than the native
                # pool's (per round, connguard's p99 over native's: at most 1).
                p99 = paired_ratios(a, b, "p99_ms")
                p_low, p_high = median_interval(p99)
                row["p99_paired_median"] = statistics.median(p99)
                row["p99_paired_interval_95"] = [p_low, p_high]
                row["p99_verdict"] = verdict(p_low, p_high, 1.0, at_least=False)
            out.append(row)
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
        f"GET {PATH} (one SELECT 1), {CONCURRENCY} keep-alive connections; "
        f"{params.warmup_s} s warm-up, then {params.rounds} rounds of one {params.window_s} s "
        f"window per variant; medians over rounds; pool N={POOL_SIZE} per process"
    )
    width = max(len(v.label) for v in BY_KEY.values())
    print(
        f"  {'server':9} {'variant':{width}} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'errors':>6} {'web µs/req':>10} {'PG µs/req':>9} {'new conns/1k':>12} "
        f"{'peak conns':>10} {'foreign':>7}"
    )
    for server in SERVER_NAMES:
        for v in BY_KEY.values():
            c = cells.get((server, v.key))
            if c is None:
                continue
            print(
                f"  {server:9} {v.label:{width}} {c.rps:7.0f} {c.median('p50_ms'):7.2f} "
                f"{c.median('p99_ms'):7.2f} {c.errors:6d} {c.web_us:10.0f} {c.pg_us:9.0f} "
                f"{c.sessions_per_1k:12.1f} {c.peak_backends:10d} {c.foreign:7.2f}"
            )
    print(
        "  (web/PG µs/req: CPU time of the server's / PostgreSQL's processes per request;"
        "\n   foreign: cores used by other processes on the machine during the windows)"
    )
    others = {
        v.path for v in BY_KEY.values() if v.path != PATH and any(k[1] == v.key for k in cells)
    }
    what = {
        GUC_PATH: f"one `{GUC_SQL}` instead",
        ASYNC_PATH: "an async view: one async ORM query, one SELECT 1 through sync_to_async",
    }
    for other in sorted(others):
        print(f"  (variants marked so ask for GET {other}: {what[other]})")
    resets = [(k, c) for k, c in cells.items() if isinstance(c.pool_stats, list) and c.pool_stats]
    if resets:
        print("  connguard resets (rollback or full) per 1000 releases, one worker's pools:")
        for (server, key), c in resets:
            rel = sum(p.get("releases", 0) for p in c.pool_stats)
            res = sum(p.get("resets", 0) for p in c.pool_stats)
            print(f"    {server:9} {key:24} {1000 * res / max(1, rel):7.1f}  ({res}/{rel})")
    print()
    print(
        "Ratios of throughput: of medians; and median [min-max] of the per-round paired "
        "ratios; CPU/req: other ÷ connguard (web + PG), and connguard - other in µs"
    )
    print(
        "  (verdict: MET or NOT MET when the 95 % interval of the paired median, by the "
        "bootstrap, lies\n   on one side of the target; UNDECIDED when it spans it: more "
        "rounds would tell)"
    )
    table = ratio_table(cells)
    for r in table:
        cpu = r["cpu_per_request_other_over_connguard"]
        low, high = r["paired_interval_95"]
        print(
            f"  {r['server']:9} {r['ratio']:37} {r['value']:5.2f}  paired "
            f"{r['paired_median']:5.2f} (95 % {low:.2f}-{high:.2f}) "
            f"[{r['paired_min']:.2f}-{r['paired_max']:.2f}]  "
            f"CPU/req {cpu:5.2f} ({r['cpu_us_per_request_difference']:+5.0f} µs)  "
            f"target {r['target']:20} {r['verdict'] or ''}"
        )
        if "p99_verdict" in r:
            p_low, p_high = r["p99_paired_interval_95"]
            print(
                f"  {r['server']:9} {'  p99, connguard / native pool':37} {'':5}  paired "
                f"{r['p99_paired_median']:5.2f} (95 % {p_low:.2f}-{p_high:.2f})  "
                f"target <= 1.00 {'':14} {r['p99_verdict']}"
            )
    return table


# --------------------------------------------------------------------- in-process mode

INPROCESS_VARIANTS = ("persistent", "native", "connguard", "connguard-nomw")
INPROCESS_BATCHES = 5


def _inprocess_env(key: str) -> dict[str, str]:
    if key == "connguard-nomw":  # the engine alone, without ConnguardMiddleware
        return {**BY_KEY["connguard"].env, "DOCSITE_MIDDLEWARE": "none"}
    return BY_KEY[key].env


def inprocess_child(key: str, n: int, profile: bool) -> None:
    """Runs in a child process whose environment selects the variant."""
    import cProfile
    import io
    import pstats
    from wsgiref.util import setup_testing_defaults

    from django.core.wsgi import get_wsgi_application

    app = get_wsgi_application()
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        statuses.append(status)

    def one() -> None:
        environ: dict[str, Any] = {"PATH_INFO": PATH, "REQUEST_METHOD": "GET"}
        setup_testing_defaults(environ)
        response = app(environ, start_response)
        for _ in response:
            pass
        response.close()  # sends request_finished, as every WSGI server does

    for _ in range(max(200, n // 5)):
        one()
    cpu, wall = [], []
    for _ in range(INPROCESS_BATCHES):
        c0, w0 = time.thread_time(), time.perf_counter()
        for _ in range(n):
            one()
        cpu.append((time.thread_time() - c0) / n * 1e6)
        wall.append((time.perf_counter() - w0) / n * 1e6)
    if any(not st.startswith("200") for st in statuses):
        raise RuntimeError(f"{key}: non-200 responses: {sorted(set(statuses))}")
    print("INPROCESS " + json.dumps({"variant": key, "cpu_us": cpu, "wall_us": wall}))
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            one()
        prof.disable()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(r"connguard|django/db|dispatch", 45)
        print(out.getvalue())


def inprocess(db: Database, n: int, profile: bool, rounds: int) -> list[dict[str, Any]]:
    """Each variant in its own child process, ``rounds`` times, variants interleaved."""
    from tests.servers import site_env

    merged: dict[str, dict[str, Any]] = {
        k: {"variant": k, "cpu_us": [], "wall_us": []} for k in INPROCESS_VARIANTS
    }
    for r in range(rounds):
        for key in INPROCESS_VARIANTS:
            env = site_env(
                db.site, DOCSITE_APP_NAME=f"bench-inprocess-{key}", **_inprocess_env(key)
            )
            cmd = [sys.executable, __file__, "--inprocess-child", key, "--requests", str(n)]
            if profile and key == "connguard" and r == rounds - 1:
                cmd.append("--profile")
            out = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
            )
            if out.returncode != 0:
                raise RuntimeError(f"in-process {key} failed:\n{out.stdout}\n{out.stderr}")
            lines = out.stdout.splitlines()
            line = next(ln for ln in lines if ln.startswith("INPROCESS "))
            got = json.loads(line.removeprefix("INPROCESS "))
            merged[key]["cpu_us"] += got["cpu_us"]
            merged[key]["wall_us"] += got["wall_us"]
            if "--profile" in cmd:
                print("\n".join(ln for ln in lines if not ln.startswith("INPROCESS ")))
        print(f"  in-process round {r + 1}/{rounds} done", flush=True)
    results = [merged[k] for k in INPROCESS_VARIANTS]
    base = min(results[0]["cpu_us"])
    print()
    print(
        f"In-process WSGI, one thread, GET {PATH}: µs per request, min [median] of "
        f"{rounds} x {INPROCESS_BATCHES} batches of {n} (variants interleaved)"
    )
    print(f"  {'variant':16} {'thread CPU':>18} {'wall':>18} {'CPU - persistent':>17}")
    for r in results:
        cpu, wall = r["cpu_us"], r["wall_us"]
        print(
            f"  {r['variant']:16} {min(cpu):8.1f} [{statistics.median(cpu):6.1f}] "
            f"{min(wall):8.1f} [{statistics.median(wall):6.1f}] {min(cpu) - base:+17.1f}"
        )
    print("  (connguard-nomw: connguard's engine without ConnguardMiddleware)")
    return results


# --------------------------------------------------------------------- request cycle, in-process

# --cycle: no server, no HTTP, no URL resolution, no middleware: what one request
# costs the database layer, per reset policy. A cycle is what Django's handler does
# around a view that runs one statement:
#     request_started -> connection.ensure_connection() -> one statement through
#     connection.cursor() (executed, one row fetched) -> request_finished
# with every receiver of both signals (Django's close_old_connections, connguard's
# request scope). Each cycle is timed on its own.
#
# This machine's speed drifts by up to 2x from one second to the next (a shared VM),
# so all variants run in one process, each on its own database alias
# (benchmarks/bench_cycle_settings.py), in short batches in a rotating order; the
# figures are medians over all cycles, and differences are also taken batch by batch
# (adjacent batches of one round).
CYCLE_SETTINGS = "benchmarks.bench_cycle_settings"
CYCLE_VARIANTS = RESET_RUN
CYCLE_ALIAS = {  # variant -> its alias in CYCLE_SETTINGS
    "persistent": "default",
    "native": "native",
    "connguard-rollback": "rollback",
    "connguard-auto": "auto",
    "connguard-always": "always",
    "connguard-rollback+guc": "rollback_guc",
    "connguard-auto+guc": "auto_guc",
}
CYCLE_PROCESSES = 3  # child processes, one after the other
CYCLE_ROUNDS = 100  # per process: rounds of one batch per variant
CYCLE_BATCH = 40  # cycles per batch
CYCLE_QUICK = (1, 10)  # --quick: processes, rounds


def _cycle_statement(key: str) -> str:
    return GUC_SQL if BY_KEY[key].path == GUC_PATH else "SELECT 1"


def _backend_ticks(cursor: Any) -> dict[str, int]:
    """CPU ticks used so far by each alias's PostgreSQL backends (from /proc)."""
    cursor.execute(
        "SELECT application_name, pid FROM pg_stat_activity "
        "WHERE application_name LIKE 'bench-cycle-%'"
    )
    stats = _all_stats()
    out: dict[str, int] = collections.defaultdict(int)
    for app, pid in cursor.fetchall():
        alias = app.split("|", 1)[0].removeprefix("bench-cycle-")
        if pid in stats:
            out[alias] += stats[pid][1]
    return out


def cycle_child(rounds: int, batch: int) -> None:
    """Runs in a child process with DJANGO_SETTINGS_MODULE=CYCLE_SETTINGS."""
    import django
    from django.core import signals
    from django.core.handlers.wsgi import WSGIHandler

    django.setup()
    from django.db import connections

    from connguard.django import pools

    started, finished = signals.request_started.send, signals.request_finished.send

    def make(key: str) -> Any:
        alias, sql = CYCLE_ALIAS[key], _cycle_statement(key)
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": BY_KEY[key].path}

        def one() -> None:
            started(sender=WSGIHandler, environ=environ)
            connection = connections[alias]  # as django.db.connection looks it up
            connection.ensure_connection()
            with connection.cursor() as cursor:
                cursor.execute(sql)
                cursor.fetchone()
            finished(sender=WSGIHandler)

        return one

    ones = {key: make(key) for key in CYCLE_VARIANTS}
    for one in ones.values():
        for _ in range(300):
            one()
    counters0 = {p.name: (p.stats().releases, p.stats().resets) for p in pools.pools()}
    with connections["default"].cursor() as side:
        pg0 = _backend_ticks(side)
    clock, cpu_clock, proc_clock = time.perf_counter_ns, time.thread_time_ns, time.process_time_ns
    times: dict[str, list[int]] = {key: [] for key in CYCLE_VARIANTS}
    cpu = dict.fromkeys(CYCLE_VARIANTS, 0)
    proc = dict.fromkeys(CYCLE_VARIANTS, 0)  # all threads: a background reset counts
    batch_medians: dict[str, list[float]] = {key: [] for key in CYCLE_VARIANTS}
    for r in range(rounds):
        shift = r % len(CYCLE_VARIANTS)
        for key in (*CYCLE_VARIANTS[shift:], *CYCLE_VARIANTS[:shift]):
            one, buf = ones[key], [0] * batch
            c0, p0 = cpu_clock(), proc_clock()
            for i in range(batch):
                t0 = clock()
                one()
                buf[i] = clock() - t0
            cpu[key] += cpu_clock() - c0
            proc[key] += proc_clock() - p0
            times[key] += buf
            batch_medians[key].append(statistics.median(buf))
    with connections["default"].cursor() as side:
        pg1 = _backend_ticks(side)
    counters1 = {p.name: (p.stats().releases, p.stats().resets) for p in pools.pools()}
    doc = {
        key: {
            "wall_ns": times[key],
            "batch_median_ns": batch_medians[key],
            "cpu_ns": cpu[key],
            "proc_ns": proc[key],
            # per alias: both figures are shared by the variants of one alias (none here)
            "pg_ticks": pg1.get(CYCLE_ALIAS[key], 0) - pg0.get(CYCLE_ALIAS[key], 0),
            "releases": counters1.get(CYCLE_ALIAS[key], (0, 0))[0]
            - counters0.get(CYCLE_ALIAS[key], (0, 0))[0],
            "resets": counters1.get(CYCLE_ALIAS[key], (0, 0))[1]
            - counters0.get(CYCLE_ALIAS[key], (0, 0))[1],
        }
        for key in CYCLE_VARIANTS
    }
    print("CYCLE " + json.dumps(doc))


def cycle(db: Database, processes: int, rounds: int, batch: int) -> list[dict[str, Any]]:
    """``processes`` child processes, one after the other, each running every variant
    in ``rounds`` rounds of one ``batch`` per variant (rotating order)."""
    from tests.servers import site_env

    merged: dict[str, dict[str, Any]] = {
        key: {
            "wall_ns": [],
            "batch_median_ns": [],
            "cpu_ns": 0,
            "proc_ns": 0,
            "pg_ticks": 0,
            "rel": 0,
            "res": 0,
        }
        for key in CYCLE_VARIANTS
    }
    for n in range(processes):
        env = {**site_env(db.site), "DJANGO_SETTINGS_MODULE": CYCLE_SETTINGS}
        cmd = [
            sys.executable, __file__, "--cycle-child", "--rounds", str(rounds),
            "--requests", str(batch),
        ]  # fmt: skip
        out = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
        )
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("CYCLE ")), None)
        if out.returncode != 0 or line is None:
            raise RuntimeError(f"cycle child failed:\n{out.stdout}\n{out.stderr}")
        for key, got in json.loads(line.removeprefix("CYCLE ")).items():
            into = merged[key]
            into["wall_ns"] += got["wall_ns"]
            into["batch_median_ns"] += got["batch_median_ns"]
            into["cpu_ns"] += got["cpu_ns"]
            into["proc_ns"] += got["proc_ns"]
            into["pg_ticks"] += got["pg_ticks"]
            into["rel"] += got["releases"]
            into["res"] += got["resets"]
        print(f"  cycle process {n + 1}/{processes} done", flush=True)
    results = []
    for key in CYCLE_VARIANTS:
        m = merged[key]
        wall, cycles = sorted(m["wall_ns"]), len(m["wall_ns"])
        results.append(
            {
                "variant": key,
                "label": BY_KEY[key].label,
                "statement": _cycle_statement(key),
                "cycles": cycles,
                "median_us": statistics.median(wall) / 1e3,
                "p10_us": wall[cycles // 10] / 1e3,
                "p90_us": wall[cycles * 9 // 10] / 1e3,
                "thread_cpu_us": m["cpu_ns"] / cycles / 1e3,
                "process_cpu_us": m["proc_ns"] / cycles / 1e3,
                "pg_cpu_us": m["pg_ticks"] / _TICK / cycles * 1e6,
                "connguard_resets_per_release": m["res"] / m["rel"] if m["rel"] else None,
                "batch_median_ns": m["batch_median_ns"],
            }
        )
    by = {r["variant"]: r for r in results}
    for r in results:
        same_view = "connguard-rollback+guc" if r["variant"].endswith("+guc") else None
        bases = {
            "persistent": "persistent",
            "native": "native",
            "rollback": same_view or "connguard-rollback",
        }
        for name, base in bases.items():
            mine, theirs = r["batch_median_ns"], by[base]["batch_median_ns"]
            r[f"minus_{name}_us"] = r["median_us"] - by[base]["median_us"]
            r[f"minus_{name}_paired_us"] = (
                statistics.median(a - b for a, b in zip(mine, theirs, strict=True)) / 1e3
            )
    print()
    print(
        "In-process request cycle, one thread: request_started, ensure_connection(), one "
        "statement\nthrough connection.cursor(), request_finished; µs per cycle; every "
        f"variant in one process, {processes} x {rounds} rounds of {batch} cycles (interleaved)"
    )
    width = max(len(k) for k in CYCLE_VARIANTS)
    print(
        f"  {'variant':{width}} {'median':>7} {'p10':>7} {'p90':>7} {'CPU':>7} {'proc':>7} "
        f"{'PG CPU':>7}"
        f"  {'- persistent':>15} {'- native':>15} {'- rollback':>15} {'resets':>7}"
    )
    for r in results:
        diffs = "".join(
            f" {r[f'minus_{name}_us']:+7.1f} [{r[f'minus_{name}_paired_us']:+6.1f}]"
            for name in ("persistent", "native", "rollback")
        )
        resets = r["connguard_resets_per_release"]
        print(
            f"  {r['variant']:{width}} {r['median_us']:7.1f} {r['p10_us']:7.1f} "
            f"{r['p90_us']:7.1f} {r['thread_cpu_us']:7.1f} {r['process_cpu_us']:7.1f} "
            f"{r['pg_cpu_us']:7.1f} {diffs}" + (f" {resets:7.0%}" if resets is not None else "")
        )
    print(
        "  (median/p10/p90: wall time of one cycle; CPU: the thread's; proc: the process's,\n"
        "   all threads (a reset run by a background thread counts); PG CPU: the alias's\n"
        "   backends' (10 ms ticks); differences: of the medians [median of the per-round\n"
        "   differences of batch medians]; resets: connguard's releases that reset (rollback\n"
        f"   or full); +guc rows run `{GUC_SQL}`\n"
        "   and their '- rollback' is against connguard-rollback+guc)"
    )
    return results


# --------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 short rounds (smoke run)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument(
        "--servers", default=",".join(SERVER_NAMES), help="comma-separated subset to run"
    )
    parser.add_argument(
        "--variants",
        default=",".join(v.key for v in VARIANTS),
        help=f"comma-separated, from: {', '.join(BY_KEY)} (default: all but the last two)",
    )
    parser.add_argument(
        "--inprocess",
        action="store_true",
        help="instead: CPU per request of Django's WSGI handler called in-process",
    )
    parser.add_argument("--profile", action="store_true", help="with --inprocess: cProfile")
    parser.add_argument(
        "--resets",
        action="store_true",
        help="the reset policies' variants: " + ",".join(RESET_RUN) + " (instead of --variants)",
    )
    parser.add_argument(
        "--cycle",
        action="store_true",
        help="instead: the request cycle in-process, no HTTP (request_started, "
        "ensure_connection, one statement, request_finished), per reset policy",
    )
    parser.add_argument(
        "--requests",
        type=int,
        help=f"--inprocess batch size (1500); --cycle cycles per batch ({CYCLE_BATCH})",
    )
    parser.add_argument("--inprocess-child", metavar="VARIANT", help=argparse.SUPPRESS)
    parser.add_argument("--cycle-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inprocess_child:
        inprocess_child(args.inprocess_child, args.requests or 1500, args.profile)
        return 0
    if args.cycle_child:
        cycle_child(args.rounds or CYCLE_ROUNDS, args.requests or CYCLE_BATCH)
        return 0
    if args.inprocess:
        with database(None) as db:
            results = inprocess(db, args.requests or 1500, args.profile, args.rounds or 6)
        if args.json is not None:
            args.json.write_text(json.dumps({"inprocess": results}, indent=2) + "\n")
        return 0
    if args.cycle:
        processes, rounds = CYCLE_QUICK if args.quick else (CYCLE_PROCESSES, CYCLE_ROUNDS)
        began = time.perf_counter()
        load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
        with database(None) as db:
            results = cycle(db, processes, args.rounds or rounds, args.requests or CYCLE_BATCH)
        info = {
            **machine(),
            "connguard": f"git {git_commit(_connguard_src())} ({_connguard_src()})",
            "django": dist_version("django"),
            "psycopg": dist_version("psycopg"),
            "psycopg_pool": dist_version("psycopg-pool"),
            "loadavg_at_start": load0,
            "loadavg_at_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        }
        for key, value in info.items():
            print(f"  {key:18} {value}")
        print(f"total {time.perf_counter() - began:.0f} s")
        if args.json is not None:
            doc = {"cycle": results, "environment": info}
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
        return 0
    params = QUICK if args.quick else FULL
    if args.rounds:
        params = Params(args.rounds, params.warmup_s, params.window_s)
    servers = [s for s in SERVER_NAMES if s in args.servers.split(",")]
    wanted = list(RESET_RUN) if args.resets else args.variants.split(",")
    unknown = [k for k in wanted if k not in BY_KEY]
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)}")
    variants = [BY_KEY[k] for k in RUN_ORDER if k in wanted]
    began = time.perf_counter()

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_django-")))
        load = LoadGenerator(workdir)
        if load.wrk is None:
            print("WARNING: wrk not found (apt-get install -y wrk); using a Python client, "
                  "which is the bottleneck on a small machine", flush=True)  # fmt: skip
        print("starting PostgreSQL (trust, and scram-sha-256 on TCP) ...", flush=True)
        dbs = {
            "trust": stack.enter_context(database(None)),
            "scram": stack.enter_context(database(PASSWORD)),
        }
        env = environment(load, dbs)
        cells: dict[tuple[str, str], Cell] = {}
        for server in servers:
            print(f"{server}: starting {len(variants)} servers, warming up ...", flush=True)
            for key, cell in bench_server(
                server, variants, dbs, load=load, params=params, log_dir=workdir
            ).items():
                cells[server, key] = cell
        env["loadavg_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

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
                "window_s": params.window_s,
                "concurrency": CONCURRENCY,
                "path": PATH,
                "pool_size_per_process": POOL_SIZE,
                "processes": {s: SERVERS[s] for s in servers},
                "gunicorn": "gthread, 2 workers x 8 threads, --worker-connections 16",
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
                    "web_cpu_us_per_request_median": c.web_us,
                    "pg_cpu_us_per_request_median": c.pg_us,
                    "new_connections_per_1k_requests": c.sessions_per_1k,
                    "peak_backends": c.peak_backends,
                    "errors": c.errors,
                    "warmup_rps": c.warmup.rps if c.warmup else None,
                    "samples": [s.as_dict() for s in c.samples],
                    "pool_stats_one_worker": c.pool_stats,
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
