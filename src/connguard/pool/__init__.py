"""The engine: a bounded, thread-safe pool of physical connections.

No Django and no driver imports on this floor: a connection is known only through
the :class:`Driver` protocol.
"""

from .config import PoolConfig, PoolConfigError
from .driver import Driver, TxStatus
from .engine import Pool
from .errors import (
    ConnectFailed,
    LeaseEnded,
    PoolClosed,
    PoolCounts,
    PoolError,
    PoolRefused,
    PoolTimeout,
)
from .lease import FencedConnection, FencedCursor, Lease
from .stats import HistogramSnapshot, PoolStats

__all__ = [
    "ConnectFailed",
    "Driver",
    "FencedConnection",
    "FencedCursor",
    "HistogramSnapshot",
    "Lease",
    "LeaseEnded",
    "Pool",
    "PoolClosed",
    "PoolConfig",
    "PoolConfigError",
    "PoolCounts",
    "PoolError",
    "PoolRefused",
    "PoolStats",
    "PoolTimeout",
    "TxStatus",
]
