"""What the psycopg 3 and psycopg2 drivers share: both are libpq underneath.

The connect settings, forgetting a connection after ``fork()`` without telling the
server, and the zero-timeout poll behind the cheap liveness test.
"""

from __future__ import annotations

import ctypes
import os
import select
import socket as _socket
import threading
from collections.abc import Collection, Mapping
from typing import Any

from .session import RESET_SQL, changes_session

# POLLERR/POLLHUP/POLLNVAL are always reported; naming them documents the intent.
READ_EVENTS = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


class _PollFd(ctypes.Structure):
    _fields_ = (("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short))


def _libc_poll() -> Any:
    """libc's ``poll`` called *without releasing the GIL* (``ctypes.PyDLL``), or None.

    A zero-timeout poll never blocks, so releasing the GIL around it buys nothing and
    costs a great deal under many threads: the thread that let go must queue to get
    the GIL back (up to the 5 ms switch interval) while it holds a freshly leased
    connection, so the idle list runs dry and every other acquire becomes a queued
    hand-off. Measured with 32 threads on the engine's no-query cycle: 0.12x
    psycopg_pool's throughput with ``select.poll``, against parity without the test.
    """
    try:
        poll = ctypes.PyDLL(None).poll
    except (AttributeError, OSError):  # no libc poll (Windows): select.poll then
        return None
    poll.argtypes = (ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int)
    poll.restype = ctypes.c_int
    return poll


_poll = _libc_poll()
_local = threading.local()  # one pollfd per thread: no thread can change another's fd


def socket_readable(fd: int) -> bool:
    """True when ``fd`` has something to read right now (never waits, ~0.7 µs)."""
    if _poll is None:
        poller = select.poll()
        poller.register(fd, READ_EVENTS)
        return bool(poller.poll(0))
    try:
        pollfd, address = _local.pollfd
    except AttributeError:
        pollfd = _PollFd(0, READ_EVENTS, 0)
        address = ctypes.addressof(pollfd)
        _local.pollfd = (pollfd, address)
    pollfd.fd = fd
    # < 0 is an error (EBADF cannot happen with poll; EINTR cannot with timeout 0):
    # report it as readable, so the connection is tested the slow way or dropped.
    return bool(_poll(address, 1, 0))


TCP_KEEPALIVES: Mapping[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
"""The TCP settings every connection gets unless the user chose any of them.

libpq turns keepalives on by default but leaves the timings to the kernel: Linux
probes an idle connection only after 2 hours, then 9 times 75 s apart, so a server
that vanished without a word (a failover, a dead host, a dropped NAT entry or
firewall state) is noticed after 2 h 11 min, while requests wait on the dead socket
and idle pooled connections look healthy. With these values an idle connection to a
vanished server is known dead after 30 + 3 x 10 = 60 s, and the pool's zero-timeout
liveness test sees the socket error at the next checkout. ``tcp_user_timeout``
bounds the other case, data sent and never acknowledged (a statement sent into a
black hole): 30 s, after which the kernel drops the connection and the caller gets
an error instead of waiting for TCP's own retransmission limit (about 15 minutes).
Neither fires on a healthy connection waiting for a long query: the server's kernel
acknowledges probes however busy the backend is, and a sent statement is
acknowledged at once. A healthy idle connection costs one small probe and its
acknowledgement every 30 s (the 10 s interval applies only to unanswered probes),
which also keeps NAT and firewall state from expiring under an idle pooled
connection. libpq ignores all of these on Unix-domain sockets.
"""


def tcp_keepalives(user_keys: Collection[str], libpq_version: int) -> dict[str, int]:
    """The :data:`TCP_KEEPALIVES` to add to a connection whose own parameters (the
    conninfo's and the keyword arguments') are ``user_keys``.

    None when the user set any of them: a partial choice mixed with ours could pair
    values nobody chose together. None either when they name a ``service``, whose
    file may set them (explicit parameters would override it). ``tcp_user_timeout``
    only with libpq 12 or later, which older ones reject as an unknown option.
    """
    if "service" in user_keys or any(key in user_keys for key in TCP_KEEPALIVES):
        return {}
    params = dict(TCP_KEEPALIVES)
    if libpq_version < 120000:
        del params["tcp_user_timeout"]
    return params


def forget_attempt(exc: BaseException) -> None:
    """Drop the failed attempt's connection that psycopg 3 keeps on a connect error.

    ``exc.pgconn`` is a ``FinishedPGconn`` whose ``repr`` (and ``password``, and
    ``info``) show the password in clear; the pool keeps its last connect error and
    chains it to ``ConnectFailed``, so it would carry the password as long as the
    outage lasts. psycopg drops the same attribute itself when pickling the error.
    psycopg2's errors hold no connection: nothing to do.
    """
    if getattr(exc, "_pgconn", None) is not None:
        exc._pgconn = None  # type: ignore[attr-defined]


_REFUSAL_FATAL = (
    "password authentication failed",
    "authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
    "is not permitted to log in",
    "permission denied",
)
"""Start-up FATAL messages (English) of a server that answered and refused for good.
Anything else (too many connections, starting up, a pooler that cannot reach its
server, a translated message) counts as passing: waiting may help."""


class LibpqDriver:
    """Base of the libpq drivers: their settings and :meth:`drop`.

    ``conninfo`` and ``connect_kwargs`` are what you would pass to the driver's own
    connect function. ``autocommit`` and ``application_name`` define the baseline every
    connection is opened in and that ``reset`` restores; they, and the pool's connect
    timeout, win over the same keys in ``connect_kwargs``.

    ``client_connection_check_interval`` (seconds, or None) has each connection ask
    its server to check that often, while a statement runs, whether the client is
    still there (PostgreSQL's setting of that name, 14 and later): a backend whose
    client went away (``socket_timeout``'s abort shuts the socket down) then ends,
    and its transaction's locks go with it, even while it waits on a lock, when it
    reads nothing from the socket. Set with ``set_config()`` when the connection
    is opened and again in every reset (``DISCARD ALL`` takes it back), not as a
    startup option, which PgBouncer refuses; only where the server's own value is 0
    (a value chosen in ``postgresql.conf``, for the role, or in the conninfo's
    ``options`` wins), and not at all on servers older than 14.
    """

    def __init__(
        self,
        conninfo: str = "",
        *,
        connect_kwargs: Mapping[str, Any] | None = None,
        autocommit: bool = True,
        application_name: str | None = None,
        client_connection_check_interval: float | None = None,
    ) -> None:
        self.conninfo = conninfo
        # A private copy: the caller may mutate its mapping later, and connect() must
        # not write the per-call keys into it either.
        self.connect_kwargs: dict[str, Any] = dict(connect_kwargs or {})
        self.autocommit = autocommit
        self.application_name = application_name
        if client_connection_check_interval is not None and not (
            client_connection_check_interval >= 0.001
        ):
            raise ValueError(
                "client_connection_check_interval must be at least 0.001 s (or None), "
                f"got {client_connection_check_interval!r}"
            )
        self.client_connection_check_interval = client_connection_check_interval

    def __repr__(self) -> str:
        return f"<{type(self).__name__} autocommit={self.autocommit} app={self.application_name!r}>"

    changes_session = staticmethod(changes_session)

    def reset_sql(self, then: str = "", conn: Any = None) -> str:
        """The one query string that resets a session and re-applies ``then`` and the
        driver's own set-up of ``conn`` (:meth:`setup_sql`)."""
        own = self.setup_sql(conn) if conn is not None else ""
        tail = "; ".join(part for part in (then, own) if part)
        return f"{RESET_SQL}; {tail}" if tail else RESET_SQL

    def setup_sql(self, conn: Any) -> str:
        """What the driver itself sets on each connection, as SQL ("" for nothing):
        ``client_connection_check_interval`` when asked for and the server has it
        (14 or later), unless the server already sets one. Run when a connection is
        opened and in every reset's round trip. No I/O."""
        interval = self.client_connection_check_interval
        if interval is None or self.server_version(conn) < 140000:
            return ""
        millis = max(1, round(interval * 1000))
        return (
            f"SELECT set_config('client_connection_check_interval', '{millis}', false) "
            "WHERE current_setting('client_connection_check_interval', true) = '0'"
        )

    def set_up(self, conn: Any) -> None:
        """Run :meth:`setup_sql` on a new connection (one round trip, none when there is
        nothing to set), committed when the connection is not in autocommit."""
        sql = self.setup_sql(conn)
        if not sql:
            return
        with conn.cursor() as cur:
            cur.execute(sql)
        if not conn.autocommit:
            conn.commit()

    def server_version(self, conn: Any) -> int:
        """The server's version as libpq reports it (170002); no round trip."""
        raise NotImplementedError

    def socket(self, conn: Any) -> int:
        """The connection's socket descriptor, or -1 when libpq holds none."""
        raise NotImplementedError

    def libpq_version(self) -> int:
        """The version of the libpq the driver runs on, as libpq spells it (170002)."""
        raise NotImplementedError

    def refused(self, exc: BaseException) -> bool:
        """Whether a failed connect means the server answered and refused, so that
        retrying soon cannot help: authentication (SQLSTATE class 28), a database that
        does not exist (3D000), or a set-up statement that failed for the same kind of
        reason (a role that does not exist or may not be assumed: 22023, 42704,
        42501). Not a refusal: "too many clients" (53300) or a server starting up or
        shutting down (57P0x) will pass, and an error without a SQLSTATE (refused,
        timed out, unreachable) is the network's."""
        code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
        if isinstance(code, str):
            return code[:2] in ("28", "3D") or code in ("22023", "42704", "42501")
        # A FATAL during the start-up has no SQLSTATE in either driver, only the
        # server's message: only the known refusals count, in doubt it may pass.
        text = str(exc)
        return "FATAL:" in text and any(mark in text for mark in _REFUSAL_FATAL)

    def abort(self, conn: Any) -> None:
        """Shut the connection's socket down, from any thread, so a thread blocked
        reading from it returns at once with the driver's error ("server closed the
        connection unexpectedly"). For a server that stopped answering (a network
        black hole, a hung host), which no cancel request reaches.

        ``shutdown()`` acts on the socket, not on a descriptor: it is applied through
        a duplicate, so the connection's own descriptor is never closed here and its
        number cannot be reused under the thread that is blocked on it. Never raises.

        Not closed: a race with libpq dropping the connection by itself at that very
        moment (its socket died just then), after which the number read here may
        already name another socket. Both at once is rare; a socket duplicated at
        connect time would close it.
        """
        try:
            fd = self.socket(conn)
            if fd < 0:
                return
            dup = os.dup(fd)
        except Exception:
            return
        try:
            sock = _socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            return
        try:
            sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.close()  # closes the duplicate only

    def drop(self, conn: Any) -> None:
        """Free ``conn`` without a word to the server.

        In a forked child the socket is shared with the parent; ``PQfinish`` would send
        the Terminate message on it and the server would end the *parent's* session. The
        descriptor number is first pointed at ``/dev/null`` (``dup2``), which drops the
        child's reference to the socket without touching the socket itself; then the
        connection is closed: libpq frees its memory and its Terminate goes to
        ``/dev/null``, where ``send()`` fails harmlessly with ENOTSOCK (no SIGPIPE).

        Outside a fork this is an abortive close: the server sees EOF instead of
        Terminate. Never raises.
        """
        try:
            fd = self.socket(conn)
        except Exception:
            fd = -1  # already closed or lost: libpq owns no socket, plain close is safe
        if fd >= 0:
            try:
                devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                try:
                    os.dup2(devnull, fd, inheritable=False)
                finally:
                    os.close(devnull)
            except OSError:
                pass
        try:
            conn.close()
        except Exception:
            pass
