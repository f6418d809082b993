"""Concrete :class:`~connguard.pool.driver.Driver` implementations, one per DB-API driver.

The engine never imports a driver package: it is handed a ``Driver`` object. This package
is where the driver packages get imported, and only lazily, inside :func:`load_driver`, so
that importing ``connguard`` works with either driver installed (or neither, for the
engine's own fake-driver tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from connguard.pool.driver import Driver

__all__ = ["DRIVER_NAMES", "load_driver"]

DRIVER_NAMES = ("psycopg", "psycopg2")
"""The names :func:`load_driver` accepts, in the order ``name=None`` tries them."""

_INSTALL_HINT = "install django-connguard[psycopg] or django-connguard[psycopg2]"


def load_driver(
    name: str | None = None,
    *,
    conninfo: str = "",
    connect_kwargs: Mapping[str, Any] | None = None,
    autocommit: bool = True,
    application_name: str | None = None,
    client_connection_check_interval: float | None = None,
) -> Driver:
    """Build the driver called ``name`` (``"psycopg"`` or ``"psycopg2"``).

    ``name=None`` prefers psycopg 3 and falls back to psycopg2, so a project gets the
    maintained driver whenever it has it without having to say so. The remaining
    arguments are passed to the driver's constructor; see
    :class:`connguard.drivers.psycopg.PsycopgDriver`.

    Raises :class:`ValueError` for an unknown name and :class:`ImportError` (with the
    extra to install) when the requested driver, or for ``None`` both, is missing.
    """
    if name is not None and name not in DRIVER_NAMES:
        allowed = ", ".join(repr(n) for n in DRIVER_NAMES)
        raise ValueError(f"unknown database driver {name!r}: expected one of {allowed} or None")
    kwargs: dict[str, Any] = {
        "connect_kwargs": connect_kwargs,
        "autocommit": autocommit,
        "application_name": application_name,
        "client_connection_check_interval": client_connection_check_interval,
    }
    candidates = DRIVER_NAMES if name is None else (name,)
    errors: list[str] = []
    for candidate in candidates:
        # Lazy on purpose: importing connguard must not require (or pay for) either driver.
        try:
            if candidate == "psycopg":
                from connguard.drivers.psycopg import PsycopgDriver  # noqa: PLC0415

                return PsycopgDriver(conninfo, **kwargs)
            from connguard.drivers.psycopg2 import Psycopg2Driver  # noqa: PLC0415

            return Psycopg2Driver(conninfo, **kwargs)
        except ImportError as exc:
            errors.append(f"{candidate}: {exc}")
    what = "no PostgreSQL driver is importable" if name is None else f"{name} is not importable"
    raise ImportError(f"{what} ({'; '.join(errors)}): {_INSTALL_HINT}")
