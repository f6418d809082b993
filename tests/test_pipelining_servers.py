"""HTTP/1.1 pipelining under ASGI servers: each request has its own scope.

A client may send several requests on one connection before reading any answer.
uvicorn and daphne then start each next request from inside the previous one's last
``send()``, so its task runs in a copy of the previous request's context, asgiref's
per-request context included (Django 5.2's handler keeps one it finds; Django 6
runs the request in that task). connguard finds an ASGI request's scope through that
context, so two requests share it: each must still get, and end, its own scope. The
docsite runs under each server against a private PostgreSQL; the client is a raw
socket that writes three requests at once and reads three answers.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connguard.testing.postgres import EmbeddedPostgres

from .servers import docsite_database, running

pytestmark = [pytest.mark.real, pytest.mark.private, pytest.mark.servers]


@pytest.fixture(scope="module")
def site_db() -> Iterator[tuple[EmbeddedPostgres, dict[str, Any]]]:
    with docsite_database(max_connections=30, migrate_as="docsite-migrate") as found:
        yield found


class Reader:
    """HTTP/1.1 answers read off one socket in order (Content-Length or chunked)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.data:
            chunk = self.sock.recv(65536)
            assert chunk, self.data
            self.data += chunk
        found, self.data = self.data.split(marker, 1)
        return found

    def _exactly(self, size: int) -> bytes:
        while len(self.data) < size:
            chunk = self.sock.recv(65536)
            assert chunk, self.data
            self.data += chunk
        found, self.data = self.data[:size], self.data[size:]
        return found

    def answer(self) -> tuple[int, bytes]:
        lines = self._until(b"\r\n\r\n").split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.lower().split(b":", 1) for line in lines[1:])
        if b"content-length" in headers:
            return status, self._exactly(int(headers[b"content-length"]))
        assert headers.get(b"transfer-encoding", b"").strip() == b"chunked", headers
        body = b""
        while size := int(self._until(b"\r\n"), 16):
            body += self._exactly(size)
            self._until(b"\r\n")
        self._until(b"\r\n")
        return status, body


@pytest.mark.parametrize("server", ["uvicorn", "daphne"])
def test_pipelined_requests_each_get_their_own_scope(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, server: str
) -> None:
    _, db = site_db
    with running(server, db, tmp_path, DOCSITE_APP_NAME=f"pipelined-{server}") as srv:
        for _ in range(3):  # three connections, three pipelined requests each
            with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as sock:
                sock.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
                reader = Reader(sock)
                answers = [reader.answer() for _ in range(3)]
            assert [status for status, _ in answers] == [200, 200, 200], (
                f"{answers}\n{srv.log_text()[-3000:]}"
            )


@pytest.mark.parametrize("stream", ["/stream/doc/1", "/x/astream-slow?ms=10&chunks=2"])
@pytest.mark.parametrize("server", ["uvicorn", "daphne"])
def test_pipelined_requests_after_a_streamed_response_keep_their_scopes(
    site_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, server: str, stream: str
) -> None:
    """A streamed response first (sync or async, each chunk querying), then two plain
    requests, pipelined. ``ConnguardMiddleware`` ends the stream's scope when the
    stream ends; the next request then started in the stream's context, and the
    stream's own ``request_finished`` (Django closes the response after its last
    send) ended the oldest scope still open there: the next request's, whose query
    was refused ("this code works for has ended"), and so on down the line (found by
    a review). Each ``request_finished`` ends its own request's scope."""
    _, db = site_db
    env = {
        "DOCSITE_APP_NAME": f"pipelined-stream-{server}",
        "DOCSITE_EXTRA_URLS": "tests.site_hangups",
    }
    with running(server, db, tmp_path, **env) as srv:
        for _ in range(3):  # three connections: a stream, then two requests, each
            with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as sock:
                sock.sendall(
                    f"GET {stream} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                    + b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n" * 2
                )
                reader = Reader(sock)
                answers = [reader.answer() for _ in range(3)]
            assert [status for status, _ in answers] == [200, 200, 200], (
                f"{answers}\n{srv.log_text()[-3000:]}"
            )
