"""Django's per-request database cycle with no query, in-process: what a request pays
for its connection when it does nothing else (issue 11's first figure).

    python benchmarks/bench_reacquire.py [--query] [--rounds R] [--before SRC]

One process, one embedded PostgreSQL, three aliases of the same database:

* ``persistent``: stock backend, ``CONN_MAX_AGE=None`` (the anchor);
* ``native``: Django's own pool (psycopg_pool), ``min_size = max_size = 4``;
* ``connguard``: ``ENGINE = connguard.backends.postgresql``, ``min_size = max_size = 4``.

A cycle is what Django's handler does for the database around a view:
``request_started``, ``connections[alias].ensure_connection()`` (with ``--query``:
one ``SELECT 1`` through a cursor), ``request_finished``. Each cycle is timed
(``perf_counter_ns``); R rounds of 300 cycles per alias, aliases interleaved round by
round after a warm-up; the figure is the median cycle. All three aliases are
configured in every run, so Django's own per-request work over all aliases
(``close_old_connections``) is the same for each.

``--alone`` measures instead as a new user would compare them (issue 11's method): each
configuration is a site of its own, with that one database as ``default`` and
nothing else (the persistent and native sites without connguard installed), in a
child process of its own; the three children take turns, R rounds of 3,000 cycles
each, and the figure is the median over the rounds of each round's median cycle.
Django's per-request work over its aliases then costs what one alias costs, so the
ratios are harder than in the default mode, where every alias pays for all four.

``--before SRC`` runs the connguard alias of an older tree too (``SRC`` = its
``src/``, e.g. from ``git archive``), in a child process with the same settings, and
prints both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ALIASES = ("persistent", "native", "connguard")
BATCH = 300


def databases(pg: Any, size: int = 4, **pool: Any) -> dict[str, dict[str, Any]]:
    """The three configurations of one database (``pg``: an ``EmbeddedPostgres``):
    ``persistent``, ``native`` and ``connguard``, pools of ``size`` (and ``pool``'s
    other settings, connguard's only). ``bench_asgi.py`` and ``bench_threads.py``
    use them too."""
    base = {"NAME": "postgres", "USER": pg.user, "HOST": pg.host, "PORT": pg.port}
    sized = {"min_size": size, "max_size": size}
    stock = "django.db.backends.postgresql"
    return {
        "persistent": {**base, "ENGINE": stock, "CONN_MAX_AGE": None},
        "native": {**base, "ENGINE": stock, "OPTIONS": {"pool": sized}},
        "connguard": {
            **base,
            "ENGINE": "connguard.backends.postgresql",
            "OPTIONS": {"pool": {**sized, **pool}},
        },
    }


def request_cycle(connection: Any, query: bool) -> None:
    """What Django's handler does for the database around a view."""
    from django.core.signals import request_finished, request_started

    request_started.send(sender=None)
    connection.ensure_connection()
    if query:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    request_finished.send(sender=None)


def run_alone(alias: str, cycles: int, query: bool) -> float:
    """One configuration as the only database of its site; the median cycle (µs)."""
    import django
    from django.conf import settings

    from connguard.testing.postgres import EmbeddedPostgres

    with EmbeddedPostgres() as pg:
        settings.configure(
            DATABASES={"default": databases(pg)[alias]},
            INSTALLED_APPS=["connguard.django"] if alias == "connguard" else [],
            USE_TZ=True,
            TIME_ZONE="UTC",
        )
        django.setup()
        from django.db import connection

        clock = time.perf_counter_ns
        timings: list[int] = []
        for n in range(cycles + 1000):  # the first 1,000: warm-up
            started = clock()
            request_cycle(connection, query)
            if n >= 1000:
                timings.append(clock() - started)
        return statistics.median(timings) / 1e3


def alone(src: Path, rounds: int, query: bool) -> dict[str, float]:
    """Each configuration in its own child, the children taking turns."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    per_round: dict[str, list[float]] = {alias: [] for alias in ALIASES}
    for n in range(rounds):
        for alias in ALIASES[n % 3 :] + ALIASES[: n % 3]:
            child = [sys.executable, __file__, "--alone-child", alias]
            if query:
                child.append("--query")
            out = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
            per_round[alias].append(float(out.stdout.strip().splitlines()[-1]))
    return {alias: statistics.median(values) for alias, values in per_round.items()}


def run(rounds: int, query: bool) -> dict[str, float]:
    import django
    from django.conf import settings

    from connguard.testing.postgres import EmbeddedPostgres

    with EmbeddedPostgres() as pg:
        configs = databases(pg)
        settings.configure(
            DATABASES={"default": configs["persistent"], **configs},
            INSTALLED_APPS=["connguard.django"],
            USE_TZ=True,
            TIME_ZONE="UTC",
        )
        django.setup()
        from django.db import connections

        def cycle(alias: str) -> None:
            request_cycle(connections[alias], query)

        timings: dict[str, list[int]] = {alias: [] for alias in ALIASES}
        for alias in ALIASES:
            for _ in range(BATCH):
                cycle(alias)
        clock = time.perf_counter_ns
        for n in range(rounds):
            order = ALIASES[n % 3 :] + ALIASES[: n % 3]
            for alias in order:
                out = timings[alias]
                for _ in range(BATCH):
                    started = clock()
                    cycle(alias)
                    out.append(clock() - started)
        return {alias: statistics.median(ts) / 1e3 for alias, ts in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--query", action="store_true", help="one SELECT 1 per cycle")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--before", type=Path, metavar="SRC", help="an older tree's src/")
    parser.add_argument("--alone", action="store_true", help="each configuration a site of its own")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--alone-child", choices=ALIASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.rounds, args.query)))
        return
    if args.alone_child:
        print(run_alone(args.alone_child, 3000, args.query))
        return
    here = Path(__file__).resolve().parent.parent / "src"
    trees: list[tuple[str, Path]] = [("this tree", here)]
    if args.before is not None:
        trees.insert(0, ("before", args.before.resolve()))
    what = "one SELECT 1" if args.query else "no query"
    if args.alone:
        print(f"Django per-request cycle, {what}, each configuration alone, median of "
              f"{args.rounds} rounds of 3,000 cycles (µs)")  # fmt: skip
    else:
        print(f"Django per-request cycle, {what}, "
              f"median of {args.rounds * BATCH} cycles per alias (µs)")  # fmt: skip
    for label, src in trees:
        if args.alone:
            alone_figures = alone(src, args.rounds, args.query)
            p, n, c = (alone_figures[a] for a in ALIASES)
            print(
                f"  {label:10} persistent {p:6.1f}  native {n:6.1f}  connguard {c:6.1f}   "
                f"connguard/persistent {c / p:4.2f}  connguard/native {c / n:4.2f}"
            )
            continue
        env = {**os.environ, "PYTHONPATH": str(src)}
        child = [sys.executable, __file__, "--child", "--rounds", str(args.rounds)]
        if args.query:
            child.append("--query")
        out = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
        figures: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        p, n, c = (figures[a] for a in ALIASES)
        print(
            f"  {label:10} persistent {p:6.1f}  native {n:6.1f}  connguard {c:6.1f}   "
            f"connguard/persistent {c / p:4.2f}  connguard/native {c / n:4.2f}"
        )


if __name__ == "__main__":
    main()
