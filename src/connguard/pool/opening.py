"""Opening connections: slots are reserved under the lock, connections are opened on
opener threads, and a failing database is probed by one opener with backoff.

Callers never open connections themselves, so no caller waits past its deadline on a
hung network; a connection that arrives after its caller gave up goes to the next
waiter or becomes idle.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import TYPE_CHECKING

from .errors import ConnectFailed, detach, one_line
from .lease import _Conn

if TYPE_CHECKING:
    from .engine import Pool

logger = logging.getLogger("connguard.pool")
_monotonic = time.monotonic


def warm_size_locked(pool: Pool) -> int:
    """How many connections the pool keeps open with nobody asking: ``min_size``,
    or 0 while the pool is dormant, i.e. its process has forked since the pool's
    last acquire (fork.py). Caller holds the lock.

    A gunicorn ``--preload`` or Celery master that queried before forking never
    acquires again: it keeps nothing warm, so its idle connections go after
    ``max_idle`` and are not refilled, and the budget stays workers x ``max_size``.
    A worker that forks (multiprocessing in a view) acquires again with its next
    request, which ends the dormancy. No cost on the hot path: the acquire count
    is kept anyway."""
    if pool._n_acquires == pool._acquires_at_fork:
        return 0
    return pool.config.min_size


def request_open_locked(pool: Pool) -> int:
    """Reserve slots for the connections there is demand and room for, and
    return how many openers the caller must start once it drops the lock.

    Demand is every waiter plus the shortfall below ``min_size`` (none while the
    pool is dormant, see :func:`warm_size_locked`). While the database is failing
    (backoff) at most one opener probes it.
    """
    if pool._closed:
        return 0
    cfg = pool.config
    demand = len(pool._waiters) + max(0, warm_size_locked(pool) - pool._size) - pool._opening
    if demand <= 0:
        return 0
    room = cfg.max_size - pool._size
    if pool._last_connect_error is not None:
        room = min(room, 1 - pool._opening)
    count = max(0, min(demand, room))
    pool._size += count
    pool._opening += count
    return count


def start_openers(pool: Pool, count: int) -> None:
    """Start ``count`` opener threads for slots already reserved (outside the lock:
    starting a thread waits for it to run)."""
    for _ in range(count):
        thread = threading.Thread(
            target=run_opener, args=(pool,), name=f"connguard-open-{pool.name}", daemon=True
        )
        thread.start()


def run_opener(pool: Pool) -> None:
    """Open one connection for the pool; retry with backoff while it is needed.

    While the database is failing, the wait after a failed attempt depends on who
    needs the connection. Nobody waiting (only ``min_size`` to refill): the backoff
    doubles up to ``reconnect_backoff_max``, so an outage costs the database almost
    nothing. A caller waiting: ``reconnect_backoff`` after the last attempt, however
    long the outage, so the first request after the database returns is served at
    once instead of sleeping out a backoff grown during the outage. Either way one
    opener per pool probes, so a returning database sees at most one connect attempt
    per pool per ``reconnect_backoff``, never a storm.
    """
    cfg = pool.config
    wake = pool._wake_opener
    while True:
        wake.clear()
        with pool._lock:
            closed = pool._closed
            # Demand shortens the backoff, except after a refusal: retrying a bad
            # password every half second would only lock the account.
            waiting = pool._waiters and not pool._refused
            delay = cfg.reconnect_backoff if waiting else pool._backoff_delay
            wait = pool._failed_at + delay * pool._backoff_jitter - _monotonic()
        if closed:
            break
        # Woken early (a caller started waiting, or the pool closed): think again.
        if wait > 0 and wake.wait(wait):
            continue
        started = _monotonic()
        try:
            raw = pool.driver.connect(cfg.connect_timeout)
        except Exception as exc:
            if not connect_failed(pool, exc, _monotonic() - started):
                return
            continue
        elapsed = _monotonic() - started
        now = pool._clock()
        lifetime = cfg.max_lifetime
        if not cfg.reuse:
            expires = now  # serves the lease it was opened for, then is closed
        elif lifetime is None:
            expires = float("inf")
        else:
            expires = now + lifetime * (1.0 - cfg.lifetime_jitter * random.random())
        conn = _Conn(raw, now, expires, pool._pid)
        with pool._lock:
            pool._opening -= 1
            pool._n_opened += 1
            pool._h_connect.record(elapsed)
            recovered = pool._last_connect_error is not None
            pool._last_connect_error = None
            pool._backoff_delay = 0.0
            pool._failed_at = 0.0
            pool._refused = False
            openers = 0
            if not pool._closed:
                pool._give_back_locked(conn, now)
                openers = request_open_locked(pool)  # more may now run in parallel
                closed = False
            else:
                pool._closing += 1
                pool._n_closed["pool_closed"] += 1
                closed = True
        start_openers(pool, openers)
        if recovered:
            logger.warning("pool %r: connected again after connect errors", pool.name)
        else:
            logger.debug("pool %r: opened a connection in %.4f s", pool.name, elapsed)
        if closed:
            pool._close_conn(conn)
        return
    with pool._lock:
        pool._opening -= 1
        pool._size -= 1


def connect_failed(pool: Pool, exc: BaseException, elapsed: float) -> bool:
    """Record a failed connect; return True if this opener should retry.

    When the server answered and refused (the driver's ``refused(exc)``: bad
    credentials, a database or role that does not exist, a set-up statement that
    failed) and no lease is out to come back, waiting would not help: every caller
    waiting now gets ``ConnectFailed`` at once, with the server's reason, instead of
    at its ``timeout``. The next attempt then waits out the grown backoff even when
    callers wait (a bad password must not be tried twice a second)."""
    cfg = pool.config
    refused = getattr(pool.driver, "refused", None)
    hopeless = refused is not None and refused(exc)
    with pool._lock:
        first = pool._last_connect_error is None
        pool._n_connect_errors += 1
        pool._h_connect.record(elapsed)
        pool._last_connect_error = detach(exc)
        delay = pool._backoff_delay * 2 if pool._backoff_delay else cfg.reconnect_backoff
        pool._backoff_delay = min(delay, cfg.reconnect_backoff_max)
        pool._failed_at = _monotonic()
        # up to 20 % off so many processes do not retry in lockstep
        pool._backoff_jitter = 0.8 + 0.2 * random.random()
        pool._refused = hopeless
        if hopeless and not pool._leases:
            # Nothing will come back to serve them: fail them now. (With leases out,
            # a returned connection may serve them before their timeout.)
            fail_waiters_locked(pool, exc)
        needed = bool(pool._waiters) or pool._size <= warm_size_locked(pool)
        retry = not pool._closed and needed and pool._opening == 1
        if not retry:
            pool._opening -= 1
            pool._size -= 1
    if first:
        logger.warning(
            "pool %r: cannot connect (%s); retrying with backoff", pool.name, one_line(exc)
        )
    return retry


def fail_waiters_locked(pool: Pool, exc: BaseException) -> None:
    """Wake every waiting caller with ``ConnectFailed`` caused by ``exc``, the
    server's refusal. Caller holds the lock."""
    while pool._waiters:
        waiter = pool._waiters.popleft()
        error = pool._error(
            ConnectFailed,
            f"the database refused a new connection: {one_line(exc)}",
        )
        error.__cause__ = exc
        waiter.error = error
        waiter.event.release()
