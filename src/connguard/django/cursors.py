"""Django cursors behind the lease's fence.

Every call a Django cursor makes on its driver cursor goes through the lease it was
made under (see :class:`FencedCursorMixin`), so a cursor kept past its lease cannot
touch a connection that is now someone else's. The wrapper
(:mod:`connguard.django.wrapper`) makes these through ``make_cursor``.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from django.db.backends.utils import CursorDebugWrapper, CursorWrapper

from connguard.pool import Lease, LeaseEnded
from connguard.pool.lease import fenced_rows


class FencedCursorMixin:
    """Every call a Django cursor makes on its driver cursor (execute, fetch,
    iteration, scroll, COPY, a server-side cursor's close...) is one fenced use of the
    lease the cursor was made under: it raises Django's ``OperationalError`` once that
    lease has ended, and the lease cannot end (be handed to someone else) while the
    call runs. Statements are shown to the lease (reset policy ``"auto"``), and a
    server-side cursor pins its lease until it is closed: an early release would break
    the stream."""

    db: Any
    cursor: Any
    _cg_lease: Lease | None

    def __init__(self, cursor: Any, db: Any) -> None:
        super().__init__(cursor, db)  # type: ignore[call-arg]
        lease = db._cg_cursor_lease
        db._cg_cursor_lease = None
        self._cg_lease = lease if lease is not None else db._cg_lease
        if self._cg_lease is not None and getattr(cursor, "name", None):
            _pin(self._cg_lease, self)

    def _cg_enter(self) -> Lease | None:
        lease = self._cg_lease
        if lease is not None:
            try:
                lease.enter()
            except Exception:
                # Django's error translation (LeaseEnded becomes its OperationalError),
                # entered only when there is an error: every query passes here.
                with self.db.wrap_database_errors:
                    raise
        return lease

    def execute(self, sql: Any, params: Any = None) -> Any:
        lease = self._cg_lease
        if lease is None:
            return super().execute(sql, params)  # type: ignore[misc]
        try:  # _cg_enter(), inlined: every query passes here
            lease.enter()
        except Exception:
            with self.db.wrap_database_errors:
                raise
        try:
            if not lease.dirty:
                lease.note_statement(sql)
            return super().execute(sql, params)  # type: ignore[misc]
        finally:
            lease.exit()

    # The calls every query makes, as methods (``__getattr__`` below would build a
    # closure for each): Django's own CursorWrapper translates errors for these.

    def fetchone(self) -> Any:
        return self._cg_fetch(self.cursor.fetchone)

    def fetchmany(self, *size: int) -> Any:
        return self._cg_fetch(self.cursor.fetchmany, *size)

    def fetchall(self) -> Any:
        return self._cg_fetch(self.cursor.fetchall)

    def _cg_fetch(self, fetch: Callable[..., Any], *args: Any) -> Any:
        lease = self._cg_lease
        if lease is not None:
            try:  # _cg_enter(), inlined: every fetch passes here
                lease.enter()
            except Exception:
                with self.db.wrap_database_errors:
                    raise
        try:
            return fetch(*args)
        except Exception:
            with self.db.wrap_database_errors:
                raise
        finally:
            if lease is not None:
                lease.exit()

    def close(self) -> None:
        if self._cg_lease is None or not getattr(self.cursor, "name", None):
            # A client-side cursor's close touches no connection (psycopg 3 and
            # psycopg2 only mark it closed and drop its results): no fence needed.
            self.cursor.close()
        else:
            self._cg_close(self.cursor.close)

    def executemany(self, sql: Any, param_list: Any) -> Any:
        lease = self._cg_enter()
        if lease is None:
            return super().executemany(sql, param_list)  # type: ignore[misc]
        try:
            lease.note_statement(sql)
            return super().executemany(sql, param_list)  # type: ignore[misc]
        finally:
            lease.exit()

    def callproc(self, procname: Any, params: Any = None, kparams: Any = None) -> Any:
        lease = self._cg_enter()
        if lease is None:
            return super().callproc(procname, params, kparams)  # type: ignore[misc]
        try:
            lease.dirty = True  # a procedure may do anything to the session
            return super().callproc(procname, params, kparams)  # type: ignore[misc]
        finally:
            lease.exit()

    def __iter__(self) -> Iterator[Any]:
        lease = self._cg_lease
        if lease is None:
            yield from super().__iter__()  # type: ignore[misc]
            return
        # The driver's own iterator (a server-side cursor fetches ``itersize`` rows
        # per round trip), each step one fenced use; errors wrapped as Django's own
        # CursorWrapper.__iter__ does.
        with self.db.wrap_database_errors:
            with lease.using():
                rows = iter(self.cursor)
            yield from fenced_rows(lease, rows)

    def __getattr__(self, attr: str) -> Any:
        """Every other method of the driver's cursor (fetchone, fetchmany, fetchall,
        scroll, nextset, copy_expert, ...) through the fence; plain attributes as
        they are."""
        value = getattr(self.cursor, attr)
        lease = self._cg_lease
        if lease is None or not callable(value):
            return super().__getattr__(attr)  # type: ignore[misc]
        if attr == "close":
            return functools.partial(self._cg_close, value)
        if attr == "copy":
            return functools.partial(self._cg_span, value)
        if attr == "stream":
            return functools.partial(self._cg_stream, value)
        if attr == "copy_expert":
            return functools.partial(self._cg_copy_expert, value)
        return functools.partial(self._cg_call, value)

    def _cg_call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One call of the driver's cursor as one fenced use, its errors translated."""
        lease = self._cg_enter()
        if lease is None:
            return method(*args, **kwargs)
        try:
            with self.db.wrap_database_errors:
                return method(*args, **kwargs)
        finally:
            lease.exit()

    def _cg_copy_expert(self, method: Callable[..., Any], sql: Any, *args: Any) -> Any:
        """psycopg2's ``copy_expert(sql, file)``: one fenced call, its statement shown
        to the lease as ``execute()``'s is (``COPY (SELECT ...)`` may change the
        session). ``copy_to``/``copy_from`` name a table: nothing to show."""
        lease = self._cg_lease
        if lease is not None and not lease.dirty:
            lease.note_statement(sql)
        return self._cg_call(method, sql, *args)

    def _cg_close(self, close: Callable[[], Any]) -> None:
        """Close through the fence; once the lease has ended, the cursor went with
        the session (the reset closed it) and touching it would reach someone else's
        connection, so nothing is done."""
        lease = self._cg_lease
        assert lease is not None
        try:
            lease.enter()
        except LeaseEnded:
            _unpin(lease, self)
            return
        try:
            with self.db.wrap_database_errors:
                close()
        finally:
            _unpin(lease, self)
            lease.exit()

    @contextlib.contextmanager
    def _cg_span(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[Any]:
        """``with cursor.copy(...) as copy:`` (psycopg 3) holds the connection for as
        long as the block runs: one fenced use for the whole block."""
        lease = self._cg_enter()
        assert lease is not None
        try:
            if not lease.dirty and args:  # COPY (SELECT ...) may change the session
                lease.note_statement(args[0])
            with self.db.wrap_database_errors, method(*args, **kwargs) as copy:
                yield copy
        finally:
            lease.exit()

    def _cg_stream(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[Any]:
        """``for row in cursor.stream(...)`` (psycopg 3): each row one fenced use."""
        lease = self._cg_lease
        assert lease is not None
        if not lease.dirty and args:
            lease.note_statement(args[0])
        # A generator: nothing runs until its first next(), inside the fence.
        with self.db.wrap_database_errors:
            yield from fenced_rows(lease, method(*args, **kwargs))


def _pin(lease: Lease, cursor: object) -> None:
    """A server-side cursor is open on the lease's connection (see Lease.pinned).

    Unpinned when the cursor is closed, or when the Django cursor is collected
    unclosed (a stream abandoned half way): the finalizer only discards from a set,
    which is safe wherever the collector runs."""
    pins = lease.server_cursors
    if pins is None:
        pins = lease.server_cursors = set()
    key = id(cursor)
    pins.add(key)
    weakref.finalize(cursor, pins.discard, key)


def _unpin(lease: Lease, cursor: object) -> None:
    pins = lease.server_cursors
    if pins is not None:
        pins.discard(id(cursor))


class FencedCursorWrapper(FencedCursorMixin, CursorWrapper):
    pass


class FencedCursorDebugWrapper(FencedCursorMixin, CursorDebugWrapper):
    pass
