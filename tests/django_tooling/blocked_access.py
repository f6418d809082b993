"""Run by tests/test_django_tooling.py under pytest-django (not collected by the
Django runner's test*.py pattern): a test pytest-django refuses database access
must be refused under connguard as under Django's own backend."""

import pytest
from django.db import connection


def test_an_unmarked_test_is_refused_database_access() -> None:
    """pytest-django refuses a test without ``django_db`` by replacing
    ``BaseDatabaseWrapper.ensure_connection``. Run first in its session, such a test
    would otherwise reach the project's real database (the test database is not
    created yet)."""
    reached = None
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_database()")
            reached = cursor.fetchone()[0]
    except RuntimeError as exc:
        assert "Database access not allowed" in str(exc), exc
        return
    finally:
        connection.close()
    pytest.fail(f"pytest-django's blocker was bypassed: the test queried {reached!r}")


@pytest.mark.django_db
def test_a_marked_test_may_query() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_database()")
        assert cursor.fetchone()[0].startswith("test_")
