"""The database's ordinary bad days, through a real Django site (issue 10).

Every test runs the demo site under uvicorn or gunicorn gthread (psycopg 3 or
psycopg2) on a private PostgreSQL, puts it under a modest load (a few client threads,
each GETting ``/x/one``: one small query, ``tests/site_faults.py``), breaks the
database or the network in one of the ways production does, and checks what the
*clients* saw, request by request (start, end, status, body head, and from the
server's log why it failed), plus what PostgreSQL saw (``pg_stat_activity``).

1. Every backend of the pool terminated (``pg_terminate_backend``, what a DBA,
   ``idle_session_timeout``, a failover or a proxy does): in an idle pool, in the
   middle of a burst, and every 2 s for 20 s. Requests started after a termination
   must all succeed; requests in flight at a termination may fail and are counted
   apart. PostgreSQL must see the pool come back (new backends).
2. PostgreSQL restarted under load (fast and immediate shutdown, down 2 s and
   15 s): no request takes longer than ``timeout`` + 1 s, and every request started
   1 s or more after the server accepts connections again succeeds.
3. The database down when the site starts, then started: the site serves without a
   restart, and while the database is down its 503 says "unreachable", not
   "overloaded".
4. Network faults through the fault proxy (delay, reset, blackhole): no request
   waits past the bound its timeouts give, and the pool heals once the fault is
   lifted.
5. An outage (database stopped, or a blackhole) with ``max_waiting`` set: once the
   pool has seen a connect fail, every 503 says "unreachable", the requests past
   ``max_waiting`` too (refused at once), never "overloaded" or "refused".
6. A request blocked on a row lock past ``socket_timeout``: its call is aborted, and
   its backend must not stay behind holding the locks its transaction took.
7. The event loop (uvicorn, daphne): a release made there with a dead network in
   between (a dirty connection's reset, a waiter queued) never stops the worker.

Pool settings are small (``max_size`` 3, ``timeout`` 2 s, ``connect_timeout`` 2 s)
so that the module runs in a few minutes. The bounds are module constants, each
with its reasoning.

Harness notes:

* ``EmbeddedPostgres.start()`` after ``stop()`` reuses the same port (the site's
  settings keep pointing at it); each restart test checks that it did.
* ``EmbeddedPostgres.terminate_backends(application_name)`` matches the name
  exactly, but connguard tags its connections ``<name>|cg|<host>|<pid>|<alias>``:
  it would kill nothing. :func:`terminate_pool` matches the tag's prefix instead.
* The fault proxy's blackhole reads and drops bytes in user space: the proxy's
  kernel acknowledges everything, so TCP keepalives and ``TCP_USER_TIMEOUT`` can
  never notice it, and bytes sent during the blackhole are lost for good (a real
  partition loses packets, which TCP retransmits once it heals). A statement sent
  into it never gets an answer, even after the blackhole is lifted: only a
  client-side deadline ends it, the pool's ``socket_timeout`` (set here).
"""

from __future__ import annotations

import http.client
import itertools
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connguard.testing.postgres import EmbeddedPostgres

from .proxy import FaultProxy
from .servers import Server, get, running, running_one_worker

pytestmark = [pytest.mark.real, pytest.mark.private, pytest.mark.servers]

TIMEOUT = 2.0
"""The pool's ``timeout``: the longest an acquire waits."""
CONNECT_TIMEOUT = 2
"""The pool's ``connect_timeout`` (libpq counts whole seconds and treats 1 as 2)."""
SOCKET_TIMEOUT = 2.0
"""The pool's ``socket_timeout``: a call into the driver blocked this long (plus up to
one ``housekeeping_interval``) has its socket shut down."""
HOUSEKEEPING = 0.25
POOL: dict[str, Any] = {
    "min_size": 1,
    "max_size": 3,
    "timeout": TIMEOUT,
    "connect_timeout": CONNECT_TIMEOUT,
    "socket_timeout": SOCKET_TIMEOUT,
    "max_idle": 5.0,
    "housekeeping_interval": HOUSEKEEPING,
}

MARGIN = 0.05
"""Requests started this long after a termination (or a reset) returned must
succeed. ``pg_terminate_backend(pid, 5000)`` returns only once the backends have
exited, and the proxy's ``reset_all()`` once both sides are reset, so the clients'
sockets are already dead when the request is sent: in principle no margin is needed.
50 ms is slack for the 2-core machine's scheduling between the psql process ending
and the test thread taking the time."""

LATE_OK = 1.0
"""Requests started this long after PostgreSQL accepts connections again must
succeed (the issue's figure)."""

SLOW = TIMEOUT + 1.0
"""No request may take longer while the database is down or restarting: the
acquire gives up after ``timeout``; a refused connect fails at once; 1 s of slack."""

DELAY = 0.1
"""The proxy's delay per forwarded chunk, in each direction."""
DELAY_BOUND = TIMEOUT + 1.0 + 8 * (2 * DELAY)
"""Under the delay: an acquire (``timeout``), then at most 4 round trips of
``2 * DELAY`` each (the query, a health check, a reset, a rollback), x2 for safety,
and 1 s of slack."""

BLACKHOLE = 3.0
"""How long the blackhole lasts."""
BLACKHOLE_BOUND = TIMEOUT + SOCKET_TIMEOUT + HOUSEKEEPING + 1.0
"""Under the blackhole: an acquire (``timeout``, which also bounds the pings of
suspect connections and the connects, run on opener threads), then one statement
sent into the blackhole, which ``socket_timeout`` ends (checked every
``housekeeping_interval``), and 1 s of slack."""
HEAL = BLACKHOLE_BOUND
"""After a blackhole is lifted, requests started this long afterwards must succeed:
whatever was stuck when it lifted has had its bound (above) to give up."""

PACE = 0.1
"""Each client's pause between requests where a check counts the requests started
after a termination or a reset: 3 clients then send ~25 requests/s. Faster, the
requests sent within ``MARGIN`` of the fault use up the pool's dead connections
(each fails one request, which counts as in flight) and the check loses its teeth:
at 0.02 s (~100 requests/s) one run of 10 terminations under uvicorn found none
started after ``MARGIN`` on a dead connection, even though the code hands them out
untested."""

CLIENT_TIMEOUT = TIMEOUT + CONNECT_TIMEOUT + 6.0
"""The load's HTTP timeout: long enough that a request overrunning its bound is
measured (it shows as ``took`` > bound), short enough that a hung one ends."""

RESETS = 5
LOAD_SHAPE: dict[str, dict[str, Any]] = {
    "delay": {"threads": 3, "pace": 0.02},
    "reset": {"threads": 3, "pace": PACE},
    # Each request stuck on a blackholed connection holds its client thread until the
    # client's timeout (just past the bound): 6 clients keep requests starting.
    "blackhole": {"threads": 6, "pace": 0.05, "timeout": BLACKHOLE_BOUND + 1.0},
}

PROBE = "fault-probe:"  # tests/site_faults.py writes why a query failed
MATRIX = [
    pytest.param("uvicorn", "psycopg", id="uvicorn-psycopg"),
    pytest.param("uvicorn", "psycopg2", id="uvicorn-psycopg2"),
    pytest.param("gunicorn", "psycopg", id="gunicorn-psycopg"),
    pytest.param("gunicorn", "psycopg2", id="gunicorn-psycopg2"),
]


# ------------------------------------------------------------------ the database


@pytest.fixture(scope="module")
def site_pg() -> Iterator[tuple[EmbeddedPostgres, dict[str, Any]]]:
    """One private server for the module; tests stop and restart it."""
    pg = EmbeddedPostgres(max_connections=60)
    pg.start()
    try:
        pg.psql("CREATE DATABASE docsite")  # /x/one needs no table: no migrate
        db = {"HOST": pg.host, "PORT": pg.port, "NAME": "docsite", "USER": "postgres"}
        yield pg, db
    finally:
        pg.cleanup()


@pytest.fixture
def db_up(
    site_pg: tuple[EmbeddedPostgres, dict[str, Any]],
) -> Iterator[tuple[EmbeddedPostgres, dict[str, Any]]]:
    """The module's server, running before and after the test (whatever it did)."""
    pg, _ = site_pg
    if not pg.running:
        pg.start()
    try:
        yield site_pg
    finally:
        if not pg.running:
            pg.start()


def site_env(app: str, driver: str, pool: dict[str, Any] | None = None) -> dict[str, str]:
    env = {
        "DOCSITE_APP_NAME": app,
        "DOCSITE_POOL": json.dumps(pool or POOL),
        "DOCSITE_EXTRA_URLS": "tests.site_faults",
    }
    if driver == "psycopg2":
        env["DOCSITE_DRIVER"] = "psycopg2"
    return env


_OF_APP = "backend_type = 'client backend' AND split_part(application_name, '|cg|', 1) = '{}'"


@dataclass(frozen=True)
class Backend:
    pid: int
    worker: int  # the site's process that holds it (from connguard's tag)
    state: str


def backends(pg: EmbeddedPostgres, app: str) -> list[Backend]:
    """The site's backends, as PostgreSQL sees them (``pg_stat_activity``)."""
    with psycopg.connect(pg.dsn, autocommit=True, application_name="fault-admin") as admin:
        rows = admin.execute(
            "SELECT pid, split_part(application_name, '|', 4), coalesce(state, '') "
            f"FROM pg_stat_activity WHERE {_OF_APP.format(app)}"
        ).fetchall()
    return [Backend(int(pid), int(worker or 0), state) for pid, worker, state in rows]


@dataclass(frozen=True)
class Event:
    """A fault, from just before it was set off (``t0``) to when it had taken
    effect (``t1``): for a termination, when every targeted backend had exited."""

    name: str
    t0: float
    t1: float
    victims: int = 0


def terminate_pool(pg: EmbeddedPostgres, app: str) -> tuple[Event, set[int]]:
    """``pg_terminate_backend`` every backend of the site at once, then wait (5 s at
    most) until none of them is left; return the event and the pids terminated.

    On a connection of our own: through psql, or with ``pg_terminate_backend(pid,
    5000)`` (which polls every 100 ms per backend), the termination would take
    0.2-0.5 s, long enough for the pool's connections to age past
    ``liveness_after_idle`` and change the scenario. Here it takes a few ms."""
    with psycopg.connect(pg.dsn, autocommit=True, application_name="fault-admin") as admin:
        t0 = time.monotonic()
        rows = admin.execute(
            # MATERIALIZED: the planner must not evaluate pg_terminate_backend() before
            # the filter (merged into one scan, it would kill every backend, ours too).
            "WITH victims AS MATERIALIZED (SELECT pid FROM pg_stat_activity "
            f"WHERE {_OF_APP.format(app)}) "
            "SELECT pid FROM victims WHERE pg_terminate_backend(pid)"
        ).fetchall()
        pids = [int(row[0]) for row in rows]
        deadline = t0 + 5.0
        while pids and time.monotonic() < deadline:
            left = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
            ).fetchone()
            if not left or not left[0]:
                break
            threading.Event().wait(0.002)
        else:
            if pids:
                raise AssertionError(f"backends {pids} still there 5 s after their termination")
        t1 = time.monotonic()
    return Event("terminate", t0, t1, len(pids)), set(pids)


def until(deadline: float) -> None:
    """Shape the load's timeline: let it run until ``deadline`` (monotonic)."""
    left = deadline - time.monotonic()
    if left > 0:
        threading.Event().wait(left)


def poll(check: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    """Poll ``check`` until it holds or ``timeout`` passes; return the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        threading.Event().wait(every)


# ------------------------------------------------------------------ the load


@dataclass(frozen=True)
class Hit:
    """One request as the client saw it (status 0: no HTTP answer)."""

    rid: int
    start: float
    end: float
    status: int
    head: str
    cause: str = ""  # the Connguard-Cause header of a 503

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def took(self) -> float:
        return self.end - self.start


class Load:
    """``threads`` clients, each GETting ``/x/one?rid=N`` on a fresh HTTP connection,
    back to back (``pace`` seconds apart), until stopped or ``limit`` requests."""

    def __init__(
        self,
        port: int,
        *,
        threads: int = 3,
        pace: float = 0.02,
        limit: int | None = None,
        timeout: float = CLIENT_TIMEOUT,
    ) -> None:
        self.port = port
        self.pace = pace
        self.limit = limit
        self.timeout = timeout
        self._hits: list[Hit] = []
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"load-{i}", daemon=True)
            for i in range(threads)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                rid = next(self._ids)
                if self.limit is not None and rid > self.limit:
                    return
            self._record(one(self.port, rid, self.timeout))
            if self.pace:
                self._stop.wait(self.pace)

    def _record(self, hit: Hit) -> None:
        with self._cond:
            self._hits.append(hit)
            self._cond.notify_all()

    def wait_count(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` requests have been answered (or failed)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._hits) >= n, timeout)

    def wait_done(self, timeout: float) -> None:
        """Wait for a ``limit``-ed load to finish (every thread returned)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        """Send no new request; wait for those in flight (each ends by its timeout)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5.0)

    def wait_streak(self, after: float, streak: int, timeout: float) -> bool:
        """Wait until the last ``streak`` requests started after ``after`` all succeeded."""

        def ok() -> bool:
            late = sorted((h for h in self._hits if h.start >= after), key=lambda h: h.start)
            return len(late) >= streak and all(h.ok for h in late[-streak:])

        with self._cond:
            return self._cond.wait_for(ok, timeout)

    @property
    def hits(self) -> list[Hit]:
        with self._cond:
            return sorted(self._hits, key=lambda h: h.start)


def one(port: int, rid: int, timeout: float = CLIENT_TIMEOUT) -> Hit:
    start = time.monotonic()
    try:
        status, headers, body = get(port, f"/x/one?rid={rid}", timeout=timeout)
        head = body[:160].decode(errors="replace").strip()
        cause = headers.get("connguard-cause", "")
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out
        status, head, cause = 0, repr(exc)[:160], ""
    return Hit(rid, start, time.monotonic(), status, head, cause)


def sequential(port: int, count: int, gap: float = 0.0) -> list[Hit]:
    hits = []
    for rid in range(count):
        if rid and gap:
            threading.Event().wait(gap)  # load shape, not synchronisation
        hits.append(one(port, 10_000 + rid))
    return hits


# ------------------------------------------------------------------ what went wrong


_PROBE_LINE = re.compile(rf"{PROBE} rid=(\d+) (.*)")


def reasons(srv: Server) -> dict[int, str]:
    """Why each failed query failed, by request id (from the server's log)."""
    out: dict[int, str] = {}
    for line in srv.log_text().splitlines():
        found = _PROBE_LINE.search(line)
        if found:
            out[int(found[1])] = found[2][:200]
    return out


def why(hit: Hit, why_by_rid: dict[int, str]) -> str:
    if hit.status == 0:
        return f"no answer: {hit.head}"
    head = hit.head.splitlines()[0][:120] if hit.head else ""
    detail = why_by_rid.get(hit.rid) or head
    return f"HTTP {hit.status}: {detail}"


def failures(hits: Iterable[Hit], srv: Server, top: int = 4) -> str:
    """The failed requests, grouped by what happened."""
    by_rid = reasons(srv)
    counts = Counter(why(h, by_rid) for h in hits if not h.ok)
    return "; ".join(f"{n} x {text}" for text, n in counts.most_common(top)) or "none"


def summary(hits: list[Hit], srv: Server) -> str:
    failed = [h for h in hits if not h.ok]
    longest = max((h.took for h in hits), default=0.0)
    return (
        f"{len(hits)} requests, {len(failed)} failed, longest {longest:.2f} s; "
        f"failures: {failures(hits, srv)}"
    )


def in_flight(hit: Hit, event: Event, margin: float = MARGIN) -> bool:
    """The request may have been using a connection the event broke."""
    return hit.start < event.t1 + margin and hit.end > event.t0


def after_faults(hits: list[Hit], events: list[Event]) -> tuple[list[Hit], list[Hit]]:
    """(requests in flight at some event, the others)."""
    caught = [h for h in hits if any(in_flight(h, e) for e in events)]
    clear = [h for h in hits if not any(in_flight(h, e) for e in events)]
    return caught, clear


def check_after_faults(
    problems: list[str], hits: list[Hit], events: list[Event], srv: Server, t_zero: float
) -> str:
    """Requests in flight at an event may fail; every other one must succeed."""
    caught, clear = after_faults(hits, events)
    bad = [h for h in clear if not h.ok]
    in_flight_note = (
        f"in flight at a {events[0].name if events else 'fault'}: {len(caught)} requests, "
        f"{sum(not h.ok for h in caught)} failed ({failures(caught, srv, 2)})"
    )
    if bad:
        when = ", ".join(f"{h.start - t_zero:.2f}" for h in bad[:12])
        problems.append(
            f"{len(bad)} of {len(clear)} requests not in flight at a {events[0].name} "
            f"(started {MARGIN * 1000:.0f} ms or more after it) failed: {failures(bad, srv)}; "
            f"started at t= {when} s "
            f"(events at t= {', '.join(f'{e.t1 - t_zero:.2f}' for e in events)} s)"
        )
    for i, event in enumerate(events):
        nxt = events[i + 1].t0 if i + 1 < len(events) else float("inf")
        if not any(event.t1 + MARGIN <= h.start < nxt for h in hits):
            problems.append(
                f"no request started after {event.name} #{i + 1}: the check had no teeth"
            )
    return in_flight_note


def check_bound(problems: list[str], hits: list[Hit], bound: float, what: str, srv: Server) -> None:
    slow = [h for h in hits if h.took > bound]
    if slow:
        worst = max(slow, key=lambda h: h.took)
        problems.append(
            f"{len(slow)} of {len(hits)} requests took longer than {bound:.1f} s ({what}); "
            f"longest {worst.took:.2f} s ({why(worst, reasons(srv))})"
        )


def recovery(hits: list[Hit], t_up: float, since: str = "the server was back") -> str:
    """When, after ``t_up``, the site served again: first success, last failure."""
    late = [h for h in hits if h.end >= t_up]
    first_ok = next((h for h in late if h.ok), None)
    failed = [h for h in late if not h.ok]
    first = f"{first_ok.end - t_up:.2f} s" if first_ok else "never"
    last = f"{max(h.start for h in failed) - t_up:.2f} s" if failed else "none"
    return f"first success {first} after {since}; last failed request started {last}"


def report(problems: list[str], notes: list[str]) -> str:
    return "\n".join([*problems, "--- figures:", *notes])


# ------------------------------------------------------------------ 1. terminated backends


@pytest.mark.parametrize(("server", "driver"), MATRIX)
def test_idle_pool_terminated_then_ten_sequential_requests(
    db_up: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, server: str, driver: str
) -> None:
    """The issue's simple case. ``min_size=2``; a few concurrent requests leave each
    process's pool with 2 or more idle connections, returned a moment ago (as on any
    busy site: within ``liveness_after_idle``). Terminate them all, wait 150 ms, then
    10 sequential requests: all must be 200, and PostgreSQL must then see each
    process's pool back at ``min_size`` on new backends."""
    pg, db = db_up
    app = f"fault-idle-{server}-{driver}"
    pool = {**POOL, "min_size": 2}
    problems: list[str] = []
    notes: list[str] = []
    with running(server, db, tmp_path, **site_env(app, driver, pool)) as srv:
        with Load(srv.port, threads=4, pace=0.0, limit=40) as warm:
            warm.wait_done(30.0)
        assert all(h.ok for h in warm.hits), summary(warm.hits, srv)

        def warm_and_idle() -> bool:
            seen = backends(pg, app)
            per_worker = Counter(b.worker for b in seen)
            return (
                bool(seen)
                and all(b.state == "idle" for b in seen)
                and all(n >= pool["min_size"] for n in per_worker.values())
            )

        assert poll(warm_and_idle, 10.0), f"pool not warm and idle: {backends(pg, app)}"
        # Use the idle connections once more, so each was returned a moment ago.
        with Load(srv.port, threads=4, pace=0.0, limit=8) as fresh:
            fresh.wait_done(10.0)
        assert poll(lambda: all(b.state == "idle" for b in backends(pg, app)), 5.0)
        before = backends(pg, app)
        workers = {b.worker for b in before}
        kill, killed = terminate_pool(pg, app)
        notes.append(
            f"terminated {len(killed)} idle backends of {len(workers)} process(es), "
            f"in {1000 * (kill.t1 - kill.t0):.0f} ms"
        )
        threading.Event().wait(0.15)  # the scenario: 150 ms later
        hits = sequential(srv.port, 10)
        bad = [h for h in hits if not h.ok]
        notes.append(summary(hits, srv))
        if bad:
            problems.append(
                f"{len(bad)} of 10 requests made 150 ms after the termination failed: "
                f"{failures(bad, srv)} (requests #{[h.rid - 10_000 + 1 for h in bad]})"
            )

        # The server's side: every process's pool is back to min_size, on new backends.
        def reconnected() -> bool:
            now = backends(pg, app)
            fresh_per_worker = Counter(b.worker for b in now if b.pid not in killed)
            return all(fresh_per_worker[w] >= pool["min_size"] for w in workers)

        bound = pool["housekeeping_interval"] + CONNECT_TIMEOUT + 1.0
        if not poll(reconnected, bound):
            now = backends(pg, app)
            problems.append(
                f"{bound:.2f} s after the requests, PostgreSQL does not see every pool back "
                f"at min_size={pool['min_size']} on new backends: {len(now)} backends "
                f"{[(b.pid, b.worker, b.state) for b in now]}, "
                f"{sum(b.pid in killed for b in now)} of them terminated ones"
            )
    print(report(problems, notes))
    assert not problems, report(problems, notes)


@pytest.mark.parametrize(
    ("server", "driver"),
    [
        pytest.param("uvicorn", "psycopg2", id="uvicorn-psycopg2"),
        pytest.param("gunicorn", "psycopg", id="gunicorn-psycopg"),
    ],
)
def test_pool_terminated_in_the_middle_of_a_burst(
    db_up: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, server: str, driver: str
) -> None:
    """A burst of 400 requests, 4 at a time, no pause (about 1 s); every backend of the
    pool terminated once half have been answered. Requests in flight then may fail;
    none started after.

    The pool is saturated: its connections are nearly always in use, so this mostly
    checks that the failures stay with the requests in flight (no cascade, no stuck
    pool); a dead connection left idle is the other tests' business."""
    pg, db = db_up
    app = f"fault-burst-{server}-{driver}"
    problems: list[str] = []
    notes: list[str] = []
    with running(server, db, tmp_path, **site_env(app, driver)) as srv:
        with Load(srv.port, threads=4, pace=0.0, limit=400) as load:
            t_zero = time.monotonic()
            assert load.wait_count(200, 30.0), summary(load.hits, srv)
            kill, killed = terminate_pool(pg, app)
            load.wait_done(60.0)
        hits = load.hits
        notes.append(
            f"terminated {len(killed)} backends at t={kill.t0 - t_zero:.2f} s, "
            f"gone {1000 * (kill.t1 - kill.t0):.0f} ms later; burst ended at "
            f"t={max(h.end for h in load.hits) - t_zero:.2f} s"
        )
        notes.append(summary(hits, srv))
        notes.append(check_after_faults(problems, hits, [kill], srv, t_zero))
        if not kill.victims:
            problems.append("the termination found no backend: the check had no teeth")
        now = backends(pg, app)
        if not any(b.pid not in killed for b in now):
            problems.append(f"no new backend after the burst: {now}")
    print(report(problems, notes))
    assert not problems, report(problems, notes)


@pytest.mark.parametrize(
    ("server", "driver"),
    [
        pytest.param("uvicorn", "psycopg", id="uvicorn-psycopg"),
        pytest.param("gunicorn", "psycopg2", id="gunicorn-psycopg2"),
    ],
)
def test_pool_terminated_every_2s_for_20s_under_load(
    db_up: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, server: str, driver: str
) -> None:
    """3 clients for 21 s; every backend of the pool terminated at 2, 4, ... 20 s.
    Requests in flight at a termination may fail (counted apart); every other
    request must succeed, and PostgreSQL must see new backends after each round."""
    pg, db = db_up
    app = f"fault-every2s-{server}-{driver}"
    problems: list[str] = []
    notes: list[str] = []
    kills: list[Event] = []
    killed: set[int] = set()
    with running(server, db, tmp_path, **site_env(app, driver)) as srv:
        with Load(srv.port, threads=3, pace=PACE) as load:
            t_zero = time.monotonic()
            for k in range(1, 11):
                until(t_zero + 2.0 * k)
                kill, pids = terminate_pool(pg, app)
                if pids & killed:
                    problems.append(f"termination #{k} found backends already terminated")
                kills.append(kill)
                killed |= pids
            until(t_zero + 21.0)
        hits = load.hits
        notes.append(f"10 terminations, backends killed each time: {[e.victims for e in kills]}")
        notes.append(summary(hits, srv))
        notes.append(check_after_faults(problems, hits, kills, srv, t_zero))
        if not all(e.victims for e in kills):
            problems.append(f"a termination found no backend: {[e.victims for e in kills]}")
        after_last = sum(1 for h in hits if h.start >= kills[-1].t1 + MARGIN and h.ok)
        now = backends(pg, app)
        if not any(b.pid not in killed for b in now) or not after_last:
            problems.append(
                f"after the last termination: {after_last} successful requests; "
                f"backends now {[(b.pid, b.state) for b in now]} (killed: {len(killed)})"
            )
    print(report(problems, notes))
    assert not problems, report(problems, notes)


# ------------------------------------------------------------------ 2. restarts


@pytest.mark.parametrize(
    ("outage", "server", "driver"),
    [
        pytest.param(("fast", 2.0), "uvicorn", "psycopg", id="fast-2s-uvicorn-psycopg"),
        pytest.param(
            ("immediate", 2.0), "gunicorn", "psycopg2", id="immediate-2s-gunicorn-psycopg2"
        ),
        pytest.param(("immediate", 2.0), "uvicorn", "psycopg2", id="immediate-2s-uvicorn-psycopg2"),
        pytest.param(("fast", 15.0), "gunicorn", "psycopg", id="fast-15s-gunicorn-psycopg"),
    ],
)
def test_postgres_restart_under_load(
    db_up: tuple[EmbeddedPostgres, dict[str, Any]],
    tmp_path: Path,
    outage: tuple[str, float],
    server: str,
    driver: str,
) -> None:
    """3 clients; PostgreSQL shut down (``mode``: fast or immediate), kept down
    ``down`` seconds, started again. No request takes longer than ``timeout`` + 1 s;
    every request started 1 s or more after the server accepts connections again
    succeeds."""
    pg, db = db_up
    mode, down = outage
    app = f"fault-restart-{mode}-{int(down)}-{server}-{driver}"
    problems: list[str] = []
    notes: list[str] = []
    port = pg.port
    with running(server, db, tmp_path, **site_env(app, driver)) as srv:
        with Load(srv.port, threads=3, pace=0.02) as load:
            assert load.wait_count(30, 30.0), summary(load.hits, srv)
            t_down = time.monotonic()
            pg.stop(mode)  # type: ignore[arg-type]
            t_stopped = time.monotonic()
            until(t_stopped + down)  # the outage
            pg.start()
            t_up = time.monotonic()
            assert pg.port == port, f"PostgreSQL came back on port {pg.port}, not {port}"
            until(t_up + LATE_OK + 3.0)
            # On failure, go on until the site serves again, to measure how long it took.
            load.wait_streak(t_up + LATE_OK, 10, 15.0)
        hits = load.hits
        notes.append(
            f"{mode} shutdown took {t_stopped - t_down:.2f} s; down {t_up - t_stopped:.2f} s "
            f"(start included)"
        )
        notes.append(summary(hits, srv))
        notes.append(recovery(hits, t_up))
        check_bound(problems, hits, SLOW, "timeout + 1 s", srv)
        late = [h for h in hits if h.start >= t_up + LATE_OK]
        bad = [h for h in late if not h.ok]
        if bad:
            problems.append(
                f"{len(bad)} of {len(late)} requests started {LATE_OK} s or more after "
                f"PostgreSQL was back failed, the last started "
                f"{max(h.start for h in bad) - t_up:.2f} s after: {failures(bad, srv)}"
            )
        if not late:
            problems.append("no request started after the server was back: no teeth")
    print(report(problems, notes))
    assert not problems, report(problems, notes)


# ------------------------------------------------------------------ 3. down at start


@pytest.mark.parametrize(
    ("server", "driver"),
    [
        pytest.param("uvicorn", "psycopg2", id="uvicorn-psycopg2"),
        pytest.param("gunicorn", "psycopg", id="gunicorn-psycopg"),
    ],
)
def test_database_down_at_start_then_started(
    db_up: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, server: str, driver: str
) -> None:
    """The site starts while PostgreSQL is down. Each request then gets a 503 that
    says "unreachable" (not "overloaded") within ``timeout`` + 1 s. PostgreSQL
    starts: without restarting the site, every request started 1 s or more later
    succeeds."""
    pg, db = db_up
    app = f"fault-downstart-{server}-{driver}"
    problems: list[str] = []
    notes: list[str] = []
    pg.stop("fast")
    with running(server, db, tmp_path, **site_env(app, driver)) as srv:
        down = sequential(srv.port, 3, gap=0.1)
        notes.append("while down: " + summary(down, srv))
        notes.append(f"while down, the bodies: {sorted({h.head[:100] for h in down})}")
        check_bound(problems, down, SLOW, "timeout + 1 s", srv)
        wrong = [
            h for h in down
            if h.status != 503 or "unreachable" not in h.head or "overloaded" in h.head
        ]  # fmt: skip
        if wrong:
            problems.append(
                f"{len(wrong)} of {len(down)} requests while the database was down did not "
                f"get a 503 saying 'unreachable' (and not 'overloaded'): "
                f"{Counter((h.status, h.head[:100]) for h in wrong).most_common(2)}"
            )
        pg.start()
        t_up = time.monotonic()
        with Load(srv.port, threads=1, pace=0.1) as load:
            until(t_up + LATE_OK + 2.0)
            load.wait_streak(t_up + LATE_OK, 5, 15.0)  # on failure: how long it takes
        hits = load.hits
        notes.append("once started: " + summary(hits, srv))
        notes.append(recovery(hits, t_up))
        late = [h for h in hits if h.start >= t_up + LATE_OK]
        bad = [h for h in late if not h.ok]
        if bad or not late:
            problems.append(
                f"{len(bad)} of {len(late)} requests started {LATE_OK} s or more after "
                f"PostgreSQL started failed: {failures(bad, srv)}"
            )
    print(report(problems, notes))
    assert not problems, report(problems, notes)


# ------------------------------------------------------------------ 4. network faults


@pytest.mark.parametrize(
    ("fault", "server", "driver"),
    [
        pytest.param("delay", "uvicorn", "psycopg", id="delay-uvicorn-psycopg"),
        pytest.param("reset", "gunicorn", "psycopg2", id="reset-gunicorn-psycopg2"),
        pytest.param("blackhole", "uvicorn", "psycopg2", id="blackhole-uvicorn-psycopg2"),
        pytest.param("blackhole", "gunicorn", "psycopg", id="blackhole-gunicorn-psycopg"),
    ],
)
def test_network_fault_through_proxy(
    db_up: tuple[EmbeddedPostgres, dict[str, Any]],
    tmp_path: Path,
    fault: str,
    server: str,
    driver: str,
) -> None:
    """3 clients through the fault proxy.

    * ``delay``: 0.1 s per chunk for 3 s. Every request within ``DELAY_BOUND``, and
      none fails (the delay is far below every timeout); after it, all succeed.
    * ``reset``: every proxied connection reset, 5 times 1 s apart. Every request
      within ``timeout`` + 1 s; as for a termination, only requests in flight at a
      reset may fail.
    * ``blackhole``: for 3 s. Every request within ``BLACKHOLE_BOUND``; requests
      started ``HEAL`` seconds after it is lifted all succeed.
    """
    pg, db = db_up
    app = f"fault-proxy-{fault}-{server}-{driver}"
    problems: list[str] = []
    notes: list[str] = []
    proxy = FaultProxy(pg.host, pg.port)
    proxy.start()
    try:
        proxied = {**db, "HOST": proxy.host, "PORT": proxy.port}
        with running(server, proxied, tmp_path, **site_env(app, driver)) as srv:
            with Load(srv.port, **LOAD_SHAPE[fault]) as load:
                assert load.wait_count(30, 30.0), summary(load.hits, srv)
                t_zero = time.monotonic()
                events: list[Event] = []
                if fault == "delay":
                    proxy.set_delay(DELAY)
                    until(t_zero + 3.0)
                    proxy.set_delay(0.0)
                    t_lift = time.monotonic()
                    until(t_lift + 3.0)
                elif fault == "reset":
                    for k in range(RESETS):
                        until(t_zero + 1.0 * k)
                        t0 = time.monotonic()
                        proxy.reset_all()
                        events.append(Event("reset", t0, time.monotonic()))
                    t_lift = events[-1].t1
                    until(t_lift + 2.0)
                else:
                    proxy.blackhole(True)
                    until(t_zero + BLACKHOLE)
                    proxy.blackhole(False)
                    t_lift = time.monotonic()
                    until(t_lift + HEAL + 2.0)
            hits = load.hits
            notes.append(summary(hits, srv))
            notes.append(recovery(hits, t_lift, "the fault was lifted"))
            during = [h for h in hits if h.end > t_zero and h.start < t_lift]
            notes.append(f"during the fault: {summary(during, srv)}")
            if fault == "delay":
                check_bound(problems, hits, DELAY_BOUND, "the delay bound", srv)
                bad = [h for h in hits if not h.ok]
                if bad:
                    problems.append(
                        f"{len(bad)} of {len(hits)} requests failed under a {DELAY} s delay: "
                        f"{failures(bad, srv)}"
                    )
            elif fault == "reset":
                check_bound(problems, hits, SLOW, "timeout + 1 s", srv)
                notes.append(check_after_faults(problems, hits, events, srv, t_zero))
            else:
                check_bound(
                    problems, hits, BLACKHOLE_BOUND, "timeout + socket_timeout + 1.25 s", srv
                )
                late = [h for h in hits if h.start >= t_lift + HEAL]
                bad = [h for h in late if not h.ok]
                if bad or not late:
                    problems.append(
                        f"{len(bad)} of {len(late)} requests started {HEAL:.0f} s or more after "
                        f"the blackhole was lifted failed: {failures(bad, srv)}"
                    )
    finally:
        proxy.close()
    print(report(problems, notes))
    assert not problems, report(problems, notes)


# ------------------------------------------------------------------ 5. outage past max_waiting


OUTAGE_POOL: dict[str, Any] = {
    "min_size": 0,  # no connection when the outage starts (none to find dead or stuck)
    "max_size": 2,
    "max_waiting": 2,
    "timeout": 1.0,
    "connect_timeout": CONNECT_TIMEOUT,
    "socket_timeout": SOCKET_TIMEOUT,
    "housekeeping_interval": HOUSEKEEPING,
}
OUTAGE_BURST = 8
"""Requests sent at once: gunicorn's 8 threads take them all; 2 wait (``max_waiting``),
the others are refused at once."""


@pytest.mark.parametrize("outage", ["stopped", "blackhole"])
def test_an_outage_with_max_waiting_is_never_called_overload(
    db_up: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, outage: str
) -> None:
    """The database stopped (connects refused at once) or a blackhole (connects hang
    until ``connect_timeout``), and more requests at once than ``max_waiting``.

    docs/django.md: ``unreachable`` means every instance sees the same (alert on it);
    ``overloaded``/``refused`` mean this process is saturated (retry elsewhere, do
    not mark it unhealthy). Once the pool has seen a connect fail, every 503 of the
    burst, refused at once or timed out, must say ``unreachable``. Before that (a
    blackhole's first ``connect_timeout``) a refusal cannot tell and says
    ``refused``, as documented: the test waits for the first failed connect first
    (a lone request whose error carries the last connect error). One gunicorn worker,
    so the pool that saw the failure is the one that answers the burst."""
    pg, db = db_up
    app = f"fault-maxwaiting-{outage}"
    proxy = FaultProxy(pg.host, pg.port)
    proxy.start()
    notes: list[str] = []
    try:
        proxied = {**db, "HOST": proxy.host, "PORT": proxy.port}
        env = site_env(app, "psycopg", OUTAGE_POOL)
        with running_one_worker(proxied, tmp_path, **env) as srv:
            if outage == "stopped":
                pg.stop("fast")
            else:
                proxy.blackhole(True)
            try:
                rids = itertools.count(20_000)

                def connect_failed() -> bool:
                    hit = one(srv.port, next(rids))
                    return hit.cause == "unreachable" and (
                        "last connect error" in reasons(srv).get(hit.rid, "")
                    )

                assert poll(connect_failed, 10.0), "the pool never saw a connect fail"
                hits: list[Hit] = []
                threads = [
                    threading.Thread(target=lambda: hits.append(one(srv.port, next(rids))))
                    for _ in range(OUTAGE_BURST)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(CLIENT_TIMEOUT + 5.0)
            finally:
                if outage == "stopped":
                    pg.start()
                else:
                    proxy.blackhole(False)
            assert poll(lambda: one(srv.port, next(rids)).ok, 10.0), "did not recover"
            why_by_rid = reasons(srv)
            notes.append(summary(hits, srv))
            notes.append(f"(status, cause): {Counter((h.status, h.cause) for h in hits)}")
    finally:
        proxy.close()
    wrong = [h for h in hits if h.status != 503 or h.cause != "unreachable"]
    slow = [h for h in hits if h.took > SLOW]
    refused = [h for h in hits if "refused at once" in why_by_rid.get(h.rid, "")]
    problems = []
    if len(hits) != OUTAGE_BURST:
        problems.append(f"{OUTAGE_BURST - len(hits)} requests of the burst never ended")
    if wrong:
        problems.append(
            f"{len(wrong)} of {len(hits)} requests during the outage were not told "
            f"'unreachable': {failures(wrong, srv)}"
        )
    if slow:
        problems.append(f"{len(slow)} requests took over {SLOW} s: {failures(slow, srv)}")
    if not refused:
        problems.append("no request was refused at once: the burst missed max_waiting")
    print(report(problems, notes))
    assert not problems, report(problems, notes)


# ------------------------------------------------------------------ 6. a lock wait aborted


LOCK_POOL: dict[str, Any] = {
    "min_size": 0,
    "max_size": 2,
    "timeout": TIMEOUT,
    "connect_timeout": CONNECT_TIMEOUT,
    "socket_timeout": 1.0,
    "housekeeping_interval": HOUSEKEEPING,
}
LOCK_GONE = 3.0
"""How long after the aborted request's 500 its backend may still be on the server:
the cancel is sent at once (psycopg 3); without one (psycopg2) the server notices the
closed socket within ``client_connection_check_interval`` (0.25 s); the rest is slack."""


def lock_rows(pg: EmbeddedPostgres) -> str:
    """``fault_rows`` (ids 1 and 2) in the site's database; its DSN."""
    dsn = f"host={pg.host} port={pg.port} dbname=docsite user=postgres"
    with psycopg.connect(dsn, autocommit=True, application_name="fault-admin") as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS fault_rows (id int PRIMARY KEY, v int NOT NULL)")
        admin.execute("INSERT INTO fault_rows VALUES (1, 0), (2, 0) ON CONFLICT DO NOTHING")
    return dsn


def lock_waiters(pg: EmbeddedPostgres, app: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.dsn, autocommit=True, application_name="fault-admin") as admin:
        return admin.execute(
            "SELECT pid, state, wait_event_type, left(query, 60) FROM pg_stat_activity "
            f"WHERE {_OF_APP.format(app)} AND wait_event_type = 'Lock'"
        ).fetchall()


@pytest.mark.parametrize(("server", "driver"), MATRIX)
def test_request_aborted_while_waiting_on_a_row_lock_leaves_no_backend_holding_locks(
    db_up: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, server: str, driver: str
) -> None:
    """A request updates row 1 in a transaction, then blocks on row 2, which another
    session holds. ``socket_timeout`` (1 s) aborts the call and the client gets a 500
    within a few seconds. Then its backend must be gone from ``pg_stat_activity`` and
    row 1 free, while the other session still holds row 2: PostgreSQL does not read
    the client socket while it waits on a lock, so a backend left behind would stay
    (holding row 1, one more than the pool counts) until the other session lets go."""
    pg, db = db_up
    app = f"fault-lock-{server}-{driver}"
    dsn = lock_rows(pg)
    with running(server, db, tmp_path, **site_env(app, driver, LOCK_POOL)) as srv:
        assert get(srv.port, "/x/one", timeout=10)[0] == 200
        with psycopg.connect(dsn, application_name="fault-admin") as holder:
            holder.execute("SELECT v FROM fault_rows WHERE id = 2 FOR UPDATE")  # stays open
            t0 = time.monotonic()
            status, _, body = get(srv.port, "/x/lockwait", timeout=15)
            took = time.monotonic() - t0
            assert status == 500, (status, body[:200])
            assert took < 5.0, f"the aborted request took {took:.2f} s"
            gone = poll(lambda: not lock_waiters(pg, app), LOCK_GONE)
            left = lock_waiters(pg, app)
            with psycopg.connect(dsn, autocommit=True, application_name="fault-admin") as probe:
                probe.execute("SET lock_timeout = '500ms'")
                try:
                    probe.execute("SELECT v FROM fault_rows WHERE id = 1 FOR UPDATE")
                    row1_free = True
                except psycopg.errors.LockNotAvailable:
                    row1_free = False
            holder.rollback()
        assert gone and row1_free, (
            f"the request failed after {took:.2f} s (HTTP {status}), but {LOCK_GONE} s later "
            f"its backend still waits on the lock ({left}) and row 1 is "
            f"{'free' if row1_free else 'STILL LOCKED by it'}; server log tail:\n"
            f"{srv.log_text()[-900:]}"
        )
        assert poll(lambda: get(srv.port, "/x/one", timeout=10)[0] == 200, 5.0)


# ------------------------------------------------------------------ 7. the event loop


def site_pool_stats(port: int, timeout: float) -> dict[str, Any]:
    """The site's pool stats (one worker, one alias), within ``timeout`` seconds."""
    status, _, body = get(port, "/connguard/stats", timeout=timeout)
    assert status == 200, (status, body[:300])
    (stats,) = json.loads(body)
    return dict(stats)


def answers_at_once(port: int, path: str, bound: float) -> tuple[Any, float]:
    """GET ``path``: its status (or the error's name) and how long it took."""
    t0 = time.monotonic()
    try:
        status: Any = get(port, path, timeout=bound)[0]
    except Exception as exc:
        status = type(exc).__name__
    return status, round(time.monotonic() - t0, 2)


LOOP_BOUND = 1.0
"""A view that touches no database answers within this while the event loop runs."""


@pytest.mark.parametrize("view", ["tenant", "query"])
@pytest.mark.parametrize("server", ["uvicorn", "daphne"])
def test_a_release_on_a_dead_network_never_blocks_the_event_loop(
    db_up: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, server: str, view: str
) -> None:
    """``max_size=1`` through the fault proxy, ``socket_timeout`` set. Request A (an
    async view) sets the tenant (``tenant``; ``query``: a plain query, nothing to
    reset) and holds its response; request B waits for the only connection; the proxy
    then drops all traffic (a partition, a hung pgbouncer) and A's response is let go.
    ``ConnguardMiddleware`` releases A's lease on the event loop's thread, with B
    waiting: the reset (``DISCARD ALL``) it needs must not run there, or the worker
    answers nobody, even views that touch no database, until the reset returns, which
    on a black hole is never. While the partition lasts, a view with no database
    answers at once; the stalled reset is ended by ``socket_timeout`` (its connection
    closed, its slot freed); once the partition heals, the site serves again."""
    pg, db = db_up
    app = f"fault-loop-{server}-{view}"
    pool = {**POOL, "max_size": 1, "timeout": 5.0}
    hold = tmp_path / "let-go"
    proxy = FaultProxy(pg.host, pg.port)
    proxy.start()
    results: dict[str, Any] = {}
    problems: list[str] = []
    try:
        proxied = {**db, "HOST": proxy.host, "PORT": proxy.port}
        with running(server, proxied, tmp_path, **site_env(app, "psycopg", pool)) as srv:
            assert get(srv.port, "/x/one")[0] == 200

            def call(name: str, path: str) -> None:
                results[name] = answers_at_once(srv.port, path, 20.0)

            a = threading.Thread(target=call, args=("A", f"/x/{view}?hold={hold}"), daemon=True)
            a.start()
            assert poll(lambda: site_pool_stats(srv.port, 5)["in_use"] == 1, 5.0)
            b = threading.Thread(target=call, args=("B", "/x/one"), daemon=True)
            b.start()
            assert poll(lambda: site_pool_stats(srv.port, 5)["waiting"] == 1, 5.0)
            proxy.blackhole(True)
            try:
                hold.touch()  # A's response is ready: the middleware releases on the loop

                def released() -> bool:
                    stats = site_pool_stats(srv.port, LOOP_BOUND)
                    return bool(stats["in_use"] == 0 or stats["waiting"] == 0)

                try:
                    assert poll(released, 5.0), "A's lease was never released"
                except (TimeoutError, OSError) as exc:
                    problems.append(f"the worker stopped answering after A's release: {exc!r}")
                for i in range(3):
                    status, took = answers_at_once(srv.port, "/x/nodb", 4.0)
                    if status != 200 or took > LOOP_BOUND:
                        problems.append(
                            f"no-database view #{i} in the partition: {status} {took} s"
                        )
                if view == "tenant" and not problems:
                    # The reset sent into the black hole ends at socket_timeout.
                    def aborted() -> bool:
                        return bool(site_pool_stats(srv.port, LOOP_BOUND)["aborted"] >= 1)

                    if not poll(aborted, SOCKET_TIMEOUT + HOUSEKEEPING + 3.0):
                        problems.append("the stalled reset was never aborted")
            finally:
                proxy.blackhole(False)
            t_heal = time.monotonic()
            if not poll(lambda: answers_at_once(srv.port, "/x/one", 4.0)[0] == 200, HEAL):
                problems.append(f"no /x/one answered 200 within {HEAL} s of the heal")
            results["healed after"] = round(time.monotonic() - t_heal, 2)
            status, took = answers_at_once(srv.port, "/x/nodb", 4.0)
            if status != 200 or took > LOOP_BOUND:
                problems.append(f"no-database view after the partition: {status} {took} s")
            a.join(CLIENT_TIMEOUT)
            b.join(CLIENT_TIMEOUT)
            log_tail = srv.log_text()[-1500:]
    finally:
        proxy.close()
    assert not problems, f"{problems}\n{results}\n--- log tail\n{log_tail}"
