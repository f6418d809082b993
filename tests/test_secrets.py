"""No password on Django's DEBUG page, in logs or in errors.

A private PostgreSQL requires scram over TCP; the password holds quotes, spaces and
``@:/%\\`` (and ``&<>``, which HTML escapes). Connection errors are forced through the
connguard ENGINE with ``DEBUG=True`` inside a request, one Django process per driver
and fault, because Django's settings can be configured once per process:

* ``auth``: a wrong password in ``DATABASES`` (the server rejects it);
* ``down``: the database unreachable (``ConnectFailed``);
* ``timeout``: a ``PoolTimeout`` whose cause is a connect error (another request holds
  a connection and the role's password was rotated meanwhile);
* ``nodb``: the direct, unpooled connect of Django's ``__no_db__`` wrapper (CREATE
  DATABASE and friends) with a wrong password: the driver's own error;
* ``config``: a bad pool setting (``ImproperlyConfigured`` raised while the pool is
  built, from frames holding the settings dict) with ``DEBUG=False``, rendered as
  ``AdminEmailHandler(include_html=True)`` would.

The child renders what a user or an operator would see: the technical 500 page the
handler returns (HTML) and its text version, every log record at DEBUG (connguard,
Django, psycopg), ``str``/``repr`` of the exception and of each exception in its chain,
the ``repr`` of the pool and its drivers, and its own stdout/stderr. The parent then
looks for each secret in every escaping that could show it: raw, ``repr``-escaped,
HTML-escaped, URL-encoded, conninfo-quoted, JSON, and the secret's distinctive
fragments alone (which catches any other escaping).
"""

from __future__ import annotations

import html
import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from connguard.testing.postgres import EmbeddedPostgres

pytestmark = [pytest.mark.real, pytest.mark.private]

ROOT = Path(__file__).resolve().parent.parent
DRIVERS = ["psycopg", "psycopg2"]


FAULTS = [
    "auth",
    "down",
    "timeout",
    "nodb",
    "config",
    "config_debug",
]


def make_secret(label: str) -> tuple[str, list[str]]:
    """A password with every awkward character, and its distinctive fragments.

    The fragments are random per run, so finding one anywhere is a leak whatever the
    escaping around it."""
    first, second = (f"{label}{secrets.token_hex(5)}" for _ in range(2))
    return f'o\'Ma "{first}" @:/%\\ 100% {second}&<>', [first, second]


PASSWORD, PASSWORD_TOKENS = make_secret("Pw")
WRONG, WRONG_TOKENS = make_secret("Wr")
ROTATED, ROTATED_TOKENS = make_secret("Ro")


def conninfo_quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def forms(secret: str) -> set[str]:
    """Every way the secret could be spelled in a page, a log or a repr."""
    spelled = {
        secret,
        repr(secret)[1:-1],
        repr(secret.encode())[2:-1],
        json.dumps(secret)[1:-1],
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
        conninfo_quoted(secret),
        conninfo_quoted(secret)[1:-1],
    }
    return spelled | {html.escape(form, quote=q) for form in spelled for q in (True, False)}


NEEDLES = sorted(
    {
        *forms(PASSWORD),
        *forms(WRONG),
        *forms(ROTATED),
        *PASSWORD_TOKENS,
        *WRONG_TOKENS,
        *ROTATED_TOKENS,
    },
    key=len,
    reverse=True,
)


def leaks(text: str) -> list[str]:
    """Each needle found in ``text``, with some context."""
    found = []
    for needle in NEEDLES:
        at = text.find(needle)
        if at >= 0:
            found.append(f"{needle!r} in ...{text[max(0, at - 200) : at + 80]!r}...")
    return found


def sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def scram_pg() -> Iterator[EmbeddedPostgres]:
    """A private server whose superuser has PASSWORD; scram required over TCP."""
    server = EmbeddedPostgres(max_connections=30, password=PASSWORD)
    server.start()
    try:
        server.psql("CREATE DATABASE secrets_site")
        yield server
    finally:
        server.cleanup()


def test_the_server_requires_the_password(scram_pg: EmbeddedPostgres) -> None:
    """Otherwise the ``auth`` fault would prove nothing."""
    import psycopg

    kwargs: dict[str, Any] = {"host": scram_pg.host, "port": scram_pg.port, "user": "postgres"}
    with psycopg.connect(**kwargs, password=PASSWORD, dbname="secrets_site") as conn:
        assert conn.info.parameter_status("server_version")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**kwargs, password=WRONG, dbname="secrets_site")
    hba = scram_pg.psql("SELECT DISTINCT auth_method FROM pg_hba_file_rules WHERE type = 'host'")
    assert hba.split() == ["scram-sha-256"]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("driver", DRIVERS)
def test_no_password_on_debug_page_in_logs_or_errors(
    scram_pg: EmbeddedPostgres, tmp_path: Path, driver: str, fault: str
) -> None:
    config = {
        "driver": driver,
        "fault": fault,
        "host": scram_pg.host,
        "port": free_port() if fault == "down" else scram_pg.port,
        "password": WRONG if fault in ("auth", "nodb") else PASSWORD,
        "debug": fault != "config",
        "pool": {"max_size": "many"} if fault.startswith("config") else None,
        "admin": {
            "host": str(scram_pg.socket_dir),
            "port": scram_pg.port,
            "user": "postgres",
            "dbname": "postgres",
        },
        "others": [PASSWORD, WRONG, ROTATED],
        "rotate": f"ALTER ROLE postgres PASSWORD {sql_literal(ROTATED)}",
        "restore": f"ALTER ROLE postgres PASSWORD {sql_literal(PASSWORD)}",
        "out": str(tmp_path / "out.json"),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "DJANGO"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src")])
    try:
        result = subprocess.run(
            [sys.executable, "-c", "import tests.test_secrets as t; t.child()"],
            input=json.dumps(config),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
    finally:
        scram_pg.psql(config["restore"])  # in case the child died before restoring it
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    seen = json.loads(Path(config["out"]).read_text())

    # The scenario happened as intended, and the page shows frames with their locals
    # (Django's connect() frame holds the connection parameters; the short path a
    # wrapper takes to a pool its alias already uses, here after the holder's acquire,
    # holds neither them nor the settings dict): otherwise finding no password would
    # prove nothing.
    assert seen["status"] == 500
    chain = "\n".join(seen["chain"])
    expected = {
        "auth": ["ConnectFailed", "password authentication failed"],
        "down": ["ConnectFailed", "unreachable"],
        "timeout": ["in_use=1", "password authentication failed"],
        "nodb": ["password authentication failed"],
        "config": ["ImproperlyConfigured", "max_size"],
        "config_debug": ["ImproperlyConfigured", "max_size"],
    }[fault]
    for what in expected:
        assert what in chain, chain
    assert seen["pool_timeout"] == (fault in ("auth", "down", "timeout")), chain
    if fault == "nodb":
        assert "connguard.pool" not in chain, chain
    pages = [seen["html"], seen["page"]] if fault != "config" else [seen["html"]]
    for page in pages:
        assert "local vars" in page.lower()
        assert "conn_params" in page or (fault == "timeout" and "_cg_reconnect" in page)
    if seen["pool_timeout"]:
        assert "cannot connect" in seen["log"], seen["log"][-3000:]  # the pool's warning
    assert "Internal Server Error" in seen["log"]
    assert "DATABASES" in seen["text"]  # the settings section is there
    assert "'PASSWORD': '********************'" in seen["safe_databases"]

    artifacts = {
        **{key: value for key, value in seen.items() if isinstance(value, str)},
        "chain": chain,
        "reprs": "\n".join(seen["reprs"]),
        "stdout": result.stdout,
        "stderr": result.stderr,
    }
    found = {name: hits for name, text in artifacts.items() if (hits := leaks(text))}
    assert not found, json.dumps(found, indent=1)[:6000]
    assert seen["frames_with_password"] == []


# -- the child: one Django process per (driver, fault) ------------------------------------


def child() -> None:
    """Configure Django, force the fault inside a request, render what shows it."""
    import io
    import logging
    import threading
    from pprint import pformat

    config = json.loads(sys.stdin.read())
    if config["driver"] == "psycopg2":
        sys.modules["psycopg"] = None  # type: ignore[assignment]  # Django falls back
    global FAULT
    FAULT = config["fault"]

    import django
    from django.conf import settings

    pool = config["pool"] or {
        "min_size": 0,
        "max_size": 2,
        "timeout": 1.5,
        "connect_timeout": 2,
        "reconnect_backoff": 0.1,
    }
    settings.configure(
        DEBUG=config["debug"],
        ALLOWED_HOSTS=["*"],
        SECRET_KEY="not-a-secret-" + "x" * 40,
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=["connguard.django"],
        MIDDLEWARE=[],
        USE_TZ=True,
        DATABASES={
            "default": {
                "ENGINE": "connguard.backends.postgresql",
                "HOST": config["host"],
                "PORT": config["port"],
                "NAME": "secrets_site",
                "USER": "postgres",
                "PASSWORD": config["password"],
                "OPTIONS": {"pool": pool},
            }
        },
    )
    django.setup()

    # Every record at DEBUG, from connguard, Django (request, template, db) and psycopg.
    records = io.StringIO()
    handler = logging.StreamHandler(records)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    for name in ("", "connguard", "django", "psycopg", "py.warnings"):
        logging.getLogger(name).setLevel(logging.DEBUG)
        logging.getLogger(name).addHandler(handler)
    logging.captureWarnings(True)

    from django.core.signals import got_request_exception
    from django.db import connection, connections
    from django.test import Client
    from django.views.debug import ExceptionReporter, SafeExceptionReporterFilter

    from connguard.django import pools
    from connguard.pool import PoolTimeout

    seen: dict[str, Any] = {}

    def on_exception(sender: Any, request: Any, **kwargs: Any) -> None:
        """The exception as the handler sees it: render both reports, walk the chain."""
        exc_type, exc, tb = sys.exc_info()
        reporter = ExceptionReporter(request, exc_type, exc, tb, is_email=not settings.DEBUG)
        seen["text"] = reporter.get_traceback_text()
        seen["html"] = reporter.get_traceback_html()
        # Which frames would show it, by name: pinpoints a leak the page has.
        secrets = [repr(s)[1:-1] for s in [config["password"], *config["others"]]]
        seen["frames_with_password"] = [
            frame["function"]
            for frame in reporter.get_traceback_frames()
            if any(s in pformat(value) for s in secrets for _, value in frame.get("vars", ()))
        ]
        chain: list[str] = []
        pool_timeout = False
        current: BaseException | None = exc
        while current is not None and len(chain) < 40:
            chain += [f"{type(current).__module__}.{type(current).__qualname__}"]
            chain += [str(current), repr(current), repr(getattr(current, "pgconn", None))]
            pool_timeout = pool_timeout or isinstance(current, PoolTimeout)
            current = current.__cause__ or current.__context__
        seen["chain"] = chain
        seen["pool_timeout"] = pool_timeout

    got_request_exception.connect(on_exception)

    holding = threading.Event()
    done = threading.Event()

    def hold() -> None:
        """Another request, holding the connection it got before the rotation."""
        try:
            connections["default"].ensure_connection()
            holding.set()
            done.wait(30)
        finally:
            connections["default"].close()

    holder = None
    admin = None
    if FAULT == "timeout":
        holder = threading.Thread(target=hold)
        holder.start()
        assert holding.wait(10), "the holder could not connect"
        admin = connection.Database.connect(**config["admin"])  # unix socket: trust
        admin.autocommit = True
        admin.cursor().execute(config["rotate"])
    try:
        response = Client(raise_request_exception=False).get("/boom/")
    finally:
        if admin is not None:
            admin.cursor().execute(config["restore"])
            admin.close()
        done.set()
        if holder is not None:
            holder.join(10)
    seen["status"] = response.status_code
    seen["page"] = response.content.decode()
    # (connection.settings_dict is the user's own dict, never mutated, so its repr shows
    # the password: what the page shows of it is the cleansed settings section.)
    reprs = [repr(connection)]
    for each in pools.pools():
        reprs += [repr(each), repr(each.driver), repr(getattr(each.driver, "base", None))]
        reprs += [str(each.stats())]
    seen["reprs"] = reprs
    seen["safe_databases"] = repr(SafeExceptionReporterFilter().get_safe_settings()["DATABASES"])
    connections.close_all()
    pools.close_pools()
    handler.flush()
    seen["log"] = records.getvalue()
    Path(config["out"]).write_text(json.dumps(seen))


FAULT = ""


def boom(request: Any) -> Any:
    """A view whose first query needs a connection (``nodb``: a direct connect)."""
    from django.db import connection, connections
    from django.db.backends.base.base import NO_DB_ALIAS
    from django.http import HttpResponse

    if FAULT == "nodb":
        wrapper = connections["default"]
        direct = type(wrapper)({**wrapper.settings_dict}, alias=NO_DB_ALIAS)
        try:
            direct.ensure_connection()
        finally:
            direct.close()
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return HttpResponse("ok")


from django.urls import path  # noqa: E402 - the child's ROOT_URLCONF is this module

urlpatterns = [path("boom/", boom)]
