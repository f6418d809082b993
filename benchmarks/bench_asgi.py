"""Django's per-request cost under ASGI, in-process: issue 11's async path.

    python benchmarks/bench_asgi.py [--rounds R] [--requests N] [--sync]

Each configuration is a site of its own (one database, as ``bench_reacquire.py
--alone``), in a child process of its own; the children take turns, R rounds. A
request is Django's own ``ASGIHandler`` called directly on an asyncio loop (no
server, no HTTP parsing) with ``GET /async``: the async view of
``benchmarks/bench_views.py``, which queries through the async ORM (``aexists()``,
run by Django with ``sync_to_async``) and runs one ``SELECT 1`` through
``sync_to_async``. ``--sync`` asks for a sync view instead (Django runs it in a
thread): ``/one``, one ``SELECT 1``. ``bench_views`` is the URLconf.

* ``persistent``: stock backend, ``CONN_MAX_AGE=None`` (leaks under ASGI: the anchor
  of issue 11 nonetheless);
* ``native``: Django's own pool (psycopg_pool), ``min_size = max_size = 4``;
* ``connguard``: ``ENGINE = connguard.backends.postgresql``, pool 4, and
  ``ConnguardMiddleware``, as docs/django.md tells a user to set it up.

Requests run one after the other (what one request costs, not throughput: that is
``bench_django.py``'s). The figure is the median over rounds of each round's median
request, in µs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ALIASES = ("persistent", "native", "connguard")
HERE = Path(__file__).resolve().parent


def site_settings(database: dict[str, Any], alias: str) -> dict[str, Any]:
    """``settings.configure()`` keywords for ``alias``'s site: its one database, the
    view's app, and for connguard its app and ``ConnguardMiddleware``, as
    docs/django.md tells a user to set it up."""
    apps = ["connguard.demo.site"]  # the app label of the view's unmanaged model
    middleware = []
    if alias == "connguard":
        apps.insert(0, "connguard.django")
        middleware.append("connguard.django.middleware.ConnguardMiddleware")
    return {
        "DATABASES": {"default": database},
        "INSTALLED_APPS": apps,
        "MIDDLEWARE": middleware,
        "ROOT_URLCONF": "bench_views",
        "ALLOWED_HOSTS": ["*"],
        "USE_TZ": True,
        "TIME_ZONE": "UTC",
    }


def requester(sync: bool) -> Callable[[], Awaitable[None]]:
    """A coroutine function that makes one request through Django's ``ASGIHandler``
    (``GET /async``, or ``/one`` with ``sync``) and checks its answer. Call it after
    ``django.setup()``, from one event loop."""
    from django.core.handlers.asgi import ASGIHandler

    handler = ASGIHandler()
    path = "/one" if sync else "/async"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }

    async def one() -> None:
        body = [{"type": "http.request", "body": b"", "more_body": False}]
        never = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if body:
                return body.pop()
            await never.wait()  # the client stays; Django cancels this listener
            return {"type": "http.disconnect"}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await handler(scope, receive, send)
        if sent[0]["status"] != 200:
            raise SystemExit(f"GET {path} answered {sent[0]['status']}")

    return one


def child(alias: str, requests: int, sync: bool) -> float:
    import django
    from django.conf import settings

    from connguard.testing.postgres import EmbeddedPostgres

    sys.path.insert(0, str(HERE))
    from bench_reacquire import databases

    with EmbeddedPostgres() as pg:
        settings.configure(**site_settings(databases(pg)[alias], alias))
        django.setup()
        one = requester(sync)

        async def run() -> list[int]:
            clock = time.perf_counter_ns
            out: list[int] = []
            for n in range(requests + 500):  # the first 500: warm-up
                started = clock()
                await one()
                if n >= 500:
                    out.append(clock() - started)
            return out

        return statistics.median(asyncio.run(run())) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--sync", action="store_true", help="a sync view (/one) instead")
    parser.add_argument("--child", choices=ALIASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(child(args.child, args.requests, args.sync))
        return
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    per_round: dict[str, list[float]] = {alias: [] for alias in ALIASES}
    for n in range(args.rounds):
        for alias in ALIASES[n % 3 :] + ALIASES[: n % 3]:
            cmd = [sys.executable, __file__, "--child", alias, "--requests", str(args.requests)]
            if args.sync:
                cmd.append("--sync")
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            per_round[alias].append(float(out.stdout.strip().splitlines()[-1]))
    p, n, c = (statistics.median(per_round[a]) for a in ALIASES)
    view = "sync view /one" if args.sync else "async view /async"
    print(
        f"ASGIHandler in-process, {view}, median of {args.rounds} rounds of "
        f"{args.requests} requests (µs per request)"
    )
    print(
        f"  persistent {p:7.1f}  native {n:7.1f}  connguard {c:7.1f}   "
        f"connguard/persistent {c / p:4.2f}  connguard/native {c / n:4.2f}"
    )


if __name__ == "__main__":
    main()
