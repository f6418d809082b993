"""Start the report's site under a real web server, and stop it without leftovers.

The demo, the acceptance tests and the benchmarks all run the site this way: one
``python -m <server>`` process per run, configured entirely by environment variables
(see :mod:`connguard.demo.site.settings`), started in its own session so that the
whole process group (gunicorn's workers too) can be ended by its id, and never by
name. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEMO_SERVERS",
    "SERVERS",
    "SERVER_MODULES",
    "SETTINGS",
    "Launcher",
    "PortInUse",
    "Server",
    "command",
    "free_port",
    "get",
    "port_in_use",
    "stop",
    "wait_ready",
]

HOST = "127.0.0.1"
SETTINGS = "connguard.demo.site.settings"

SERVERS: dict[str, int] = {
    "runserver": 1,
    "runserver-daphne": 1,
    "gunicorn": 2,
    "uvicorn": 1,
    "daphne": 1,
}
"""Each server the site runs under, with its number of worker processes: the budget of
backends is processes x ``max_size``."""

DEMO_SERVERS = ("uvicorn", "daphne", "gunicorn")
"""The servers ``connguard demo --server`` offers: the two ASGI servers, where stock
Django leaks, and gunicorn (threaded WSGI), where it holds one connection per thread."""

SERVER_MODULES: dict[str, str] = {
    "runserver": "django",
    "runserver-daphne": "daphne",
    "gunicorn": "gunicorn",
    "uvicorn": "uvicorn",
    "daphne": "daphne",
}
"""The module each server needs, to say "not installed" before starting anything."""

GUNICORN_THREADS = 8
_STOP_TIMEOUT = 10.0
_BIND_FAILURES = ("address already in use", "errno 98", "couldn't listen on")


class PortInUse(RuntimeError):
    """The web server could not bind its port: something else listens there."""

    def __init__(self, port: int) -> None:
        super().__init__(f"port {port} on {HOST} is in use")
        self.port = port


def free_port() -> int:
    """A port nobody listens on right now (the kernel's pick, so rarely contended)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    """True when binding ``port`` fails the way a web server's bind would.

    ``SO_REUSEADDR``, as every server sets it: connections of an earlier run left in
    TIME_WAIT do not count, a listener does.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def command(server: str, port: int) -> list[str]:
    """The command line that serves the site with ``server`` on ``port``."""
    py = sys.executable
    bind = f"{HOST}:{port}"
    if server in ("runserver", "runserver-daphne"):
        return [py, "-m", "django", "runserver", bind, "--noreload", f"--settings={SETTINGS}"]
    if server == "gunicorn":
        return [
            py, "-m", "gunicorn", "connguard.demo.site.wsgi:application", "-k", "gthread",
            "--threads", str(GUNICORN_THREADS), "-w", str(SERVERS["gunicorn"]), "-b", bind,
            "--log-level", "warning",
        ]  # fmt: skip
    if server == "uvicorn":
        return [
            py, "-m", "uvicorn", "connguard.demo.site.asgi:application", "--host", HOST,
            "--port", str(port), "--log-level", "warning",
        ]  # fmt: skip
    if server == "daphne":
        return [py, "-m", "daphne", "-b", HOST, "-p", str(port),
                "connguard.demo.site.asgi:application"]  # fmt: skip
    raise ValueError(f"unknown server {server!r}")


@dataclass
class Server:
    """A running site: its port, its process (the group leader) and its log."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    processes: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass(frozen=True)
class Launcher:
    """Where and how site processes start.

    The demo starts them in its own temporary directory: ``python -m`` puts the
    working directory first on ``sys.path``, so whatever sits in the user's current
    directory could otherwise shadow Django or the site. The test suite starts them
    from the repository, with the repository on ``PYTHONPATH``, because Django's test
    runner there imports the ``tests`` package.
    """

    cwd: Path | None = None
    python_path: tuple[str, ...] = ()

    def env(self, db: Mapping[str, Any], overrides: Mapping[str, str]) -> dict[str, str]:
        """The site's environment: ours, the database as ``DOCSITE_DB``, ``overrides``."""
        out = dict(os.environ)
        if self.python_path:
            out["PYTHONPATH"] = os.pathsep.join(
                [*self.python_path, *filter(None, [os.environ.get("PYTHONPATH")])]
            )
        out.update(
            {
                "DJANGO_SETTINGS_MODULE": SETTINGS,
                "DOCSITE_DB": json.dumps(dict(db)),
                "PYTHONWARNINGS": "ignore",
            }
        )
        out.update(overrides)
        return out

    def manage(
        self,
        db: Mapping[str, Any],
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        cwd: Path | None = None,
        timeout: float = 120.0,
    ) -> str:
        """Run ``django-admin <args>`` for the site; return its stdout.

        In its own session, killed with its group however this ends (Ctrl-C, a
        timeout): a half-done ``migrate`` must not outlive the caller. Raises
        RuntimeError with the command's output when it fails.
        """
        proc = subprocess.Popen(
            [sys.executable, "-m", "django", *args, f"--settings={SETTINGS}"],
            cwd=cwd or self.cwd,
            env=self.env(db, env or {}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise RuntimeError(f"manage {list(args)} did not finish within {timeout} s") from None
        except BaseException:
            stop(proc)
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"manage {list(args)} failed:\n{out}\n{err}")
        return out

    @contextlib.contextmanager
    def running(
        self,
        server: str,
        db: Mapping[str, Any],
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        ready_timeout: float = 30.0,
    ) -> Iterator[Server]:
        """Serve the site with ``server`` until the block ends, then stop it (by process
        group). Raises :class:`PortInUse` when the port is taken, RuntimeError (with the
        log's tail) when the server does not come up."""
        overrides = dict(env or {})
        if server == "runserver-daphne":
            overrides["DOCSITE_DAPHNE"] = "1"
        port = free_port() if port is None else port
        log = log_dir / f"{server}-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command(server, port),
                cwd=self.cwd or log_dir,
                env=self.env(db, overrides),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        srv = Server(server, port, proc, log, SERVERS[server])
        try:
            wait_ready(srv, ready_timeout)
            yield srv
        finally:
            stop(proc)


def wait_ready(srv: Server, timeout: float = 30.0) -> None:
    """Poll the site until it answers; fail early if the server process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.process.poll() is not None:
            log = srv.log_text()
            if any(marker in log.lower() for marker in _BIND_FAILURES):
                raise PortInUse(srv.port)
            raise RuntimeError(f"{srv.name} exited at start:\n{log[-3000:]}")
        try:
            status, _, _ = get(srv.port, "/connguard/stats", timeout=2)
            if status == 200:
                return
        except OSError:
            pass
        threading.Event().wait(0.05)
    raise RuntimeError(f"{srv.name} not ready within {timeout} s:\n{srv.log_text()[-3000:]}")


def stop(proc: subprocess.Popen[Any]) -> None:
    """End the process group led by ``proc``: SIGTERM, then SIGKILL after a while."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait(timeout=_STOP_TIMEOUT)
    _kill_group(proc)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL what is left of the group (workers that outlived their parent).

    Only while the leader is unreaped or just reaped by us: the group id is the
    leader's pid, which the kernel does not reuse while group members live.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def get(port: int, path: str, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """One GET on a fresh connection: status, lower-cased headers, body."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()
