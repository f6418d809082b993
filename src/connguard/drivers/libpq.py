"""What the psycopg 3 and psycopg2 drivers share: both are libpq underneath.

The connect settings, forgetting a connection after ``fork()`` without telling the
server, and the zero-timeout poll behind the cheap liveness test.
"""

from __future__ import annotations

import os
import select
from collections.abc import Mapping
from typing import Any

from .session import RESET_SQL, changes_session

# POLLERR/POLLHUP/POLLNVAL are always reported; naming them documents the intent.
READ_EVENTS = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


def socket_readable(fd: int) -> bool:
    """True when ``fd`` has something to read right now (never waits)."""
    poller = select.poll()
    poller.register(fd, READ_EVENTS)
    return bool(poller.poll(0))


class LibpqDriver:
    """Base of the libpq drivers: their settings and :meth:`drop`.

    ``conninfo`` and ``connect_kwargs`` are what you would pass to the driver's own
    connect function. ``autocommit`` and ``application_name`` define the baseline every
    connection is opened in and that ``reset`` restores; they, and the pool's connect
    timeout, win over the same keys in ``connect_kwargs``.
    """

    def __init__(
        self,
        conninfo: str = "",
        *,
        connect_kwargs: Mapping[str, Any] | None = None,
        autocommit: bool = True,
        application_name: str | None = None,
    ) -> None:
        self.conninfo = conninfo
        # A private copy: the caller may mutate its mapping later, and connect() must
        # not write the per-call keys into it either.
        self.connect_kwargs: dict[str, Any] = dict(connect_kwargs or {})
        self.autocommit = autocommit
        self.application_name = application_name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} autocommit={self.autocommit} app={self.application_name!r}>"

    changes_session = staticmethod(changes_session)

    def reset_sql(self, then: str = "") -> str:
        """The one query string that resets a session and re-applies ``then``."""
        return f"{RESET_SQL}; {then}" if then else RESET_SQL

    def socket(self, conn: Any) -> int:
        """The connection's socket descriptor, or -1 when libpq holds none."""
        raise NotImplementedError

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
