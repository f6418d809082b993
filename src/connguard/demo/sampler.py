"""Watch a run from outside: the server's backends, and the site's pool gauges.

The backends are counted by PostgreSQL itself (``pg_stat_activity``, filtered on the
``application_name`` the site's connections carry: connguard's connections carry it as
the prefix of their tag, ``<name>|cg|<host>|<pid>|<alias>``), on a connection of the
sampler's own, so that what the demo and the tests claim about connections is what
the server saw, not what the code under test believes. The pool's gauges come from
the site's ``/connguard/stats`` view, for comparison.

Both samplers run in a daemon thread and never raise from it: a failure (the server
went away, e.g. on Ctrl-C) stops sampling and is kept in ``error``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg

from .servers import get

__all__ = ["BackendSampler", "PoolGauges", "PoolSampler", "Sample"]

_COUNT_SQL = """
SELECT count(*),
       count(*) FILTER (WHERE state LIKE 'idle in transaction%%'),
       count(*) FILTER (WHERE state = 'active'),
       count(*) FILTER (WHERE state = 'idle'),
       array_agg(pid::text || '@' || extract(epoch FROM backend_start)::text)
FROM pg_stat_activity
WHERE split_part(application_name, '|cg|', 1) = %s
"""


class Sample(NamedTuple):
    """The site's backends at one instant, by state (``other``: starting, fastpath...)."""

    t: float
    """``time.monotonic()`` when the sample was taken."""
    backends: int
    idle_in_transaction: int
    active: int
    idle: int

    @property
    def other(self) -> int:
        return self.backends - self.idle_in_transaction - self.active - self.idle


class BackendSampler:
    """Samples the server's own view of one site's backends every ``interval`` seconds.

    Also remembers every backend it saw (pid and start time), which counts the
    connections a run opened on servers without ``pg_stat_database.sessions``.
    """

    def __init__(
        self,
        dsn: str,
        app_name: str,
        interval: float = 0.02,
        *,
        own_name: str = "docsite-sampler",
        connect_timeout: int = 10,
    ) -> None:
        self.dsn = dsn
        self.app_name = app_name
        self.interval = interval
        self.peak = 0
        self.samples: list[Sample] = []
        self.backends_seen: set[str] = set()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backend-sampler", daemon=True)
        self._conn = psycopg.connect(
            dsn, autocommit=True, application_name=own_name, connect_timeout=connect_timeout
        )

    def sample(self) -> Sample:
        """Take one sample now (without recording it)."""
        row = self._conn.execute(_COUNT_SQL, (self.app_name,)).fetchone()
        assert row is not None
        self.backends_seen.update(row[4] or ())
        return Sample(time.monotonic(), int(row[0]), int(row[1]), int(row[2]), int(row[3]))

    def count(self) -> tuple[int, int]:
        """Backends now, and how many of them are idle in a transaction."""
        s = self.sample()
        return s.backends, s.idle_in_transaction

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run a query on the sampler's connection (one connection less to budget)."""
        return self._conn.execute(sql, params).fetchall()

    def record(self) -> None:
        """Take a sample and keep it."""
        s = self.sample()
        self.peak = max(self.peak, s.backends)
        self.samples.append(s)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.record()
        except Exception as exc:
            self.error = exc

    def start(self) -> None:
        self._thread.start()

    def halt(self) -> None:
        """Stop sampling (the connection stays open for :meth:`count` and :meth:`query`)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10.0)

    def __enter__(self) -> BackendSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt()

    def wait_for(self, predicate: Callable[[int], bool], timeout: float) -> tuple[int, int]:
        """Poll until ``predicate(backends)`` holds; return the last count."""
        deadline = time.monotonic() + timeout
        while True:
            n, idle_tx = self.count()
            if predicate(n) or time.monotonic() >= deadline:
                return n, idle_tx
            self._stop.wait(0.05)

    def close(self) -> None:
        self.halt()
        self._conn.close()


@dataclass(frozen=True)
class PoolGauges:
    """The site's pools added up over its worker processes (latest figure of each)."""

    size: int
    in_use: int
    idle: int
    waiting: int
    opened: int
    min_size: int
    max_size: int
    processes: int

    def as_dict(self) -> dict[str, int]:
        return {
            "size": self.size,
            "in_use": self.in_use,
            "idle": self.idle,
            "waiting": self.waiting,
            "opened": self.opened,
        }


class PoolSampler:
    """Polls the site's ``/connguard/stats`` every ``interval`` seconds.

    Each answer comes from one worker process; the latest answer of every process
    seen is kept and added up. A site without connguard answers ``[]``: its samples
    are None.
    """

    def __init__(self, port: int, interval: float = 0.25, timeout: float = 2.0) -> None:
        self.port = port
        self.interval = interval
        self.timeout = timeout
        self.samples: list[tuple[float, PoolGauges | None]] = []
        self.error: BaseException | None = None
        self._latest: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pool-sampler", daemon=True)

    def poll(self) -> PoolGauges | None:
        status, _, body = get(self.port, "/connguard/stats", timeout=self.timeout)
        if status != 200:
            return self.gauges()
        for stats in json.loads(body):
            self._latest[int(stats.get("pid", 0))] = stats
        return self.gauges()

    def gauges(self) -> PoolGauges | None:
        """The latest figures, added up over processes; None without connguard."""
        if not self._latest:
            return None
        every = list(self._latest.values())

        def total(key: str) -> int:
            return sum(int(stats[key]) for stats in every)

        return PoolGauges(
            size=total("size"),
            in_use=total("in_use"),
            idle=total("idle"),
            waiting=total("waiting"),
            opened=total("opened"),
            min_size=int(every[0]["min_size"]),
            max_size=int(every[0]["max_size"]),
            processes=len(every),
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                gauges = self.poll()
            except OSError:
                continue  # busy or restarting: the next poll will tell
            except Exception as exc:
                self.error = exc
                return
            self.samples.append((time.monotonic(), gauges))

    def start(self) -> None:
        self._thread.start()

    def halt(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout + 5.0)
