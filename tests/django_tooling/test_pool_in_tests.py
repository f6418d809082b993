"""Run by Django's test runner (``manage.py test --parallel``) and by pytest-django,
from tests/test_django_tooling.py: test databases created and destroyed, TestCase
and TransactionTestCase, a pool per test database, nothing leaking between tests."""

import os
import threading

from django.db import connection, connections
from django.test import SimpleTestCase, TestCase, TransactionTestCase

from connguard.demo.site.models import Document, Page
from connguard.django import pools


def leases_in_use() -> int:
    return sum(pool.stats().in_use for pool in pools.pools())


class PoolPerTestDatabase:
    def assert_on_test_database(self) -> None:
        name = connection.settings_dict["NAME"]
        assert name.startswith("test_docsite"), name
        connection.ensure_connection()
        pool = connection.connguard_pool
        assert pool is not None
        expected = os.environ.get("DOCSITE_DRIVER", "psycopg")
        assert pool.driver.name == expected, (pool.driver.name, expected)


class PagesTestCase(PoolPerTestDatabase, TestCase):
    def test_seeded_pages_are_there(self) -> None:
        self.assertEqual(Page.objects.filter(document_id=1).count(), 30)
        self.assert_on_test_database()

    def test_client_requests_share_the_test_transaction(self) -> None:
        Document.objects.create(id=500, title="draft", public=True)
        Page.objects.create(document_id=500, number=1)
        response = self.client.get("/doc/500/page/1.png")
        self.assertEqual(response.status_code, 200)  # saw the uncommitted rows
        self.assertEqual(leases_in_use(), 1, "only the test's own transaction")

    def test_rows_from_the_other_test_are_gone(self) -> None:
        self.assertFalse(Document.objects.filter(id=500).exists())


class PagesTransactionTestCase(PoolPerTestDatabase, TransactionTestCase):
    def test_committed_rows_visible_from_another_thread(self) -> None:
        self.assert_on_test_database()
        Document.objects.create(id=700, title="committed")
        seen = []

        def read() -> None:
            seen.append(Document.objects.filter(id=700).exists())
            connections["default"].close()

        t = threading.Thread(target=read)
        t.start()
        t.join()
        self.assertEqual(seen, [True])

    def tearDown(self) -> None:
        connection.close()
        self.assertEqual(leases_in_use(), 0, "a lease leaked out of the test")


class NoDatabase(SimpleTestCase):
    """Django's SimpleTestCase refuses database access by replacing
    ``BaseDatabaseWrapper.ensure_connection`` (and the wrapper's ``connect`` and
    ``cursor``); connguard's ``ensure_connection``, whose short path re-acquires
    without either, must defer to it (found by a review). Under Django's runner this
    class runs after the others in the same process, so the pool of the test
    database is known and the short path would be taken; under pytest-django its
    blocker refuses first."""

    def test_ensure_connection_is_refused(self) -> None:
        with self.assertRaises((AssertionError, RuntimeError)) as refused:
            connection.ensure_connection()
        self.assertRegex(str(refused.exception), "not allowed")
        self.assertIsNone(connection.connguard_lease)
