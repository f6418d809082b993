"""Django's request cycle from many threads of one process: where connguard's cost
grows with threads (issue 11).

    python benchmarks/bench_threads.py [--threads 8] [--size 8] [--cycles 1500]
                                       [--rounds 2]

No HTTP: each thread runs Django's cycle (``request_started``, one ``SELECT 1``
through ``connection.cursor()``, ``request_finished``) ``--cycles`` times, all
threads released together; throughput = cycles / wall time. Each configuration is
a site of its own in a child process (one database as ``default``), the children
taking turns round by round:

* ``native``: Django's pool (psycopg_pool), ``min_size = max_size = --size``;
* ``connguard``: defaults;
* ``connguard, no request scopes``: connguard's request signal receivers
  disconnected (leases then belong to each thread's scope);
* ``connguard, no site, no liveness``: ``stack_depth=0``, ``liveness_after_idle=None``;
* ``connguard, none of the three``.

Also printed per configuration: CPU time per cycle (all threads) and voluntary
context switches per cycle (``getrusage``): under the GIL, a cost that is small
for one thread is paid again in hand-offs when threads queue for the interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "native": {"engine": "native"},
    "connguard": {"engine": "connguard"},
    "connguard, no request scopes": {"engine": "connguard", "no_scopes": True},
    "connguard, no site, no liveness": {
        "engine": "connguard",
        "pool": {"stack_depth": 0, "liveness_after_idle": None},
    },
    "connguard, none of the three": {
        "engine": "connguard",
        "no_scopes": True,
        "pool": {"stack_depth": 0, "liveness_after_idle": None},
    },
}


def child(config: dict[str, Any], threads: int, size: int, cycles: int) -> dict[str, float]:
    import django
    from django.conf import settings

    from bench_reacquire import databases
    from connguard.testing.postgres import EmbeddedPostgres

    with EmbeddedPostgres() as pg:
        connguard = config["engine"] == "connguard"
        database = databases(pg, size, **config.get("pool", {}))[config["engine"]]
        settings.configure(
            DATABASES={"default": database},
            INSTALLED_APPS=["connguard.django"] if connguard else [],
            USE_TZ=True,
            TIME_ZONE="UTC",
        )
        django.setup()
        from django.core.signals import request_finished, request_started
        from django.db import connection

        if config.get("no_scopes"):
            request_started.disconnect(dispatch_uid="connguard.request_started")
            request_finished.disconnect(dispatch_uid="connguard.request_finished")
        barrier = threading.Barrier(threads + 1)

        def work() -> None:
            barrier.wait()
            for _ in range(cycles):
                request_started.send(sender=None)
                with connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
                    cursor.fetchone()
                request_finished.send(sender=None)

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for worker in workers:
            worker.start()
        before = resource.getrusage(resource.RUSAGE_SELF)
        cpu, wall = time.process_time(), time.perf_counter()
        barrier.wait()
        for worker in workers:
            worker.join()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        after = resource.getrusage(resource.RUSAGE_SELF)
        n = threads * cycles
        return {
            "per_s": n / wall,
            "cpu_us": cpu / n * 1e6,
            "vcsw": (after.ru_nvcsw - before.ru_nvcsw) / n,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--cycles", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(CONFIGS[args.child], args.threads, args.size, args.cycles)))
        return
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name in CONFIGS:
            cmd = [sys.executable, __file__, "--child", name, "--threads", str(args.threads),
                   "--size", str(args.size), "--cycles", str(args.cycles)]  # fmt: skip
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"{args.threads} threads, pool {args.size}, {args.cycles} cycles each, "
        f"median of {args.rounds} rounds"
    )
    native = statistics.median(r["per_s"] for r in results["native"])
    for name, runs in results.items():
        per_s = statistics.median(r["per_s"] for r in runs)
        cpu = statistics.median(r["cpu_us"] for r in runs)
        vcsw = statistics.median(r["vcsw"] for r in runs)
        print(
            f"  {name:34} {per_s:7.0f} cycles/s ({per_s / native:4.2f}x native)  "
            f"CPU {cpu:6.1f} µs/cycle  {vcsw:4.2f} voluntary switches/cycle"
        )


if __name__ == "__main__":
    main()
