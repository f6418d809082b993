"""Health of this process's pools, for a load balancer or a health-check framework.

:func:`check` says, for one database alias, whether this process can serve requests
that need the database:

* ``fail``: it cannot. The pool could not open a connection (the database is down,
  unreachable, or refuses the login), or the alias is unknown.
* ``warn``: it can, but slowly. Every connection is in use and requests are queued for
  one (or the short test checkout timed out waiting): the pool is saturated.
* ``ok``: a connection was leased and given back at once.

The test is a real checkout from the alias's pool, with a short timeout, given back
at once: no query, no round trip unless the pool's health checks want one (a
connection idle past ``ping_after_idle``, or one suspect after another was found
dead). A saturated pool is reported from its figures, without queueing behind the
requests it is serving.

The view (``connguard.django.urls``: ``/connguard/health``) answers 200 for ``ok``
and ``warn``, 503 for ``fail``; its body names the worst status, and for staff users or
the status token (see :mod:`connguard.django.views`) each pool's detail.
``connguard.django.health_check.ConnguardPool`` is the same check for
``django-health-check``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from django.db import DatabaseError, connections
from django.utils.connection import ConnectionDoesNotExist

from connguard.pool import ConnectFailed, Pool, PoolError, PoolRefused, PoolTimeout
from connguard.pool.errors import chain

from . import pools
from .checks import connguard_databases

Status = Literal["ok", "warn", "fail"]
_RANK: dict[str, int] = {"ok": 0, "warn": 1, "fail": 2}

TEST_TIMEOUT = 1.0
"""Seconds the test checkout may wait for a connection (never more than the pool's own
``timeout``)."""


@dataclasses.dataclass(frozen=True, slots=True)
class PoolHealth:
    alias: str
    status: Status
    detail: str
    in_use: int | None = None
    max_size: int | None = None
    waiting: int | None = None


def worst(results: list[PoolHealth]) -> Status:
    """The worst status among ``results`` (``ok`` for none)."""
    return max((r.status for r in results), key=_RANK.__getitem__, default="ok")


def _pool_of(alias: str) -> Pool | None:
    found = [pool for pool in pools.pools() if pool.name == alias and not pool.closed]
    return found[-1] if found else None


def _reason(exc: BaseException) -> str:
    """One line from the driver's error at the bottom of the chain (no password: libpq
    names host and port only)."""
    *_, last = chain(exc)
    lines = [line.strip() for line in str(last).splitlines() if line.strip()]
    return lines[0] if lines else type(last).__name__


def check(alias: str, *, timeout: float = TEST_TIMEOUT) -> PoolHealth:
    """The health of ``alias``'s pool in this process (see the module)."""
    try:
        wrapper = connections[alias]
    except ConnectionDoesNotExist:
        return PoolHealth(alias, "fail", f"unknown database alias {alias!r}")
    if alias not in connguard_databases():
        return PoolHealth(alias, "fail", f"{alias!r} does not use a connguard ENGINE")
    pool = _pool_of(alias)
    if pool is None:  # no request has used the alias yet: the first checkout makes it
        try:
            wrapper.ensure_connection()
        except DatabaseError as exc:
            return PoolHealth(alias, "fail", f"cannot connect: {_reason(exc)}")
        finally:
            wrapper.close()
        pool = _pool_of(alias)
        if pool is None:
            return PoolHealth(alias, "fail", "no pool was made for this alias")
    stats = pool.stats()
    figures = {"in_use": stats.in_use, "max_size": stats.max_size, "waiting": stats.waiting}
    if stats.waiting and stats.in_use >= stats.max_size:
        return PoolHealth(
            alias, "warn",
            f"saturated: all {stats.max_size} connections in use, "
            f"{stats.waiting} request(s) waiting",
            **figures,
        )  # fmt: skip
    try:
        lease = pool.acquire(timeout=min(timeout, pool.config.timeout))
    except ConnectFailed as exc:
        return PoolHealth(alias, "fail", f"cannot connect: {_reason(exc)}", **figures)
    except (PoolTimeout, PoolRefused):
        return PoolHealth(alias, "warn", "saturated: no connection free within the test", **figures)
    except PoolError as exc:
        return PoolHealth(alias, "fail", _reason(exc), **figures)
    lease.release()
    return PoolHealth(alias, "ok", "a connection was leased and given back", **figures)


def check_all() -> list[PoolHealth]:
    """Every alias with a connguard ENGINE."""
    return [check(alias) for alias in connguard_databases()]
