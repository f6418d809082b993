"""The ``DatabaseWrapper`` mixin: Django's connect is an acquire, close a release.

Django keeps a wrapper per thread and believes it owns ``wrapper.connection``.
Here that attribute is a view of a :class:`~connguard.pool.Lease` owned by a
:class:`~connguard.scope.Scope` (the request, task or thread). When the scope ends,
from whichever thread, the lease goes back to the pool; the wrapper notices at its
next use (``connection`` reads as None) and Django's ``ensure_connection()``
re-acquires transparently. Cursors are fenced too: a cursor made under a lease
that has ended raises instead of touching a connection that is now someone
else's.

What Django does once per connection (time zone, ``assume_role``) runs once per
*physical* connection (:class:`ConnectionSetup`, through
:class:`~connguard.django.driver.DjangoDriver`), and again at checkout only when the
wanted time zone differs.
"""

from __future__ import annotations

import logging
import os
import time
from asyncio import _get_running_loop
from typing import Any

from django.core.exceptions import ImproperlyConfigured, SynchronousOnlyOperation
from django.db import ProgrammingError
from django.db.backends.base.base import NO_DB_ALIAS, BaseDatabaseWrapper
from django.db.backends.postgresql.psycopg_any import IsolationLevel
from django.db.backends.signals import connection_created
from django.db.backends.utils import debug_transaction
from django.utils.asyncio import async_unsafe
from django.views.decorators.debug import sensitive_variables

from connguard.drivers.libpq import forget_attempt
from connguard.pool import Lease, LeaseEnded, Pool
from connguard.pool.errors import detach
from connguard.scope import Scope, current_or_none, encloses, owner_scope

from . import pools
from .cursors import FencedCursorDebugWrapper, FencedCursorWrapper
from .setup import ConnectionSetup, MaskedPassword, session_time_zone
from .sites import user_stack

logger = logging.getLogger("connguard.django")

# Read once: an enum member read from its class costs a descriptor call on 3.11
# (about 10 times a global's read), and the re-acquire path sets it every request.
_READ_COMMITTED = IsolationLevel.READ_COMMITTED

# Each alias's pool, as the last wrapper of that alias found it, with the probe of the
# settings it was found for (see ConnguardWrapperMixin._cg_pool_for). Per process, not
# per wrapper: under ASGI every request gets a wrapper of its own (Django's
# connections are context-local), and each would otherwise build the connection
# parameters and the pool key again to find the same pool.
_known_pools: dict[str, tuple[tuple[Any, ...], Pool]] = {}

# Django's own words for a database call from an event loop's thread.
_ASYNC_UNSAFE = "You cannot call this from an async context - use a thread or sync_to_async."

# Django's own BaseDatabaseWrapper.ensure_connection, once seen there (see
# _replaced_ensure_connection).
_djangos_ensure_connection: Any = None


def _replaced_ensure_connection() -> Any:
    """What replaced Django's ``BaseDatabaseWrapper.ensure_connection``, or None while
    it is Django's own. A test framework replaces it to refuse database access
    (pytest-django's blocker, for a test without ``django_db``); connguard's own
    ``ensure_connection`` must then defer to the replacement as Django's backend
    would, or an unmarked test reaches the database. Django's is recognised by what
    it wraps (``async_unsafe``), not taken at import: the replacement may already be
    in place when this module is imported."""
    global _djangos_ensure_connection
    current = BaseDatabaseWrapper.ensure_connection
    if current is _djangos_ensure_connection:
        return None
    wrapped = getattr(current, "__wrapped__", current)
    if (
        getattr(wrapped, "__qualname__", None) == "BaseDatabaseWrapper.ensure_connection"
        and getattr(wrapped, "__module__", None) == BaseDatabaseWrapper.__module__
    ):
        _djangos_ensure_connection = current
        return None
    return current


class ConnguardWrapperMixin:
    """Mix into a backend's ``DatabaseWrapper`` before Django's class."""

    # Set before Django's __init__ assigns ``self.connection = None``.
    _cg_lease: Lease | None = None
    _cg_cursor_lease: Lease | None = None  # create_cursor -> make_cursor hand-over
    _cg_scope: Scope | None = None
    # Django's short-lived ``__no_db__`` wrapper (CREATE/DROP DATABASE) connects
    # directly: pooling a connection to the maintenance database helps nobody.
    _cg_direct: Any = None

    settings_dict: dict[str, Any]
    alias: str
    savepoint_ids: list[Any]
    atomic_blocks: list[Any]
    run_on_commit: list[Any]
    in_atomic_block: bool
    closed_in_transaction: bool
    needs_rollback: bool
    run_commit_hooks_on_set_autocommit_on: bool
    isolation_level: Any

    # ---------------------------------------------------------------- the connection

    @property
    def connection(self) -> Any:
        lease = self._cg_lease
        if lease is None:
            return self._cg_direct
        raw = lease.peek()
        if raw is None:
            self._cg_lease_lost()
            return None
        scope = self._cg_scope
        if scope is not None and scope is current_or_none() and not scope.ended:
            # owner_scope()'s answer in the common case (a request's own code, under
            # its scope), without the call: Django reads this property a few times
            # per query.
            return raw
        owner = owner_scope()
        if (
            scope is not owner
            and not self.in_atomic_block
            and (scope is None or not encloses(scope, owner))
        ):
            # This thread now works for another request or task (a reused pool
            # thread): the lease belongs to the previous one, which will give it
            # back when it ends. Return it now; Django acquires for the current one.
            # (Not for a scope opened inside the lease's: a task function decorated
            # ``@connguard.scope`` that a view calls goes on with the view's
            # connection, its transaction and session state, as with Django's.)
            self._cg_switch_owner(lease)
            return None
        return raw

    @connection.setter
    def connection(self, value: Any) -> None:
        if value is None:
            self._cg_direct = None
            lease, self._cg_lease = self._cg_lease, None
            if lease is not None:
                self._cg_scope = None
                lease.release()
        elif self.alias == NO_DB_ALIAS:
            self._cg_direct = value
        elif self._cg_lease is None or self._cg_lease.peek() is not value:
            raise ImproperlyConfigured(
                "connguard: a connection can only be set on the wrapper by acquiring it "
                "from the pool (get_new_connection)"
            )

    def _cg_lease_lost(self) -> None:
        """The lease ended elsewhere (its scope ended, or it was taken back)."""
        self._cg_lease = self._cg_scope = None
        if self.in_atomic_block:
            # Continuing the transaction on a new connection would be silently
            # wrong: make Django raise "Cannot open a new connection in an atomic
            # block" at the next use instead.
            self.closed_in_transaction = True
            self.needs_rollback = True

    def _cg_switch_owner(self, lease: Lease) -> None:
        self._cg_lease = None
        self._cg_scope = None
        lease.release()

    @property
    def pool(self) -> None:
        """Django's native pool stays off: connguard's pool replaces it."""
        return None

    def close_pool(self) -> None:
        """Close this alias's pool for the current database (Django calls this before
        cloning a test database, and when the time zone setting changes)."""
        pools.close_pools(alias=self.alias, database=str(self.settings_dict["NAME"]))

    @property
    def connguard_lease(self) -> Lease | None:
        """The lease this wrapper holds now, if any."""
        lease = self._cg_lease
        return lease if lease is not None and lease.active else None

    @property
    def connguard_pool(self) -> Pool | None:
        """The pool of the lease held now (None when none is held)."""
        lease = self.connguard_lease
        return lease.pool if lease is not None else None

    # ---------------------------------------------------------------- Django's hooks

    def ensure_connection(self) -> None:
        """Django's ``ensure_connection()``, with its checks (refused in an event
        loop's thread unless ``DJANGO_ALLOW_ASYNC_UNSAFE``; refused in an atomic block
        whose connection was lost), that takes the common case, a re-acquire
        (:meth:`_cg_reconnect`), without passing through ``connect()``'s two wrappers
        and its second event-loop check: it runs at every request's first query.

        Skipping ``connect()``'s ``sensitive_variables`` marker there hides nothing:
        no frame of that path holds the settings or the connection parameters (the
        pool opens connections on its own threads).

        What a test framework puts in place to refuse database access is honoured as
        Django's backend honours it: a replaced ``BaseDatabaseWrapper.ensure_connection``
        (pytest-django's blocker, Django's ``SimpleTestCase``) is called instead, and
        a ``connect`` replaced on this wrapper is called instead of the short path."""
        if BaseDatabaseWrapper.ensure_connection is not _djangos_ensure_connection:
            replaced = _replaced_ensure_connection()
            if replaced is not None:  # a test framework's: it decides
                replaced.__get__(self, type(self))()
                return
        # Django's check asks get_running_loop(), which raises in the common case (no
        # loop in this thread): about 2,700 instructions for the exception alone.
        # asyncio's own non-raising form answers the same question.
        if _get_running_loop() is not None and not os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE"):
            raise SynchronousOnlyOperation(_ASYNC_UNSAFE)
        if self.connection is None:
            if self.in_atomic_block and self.closed_in_transaction:
                raise ProgrammingError("Cannot open a new connection in an atomic block.")
            try:
                # ``connect`` replaced on this wrapper (Django's SimpleTestCase makes it
                # fail, to refuse database access): its way, not the short one.
                if "connect" in self.__dict__ or not self._cg_reconnect():
                    self.connect()
            except Exception:
                # Django's error translation, entered only when there is an error
                # to translate: the same exception, without a context manager's two
                # calls on every request.
                with self.wrap_database_errors:  # type: ignore[attr-defined]
                    raise

    @async_unsafe
    @sensitive_variables()
    def connect(self) -> None:
        """Django's ``connect()``, with the locals of every frame under it hidden from
        Django's error reports when ``DEBUG`` is off.

        Those reports (``AdminEmailHandler(include_html=True)``, any reporter built on
        ``SafeExceptionReporterFilter``) cleanse the locals of a traceback's frame when
        a ``sensitive_variables`` wrapper is among its callers (the filter walks
        ``f_back``), so this one entry point covers every frame below it, Django's,
        connguard's and the driver's, including those holding the settings dict
        itself (an ``ImproperlyConfigured`` from a bad pool setting). All variables
        rather than a list of names: a driver names its locals as it likes.

        With ``DEBUG=True`` Django cleanses nothing; there the password is safe because
        it is a :class:`MaskedPassword` in the connection parameters, the driver's
        error from a direct connect leaves without its frames, and the pool records
        its opener's connect errors through :func:`~connguard.pool.errors.detach`.

        Most calls take :meth:`_cg_reconnect` instead: a lease from the pool this
        wrapper already used, with Django's set-up for a new connection skipped.
        """
        if not self._cg_reconnect():
            super().connect()  # type: ignore[misc]

    def _cg_reconnect(self) -> bool:
        """Django's ``connect()`` for the common case, about 3x cheaper: the settings
        are those a wrapper of this alias last acquired under (the pool remembered for
        the alias is still theirs; a new wrapper, as every ASGI request has, takes this
        path too) and no isolation level is configured. False: take Django's path.

        A pooled connection is already set up: its driver ran Django's per-connection
        set-up when it was opened (time zone, role, psycopg2's JSON adapters), and
        every reset re-applies it. So, of Django's ``connect()``, this keeps the
        bookkeeping it resets for a new connection, the lease, the time zone check
        (client-side: a holder under reset policy ``"rollback"`` may have changed it)
        and ``connection_created``; and skips building the connection parameters,
        ``set_autocommit()`` (called only when a holder left the driver's connection
        changed, when ``AUTOCOMMIT`` is False, whose "BEGIN" Django logs, or when
        commit hooks wait for it) and the database version check (once per alias).
        """
        if self.alias == NO_DB_ALIAS:
            return False
        # No local holds the settings dict: it has the password, and with DEBUG=True
        # Django's error page shows every frame's locals uncleansed.
        if self.settings_dict["OPTIONS"].get("isolation_level") is not None:
            return False
        pool = self._cg_known_pool()
        if pool is None:
            return False
        if self.settings_dict["TIME_ZONE"] is not None:  # all check_settings() checks
            self.check_settings()  # type: ignore[attr-defined]
        self.in_atomic_block = False
        # Django's connect() makes these lists anew; here an empty one is kept.
        if self.savepoint_ids:
            self.savepoint_ids = []
        if self.atomic_blocks:
            self.atomic_blocks = []
        self.needs_rollback = False
        self.health_check_enabled = self.settings_dict["CONN_HEALTH_CHECKS"]
        max_age = self.settings_dict["CONN_MAX_AGE"]
        self.close_at = None if max_age is None else time.monotonic() + max_age
        self.closed_in_transaction = False
        self.errors_occurred = False
        self.health_check_done = True
        self.isolation_level = _READ_COMMITTED
        # Above _cg_lease_from: this method and ensure_connection() (or connect()),
        # connguard's own frames that the acquire site's walk can skip.
        raw = self._cg_lease_from(pool, skip=4)
        autocommit = self.settings_dict["AUTOCOMMIT"]
        hooks = self.run_commit_hooks_on_set_autocommit_on
        if raw.autocommit != autocommit or not autocommit or hooks:
            # Django's own call: a holder left autocommit changed, or its "BEGIN" is
            # logged (AUTOCOMMIT=False), or commit hooks wait for autocommit.
            self.set_autocommit(autocommit)  # type: ignore[attr-defined]
        else:
            self.autocommit = autocommit
        timezone_name = self.timezone_name  # type: ignore[attr-defined]
        if timezone_name and timezone_name != session_time_zone(raw):
            self.init_connection_state()  # as Django's _configure_timezone: no zone, no SET
        if connection_created.receivers:  # Signal.send() costs a call even with none
            connection_created.send(sender=self.__class__, connection=self)
        if self.run_on_commit:
            self.run_on_commit = []
        return True

    def get_connection_params(self) -> dict[str, Any]:
        """Django's parameters, with ``OPTIONS["pool"]`` stripped (on a copy: the
        user's settings are never mutated; Django itself would refuse the key under
        psycopg2, and it is connguard's, not the driver's) and the password wrapped
        in :class:`MaskedPassword`."""
        options = self.settings_dict["OPTIONS"]
        if "pool" not in options:
            params: dict[str, Any] = super().get_connection_params()  # type: ignore[misc]
        else:
            settings = self.settings_dict
            self.settings_dict = {
                **settings,
                "OPTIONS": {k: v for k, v in options.items() if k != "pool"},
            }
            try:
                params = super().get_connection_params()  # type: ignore[misc]
            finally:
                self.settings_dict = settings
        password = params.get("password")
        if isinstance(password, str) and password:
            params["password"] = MaskedPassword(password)
        return params

    @async_unsafe
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        if self.alias == NO_DB_ALIAS:
            try:
                return super().get_new_connection(conn_params)  # type: ignore[misc]
            except Exception as exc:
                # The driver's frames hold the conninfo, password in clear (psycopg's
                # ``conninfo``, psycopg2's ``dsn``): the error leaves without them,
                # and without psycopg's failed attempt, whose repr shows it too.
                detach(exc)
                forget_attempt(exc)
                raise
        options = self.settings_dict["OPTIONS"]
        isolation = options.get("isolation_level")
        if isolation is None:
            self.isolation_level = IsolationLevel.READ_COMMITTED
        else:
            try:
                self.isolation_level = IsolationLevel(isolation)
            except ValueError:
                raise ImproperlyConfigured(
                    f"Invalid transaction isolation level {isolation} specified. "
                    "Use one of the psycopg.IsolationLevel values."
                ) from None
        connection = self._cg_lease_from(self._cg_pool_for(conn_params))
        if isolation is not None and connection.isolation_level != self.isolation_level:
            connection.isolation_level = self.isolation_level
        return connection

    def _cg_lease_from(self, pool: Pool, skip: int = 2) -> Any:
        """Lease a connection from ``pool`` for the current owner; its driver's
        connection. ``skip``: where the acquire site's walk starts (see
        :func:`~connguard.django.sites.user_stack`)."""
        owner = owner_scope()
        if owner.ended:
            # The request (or task) this code works for is over: the client hung up,
            # or a thread outlived its request. A connection taken now would belong
            # to nobody.
            raise pool._error(  # the driver's OperationalError, wrapped by Django
                LeaseEnded, f"the {owner.describe()} this code works for has ended"
            )
        depth = pool.config.stack_depth
        stack = user_stack(depth, skip) if depth else ()
        journal = owner.journal  # set while a tool watches the scope (debug-toolbar panel)
        began = time.perf_counter() if journal is not None else 0.0
        lease = pool.acquire(owner=owner, stack=stack)
        if journal is not None:
            waited = time.perf_counter() - began
            journal.append({"alias": self.alias, "lease": lease, "waited": waited})
        owner.add(lease)
        self._cg_lease = lease
        self._cg_scope = owner
        return lease.raw

    def _cg_pool_for(self, conn_params: dict[str, Any]) -> Pool:
        """The pool for the current settings, remembered per alias for every wrapper
        of it: the full pool key (``repr`` of every option) costs several microseconds
        per acquire, this check about one. Settings replaced (test databases,
        ``override_settings``, a new ``OPTIONS`` value) change the probe and fall back
        to the registry; two wrappers of one alias on different settings each find
        their own pool (the entry is the last one found).

        Neither the probe nor this frame keeps the password (the probe has its hash,
        as the pool key does): when building a pool fails (a bad pool setting), this
        frame is on the traceback Django's DEBUG page shows with its locals."""
        pool = self._cg_known_pool()
        if pool is not None:
            return pool
        pool = pools.pool_for(self, conn_params)
        _known_pools[self.alias] = (self._cg_probe(snapshot=True), pool)
        return pool

    def _cg_known_pool(self) -> Pool | None:
        """The pool a wrapper of this alias last acquired from, if this wrapper's
        settings are the ones it was found for and it is open."""
        cached = _known_pools.get(self.alias)
        if cached is None:
            return None
        probe, pool = cached
        settings = self.settings_dict
        # _cg_probe(), inlined: this runs at every acquire.
        if probe == (
            settings["NAME"], settings["USER"], settings["HOST"], settings["PORT"],
            hash(settings["PASSWORD"]), self.timezone_name,  # type: ignore[attr-defined]
            settings["OPTIONS"],
        ) and not pool._closed:  # fmt: skip
            return pool
        return None

    def _cg_probe(self, *, snapshot: bool = False) -> tuple[Any, ...]:
        """What the remembered pool depends on. ``OPTIONS`` is compared by value
        against a copy taken when the pool was found (``snapshot``): a key added,
        removed or given another value changes the probe. Dicts of one or two
        entries compare faster than their values' ids can be listed."""
        settings = self.settings_dict
        options = settings["OPTIONS"]
        return (
            settings["NAME"], settings["USER"], settings["HOST"], settings["PORT"],
            hash(settings["PASSWORD"]), self.timezone_name,  # type: ignore[attr-defined]
            dict(options) if snapshot else options,
        )  # fmt: skip

    def init_connection_state(self) -> None:
        lease = self._cg_lease
        if lease is None:
            super().init_connection_state()  # type: ignore[misc]
            return
        BaseDatabaseWrapper.init_connection_state(self)
        # Set up once per physical connection by the driver; here only when the
        # wanted time zone differs (client-side comparison, no round trip).
        with self.wrap_database_errors, lease.using() as connection:  # type: ignore[attr-defined]
            if self._configure_timezone(connection) and not self.get_autocommit():  # type: ignore[attr-defined]
                connection.commit()

    def connguard_setup(self) -> ConnectionSetup:
        """Django's per-connection set-up for a new pool, fixed now: the pool keeps it,
        whatever later happens to this wrapper's settings (a pool is keyed by them, so
        changed settings get a pool of their own)."""
        return ConnectionSetup(
            timezone_name=self.timezone_name,  # type: ignore[attr-defined]
            role=self.settings_dict["OPTIONS"].get("assume_role") or None,
            set_time_zone_sql=self.ops.set_time_zone_sql(),  # type: ignore[attr-defined]
        )

    def _close(self) -> None:
        lease, self._cg_lease = self._cg_lease, None
        if lease is None:
            super()._close()  # type: ignore[misc]
            return
        self._cg_scope = None
        with self.wrap_database_errors:  # type: ignore[attr-defined]
            lease.release()

    def close_if_unusable_or_obsolete(self) -> None:
        """At the start and end of each request (Django's ``close_old_connections``)
        and of each Celery task: give the connection back, whatever ``CONN_MAX_AGE``
        says, unless a transaction is open on it."""
        lease = self._cg_lease
        if lease is not None and not self.in_atomic_block:
            # Django's close() for this case (no atomic block, a lease held), without
            # its checks that cannot fail here: this is the request's own thread.
            self.run_on_commit = []
            self._cg_lease = None
            self._cg_scope = None
            try:
                lease.release()
            except Exception:  # translated as in ensure_connection()
                with self.wrap_database_errors:  # type: ignore[attr-defined]
                    raise

    def close_if_health_check_failed(self) -> None:
        """The pool checks every connection at checkout; no extra round trip."""

    # ---------------------------------------------------------------- fenced uses

    def create_cursor(self, name: Any = None) -> Any:
        """Make the driver's cursor inside the fence and remember which lease it was
        made under: its later calls are fenced by that lease, whatever the wrapper
        holds by then."""
        lease = self._cg_lease
        if lease is None:
            return super().create_cursor(name)  # type: ignore[misc]
        lease.enter()  # its LeaseEnded translated by Django's _cursor(), the only caller
        try:
            cursor = super().create_cursor(name)  # type: ignore[misc]
        finally:
            lease.exit()
        self._cg_cursor_lease = lease
        return cursor

    def is_usable(self) -> bool:
        """Django's check (``SELECT 1`` on the driver's connection), inside the fence."""
        lease = self._cg_lease
        if lease is None:
            return bool(super().is_usable())  # type: ignore[misc]
        try:
            with lease.using():
                return bool(super().is_usable())  # type: ignore[misc]
        except LeaseEnded:
            return False

    def make_cursor(self, cursor: Any) -> Any:
        return FencedCursorWrapper(cursor, self)

    def make_debug_cursor(self, cursor: Any) -> Any:
        return FencedCursorDebugWrapper(cursor, self)

    def _commit(self) -> None:
        lease = self._cg_lease
        if lease is None:
            super()._commit()  # type: ignore[misc]
            return
        with (
            debug_transaction(self, "COMMIT"),  # connection.queries and the log, as Django
            self.wrap_database_errors,  # type: ignore[attr-defined]
            lease.using() as connection,
        ):
            connection.commit()

    def _rollback(self) -> None:
        lease = self._cg_lease
        if lease is None:
            super()._rollback()  # type: ignore[misc]
            return
        with (
            debug_transaction(self, "ROLLBACK"),
            self.wrap_database_errors,  # type: ignore[attr-defined]
            lease.using() as connection,
        ):
            connection.rollback()

    def _set_autocommit(self, autocommit: bool) -> None:
        lease = self._cg_lease
        if lease is None:
            super()._set_autocommit(autocommit)  # type: ignore[misc]
            return
        with self.wrap_database_errors, lease.using() as connection:  # type: ignore[attr-defined]
            connection.autocommit = autocommit
