"""Housekeeping: what the process-wide housekeeping thread does to each pool.

Retire connections past their lifetime or idle past ``max_idle`` (never below
``min_size``), close idle connections found dead, refill to ``min_size``, abort calls
blocked past ``socket_timeout``, report leases held past ``leak_threshold``, and
take back leases nobody will return: released while a statement ran outside the
fence (finished once it ends), owned by a unit of work that has ended, collected
unreleased, or (``reclaim``) taken by a thread that has died. Never under a running
statement, never under the pool's lock.

A dormant pool (its process forked since its last acquire) keeps no ``min_size``:
``opening.warm_size_locked``.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import TYPE_CHECKING

from .driver import TxStatus
from .housekeeper import housekeeper
from .lease import Lease, _Conn, describe_owner, first_site, where
from .opening import request_open_locked, start_openers, warm_size_locked
from .resetter import resetter

if TYPE_CHECKING:
    from .engine import Pool

logger = logging.getLogger("connguard.pool")


# Set while this thread runs a housekeeping pass. A lease it takes back (orphaned,
# reclaimed) is released through Pool.release like any other, and the rollback or
# reset that needs goes to the resetter, as one made on an event loop does
# (Pool._release_dirty): the process's one housekeeping thread must never block on
# a dead network, or no pool's socket_timeout abort would run.
housekeeping_now = threading.local()


def housekeep(pool: Pool) -> None:
    """Retire old and surplus idle connections, refill to ``min_size``, report
    leases held past ``leak_threshold``, and take back leases nobody will return.
    Called by the housekeeping thread."""
    housekeeping_now.active = True
    try:
        _housekeep(pool)
    finally:
        housekeeping_now.active = False


def _housekeep(pool: Pool) -> None:
    cfg = pool.config
    now = pool._clock()
    retired: list[tuple[_Conn, str]] = []
    leaks: list[Lease] = []
    resetter().start_if_pending()  # its start failed: queued work must still run
    if pool._closed:
        _after_close(pool, now)
        return
    with pool._lock:
        surplus = pool._size - warm_size_locked(pool)
        max_idle = cfg.max_idle
        keep: list[_Conn] = []
        for conn in pool._idle:  # oldest-returned first
            if now >= conn.expires_at:
                retired.append((conn, pool._expired))
            elif max_idle is not None and surplus > 0 and now - conn.idle_since >= max_idle:
                retired.append((conn, "idle"))
                surplus -= 1
            else:
                keep.append(conn)
        if retired:
            pool._idle[:] = keep
            pool._closing += len(retired)
            for _conn, reason in retired:
                pool._n_closed[reason] += 1
        held = [lease for ref in pool._leases if (lease := ref()) is not None]
        stuck = _stuck_locked(held, cfg.socket_timeout, now)
        stalled = _stalled_restores_locked(pool, cfg.socket_timeout, now)
        idle_now = [(conn, conn.idle_since) for conn in pool._idle]
        threshold = cfg.leak_threshold
        if threshold is not None:
            for lease in held:
                if not lease.leak_reported and now - lease.acquired_at >= threshold:
                    lease.leak_reported = True
                    pool._n_leaks += 1
                    leaks.append(lease)
        openers = request_open_locked(pool)
    start_openers(pool, openers)
    for lease in leaks:
        logger.warning(
            "pool %r: lease held for %.1f s (leak_threshold=%s s) by thread %s for %s; "
            "acquired at %s",
            pool.name,
            now - lease.acquired_at,
            threshold,
            lease.thread_name,
            describe_owner(lease.owner),
            first_site(lease.where()),
        )
    for conn, _reason in retired:
        pool._close_conn(conn)
    for lease in stuck:
        abort_stuck(pool, lease)
    for conn in stalled:
        abort_stalled_restore(pool, conn)
    sweep_idle(pool, idle_now)
    take_back_dropped(pool)
    take_back(pool, held)


def _stuck_locked(held: list[Lease], limit: float | None, now: float) -> list[Lease]:
    """Leases whose use in progress has not moved for ``limit`` seconds
    (``socket_timeout``). A use is one call into the driver; the lease counts the
    uses begun, so a count unchanged since housekeeping first saw it busy means the
    same call has been blocked since at least then."""
    if limit is None:
        return []
    stuck: list[Lease] = []
    for lease in held:
        if not lease._busy:
            continue
        if lease._uses != lease._seen_uses:
            lease._seen_uses = lease._uses
            lease._seen_at = now
        elif now - lease._seen_at >= limit:
            stuck.append(lease)
    return stuck


def _stalled_restores_locked(pool: Pool, limit: float | None, now: float) -> list[_Conn]:
    """Connections nobody holds whose rollback or reset, queued or running, began
    ``limit`` seconds ago or more (``socket_timeout``) and has not returned."""
    if limit is None or not pool._restoring:
        return []
    return [conn for conn, since in pool._restoring.items() if now - since >= limit]


def abort_stalled_restore(pool: Pool, conn: _Conn) -> None:
    """Shut down the socket of a connection whose rollback or reset is stalled (a
    dead network, a hung pooler in between): the call fails at once and the
    connection is closed, its slot freed. One still queued behind it on the resetter
    fails at once when its turn comes, instead of stalling in turn.

    The abort is decided under ``_abort_guard`` (the entry marked ``inf``: from then
    on :meth:`Pool._restore` closes the connection, even should the reset return by
    itself, and never gives it on), and the driver is called after it: a call into
    the driver may allocate, and a collection there may finish an abandoned use of
    this pool, whose release takes the guard. While the abort runs the connection is
    in ``_aborting``: a ``_restore`` that ends meanwhile leaves its close to this
    function, so the socket shut down is never a closed connection's reused
    descriptor."""
    with pool._abort_guard:
        since = pool._restoring.get(conn)
        if since is None or since == math.inf:
            return  # returned meanwhile, or already aborted
        pool._restoring[conn] = math.inf  # aborted once: closed, never given on
        pool._aborting[conn] = False  # True once _restore has left the close to us
    try:
        pool.driver.abort(conn.raw)  # type: ignore[attr-defined]  # _bound_restore: it has one
    finally:
        with pool._abort_guard:
            close = pool._aborting.pop(conn)
        if close:  # the reset ended during the abort; counted in _closing by _restore
            pool._close_conn(conn)
    with pool._lock:
        pool._n_aborted += 1
    logger.warning(
        "pool %r: aborted the reset of a returned connection, blocked for over %s s "
        "(socket_timeout); it is closed",
        pool.name,
        pool.config.socket_timeout,
    )


def abort_stuck(pool: Pool, lease: Lease) -> None:
    """Abort the blocked call of ``lease`` (``socket_timeout``): take a cancel request
    for it, shut its socket down, so the holder's thread gets the driver's error at
    once, then send the cancel; the connection is then broken and closed when the
    lease ends. Under the lease's guard, so the lease cannot end (and the descriptor be
    closed) meanwhile."""
    driver = pool.driver
    abort = getattr(driver, "abort", None)
    if abort is None:
        return
    prepare_cancel = getattr(driver, "prepare_cancel", None)
    send_cancel = None
    with lease._guard:
        conn = lease._conn
        if conn is None or not lease._busy or lease._uses != lease._seen_uses:
            return  # the call returned meanwhile
        if lease._finishing:
            # A release has claimed the lease (it counted no use): the count seen is
            # a late use backing out, and the connection may go to its next holder.
            return
        # The cancel is taken before the shutdown: once the blocked call has woken on
        # it, the driver has marked the connection broken and dropped its socket, and
        # a cancel taken from it then does nothing, while a backend waiting on a lock
        # reads nothing from its socket, so it would stay (holding its transaction's
        # locks) after the slot is freed. Taking it does no I/O.
        if prepare_cancel is not None:
            try:
                send_cancel = prepare_cancel(conn.raw)
            except Exception:  # no cancel then; the abort must still happen
                send_cancel = None
        abort(conn.raw)
        lease._seen_at = math.inf  # the same use is not aborted twice
        # Should the call have returned just before the abort, its connection still
        # reads as idle: the full reset on release then fails, and it is closed.
        lease.reset_requested = True
    # The cancel goes out on a thread of its own, bounded by the driver: a server that
    # still answers stops the statement (and ends the session, whose socket is shut),
    # so its backend does not outlive the slot freed when the lease ends. A driver
    # without a bounded cancel offers no ``prepare_cancel`` (psycopg2's would wait for
    # ever on a black hole, holding the process); there the server's
    # ``client_connection_check_interval`` ends the backend. Started outside the
    # lease's lock: starting a thread allocates, and a collection then could end an
    # abandoned use of this lease, whose exit() may take that lock. The connection
    # cannot go to another holder (the reset it now needs fails).
    if send_cancel is not None:
        threading.Thread(target=send_cancel, name="connguard-cancel", daemon=True).start()
    with pool._lock:
        pool._n_aborted += 1
    logger.warning(
        "pool %r: aborted a database call blocked for over %s s (socket_timeout) by "
        "thread %s for %s; acquired at %s",
        pool.name,
        pool.config.socket_timeout,
        lease.thread_name,
        describe_owner(lease.owner),
        first_site(lease.where()),
    )


def sweep_idle(pool: Pool, idle: list[tuple[_Conn, float]]) -> None:
    """Test the idle connections (no round trip) and close the dead ones, so a pool
    whose backends were terminated while idle refills in the background instead of
    waiting for a checkout to find each one. The test runs outside the lock; a
    connection taken and given back meanwhile (its ``idle_since`` moved) is left
    alone, since what was tested was another idle period."""
    is_alive = pool.driver.is_alive

    def dead_now(conn: _Conn) -> bool:
        try:
            return not is_alive(conn.raw)
        except Exception:  # in doubt, closed: the rest of housekeeping must still run
            return True

    dead = [(conn, since) for conn, since in idle if dead_now(conn)]
    if not dead:
        return
    with pool._lock:
        gone = [conn for conn, since in dead if conn.idle_since == since and conn in pool._idle]
        for conn in gone:
            pool._idle.remove(conn)
        pool._closing += len(gone)
        pool._n_closed["broken"] += len(gone)
        if gone:
            pool._suspect_idle_locked()
    if gone:
        logger.info("pool %r: %d idle connection(s) found dead, closed", pool.name, len(gone))
    for conn in gone:
        pool._close_conn(conn)


def _after_close(pool: Pool, now: float) -> None:
    """A closed pool: only leases still out remain to be finished (dropped after the
    close, or revoked under a running statement), and resets still queued or running
    (aborted at ``socket_timeout`` as in an open pool: a stalled one holds the
    process's resetter, every pool's deferred resets behind it); then it leaves
    housekeeping."""
    take_back_dropped(pool)
    with pool._lock:
        ending = [lease for ref in pool._leases if (lease := ref()) is not None and lease._ending]
        stalled = _stalled_restores_locked(pool, pool.config.socket_timeout, now)
    take_back(pool, ending)
    for conn in stalled:
        abort_stalled_restore(pool, conn)
    with pool._lock:
        done = not pool._leases and not pool._resetting and not pool._restoring
    if done:
        housekeeper().unregister(pool)


def take_back(pool: Pool, held: list[Lease]) -> None:
    """Take back leases nobody will return (outside the lock).

    *Revoked*: released while a statement ran outside the fence; finished once
    the statement has ended. *Orphaned* (always on): the owner's unit of work has
    ended (a request whose client hung up, a stream that was never closed) and
    the lease is not in use. *Reclaim* (setting ``reclaim``): the thread that took
    it has died, and it is not executing a statement.
    """
    reclaim = pool.config.reclaim
    alive = {thread.ident for thread in threading.enumerate()} if reclaim else set()
    for lease in held:
        conn = lease._conn
        if conn is None or lease._busy:
            continue
        if lease._ending:  # decided again, and claimed, under the lease's lock
            pool._finish_unused(lease, housekeeping=True)
            continue
        if pool.driver.transaction_status(conn.raw) is TxStatus.ACTIVE:
            continue  # executing outside the fence: never under a running statement
        if getattr(lease.owner, "ended", False):
            end_taken(pool, lease, "orphaned")
        elif reclaim and lease.thread_id not in alive:
            end_taken(pool, lease, "reclaimed")


def take_back_dropped(pool: Pool) -> None:
    """Take back the connections of leases that were collected unreleased: nobody
    can reach them any more (the lease and its proxies are gone). Each is reset (or
    rolled back, or cancelled and closed) by the resetter, never on this thread:
    housekeeping must stay free to abort a stalled reset, an acquiring caller may
    run an event loop."""
    while pool._dropped:
        try:
            ref = pool._dropped.popleft()
        except IndexError:
            return
        with pool._lock:
            conn = pool._leases.pop(ref, None)
            if conn is None:
                continue  # released or ended before it was collected
            pool._n_dropped += 1
            pool._n_releases += 1
            # Counted (resetting) and stamped for socket_timeout until the resetter
            # has run, as Pool._release_dirty does: this thread (housekeeping, or an
            # acquiring caller) never does the reset's round trip.
            pool._resetting += 1
            if pool._bound_restore:
                pool._restoring[conn] = pool._clock()
        logger.warning(
            "pool %r: took back a connection whose lease was dropped without being "
            "released, for %s; acquired at %s",
            pool.name,
            describe_owner(conn.owner),
            first_site(where(conn.stack)),
        )
        try:
            status = pool.driver.transaction_status(conn.raw)
        except Exception:  # in doubt: closed by the resetter, never lost here
            status = TxStatus.UNKNOWN
        resetter().submit(pool, conn, status, pool.config.reset != "rollback")


def end_taken(pool: Pool, lease: Lease, how: str) -> None:
    with pool._lock:
        if lease._conn is None:
            return
        pool._n_reclaims += 1
        lease.ended_by = how
    logger.warning(
        "pool %r: %s a lease held for %.1f s by thread %s for %s; acquired at %s",
        pool.name,
        "took back (its owner has ended)" if how == "orphaned" else "reclaimed",
        pool._clock() - lease.acquired_at,
        lease.thread_name,
        describe_owner(lease.owner),
        first_site(lease.where()),
    )
    pool.release(lease)  # fences, rolls back or resets, hands on
