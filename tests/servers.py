"""Real servers for the acceptance tests: start the docsite under runserver,
gunicorn, uvicorn or daphne, fire bursts of requests, and watch the database.

Every process is started in its own session and ended by its PID (process group);
every wait has a deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = "connguard.demo.site.settings"

# name -> (command builder, worker processes)
SERVERS: dict[str, int] = {
    "runserver": 1,
    "runserver-daphne": 1,
    "gunicorn": 2,
    "uvicorn": 1,
    "daphne": 1,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(server: str, port: int) -> list[str]:
    py = sys.executable
    bind = f"127.0.0.1:{port}"
    if server in ("runserver", "runserver-daphne"):
        return [py, "-m", "django", "runserver", bind, "--noreload", f"--settings={SETTINGS}"]
    if server == "gunicorn":
        return [
            py, "-m", "gunicorn", "connguard.demo.site.wsgi:application", "-k", "gthread",
            "--threads", "8", "-w", str(SERVERS["gunicorn"]), "-b", bind,
            "--log-level", "warning",
        ]  # fmt: skip
    if server == "uvicorn":
        return [
            py, "-m", "uvicorn", "connguard.demo.site.asgi:application", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning",
        ]  # fmt: skip
    if server == "daphne":
        return [py, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                "connguard.demo.site.asgi:application"]  # fmt: skip
    raise ValueError(f"unknown server {server!r}")


def site_env(db: Mapping[str, Any], **env: str) -> dict[str, str]:
    out = dict(os.environ)
    out.update(
        {
            "PYTHONPATH": str(ROOT),
            "DJANGO_SETTINGS_MODULE": SETTINGS,
            "DOCSITE_DB": json.dumps(dict(db)),
            "PYTHONWARNINGS": "ignore",
        }
    )
    out.update(env)
    return out


def manage(db: Mapping[str, Any], *args: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "django", *args, f"--settings={SETTINGS}"],
        cwd=ROOT,
        env=site_env(db, **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"manage {args} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    processes: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextmanager
def running(server: str, db: Mapping[str, Any], log_dir: Path, **env: str) -> Iterator[Server]:
    """Run ``server`` with the docsite; stop it (by process group) on exit."""
    if server == "runserver-daphne":
        env = {**env, "DOCSITE_DAPHNE": "1"}
    port = free_port()
    log = log_dir / f"{server}-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command(server, port),
            cwd=ROOT,
            env=site_env(db, **env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    srv = Server(server, port, proc, log, SERVERS[server])
    try:
        wait_ready(srv)
        yield srv
    finally:
        stop(proc)


def wait_ready(srv: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.process.poll() is not None:
            raise RuntimeError(f"{srv.name} exited at start:\n{srv.log_text()[-3000:]}")
        try:
            status, _, _ = get(srv.port, "/connguard/stats", timeout=2)
            if status == 200:
                return
        except OSError:
            pass
        threading.Event().wait(0.05)
    raise RuntimeError(f"{srv.name} not ready within {timeout} s:\n{srv.log_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # Workers of our process group that outlived their parent.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def get(port: int, path: str, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


@dataclass
class Burst:
    statuses: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    retry_after: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.errors) + sum(1 for s in self.statuses if s != 200)


def burst(port: int, paths: list[str], concurrency: int, timeout: float = 30.0) -> Burst:
    """GET every path, ``concurrency`` at a time (a browser loading many images)."""
    result = Burst()
    lock = threading.Lock()

    def one(path: str) -> None:
        started = time.monotonic()
        try:
            status, headers, _ = get(port, path, timeout=timeout)
        except OSError as exc:
            with lock:
                result.errors.append(f"{path}: {exc!r}")
            return
        with lock:
            result.statuses.append(status)
            result.latencies.append(time.monotonic() - started)
            if "retry-after" in headers:
                result.retry_after.append(headers["retry-after"])

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, paths))
    return result


def image_paths(count: int, prefix: str = "") -> list[str]:
    return [f"{prefix}/doc/{1 + i % 9}/page/{1 + i % 30}.png" for i in range(count)]


class BackendSampler:
    """Samples the server's own view of this site's backends every 20 ms."""

    def __init__(self, dsn: str, app_name: str) -> None:
        self.dsn = dsn
        self.app_name = app_name
        self.peak = 0
        self.samples: list[tuple[float, int, int]] = []  # (t, backends, idle in transaction)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._conn = psycopg.connect(dsn, autocommit=True, application_name="docsite-sampler")

    def count(self) -> tuple[int, int]:
        row = self._conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE state LIKE 'idle in transaction%%') "
            "FROM pg_stat_activity WHERE split_part(application_name, '|cg|', 1) = %s",
            (self.app_name,),
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            n, idle_tx = self.count()
            self.peak = max(self.peak, n)
            self.samples.append((time.monotonic(), n, idle_tx))

    def __enter__(self) -> BackendSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def wait_for(self, predicate: Any, timeout: float) -> tuple[int, int]:
        """Poll until ``predicate(backends)`` holds; return the last count."""
        deadline = time.monotonic() + timeout
        while True:
            n, idle_tx = self.count()
            if predicate(n) or time.monotonic() >= deadline:
                return n, idle_tx
            self._stop.wait(0.05)

    def close(self) -> None:
        self._conn.close()
