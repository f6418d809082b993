"""Issue 8, through real servers: no session state crosses from one request to the next.

ARCHITECTURE.md, invariant 3 ("Clean hand-off"): a connection goes back to the idle set
with no session state beyond its configured baseline. Each test starts the docsite
under a real server (uvicorn, gunicorn gthread with 2 processes, daphne) against a
private PostgreSQL, with the probe views of ``tests/site_session_state.py`` mounted
under ``/x/``: a *dirty* view leaves one kind of session state behind and never
cleans up (the pool must), a *probe* reports what its connection carries when the
request starts. The baseline is defined once, in ``tests/handoff_state.py``.

Reset policies, ``OPTIONS["pool"]["reset"]``: ``"auto"`` (the default: also run here
with no key at all, as ``"default"``), ``"always"``, ``"rollback"`` (rolls back only, so
session settings do carry over; documented by a test of its own).

The database is set up so that forgetting part of the hand-off shows:

* its default time zone is not Django's (UTC): a reset (``DISCARD ALL``) that does
  not re-apply Django's per-connection set-up is seen by the probe;
* its ``lock_timeout`` is 3 s, so a request blocked on an advisory lock an idle
  pooled connection holds fails within seconds instead of hanging the suite;
* roles ``tenant_1`` .. ``tenant_50`` and ``app_role`` (NOLOGIN; the site logs in as
  ``postgres``, a superuser, which may ``SET ROLE`` to any of them), schemas
  ``tenant_1`` .. ``tenant_50``, and a table ``tenant_doc`` under row-level security
  on the ``app.tenant`` setting.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connguard.testing.postgres import EmbeddedPostgres

from .handoff_state import KINDS, LOGIN_ROLE, foreign_state
from .servers import BackendSampler, Server, burst, get, manage, running

pytestmark = [pytest.mark.real, pytest.mark.private, pytest.mark.servers]

TENANTS = 50
LOCK_TIMEOUT = "3s"
POLICIES: dict[str, dict[str, str]] = {
    "default": {},  # no "reset" key: must behave as "auto"
    "auto": {"reset": "auto"},
    "always": {"reset": "always"},
}
ISOLATING = ["default", "always"]
"""The policies that must hand over a clean connection, for the heavier tests
(``"auto"`` spelled out is covered by the per-kind test)."""

# One server start per (server, driver, policy): the kinds are looped inside it.
SERVER_DRIVERS = [
    ("uvicorn", "psycopg"),
    ("uvicorn", "psycopg2"),
    ("gunicorn", "psycopg"),
    ("gunicorn", "psycopg2"),
    ("daphne", "psycopg"),
]

LOAD_REQUESTS = 10_000
LOAD_CHUNK = 1_000
"""The tenant-isolation load is sent in chunks, checked after each: a run that leaks
fails after the first chunk instead of spending minutes proving it ten times."""

_SETUP_SQL = f"""
CREATE TABLE tenant_doc (tenant int NOT NULL, body text NOT NULL);
INSERT INTO tenant_doc SELECT t, 'doc of tenant ' || t FROM generate_series(1, {TENANTS}) t;
ALTER TABLE tenant_doc ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenant_doc FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_doc_isolation ON tenant_doc
    USING (tenant = NULLIF(current_setting('app.tenant', true), '')::int);
GRANT SELECT ON tenant_doc TO app_role;
"""


@pytest.fixture(scope="module")
def site_db() -> Iterator[tuple[EmbeddedPostgres, dict[str, Any]]]:
    pg = EmbeddedPostgres(max_connections=60)
    pg.start()
    try:
        pg.psql("CREATE DATABASE docsite")
        pg.psql("ALTER DATABASE docsite SET timezone = 'Pacific/Auckland'")
        pg.psql(f"ALTER DATABASE docsite SET lock_timeout = '{LOCK_TIMEOUT}'")
        roles = ["app_role", *(f"tenant_{n}" for n in range(1, TENANTS + 1))]
        pg.psql("; ".join(f"CREATE ROLE {role} NOLOGIN" for role in roles))
        with psycopg.connect(pg.dsn, dbname="docsite", autocommit=True) as admin:
            for n in range(1, TENANTS + 1):
                admin.execute(f"CREATE SCHEMA tenant_{n}")
            admin.execute(_SETUP_SQL)
        db = {"HOST": pg.host, "PORT": pg.port, "NAME": "docsite", "USER": "postgres"}
        manage(db, "migrate", "-v", "0", DOCSITE_APP_NAME="docsite-migrate")
        yield pg, db
    finally:
        pg.cleanup()


def handoff_env(
    app: str, pool: dict[str, Any], driver: str = "psycopg", **extra: str
) -> dict[str, str]:
    env = {
        "DOCSITE_APP_NAME": app,
        "DOCSITE_POOL": json.dumps(pool),
        "DOCSITE_EXTRA_URLS": "tests.site_session_state",
        **extra,
    }
    if driver == "psycopg2":
        env["DOCSITE_DRIVER"] = "psycopg2"
    return env


def get_json(srv: Server, path: str, timeout: float = 15.0) -> dict[str, Any]:
    """GET ``path``; anything but 200 fails the test with the server log's tail (where
    the site writes why a request failed)."""
    status, _, body = get(srv.port, path, timeout=timeout)
    assert status == 200, f"{path}: HTTP {status}\n{srv.log_text()[-2500:]}"
    data: dict[str, Any] = json.loads(body)
    return data


def probes_until_worker(srv: Server, worker: int, attempts: int = 200) -> list[dict[str, Any]]:
    """Probe until one probe ran in worker process ``worker`` (under gunicorn a request
    goes to either process); return every probe made."""
    probes = []
    for _ in range(attempts):
        probes.append(get_json(srv, "/x/probe"))
        if probes[-1]["worker"] == worker:
            return probes
    raise AssertionError(f"{attempts} probes never reached worker {worker}")


def assert_driver(srv: Server, driver: str) -> None:
    """Every pool of the worker that answers uses ``driver``; asked until a worker
    with a pool answers (under gunicorn a request goes to either process)."""
    for _ in range(50):
        _, _, body = get(srv.port, "/connguard/stats")
        drivers = {stats["driver"] for stats in json.loads(body)}
        if drivers:
            assert drivers == {driver}
            return
    raise AssertionError("no worker with a pool answered /connguard/stats")


def foreign_lines(srv: Server, limit: int = 5) -> list[str]:
    """The probes' findings, as the site logged them (``FOREIGN-STATE {...}``)."""
    lines = [ln for ln in srv.log_text().splitlines() if ln.startswith("FOREIGN-STATE")]
    return lines[:limit]


def advisory_locks_held(admin: psycopg.Connection[Any], app: str) -> list[tuple[Any, ...]]:
    """Advisory locks held by the site's backends, seen from a connection of our own."""
    return admin.execute(
        "SELECT a.pid, l.objid::bigint, a.state FROM pg_locks l"
        " JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND split_part(a.application_name, '|cg|', 1) = %s"
        " ORDER BY 1, 2",
        (app,),
    ).fetchall()


def wait_no_advisory_locks(
    admin: psycopg.Connection[Any], app: str, timeout: float = 10.0
) -> list[tuple[Any, ...]]:
    """Poll until the site's backends hold no advisory lock (a reset may run just after
    the last response went out); return what is still held at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        held = advisory_locks_held(admin, app)
        if not held or time.monotonic() >= deadline:
            return held
        time.sleep(0.05)


# ----------------------------------------------------------------- (a) each kind


def kinds_left_behind(srv: Server, user: str = LOGIN_ROLE) -> dict[str, dict[str, Any]]:
    """For each kind in turn, a dirty request then probes until one ran in the same
    worker process (under gunicorn a request goes to either of two): what state each
    kind left for the next request, ``{}`` when none."""
    found: dict[str, dict[str, Any]] = {}  # kind -> what the next request saw
    seen: dict[int, dict[str, Any]] = {}  # worker -> foreign state its last probe saw
    for tenant, kind in enumerate(KINDS, start=1):
        worker = get_json(srv, f"/x/dirty/{kind}?tenant={tenant}")["worker"]
        for probe in probes_until_worker(srv, worker):
            foreign = foreign_state(probe, user)
            before = seen.get(probe["worker"], {})
            # Report only what is new: a leak of one kind stays for the next.
            new = {k: v for k, v in foreign.items() if before.get(k) != v}
            if new:
                found.setdefault(kind, new)
            seen[probe["worker"]] = foreign
    leftover = {worker: state for worker, state in seen.items() if state}
    if leftover and not found:
        found["(after all kinds)"] = leftover
    return found


# "auto" spelled out behaves as no key at all (the default): it is checked on one pair,
# the default and "always" on every pair (a server start each costs CI time).
PER_KIND = [
    pytest.param(server, driver, policy, id=f"{server}-{driver}-{policy}")
    for server, driver in SERVER_DRIVERS
    for policy in POLICIES
    if policy != "auto" or (server, driver) == SERVER_DRIVERS[0]
]


@pytest.mark.parametrize(("server", "driver", "policy"), PER_KIND)
def test_no_kind_of_session_state_reaches_the_next_request(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]],
    tmp_path: Path,
    server: str,
    driver: str,
    policy: str,
) -> None:
    """With one connection per process, each kind of state left by a request (search
    path, role, statement timeout, custom setting, temp table, session advisory lock,
    LISTEN, PREPARE, RESET ROLE, WITH HOLD cursor) is gone when the next request in
    that process starts."""
    _, db = site_db
    app = f"handoff-{server}-{driver}-{policy}"
    pool = {"max_size": 1, "min_size": 1, **POLICIES[policy]}
    with running(server, db, tmp_path, **handoff_env(app, pool, driver)) as srv:
        found = kinds_left_behind(srv)
        assert_driver(srv, driver)
    assert not found, f"the next request saw the previous one's state (kind: what it left): {found}"


@pytest.mark.parametrize(("server", "driver"), SERVER_DRIVERS)
def test_no_kind_of_session_state_reaches_the_next_request_as_assumed_role(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, server: str, driver: str
) -> None:
    """The same with Django's ``assume_role`` (``app_role``), default policy: here
    ``RESET ROLE`` and ``SET ROLE`` are the privilege leak of the issue (the next
    request would run as the login role, a superuser, or as another tenant's role),
    and a reset must set the role up again."""
    _, db = site_db
    app = f"handoff-role-{server}-{driver}"
    env = handoff_env(app, {"max_size": 1, "min_size": 1}, driver, DOCSITE_ASSUME_ROLE="app_role")
    with running(server, db, tmp_path, **env) as srv:
        found = kinds_left_behind(srv, "app_role")
    assert not found, f"the next request saw the previous one's state (kind: what it left): {found}"


def test_rollback_policy_keeps_session_settings(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path
) -> None:
    """``"reset": "rollback"`` only ends the transaction: a ``SET statement_timeout``
    is still in force for the next request (this documents the policy)."""
    _, db = site_db
    pool = {"max_size": 1, "min_size": 1, "reset": "rollback"}
    with running("uvicorn", db, tmp_path, **handoff_env("handoff-rollback", pool)) as srv:
        get_json(srv, "/x/dirty/statement_timeout")
        probe = get_json(srv, "/x/probe")
    assert probe["statement_timeout"] == "12345ms", probe


@pytest.mark.parametrize("policy", ISOLATING)
def test_advisory_lock_left_by_a_request_blocks_nobody(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, policy: str
) -> None:
    """A request takes the session-level ``pg_advisory_lock(1)`` and ends. Then 8
    requests at once each lock 1 (blocking form), hold it 100 ms and unlock it: with
    two connections both serve, so a lock still held by an idle pooled connection
    makes the other wait until the database's ``lock_timeout`` (the site would hang
    without one). Afterwards no backend of the site holds an advisory lock."""
    pg, db = site_db
    app = f"handoff-advisory-{policy}"
    pool = {"max_size": 2, "min_size": 2, **POLICIES[policy]}
    admin = psycopg.connect(pg.dsn, dbname="docsite", autocommit=True)
    try:
        with running("uvicorn", db, tmp_path, **handoff_env(app, pool)) as srv:
            get_json(srv, "/x/dirty/advisory?tenant=1")
            cycles = ["/x/lock_cycle?key=1&hold_ms=100"] * 8
            result = burst(srv.port, cycles, concurrency=8, timeout=15)
            statuses = Counter(result.statuses)
            assert result.failed == 0, (statuses, result.errors[:3], srv.log_text()[-1500:])
            held = wait_no_advisory_locks(admin, app)
            assert not held, f"advisory locks held by idle pooled connections: {held}"
    finally:
        admin.close()


# ----------------------------------------------------------------- (c) tenants under load


def tenant_load(rng: random.Random, count: int) -> list[str]:
    """Half probes, half dirty requests of a random kind for a random tenant."""
    paths = []
    for _ in range(count):
        if rng.random() < 0.5:
            paths.append("/x/probe?strict=1")
        else:
            kind = rng.choice(KINDS)
            paths.append(f"/x/dirty/{kind}?tenant={rng.randint(1, TENANTS)}")
    return paths


@pytest.mark.timeout(600)
@pytest.mark.parametrize("policy", ISOLATING)
@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_tenant_isolation_under_load(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, server: str, policy: str
) -> None:
    """Issue 8's "Done when": 10,000 requests over 50 tenants, every kind of state in
    random order, ``max_size=2`` per process (each connection serves thousands of
    requests), interleaved with probes that answer 409 on any non-baseline state.
    Zero probes see foreign state, every request succeeds, the server never sees
    more than ``max_size`` backends per process, connections are reused (on average
    at least 100 requests per backend opened) and no advisory lock remains."""
    pg, db = site_db
    app = f"handoff-load-{server}-{policy}"
    pool = {"max_size": 2, "min_size": 1, **POLICIES[policy]}
    seed = f"{server}-{policy}"
    paths = tenant_load(random.Random(seed), LOAD_REQUESTS)
    admin = psycopg.connect(pg.dsn, dbname="docsite", autocommit=True)
    sampler = BackendSampler(pg.dsn, app)
    try:
        with running(server, db, tmp_path, **handoff_env(app, pool)) as srv, sampler:
            first = get_json(srv, "/x/probe")  # the site works with this pool at all
            assert not foreign_state(first), first
            for start in range(0, LOAD_REQUESTS, LOAD_CHUNK):
                chunk = paths[start : start + LOAD_CHUNK]
                result = burst(srv.port, chunk, concurrency=8, timeout=15)
                statuses = Counter(result.statuses)
                assert statuses[409] == 0, (
                    f"seed {seed!r}, requests {start}..{start + len(chunk)}: {statuses[409]} "
                    f"probes saw another request's state: {foreign_lines(srv)}"
                )
                assert result.failed == 0, (
                    f"seed {seed!r}, requests {start}..{start + len(chunk)}: {statuses}, "
                    f"{result.errors[:3]}\n{srv.log_text()[-1500:]}"
                )
            held = wait_no_advisory_locks(admin, app)
            assert not held, f"advisory locks held after the run: {held}"
            budget = pool["max_size"] * srv.processes
            assert sampler.peak <= budget, f"peak {sampler.peak} backends > {budget}"
            opened = len(sampler.backends_seen)
            assert opened <= LOAD_REQUESTS // 100, f"{opened} backends: connections not reused"
    finally:
        sampler.close()
        admin.close()


# ----------------------------------------------------------------- (d) assume_role


def role_load(rng: random.Random, count: int) -> list[str]:
    """Half probes expecting ``app_role``; the rest RESET ROLE, SET ROLE postgres (the
    login role, a superuser) or SET ROLE to a tenant's role."""
    paths = []
    for _ in range(count):
        r = rng.random()
        if r < 0.5:
            paths.append("/x/probe?strict=1&user=app_role")
        elif r < 0.75:
            paths.append("/x/dirty/reset_role")
        elif r < 0.9:
            paths.append("/x/dirty/role?role=postgres")
        else:
            paths.append(f"/x/dirty/role?tenant={rng.randint(1, TENANTS)}")
    return paths


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_every_request_starts_as_the_assumed_role(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, driver: str
) -> None:
    """Django's ``assume_role`` (``app_role``) is in force at the start of every request,
    whatever role the previous request on the connection switched to: 1,000 requests
    under uvicorn, ``max_size=2``."""
    _, db = site_db
    app = f"handoff-role-{driver}"
    env = handoff_env(app, {"max_size": 2, "min_size": 1}, driver, DOCSITE_ASSUME_ROLE="app_role")
    paths = role_load(random.Random(driver), 1_000)
    with running("uvicorn", db, tmp_path, **env) as srv:
        first = get_json(srv, "/x/probe")
        assert first["current_user"] == "app_role", first  # the set-up is in force at all
        result = burst(srv.port, paths, concurrency=8, timeout=15)
        statuses = Counter(result.statuses)
        assert statuses[409] == 0, (
            f"{statuses[409]} probes did not start as app_role: {foreign_lines(srv)}"
        )
        assert result.failed == 0, (statuses, result.errors[:3], srv.log_text()[-1500:])


# ----------------------------------------------------------------- (e) RLS recipe


@pytest.mark.parametrize("policy", ISOLATING)
def test_row_level_security_tenant_setting_does_not_leak(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, policy: str
) -> None:
    """The multi-tenant recipe: ``tenant_doc`` (owned by ``postgres``) has row-level
    security, forced, with the policy ``tenant = current_setting('app.tenant', true)``;
    the site runs as ``app_role`` (Django's ``assume_role``: a superuser would bypass
    RLS). A request that picks its tenant with ``set_config('app.tenant', N, false)``
    sees that tenant's row only; the next request, which picks no tenant, must see no
    rows: not the previous tenant's (the setting leaked), not all of them (the role
    was lost and the request ran as the superuser)."""
    _, db = site_db
    pool = {"max_size": 1, "min_size": 1, **POLICIES[policy]}
    env = handoff_env(f"handoff-rls-{policy}", pool, DOCSITE_ASSUME_ROLE="app_role")
    with running("uvicorn", db, tmp_path, **env) as srv:
        chosen = get_json(srv, "/x/rows?tenant=7")
        assert chosen["rows"] == [[7, "doc of tenant 7"]], chosen
        after = get_json(srv, "/x/rows")
    assert after["rows"] == [], f"a request without a tenant saw {after['rows']}"
