"""The report's load: a burst of parallel image loads, as a browser showing a document.

Each request is a GET on a fresh HTTP connection, ``concurrency`` at a time, so the
server sees that many requests in flight. Results are recorded as they arrive, under
a lock, so that a live view can read the counts while the burst runs.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from .servers import get

__all__ = ["Burst", "burst", "image_paths"]


@dataclass
class Burst:
    """What came back: statuses and latencies of the responses, errors of the requests
    that got none, and why each failed request failed."""

    statuses: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    retry_after: list[str] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    """``"HTTP 500"``, ``"connection refused"``...: failed requests by what the client saw."""
    started: float | None = None
    finished: float | None = None
    """``time.monotonic()`` when the first request was sent and the last one answered."""

    @property
    def failed(self) -> int:
        return len(self.errors) + sum(1 for s in self.statuses if s != 200)

    @property
    def done(self) -> int:
        """Requests answered or failed so far."""
        return len(self.statuses) + len(self.errors)


def _client_error(exc: OSError) -> str:
    """What a browser would show: timed out, refused, reset, or the error's name."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    return type(exc).__name__


def burst(
    port: int,
    paths: list[str],
    concurrency: int,
    timeout: float = 30.0,
    *,
    into: Burst | None = None,
    cancel: threading.Event | None = None,
) -> Burst:
    """GET every path, ``concurrency`` at a time (a browser loading many images).

    ``into`` receives the results as they arrive (for a live view); ``cancel`` stops
    sending new requests. The worker threads are daemons: a Ctrl-C'd caller never
    waits for requests in flight to a server it is about to stop.
    """
    result = into if into is not None else Burst()
    stop = cancel if cancel is not None else threading.Event()
    lock = threading.Lock()
    pending: Iterator[str] = iter(paths)

    def one(path: str) -> None:
        started = time.monotonic()
        try:
            status, headers, _ = get(port, path, timeout=timeout)
        except OSError as exc:
            with lock:
                result.errors.append(f"{path}: {exc!r}")
                result.failures[_client_error(exc)] += 1
            return
        with lock:
            result.statuses.append(status)
            result.latencies.append(time.monotonic() - started)
            if status != 200:
                result.failures[f"HTTP {status}"] += 1
            if "retry-after" in headers:
                result.retry_after.append(headers["retry-after"])

    def worker() -> None:
        while not stop.is_set():
            with lock:
                path = next(pending, None)
            if path is None:
                return
            one(path)

    threads = [
        threading.Thread(target=worker, name=f"burst-{i}", daemon=True)
        for i in range(max(1, min(concurrency, len(paths))))
    ]
    result.started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.finished = time.monotonic()
    return result


def image_paths(count: int, prefix: str = "") -> list[str]:
    """``count`` page images of the public documents 1..9, pages 1..30, in turn."""
    return [f"{prefix}/doc/{1 + i % 9}/page/{1 + i % 30}.png" for i in range(count)]
