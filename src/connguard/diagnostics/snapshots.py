"""Every worker process's pools, seen from any one of them.

A server such as gunicorn runs several worker processes, and an HTTP request for the
status reaches one of them, which can only read its own pools. So each process that
serves requests *publishes* a snapshot of its pools (the report of
:mod:`connguard.diagnostics.status`, with its pid, host and time) to a directory the
workers share, once a second, from a daemon thread of its own; the process that
answers reads the others' snapshots from there and adds its own, taken now.

A file per process (``<pid>.json``), replaced atomically (written aside, then
``os.replace``), so a reader never sees half a snapshot. A snapshot whose process is
gone (its pid no longer exists on this host) or that has not been refreshed for
``stale_after`` seconds (a stuck or killed worker) is left out, and the file of a
dead process is removed by whoever finds it. Nothing here knows about Django: the
Django layer says which pools, which directory, and when to start.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from connguard.pool import Pool

from . import status

logger = logging.getLogger("connguard.diagnostics")

__all__ = ["Board", "Publisher", "default_directory", "process_snapshot"]


def process_snapshot(
    pools: Iterable[Pool], *, clock: Callable[[], float] = time.time
) -> dict[str, Any]:
    """This process's pools, as one JSON-ready dict: ``pid``, ``host``, ``taken_at``
    (Unix time) and ``pools`` (:func:`connguard.diagnostics.status.report`)."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "taken_at": clock(),
        "pools": status.report(pools),
    }


def default_directory(site: str = "") -> Path:
    """Where the workers of one server meet when no directory is configured: a
    directory under the system's temporary directory named after the user, the
    workers' common parent (gunicorn's master, uvicorn's supervisor) and ``site`` (a
    digest of what tells sites apart: the Django layer passes the settings module and
    the working directory), so two servers on one host do not mix, even when one
    supervisor runs several sites."""
    digest = hashlib.sha256(site.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"connguard-status-{os.getuid()}-{os.getppid()}-{digest}"


def _ours(directory: Path) -> bool:
    """The directory belongs to this user and nobody else may write in it: a shared
    temporary directory must not let another user plant or read snapshots."""
    try:
        info = directory.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process with that pid: not ours, but alive
        return True
    return True


class Board:
    """The shared directory: publish this process's snapshot, read everyone's."""

    def __init__(
        self,
        directory: Path,
        *,
        stale_after: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.stale_after = stale_after
        self._clock = clock

    def publish(self, snapshot: dict[str, Any]) -> None:
        """Write ``snapshot`` as this process's (atomically)."""
        pid = snapshot["pid"]
        target = self.directory / f"{pid}.json"
        aside = self.directory / f".{pid}.{threading.get_ident()}.tmp"
        text = json.dumps(snapshot, default=str)
        for attempt in (1, 2):  # a worker that withdrew may have just removed the directory
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not _ours(self.directory):
                raise PermissionError(
                    f"{self.directory} is not this user's own, or others may write in it"
                )
            try:
                aside.write_text(text)
                os.replace(aside, target)
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise

    def withdraw(self, pid: int | None = None) -> None:
        """Remove a process's snapshot (this one's by default), and the directory
        once no process has one there."""
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"{pid or os.getpid()}.json").unlink()
        with contextlib.suppress(OSError):  # not empty (other workers), or gone
            self.directory.rmdir()

    def read(self, *, exclude: int | None = None) -> list[dict[str, Any]]:
        """Every live process's latest snapshot, oldest pid first; ``exclude``: a pid
        to leave out (the reader's own, which it takes fresh)."""
        out: list[dict[str, Any]] = []
        now = self._clock()
        if not _ours(self.directory):
            return out
        try:
            files = sorted(self.directory.glob("*.json"))
        except OSError:
            return out
        for path in files:
            try:
                pid = int(path.stem)
            except ValueError:
                continue
            if pid == exclude:
                continue
            if not _alive(pid):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            try:
                snapshot = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # replaced or removed while being read: next time
            if now - float(snapshot.get("taken_at", 0)) > self.stale_after:
                continue
            out.append(snapshot)
        out.sort(key=lambda snapshot: int(snapshot["pid"]))
        return out


class Publisher:
    """A daemon thread that publishes this process's snapshot every ``interval``
    seconds, and withdraws it when the process exits. Fork-aware: :meth:`ensure`
    (cheap, call it often) starts a thread in a process that has none, so a forked
    worker publishes under its own pid."""

    def __init__(
        self,
        board: Board,
        pools: Callable[[], Iterable[Pool]],
        *,
        interval: float = 1.0,
    ) -> None:
        self.board = board
        self._pools = pools
        self.interval = interval
        self._pid: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def ensure(self) -> None:
        """Start publishing from this process, once per process."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._stop = threading.Event()
            # A daemon thread dies at exit without its finally: withdraw then.
            atexit.register(self.board.withdraw, self._pid)
            thread = threading.Thread(
                target=self._run, args=(self._stop,), name="connguard-status", daemon=True
            )
            thread.start()

    def publish_now(self) -> None:
        self.board.publish(process_snapshot(self._pools()))

    def stop(self) -> None:
        """Stop publishing and withdraw this process's snapshot (tests, shutdown)."""
        self._stop.set()
        self._pid = None
        self.board.withdraw()

    def _run(self, stop: threading.Event) -> None:
        pid = os.getpid()
        try:
            while not stop.is_set() and os.getpid() == pid:
                try:
                    self.publish_now()
                except Exception as exc:  # a full disk must not kill the thread
                    logger.warning("connguard: cannot publish status to %s: %s",
                                   self.board.directory, exc)  # fmt: skip
                stop.wait(self.interval)
        finally:
            if os.getpid() == pid:
                self.board.withdraw(pid)
