"""Shared fixtures: a real PostgreSQL the suite starts itself, and a fault proxy.

``pg``          one server for the whole session (embedded PostgreSQL, or the server
                named by ``CONNGUARD_TEST_DSN`` for non-destructive tests).
``private_pg``  a private embedded server a test may stop, restart or kill.
``proxy``       a fault-injecting TCP proxy in front of ``private_pg``.

With ``CI=true`` (or ``CONNGUARD_REQUIRE_ALL=1``) nothing here ever skips: a missing
binary or service fails the run, because a skip would hide a broken install step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from connguard.testing.postgres import EmbeddedPostgres

from .proxy import FaultProxy

# These run inside the demo site's Django process (test_django_tooling.py).
collect_ignore = ["django_tooling"]

REQUIRE_ALL = (
    os.environ.get("CI", "").lower() == "true" or os.environ.get("CONNGUARD_REQUIRE_ALL") == "1"
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI a skip is a failure: it would hide a broken install step."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped under CI, where a missing service or binary is a failure: {report.longrepr}"
        )


class ExistingServer:
    """A server we did not start: only its DSN is known; never stop it."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn


@pytest.fixture(scope="session")
def pg() -> Iterator[EmbeddedPostgres | ExistingServer]:
    dsn = os.environ.get("CONNGUARD_TEST_DSN")
    if dsn:
        yield ExistingServer(dsn)
        return
    server = EmbeddedPostgres(max_connections=200)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def private_pg() -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(max_connections=50)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def proxy(private_pg: EmbeddedPostgres) -> Iterator[FaultProxy]:
    p = FaultProxy(private_pg.host, private_pg.port)
    p.start()
    try:
        yield p
    finally:
        p.close()
