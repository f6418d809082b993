"""Acquire+release cost of connguard's ``Pool`` against psycopg_pool and SQLAlchemy.

One run, one PostgreSQL server, three libraries, the same psycopg 3 connections
(autocommit, loopback TCP) behind all of them::

    python benchmarks/bench_pool.py [--quick] [--dsn DSN] [--json PATH]

Subjects (every pool is warm: min_size = max_size = N, all N connections open
before anything is timed):

* ``connguard``: ``Pool(psycopg driver, PoolConfig(min_size=N, max_size=N))``,
  default settings otherwise (the no-round-trip liveness test runs only for
  connections idle 0.5 s or more, so not in a tight loop);
  cycle = ``pool.acquire()`` + ``pool.release(lease)``.
* ``connguard liveness_after_idle=0``: the same, testing liveness at every checkout,
  to show what that test costs.
* ``connguard with pool.connection()``: the context-manager form.
* ``psycopg_pool``: ``ConnectionPool(min_size=N, max_size=N, open=True)`` then
  ``wait()``; cycle = ``getconn()`` + ``putconn()``. The ratios use this row.
* ``psycopg_pool with pool.connection()``: its context-manager form.
* ``SQLAlchemy QueuePool``: ``QueuePool(creator, pool_size=N, max_overflow=0,
  pre_ping=False, reset_on_return="rollback")``; cycle = ``connect()`` + ``close()``.

Scenarios: no query, or ``SELECT 1`` executed and fetched on the leased
connection; from 1 thread (N = 2) or from 32 threads (N = 10).

* 1 thread: B batches of K cycles per subject, subjects interleaved batch by
  batch (rotating order); the figure is the median of the batch means (µs/cycle).
* 32 threads: each thread does K cycles after a barrier; the run lasts from the
  barrier to the last thread's end; throughput = 32 * K / duration. The figure is
  the median of R runs, subjects interleaved run by run.

The garbage collector stays enabled for every subject (as in production), with a
``gc.collect()`` before each timed batch. ``sys.getswitchinterval()`` is left at
its default. The PostgreSQL server shares the machine's cores with the client.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
import sqlalchemy
from sqlalchemy.pool import QueuePool

from connguard.drivers import load_driver
from connguard.pool import Pool, PoolConfig
from machine import dist_version, git_commit, machine

SQL = "SELECT 1"
APP = "bench_pool"  # application_name prefix: lets us count each library's backends

THREADS = 32
SIZE_SINGLE = 2
SIZE_MULTI = 10

# Subject keys, in table order; the first is connguard's headline row.
CG = "connguard"
CG_NOLIVE = "connguard liveness_after_idle=0"
CG_NOSTACK = "connguard stack_depth=0"
CG_CM = "connguard with pool.connection()"
PP = "psycopg_pool"
PP_CM = "psycopg_pool with pool.connection()"
SA = "SQLAlchemy QueuePool"
SUBJECTS = (CG, CG_NOSTACK, CG_NOLIVE, CG_CM, PP, PP_CM, SA)
CALLS = {
    CG: "acquire() + release(lease)",
    CG_NOLIVE: "acquire() + release(lease)",
    CG_NOSTACK: "acquire() + release(lease)",
    CG_CM: "with pool.connection()",
    PP: "getconn() + putconn()",
    PP_CM: "with pool.connection()",
    SA: "connect() + close()",
}
# connguard row -> the row it is compared with, per anchor library
COMPARE = {
    CG: {"psycopg_pool": PP, "sqlalchemy": SA},
    CG_NOLIVE: {"psycopg_pool": PP, "sqlalchemy": SA},
    CG_NOSTACK: {"psycopg_pool": PP, "sqlalchemy": SA},
    CG_CM: {"psycopg_pool": PP_CM, "sqlalchemy": SA},
}


@dataclass(frozen=True)
class Params:
    batches: int  # 1 thread: timed batches per subject
    cycles_single: dict[bool, int]  # 1 thread: cycles per batch, by "query?"
    runs: int  # 32 threads: timed runs per subject
    cycles_multi: dict[bool, int]  # 32 threads: cycles per thread per run, by "query?"
    warmup_single: dict[bool, int]


FULL = Params(
    batches=7,
    cycles_single={False: 20_000, True: 1_500},
    runs=9,
    cycles_multi={False: 800, True: 120},
    warmup_single={False: 5_000, True: 300},
)
QUICK = Params(
    batches=5,
    cycles_single={False: 4_000, True: 300},
    runs=3,
    cycles_multi={False: 300, True: 60},
    warmup_single={False: 1_000, True: 100},
)


@dataclass
class Result:
    subject: str
    threads: int
    query: bool
    pool_size: int
    samples: list[float] = field(default_factory=list)  # µs/cycle (1 thread) or cycles/s
    waited: list[float] = field(default_factory=list)  # per run: share of acquires that queued

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        """Best sample: lowest µs/cycle (1 thread) or highest cycles/s (threads)."""
        return min(self.samples) if self.threads == 1 else max(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median of the samples, a rough noise gauge."""
        return (max(self.samples) - min(self.samples)) / self.median

    def figures(self) -> dict[str, float]:
        if self.threads == 1:
            us = self.median
            return {"median_us_per_cycle": us, "cycles_per_s": 1e6 / us}
        tput = self.median
        return {"median_cycles_per_s": tput, "us_per_cycle_wall": 1e6 / tput}


# --------------------------------------------------------------------- the pools


class Pools:
    """One warm pool per subject, all of size ``size``; closes them all."""

    def __init__(self, dsn: str, size: int) -> None:
        self.size = size
        self.connguard: dict[str, Pool] = {}
        self.psycopg_pool: psycopg_pool.ConnectionPool[Any] | None = None
        self.sqlalchemy: QueuePool | None = None
        try:
            variants = {
                CG: {},  # the defaults: stack_depth=4, liveness_after_idle=0.5
                CG_NOSTACK: {"stack_depth": 0},  # what recording the acquire site costs
                CG_NOLIVE: {"liveness_after_idle": 0},  # what testing every checkout costs
            }
            for key, overrides in variants.items():
                driver = load_driver("psycopg", conninfo=dsn, application_name=f"{APP}-cg")
                cfg = PoolConfig(min_size=size, max_size=size, **overrides)  # type: ignore[arg-type]
                self.connguard[key] = Pool(driver, cfg, name=f"bench-{size}-{key}")
            self.psycopg_pool = psycopg_pool.ConnectionPool(
                dsn,
                min_size=size,
                max_size=size,
                kwargs={"autocommit": True, "application_name": f"{APP}-pp"},
                open=True,
                name=f"bench-{size}",
            )
            self.psycopg_pool.wait(timeout=30.0)

            def creator() -> psycopg.Connection[Any]:
                return psycopg.connect(dsn, autocommit=True, application_name=f"{APP}-sa")

            self.sqlalchemy = QueuePool(
                creator,
                pool_size=size,
                max_overflow=0,
                pre_ping=False,
                reset_on_return="rollback",
            )
            # QueuePool opens lazily: check out N at once so all N exist.
            fairies = [self.sqlalchemy.connect() for _ in range(size)]
            for fairy in fairies:
                fairy.close()
            # connguard opens its min_size in the background.
            deadline = time.monotonic() + 30.0
            for pool in self.connguard.values():
                while pool.stats().idle < size:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"connguard pool not warm: {pool.stats()}")
                    time.sleep(0.01)
        except BaseException:
            self.close()
            raise

    def counters(self, subject: str) -> tuple[int, int] | None:
        """(acquires, acquires that had to queue) so far, where the library counts them."""
        if subject in (CG, CG_NOLIVE, CG_NOSTACK, CG_CM):
            st = self.connguard[CG if subject == CG_CM else subject].stats()
            return st.acquires, st.waits
        if subject in (PP, PP_CM) and self.psycopg_pool is not None:
            st = self.psycopg_pool.get_stats()
            return st.get("requests_num", 0), st.get("requests_queued", 0)
        return None  # QueuePool keeps no such counter

    def loop(self, subject: str, query: bool) -> Callable[[int], None]:
        """A tight loop doing ``k`` cycles of ``subject``."""
        if subject in (CG, CG_NOLIVE, CG_NOSTACK):
            return _connguard_loop(self.connguard[subject], query)
        if subject == CG_CM:
            return _connguard_cm_loop(self.connguard[CG], query)
        if subject == PP:
            assert self.psycopg_pool is not None
            return _psycopg_pool_loop(self.psycopg_pool, query)
        if subject == PP_CM:
            assert self.psycopg_pool is not None
            return _psycopg_pool_cm_loop(self.psycopg_pool, query)
        assert subject == SA and self.sqlalchemy is not None
        return _sqlalchemy_loop(self.sqlalchemy, query)

    def check_no_lease_out(self) -> dict[str, Any]:
        """Every connection is back in its pool; return what each pool reports."""
        report: dict[str, Any] = {}
        for key, pool in self.connguard.items():
            st = pool.stats()
            report[key] = {"size": st.size, "idle": st.idle, "in_use": st.in_use}
            if st.in_use or st.idle != self.size:
                raise RuntimeError(f"{key}: leases still out or pool not full: {st}")
        if self.psycopg_pool is not None:
            st = self.psycopg_pool.get_stats()
            report[PP] = {"size": st.get("pool_size"), "idle": st.get("pool_available")}
            if st.get("pool_available") != self.size:
                raise RuntimeError(f"psycopg_pool: connections still out: {st}")
        if self.sqlalchemy is not None:
            out = self.sqlalchemy.checkedout()
            report[SA] = {"checked_out": out, "idle": self.sqlalchemy.checkedin()}
            if out:
                raise RuntimeError(f"SQLAlchemy: {out} connections still checked out")
        return report

    def close(self) -> None:
        for pool in self.connguard.values():
            pool.close()
        self.connguard = {}
        if self.psycopg_pool is not None:
            self.psycopg_pool.close()
            self.psycopg_pool = None
        if self.sqlalchemy is not None:
            self.sqlalchemy.dispose()
            self.sqlalchemy = None


def _connguard_loop(pool: Pool, query: bool) -> Callable[[int], None]:
    acquire, release = pool.acquire, pool.release

    def run(k: int) -> None:
        if query:
            for _ in range(k):
                lease = acquire()
                lease.connection.execute(SQL).fetchone()
                release(lease)
        else:
            for _ in range(k):
                release(acquire())

    return run


def _connguard_cm_loop(pool: Pool, query: bool) -> Callable[[int], None]:
    connection = pool.connection

    def run(k: int) -> None:
        if query:
            for _ in range(k):
                with connection() as conn:
                    conn.execute(SQL).fetchone()
        else:
            for _ in range(k):
                with connection():
                    pass

    return run


def _psycopg_pool_loop(
    pool: psycopg_pool.ConnectionPool[Any], query: bool
) -> Callable[[int], None]:
    getconn, putconn = pool.getconn, pool.putconn

    def run(k: int) -> None:
        if query:
            for _ in range(k):
                conn = getconn()
                conn.execute(SQL).fetchone()
                putconn(conn)
        else:
            for _ in range(k):
                putconn(getconn())

    return run


def _psycopg_pool_cm_loop(
    pool: psycopg_pool.ConnectionPool[Any], query: bool
) -> Callable[[int], None]:
    connection = pool.connection

    def run(k: int) -> None:
        if query:
            for _ in range(k):
                with connection() as conn:
                    conn.execute(SQL).fetchone()
        else:
            for _ in range(k):
                with connection():
                    pass

    return run


def _sqlalchemy_loop(pool: QueuePool, query: bool) -> Callable[[int], None]:
    connect = pool.connect

    def run(k: int) -> None:
        if query:
            for _ in range(k):
                fairy = connect()
                fairy.dbapi_connection.execute(SQL).fetchone()
                fairy.close()
        else:
            for _ in range(k):
                connect().close()

    return run


# --------------------------------------------------------------------- timing


def time_batch(run: Callable[[int], None], k: int) -> float:
    """µs per cycle of one batch of ``k`` cycles in this thread."""
    gc.collect()
    start = time.perf_counter()
    run(k)
    return (time.perf_counter() - start) / k * 1e6


def time_threaded(run: Callable[[int], None], threads: int, k: int) -> float:
    """Cycles per second of ``threads`` threads doing ``k`` cycles each."""
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def work() -> None:
        barrier.wait()
        try:
            run(k)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, name=f"bench-{i}") for i in range(threads)]
    for worker in workers:
        worker.start()
    gc.collect()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return threads * k / elapsed


def rotated(items: tuple[str, ...], i: int) -> list[str]:
    i %= len(items)
    return [*items[i:], *items[:i]]


def bench_single(dsn: str, params: Params, query: bool, monitor: Monitor) -> list[Result]:
    pools = Pools(dsn, SIZE_SINGLE)
    try:
        monitor.expect_backends(pools)
        loops = {s: pools.loop(s, query) for s in SUBJECTS}
        for subject in SUBJECTS:  # warm-up: code paths, caches, prepared statements
            loops[subject](params.warmup_single[query])
        k = params.cycles_single[query]
        results = {s: Result(s, 1, query, SIZE_SINGLE) for s in SUBJECTS}
        for i in range(params.batches):
            for subject in rotated(SUBJECTS, i):
                results[subject].samples.append(time_batch(loops[subject], k))
        pools.check_no_lease_out()
        return [results[s] for s in SUBJECTS]
    finally:
        pools.close()


def bench_multi(dsn: str, params: Params, query: bool, monitor: Monitor) -> list[Result]:
    pools = Pools(dsn, SIZE_MULTI)
    try:
        monitor.expect_backends(pools)
        loops = {s: pools.loop(s, query) for s in SUBJECTS}
        k = params.cycles_multi[query]
        for subject in SUBJECTS:  # warm-up: one untimed threaded run of half size
            time_threaded(loops[subject], THREADS, max(1, k // 2))
        results = {s: Result(s, THREADS, query, SIZE_MULTI) for s in SUBJECTS}
        for i in range(params.runs):
            for subject in rotated(SUBJECTS, i):
                before = pools.counters(subject)
                results[subject].samples.append(time_threaded(loops[subject], THREADS, k))
                after = pools.counters(subject)
                if before is not None and after is not None and after[0] > before[0]:
                    waited = (after[1] - before[1]) / (after[0] - before[0])
                    results[subject].waited.append(waited)
        pools.check_no_lease_out()
        return [results[s] for s in SUBJECTS]
    finally:
        pools.close()


# --------------------------------------------------------------------- leak checks


class Monitor:
    """A side connection that counts the benchmark's backends in pg_stat_activity."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, application_name=f"{APP}-monitor")
        self.seen: list[dict[str, int]] = []

    def backends(self) -> dict[str, int]:
        rows = self.conn.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity "
            "WHERE application_name LIKE %s AND application_name <> %s "
            "GROUP BY application_name",
            (f"{APP}-%", f"{APP}-monitor"),
        ).fetchall()
        return {name: int(n) for name, n in rows}

    def expect_backends(self, pools: Pools) -> None:
        n = pools.size
        want = {f"{APP}-cg": len(pools.connguard) * n, f"{APP}-pp": n, f"{APP}-sa": n}
        got = self.backends()
        self.seen.append(got)
        if got != want:
            raise RuntimeError(f"pools not warm or oversized: backends {got}, expected {want}")

    def wait_all_gone(self, timeout: float = 10.0) -> dict[str, int]:
        """Backends exit shortly after the client closes; wait for that."""
        deadline = time.monotonic() + timeout
        while (left := self.backends()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def server_version(self) -> str:
        row = self.conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------- environment


def environment(server_version: str) -> dict[str, Any]:
    return {
        **machine(),
        "connguard": dist_version("django-connguard"),
        "connguard_git": git_commit(),
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__}, libpq {psycopg.pq.version()})",
        "psycopg_pool": psycopg_pool.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "postgresql_server": server_version,
        "gil_enabled": getattr(sys, "_is_gil_enabled", lambda: True)(),
        "switch_interval_s": sys.getswitchinterval(),
    }


# --------------------------------------------------------------------- report


def scenario_name(threads: int, query: bool) -> str:
    return f"{'SELECT 1' if query else 'no query'}, {threads} thread{'s' if threads > 1 else ''}"


def ratios(results: list[Result]) -> dict[str, dict[str, dict[str, float]]]:
    """connguard / anchor, per scenario: time ratio (1 thread, lower is better) or
    throughput ratio (32 threads, higher is better)."""
    by = {(r.threads, r.query, r.subject): r for r in results}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for threads, query in sorted({(r.threads, r.query) for r in results}):
        scen: dict[str, dict[str, float]] = {}
        for row, anchors in COMPARE.items():
            scen[row] = {
                anchor: by[threads, query, row].median / by[threads, query, other].median
                for anchor, other in anchors.items()
            }
        out[scenario_name(threads, query)] = scen
    return out


def targets(results: list[Result]) -> dict[str, dict[str, Any]]:
    by = {(r.threads, r.query, r.subject): r for r in results}
    out: dict[str, dict[str, Any]] = {}
    if (1, False, CG) in by:
        ratio = by[1, False, CG].median / by[1, False, PP].median
        out["no-query cycle, 1 thread: connguard/psycopg_pool time <= 0.5"] = {
            "ratio": ratio,
            "met": ratio <= 0.5,
            "ratio_of_best_batches": by[1, False, CG].best / by[1, False, PP].best,
        }
    for query in (False, True):
        if (THREADS, query, CG) in by:
            ratio = by[THREADS, query, CG].median / by[THREADS, query, PP].median
            what = "SELECT 1" if query else "no query"
            out[f"{what}, {THREADS} threads: connguard/psycopg_pool throughput >= 1.0"] = {
                "ratio": ratio,
                "met": ratio >= 1.0,
            }
    return out


def print_report(results: list[Result], env: dict[str, Any]) -> None:
    print()
    print("Environment")
    for key, value in env.items():
        print(f"  {key:18} {value}")
    width = max(len(s) for s in SUBJECTS)
    for threads, query in sorted({(r.threads, r.query) for r in results}):
        rows = [r for r in results if r.threads == threads and r.query == query]
        print()
        size = rows[0].pool_size
        n = len(rows[0].samples)
        if threads == 1:
            print(f"{scenario_name(threads, query)} (pool size {size}; median of {n} batch means)")
            print(
                f"  {'subject':{width}}  {'call':27} {'µs/cycle':>9} {'cycles/s':>10} "
                f"{'best µs':>8} {'spread':>7}"
            )
            for r in rows:
                print(
                    f"  {r.subject:{width}}  {CALLS[r.subject]:27} {r.median:9.2f} "
                    f"{1e6 / r.median:10,.0f} {r.best:8.2f} {r.spread:6.0%}"
                )
        else:
            print(f"{scenario_name(threads, query)} (pool size {size}; median of {n} runs)")
            print(
                f"  {'subject':{width}}  {'call':27} {'cycles/s':>10} {'µs wall':>8} "
                f"{'min':>9} {'max':>9}  acquires that queued, per run"
            )
            for r in rows:
                queued = " ".join(f"{w:.0%}" for w in r.waited) if r.waited else "n/a"
                print(
                    f"  {r.subject:{width}}  {CALLS[r.subject]:27} {r.median:10,.0f} "
                    f"{1e6 / r.median:8.2f} {min(r.samples):9,.0f} {max(r.samples):9,.0f}  {queued}"
                )
    print()
    print(
        "Ratios connguard / anchor (1 thread: time, lower is better; "
        f"{THREADS} threads: throughput, higher is better)"
    )
    for scen, rows_ in ratios(results).items():
        for row, anchors in rows_.items():
            cells = "  ".join(f"vs {a}: {v:5.2f}" for a, v in anchors.items())
            print(f"  {scen:22} {row:{width}}  {cells}")
    print()
    print("Targets")
    for what, t in targets(results).items():
        extra = ""
        if "ratio_of_best_batches" in t:
            extra = f" (best batch vs best batch: {t['ratio_of_best_batches']:.2f})"
        print(f"  {what}: {t['ratio']:.2f} -> {'MET' if t['met'] else 'NOT MET'}{extra}")


# --------------------------------------------------------------------- main


@contextlib.contextmanager
def server(dsn: str | None) -> Iterator[str]:
    if dsn is not None:
        yield dsn
        return
    from connguard.testing.postgres import EmbeddedPostgres

    pg = EmbeddedPostgres(max_connections=100)
    try:
        pg.start()
        yield pg.dsn
    finally:
        pg.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter batches (smoke run)")
    parser.add_argument(
        "--dsn", help="use this PostgreSQL (libpq conninfo) instead of a throwaway server"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    args = parser.parse_args(argv)
    params = QUICK if args.quick else FULL
    began = time.perf_counter()

    with server(args.dsn) as dsn:
        monitor = Monitor(dsn)
        try:
            if monitor.backends():
                raise RuntimeError(f"{APP}-* backends already connected: {monitor.backends()}")
            env = environment(monitor.server_version())
            results: list[Result] = []
            for query in (False, True):
                print(f"running {scenario_name(1, query)} ...", flush=True)
                results += bench_single(dsn, params, query, monitor)
            for query in (False, True):
                print(f"running {scenario_name(THREADS, query)} ...", flush=True)
                results += bench_multi(dsn, params, query, monitor)
            left = monitor.wait_all_gone()
            if left:
                raise RuntimeError(f"connections left open after closing every pool: {left}")
        finally:
            monitor.close()

    elapsed = time.perf_counter() - began
    print_report(results, env)
    print(f"\nno connection leaked (pg_stat_activity checked); total {elapsed:.0f} s")

    if args.json is not None:
        doc = {
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "mode": "quick" if args.quick else "full",
            "params": {
                "threads": THREADS,
                "pool_size_1_thread": SIZE_SINGLE,
                "pool_size_multi": SIZE_MULTI,
                "batches": params.batches,
                "cycles_per_batch": {
                    "no_query": params.cycles_single[False],
                    "select_1": params.cycles_single[True],
                },
                "runs": params.runs,
                "cycles_per_thread_per_run": {
                    "no_query": params.cycles_multi[False],
                    "select_1": params.cycles_multi[True],
                },
                "gc": "enabled during timing (gc.collect() before each batch/run)",
            },
            "environment": env,
            "results": [
                {
                    "scenario": scenario_name(r.threads, r.query),
                    "subject": r.subject,
                    "call": CALLS[r.subject],
                    "threads": r.threads,
                    "query": SQL if r.query else None,
                    "pool_size": r.pool_size,
                    **r.figures(),
                    "best": r.best,
                    "spread": r.spread,
                    "samples": r.samples,
                    "sample_unit": "us_per_cycle" if r.threads == 1 else "cycles_per_s",
                    "queued_share_per_run": r.waited or None,
                }
                for r in results
            ],
            "ratios": ratios(results),
            "targets": targets(results),
            "backends_seen": monitor.seen,
            "elapsed_s": elapsed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
