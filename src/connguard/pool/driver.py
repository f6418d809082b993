"""What the engine needs from a DB-API driver, and nothing more.

The engine (``connguard.pool``) never imports a driver. It sees a physical
connection only as an opaque object and asks a :class:`Driver` to act on it. One
module per driver in ``connguard.drivers`` implements this protocol; the test
suite implements it with a fake to test the engine's logic exhaustively.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol, runtime_checkable


class TxStatus(enum.Enum):
    """Where a connection stands with respect to a transaction.

    The names follow libpq's ``PQtransactionStatus`` because every driver can
    map onto them.
    """

    IDLE = "idle"
    """No transaction open: the connection may be handed to someone else."""
    ACTIVE = "active"
    """A statement is executing right now."""
    INTRANS = "intrans"
    """Idle inside a transaction block."""
    INERROR = "inerror"
    """Idle inside a failed transaction block."""
    UNKNOWN = "unknown"
    """The connection is bad (the server went away, the socket broke...)."""


@runtime_checkable
class Driver(Protocol):
    """A DB-API driver as the pool sees it.

    Every method may be called from any thread, but never concurrently for the
    same connection: the pool guarantees a connection has one holder at a time.
    No method is ever called while the pool's lock is held, so a method may block
    on the network.
    """

    name: str
    """Short name used in logs and stats (``"psycopg"``, ``"psycopg2"``...)."""

    operational_error: type[Exception]
    """The driver's DB-API ``OperationalError``.

    The pool's errors subclass it, so code that already catches the driver's
    (or Django's) ``OperationalError`` keeps working.
    """

    def connect(self, timeout: float) -> Any:
        """Open a new physical connection, giving up after ``timeout`` seconds.

        Raises the driver's own exception on failure. The connection is returned
        in its baseline state: autocommit as configured, no transaction open.
        """
        ...

    def close(self, conn: Any) -> None:
        """Close ``conn`` politely (the server is told). Never raises."""
        ...

    def drop(self, conn: Any) -> None:
        """Forget ``conn`` without telling the server.

        Used in a forked child for connections inherited from the parent:
        closing them would send libpq's Terminate message on a socket the parent
        still uses and end the parent's session. Never raises.
        """
        ...

    def is_alive(self, conn: Any) -> bool:
        """Cheap liveness test with no round trip.

        For example: an idle connection whose socket is readable has been hung
        up on by the server (or has an unsolicited error waiting). Returns False
        when the connection is certainly unusable.
        """
        ...

    def ping(self, conn: Any, timeout: float) -> None:
        """Make one round trip to the server; raise the driver's error if it fails.

        A driver whose ping keeps ``timeout`` sets a class attribute ``ping_bounded =
        True``; the pool calls it inline. Otherwise the pool runs the ping on a thread
        of its own and stops waiting at the caller's deadline."""
        ...

    def cancel(self, conn: Any) -> None:
        """Ask the server to cancel the statement running on ``conn``, from any thread.

        The one call the pool makes on a connection another thread may be using: it
        must be thread-safe (libpq's cancel request goes over a separate connection)
        and bounded in time. Never raises.
        """
        ...

    # Optional: ``refused(exc) -> bool``: a failed connect was the server's refusal
    # (bad credentials, no such database or role), so waiting callers fail at once.
    # Optional: ``prepare_cancel(conn) -> Callable[[], None] | None``: take, with no
    # I/O, what a cancel request for ``conn`` needs and return a function that sends
    # it from any thread, keeping a bound and letting other threads run, and that
    # still works after ``abort`` (None: no bounded cancel for this one). The pool
    # takes one before an abort and sends it after (``socket_timeout``).
    # Optional: ``abort(conn) -> None``: shut the connection's socket down from any
    # thread, so a thread blocked reading from it returns at once with the driver's
    # error (setting ``socket_timeout``). Without it a blocked call cannot be ended.

    def transaction_status(self, conn: Any) -> TxStatus:
        """Where ``conn`` stands; must not do I/O."""
        ...

    def reset(self, conn: Any) -> None:
        """Bring ``conn`` back to its baseline: roll back any open transaction and
        discard session state (``DISCARD ALL`` or equivalent) so the next holder
        sees a fresh session. Raise the driver's error if that fails.

        A driver may also offer ``changes_session(sql) -> bool``: whether a statement
        may change session state (reset policy ``"auto"``). Without it, every
        statement seen through the fence counts as one that may."""
        ...

    def rollback(self, conn: Any) -> None:
        """Roll back the open transaction, keeping session state. Raise on failure."""
        ...
