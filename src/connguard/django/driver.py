"""A driver that opens connections the way Django's PostgreSQL backend does.

The pool's openers call :meth:`DjangoDriver.connect`, which uses the backend's own
connect parameters and then runs the per-connection set-up Django would otherwise
run on every checkout (time zone, ``assume_role``, psycopg2's JSONB loader) once,
when the physical connection is opened. A reset discards all session state, that
set-up included, so :meth:`reset` re-applies it in the same round trip (its SQL comes
from ``baseline``): the connection always goes back to the pool in its configured
baseline, and a holder that ran ``RESET ROLE`` cannot hand the login role on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from connguard.drivers.libpq import LibpqDriver, forget_attempt, tcp_keepalives
from connguard.pool.driver import Driver, TxStatus


class DjangoDriver:
    """Wraps a connguard driver; only ``connect`` and ``reset`` differ."""

    def __init__(
        self,
        base: Driver,
        *,
        connect: Callable[..., Any],
        conn_params: dict[str, Any],
        configure: Callable[[Any], bool],
        baseline: Callable[[], str],
        autocommit: bool,
        tag: Callable[[], str] | None = None,
    ) -> None:
        self.base = base
        self.name = base.name
        self.operational_error = base.operational_error
        self._connect = connect  # the backend's Database.connect
        # Django passes every libpq parameter as a keyword (OPTIONS included), never
        # in a conninfo string: its keys are all the user set.
        keepalives = (
            tcp_keepalives(conn_params, base.libpq_version())
            if isinstance(base, LibpqDriver)
            else {}
        )
        self._conn_params = {**keepalives, **conn_params}
        self._configure = configure  # returns True when it ran statements
        self._baseline = baseline  # the same set-up as SQL, appended to a reset
        self.changes_session = base.changes_session  # type: ignore[attr-defined]
        # The optional capabilities the pool looks up on its driver, passed through:
        # hidden, pings would run on threads of their own, socket_timeout could end no
        # call, and a refused connection would be waited for as if it were an outage.
        self.ping_bounded: bool = getattr(base, "ping_bounded", False)
        prepare_cancel = getattr(base, "prepare_cancel", None)
        if prepare_cancel is not None:
            self.prepare_cancel: Callable[[Any], Callable[[], None] | None] = prepare_cancel
        abort = getattr(base, "abort", None)
        if abort is not None:
            self.abort: Callable[[Any], None] = abort
        refused = getattr(base, "refused", None)
        if refused is not None:
            self.refused: Callable[[BaseException], bool] = refused
        # The pool calls these on every checkout and release: the base driver's own
        # bound methods, not a method of ours that calls them (one call less each).
        self.is_alive: Callable[[Any], bool] = base.is_alive
        self.transaction_status: Callable[[Any], TxStatus] = base.transaction_status
        self._autocommit = autocommit
        self._tag = tag  # application_name for each new connection (pid may change)

    def __repr__(self) -> str:
        return f"<DjangoDriver {self.name} autocommit={self._autocommit}>"

    def connect(self, timeout: float) -> Any:
        """Open a connection with Django's parameters and set it up.

        The parameters carry :data:`~connguard.drivers.libpq.TCP_KEEPALIVES` unless
        the alias's ``OPTIONS`` set any of them, and the password as Django's
        wrapper made it (a :class:`~connguard.django.setup.MaskedPassword`, so this
        frame's locals do not show it). A connect error leaves without the failed
        attempt's ``pgconn`` (:func:`~connguard.drivers.libpq.forget_attempt`).
        """
        params = self._conn_params
        if "connect_timeout" not in params:
            # libpq takes whole seconds and treats less than 2 as 2.
            params = {**params, "connect_timeout": max(2, math.ceil(timeout))}
        if self._tag is not None:
            params = {**params, "application_name": self._tag()}
        try:
            conn = self._connect(**params)
        except Exception as exc:
            forget_attempt(exc)
            raise
        try:
            self._set_up(conn)
        except BaseException:
            self.base.close(conn)
            raise
        return conn

    def _set_up(self, conn: Any) -> None:
        if self._configure(conn) and not conn.autocommit:
            conn.commit()
        if isinstance(self.base, LibpqDriver):
            self.base.set_up(conn)  # client_connection_check_interval; reset re-applies it
        conn.autocommit = self._autocommit

    def reset(self, conn: Any) -> None:
        self.base.reset(conn, then=self._baseline())  # type: ignore[call-arg]

    def cancel(self, conn: Any) -> None:
        self.base.cancel(conn)

    def close(self, conn: Any) -> None:
        self.base.close(conn)

    def drop(self, conn: Any) -> None:
        self.base.drop(conn)

    def ping(self, conn: Any, timeout: float) -> None:
        self.base.ping(conn, timeout)

    def rollback(self, conn: Any) -> None:
        self.base.rollback(conn)
