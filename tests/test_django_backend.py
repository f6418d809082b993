"""The Django layer in-process, against a real PostgreSQL: scopes, fencing, set-up
once per physical connection, middleware and system checks."""

from __future__ import annotations

import contextvars
import gc
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

pytestmark = pytest.mark.real

DB_NAME = f"cg_django_{uuid.uuid4().hex[:8]}"
urlpatterns: list[Any] = []  # this module is the ROOT_URLCONF (500 pages need one)


def conninfo_parts(dsn: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in dsn.split())


@pytest.fixture(scope="module")
def django_db(pg: Any) -> Iterator[dict[str, Any]]:
    """Configure Django once for this process, on a database of its own."""
    import django
    from django.conf import settings

    parts = conninfo_parts(pg.dsn)
    with psycopg.connect(pg.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{DB_NAME}"')
        admin.execute(
            "DO $$ BEGIN CREATE ROLE cg_reader NOLOGIN; EXCEPTION WHEN duplicate_object "
            "THEN NULL; END $$"
        )
        admin.execute("GRANT cg_reader TO CURRENT_USER")
    db = {
        "ENGINE": "connguard.backends.postgresql",
        "HOST": parts.get("host", "127.0.0.1"),
        "PORT": parts.get("port", "5432"),
        "USER": parts.get("user", "postgres"),
        "PASSWORD": parts.get("password", ""),
        "NAME": DB_NAME,
        "OPTIONS": {
            "application_name": "cg-inproc",
            "pool": {"min_size": 0, "max_size": 4, "timeout": 2.0},
        },
    }
    if not settings.configured:
        settings.configure(
            DATABASES={"default": db, "replica": {**db, "OPTIONS": {"pool": {"max_size": 2}}}},
            INSTALLED_APPS=["connguard.django"],
            MIDDLEWARE=["connguard.django.middleware.ConnguardMiddleware"],
            USE_TZ=True,
            ROOT_URLCONF=__name__,
            CONNGUARD={"retry_after": 3},
        )
        django.setup()
    yield db
    from django.db import connections

    from connguard.django import pools

    connections.close_all()
    pools.close_pools()
    with psycopg.connect(pg.dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


@pytest.fixture
def connection(django_db: dict[str, Any]) -> Iterator[Any]:
    from django.db import connection as conn

    yield conn
    conn.close()


def the_pool() -> Any:
    from connguard.django import pools

    (pool,) = [p for p in pools.pools() if p.name == "default"]
    return pool


def scalar(conn: Any, sql: str, params: Any = None) -> Any:
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


def test_connect_is_an_acquire_and_close_a_release(connection: Any) -> None:
    assert scalar(connection, "SELECT 1") == 1
    lease = connection.connguard_lease
    assert lease is not None and lease.active
    pool = the_pool()
    assert pool.stats().in_use == 1
    connection.close()
    assert not lease.active and pool.stats().in_use == 0
    assert scalar(connection, "SELECT 2") == 2  # acquires again
    assert the_pool().stats().opened == 1, "the physical connection was reused"


def test_connections_carry_the_application_name_tag(connection: Any) -> None:
    import os

    from connguard.diagnostics.tags import parse_tag

    name = scalar(connection, "SELECT application_name FROM pg_stat_activity "
                              "WHERE pid = pg_backend_pid()")  # fmt: skip
    tag = parse_tag(name)
    assert tag is not None, name
    assert (tag.prefix, tag.pid, tag.alias) == ("cg-inproc", os.getpid(), "default")


def test_each_alias_gets_its_own_pool(connection: Any) -> None:
    from django.db import connections

    from connguard.django import pools

    scalar(connection, "SELECT 1")
    scalar(connections["replica"], "SELECT 1")
    by_alias = {pool.name: pool for pool in pools.pools()}
    assert by_alias["replica"] is not by_alias["default"]
    assert by_alias["replica"].config.max_size == 2
    connections["replica"].close()


def test_scope_returns_its_leases_and_the_holder_reacquires(connection: Any) -> None:
    import connguard

    with connguard.scope("nightly-job") as job:
        scalar(connection, "SELECT 1")
        lease = connection.connguard_lease
        assert lease.owner is job
    assert not lease.active, "ending the scope gave the lease back"
    assert the_pool().stats().in_use == 0
    assert scalar(connection, "SELECT 3") == 3
    assert connection.connguard_lease is not lease


def test_a_thread_now_working_for_another_scope_queries_on_a_lease_of_its_own(
    connection: Any,
) -> None:
    """A thread that worked for one scope (a request) and now works for another (a
    pool thread reused by the server) while the first has not ended: the wrapper still
    holds the first scope's lease, and must not serve the second from it (that would
    carry one request's session into another). It gives that lease back and acquires
    for the second."""
    from connguard.scope import Scope, enter, leave

    first, second = Scope("first", kind="request"), Scope("second", kind="request")
    token = enter(first)
    try:
        scalar(connection, "SELECT 1")
        held = connection.connguard_lease
    finally:
        leave(token)
    token = enter(second)
    try:
        scalar(connection, "SELECT 2")
        now = connection.connguard_lease
    finally:
        leave(token)
        second.end()
        first.end()
    assert held.owner is first and now.owner is second
    assert now is not held and not held.active
    assert the_pool().stats().in_use == 0


def run_sql(conn: Any, sql: str) -> None:
    with conn.cursor() as cursor:
        cursor.execute(sql)


def test_a_nested_scope_goes_on_with_the_enclosing_scopes_connection(
    connection: Any,
) -> None:
    """A view calls a function decorated ``@connguard.scope`` (docs/django.md's way
    for tasks; a Celery task run eagerly, ``call_command``). The request is not done:
    the inner code goes on with the request's connection, and after it returns the
    request still has its session state (the docs' tenant setting, a temporary
    table), as with Django's one connection per thread. Each query of the inner
    scope gave the request's connection back, reset, and took another (found by a
    review)."""
    import connguard
    from connguard.scope import Scope, enter, leave

    @connguard.scope("job")
    def job() -> tuple[int, Any]:
        return scalar(connection, "SELECT pg_backend_pid()"), connection.connguard_lease

    request = Scope("GET /invoices", kind="request")
    token = enter(request)
    try:
        scalar(connection, "SELECT set_config('app.tenant', '42', false)")
        run_sql(connection, "CREATE TEMP TABLE nested_scratch AS SELECT 1 AS x")
        pid, lease = scalar(connection, "SELECT pg_backend_pid()"), connection.connguard_lease
        inner_pid, inner_lease = job()
        assert (inner_pid, inner_lease) == (pid, lease), "the inner scope took another"
        assert lease.active and connection.connguard_lease is lease
        assert scalar(connection, "SELECT current_setting('app.tenant', true)") == "42"
        assert scalar(connection, "SELECT to_regclass('pg_temp.nested_scratch') IS NOT NULL")
    finally:
        request.end()
        leave(token)
    assert not lease.active and the_pool().stats().in_use == 0


def test_what_a_nested_scope_takes_itself_it_gives_back(connection: Any) -> None:
    """The other way round: a lease the inner scope took (the request had none) is
    the inner scope's, given back when it ends; the request then takes its own."""
    import connguard
    from connguard.scope import Scope, enter, leave

    @connguard.scope("job")
    def job() -> Any:
        scalar(connection, "SELECT 1")
        return connection.connguard_lease

    request = Scope("GET /report", kind="request")
    token = enter(request)
    try:
        inner = job()
        assert not inner.active and the_pool().stats().in_use == 0
        scalar(connection, "SELECT 2")
        assert connection.connguard_lease.owner is request
    finally:
        request.end()
        leave(token)


def test_a_nested_scope_keeps_the_enclosing_manual_transaction(connection: Any) -> None:
    """Manual transaction management (``set_autocommit(False)``, or ``AUTOCOMMIT:
    False``) is no atomic block: the owner switch gave the connection back with its
    uncommitted rows rolled back, and the later ``commit()`` raised."""
    from django.db import transaction

    import connguard
    from connguard.scope import Scope, enter, leave

    run_sql(connection, "CREATE TABLE IF NOT EXISTS nested_orders (id int)")
    run_sql(connection, "TRUNCATE nested_orders")

    @connguard.scope("job")
    def job() -> int:
        return scalar(connection, "SELECT 1")

    request = Scope("POST /orders", kind="request")
    token = enter(request)
    try:
        transaction.set_autocommit(False)
        try:
            run_sql(connection, "INSERT INTO nested_orders VALUES (1)")
            job()
            transaction.commit()
        finally:
            transaction.set_autocommit(True)
    finally:
        request.end()
        leave(token)
    assert scalar(connection, "SELECT count(*) FROM nested_orders") == 1


def test_a_nested_scope_does_not_break_the_enclosing_server_side_cursor(
    connection: Any,
) -> None:
    """``for obj in qs.iterator(): task(obj)`` with ``task`` decorated: the
    iterator's server-side cursor must survive the task's queries."""
    import connguard
    from connguard.scope import Scope, enter, leave

    @connguard.scope("task")
    def task(n: int) -> int:
        return scalar(connection, "SELECT %s::int", [n])

    request = Scope("GET /export", kind="request")
    token = enter(request)
    try:
        cursor = connection.chunked_cursor()
        try:
            cursor.execute("SELECT g FROM generate_series(1, 300) g")
            done = []
            while rows := cursor.fetchmany(100):
                done.append(task(rows[0][0]))
        finally:
            cursor.close()
        assert done == [1, 101, 201]
    finally:
        request.end()
        leave(token)


def test_a_scope_nested_in_the_main_threads_own_goes_on_with_its_connection(
    connection: Any,
) -> None:
    """A management command's main thread queries outside any scope (its thread's
    implicit scope holds the lease), then calls a decorated task per row: the task
    goes on with the thread's connection."""
    import connguard

    @connguard.scope("task")
    def task() -> Any:
        scalar(connection, "SELECT 1")
        return connection.connguard_lease

    assert threading.current_thread() is threading.main_thread()
    scalar(connection, "SELECT set_config('app.tenant', '7', false)")
    held = connection.connguard_lease
    assert task() is held
    assert scalar(connection, "SELECT current_setting('app.tenant', true)") == "7"


def test_a_pool_workers_scoped_job_gets_a_clean_connection_of_its_own(
    connection: Any,
) -> None:
    """A pool worker (ThreadPoolExecutor, a job runner's threads) first runs work
    outside any scope that sets a tenant, creates a temporary table and leaves a
    manual transaction open; then an unrelated job decorated ``@connguard.scope``.
    The job is no part of that work: it gets a connection of its own, reset, and its
    ``commit()`` does not commit the earlier work's rows (a review found the worker's
    implicit scope taken for the job's caller)."""
    import concurrent.futures

    from django.db import connections, transaction

    import connguard

    run_sql(connection, "CREATE TABLE IF NOT EXISTS worker_orders (id int)")
    run_sql(connection, "TRUNCATE worker_orders")

    def earlier_work() -> None:
        conn = connections["default"]
        scalar(conn, "SELECT set_config('app.tenant', '42', false)")
        run_sql(conn, "CREATE TEMP TABLE worker_scratch AS SELECT 1 AS x")
        transaction.set_autocommit(False)
        run_sql(conn, "INSERT INTO worker_orders VALUES (666)")  # never committed

    @connguard.scope("job")
    def job() -> tuple[str, bool]:
        conn = connections["default"]
        run_sql(conn, "INSERT INTO worker_orders VALUES (1)")
        if not conn.get_autocommit():
            transaction.commit()
        return (
            scalar(conn, "SELECT coalesce(current_setting('app.tenant', true), '')"),
            scalar(conn, "SELECT to_regclass('pg_temp.worker_scratch') IS NOT NULL"),
        )

    def tidy() -> None:
        conn = connections["default"]
        if not conn.get_autocommit():
            conn.rollback()
            conn.set_autocommit(True)
        conn.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as workers:
        workers.submit(earlier_work).result()
        seen = workers.submit(job).result()
        workers.submit(tidy).result()
    assert seen == ("", False), f"the job inherited the earlier work's session: {seen}"
    with connection.cursor() as cursor:
        cursor.execute("SELECT id FROM worker_orders ORDER BY id")
        assert cursor.fetchall() == [(1,)], "the job committed the earlier work's rows"
    connection.close()
    assert the_pool().stats().in_use == 0


def tenant_view(request: Any) -> Any:
    """docs/django.md's tenant setting, then a task decorated ``@connguard.scope``
    called inline."""
    from django.db import connection as conn
    from django.http import JsonResponse

    import connguard

    @connguard.scope("send-invoice-email")
    def send_invoice_email() -> None:
        scalar(conn, "SELECT 1")

    scalar(conn, "SELECT set_config('app.tenant', '42', false)")
    before = scalar(conn, "SELECT current_setting('app.tenant', true)")
    send_invoice_email()
    after = scalar(conn, "SELECT current_setting('app.tenant', true)")
    return JsonResponse({"before": before, "after": after})


def test_a_scoped_task_called_from_a_view_keeps_the_views_session(
    connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same through Django's handler, with ConnguardMiddleware."""
    from django.test import Client
    from django.urls import clear_url_caches, path

    monkeypatch.setitem(globals(), "urlpatterns", [path("tenant", tenant_view)])
    clear_url_caches()
    try:
        response = Client().get("/tenant")
    finally:
        clear_url_caches()
    assert response.status_code == 200
    assert response.json() == {"before": "42", "after": "42"}
    assert the_pool().stats().in_use == 0


def test_request_scope_covers_threads_started_with_its_context(connection: Any) -> None:
    from django.core import signals
    from django.db import connections

    signals.request_started.send(sender=None, environ={"REQUEST_METHOD": "GET",
                                                        "PATH_INFO": "/doc/1"})  # fmt: skip
    leases: list[Any] = []

    def work() -> None:
        scalar(connections["default"], "SELECT 1")
        leases.append(connections["default"].connguard_lease)

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(work,))
               for _ in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    scalar(connection, "SELECT 1")
    leases.append(connection.connguard_lease)
    assert all(lease.owner.kind == "request" for lease in leases)
    assert leases[0].owner.info["path"] == "/doc/1"
    signals.request_finished.send(sender=None)
    assert not any(lease.active for lease in leases), "the request's end returned them all"
    assert the_pool().stats().in_use == 0


def test_a_thread_that_dies_holding_a_lease_returns_it(django_db: dict[str, Any]) -> None:
    from django.db import connections

    def work() -> None:
        scalar(connections["default"], "SELECT 1")  # never closed

    t = threading.Thread(target=work)
    t.start()
    t.join()
    gc.collect()
    from .fakes import wait_until

    wait_until(lambda: the_pool().stats().in_use == 0)


def test_cursor_made_under_an_ended_lease_is_fenced(connection: Any) -> None:
    from django.db import OperationalError

    from connguard.pool import LeaseEnded

    cursor = connection.cursor()
    cursor.execute("SELECT 1")
    connection.connguard_lease.release()  # e.g. the request's scope ended elsewhere
    with pytest.raises(OperationalError) as info:
        cursor.execute("SELECT 2")
    assert isinstance(info.value.__cause__, LeaseEnded)
    assert scalar(connection, "SELECT 4") == 4  # a new cursor re-acquires


@pytest.mark.parametrize("how", ["fetchone", "fetchmany", "fetchall", "iterate", "scroll"])
def test_every_cursor_call_is_fenced_not_only_execute(connection: Any, how: str) -> None:
    """Item 3 of issue 9: fetching, iterating or scrolling a cursor whose lease has
    ended raises instead of reading from a connection someone else now holds."""
    from django.db import OperationalError

    from connguard.pool import LeaseEnded

    cursor = connection.cursor()
    cursor.execute("SELECT g FROM generate_series(1, 5) g")
    connection.connguard_lease.release()
    with pytest.raises(OperationalError) as info:
        if how == "iterate":
            list(cursor)
        elif how == "scroll":
            cursor.scroll(0, mode="absolute")
        else:
            getattr(cursor, how)()
    assert isinstance(info.value.__cause__, LeaseEnded)
    cursor.close()  # closing a fenced cursor does nothing (its session was reset)


def test_closing_a_cursor_kept_past_its_lease_leaves_the_next_holder_alone(
    connection: Any,
) -> None:
    """A client-side cursor's ``close()`` is not fenced, because it touches no
    connection: closed after its lease ended and its connection went to the next
    holder, it raises nothing, and that holder's statement and rows are untouched."""
    kept = connection.cursor()
    kept.execute("SELECT 1")
    raw = connection.connection
    connection.connguard_lease.release()
    cursor = connection.cursor()  # the connection returned last is taken first
    assert connection.connection is raw
    cursor.execute("SELECT g FROM generate_series(1, 3) g")
    kept.close()
    assert [row[0] for row in cursor.fetchall()] == [1, 2, 3]
    assert scalar(connection, "SELECT 5") == 5
    cursor.close()


def test_a_server_side_cursor_pins_its_lease_against_early_release(connection: Any) -> None:
    """The middleware's early release keeps a lease with a server-side cursor open
    (a streamed iterator() export); the scope's end still takes it back."""
    from connguard.scope import Scope, enter, leave

    request = Scope("GET /export", kind="request")
    token = enter(request)
    try:
        cursor = connection.chunked_cursor()
        cursor.execute("SELECT g FROM generate_series(1, 2000) g")
        first = cursor.fetchmany(100)
        lease = connection.connguard_lease
        assert lease.pinned
        assert request.release_all(early=True) == 0 and lease.active
        rows = first + [row for chunk in iter(lambda: cursor.fetchmany(500), []) for row in chunk]
        assert len(rows) == 2000
        cursor.close()
        assert not lease.pinned
        assert request.release_all(early=True) == 1 and not lease.active
    finally:
        request.end()
        leave(token)


def test_a_connect_replaced_on_the_wrapper_refuses_the_short_path(connection: Any) -> None:
    """A tool may refuse database access by replacing the wrapper's ``connect`` (as
    Django's SimpleTestCase does, besides ``ensure_connection``): connguard's short
    re-acquire, which skips ``connect()``, must not take a lease past it."""

    def refuse() -> None:
        raise AssertionError("database access not allowed here")

    assert scalar(connection, "SELECT 1") == 1
    connection.close()  # the pool is known: the short path would be taken
    connection.connect = refuse
    try:
        with pytest.raises(AssertionError, match="not allowed"):
            connection.ensure_connection()
        assert connection.connguard_lease is None
    finally:
        del connection.connect
    assert scalar(connection, "SELECT 2") == 2


def test_a_replaced_base_ensure_connection_decides(connection: Any) -> None:
    """A test framework refuses database access by replacing Django's
    ``BaseDatabaseWrapper.ensure_connection`` (pytest-django's blocker, Django's
    SimpleTestCase): connguard's own must defer to the replacement, then take its
    short path again once Django's is back."""
    from django.db.backends.base.base import BaseDatabaseWrapper

    asked = []
    djangos = BaseDatabaseWrapper.__dict__["ensure_connection"]

    def blocker(*args: Any) -> None:
        asked.append(len(args))
        raise RuntimeError("Database access not allowed")

    assert scalar(connection, "SELECT 1") == 1
    connection.close()
    BaseDatabaseWrapper.ensure_connection = blocker
    try:
        with pytest.raises(RuntimeError, match="not allowed"):
            connection.ensure_connection()
        assert asked == [1] and connection.connguard_lease is None  # called as a method
    finally:
        BaseDatabaseWrapper.ensure_connection = djangos
    assert scalar(connection, "SELECT 2") == 2


def test_psycopg_stream_and_copy_go_through_the_fence(connection: Any) -> None:
    from django.db import OperationalError

    cursor = connection.cursor()
    assert list(cursor.stream("SELECT g FROM generate_series(1, 3) g")) == [(1,), (2,), (3,)]
    with cursor.copy("COPY (SELECT 7) TO STDOUT") as copy:
        assert b"7" in bytes(copy.read())
    rows = cursor.stream("SELECT 9")
    connection.connguard_lease.release()
    with pytest.raises(OperationalError):
        next(rows)
    with pytest.raises(OperationalError), cursor.copy("COPY (SELECT 8) TO STDOUT"):
        pass


def test_the_debug_cursors_copy_goes_through_the_fence(connection: Any) -> None:
    """With ``DEBUG=True`` (``force_debug_cursor`` is what DEBUG turns on) Django's
    PostgreSQL debug cursor defines ``copy()`` itself, to log it: the fenced mixin's
    ``__getattr__`` never sees it. A cursor kept past its lease must still be refused,
    not run COPY on the connection's next holder's session (found by a review)."""
    from django.db import OperationalError

    connection.force_debug_cursor = True
    try:
        cursor = connection.cursor()
        with cursor.copy("COPY (SELECT 7) TO STDOUT") as copy:
            assert b"".join(bytes(data) for data in copy) == b"7\n"  # read to its end
        assert connection.queries[-1]["sql"] == "COPY (SELECT 7) TO STDOUT"  # still logged
        raw = connection.connection
        connection.connguard_lease.release()
        other = connection.cursor()  # the next holder: the same physical connection
        assert connection.connection is raw
        other.execute("SELECT 1")
        with pytest.raises(OperationalError), cursor.copy("COPY (SELECT 8) TO STDOUT") as copy:
            pytest.fail(f"a stale cursor ran COPY on the next holder's connection: {copy!r}")
        other.close()
    finally:
        connection.force_debug_cursor = False


@pytest.mark.parametrize("debug", [False, True])
def test_a_copy_that_changes_session_state_is_reset_before_the_next_holder(
    connection: Any, debug: bool
) -> None:
    """``COPY (SELECT ...) TO STDOUT`` runs a query that can change session state as
    any can; ``execute()`` shows its statement to the lease (reset policy "auto"),
    the COPY paths did not, so the tenant reached the next holder (a review)."""
    connection.force_debug_cursor = debug
    try:
        with (
            connection.cursor() as cursor,
            cursor.copy("COPY (SELECT set_config('app.tenant', '42', false)) TO STDOUT") as copy,
        ):
            assert b"".join(bytes(data) for data in copy) == b"42\n"
    finally:
        connection.force_debug_cursor = False
    connection.close()  # back to the pool: reset only if "auto" saw the change
    assert scalar(connection, "SELECT coalesce(current_setting('app.tenant', true), '')") == ""


def test_every_method_djangos_cursors_define_is_fenced() -> None:
    """Django's cursor wrappers define some driver calls as methods (the debug
    cursor's COPY methods, to log them); the fenced mixin's ``__getattr__`` only sees
    the others. Each method of Django's classes that calls the driver must be
    overridden by connguard's, whichever driver Django picked: a guard for what a
    new Django version adds."""
    from connguard.backends.postgresql.base import CursorDebugWrapper as FencedDebug
    from connguard.django.cursors import FencedCursorWrapper

    # Django's own bookkeeping, touching no connection.
    harmless = {"debug_sql"}
    for fenced in (FencedCursorWrapper, FencedDebug):
        djangos = [c for c in fenced.__mro__ if c.__module__.startswith("django.")]
        assert djangos, fenced
        for cls in djangos:
            for name, value in vars(cls).items():
                # Underscored: Django's steps inside execute(), already in the fence.
                if not callable(value) or name in harmless or name.startswith("_"):
                    continue
                owner = next(c for c in fenced.__mro__ if name in vars(c))
                assert not owner.__module__.startswith("django."), (
                    f"{cls.__module__}.{cls.__qualname__}.{name} is not fenced"
                )


def test_psycopg2s_debug_cursor_copy_goes_through_the_fence(pg: Any) -> None:
    """As above, under psycopg2, whose debug cursor Django gives ``copy_expert`` and
    ``copy_to`` (a process of its own: Django picks its driver at import); and a
    ``copy_expert`` that changes session state is reset before the next holder."""
    script = f"""
import io, json, sys
sys.modules["psycopg"] = None  # Django then takes psycopg2
import django
from django.conf import settings
parts = dict(p.split("=", 1) for p in {pg.dsn!r}.split())
settings.configure(DATABASES={{"default": {{
    "ENGINE": "connguard.backends.postgresql", "HOST": parts["host"], "PORT": parts["port"],
    "USER": parts.get("user", "postgres"), "NAME": "postgres",
    "OPTIONS": {{"pool": {{"min_size": 0, "max_size": 1}}}}}}}},
    INSTALLED_APPS=["connguard.django"], USE_TZ=True, DEBUG=True)
django.setup()
from django.db import OperationalError, connection
cursor = connection.cursor()
out = io.StringIO()
cursor.copy_expert("COPY (SELECT 7) TO STDOUT", out)
result = {{"driver": connection.connguard_pool.driver.name, "first": out.getvalue()}}
connection.connguard_lease.release()
connection.cursor().execute("SELECT 1")  # the next holder
for name, args in (("copy_expert", ("COPY (SELECT 8) TO STDOUT", out)),
                   ("copy_to", (out, "pg_am"))):
    try:
        getattr(cursor, name)(*args)
        result[name] = "ran: " + out.getvalue()
    except OperationalError as exc:
        result[name] = "refused" if "lease has ended" in str(exc) else str(exc)
connection.close()
tenant = "COPY (SELECT set_config('app.tenant', '42', false)) TO STDOUT"
connection.cursor().copy_expert(tenant, io.StringIO())
connection.close()  # reset only if "auto" saw the change
cursor = connection.cursor()
cursor.execute("SELECT coalesce(current_setting('app.tenant', true), '')")
result["tenant after"] = cursor.fetchone()[0]
connection.close()
print(json.dumps(result))
"""
    from .servers import django_script

    result = django_script(script)
    assert result == {
        "driver": "psycopg2",
        "first": "7\n",
        "copy_expert": "refused",
        "copy_to": "refused",
        "tenant after": "",
    }, result


def test_session_state_is_reset_and_the_role_set_up_again(django_db: dict[str, Any]) -> None:
    """Reset policy "auto", in process: a request that changes session state (here
    ``RESET ROLE`` and a tenant GUC) hands on a connection reset to the configured
    baseline, ``assume_role`` included; one that changes nothing pays no reset."""
    from django.db.utils import ConnectionHandler

    from .fakes import wait_until

    options = {"assume_role": "cg_reader", "pool": {"min_size": 0, "max_size": 1}}
    handler = ConnectionHandler({"default": {**django_db, "OPTIONS": options}})
    conn = handler["default"]
    try:
        assert scalar(conn, "SELECT current_user") == "cg_reader"
        pool = conn.connguard_pool
        resets = pool.stats().resets
        conn.close()
        assert pool.stats().resets == resets, "a clean release pays no reset"
        with conn.cursor() as cursor:
            cursor.execute("RESET ROLE")
        scalar(conn, "SELECT set_config('app.tenant', '42', false)")
        assert scalar(conn, "SELECT current_user") != "cg_reader"
        conn.close()
        wait_until(lambda: pool.stats().resetting == 0)
        assert pool.stats().resets == resets + 1
        assert scalar(conn, "SELECT current_user") == "cg_reader"
        assert scalar(conn, "SELECT current_setting('app.tenant', true)") in ("", None)
    finally:
        conn.close()
        conn.close_pool()


def test_lease_lost_inside_atomic_is_an_error_not_a_silent_new_connection(
    connection: Any,
) -> None:
    from django.db import ProgrammingError, transaction

    with pytest.raises(ProgrammingError, match="atomic block"), transaction.atomic():
        scalar(connection, "SELECT 1")
        connection.connguard_lease.release()
        scalar(connection, "SELECT 2")
    assert scalar(connection, "SELECT 5") == 5


def test_set_up_runs_once_per_physical_connection(
    connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from connguard.django import pools
    from connguard.django.setup import ConnectionSetup

    pools.close_pools(alias="default")
    calls = []
    original = ConnectionSetup.configure

    def counting(self: Any, conn: Any) -> Any:
        calls.append(1)
        return original(self, conn)

    monkeypatch.setattr(ConnectionSetup, "configure", counting)
    monkeypatch.setitem(connection.settings_dict["OPTIONS"], "assume_role", "cg_reader")
    for _ in range(5):
        assert scalar(connection, "SELECT current_user") == "cg_reader"
        connection.close()
    assert len(calls) == 1, "SET ROLE ran once, when the connection was opened"
    assert the_pool().stats().opened == 1
    pools.close_pools(alias="default")


def test_pool_overload_is_django_operational_error_and_503(
    connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.core.handlers.exception import convert_exception_to_response
    from django.db import OperationalError, connections
    from django.http import HttpResponse
    from django.test import RequestFactory

    from connguard.django.middleware import ConnguardMiddleware, unavailable_error

    holders = [threading.Event(), threading.Event()]
    done = threading.Event()

    def hold() -> None:
        scalar(connections["default"], "SELECT 1")
        holders[0].set() if not holders[0].is_set() else holders[1].set()
        done.wait(10)
        connections["default"].close()

    monkeypatch.setitem(
        connection.settings_dict["OPTIONS"], "pool", {"max_size": 1, "timeout": 0.05}
    )
    t = threading.Thread(target=hold)
    t.start()
    holders[0].wait(5)
    try:
        with pytest.raises(OperationalError) as info:
            scalar(connection, "SELECT 1")
        assert unavailable_error(info.value) is not None
        assert "max_size=1" in str(info.value)

        def view(request: Any) -> HttpResponse:
            scalar(connections["default"], "SELECT 1")
            return HttpResponse("ok")

        middleware = ConnguardMiddleware(convert_exception_to_response(view))
        response = middleware(RequestFactory().get("/page.png"))
        assert response.status_code == 503
        assert response["Retry-After"] == "3"
        assert b"overloaded" in response.content
        assert response["Connguard-Cause"] == "overloaded"
    finally:
        done.set()
        t.join()
        from connguard.django import pools

        pools.close_pools(alias="default")


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_checks_name_the_setting_and_the_allowed_values(django_db: dict[str, Any]) -> None:
    from django.test import override_settings

    from connguard.django.checks import check_databases, check_middleware

    def ids(options: dict[str, Any], **db: Any) -> dict[str, str]:
        databases = {"default": {**django_db, "OPTIONS": options, **db}}
        with override_settings(DATABASES=databases):
            return {m.id: m.msg for m in check_databases()}

    assert ids({"pool": {"max_size": 5}}) == {}
    assert "connguard.E001" in ids({"pool": "yes"})
    typo = ids({"pool": {"max_sise": 5}})
    assert "connguard.E002" in typo and "max_sise" in typo["connguard.E002"]
    assert "num_workers" in ids({"pool": {"num_workers": 2}})["connguard.E002"]
    bad = ids({"pool": {"timeout": -1}})["connguard.E003"]
    assert "timeout" in bad and "> 0" in bad
    assert ids({"pool": {"reset": "always"}}) == {}
    policy = " ".join(ids({"pool": {"reset": "sometimes"}}).values())
    assert "reset" in policy and "'auto', 'always', 'rollback'" in policy, policy
    callable_reset = " ".join(ids({"pool": {"reset": print}}).values())
    assert "policy name" in callable_reset and "'auto'" in callable_reset, callable_reset
    assert "connguard.E004" in ids({"pool": {"min_size": 5, "max_size": 2}})
    assert "connguard.W001" in ids({"pool": True}, CONN_MAX_AGE=15)
    assert "connguard.W001" in ids({"pool": True}, CONN_MAX_AGE=None)
    assert "connguard.I001" in ids({"pool": True}, CONN_HEALTH_CHECKS=True)
    with override_settings(MIDDLEWARE=[]):
        assert [m.id for m in check_middleware()] == ["connguard.W002"]
    with override_settings(
        MIDDLEWARE=[
            "django.middleware.common.CommonMiddleware",
            "connguard.django.middleware.ConnguardMiddleware",
        ]
    ):
        assert [m.id for m in check_middleware()] == ["connguard.W003"]


def test_check_reports_a_missing_driver(
    django_db: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from connguard.django import checks

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert "connguard.E005" in {m.id for m in checks.check_databases()}


def test_bad_pool_setting_at_connect_is_improperly_configured(
    connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.core.exceptions import ImproperlyConfigured

    monkeypatch.setitem(connection.settings_dict["OPTIONS"], "pool", {"max_sise": 3})
    with pytest.raises(ImproperlyConfigured, match="max_sise"):
        scalar(connection, "SELECT 1")


def test_status_shows_a_held_lease_with_its_request_and_site(connection: Any) -> None:
    import io
    import json

    from django.core import signals
    from django.core.management import call_command

    signals.request_started.send(
        sender=None, environ={"REQUEST_METHOD": "GET", "PATH_INFO": "/doc/9/page/2.png"}
    )
    try:
        scalar(connection, "SELECT 1")
        out = io.StringIO()
        call_command("connguard", "status", "--json", stdout=out)
        leases = [lease for entry in json.loads(out.getvalue()) for lease in entry["leases"]]
        (mine,) = [lease for lease in leases if lease["owner"].get("path") == "/doc/9/page/2.png"]
        assert mine["owner"]["kind"] == "request" and mine["owner"]["method"] == "GET"
        assert any(w.startswith(f"{__file__}:") and "in scalar" in w for w in mine["where"])
        text = io.StringIO()
        call_command("connguard", "status", stdout=text)
        assert "request: GET /doc/9/page/2.png" in text.getvalue()
        assert f"at {__file__}:" in text.getvalue()
    finally:
        signals.request_finished.send(sender=None)


def test_a_new_wrapper_of_an_alias_takes_the_short_path(connection: Any) -> None:
    """Under ASGI every request gets a wrapper of its own (Django's connections are
    context-local): the first acquire of each request is a new wrapper's. It takes the
    short path to the pool its alias already uses, not Django's ``connect()`` (which
    starts by building the connection parameters)."""
    from django.db import connections

    connections["default"].ensure_connection()  # the alias's pool is known from here on
    connections["default"].close()
    fresh = connections.create_connection("default")
    built: list[int] = []
    fresh.get_connection_params = lambda: built.append(1) or {}  # Django's connect()
    try:
        fresh.ensure_connection()
        assert fresh.connguard_lease is not None
        assert scalar(fresh, "SELECT 1") == 1
        assert built == [], "a new wrapper went through Django's connect()"
    finally:
        fresh.close()


def test_the_acquire_site_is_the_callers_line_on_every_path(connection: Any) -> None:
    """The acquire site's first entry is the line that wanted the connection, whichever
    entry point took it: ``ensure_connection()`` (whose short path skips connguard's
    own frames by count, not by looking at them), ``cursor()``, and ``connect()``."""
    import sys

    from django.db import connections

    conn = connections["default"]
    conn.ensure_connection()  # the pool is known from here on: the short path
    conn.close()
    here = sys._getframe()
    seen: dict[str, tuple[str, int]] = {}

    def site(how: str, line: int) -> None:
        lease = conn.connguard_lease
        assert lease is not None
        seen[how] = (lease.where()[0], line)
        conn.close()

    conn.ensure_connection()
    site("ensure_connection", here.f_lineno - 1)
    conn.cursor().close()
    site("cursor", here.f_lineno - 1)
    conn.connect()
    site("connect", here.f_lineno - 1)
    for how, (first, line) in seen.items():
        expected = f"{__file__}:{line} in test_the_acquire_site_is_the_callers_line_on_every_path"
        assert first == expected, (how, first, expected)


def test_code_run_by_sync_to_async_is_recorded_up_to_asgirefs_hand_over(
    connection: Any,
) -> None:
    """Code that ``sync_to_async`` runs starts at asgiref's hand-over frame, in the
    executor's thread or (under ``async_to_sync``, thread-sensitive) in the thread
    that waits: the acquire site is that code, not whoever started the event loop,
    and the walk stops there rather than going on through the thread's machinery
    (under ASGI, every query of a view's ``sync_to_async``)."""
    from asgiref.sync import async_to_sync, sync_to_async
    from django.db import connections

    seen: list[list[str]] = []

    def inner() -> None:
        conn = connections["default"]
        scalar(conn, "SELECT 1")
        seen.append(conn.connguard_lease.where())
        conn.close()

    async def middle() -> None:
        await sync_to_async(inner)()  # thread-sensitive: run in outer()'s thread

    def outer() -> None:
        async_to_sync(middle)()

    outer()
    assert any(site.endswith("in inner") for site in seen[0]), seen
    assert not any(site.endswith("in outer") for site in seen[0]), seen


def test_djangos_own_code_run_by_sync_to_async_under_async_to_sync_has_its_callers_site(
    connection: Any,
) -> None:
    """The async ORM is Django's code run by ``sync_to_async`` (``aget()`` is
    ``sync_to_async(self.get)``): below asgiref's hand-over there is no frame of the
    user's. Called through ``async_to_sync`` (a Celery task, a sync view), it runs in
    the calling thread, and the site is the code that called (a review found the
    walk stopping at the hand-over there, with nothing recorded)."""
    from asgiref.sync import async_to_sync, sync_to_async
    from django.db import connections

    def a_task() -> list[str]:
        conn = connections["default"]

        async def fetch() -> None:
            await sync_to_async(conn.ensure_connection)()  # Django's (connguard's) code only

        async_to_sync(fetch)()
        lease = conn.connguard_lease
        assert lease is not None
        sites = lease.where()
        conn.close()
        return sites

    connections["default"].close()
    sites = a_task()
    assert any(site.endswith("in a_task") for site in sites), sites


class SitesMiddleware:
    """User code above the view: with ``query_first``, it queries before the view."""

    query_first = False
    seen: list[list[str]] = []

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        from django.db import connections

        if self.query_first:
            scalar(connections["default"], "SELECT 1")
            SitesMiddleware.seen.append(connections["default"].connguard_lease.where())
        return self.get_response(request)


def sites_view(request: Any) -> Any:
    from django.db import connections
    from django.http import HttpResponse

    scalar(connections["default"], "SELECT 1")
    SitesMiddleware.seen.append(connections["default"].connguard_lease.where())
    return HttpResponse("ok")


def test_a_views_acquire_site_stops_at_djangos_handler(
    connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through Django's handler (the test client), a view's acquire site is the view:
    the walk stops at the handler frame that called it, so a middleware above (user
    code too) is not recorded, nor walked at every acquire. A query made in the
    middleware itself is still found there."""
    from django.test import Client, override_settings
    from django.urls import clear_url_caches, path

    monkeypatch.setattr(SitesMiddleware, "seen", [])
    monkeypatch.setitem(globals(), "urlpatterns", [path("sites", sites_view)])
    clear_url_caches()
    middleware = [f"{__name__}.SitesMiddleware"]
    try:
        with override_settings(MIDDLEWARE=middleware):
            assert Client().get("/sites").status_code == 200
            monkeypatch.setattr(SitesMiddleware, "query_first", True)
            assert Client().get("/sites").status_code == 200
    finally:
        clear_url_caches()
    in_view, (in_middleware, after_middleware) = SitesMiddleware.seen[0], SitesMiddleware.seen[1:]
    assert in_view[-1].endswith("in sites_view"), in_view  # under it: scalar()
    assert not any("in __call__" in where for where in in_view), in_view
    assert in_middleware[1].endswith("in __call__"), in_middleware  # under it: scalar()
    # The view's query in the second request reused the middleware's lease.
    assert after_middleware == in_middleware


def test_a_user_wrapper_around_djangos_view_is_its_acquire_site(
    connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's decorator made with ``functools.wraps`` around one of Django's views
    (a guard on ``django.views.static.serve`` that queries first) carries Django's
    module name: the acquire site is found by the frame's file, not that name."""
    import functools

    from django.db import connections
    from django.http import HttpResponse
    from django.test import Client
    from django.urls import clear_url_caches, path
    from django.views.static import serve

    seen: list[list[str]] = []

    def media_guard(view: Any) -> Any:
        @functools.wraps(view)
        def guarded(request: Any, *args: Any, **kwargs: Any) -> Any:
            scalar(connections["default"], "SELECT 1")  # the request's first query
            seen.append(connections["default"].connguard_lease.where())
            return HttpResponse("ok")

        return guarded

    monkeypatch.setitem(globals(), "urlpatterns", [path("media/<path:path>", media_guard(serve))])
    clear_url_caches()
    try:
        assert Client().get("/media/x.png").status_code == 200
    finally:
        clear_url_caches()
    assert any(site.endswith("in guarded") for site in seen[0]), seen


def test_code_run_by_manage_py_shell_is_its_acquire_site(connection: Any) -> None:
    """``manage.py shell -c CODE`` (and ``shell < script.py``) runs the code with the
    shell command's globals, so under Django's module name: a cron job's query is
    still found where its code is."""
    from django.core.management import call_command
    from django.core.management.commands import shell

    out: list[list[str]] = []
    command = (
        "from django.db import connections\n"
        "c = connections['default']\n"
        "with c.cursor() as cur:\n"
        "    cur.execute('SELECT 1')\n"
        "OUT.append(c.connguard_lease.where())\n"
        "c.close()\n"
    )
    shell.OUT = out  # type: ignore[attr-defined]  # reachable from the command's globals
    try:
        call_command("shell", command=command, no_imports=True)
    finally:
        del shell.OUT  # type: ignore[attr-defined]
    assert any(site.startswith("<string>:3 ") for site in out[0]), out


def named_view(request: Any) -> Any:
    from django.http import HttpResponse

    from connguard.scope import current_scope

    scope = current_scope()
    named_view.seen.append(scope.info.get("view") if scope is not None else None)  # type: ignore[attr-defined]
    return HttpResponse("ok")


def test_the_middleware_names_each_requests_view(
    connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ConnguardMiddleware records the view in the request's scope (reports and leak
    warnings show it): the same name at every request, made once per view."""
    from django.test import Client
    from django.urls import clear_url_caches, path

    from connguard.django import middleware

    monkeypatch.setattr(named_view, "seen", [], raising=False)
    monkeypatch.setattr(middleware, "_VIEW_NAMES", {})
    monkeypatch.setitem(globals(), "urlpatterns", [path("named", named_view)])
    clear_url_caches()
    try:
        for _ in range(3):
            assert Client().get("/named").status_code == 200
    finally:
        clear_url_caches()
    expected = f"{__name__}.named_view"
    assert named_view.seen == [expected] * 3  # type: ignore[attr-defined]
    assert {named_view: expected} == middleware._VIEW_NAMES


def test_manage_py_doctor_reads_the_server(connection: Any) -> None:
    import io
    import json

    from django.core.management import call_command

    db = connection.settings_dict
    other = psycopg.connect(
        host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"],
        application_name="cg-other-client", autocommit=True,
    )  # fmt: skip
    out = io.StringIO()
    try:
        try:
            call_command("connguard", "doctor", "--json", stdout=out)
        except SystemExit as exc:  # exit status 1 when it finds a problem
            assert exc.code == 1
    finally:
        other.close()
    data = json.loads(out.getvalue())
    assert "max_connections" in data["settings"]
    names = {b["application_name"]: b["class"] for b in data["backends"]}
    assert names.get("cg-other-client") == "idle", names


def test_django_is_usable_runs_inside_the_fence(connection: Any) -> None:
    """Invariant 7: the raw connection goes through the fence. Django's own
    ``DatabaseWrapper.is_usable()`` (public; called by Django's test machinery and by
    health-check code) does ``self.connection.cursor().execute("SELECT 1")``: the
    wrapper's ``connection`` property hands it the raw connection, and the round trip
    runs with the lease not busy, so a release from another thread at that moment
    hands the connection on (to another holder) under the running statement."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    lease = connection.connguard_lease
    raw = lease.raw
    seen: list[int] = []
    real_cursor = raw.cursor

    def spying_cursor(*args: Any, **kwargs: Any) -> Any:
        seen.append(len(lease._busy))
        return real_cursor(*args, **kwargs)

    raw.cursor = spying_cursor
    try:
        assert connection.is_usable()
    finally:
        del raw.cursor
    assert seen and all(seen), f"is_usable() used the connection with the lease busy={seen}"


def test_the_django_driver_passes_the_pools_capabilities_through(connection: Any) -> None:
    """The pool looks up ``ping_bounded`` (an inline, bounded ping), ``abort`` and
    ``prepare_cancel`` (``socket_timeout``) on its driver; Django's wrapper driver must
    not hide them, or pings go to a thread each, a blocked call can never be ended, and
    an aborted one is not cancelled on the server."""
    scalar(connection, "SELECT 1")
    driver = the_pool().driver
    base = driver.base
    assert driver.ping_bounded == getattr(base, "ping_bounded", False)
    assert getattr(driver, "prepare_cancel", None) == getattr(base, "prepare_cancel", None)
    assert driver.abort == base.abort


def test_pool_false_means_a_connection_per_lease(
    connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``OPTIONS["pool"] = False`` (Django's "no pool") is accepted: each lease opens
    its own connection and closes it when it ends; PostgreSQL keeps none idle."""
    from django.db import connections

    from connguard.django import pools

    monkeypatch.setitem(connection.settings_dict["OPTIONS"], "pool", False)
    try:
        first = scalar(connection, "SELECT pg_backend_pid()")
        connection.close()
        second = scalar(connection, "SELECT pg_backend_pid()")
        connection.close()
        assert first != second, "a connection serves one lease"
        (pool,) = [p for p in pools.pools() if not p.config.reuse]
        assert pool.stats().closed["single_use"] == 2 and pool.stats().idle == 0
        with psycopg.connect(**connections["default"].get_connection_params()) as probe:
            pause = threading.Event()
            for _ in range(500):  # a backend exits just after its client's goodbye
                alive = probe.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)",
                    [[first, second]],
                ).fetchone()
                if alive == (0,):
                    break
                pause.wait(0.01)
        assert alive == (0,)
    finally:
        pools.close_pools(alias="default")


def count_parameter_builds(connection: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one each time the wrapper builds Django's connection
    parameters (the full path; the short re-acquire path builds none)."""
    built: list[int] = []
    real = type(connection).get_connection_params
    monkeypatch.setattr(
        type(connection),
        "get_connection_params",
        lambda self: built.append(1) or real(self),
    )
    return built


def test_reconnect_takes_the_short_path_and_keeps_djangos_contract(
    connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After its first acquire a wrapper re-acquires without rebuilding Django's
    connection parameters, yet ``connection_created`` still fires at every checkout,
    a connection a holder left with autocommit off is put back, and Django's
    bookkeeping starts fresh."""
    from django.db import connections
    from django.db.backends.signals import connection_created

    connection = connections["default"]  # the wrapper itself, not Django's proxy
    scalar(connection, "SELECT 1")
    connection.close()  # the wrapper now knows its pool
    built = count_parameter_builds(connection, monkeypatch)
    created: list[Any] = []

    def receiver(sender: Any, connection: Any, **kwargs: Any) -> None:
        created.append(connection)

    connection_created.connect(receiver)
    try:
        connection.ensure_connection()
        raw = connection.connection
        connection.set_autocommit(False)  # a holder that leaves autocommit off...
        connection.needs_rollback = True
        connection.close()  # ...and gives the connection back that way
        connection.ensure_connection()
        assert built == [], "the short path builds no connection parameters"
        assert created == [connection, connection]
        assert connection.get_autocommit() is True
        assert connection.connection.autocommit is True
        assert connection.needs_rollback is False and connection.in_atomic_block is False
        assert connection.connection is raw, "the same pooled connection, reused"
        assert scalar(connection, "SELECT 1") == 1
    finally:
        connection_created.disconnect(receiver)
        connection.close()


def test_reconnect_notices_an_option_changed_in_place(
    connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool a wrapper remembers is checked against its settings at every
    acquire: an ``OPTIONS`` value changed in place (as a test or a tenant switch
    would) sends the acquire back through Django's parameters to the pool for the
    new settings; put back, the original pool serves again."""
    from django.db import connections

    connection = connections["default"]
    scalar(connection, "SELECT 1")
    before = connection.connguard_pool
    assert before is not None
    connection.close()
    built = count_parameter_builds(connection, monkeypatch)
    options = connection.settings_dict["OPTIONS"]
    original = options["application_name"]
    try:
        options["application_name"] = "cg-inproc-other"
        name = scalar(connection, "SELECT current_setting('application_name')")
        assert built == [1] and name.startswith("cg-inproc-other")
        assert connection.connguard_pool is not before
        connection.close()
        options["application_name"] = original
        scalar(connection, "SELECT 1")
        assert connection.connguard_pool is before
        connection.close()
        built.clear()
        scalar(connection, "SELECT 1")
        assert built == [], "unchanged settings: the short path again"
    finally:
        options["application_name"] = original
        connection.close()


def test_reconnect_puts_back_a_time_zone_a_holder_changed(
    connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under reset policy ``"rollback"`` session state crosses to the next holder, but
    Django's time zone must not: datetimes would be read in the wrong zone. Each
    checkout compares it (client-side) and sets it back."""
    from django.db import connections

    from connguard.django import pools

    monkeypatch.setitem(
        connection.settings_dict["OPTIONS"], "pool", {"max_size": 1, "reset": "rollback"}
    )
    wrapper = connections["default"]
    try:
        with wrapper.cursor() as cursor:
            cursor.execute("SET TIME ZONE 'Asia/Tokyo'")
        assert scalar(wrapper, "SHOW TIME ZONE") == "Asia/Tokyo"
        wrapper.close()
        assert scalar(wrapper, "SHOW TIME ZONE") == wrapper.timezone_name
    finally:
        wrapper.close()
        pools.close_pools(alias="default")


def test_reconnect_with_autocommit_off_logs_begin_as_django_does(
    connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``AUTOCOMMIT=False``: Django logs its "BEGIN" on every connect (so
    ``assertNumQueries`` counts it); the short path must too."""
    from django.db import connections

    wrapper = connections["default"]
    monkeypatch.setitem(wrapper.settings_dict, "AUTOCOMMIT", False)
    try:
        wrapper.ensure_connection()
        wrapper.close()  # the next connect takes the short path
        # (CaptureQueriesContext connects before it starts capturing.)
        monkeypatch.setattr(wrapper, "force_debug_cursor", True)
        wrapper.queries_log.clear()
        wrapper.ensure_connection()
        assert [q["sql"] for q in wrapper.queries] == ["BEGIN"]
        assert wrapper.get_autocommit() is False
    finally:
        wrapper.rollback()
        wrapper.close()
        from connguard.django import pools

        pools.close_pools(alias="default")


def test_a_query_from_an_event_loops_thread_is_refused_as_django_refuses_it(
    connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """connguard's ensure_connection() keeps Django's event-loop check (asked without
    the exception get_running_loop() raises in the common case): refused in a loop's
    thread, allowed with DJANGO_ALLOW_ASYNC_UNSAFE, and allowed again once the loop
    has stopped. The wrapper itself, not the ``connection`` proxy: in the loop's task
    the proxy would give a wrapper of the task's own."""
    import asyncio

    from django.core.exceptions import SynchronousOnlyOperation
    from django.db import connections

    monkeypatch.delenv("DJANGO_ALLOW_ASYNC_UNSAFE", raising=False)
    wrapper = connections["default"]
    scalar(wrapper, "SELECT 1")  # the pool exists, and the wrapper knows it
    wrapper.close()
    in_use = the_pool().stats().in_use

    async def from_the_loop() -> None:
        with pytest.raises(SynchronousOnlyOperation, match="async context"):
            wrapper.ensure_connection()
        assert the_pool().stats().in_use == in_use, "refused before any acquire"
        monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        wrapper.ensure_connection()
        assert wrapper.connguard_lease is not None
        wrapper.close()

    asyncio.run(from_the_loop())
    monkeypatch.delenv("DJANGO_ALLOW_ASYNC_UNSAFE")
    assert scalar(wrapper, "SELECT 1") == 1  # no loop in this thread any more


def asgi_seen_view(request: Any) -> Any:
    """Runs under Django's ASGI handler (a sync view: in a thread, by sync_to_async)."""
    from django.db import connections
    from django.http import HttpResponse

    from connguard.scope import current_or_none, current_scope

    before = current_or_none()
    scalar(connections["default"], "SELECT 1")
    asgi_seen_view.seen.append((before, current_or_none(), current_scope()))  # type: ignore[attr-defined]
    return HttpResponse("ok")


def test_an_asgi_requests_scope_is_found_but_never_made_current(
    connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ASGI the request's scope is found through asgiref's per-request context,
    and the lookup makes it current in no context: a server may start the next
    request in a copy of this one's (uvicorn starts a pipelined request from inside
    the previous one's ``send()``), which would then run under the previous
    request's scope (a review found this when the scope, once found, was made
    current to save the next lookups). Two requests handled one after the other from
    one task each find their own."""
    import asyncio

    from django.core.handlers.asgi import ASGIHandler
    from django.test import override_settings
    from django.urls import clear_url_caches, path

    monkeypatch.setattr(asgi_seen_view, "seen", [], raising=False)
    monkeypatch.setitem(globals(), "urlpatterns", [path("asgi-seen", asgi_seen_view)])
    clear_url_caches()
    # Without ConnguardMiddleware, which looks the scope up before the view does.
    no_middleware = override_settings(MIDDLEWARE=[])
    no_middleware.enable()
    handler = ASGIHandler()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": "/asgi-seen", "raw_path": b"/asgi-seen",
        "query_string": b"", "root_path": "", "headers": [(b"host", b"localhost")],
        "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip

    async def one() -> int:
        body = [{"type": "http.request", "body": b"", "more_body": False}]
        never = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if body:
                return body.pop()
            await never.wait()
            return {"type": "http.disconnect"}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await handler(scope, receive, send)
        status: int = sent[0]["status"]
        return status

    async def two() -> list[int]:
        return [await one(), await one()]

    try:
        assert asyncio.run(two()) == [200, 200]
    finally:
        no_middleware.disable()
        clear_url_caches()
    (before1, after1, found1), (before2, after2, found2) = asgi_seen_view.seen  # type: ignore[attr-defined]
    assert found1 is not None and found1.kind == "request" and found1.info["path"] == "/asgi-seen"
    assert found2 is not None and found2.kind == "request" and found2 is not found1
    # Current in the view only if Django made it so (6.x carries request_started's
    # change into the request's task; 5.2 runs it in a task of its own), never by the
    # lookup, and never the request before.
    assert before1 in (None, found1) and before2 in (None, found2), "leaked into the next"
    assert after1 is before1 and after2 is before2, "made current by the lookup"
    assert found1.ended and found2.ended


def test_an_asgi_requests_scope_ends_when_its_context_is_collected(
    django_db: dict[str, Any],
) -> None:
    """Under ASGI the request's scope is found through asgiref's per-request
    ThreadSensitiveContext, and ends when that context is collected: a request whose
    client hung up mid-stream never finishes, and its leases must not stay owned by
    an open scope."""
    from asgiref.sync import SyncToAsync, ThreadSensitiveContext

    from connguard.django import scopes

    seen: dict[str, Any] = {}

    def request() -> None:
        context = ThreadSensitiveContext()
        token = SyncToAsync.thread_sensitive_context.set(context)
        try:
            scopes.request_started(None, scope={"method": "GET", "path": "/asgi-gone"})
            found = scopes.asgi_request_scope()
            seen["scope"] = found
            seen["open while the context lives"] = found is not None and not found.ended
        finally:
            SyncToAsync.thread_sensitive_context.reset(token)
        # Never finished: no request_finished. The context goes with this frame.

    contextvars.copy_context().run(request)
    gc.collect()
    scope = seen["scope"]
    assert scope is not None and scope.info["path"] == "/asgi-gone"
    assert seen["open while the context lives"]
    assert scope.ended, "the request's context was collected, its scope is still open"
    assert all(scope not in found.open for found in scopes._request_contexts.values())
