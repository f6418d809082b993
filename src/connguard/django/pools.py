"""The process's pools, one per database a Django alias connects to.

Keyed by what makes connections interchangeable (alias, database name, user,
host, port, options, time zone), so a test database, a replica or a changed
``TIME_ZONE`` each get their own pool and never share connections with another.
A new pool is created only when a connection is first needed, never as a side
effect of reading state.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.postgresql.psycopg_any import is_psycopg3

from connguard.diagnostics.tags import make_tag
from connguard.drivers import load_driver
from connguard.pool import Pool, PoolConfig, PoolConfigError

from .conf import app_settings
from .driver import DjangoDriver

PoolKey = tuple[str, ...]

_pools: dict[PoolKey, Pool] = {}
_lock = threading.Lock()

# psycopg_pool settings that Django's native pool accepts but that have no meaning
# here: named in the error so a site switching ENGINE knows what to drop.
PSYCOPG_POOL_ONLY = {
    "num_workers": "connguard opens connections on demand, with no worker threads",
    "reconnect_timeout": "connguard keeps retrying with backoff; see reconnect_backoff_max",
    "check": "connguard checks liveness itself; see ping_after_idle and liveness_after_idle",
    "configure": "connguard runs Django's per-connection set-up itself",
    "kwargs": "put connection arguments in OPTIONS",
    "connection_class": "not supported",
    "open": "connguard pools always open lazily",
    "name": "the pool is named after the database alias",
    "reconnect_failed": "not supported",
}


def pool_config(options: Mapping[str, Any]) -> PoolConfig:
    """The :class:`PoolConfig` for a database's ``OPTIONS`` (``pool`` key).

    Raises :class:`PoolConfigError` naming the key and the allowed values.
    """
    raw = options.get("pool", True)
    if raw is True or raw is None:
        return PoolConfig()
    if raw is False:
        # Django's "no pool" (settings built from environment variables produce it):
        # no reuse, a connection per lease, closed when the lease ends, still bounded,
        # fenced and leak-checked like any other.
        return PoolConfig(min_size=0, reuse=False)
    if not isinstance(raw, Mapping):
        raise PoolConfigError(
            "pool",
            f"OPTIONS['pool'] must be a dict of pool settings, True or False (got {raw!r})",
        )
    for key in raw:
        if key == "reset" and callable(raw[key]):
            raise PoolConfigError(
                "reset",
                "OPTIONS['pool']['reset'] is a policy name here, not psycopg_pool's "
                "callable: connguard resets connections itself; use 'auto' (the "
                "default), 'always' or 'rollback'",
            )
        if key in PSYCOPG_POOL_ONLY:
            raise PoolConfigError(
                str(key),
                f"OPTIONS['pool'][{key!r}] is a psycopg_pool setting with no connguard "
                f"equivalent ({PSYCOPG_POOL_ONLY[key]}); remove it",
            )
    return PoolConfig.from_mapping(raw, where="OPTIONS['pool']")


CLIENT_CONNECTION_CHECK_INTERVAL = 0.25
"""With ``socket_timeout`` set, each connection asks its server (PostgreSQL 14 and
later, where the server sets no value of its own) to check this often, in seconds,
while a statement runs, that the client is still there: the backend of a call that
``socket_timeout`` aborted (its socket shut down) then ends within this, releasing its
transaction's locks, even where no cancel request is sent (psycopg2) or arrives. A
check is one ``poll()`` of the socket: nothing next to a statement that runs for 0.25 s."""


def pool_key(wrapper: Any) -> PoolKey:
    settings_dict = wrapper.settings_dict
    options = settings_dict["OPTIONS"]
    return (
        wrapper.alias,
        str(settings_dict["NAME"]),
        str(settings_dict["USER"]),
        str(settings_dict["HOST"]),
        str(settings_dict["PORT"]),
        str(hash(settings_dict["PASSWORD"])),
        repr(sorted((str(k), repr(v)) for k, v in options.items())),
        str(wrapper.timezone_name),
    )


def pool_for(wrapper: Any, conn_params: dict[str, Any]) -> Pool:
    """The pool serving ``wrapper``'s current settings, created on first need."""
    key = pool_key(wrapper)
    pool = _pools.get(key)
    if pool is not None and not pool.closed:
        return pool
    with _lock:
        pool = _pools.get(key)
        if pool is None or pool.closed:
            pool = _new_pool(wrapper, conn_params)
            _pools[key] = pool
    return pool


def _new_pool(wrapper: Any, conn_params: dict[str, Any]) -> Pool:
    # No local holds the settings dict: with DEBUG=True an error raised here shows this
    # frame's locals on Django's debug page, and the dict holds the password.
    options = wrapper.settings_dict["OPTIONS"]
    try:
        config = pool_config(options)
    except PoolConfigError as exc:
        raise ImproperlyConfigured(f"DATABASES[{wrapper.alias!r}]: {exc}") from None
    autocommit = bool(wrapper.settings_dict["AUTOCOMMIT"])
    setup = wrapper.connguard_setup()
    base = load_driver(
        "psycopg" if is_psycopg3 else "psycopg2",
        autocommit=autocommit,
        client_connection_check_interval=(
            None if config.socket_timeout is None else CLIENT_CONNECTION_CHECK_INTERVAL
        ),
    )
    driver = DjangoDriver(
        base,
        connect=wrapper.Database.connect,
        conn_params=conn_params,
        configure=setup.configure,
        baseline=setup.baseline_sql,
        autocommit=autocommit,
        tag=functools.partial(make_tag, tag_prefix(options), wrapper.alias),
    )
    return Pool(driver, config, name=wrapper.alias)


def tag_prefix(options: Mapping[str, Any]) -> str:
    """The ``application_name`` prefix: the alias's own ``application_name``, else
    ``CONNGUARD["application_name"]``, else the project (the settings module's
    top package)."""
    own = options.get("application_name")
    if own:
        return str(own)
    configured = app_settings().application_name
    if configured:
        return configured
    module = getattr(settings, "SETTINGS_MODULE", None) or "django"
    return str(module).split(".")[0]


def pools() -> list[Pool]:
    """Every open pool of this process."""
    with _lock:
        return [pool for pool in _pools.values() if not pool.closed]


def close_pools(*, database: str | None = None, alias: str | None = None) -> int:
    """Close the pools for a database name and/or alias (all when neither is given).

    Tests call this before dropping or cloning a database, which PostgreSQL refuses
    while idle pooled connections are attached to it.
    """
    closing: list[Pool] = []
    with _lock:
        for key, pool in list(_pools.items()):
            if (alias is None or key[0] == alias) and (database is None or key[1] == database):
                closing.append(pool)
                del _pools[key]
    for pool in closing:
        pool.close()
    return len(closing)
