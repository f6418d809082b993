"""The :class:`~connguard.pool.driver.Driver` for psycopg2.

Same contract and techniques as :mod:`connguard.drivers.psycopg`; the differences come
from psycopg2 keeping its own idea of the transaction state (``conn.status``) next to
libpq's, and from it giving no access to libpq's non-blocking API on an ordinary
connection, so :meth:`Psycopg2Driver.ping` cannot bound its round trip by itself.
"""

from __future__ import annotations

import math
from typing import Any

import psycopg2
import psycopg2.extensions as ext

from connguard.pool.driver import TxStatus

from .libpq import LibpqDriver, socket_readable, tcp_keepalives

__all__ = ["Psycopg2Driver"]

# Indexed by libpq's PGTransactionStatusType, which psycopg2's get_transaction_status()
# returns as a plain int: a tuple lookup is the cheapest mapping there is.
_TX_BY_LIBPQ: tuple[TxStatus, ...] = tuple(
    {
        ext.TRANSACTION_STATUS_IDLE: TxStatus.IDLE,
        ext.TRANSACTION_STATUS_ACTIVE: TxStatus.ACTIVE,
        ext.TRANSACTION_STATUS_INTRANS: TxStatus.INTRANS,
        ext.TRANSACTION_STATUS_INERROR: TxStatus.INERROR,
        ext.TRANSACTION_STATUS_UNKNOWN: TxStatus.UNKNOWN,
    }[i]
    for i in range(5)
)
_IDLE: int = ext.TRANSACTION_STATUS_IDLE
_UNKNOWN: int = ext.TRANSACTION_STATUS_UNKNOWN
_STATUS_READY: int = ext.STATUS_READY


class Psycopg2Driver(LibpqDriver):
    """psycopg2 as the pool sees it.

    ``conninfo`` and ``connect_kwargs`` are what you would pass to ``psycopg2.connect``
    (libpq parameters, ``connection_factory``, ``cursor_factory``). ``autocommit`` and
    ``application_name`` define the baseline every connection is opened in and that
    :meth:`reset` restores; they, and the pool's connect timeout, win over the same keys in
    ``connect_kwargs``.
    """

    name: str = "psycopg2"
    operational_error: type[Exception] = psycopg2.OperationalError

    def socket(self, conn: Any) -> int:
        return -1 if conn.closed else int(conn.fileno())

    def server_version(self, conn: Any) -> int:
        return int(conn.server_version)

    def libpq_version(self) -> int:
        version: int = ext.libpq_version()
        return version

    def connect(self, timeout: float) -> Any:
        """Open a connection in the baseline state.

        ``timeout`` becomes libpq's ``connect_timeout``: whole seconds, at least 2 in
        practice (libpq rounds 1 up to 2), and per host with a multi-host ``conninfo``.
        The connection gets :data:`~connguard.drivers.libpq.TCP_KEEPALIVES` unless
        ``conninfo`` or ``connect_kwargs`` set any of them, and the driver's own set-up
        (:meth:`~connguard.drivers.libpq.LibpqDriver.setup_sql`).
        """
        params = {**self._keepalives(), **self.connect_kwargs}
        if self.application_name is not None:
            params["application_name"] = self.application_name
        params["connect_timeout"] = max(1, math.ceil(timeout))
        conn = psycopg2.connect(self.conninfo, **params)
        try:
            conn.autocommit = self.autocommit
            self.set_up(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _keepalives(self) -> dict[str, int]:
        try:
            user = ext.parse_dsn(self.conninfo) if self.conninfo else {}
        except psycopg2.Error:  # a malformed conninfo: connect() reports it as before
            return {}
        return tcp_keepalives({**user, **self.connect_kwargs}, self.libpq_version())

    def close(self, conn: Any) -> None:
        """Close politely (libpq sends Terminate). Never raises."""
        try:
            conn.close()
        except Exception:
            pass

    def is_alive(self, conn: Any) -> bool:
        """True unless ``conn`` is certainly unusable; no round trip (~0.7 µs).

        ``conn.closed`` catches what psycopg2 already knows; libpq's transaction status
        is UNKNOWN whenever the connection is not ``CONNECTION_OK``. Then the socket is
        polled without waiting: on an idle connection readable data means the server hung
        up or sent an error before going away. A pending NOTIFY/NOTICE also reads as
        dead: a harmless false negative that costs one reconnect.
        """
        try:
            if conn.closed or conn.get_transaction_status() == _UNKNOWN:
                return False
            return not socket_readable(conn.fileno())
        except Exception:
            return False

    ping_bounded = False
    """Its ping cannot keep a timeout: the pool runs it on a thread of its own."""
    # No ``prepare_cancel``: psycopg2's ``cancel()`` (libpq's ``PQcancel``) has no
    # timeout and holds the GIL, so towards a server that stopped answering it freezes
    # the whole process until the network answers again; and it is nothing once the
    # connection is closed. The pool sends no cancel of its own for ``socket_timeout``:
    # set ``client_connection_check_interval`` (the Django backend does, with
    # ``socket_timeout``), so the backend of an aborted call notices its client is gone.

    def ping(self, conn: Any, timeout: float) -> None:
        """One round trip: the empty query ``;``.

        ``timeout`` is NOT enforced: psycopg2 exposes no non-blocking API on a normal
        connection. The wait is bounded only by TCP (set ``keepalives_*`` and
        ``tcp_user_timeout`` in the conninfo to bound a dead network).

        The empty query is answered even inside a failed transaction and changes no
        state. psycopg2 turns the server's EmptyQueryResponse into a ProgrammingError,
        which here means success. Autocommit is switched on around it when psycopg2 would
        otherwise open a transaction first.
        Raises ``psycopg2.OperationalError`` on failure.
        """
        _check_open(conn)
        # psycopg2 sends BEGIN first exactly when it believes it is idle (READY).
        restore = conn.status == _STATUS_READY and not conn.autocommit
        if restore:
            conn.autocommit = True
        try:
            with conn.cursor() as cur:
                try:
                    cur.execute(";")
                except psycopg2.ProgrammingError as exc:
                    if exc.pgcode is not None or "empty query" not in str(exc):
                        raise
        finally:
            if restore and not conn.closed:
                conn.autocommit = False

    def transaction_status(self, conn: Any) -> TxStatus:
        """Map libpq's ``PQtransactionStatus`` (UNKNOWN once closed); no I/O, ~50 ns.

        ``get_transaction_status()`` is used rather than ``conn.info.transaction_status``,
        which builds a ConnectionInfo object per access and is 4x slower.
        """
        status: int = conn.get_transaction_status()  # typed for mypy; no runtime cost
        try:
            return _TX_BY_LIBPQ[status]
        except IndexError:
            return TxStatus.UNKNOWN

    def rollback(self, conn: Any) -> None:
        """Roll back the open transaction, keeping session state.

        ``conn.rollback()`` alone is not enough: psycopg2 decides from its own bookkeeping
        and does nothing under autocommit, even after a hand-written ``BEGIN`` left libpq
        INTRANS. So it is used to reset psycopg2's state, and an explicit ``ROLLBACK``
        follows if libpq still reports a transaction.
        """
        _check_open(conn)
        if conn.status != _STATUS_READY:
            conn.rollback()
        if conn.get_transaction_status() != _IDLE:
            with conn.cursor() as cur:
                cur.execute("ROLLBACK")

    def cancel(self, conn: Any) -> None:
        """Cancel the running statement from any thread (libpq's ``PQcancel``, which
        psycopg2 documents as thread-safe). Never raises."""
        try:
            conn.cancel()
        except Exception:
            pass

    def reset(self, conn: Any, then: str = "") -> None:
        """Roll back, discard all session state, run ``then``, restore autocommit: one
        round trip (more with a transaction open).

        The reset is ``DISCARD ALL`` spelled out (:data:`~connguard.drivers.session.RESET_SQL`,
        which includes ``CLOSE ALL``, so WITH HOLD cursors go too) so that ``then`` (the
        baseline set-up) shares its query string; psycopg2 would open a transaction in
        front of it with autocommit off, so autocommit is switched on for it (no round
        trip). On failure the connection must be closed.
        """
        self.rollback(conn)
        if not conn.autocommit:
            conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(self.reset_sql(then, conn))
        # The transaction characteristics psycopg2 keeps on the client side.
        conn.set_session(isolation_level="DEFAULT", readonly="DEFAULT", deferrable="DEFAULT")
        if conn.autocommit != self.autocommit:
            conn.autocommit = self.autocommit


def _check_open(conn: Any) -> None:
    """Fail as ``OperationalError`` rather than psycopg2's ``InterfaceError``.

    The pool treats the driver's ``operational_error`` as "this connection is gone";
    psycopg2 raises InterfaceError for an already-closed connection.
    """
    if conn.closed:
        raise psycopg2.OperationalError("the connection is closed")
