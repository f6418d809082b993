"""The ``CONNGUARD`` setting: connguard's app-wide options, read and validated here only.

.. code-block:: python

    CONNGUARD = {"retry_after": 2, "outage_retry_after": 10, "application_name": "shop"}

Every key is optional, and so is the setting itself. The keys (see :data:`SETTINGS`,
which the error messages quote):

- ``retry_after``: int >= 0, default 1. ``Retry-After`` (seconds) of the 503 sent when
  a pool is overloaded (its ``timeout`` passed, or ``max_waiting`` refused while the
  database is not known to be down).
- ``outage_retry_after``: int >= 0, default 5. ``Retry-After`` (seconds) of the 503 sent
  when the database is unreachable.
- ``application_name``: str (at most 63 bytes, no NUL) or None, default None. The
  prefix of every connection's ``application_name`` tag; None or "": the settings
  module's top package. An alias's own ``OPTIONS["application_name"]`` wins.
- ``status_dir``: str or None, default None. Where each worker publishes its pools for
  the status view (see :mod:`connguard.diagnostics.snapshots`).
- ``status_token``: str (16+ printable characters) or None, default None. A bearer
  token that opens the status view; without it, staff users only.
- ``opentelemetry``: bool, default False. Register the pools' OpenTelemetry
  instruments at start-up (:mod:`connguard.diagnostics.otel`).

Two halves, which agree on what is valid:

* :func:`validate` returns every problem with the setting; the system checks
  (``connguard.E006``-``E008``) report them at ``manage.py check`` and start-up.
* :func:`app_settings` is what code uses at request time: a typed, frozen
  :class:`AppSettings`. It never raises: a bad value is replaced by its default (the
  system check has already said so), and an unreadable setting gives the defaults.
  It is cached per ``CONNGUARD`` object and dropped on Django's ``setting_changed``,
  so ``override_settings(CONNGUARD=...)`` takes effect at once.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

from django.conf import settings
from django.core.signals import setting_changed

from connguard.pool import PoolConfig

SETTING: Final = "CONNGUARD"

APPLICATION_NAME_MAX_BYTES: Final = 63
"""PostgreSQL keeps ``NAMEDATALEN - 1`` bytes of ``application_name`` and drops the rest."""


def _seconds(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _directory(value: object) -> bool:
    return value is None or (isinstance(value, str) and bool(value) and "\x00" not in value)


def _token(value: object) -> bool:
    return value is None or (isinstance(value, str) and len(value) >= 16 and value.isprintable())


def _application_name(value: object) -> bool:
    if value is None:
        return True
    return (
        isinstance(value, str)
        and "\x00" not in value
        and len(value.encode("utf-8", "surrogatepass")) <= APPLICATION_NAME_MAX_BYTES
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Setting:
    """One key of ``CONNGUARD``."""

    name: str
    type: str
    """The Python type, as a reader would write it."""
    default: Any
    allowed: str
    """The allowed values, in words; error messages quote it."""
    meaning: str
    valid: Callable[[object], bool]
    secret: bool = False
    """Its value is never quoted in a message (a token): only its type and length."""


SETTINGS: Final[Mapping[str, Setting]] = {
    s.name: s
    for s in (
        Setting(
            name="retry_after",
            type="int",
            default=1,
            allowed="an integer number of seconds >= 0",
            meaning="the Retry-After header of the 503 sent when a pool is overloaded "
            "(its timeout passed, or max_waiting refused the request)",
            valid=_seconds,
        ),
        Setting(
            name="outage_retry_after",
            type="int",
            default=5,
            allowed="an integer number of seconds >= 0",
            meaning="the Retry-After header of the 503 sent when the database is "
            "unreachable (as opposed to overloaded)",
            valid=_seconds,
        ),
        Setting(
            name="application_name",
            type="str | None",
            default=None,
            allowed=f"a string of at most {APPLICATION_NAME_MAX_BYTES} bytes (UTF-8) with "
            "no NUL character, or None",
            meaning="the prefix of every connection's application_name tag (connguard "
            "appends '|cg|host|pid|alias' and shortens the prefix to fit 63 bytes); "
            "None or '': the settings module's top package. An alias's own "
            "OPTIONS['application_name'] wins",
            valid=_application_name,
        ),
        Setting(
            name="status_dir",
            type="str | None",
            default=None,
            allowed="a directory path (a non-empty string), or None",
            meaning="where each worker process publishes its pools every second, so the "
            "status view (connguard.django.urls) shows every worker of the server, not "
            "only the one that answered; None: a directory per server under the "
            "system's temporary directory, named after the workers' parent process",
            valid=_directory,
        ),
        Setting(
            name="status_token",
            type="str | None",
            default=None,
            allowed="a string of at least 16 printable characters, or None",
            meaning="a secret that opens the status view to a request carrying "
            "'Authorization: Bearer <token>' (connguard status --url --token); without "
            "it, only staff users logged in to the site may read it",
            valid=_token,
            secret=True,
        ),
        Setting(
            name="opentelemetry",
            type="bool",
            default=False,
            allowed="True or False",
            meaning="register the pools' observable gauges and counters on "
            "OpenTelemetry's global MeterProvider at start-up (needs opentelemetry-api: "
            "pip install 'django-connguard[otel]')",
            valid=lambda value: isinstance(value, bool),
        ),
    )
}
"""Every key ``CONNGUARD`` may hold."""


@dataclasses.dataclass(frozen=True, slots=True)
class AppSettings:
    """The ``CONNGUARD`` setting, typed, with every bad or missing value at its default."""

    retry_after: int = 1
    """Seconds in the overload 503's ``Retry-After``."""
    outage_retry_after: int = 5
    """Seconds in the unreachable-database 503's ``Retry-After``."""
    application_name: str | None = None
    """The ``application_name`` tag prefix; None: not configured."""
    status_dir: str | None = None
    """Where workers publish their status; None: the default per-server directory."""
    status_token: str | None = None
    """The bearer token that opens the status view; None: staff only."""
    opentelemetry: bool = False
    """Register the pools' OpenTelemetry instruments at start-up."""


DEFAULTS: Final = AppSettings()

ProblemKind = Literal["not_a_dict", "unknown_key", "bad_value"]


@dataclasses.dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with ``CONNGUARD``."""

    kind: ProblemKind
    key: str | None
    """The key at fault (its ``repr`` if it is not a string); None for the whole setting."""
    message: str
    hint: str


def _allowed_keys() -> str:
    return ", ".join(sorted(SETTINGS))


def _unknown_key(key: object) -> Problem:
    message = f"settings.{SETTING} has an unknown key {key!r}; allowed keys: {_allowed_keys()}."
    close = difflib.get_close_matches(key, list(SETTINGS), n=1) if isinstance(key, str) else []
    if close:
        hint = f"Did you mean {close[0]!r}?"
    elif isinstance(key, str) and _is_pool_setting(key):
        hint = (
            f"{key!r} is a pool setting: put it in DATABASES[alias]['OPTIONS']['pool'], "
            f"not in {SETTING}."
        )
    else:
        hint = "Remove it, or correct its name."
    return Problem("unknown_key", key if isinstance(key, str) else repr(key), message, hint)


def _is_pool_setting(key: str) -> bool:
    return key in PoolConfig.settings()


def validate(raw: object) -> list[Problem]:
    """Every problem with a value of the ``CONNGUARD`` setting, in key order.

    An absent setting is fine: do not call this for it (None is not a dict).
    """
    if not isinstance(raw, Mapping):
        return [
            Problem(
                "not_a_dict",
                None,
                f"settings.{SETTING} must be a dict of connguard settings "
                f"(got {raw!r}, a {type(raw).__name__}).",
                f"Use a dict such as {{'retry_after': 1}}; allowed keys: {_allowed_keys()}.",
            )
        ]
    problems: list[Problem] = []
    for key in sorted(raw, key=repr):
        spec = SETTINGS.get(key) if isinstance(key, str) else None
        if spec is None:
            problems.append(_unknown_key(key))
            continue
        value = raw[key]
        if not spec.valid(value):
            shown = (
                f"a {type(value).__name__} of length {len(value)}"
                if spec.secret and isinstance(value, str | bytes)
                else f"a {type(value).__name__}"
                if spec.secret
                else repr(value)
            )
            problems.append(
                Problem(
                    "bad_value",
                    key,
                    f"settings.{SETTING}[{key!r}] must be {spec.allowed} (got {shown}).",
                    f"{key}: {spec.meaning}. Default: {spec.default!r}.",
                )
            )
    return problems


def read_app_settings(raw: object) -> AppSettings:
    """The :class:`AppSettings` for a value of ``CONNGUARD``; never raises.

    Missing keys and bad values take their defaults; unknown keys are ignored.
    """
    if not isinstance(raw, Mapping):
        return DEFAULTS
    values: dict[str, Any] = {}
    for name, spec in SETTINGS.items():
        try:
            value = raw.get(name, spec.default)
            if spec.valid(value):
                values[name] = value
        except Exception:  # a broken mapping must not fail a request
            pass
    return AppSettings(**values)


_cache: tuple[object, AppSettings] | None = None


def app_settings() -> AppSettings:
    """The current ``CONNGUARD`` settings, typed; never raises.

    Cheap enough for every request: the result is cached for as long as
    ``settings.CONNGUARD`` is the same object and no ``setting_changed`` signal names it.
    """
    global _cache
    try:
        raw = getattr(settings, SETTING, None)
    except Exception:  # settings not configured: the defaults
        return DEFAULTS
    cached = _cache
    if cached is not None and cached[0] is raw:
        return cached[1]
    value = read_app_settings(raw)
    _cache = (raw, value)
    return value


def _forget(*, setting: str, **kwargs: Any) -> None:
    global _cache
    if setting == SETTING:
        _cache = None


setting_changed.connect(_forget, dispatch_uid="connguard.conf.forget")
