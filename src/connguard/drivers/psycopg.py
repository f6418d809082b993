"""The :class:`~connguard.pool.driver.Driver` for psycopg 3.

Every method here runs either on the pool's hot path (``transaction_status``,
``is_alive``: no I/O, well under a microsecond or two) or at a moment where the pool
must not hang (``connect``, ``ping``: bounded by a timeout). The notes on each method say
which libpq behaviour the implementation relies on, because that is where the surprises
live.
"""

from __future__ import annotations

import functools
import math
import select
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

from connguard.pool.driver import TxStatus

from .libpq import READ_EVENTS, LibpqDriver, forget_attempt, socket_readable, tcp_keepalives

__all__ = ["PsycopgDriver"]

# libpq's PGTransactionStatusType values index this tuple: a lookup costs ~30 ns, where
# building a ``pq.TransactionStatus`` and mapping it through a dict costs several times
# that, and ``transaction_status`` runs on every release.
_TX_BY_LIBPQ: tuple[TxStatus, ...] = tuple(
    {
        pq.TransactionStatus.IDLE: TxStatus.IDLE,
        pq.TransactionStatus.ACTIVE: TxStatus.ACTIVE,
        pq.TransactionStatus.INTRANS: TxStatus.INTRANS,
        pq.TransactionStatus.INERROR: TxStatus.INERROR,
        pq.TransactionStatus.UNKNOWN: TxStatus.UNKNOWN,
    }[pq.TransactionStatus(i)]
    for i in range(len(pq.TransactionStatus))
)
_IDLE = int(pq.TransactionStatus.IDLE)
_UNKNOWN = int(pq.TransactionStatus.UNKNOWN)
_FATAL_ERROR = int(pq.ExecStatus.FATAL_ERROR)

_POLL_OK = int(pq.PollingStatus.OK)
_POLL_FAILED = int(pq.PollingStatus.FAILED)
_POLL_READING = int(pq.PollingStatus.READING)

CANCEL_TIMEOUT = 5.0
"""The longest a cancel request sent by the pool waits for the server to take it."""

_CLIENT_SIDE = ("isolation_level", "read_only", "deferrable")
_WRITE_EVENTS = select.POLLOUT | select.POLLERR | select.POLLHUP


class PsycopgDriver(LibpqDriver):
    """psycopg 3 as the pool sees it.

    ``conninfo`` and ``connect_kwargs`` are what you would pass to
    ``psycopg.Connection.connect`` (``connect_kwargs`` may hold libpq parameters as well
    as ``prepare_threshold``, ``row_factory``...). ``autocommit`` and
    ``application_name`` define the baseline every connection is opened in and that
    :meth:`reset` restores; they, and the pool's connect timeout, win over the same keys in
    ``connect_kwargs``.
    """

    name: str = "psycopg"
    operational_error: type[Exception] = psycopg.OperationalError

    def socket(self, conn: Any) -> int:
        return int(conn.pgconn.socket)

    def server_version(self, conn: Any) -> int:
        return int(conn.pgconn.server_version)

    def libpq_version(self) -> int:
        return pq.version()

    def connect(self, timeout: float) -> psycopg.Connection[Any]:
        """Open a connection in the baseline state.

        ``timeout`` becomes libpq's ``connect_timeout``, which counts whole seconds and is
        at least 2 (libpq's rule, which psycopg copies): ``timeout=0.5`` really waits up to
        2 s. With several hosts in ``conninfo`` the timeout applies to each attempt.
        The connection gets :data:`~connguard.drivers.libpq.TCP_KEEPALIVES` unless
        ``conninfo`` or ``connect_kwargs`` set any of them, and the driver's own set-up
        (:meth:`~connguard.drivers.libpq.LibpqDriver.setup_sql`). A connect error leaves
        without the failed attempt's ``pgconn`` (see :func:`forget_attempt`).
        """
        params = {**self._keepalives(), **self.connect_kwargs}
        if self.application_name is not None:
            params["application_name"] = self.application_name
        params["connect_timeout"] = max(1, math.ceil(timeout))
        params["autocommit"] = self.autocommit
        try:
            conn = psycopg.Connection.connect(self.conninfo, **params)
        except psycopg.Error as exc:
            forget_attempt(exc)
            raise
        try:
            self.set_up(conn)
        except BaseException:
            self.close(conn)
            raise
        return conn

    def _keepalives(self) -> dict[str, int]:
        try:
            user = conninfo_to_dict(self.conninfo)
        except psycopg.Error:  # a malformed conninfo: connect() reports it as before
            return {}
        return tcp_keepalives({**user, **self.connect_kwargs}, pq.version())

    def close(self, conn: psycopg.Connection[Any]) -> None:
        """Close politely (libpq sends Terminate). Never raises: the pool calls this on
        connections it already knows to be broken."""
        try:
            conn.close()
        except Exception:
            pass

    def is_alive(self, conn: psycopg.Connection[Any]) -> bool:
        """True unless ``conn`` is certainly unusable; no round trip (~0.7 µs).

        libpq reports ``PQTRANS_UNKNOWN`` exactly when the connection is not
        ``CONNECTION_OK``, which covers ``conn.closed`` and ``conn.broken`` in one cheap
        read. Then the socket is polled without waiting: on an idle connection the
        server has nothing to say, so readable data means it hung up or sent an error
        before going away (``pg_terminate_backend``, ``idle_session_timeout``, a server
        shutdown). An unsolicited NOTIFY or NOTICE also makes the socket readable and so
        yields False: a harmless false negative that costs one reconnect.
        """
        try:
            pgconn = conn.pgconn
            if pgconn.transaction_status == _UNKNOWN:
                return False
            return not socket_readable(pgconn.socket)
        except Exception:
            return False

    ping_bounded = True
    """Its ping keeps its timeout (libpq's non-blocking API): the pool calls it inline."""

    def ping(self, conn: psycopg.Connection[Any], timeout: float) -> None:
        """One round trip, an empty query, bounded by ``timeout`` seconds.

        The query goes through libpq's non-blocking API directly instead of
        ``conn.execute``: that way ``timeout`` bounds the whole exchange (a dead network or
        a stopped server cannot hang the pool), and psycopg does not open a transaction
        around it when autocommit is off. An empty query is answered even inside a failed
        transaction and changes no state, so the transaction status is left as it was.

        Raises ``psycopg.OperationalError`` on failure or timeout; after a timeout the
        query is still in flight and the connection must be closed.
        """
        deadline = time.monotonic() + timeout
        if not conn.lock.acquire(timeout=max(timeout, 0.0)):
            raise psycopg.OperationalError(f"ping: connection busy for {timeout:g}s")
        try:
            pgconn = conn.pgconn
            if pgconn.transaction_status == _UNKNOWN:
                raise psycopg.OperationalError("ping: the connection is closed or lost")
            pgconn.send_query(b"")
            while pgconn.flush():
                _wait(pgconn.socket, _WRITE_EVENTS, deadline, timeout)
            pgconn.consume_input()
            while pgconn.is_busy():
                _wait(pgconn.socket, READ_EVENTS, deadline, timeout)
                pgconn.consume_input()
            error: bytes | None = None
            while (result := pgconn.get_result()) is not None:
                if result.status == _FATAL_ERROR and error is None:
                    error = result.error_message or b"unknown error"
            if error is not None:
                message = error.decode("utf-8", "replace").strip()
                raise psycopg.OperationalError(f"ping failed: {message}")
        finally:
            conn.lock.release()

    def transaction_status(self, conn: psycopg.Connection[Any]) -> TxStatus:
        """Map libpq's ``PQtransactionStatus``; no I/O, ~50 ns.

        It reflects what libpq last heard: a backend terminated while the connection sat
        idle still reads IDLE until something (``is_alive``, a query) notices.
        """
        try:
            return _TX_BY_LIBPQ[conn.pgconn.transaction_status]
        except IndexError:
            return TxStatus.UNKNOWN

    def rollback(self, conn: psycopg.Connection[Any]) -> None:
        """Roll back the open transaction, keeping session state.

        ``conn.rollback()`` is enough even under autocommit with a hand-written
        ``BEGIN``: psycopg 3 decides from libpq's transaction status, not from its own
        bookkeeping (unlike psycopg2). Going through psycopg rather than sending
        ``ROLLBACK`` keeps its prepared-statement cache consistent.
        """
        conn.rollback()

    def cancel(self, conn: psycopg.Connection[Any]) -> None:
        """Cancel the running statement from any thread (libpq's cancel request, sent
        over its own connection; bounded by :data:`CANCEL_TIMEOUT` with libpq 17 or
        later). Nothing once the connection is closed or broken (psycopg's rule): the
        pool's own cancel for ``socket_timeout`` uses :meth:`prepare_cancel`. Never
        raises."""
        try:
            cancel_safe = getattr(conn, "cancel_safe", None)
            if cancel_safe is not None:  # psycopg >= 3.2: no blocking without a bound
                cancel_safe(timeout=CANCEL_TIMEOUT)
            else:
                conn.cancel()
        except Exception:
            pass

    def prepare_cancel(self, conn: psycopg.Connection[Any]) -> Callable[[], None] | None:
        """Take what a cancel request for ``conn`` needs, now, and return a function
        that sends it, from any thread, bounded by :data:`CANCEL_TIMEOUT`, even once
        the connection is closed or broken; None where libpq cannot bound one.

        For ``socket_timeout``: the pool takes the handle before it shuts the socket
        down. Once the blocked call has woken on the shutdown, libpq has marked the
        connection bad and dropped its socket, and a cancel taken then is nothing
        (``cancel_safe()`` returns at once, ``PQcancelCreate`` and ``PQgetCancel``
        refuse), while a backend waiting on a lock does not read its socket and
        stays, holding the locks its transaction took. ``PQcancelCreate`` (libpq 17,
        ``pgconn.cancel_conn()``) copies the key and the server's address, no I/O, and
        the request then goes over its own non-blocking connection, polled here with a
        deadline: a black-holed network cannot hold the calling thread. Older libpq
        has only ``PQcancel``, which blocks without a bound: None then."""
        if pq.version() < 170000:
            return None
        try:
            cancel_conn = conn.pgconn.cancel_conn()
        except Exception:
            return None
        return functools.partial(_send_cancel, cancel_conn, CANCEL_TIMEOUT)

    def reset(self, conn: psycopg.Connection[Any], then: str = "") -> None:
        """Roll back, discard all session state, run ``then``, restore autocommit: one
        round trip (two with a transaction open).

        The reset is ``DISCARD ALL`` spelled out (:data:`~connguard.drivers.session.RESET_SQL`,
        which includes ``CLOSE ALL``, so WITH HOLD cursors go too) so that ``then`` (the
        baseline set-up: time zone, role) shares its query string. A multi-statement
        string runs as one implicit transaction, so autocommit is switched on for it
        (no round trip) lest psycopg open a transaction in front of it.

        It also deallocates the statements psycopg prepared automatically
        (``prepare_threshold``), so psycopg's cache of them must be emptied or the next
        holder gets "prepared statement _pg3_N does not exist": ``prepare=False`` and
        :func:`_forget_prepared`.

        On failure the connection is in an undefined state and must be closed.
        """
        if conn.pgconn.transaction_status != _IDLE:
            conn.rollback()
        if not conn.autocommit:
            conn.autocommit = True
        conn.execute(self.reset_sql(then, conn).encode(), prepare=False)
        _forget_prepared(conn)
        # The transaction characteristics psycopg keeps on the client side.
        for attr in _CLIENT_SIDE:
            if getattr(conn, attr) is not None:
                setattr(conn, attr, None)
        if conn.autocommit != self.autocommit:
            conn.autocommit = self.autocommit


def _send_cancel(cancel_conn: Any, timeout: float) -> None:
    """Send the cancel request prepared in ``cancel_conn`` (a ``pq.PGcancelConn``) and
    wait for the server to take it, ``timeout`` seconds at most. Never raises."""
    deadline = time.monotonic() + timeout
    try:
        cancel_conn.start()
        while True:
            status = cancel_conn.poll()
            if status in (_POLL_OK, _POLL_FAILED):
                return
            events = READ_EVENTS if status == _POLL_READING else _WRITE_EVENTS
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            poller = select.poll()
            poller.register(cancel_conn.socket, events)
            if not poller.poll(math.ceil(remaining * 1000)):
                return
    except Exception:
        pass
    finally:
        try:
            cancel_conn.finish()
        except Exception:
            pass


def _forget_prepared(conn: psycopg.Connection[Any]) -> None:
    """Empty psycopg's prepared-statement cache after the server dropped the statements.

    There is no public API for this: it uses the connection's private ``_prepared``
    manager (psycopg 3.1 to 3.3), defensively so a future psycopg that reorganises it
    does not break ``reset``; ``test_reset_forgets_prepared_statements`` catches that.
    Besides clearing the cache, ``clear()`` queues a ``DEALLOCATE ALL`` for the next
    query, and the manager may hold names of evicted statements to deallocate: the server
    has none left, so that queue is emptied to spare a round trip (or an error).
    """
    manager: Any = getattr(conn, "_prepared", None)
    clear = getattr(manager, "clear", None)
    if clear is None:
        return
    clear()
    to_flush = getattr(manager, "_to_flush", None)
    if to_flush is not None:
        to_flush.clear()


def _wait(fd: int, events: int, deadline: float, timeout: float) -> None:
    """Block until ``fd`` is ready for ``events`` or raise once ``deadline`` has passed."""
    remaining = deadline - time.monotonic()
    if remaining > 0:
        poller = select.poll()
        poller.register(fd, events)
        if poller.poll(math.ceil(remaining * 1000)):
            return
    raise psycopg.OperationalError(f"ping: no answer within {timeout:g}s")
