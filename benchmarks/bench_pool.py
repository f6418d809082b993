"""Acquire+release cost of connguard's ``Pool`` against psycopg_pool and SQLAlchemy.

One run, one PostgreSQL server, three libraries, the same psycopg 3 connections
(autocommit, loopback TCP) behind all of them::

    python benchmarks/bench_pool.py [--quick] [--dsn DSN] [--json PATH]
                                    [--before SRC] [--fence] [--no-libraries]

Subjects (every pool is warm: min_size = max_size = N, all N connections open
before anything is timed):

* ``connguard``: ``Pool(psycopg driver, PoolConfig(min_size=N, max_size=N))``,
  default settings otherwise (the no-round-trip liveness test at every checkout);
  cycle = ``pool.acquire()`` + ``pool.release(lease)``.
* ``connguard liveness_after_idle=None``: the same without that liveness test, to
  show what it costs.
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

Two more sections, on request:

* ``--before SRC``: the engine's no-query cycle (1 thread and 32 threads) of an
  older tree (``SRC`` = its ``src/``, e.g. a ``git worktree`` of an older commit)
  against the tree this script imports, each in its own child processes (one
  process cannot import two versions of a package), the two alternating round by
  round; every child also times psycopg_pool, the anchor of both.
* ``--fence``: what the lease's fence costs per query: ``SELECT 1`` on one held
  lease through ``lease.raw`` (unfenced), ``lease.using()`` and ``lease.connection``
  (``FencedConnection``/``FencedCursor``); wall and client CPU per query.

The garbage collector stays enabled for every subject (as in production), with a
``gc.collect()`` before each timed batch. ``sys.getswitchinterval()`` is left at
its default. The PostgreSQL server shares the machine's cores with the client.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
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

import connguard
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
CG_NOLIVE = "connguard liveness_after_idle=None"
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

    def __init__(
        self, dsn: str, size: int, connguard: tuple[str, ...] = (CG, CG_NOSTACK, CG_NOLIVE)
    ) -> None:
        self.size = size
        self.connguard: dict[str, Pool] = {}
        self.psycopg_pool: psycopg_pool.ConnectionPool[Any] | None = None
        self.sqlalchemy: QueuePool | None = None
        try:
            variants = {
                CG: {},  # the defaults: stack_depth=3, liveness test at every checkout
                CG_NOSTACK: {"stack_depth": 0},  # what recording the acquire site costs
                CG_NOLIVE: {"liveness_after_idle": None},  # what that liveness test costs
            }
            for key, overrides in variants.items():
                if key not in connguard:
                    continue
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


def _connguard_keys(subjects: tuple[str, ...]) -> tuple[str, ...]:
    """The connguard pools ``subjects`` need (the context-manager row uses CG's)."""
    return tuple(dict.fromkeys(CG if s == CG_CM else s for s in subjects if s.startswith(CG)))


def bench_single(
    dsn: str,
    params: Params,
    query: bool,
    monitor: Monitor,
    subjects: tuple[str, ...] = SUBJECTS,
) -> list[Result]:
    pools = Pools(dsn, SIZE_SINGLE, connguard=_connguard_keys(subjects))
    try:
        monitor.expect_backends(pools)
        loops = {s: pools.loop(s, query) for s in subjects}
        for subject in subjects:  # warm-up: code paths, caches, prepared statements
            loops[subject](params.warmup_single[query])
        k = params.cycles_single[query]
        results = {s: Result(s, 1, query, SIZE_SINGLE) for s in subjects}
        for i in range(params.batches):
            for subject in rotated(subjects, i):
                results[subject].samples.append(time_batch(loops[subject], k))
        pools.check_no_lease_out()
        return [results[s] for s in subjects]
    finally:
        pools.close()


def bench_multi(
    dsn: str,
    params: Params,
    query: bool,
    monitor: Monitor,
    subjects: tuple[str, ...] = SUBJECTS,
) -> list[Result]:
    pools = Pools(dsn, SIZE_MULTI, connguard=_connguard_keys(subjects))
    try:
        monitor.expect_backends(pools)
        loops = {s: pools.loop(s, query) for s in subjects}
        k = params.cycles_multi[query]
        for subject in subjects:  # warm-up: one untimed threaded run of half size
            time_threaded(loops[subject], THREADS, max(1, k // 2))
        results = {s: Result(s, THREADS, query, SIZE_MULTI) for s in subjects}
        for i in range(params.runs):
            for subject in rotated(subjects, i):
                before = pools.counters(subject)
                results[subject].samples.append(time_threaded(loops[subject], THREADS, k))
                after = pools.counters(subject)
                if before is not None and after is not None and after[0] > before[0]:
                    waited = (after[1] - before[1]) / (after[0] - before[0])
                    results[subject].waited.append(waited)
        pools.check_no_lease_out()
        return [results[s] for s in subjects]
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


# --------------------------------------------------------------------- before/after

# The engine's no-query cycle of two source trees: the one this script imports
# ("after") and an older one given with --before. One process cannot import two
# versions of a package, so each tree runs in child processes (PYTHONPATH=<its src>),
# the two alternating round by round. Every child also times psycopg_pool, so each
# tree has its anchor measured next to it, in the same process.
CYCLE_SUBJECTS = (CG, CG_CM, PP, PP_CM)
CYCLE_TREES = ("before", "after")
CYCLE_ROUNDS = {False: 6, True: 2}  # by --quick
CYCLE_PARAMS = {
    False: Params(
        batches=5,
        cycles_single={False: 20_000},
        runs=5,
        cycles_multi={False: 800},
        warmup_single={False: 5_000},
    ),
    True: Params(
        batches=3,
        cycles_single={False: 4_000},
        runs=2,
        cycles_multi={False: 300},
        warmup_single={False: 1_000},
    ),
}


def cycle_child(dsn: str, quick: bool) -> None:
    """Runs in a child process: the no-query cycle, 1 thread and 32 threads, of the
    connguard on this process's path and of psycopg_pool; one JSON line on stdout."""
    params = CYCLE_PARAMS[quick]
    monitor = Monitor(dsn)
    try:
        results = bench_single(dsn, params, False, monitor, CYCLE_SUBJECTS)
        results += bench_multi(dsn, params, False, monitor, CYCLE_SUBJECTS)
        left = monitor.wait_all_gone()
        if left:
            raise RuntimeError(f"connections left open after closing every pool: {left}")
    finally:
        monitor.close()
    doc = {
        "connguard_file": connguard.__file__,
        "results": [
            {"subject": r.subject, "threads": r.threads, "samples": r.samples, "waited": r.waited}
            for r in results
        ],
    }
    print("CYCLE " + json.dumps(doc))


@dataclass
class BeforeAfter:
    trees: dict[str, dict[str, str]]  # "before"/"after" -> {"src", "git"}
    rounds: int
    results: dict[str, list[Result]]  # by tree

    def get(self, tree: str, threads: int, subject: str) -> Result:
        return next(r for r in self.results[tree] if r.threads == threads and r.subject == subject)


def bench_before_after(dsn: str, before_src: Path, quick: bool) -> BeforeAfter:
    srcs = {"before": before_src.resolve(), "after": Path(connguard.__file__).parents[1]}
    for tree, src in srcs.items():
        if not (src / "connguard" / "pool").is_dir():
            raise SystemExit(f"--before: {src} has no connguard/pool ({tree} tree)")
    trees = {t: {"src": str(src), "git": git_commit(src)} for t, src in srcs.items()}
    merged: dict[str, dict[tuple[int, str], Result]] = {t: {} for t in CYCLE_TREES}
    rounds = CYCLE_ROUNDS[quick]
    for r in range(rounds):
        for tree in rotated(CYCLE_TREES, r):
            path = [str(srcs[tree]), *filter(None, [os.environ.get("PYTHONPATH")])]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
            cmd = [sys.executable, __file__, "--cycle-child", "--dsn", dsn]
            if quick:
                cmd.append("--quick")
            out = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=600, check=False
            )
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("CYCLE ")), None)
            if out.returncode != 0 or line is None:
                raise RuntimeError(f"{tree} child failed:\n{out.stdout}\n{out.stderr}")
            got = json.loads(line.removeprefix("CYCLE "))
            if not Path(got["connguard_file"]).resolve().is_relative_to(srcs[tree]):
                raise RuntimeError(f"{tree} child imported {got['connguard_file']}")
            for row in got["results"]:
                key = (row["threads"], row["subject"])
                size = SIZE_SINGLE if row["threads"] == 1 else SIZE_MULTI
                res = merged[tree].setdefault(
                    key, Result(row["subject"], row["threads"], False, size)
                )
                res.samples += row["samples"]
                res.waited += row["waited"]
        print(f"  before/after round {r + 1}/{rounds} done", flush=True)
    return BeforeAfter(trees, rounds, {t: list(merged[t].values()) for t in CYCLE_TREES})


def _per_child(samples: list[float], size: int) -> list[float]:
    """The median of each child's samples (they come in child order, ``size`` each)."""
    return [statistics.median(samples[i : i + size]) for i in range(0, len(samples), size)]


def before_after_figures(ba: BeforeAfter, params: Params) -> list[dict[str, Any]]:
    """Per scenario and subject: before, after, after/before, and (connguard rows)
    the ratio to psycopg_pool's same-form row in the same tree's children: of the
    medians, and child by child (the machine's speed, which drifts between children,
    cancels out of a ratio taken within one process)."""
    anchor = {CG: PP, CG_CM: PP_CM}
    out = []
    for threads in (1, THREADS):
        size = params.batches if threads == 1 else params.runs
        for subject in CYCLE_SUBJECTS:
            b, a = ba.get("before", threads, subject), ba.get("after", threads, subject)
            row: dict[str, Any] = {
                "scenario": scenario_name(threads, False),
                "subject": subject,
                "call": CALLS[subject],
                "unit": "us_per_cycle" if threads == 1 else "cycles_per_s",
                "before": b.median,
                "after": a.median,
                "after_over_before": a.median / b.median,
                "before_samples": b.samples,
                "after_samples": a.samples,
                "before_queued": b.waited or None,
                "after_queued": a.waited or None,
            }
            if subject in anchor:
                for tree, res in (("before", b), ("after", a)):
                    pp = ba.get(tree, threads, anchor[subject])
                    row[f"{tree}_over_psycopg_pool"] = res.median / pp.median
                    row[f"{tree}_over_psycopg_pool_per_child"] = [
                        x / y
                        for x, y in zip(
                            _per_child(res.samples, size),
                            _per_child(pp.samples, size),
                            strict=True,
                        )
                    ]
                after = statistics.median(row["after_over_psycopg_pool_per_child"])
                before = statistics.median(row["before_over_psycopg_pool_per_child"])
                row["after_over_before_normalized"] = after / before
            out.append(row)
    return out


def print_before_after(ba: BeforeAfter, rows: list[dict[str, Any]], params: Params) -> None:
    print()
    print(
        f"Engine cycle, no query: before ({ba.trees['before']['git']}) vs after "
        f"({ba.trees['after']['git']}); each tree in its own child processes, "
        f"{ba.rounds} rounds alternating"
    )
    for tree in CYCLE_TREES:
        print(f"  {tree:6} {ba.trees[tree]['src']}")
    width = max(len(s) for s in CYCLE_SUBJECTS)
    for threads in (1, THREADS):
        n = len(ba.get("after", threads, CG).samples)
        if threads == 1:
            what = f"µs/cycle, pool size {SIZE_SINGLE}, median of {n} batch means"
            what += f" of {params.cycles_single[False]:,}"
        else:
            what = f"cycles/s, pool size {SIZE_MULTI}, median of {n} runs"
        print(f"{scenario_name(threads, False)} ({what})")
        print(
            f"  {'subject':{width}}  {'call':27} {'before':>9} {'after':>9} "
            f"{'after/before':>12} {'vs psycopg_pool: before':>24} {'after':>6}  queued (after)"
        )
        for row in rows:
            if row["scenario"] != scenario_name(threads, False):
                continue
            fmt = "9.2f" if threads == 1 else "9,.0f"
            vs = ""
            if "after_over_psycopg_pool" in row:
                vs = (
                    f"{row['before_over_psycopg_pool']:24.2f} {row['after_over_psycopg_pool']:6.2f}"
                )
            else:
                vs = f"{'':24} {'':6}"
            queued = row["after_queued"]
            q = f"{statistics.median(queued):.0%} median" if queued else ""
            print(
                f"  {row['subject']:{width}}  {row['call']:27} {row['before']:{fmt}} "
                f"{row['after']:{fmt}} {row['after_over_before']:12.2f} {vs}  {q}"
            )
    print(
        "connguard / psycopg_pool within each child process, median [min-max] over the "
        "children; after/before of those medians"
    )
    for row in rows:
        if "after_over_before_normalized" not in row:
            continue
        cells = []
        for tree in CYCLE_TREES:
            per = row[f"{tree}_over_psycopg_pool_per_child"]
            cells.append(f"{tree} {statistics.median(per):5.2f} [{min(per):.2f}-{max(per):.2f}]")
        print(
            f"  {row['scenario']:21} {row['subject']:{width}}  {'  '.join(cells)}  "
            f"after/before {row['after_over_before_normalized']:5.2f}"
        )
    print(
        "  (1 thread: time, lower is better; 32 threads: throughput, higher is better;\n"
        "   vs psycopg_pool: connguard's figure over psycopg_pool's same-form row)"
    )


# --------------------------------------------------------------------- the fence


# SELECT 1 on one lease held for the whole benchmark (pool size 1): what going through
# the fence costs per query, against the driver's connection used directly.
FENCE_RAW = "lease.raw.cursor() (unfenced)"
FENCE_USING = "with lease.using() as raw: raw.cursor()"
FENCE_PROXY = "lease.connection.cursor() (FencedConnection)"
FENCE_HELD = "conn.cursor(), conn = lease.connection kept"
FENCE_SUBJECTS = (FENCE_RAW, FENCE_USING, FENCE_PROXY, FENCE_HELD)
# Rounds of one short batch per path (rotating order): this shared VM's speed drifts
# by up to 2x from one second to the next, so the paths alternate every few ms.
FENCE_PARAMS = {False: (150, 100, 500), True: (20, 50, 100)}  # rounds, queries, warm-up
ENTER_EXIT_PAIRS = 200_000


def _fence_loops(lease: Any) -> dict[str, Callable[[int], None]]:
    def raw(k: int) -> None:
        for _ in range(k):
            with lease.raw.cursor() as cur:
                cur.execute(SQL)
                cur.fetchone()

    def using(k: int) -> None:
        for _ in range(k):
            with lease.using() as conn, conn.cursor() as cur:
                cur.execute(SQL)
                cur.fetchone()

    def proxy(k: int) -> None:
        for _ in range(k):
            with lease.connection.cursor() as cur:
                cur.execute(SQL)
                cur.fetchone()

    kept = lease.connection

    def held(k: int) -> None:
        for _ in range(k):
            with kept.cursor() as cur:
                cur.execute(SQL)
                cur.fetchone()

    return {FENCE_RAW: raw, FENCE_USING: using, FENCE_PROXY: proxy, FENCE_HELD: held}


def bench_fence(dsn: str, quick: bool, monitor: Monitor) -> dict[str, Any]:
    """Per path: wall and client thread-CPU µs per query, medians of batch means, and
    the differences to the unfenced path batch by batch (adjacent batches)."""
    batches, k, warmup = FENCE_PARAMS[quick]
    driver = load_driver("psycopg", conninfo=dsn, application_name=f"{APP}-cg")
    pool = Pool(driver, PoolConfig(min_size=1, max_size=1), name="bench-fence")
    try:
        deadline = time.monotonic() + 30.0
        while pool.stats().idle < 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"connguard pool not warm: {pool.stats()}")
            time.sleep(0.01)
        if monitor.backends() != {f"{APP}-cg": 1}:
            raise RuntimeError(f"unexpected backends: {monitor.backends()}")
        lease = pool.acquire()
        try:
            loops = _fence_loops(lease)
            for subject in FENCE_SUBJECTS:
                loops[subject](warmup)
            wall: dict[str, list[float]] = {s: [] for s in FENCE_SUBJECTS}
            cpu: dict[str, list[float]] = {s: [] for s in FENCE_SUBJECTS}
            for i in range(batches):
                for subject in rotated(FENCE_SUBJECTS, i):
                    gc.collect()
                    c0, w0 = time.thread_time(), time.perf_counter()
                    loops[subject](k)
                    cpu[subject].append((time.thread_time() - c0) / k * 1e6)
                    wall[subject].append((time.perf_counter() - w0) / k * 1e6)
            # The fence alone, no I/O: one enter()/exit() pair.
            enter, leave = lease.enter, lease.exit
            gc.collect()
            t0 = time.perf_counter()
            for _ in range(ENTER_EXIT_PAIRS):
                enter()
                leave()
            pair_us = (time.perf_counter() - t0) / ENTER_EXIT_PAIRS * 1e6
        finally:
            pool.release(lease)
        if pool.stats().idle != 1:
            raise RuntimeError(f"fence pool: lease not back: {pool.stats()}")
    finally:
        pool.close()
    base_wall = statistics.median(wall[FENCE_RAW])
    base_cpu = statistics.median(cpu[FENCE_RAW])
    rows = [
        {
            "path": s,
            "wall_us_per_query": statistics.median(wall[s]),
            "wall_minus_raw_us": statistics.median(wall[s]) - base_wall,
            "wall_minus_raw_paired_us": statistics.median(
                w - r for w, r in zip(wall[s], wall[FENCE_RAW], strict=True)
            ),
            "cpu_us_per_query": statistics.median(cpu[s]),
            "cpu_minus_raw_us": statistics.median(cpu[s]) - base_cpu,
            # the same difference batch by batch (adjacent batches of one round)
            "cpu_minus_raw_paired_us": statistics.median(
                c - r for c, r in zip(cpu[s], cpu[FENCE_RAW], strict=True)
            ),
            "wall_samples": wall[s],
            "cpu_samples": cpu[s],
        }
        for s in FENCE_SUBJECTS
    ]
    return {
        "batches": batches,
        "queries_per_batch": k,
        "rows": rows,
        "enter_exit_pair_us": pair_us,
    }


def print_fence(fence: dict[str, Any]) -> None:
    print()
    print(
        f"Fence cost per query: SELECT 1 on one held lease (pool size 1; median of "
        f"{fence['batches']} batch means of {fence['queries_per_batch']:,} queries, "
        "paths interleaved batch by batch)"
    )
    width = max(len(s) for s in FENCE_SUBJECTS)
    print(
        f"  {'path':{width}}  {'wall µs':>8} {'- raw':>6} {'paired':>7}  {'client CPU µs':>13} "
        f"{'- raw':>6} {'paired':>7}"
    )
    for r in fence["rows"]:
        print(
            f"  {r['path']:{width}}  {r['wall_us_per_query']:8.2f} {r['wall_minus_raw_us']:+6.2f} "
            f"{r['wall_minus_raw_paired_us']:+7.2f}  {r['cpu_us_per_query']:13.2f} "
            f"{r['cpu_minus_raw_us']:+6.2f} {r['cpu_minus_raw_paired_us']:+7.2f}"
        )
    print(
        f"  lease.enter() + lease.exit(), no query: {fence['enter_exit_pair_us']:.3f} µs per pair\n"
        "  (client CPU: time.thread_time() of the querying thread, which the server's share\n"
        "   of the round trip does not reach; - raw: difference of the medians; paired:\n"
        "   median of the per-round differences of adjacent batches)"
    )


# --------------------------------------------------------------------- environment


def environment(server_version: str) -> dict[str, Any]:
    return {
        **machine(),
        "connguard": dist_version("django-connguard"),
        # the tree actually imported (PYTHONPATH may point at a worktree of a commit)
        "connguard_src": str(Path(connguard.__file__).parents[1]),
        "connguard_git": git_commit(Path(connguard.__file__).parent),
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


def print_environment(env: dict[str, Any]) -> None:
    print()
    print("Environment")
    for key, value in env.items():
        print(f"  {key:18} {value}")


def print_report(results: list[Result]) -> None:
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
    parser.add_argument(
        "--before",
        type=Path,
        metavar="SRC",
        help="also time the engine's no-query cycle of the tree whose src/ is SRC (e.g. a "
        "git worktree of an older commit) against this tree's, in alternating child "
        "processes, each also timing psycopg_pool",
    )
    parser.add_argument(
        "--fence",
        action="store_true",
        help="also time the fence's cost per query: SELECT 1 on one held lease, through "
        "lease.raw, lease.using() and lease.connection (FencedConnection)",
    )
    parser.add_argument(
        "--no-libraries",
        action="store_true",
        help="skip the comparison with psycopg_pool and SQLAlchemy (with --before, --fence)",
    )
    parser.add_argument("--cycle-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cycle_child:
        cycle_child(args.dsn, args.quick)
        return 0
    params = QUICK if args.quick else FULL
    began = time.perf_counter()
    ba: BeforeAfter | None = None
    fence: dict[str, Any] | None = None

    with server(args.dsn) as dsn:
        monitor = Monitor(dsn)
        try:
            if monitor.backends():
                raise RuntimeError(f"{APP}-* backends already connected: {monitor.backends()}")
            env = environment(monitor.server_version())
            env["loadavg_at_start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
            results: list[Result] = []
            if not args.no_libraries:
                for query in (False, True):
                    print(f"running {scenario_name(1, query)} ...", flush=True)
                    results += bench_single(dsn, params, query, monitor)
                for query in (False, True):
                    print(f"running {scenario_name(THREADS, query)} ...", flush=True)
                    results += bench_multi(dsn, params, query, monitor)
            if args.before is not None:
                print("running the engine cycle, before/after ...", flush=True)
                ba = bench_before_after(dsn, args.before, args.quick)
            if args.fence:
                print("running the fence's cost per query ...", flush=True)
                fence = bench_fence(dsn, args.quick, monitor)
            env["loadavg_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
            left = monitor.wait_all_gone()
            if left:
                raise RuntimeError(f"connections left open after closing every pool: {left}")
        finally:
            monitor.close()

    elapsed = time.perf_counter() - began
    print_environment(env)
    if results:
        print_report(results)
    ba_rows = before_after_figures(ba, CYCLE_PARAMS[args.quick]) if ba is not None else None
    if ba is not None and ba_rows is not None:
        print_before_after(ba, ba_rows, CYCLE_PARAMS[args.quick])
    if fence is not None:
        print_fence(fence)
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
            "before_after": None
            if ba is None
            else {
                "trees": ba.trees,
                "rounds": ba.rounds,
                "params_per_child": {
                    "batches": CYCLE_PARAMS[args.quick].batches,
                    "cycles_per_batch": CYCLE_PARAMS[args.quick].cycles_single[False],
                    "runs": CYCLE_PARAMS[args.quick].runs,
                    "cycles_per_thread_per_run": CYCLE_PARAMS[args.quick].cycles_multi[False],
                },
                "rows": ba_rows,
            },
            "fence": fence,
            "backends_seen": monitor.seen,
            "elapsed_s": elapsed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
