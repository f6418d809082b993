"""Django's PostgreSQL backend with connguard's pool (psycopg 3 or psycopg2).

Thin on purpose: everything that differs from Django's own backend lives in
:mod:`connguard.django.wrapper` and :mod:`connguard.django.cursors`; this module only
composes them with Django's classes, which pick psycopg 3 when installed and psycopg2
otherwise.
"""

from __future__ import annotations

from typing import Any

from django.db.backends.postgresql import base as django_pg
from django.db.backends.postgresql.creation import DatabaseCreation as DjangoCreation

from connguard.django import pools, scopes
from connguard.django.cursors import FencedCursorMixin
from connguard.django.wrapper import ConnguardWrapperMixin

scopes.install()


class CursorDebugWrapper(FencedCursorMixin, django_pg.CursorDebugWrapper):
    """Django's debug cursor (``DEBUG=True``), fenced.

    Django's class defines the driver's COPY calls as methods of its own (to log
    them), so the mixin's ``__getattr__``, which fences every other driver call,
    never sees them: each is fenced here around Django's, which still logs it. Each
    exists only for the driver Django picked (psycopg 3: ``copy``; psycopg2:
    ``copy_expert``, ``copy_to``); ``super()`` raises AttributeError for the other's,
    as the driver's cursor would."""

    def copy(self, statement: Any) -> Any:
        if self._cg_lease is None:
            return super().copy(statement)
        # A context manager that holds the connection while its block runs.
        return self._cg_span(super().copy, statement)

    def copy_expert(self, sql: Any, file: Any, *args: Any) -> Any:
        return self._cg_copy_expert(super().copy_expert, sql, file, *args)

    def copy_to(self, file: Any, table: Any, *args: Any, **kwargs: Any) -> Any:
        return self._cg_call(super().copy_to, file, table, *args, **kwargs)


class DatabaseCreation(DjangoCreation):
    """PostgreSQL refuses to create, clone or drop a database while connections are
    attached to it: close the pools that hold idle ones first."""

    def _create_test_db(self, verbosity: int, autoclobber: bool, keepdb: bool = False) -> Any:
        pools.close_pools(database=self._get_test_db_name())
        return super()._create_test_db(verbosity, autoclobber, keepdb)

    def _destroy_test_db(self, test_database_name: str, verbosity: int) -> None:
        pools.close_pools(database=test_database_name)
        super()._destroy_test_db(test_database_name, verbosity)


class DatabaseWrapper(ConnguardWrapperMixin, django_pg.DatabaseWrapper):
    creation_class = DatabaseCreation

    def make_debug_cursor(self, cursor: Any) -> Any:
        return CursorDebugWrapper(cursor, self)
