"""A lease: one checkout of one connection, and the fence that enforces it.

Only the lease's holder may reach the physical connection, and only while the lease
is active. Every use is bracketed: :meth:`Lease.enter` checks the fence, marks the
lease *busy*, then checks the fence again; :meth:`Lease.exit` unmarks it, then looks
whether the lease ended meanwhile. Ending a lease (:meth:`Pool.release`, from any
thread) sets the fence, then counts the uses in progress. Either order sees the other's
first step, so a use either started before the end (and the end waits for it: the
running statement is cancelled, and the thread that was using the connection finishes
the release when it lets go) or fails with :class:`LeaseEnded`. The uses take no lock
(see :meth:`Lease.enter`); who finishes an ending lease is decided under the lease's
lock. No thread ever does I/O on a connection another thread may be using (libpq
forbids it, and closing a socket under a running statement frees a slot while the
server still runs the statement).

:attr:`Lease.connection` is a :class:`FencedConnection`: a proxy whose every method
call (and every cursor it makes) goes through the fence, in the manner of SQLAlchemy's
``_ConnectionFairy``. A layer that fences its own uses (the Django wrapper brackets
each cursor call) takes :attr:`Lease.raw`. The pool holds leases weakly: a lease that
nothing references any more (its holder dropped it without releasing) is noticed by a
weak-reference callback and its connection taken back, never one that somebody can
still reach through the lease or its proxy.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .driver import TxStatus
from .errors import LeaseEnded
from .resetter import resetter

if TYPE_CHECKING:
    from .engine import Pool

_getframe = sys._getframe
_ACTIVE = TxStatus.ACTIVE


ENDINGS: dict[str | None, str] = {
    None: "it was released",
    "revoked": "it was released by another thread while this code was using it, and its "
    "statement was cancelled (revoked)",
    "orphaned": "the request or scope it belonged to has ended, and the pool took it back",
    "reclaimed": "the thread that took it has died, and the pool reclaimed it (reclaim=True)",
}
"""What :class:`LeaseEnded` says, by :attr:`Lease.ended_by`."""


class _Conn:
    """One physical connection and what the pool knows of it."""

    __slots__ = (
        "abandoned",
        "created_at",
        "expires_at",
        "idle_since",
        "owner",
        "pid",
        "raw",
        "stack",
        "suspect",
        "tested_at",
    )

    def __init__(self, raw: Any, now: float, expires_at: float, pid: int) -> None:
        self.raw = raw
        self.created_at = now
        self.expires_at = expires_at  # retire at or after this instant (inf: never)
        self.idle_since = now  # when it last became idle (or was opened)
        # When it was last known alive: opened, or passed a liveness test or a ping
        # (liveness_after_idle counts from here).
        self.tested_at = now
        self.pid = pid  # the process that opened it; see fork safety
        # The last lease's owner and acquire site: what a report about a lease its
        # holder dropped can still say once the Lease object is gone.
        self.owner: object = None
        self.stack: tuple[Any, ...] = ()
        # Idle when another connection of the pool was found dead: a restart or a
        # failover kills them all at once, and a dead network sends no goodbye the
        # cheap liveness test could see, so it gets a round-trip ping before reuse.
        self.suspect = False
        # Driver iterators (psycopg 3's stream()) that a holder stopped reading once
        # its lease was ending (see fenced_rows): kept from being finished until the
        # pool has closed the connection or let go of it (Pool._close_conn).
        self.abandoned: list[Iterator[Any]] | None = None


class Lease:
    """One checkout of one connection, by one holder.

    A lease ends exactly once: when released (from any thread), when its pool closes,
    or when it is taken back. After that :attr:`connection` and :attr:`raw` raise
    :class:`LeaseEnded`, so a holder that kept the lease cannot reach a connection that
    is now someone else's.
    """

    __slots__ = (
        "__weakref__",
        "_busy",
        "_cancelling",
        "_conn",
        "_ending",
        "_finishing",
        "_guard",
        "_left_active",
        "_pool",
        "_ref",
        "_seen_at",
        "_seen_uses",
        "_uses",
        "acquired_at",
        "cleanup",
        "dirty",
        "ended_by",
        "leak_reported",
        "owner",
        "released_at",
        "reset_requested",
        "server_cursors",
        "stack",
        "thread_id",
    )

    def __init__(
        self, pool: Pool, conn: _Conn, acquired_at: float, owner: object, thread_id: int
    ) -> None:
        self._pool = pool
        self._conn: _Conn | None = conn  # None once the lease has ended
        # Guards the ending's flags (_ending, _cancelling, _finishing): who revokes,
        # who finishes. Uses in progress do not take it (see enter()).
        self._guard = threading.Lock()
        # Uses in progress (enter() without exit()), one item each: a list, because
        # append() and pop() are each one step no other thread can split.
        self._busy: list[None] = []
        self._ending = False  # the fence: set once, when the lease starts to end
        # A revoking thread is sending a cancel: the release must wait for it, or the
        # cancel could reach the connection's next holder.
        self._cancelling = False
        # A thread has claimed the release's end (Pool._finish_unused): only it ends it.
        self._finishing = False
        # The holder's last use through the fence, once the lease was ending, left
        # the connection ACTIVE: a result half read (a stream revoked mid-fetch, or
        # ended between fetches) that nothing of the holder's will read again, so
        # the release cancels and closes it (see _last_out, Pool._finish_release).
        self._left_active = False
        # Uses begun so far, and what housekeeping last saw of them (socket_timeout:
        # a use in progress whose count has not moved since _seen_at is blocked).
        self._uses = 0
        self._seen_uses = -1
        self._seen_at = 0.0
        self.acquired_at = acquired_at
        self.owner = owner  # the scope (request, task...) that holds it, if any
        self.thread_id = thread_id  # the thread that asked for it (its name: on demand)
        self.stack: tuple[Any, ...] = ()  # (code, offset) pairs of the acquiring code
        self.leak_reported = False  # set once by housekeeping past leak_threshold
        # True once the holder may have changed session state (reset policy "auto").
        self.dirty = False
        self.reset_requested = False  # release(reset=True): a full reset, whatever the policy
        # Keys of server-side cursors open on the connection (None: none yet). A lease
        # with one is pinned: an early release must not take the connection away.
        self.server_cursors: set[int] | None = None
        self._ref: Any = None  # the pool's weak reference, set by the pool
        # Why the lease ended, when it was not its holder's plain release: "revoked",
        # "orphaned", "reclaimed" (see ENDINGS); LeaseEnded's message says it.
        self.ended_by: str | None = None
        # When the pool took the connection back (its clock), and what that took:
        # None (given back as it was), "rollback", "reset", or the reason it was
        # closed instead. For reports of one request (the debug-toolbar panel).
        self.released_at: float | None = None
        self.cleanup: str | None = None

    # ---------------------------------------------------------------- the fence

    def enter(self) -> Any:
        """Begin a use: return the driver's connection, or raise :class:`LeaseEnded`.

        Every ``enter()`` must be paired with :meth:`exit` (``try/finally``), also when
        the use fails: the lease cannot end while a use is in progress. (A signal's
        exception raised after the count and before the caller's ``try`` would strand
        the count, as it always could between ``enter()`` and a ``try``; CPython runs
        handlers only at calls and loops, and warm code makes none there.)

        No lock: a query makes three uses (cursor, execute, fetch), and a lock's
        ``with`` costs more than the rest of the fence. The use is counted first
        (one ``append``), the fence read after; :meth:`Pool.release` sets the fence
        first and counts after. So if the release counted no use, this use reads the
        fence set and backs out; if this use read the fence unset, the release
        counted it and waits for its :meth:`exit`.
        """
        conn = self._conn
        # Read before counting too: a use of a lease that has already ended is never
        # counted, so it cannot be mistaken for one in progress (by housekeeping's
        # abort, or by a release), and a signal's exception cannot strand its count.
        if conn is not None and not self._ending:
            # Housekeeping's progress mark (socket_timeout), moved before the use is
            # counted: a use counted with the mark unmoved would look like the last
            # one housekeeping saw, blocked since. Two threads using one lease at
            # once may lose an increment; the mark still moves.
            self._uses += 1
            busy = self._busy
            busy.append(None)
            # The fence again, now the use is counted. Only the fence: a holder's
            # lease loses its connection only after the fence is set.
            if not self._ending:
                return conn.raw
            # A release set the fence in between, and may have counted this use and
            # left the finish to it.
            # (mypy takes the fence for the value read above; another thread sets it.)
            busy.pop()  # type: ignore[unreachable]
            if not busy:
                self._last_out()
        raise self._ended()

    def exit(self) -> None:
        """End a use begun by :meth:`enter`. If the lease was released meanwhile (from
        another thread), the last use out finishes the release, in this thread."""
        busy = self._busy
        busy.pop()
        if self._ending and not busy:
            self._last_out()

    def _last_out(self) -> None:
        """The lease is ending and no use is counted: finish its release, unless a
        revoke's cancel is still being sent or another thread has claimed the finish
        (decided again, and claimed, under the lease's lock: a hint here)."""
        conn = self._conn
        if conn is None:
            return
        pool = self._pool
        # The holder's fenced uses are over: how they left the connection is final
        # for them (libpq's own status, no I/O). ACTIVE now is a result left half
        # read, not a statement outside the fence that will end on its own.
        try:
            if pool.driver.transaction_status(conn.raw) is _ACTIVE:
                self._left_active = True
        except Exception:
            pass  # in doubt, the release treats ACTIVE as it always did
        if self._cancelling:
            return
        if pool._lock.locked() or self._guard.locked() or pool._abort_guard.locked():
            # Possibly this very thread holds one: a use abandoned in a generator
            # that the garbage collector closes during an allocation under the
            # pool's lock, under this lease's (housekeeping's abort calls the
            # driver there), or under the pool's _abort_guard (a release's reset
            # takes it). Finishing here could deadlock; the resetter finishes.
            resetter().submit(pool, self, None)
        else:
            pool._finish_unused(self)

    def _abandon(self, conn: _Conn, rows: Iterator[Any]) -> None:
        """The holder of this ending lease has left a fenced stream (see
        :func:`fenced_rows`). If the connection is ACTIVE (the result half read),
        nothing will end that statement: the release cancels and closes it
        (``_left_active``), and the driver's iterator is kept on the connection
        until then. Otherwise it is let go here (nothing left to drain)."""
        try:
            active = self._pool.driver.transaction_status(conn.raw) is _ACTIVE
        except Exception:
            active = False
        if not active:
            return
        self._left_active = True
        if conn.abandoned is None:
            conn.abandoned = [rows]
        else:
            conn.abandoned.append(rows)

    @contextmanager
    def using(self) -> Iterator[Any]:
        """``with lease.using() as raw:``: one fenced use of the driver's connection."""
        raw = self.enter()
        try:
            yield raw
        finally:
            self.exit()

    def _ended(self) -> LeaseEnded:
        why = ENDINGS.get(self.ended_by, ENDINGS[None])
        return self._pool._error(  # type: ignore[return-value]
            LeaseEnded, f"this lease has ended: {why}; acquire a new one to use the database"
        )

    # ---------------------------------------------------------------- access

    @property
    def pool(self) -> Pool:
        return self._pool

    @property
    def active(self) -> bool:
        """True until the lease starts to end."""
        return self._conn is not None and not self._ending

    @property
    def connection(self) -> FencedConnection:
        """The connection, through the fence (see :class:`FencedConnection`)."""
        if not self.active:
            raise self._ended()
        return FencedConnection(self)

    @property
    def raw(self) -> Any:
        """The driver's connection itself, for a layer that brackets each use with
        :meth:`enter`/:meth:`exit` (or :meth:`using`). Raises :class:`LeaseEnded` once
        the lease has ended."""
        conn = self._conn
        if conn is None or self._ending:
            raise self._ended()
        return conn.raw

    def peek(self) -> Any:
        """The driver's connection while the lease is active, else None (no raise).

        While a use is in progress (inside :meth:`enter`/:meth:`exit`) the connection
        is still returned even if a release was requested meanwhile: the lease ends
        when that use does."""
        conn = self._conn
        # A use counted after a release has claimed the lease (_finishing) is one
        # backing out, not in progress: the connection is about to be handed on.
        if conn is None or (self._ending and (self._finishing or not self._busy)):
            return None
        return conn.raw

    def note_statement(self, sql: Any) -> None:
        """Tell the lease which statement its holder runs: with reset policy
        ``"auto"``, one that may change session state makes the release reset it."""
        if not self.dirty and self._pool._changes_session(sql):
            self.dirty = True

    @property
    def pinned(self) -> bool:
        """True while a server-side cursor or a transaction is open on the connection:
        handing it on now would break the holder's work in progress."""
        if self.server_cursors:
            return True
        raw = self.peek()
        if raw is None:
            return False
        return self._pool._in_transaction(raw)

    def release(self, *, reset: bool = False) -> None:
        """Give the connection back; see :meth:`Pool.release`."""
        if reset:
            self._pool.release(self, reset=True)
        else:
            self._pool.release(self)

    # ---------------------------------------------------------------- reporting

    @property
    def thread(self) -> threading.Thread | None:
        """The thread that acquired the lease, or None once it has ended."""
        for thread in threading.enumerate():
            if thread.ident == self.thread_id:
                return thread
        return None

    @property
    def thread_name(self) -> str:
        thread = self.thread
        return thread.name if thread is not None else f"thread {self.thread_id} (ended)"

    def where(self) -> list[str]:
        """Where the lease was acquired: ``file:line in function``, innermost first."""
        return where(self.stack)

    def __enter__(self) -> FencedConnection:
        return self.connection

    def __exit__(self, *exc: object) -> None:
        self._pool.release(self)

    def __repr__(self) -> str:
        state = "active" if self.active else "ended"
        return f"<Lease {state} pool={self._pool.name!r} thread={self.thread_name!r}>"


class FencedConnection:
    """The leased connection, reachable only through the lease's fence.

    Attribute reads pass through; every method call is one fenced use (it raises
    :class:`LeaseEnded` once the lease has ended, and the lease cannot end under it);
    cursors come back as :class:`FencedCursor`. It keeps the lease alive: a caller
    that holds only this proxy still holds the lease, so the pool never takes it back
    from under them.
    """

    __slots__ = ("_lease",)

    def __init__(self, lease: Lease) -> None:
        object.__setattr__(self, "_lease", lease)

    @property
    def lease(self) -> Lease:
        return self._lease  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        lease: Lease = object.__getattribute__(self, "_lease")
        value = getattr(lease.raw, name)
        if callable(value):
            return _fenced_call(lease, name)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        """A connection attribute (``autocommit``, ``read_only``, ``isolation_level``...)
        set by the holder: the release restores the baseline with a full reset."""
        lease: Lease = object.__getattribute__(self, "_lease")
        raw = lease.enter()
        try:
            setattr(raw, name, value)
            lease.reset_requested = True
        finally:
            lease.exit()

    def __enter__(self) -> FencedConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        """Leaving ``with conn:`` commits or rolls back, as the driver would."""
        lease: Lease = object.__getattribute__(self, "_lease")
        raw = lease.enter()
        try:
            if exc[0] is None:
                raw.commit()
            else:
                raw.rollback()
        finally:
            lease.exit()

    def __repr__(self) -> str:
        lease: Lease = object.__getattribute__(self, "_lease")
        return f"<FencedConnection {lease!r}>"


class FencedCursor:
    """A driver cursor whose every call and every fetch goes through the fence."""

    __slots__ = ("_cursor", "_lease")

    def __init__(self, lease: Lease, cursor: Any) -> None:
        object.__setattr__(self, "_lease", lease)
        object.__setattr__(self, "_cursor", cursor)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._cursor, name)
        if not callable(value):
            return value
        lease: Lease = self._lease

        def call(*args: Any, **kwargs: Any) -> Any:
            if name in _SQL_METHODS:
                _note_call(lease, name, args, kwargs)
            lease.enter()
            try:
                result = value(*args, **kwargs)
            finally:
                lease.exit()
            if result is self._cursor:
                return self
            if isinstance(result, Generator):  # psycopg 3's cursor.stream()
                return fenced_rows(lease, result)
            return result

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._cursor, name, value)

    def __iter__(self) -> Iterator[Any]:
        """The driver's own iterator (which fetches in batches on a server-side
        cursor), each step one fenced use."""
        lease: Lease = self._lease
        lease.enter()
        try:
            rows = iter(self._cursor)
        finally:
            lease.exit()
        yield from fenced_rows(lease, rows)

    def __enter__(self) -> FencedCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        lease: Lease = self._lease
        if not lease.active:
            return  # the cursor went with the connection's session
        lease.enter()
        try:
            self._cursor.close()
        finally:
            lease.exit()


def fenced_rows(lease: Lease, rows: Iterator[Any]) -> Iterator[Any]:
    """Rows from a driver iterator (a cursor, psycopg 3's ``stream()``), each step one
    fenced use: the driver keeps its own batching.

    Left once the lease is ending (fenced: ``LeaseEnded``; or closed by its reader),
    the driver's iterator is handed to the connection, not dropped here: psycopg 3's
    stream, finished half read, drains the result (I/O, outside the fence) while the
    pool may be cancelling and closing that connection in another thread. It is
    finished once the pool has closed the connection, and then does nothing."""
    conn = lease._conn
    try:
        while True:
            lease.enter()
            try:
                row = next(rows, _END)
            finally:
                lease.exit()
            if row is _END:
                return
            yield row
    finally:
        if lease._ending and conn is not None:
            lease._abandon(conn, rows)


_END = object()
_SQL_METHODS = frozenset(
    {"execute", "executemany", "callproc", "copy", "copy_expert", "stream", "mogrify"}
)
_SESSION_METHODS = frozenset(
    {"set_session", "set_client_encoding", "set_isolation_level", "tpc_begin", "notifies"}
)


def _note_call(lease: Lease, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Reset policy "auto": show the lease the statement of a cursor or connection call
    (positional or by keyword); a procedure may do anything to the session."""
    if name == "callproc":
        lease.dirty = True
        return
    sql = args[0] if args else kwargs.get("query", kwargs.get("sql", kwargs.get("statement")))
    if sql is not None:
        lease.note_statement(sql)


def _fenced_call(lease: Lease, name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        if name in _SQL_METHODS:
            _note_call(lease, name, args, kwargs)
        elif name in _SESSION_METHODS or (name == "cursor" and (args or kwargs.get("name"))):
            # psycopg2's set_session()/set_client_encoding(), a named (server-side,
            # maybe WITH HOLD) cursor: the next holder must get a full reset.
            lease.reset_requested = True
        raw = lease.enter()
        try:
            result = getattr(raw, name)(*args, **kwargs)
        finally:
            lease.exit()
        if name == "cursor" or (name == "execute" and hasattr(result, "fetchone")):
            return FencedCursor(lease, result)
        return result

    return call


# ---------------------------------------------------------------- acquire sites


def capture_stack(depth: int, skip: int = 2) -> tuple[Any, ...]:
    """``depth`` (code, instruction offset) pairs from ``skip`` frames up, outwards.

    Code objects and offsets only: no frame is kept alive, and the offset becomes a
    line number (:func:`line_of`) only when a report needs it; ``f_lineno`` would be
    computed from the line table at every acquire.
    """
    frame: Any = _getframe(skip)
    out: list[Any] = []
    while frame is not None and depth:
        out.append(frame.f_code)
        out.append(frame.f_lasti)
        frame = frame.f_back
        depth -= 1
    return tuple(out)


def line_of(code: Any, offset: int) -> int | str:
    """The source line of instruction ``offset`` in ``code``."""
    for start, end, line in code.co_lines():
        if start <= offset < end and line is not None:
            return int(line)
    return "?"


def where(stack: tuple[Any, ...]) -> list[str]:
    """``file:line in function`` for each recorded frame, innermost first."""
    return [
        f"{stack[i].co_filename}:{line_of(stack[i], stack[i + 1])} in {stack[i].co_name}"
        for i in range(0, len(stack), 2)
    ]


def describe_owner(owner: object) -> str:
    """One line naming a lease's owner (a scope describes itself)."""
    describe = getattr(owner, "describe", None)
    return str(describe()) if callable(describe) else repr(owner)


def first_site(sites: list[str]) -> str:
    """The innermost recorded acquire site, for one-line reports."""
    return sites[0] if sites else "(not recorded: stack_depth=0)"
