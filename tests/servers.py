"""Real servers for the acceptance tests: start the docsite under runserver,
gunicorn, uvicorn or daphne, fire bursts of requests, and watch the database.

The machinery lives in the package (``connguard.demo.servers``, ``.load``,
``.sampler``), because ``connguard demo`` needs it from an installed wheel. This
module runs the site from the repository instead (the Django test runner imports
the ``tests`` package) and keeps the names the tests and benchmarks use.

Every process is started in its own session and ended by its PID (process group);
every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from connguard.demo.load import Burst, burst, image_paths
from connguard.demo.sampler import BackendSampler
from connguard.demo.servers import (
    SERVERS,
    SETTINGS,
    Launcher,
    Server,
    command,
    free_port,
    get,
    stop,
    wait_ready,
)
from connguard.testing.postgres import EmbeddedPostgres

__all__ = [
    "ROOT",
    "SERVERS",
    "SETTINGS",
    "BackendSampler",
    "Burst",
    "Server",
    "burst",
    "command",
    "django_script",
    "docsite_database",
    "free_port",
    "get",
    "image_paths",
    "manage",
    "running",
    "running_command",
    "running_one_worker",
    "site_env",
    "stop",
    "wait_ready",
]

ROOT = Path(__file__).resolve().parent.parent
_LAUNCHER = Launcher(cwd=ROOT, python_path=(str(ROOT),))


def site_env(db: Mapping[str, Any], **env: str) -> dict[str, str]:
    return _LAUNCHER.env(db, env)


def manage(db: Mapping[str, Any], *args: str, **env: str) -> str:
    return _LAUNCHER.manage(db, args, env)


def django_script(script: str, **env: str) -> Any:
    """Run ``script``, which configures Django itself, in a fresh interpreter with
    ``env`` added (and no ``DJANGO_SETTINGS_MODULE``); return the JSON that its last
    line prints."""
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]), **env}
    full.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=full, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@contextmanager
def docsite_database(
    max_connections: int, migrate_as: str
) -> Iterator[tuple[EmbeddedPostgres, dict[str, Any]]]:
    """A private PostgreSQL with the docsite's database, migrated (the migration's
    connections tagged ``migrate_as``); removed on exit. For module fixtures."""
    pg = EmbeddedPostgres(max_connections=max_connections)
    pg.start()
    try:
        pg.psql("CREATE DATABASE docsite")
        db = {"HOST": pg.host, "PORT": pg.port, "NAME": "docsite", "USER": "postgres"}
        manage(db, "migrate", "-v", "0", DOCSITE_APP_NAME=migrate_as)
        yield pg, db
    finally:
        pg.cleanup()


@contextmanager
def running(server: str, db: Mapping[str, Any], log_dir: Path, **env: str) -> Iterator[Server]:
    """Run ``server`` with the docsite; stop it (by process group) on exit."""
    with _LAUNCHER.running(server, db, log_dir, env) as srv:
        yield srv


@contextmanager
def running_command(
    name: str, args: list[str], processes: int, db: Mapping[str, Any], log_dir: Path, **env: str
) -> Iterator[Server]:
    """Serve the site with a command line of the test's own (``args`` after
    ``python -m``, ``{port}`` replaced by a free port): a server run in a way
    :func:`running` does not offer (gunicorn ``--preload``, a config file). Stopped by
    process group on exit."""
    port = free_port()
    log = log_dir / f"{name}-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", *(arg.format(port=port) for arg in args)],
            cwd=ROOT,
            env=site_env(db, **env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    srv = Server(name, port, proc, log, processes)
    try:
        wait_ready(srv)
        yield srv
    finally:
        stop(proc)


@contextmanager
def running_one_worker(db: Mapping[str, Any], log_dir: Path, **env: str) -> Iterator[Server]:
    """The site under gunicorn gthread with one worker process (``running`` starts
    two): for a test that brings the one pool into a state, then checks what that
    pool answers to a burst."""
    args = command("gunicorn", 0)[2:]  # after ``python -m``
    args[args.index("-w") + 1] = "1"
    bind = args.index("-b") + 1
    args[bind] = args[bind].rsplit(":", 1)[0] + ":{port}"
    with running_command("gunicorn", args, 1, db, log_dir, **env) as srv:
        yield srv
