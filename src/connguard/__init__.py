"""connguard: Django database connections that come back.

The engine lives in :mod:`connguard.pool`, drivers in :mod:`connguard.drivers`.
"""

from .pool import (
    ConnectFailed,
    Lease,
    LeaseEnded,
    Pool,
    PoolClosed,
    PoolConfig,
    PoolConfigError,
    PoolError,
    PoolRefused,
    PoolStats,
    PoolTimeout,
)
from .scope import Scope, current_scope, scope

__version__ = "0.1.0.dev0"
"""The version, PEP 440: ``0.MINOR.PATCH``, with ``.devN`` for a development release
(not published on PyPI). The one place it is written: pyproject.toml reads it from
here, ``connguard --version`` prints it, and CHANGELOG.md has a section for it."""

__all__ = [
    "ConnectFailed",
    "Lease",
    "LeaseEnded",
    "Pool",
    "PoolClosed",
    "PoolConfig",
    "PoolConfigError",
    "PoolError",
    "PoolRefused",
    "PoolStats",
    "PoolTimeout",
    "Scope",
    "__version__",
    "current_scope",
    "scope",
]
