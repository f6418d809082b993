"""Instructions per cycle, counted by valgrind (callgrind): the request path's cost
in a unit that does not move with the machine's load.

    python benchmarks/bench_instructions.py [--before SRC] [--only django|engine]
                                            [--query | --site | --asgi async|sync
                                             | --parts]

On a shared 2-core machine the same timed cycle varies by ±50 % from one minute to
the next, more than the differences this repository tries to measure. The number of
instructions the interpreter executes for a cycle does not: it is the same to within
0.5 % from run to run, so two trees, or connguard and its anchors, compare exactly.
It is not time (a cache miss or a lock hand-off costs no instruction more), so the
timed benches (``bench_reacquire.py``, ``bench_pool.py``) stay the measure of speed;
this one says where the interpreter's work went and whether a change removed some.

Each figure is the difference between two runs of the same child under
``valgrind --tool=callgrind``, one with 200 cycles more than the other warm-up, one
with 2,200 (the engine: 1,000 and 11,000), divided by the cycles between them: the
start-up, Django's set-up and the server's start cancel out. PostgreSQL runs in its
own process, not under valgrind; a round trip it serves counts nothing here.

* ``django``: Django's per-request cycle with no query (``bench_reacquire.py``'s
  ``--alone`` cycle: ``request_started``, ``ensure_connection()``,
  ``request_finished``), each configuration a site of its own: ``persistent``
  (``CONN_MAX_AGE=None``), ``native`` (Django's pool), ``connguard``. With
  ``--query``, one ``SELECT 1`` through a cursor per cycle too (the round trip
  itself, in the server and the kernel, counts nothing: this is the Python work
  around it).
  With ``--site``, a whole request instead: Django's ``WSGIHandler`` called as a
  server calls it, on the site ``startproject`` makes (seven middleware; connguard's
  with ``ConnguardMiddleware`` first, as its docs ask), with a view
  that runs ``SELECT 1`` through a cursor (``bench_site.py``): what the bare cycle
  leaves out (URL resolution, middleware, the response, an acquire site walked from
  a view) is paid here as a real request pays it.
  With ``--asgi async`` (or ``sync``), a whole request through Django's
  ``ASGIHandler`` on an asyncio loop, as ``bench_asgi.py`` makes it: ``GET /async``,
  an async view that queries through the async ORM and ``sync_to_async`` (or ``GET
  /one``, a sync view, which Django runs in a thread); issue 11's async path.
* ``--parts``: where connguard's no-query cycle goes (:func:`parts_child`): Django's
  request signals, connguard's receivers, the acquire and release through the
  wrapper and, under them, the engine's; each counted alone, in a loop.
* ``engine``: one ``acquire()`` + ``release()`` of connguard's ``Pool`` against
  psycopg_pool's ``getconn()`` + ``putconn()``, pools of 2, no query; and the
  ``floor``: the least a pool with a fence can do in Python (:func:`floor_cycle`: a
  lock, a list of idle connections, a lease object with its own lock and a weak
  reference; no clock, no transaction status, no statistics, no acquire site). What
  is left between the floor and connguard is what its guarantees cost.

Under valgrind the interpreter runs some 50 times slower, and that changes one thing
connguard does by the clock: the liveness test (``liveness_after_idle``, 1 ms by
default) runs at every checkout under valgrind, where at full speed it runs about once
in 25 request cycles (once in 150 engine cycles). So connguard is counted twice: with
its defaults (an upper bound: a test at every checkout) and as ``connguard-untested``
(``liveness_after_idle=None``: the lower bound, which full speed is close to).

Each line gives connguard as "untested to default". Needs ``valgrind`` (Debian:
``apt-get install valgrind``). Takes about 5 minutes (10 with ``--before``), two
children at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DJANGO = ("persistent", "native", "connguard", "connguard-untested")
ENGINE = ("psycopg_pool", "connguard", "connguard-untested", "floor")
RUNS = {
    "django": (200, 2_200),
    "django-query": (200, 2_200),
    "django-site": (200, 1_200),
    "django-asgi": (100, 600),
    "django-asgi-sync": (100, 600),
    "parts": (1_000, 11_000),
    "engine": (1_000, 11_000),
}


def django_child(
    alias: str, cycles: int, query: bool = False, site: bool = False, asgi: str = ""
) -> None:
    import django
    from django.conf import settings

    from connguard.testing.postgres import EmbeddedPostgres

    sys.path.insert(0, str(HERE))
    import bench_asgi
    from bench_reacquire import databases, request_cycle
    from bench_site import bare_settings, requester, settings_for

    untested = alias == "connguard-untested"
    alias = "connguard" if untested else alias
    with EmbeddedPostgres() as pg:
        pool: dict[str, Any] = {"liveness_after_idle": None} if untested else {}
        database = databases(pg, **pool)[alias]
        if asgi:
            settings.configure(**bench_asgi.site_settings(database, alias))
        else:
            configure = settings_for if site else bare_settings
            settings.configure(**configure(database, connguard=alias == "connguard"))
        django.setup()
        from django.db import connection

        runs = 300 + cycles  # 300: warm-up, the same in both runs
        if asgi:
            one = bench_asgi.requester(sync=asgi == "sync")

            async def requests() -> None:
                for _ in range(runs):
                    await one()

            asyncio.run(requests())
        elif site:
            request = requester()
            for _ in range(runs):
                request()
        else:
            for _ in range(runs):
                request_cycle(connection, query)
        if alias == "connguard":
            from connguard.django import pools

            pools.close_pools()
        else:
            connection.close()
            if alias == "native":
                connection.close_pool()


PARTS = ("cycle", "signals", "receivers", "asgi", "wrapper", "engine", "loop")


def parts_child(part: str, cycles: int) -> None:
    """One part of connguard's Django cycle, repeated (``--parts``), on the cycle's site
    (``connguard-untested``): ``signals``: ``request_started`` and
    ``request_finished`` sent with no lease taken (Django's receivers and connguard's);
    ``receivers``: connguard's two receivers alone (the request's scope made, made
    current and ended); ``asgi``: the same for an ASGI request (found through
    asgiref's per-request context, which each turn makes anew, as a request does);
    ``wrapper``: ``ensure_connection()`` and Django's
    ``close_if_unusable_or_obsolete()`` on the wrapper, in an open scope (the acquire
    and the release as Django makes them); ``engine``: the pool's ``acquire()`` and
    ``release()`` under them; ``loop``: a call of an empty function (subtracted)."""
    import django
    from django.conf import settings

    from connguard.testing.postgres import EmbeddedPostgres

    sys.path.insert(0, str(HERE))
    from bench_reacquire import databases, request_cycle
    from bench_site import bare_settings

    with EmbeddedPostgres() as pg:
        database = databases(pg, liveness_after_idle=None)["connguard"]
        settings.configure(**bare_settings(database, connguard=True))
        django.setup()
        from django.core.signals import request_finished, request_started
        from django.db import connection, connections

        from connguard.django import pools, scopes
        from connguard.scope import Scope, begin

        wrapper = connections["default"]
        for _ in range(300):
            request_cycle(connection, False)
        begin(Scope("parts", "request"))  # the scope the wrapper and engine parts run in
        wrapper.ensure_connection()
        lease = wrapper.connguard_lease
        assert lease is not None
        pool, owner = lease.pool, lease.owner
        wrapper.close()

        def cycle() -> None:
            request_cycle(connection, False)

        def signals() -> None:
            request_started.send(sender=None)
            request_finished.send(sender=None)

        def receivers() -> None:
            scopes.request_started(None)
            scopes.request_finished(None)

        from asgiref.sync import SyncToAsync, ThreadSensitiveContext

        asgi_scope = {"type": "http", "method": "GET", "path": "/"}
        per_request = SyncToAsync.thread_sensitive_context

        def asgi() -> None:
            token = per_request.set(ThreadSensitiveContext())
            scopes.request_started(None, scope=asgi_scope)
            scopes.request_finished(None)
            per_request.reset(token)

        def wrapped() -> None:
            wrapper.ensure_connection()
            wrapper.close_if_unusable_or_obsolete()

        def engine() -> None:
            pool.acquire(owner=owner, stack=()).release()

        def loop() -> None:
            pass

        run = {
            "cycle": cycle, "signals": signals, "receivers": receivers, "asgi": asgi,
            "wrapper": wrapped, "engine": engine, "loop": loop,
        }[part]  # fmt: skip
        if part in ("cycle", "signals", "receivers", "asgi"):
            scopes.request_finished(None)  # these make scopes of their own
        for _ in range(300 + cycles):
            run()
        pools.close_pools()


def floor_cycle(cycles: int) -> None:
    """The floor: a pool reduced to what a fenced checkout cannot do without. Each
    checkout makes a lease with its own lock (the fence) and registers it weakly (so
    a dropped lease can be noticed); each release sets the fence under that lock and
    gives the connection back under the pool's. Connections are plain objects: the
    driver is not called at all."""
    import threading
    import weakref

    class Lease:
        __slots__ = ("__weakref__", "_conn", "_ending", "_guard", "_pool", "_ref", "owner")

        def __init__(self, pool: Any, conn: object, owner: object) -> None:
            self._pool = pool
            self._conn = conn
            self._guard = threading.Lock()
            self._ending = False
            self.owner = owner
            self._ref: Any = None

        def release(self) -> None:
            self._pool.release(self)

    class Pool:
        def __init__(self) -> None:
            self._lock = threading.Lock()
            self._idle = [object(), object()]
            self._leases: dict[Any, object] = {}

        def acquire(self, owner: object = None) -> Lease:
            with self._lock:
                conn = self._idle.pop()
                lease = Lease(self, conn, owner)
                ref = lease._ref = weakref.ref(lease)
                self._leases[ref] = conn
            return lease

        def release(self, lease: Lease) -> None:
            with lease._guard:
                lease._ending = True
            with self._lock:
                conn, lease._conn = lease._conn, None
                del self._leases[lease._ref]
                self._idle.append(conn)

    pool = Pool()
    for _ in range(300 + cycles):
        pool.acquire().release()


def engine_child(subject: str, cycles: int) -> None:
    if subject == "floor":
        floor_cycle(cycles)
        return
    from connguard.testing.postgres import EmbeddedPostgres

    with EmbeddedPostgres() as pg:
        if subject == "psycopg_pool":
            from psycopg_pool import ConnectionPool

            pp: Any = ConnectionPool(
                pg.dsn, min_size=2, max_size=2, kwargs={"autocommit": True}, open=True
            )
            pp.wait()
            for _ in range(300 + cycles):
                pp.putconn(pp.getconn())
            pp.close()
            return
        from connguard.drivers import load_driver
        from connguard.pool import Pool, PoolConfig

        live = None if subject == "connguard-untested" else PoolConfig().liveness_after_idle
        config = PoolConfig(min_size=2, max_size=2, liveness_after_idle=live)
        pool = Pool(load_driver("psycopg", conninfo=pg.dsn), config)
        for _ in range(300 + cycles):
            pool.acquire().release()
        pool.close()


def count(kind: str, subject: str, cycles: int, src: Path) -> int:
    """Instructions of one child run under callgrind."""
    cmd = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, __file__, "--child", kind, subject, str(cycles),
    ]  # fmt: skip
    # A fixed hash seed: dicts and sets laid out the same in every run, which makes
    # two runs of the same tree agree to a few hundred instructions, not thousands.
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONHASHSEED": "0"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    found = re.search(r"Collected : ([\d,]+)", out.stderr)
    if out.returncode != 0 or found is None:
        raise SystemExit(f"bench_instructions: {kind} {subject} failed:\n{out.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_cycle(kind: str, subject: str, src: Path) -> float:
    low, high = RUNS[kind]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda n: count(kind, subject, n, src), (low, high))
    return (b - a) / (high - low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, metavar="SRC", help="an older tree's src/ too")
    parser.add_argument("--only", choices=("django", "engine"))
    parser.add_argument("--query", action="store_true", help="Django cycle: one SELECT 1 too")
    parser.add_argument(
        "--site", action="store_true", help="Django: a whole request instead (bench_site.py)"
    )
    parser.add_argument(
        "--parts", action="store_true", help="where connguard's Django cycle goes, part by part"
    )
    parser.add_argument(
        "--asgi",
        choices=("async", "sync"),
        help="Django: a whole request through ASGIHandler instead (bench_asgi.py), "
        "to its async view or its sync one",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, subject, cycles = args.child
        if kind == "engine":
            engine_child(subject, int(cycles))
        elif kind == "parts":
            parts_child(subject, int(cycles))
        else:
            django_child(
                subject,
                int(cycles),
                query=kind == "django-query",
                site=kind == "django-site",
                asgi={"django-asgi": "async", "django-asgi-sync": "sync"}.get(kind, ""),
            )
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("bench_instructions: valgrind is not installed (apt-get install valgrind)")
    here = HERE.parent / "src"
    trees = [("this tree", here)] + ([("before", args.before.resolve())] if args.before else [])
    figures: dict[str, dict[str, float]] = {}
    for label, src in trees:
        if args.parts:
            ir = {part: per_cycle("parts", part, src) for part in PARTS}
            figures[f"{label}: parts"] = ir
            loop = ir["loop"]
            net = {part: ir[part] - loop for part in PARTS[:-1]}
            rest = net["wrapper"] - net["engine"]
            django_own = net["signals"] - net["receivers"]
            left = net["cycle"] - net["signals"] - net["wrapper"]
            print(
                f"{label:10} connguard's Django cycle, no query (instructions, each without "
                f"the loop's {loop:,.0f}): cycle {net['cycle']:,.0f} = Django's request "
                f"signals {django_own:,.0f} + connguard's receivers {net['receivers']:,.0f} "
                f"+ acquire and release through the wrapper {net['wrapper']:,.0f} (the "
                f"engine's {net['engine']:,.0f}, the Django layer's {rest:,.0f}) + "
                f"the rest {left:,.0f}; an ASGI request's receivers {net['asgi']:,.0f}",
                flush=True,
            )
            continue
        if args.only in (None, "django"):
            kind = (
                f"django-asgi{'-sync' if args.asgi == 'sync' else ''}"
                if args.asgi
                else "django-site"
                if args.site
                else "django-query"
                if args.query
                else "django"
            )
            ir = {alias: per_cycle(kind, alias, src) for alias in DJANGO}
            figures[f"{label}: {kind}"] = ir
            p, n, c, u = (ir[a] for a in DJANGO)
            what = (
                "an ASGI request (GET /one, a sync view)"
                if args.asgi == "sync"
                else "an ASGI request (GET /async, an async view)"
                if args.asgi
                else "cycle, a whole request (GET /one, SELECT 1)"
                if args.site
                else "cycle, one SELECT 1"
                if args.query
                else "cycle, no query"
            )
            print(
                f"{label:10} Django {what} (instructions): persistent {p:,.0f}  "
                f"native {n:,.0f}  connguard {u:,.0f} to {c:,.0f}   "
                f"connguard/persistent {u / p:.2f} to {c / p:.2f}  "
                f"connguard/native {u / n:.2f} to {c / n:.2f}",
                flush=True,
            )
        if args.only in (None, "engine"):
            ir = {subject: per_cycle("engine", subject, src) for subject in ENGINE}
            figures[f"{label}: engine"] = ir
            pp, cg, cu, fl = (ir[s] for s in ENGINE)
            print(
                f"{label:10} engine cycle, no query (instructions): psycopg_pool {pp:,.0f}  "
                f"connguard {cu:,.0f} to {cg:,.0f}   "
                f"connguard/psycopg_pool {cu / pp:.2f} to {cg / pp:.2f}   "
                f"floor {fl:,.0f} ({fl / pp:.2f} x psycopg_pool)",
                flush=True,
            )
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
