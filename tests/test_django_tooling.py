"""Django's own test tooling on connguard: the test runner (with parallel test
processes) and pytest-django, each in a subprocess against a private server; and
``manage.py connguard doctor`` when the server cannot be reached."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from connguard.testing.postgres import EmbeddedPostgres

from .servers import ROOT, free_port, manage, site_env

pytestmark = [pytest.mark.real, pytest.mark.private]


@pytest.fixture(scope="module")
def tooling_db() -> Iterator[tuple[EmbeddedPostgres, dict[str, Any]]]:
    pg = EmbeddedPostgres(max_connections=60)
    pg.start()
    try:
        pg.psql("CREATE DATABASE docsite")
        db = {"HOST": pg.host, "PORT": pg.port, "NAME": "docsite", "USER": "postgres"}
        manage(db, "migrate", "-v", "0")
        yield pg, db
    finally:
        pg.cleanup()


def databases(pg: EmbeddedPostgres) -> list[str]:
    return pg.psql("SELECT datname FROM pg_database ORDER BY 1").split()


def run(cmd: list[str], db: dict[str, Any], **env: str) -> subprocess.CompletedProcess[str]:
    env = site_env(db, DOCSITE_POOL=json.dumps({"min_size": 1, "max_size": 4}), **env)
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize(
    ("parallel", "driver"), [("1", "psycopg"), ("2", "psycopg"), ("2", "psycopg2")]
)
def test_django_test_runner(
    tooling_db: tuple[EmbeddedPostgres, dict[str, Any]], parallel: str, driver: str
) -> None:
    pg, db = tooling_db
    result = run(
        [sys.executable, "-m", "django", "test", "tests.django_tooling", "--parallel",
         parallel, "--settings=connguard.demo.site.settings", "-v", "2", "--noinput"],
        db,
        DOCSITE_DRIVER=driver,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Ran 5 tests" in output and "OK" in output
    if parallel == "2":
        assert "Cloning test database" in output, output[-2000:]
    assert not [name for name in databases(pg) if name.startswith("test_")], (
        "a test database was left behind"
    )


def test_database_access_a_test_framework_refuses_is_refused(
    tooling_db: tuple[EmbeddedPostgres, dict[str, Any]],
) -> None:
    """pytest-django's blocker (it replaces ``BaseDatabaseWrapper.ensure_connection``)
    bit on Django's backend and not on connguard's, whose ``ensure_connection`` took
    its own short path (found by a review). Alone first: with no test database
    created yet, the unmarked test reached the project's database. (Django's
    SimpleTestCase: tests/django_tooling/test_pool_in_tests.py.)"""
    _, db = tooling_db
    path = "tests/django_tooling/blocked_access.py"
    for args in ([f"{path}::test_an_unmarked_test_is_refused_database_access"], [path]):
        result = run(
            [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "django", "-p",
             "no:cacheprovider", "--ds=connguard.demo.site.settings", "-q", *args],
            db,
        )  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        assert f"{1 if '::' in args[0] else 2} passed" in output, output[-2000:]


def test_pytest_django(tooling_db: tuple[EmbeddedPostgres, dict[str, Any]]) -> None:
    pg, db = tooling_db
    result = run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "django", "-p",
         "no:cacheprovider", "--ds=connguard.demo.site.settings", "-q",
         "tests/django_tooling/test_pool_in_tests.py"],
        db,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "5 passed" in output, output[-2000:]
    assert not [name for name in databases(pg) if name.startswith("test_")]


def test_manage_doctor_cannot_connect() -> None:
    """An unreachable server: one line worded as ``connguard doctor`` words it, exit
    status 2, no traceback, no password, and none of the pool's retry warnings."""
    port = free_port()  # nobody listens there
    db = {"HOST": "127.0.0.1", "PORT": port, "NAME": "docsite", "USER": "postgres",
          "PASSWORD": "s3cret-pw"}  # fmt: skip
    env = site_env(db, DOCSITE_POOL=json.dumps({"timeout": 1, "connect_timeout": 1}))
    # The settings come from DJANGO_SETTINGS_MODULE: after the sub-action, --settings
    # would be the sub-parser's (unknown) argument.
    result = subprocess.run(
        [sys.executable, "-m", "django", "connguard", "doctor"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"CommandError: cannot connect to PostgreSQL at 127.0.0.1:{port}: Connection refused"
    ], result.stderr


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_manage_doctor_leaves_its_own_connections_out(
    tooling_db: tuple[EmbeddedPostgres, dict[str, Any]], driver: str
) -> None:
    """Issue 12: ``manage.py connguard doctor`` counted its own connections among the
    client backends and in the budget: with ``min_size`` 3 its pool opened three, and
    only the one it queried on was left out. Nothing else is connected here, so the
    server's view holds no client backend at all."""
    _, db = tooling_db
    env = site_env(
        db,
        DOCSITE_POOL=json.dumps({"min_size": 3, "max_size": 4}),
        DOCSITE_APP_NAME="doctor-self",
        DOCSITE_DRIVER=driver,
    )
    result = subprocess.run(
        [sys.executable, "-m", "django", "connguard", "doctor", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["backends"] == [], data["backends"]
