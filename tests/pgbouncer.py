"""A real PgBouncer in front of a test PostgreSQL (Debian's ``pgbouncer`` package).

PgBouncer refuses to run as root; as root it runs under the same service account as
the embedded PostgreSQL. It listens on 127.0.0.1 (no Unix socket), trusts every
client (the upstream server trusts them too), and is stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connguard.demo.servers import free_port
from connguard.testing.postgres import _service_account, _user_kwargs

START_TIMEOUT = 10.0


def binary() -> str:
    """The pgbouncer executable; the test is skipped when it is not installed (a
    failure under CI: see conftest.py)."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if found is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    return found


class PgBouncer:
    """One pgbouncer process; ``settings`` go to its ``[pgbouncer]`` section."""

    def __init__(self, upstream_host: str, upstream_port: int, user: str, **settings: Any):
        self.host = "127.0.0.1"
        self.port = free_port()
        self.user = user
        self._dir = Path(tempfile.mkdtemp(prefix="connguard-pgbouncer-"))
        self._dir.chmod(0o755)
        run_as = _service_account()
        self._uid, self._gid, self._groups = _user_kwargs(run_as)
        self.log_path = self._dir / "pgbouncer.log"
        ini = {
            "listen_addr": self.host,
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self._dir / "users.txt"),
            "admin_users": user,
            "logfile": str(self.log_path),
            "ignore_startup_parameters": "extra_float_digits,options",
            **{name: str(value) for name, value in settings.items()},
        }
        (self._dir / "users.txt").write_text(f'"{user}" ""\n')
        lines = ["[databases]", f"* = host={upstream_host} port={upstream_port}", "[pgbouncer]"]
        lines += [f"{name} = {value}" for name, value in ini.items()]
        (self._dir / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
        for path in self._dir.iterdir():
            path.chmod(0o644)
        if self._uid is not None:
            self.log_path.touch()
            os.chown(self.log_path, self._uid, self._gid or -1)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [binary(), str(self._dir / "pgbouncer.ini")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            cwd=self._dir,
            user=self._uid,
            group=self._gid,
            extra_groups=self._groups,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited at start:\n{self.log_text()[-2000:]}")
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"pgbouncer not listening after {START_TIMEOUT} s:\n{self.log_text()}"
                    ) from None
                time.sleep(0.02)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self._dir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console (simple query protocol), as dicts."""
        with psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            dbname="pgbouncer",
            autocommit=True,
            cursor_factory=psycopg.ClientCursor,
        ) as admin:
            cursor = admin.execute(f"SHOW {what}")
            names = [column.name for column in cursor.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def database(self, db: Mapping[str, Any]) -> dict[str, Any]:
        """The docsite's database settings, through this pgbouncer."""
        return {**db, "HOST": self.host, "PORT": self.port}


@contextmanager
def running_pgbouncer(
    upstream_host: str, upstream_port: int, user: str, **settings: Any
) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(upstream_host, upstream_port, user, **settings)
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.stop()
