"""Which statements may change session state (reset policy "auto"), and the reset.

The detector errs toward "yes": a false positive costs one reset, a false negative
hands one request's state to the next. Every statement kind the issue names is here;
the real-server proof that the reset then takes it all back is in
``tests/test_handoff_servers.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from connguard.drivers.session import RESET_SQL, changes_session, literal

CHANGES = [
    "SET search_path TO tenant_1, public",
    "set statement_timeout = 5000",
    "SET ROLE app_role",
    "SET SESSION AUTHORIZATION app_role",
    "RESET ROLE",
    "reset all",
    "SELECT set_config('app.tenant', '7', false)",
    "select pg_catalog.set_config('a.b', 'c', false)",
    "CREATE TEMP TABLE t (x int)",
    "create temporary table t (x int)",
    "CREATE GLOBAL TEMPORARY TABLE t (x int)",
    "SELECT * INTO TEMP t FROM page",
    "SELECT pg_advisory_lock(1)",
    "SELECT pg_advisory_lock_shared(1, 2)",
    "SELECT pg_try_advisory_lock(1)",
    "LISTEN chan",
    "UNLISTEN chan",
    "PREPARE p AS SELECT 1",
    "DEALLOCATE p",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "DISCARD ALL",
    "LOAD 'auto_explain'",
    "DO $$ BEGIN PERFORM set_config('a.b', 'c', false); END $$",
    "CALL my_procedure()",
    "/* comment */ SET search_path TO x",
    "-- comment\nSET search_path TO x",
    "SELECT 1; SET search_path TO x",
    "  \n\tSET search_path TO x",
    b"SET search_path TO x",
]

SAME_SESSION = [
    'SELECT "page"."id" FROM "page" WHERE "page"."document_id" = %s LIMIT 1',
    "UPDATE page SET number = 2 WHERE id = 1",
    "INSERT INTO settings (name) VALUES ('reset')",
    "SET LOCAL statement_timeout = 5000",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET CONSTRAINTS ALL DEFERRED",
    "SELECT pg_advisory_xact_lock(1)",
    "PREPARE TRANSACTION 'x'",
    "WITH x AS (SELECT 1) SELECT * FROM x",
    "",
]


@pytest.mark.parametrize("sql", CHANGES)
def test_statements_that_change_the_session_are_seen(sql: Any) -> None:
    assert changes_session(sql)


@pytest.mark.parametrize("sql", SAME_SESSION)
def test_ordinary_statements_cost_no_reset(sql: str) -> None:
    assert not changes_session(sql)


def test_a_query_object_it_cannot_read_counts_as_a_change() -> None:
    from psycopg import sql

    assert changes_session(sql.SQL("SELECT {}").format(sql.Literal(1)))


def test_verdicts_are_remembered_per_text() -> None:
    text = "SELECT 42 AS remembered"
    assert not changes_session(text)
    assert not changes_session("".join(["SELECT 42 ", "AS remembered"]))  # equal, new object


def test_reset_sql_is_discard_all_spelled_out() -> None:
    # DISCARD ALL's documented equivalent; DISCARD ALL itself cannot share a string.
    for part in ("CLOSE ALL", "SET SESSION AUTHORIZATION DEFAULT", "RESET ALL",
                 "DEALLOCATE ALL", "UNLISTEN *", "pg_advisory_unlock_all()",
                 "DISCARD PLANS", "DISCARD TEMP", "DISCARD SEQUENCES"):  # fmt: skip
        assert part in RESET_SQL
    assert "DISCARD ALL" not in RESET_SQL


def test_literal_quotes_and_refuses_nul() -> None:
    assert literal("it's") == "'it''s'"
    with pytest.raises(ValueError):
        literal("a\x00b")
