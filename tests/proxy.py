"""An in-process TCP proxy that injects network faults (a small toxiproxy).

Pool behaviour under failure depends on *how* the network fails: a reset is noticed
at once, a refused connect fails fast, a partition (packets silently lost) is noticed
only through timeouts, and latency stretches every round trip. A proxy in front of
the server reproduces each of these on demand, on loopback, without root or
iptables, and without touching the server itself.

One thread accepts; each proxied connection (a *pair*: client side and upstream side)
gets one thread that forwards both directions with ``select``. Every blocking call is
bounded or woken through a per-pair wake-up socket, so :meth:`FaultProxy.close`
returns promptly.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from typing import Final

_CHUNK: Final = 65536
_SELECT_TIMEOUT: Final = 0.5  # safety net only: wake-ups normally end a select early
_SEND_TIMEOUT: Final = 0.1
_CONNECT_TIMEOUT: Final = 2.0
_JOIN_TIMEOUT: Final = 1.0
_LINGER_RST: Final = struct.pack("ii", 1, 0)


def _abort(sock: socket.socket) -> None:
    """Close with RST instead of FIN: the peer sees "connection reset"."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    sock.close()


def _parse_conninfo(conninfo: str) -> list[tuple[str, str]]:
    """Split a libpq ``key=value ...`` string, honouring quotes and backslashes."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(conninfo)
    while True:
        while i < n and conninfo[i].isspace():
            i += 1
        if i >= n:
            return pairs
        eq = conninfo.find("=", i)
        if eq < 0:
            raise ValueError(f"missing '=' after {conninfo[i:]!r} in conninfo")
        key = conninfo[i:eq].strip()
        i = eq + 1
        while i < n and conninfo[i].isspace():
            i += 1
        value: list[str] = []
        if i < n and conninfo[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise ValueError("unterminated quoted value in conninfo")
                c = conninfo[i]
                if c == "\\" and i + 1 < n:
                    value.append(conninfo[i + 1])
                    i += 2
                elif c == "'":
                    i += 1
                    break
                else:
                    value.append(c)
                    i += 1
        else:
            while i < n and not conninfo[i].isspace():
                if conninfo[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(conninfo[i])
                i += 1
        pairs.append((key, "".join(value)))


def _quote_conninfo(value: str) -> str:
    if value and not any(c.isspace() or c in "'\\" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class _Pair:
    """One proxied connection: a client socket, its upstream socket and their thread."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.reset_requested = False
        self.done = threading.Event()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self.thread = threading.Thread(target=self._run, name="FaultProxy-pair", daemon=True)

    def request_reset(self) -> None:
        """Ask the pair's thread to abort both sides (it owns the sockets)."""
        self.reset_requested = True
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _run(self) -> None:
        reset = False
        try:
            reset = self._forward()
        except OSError:
            reset = True
        finally:
            self._close(reset or self.reset_requested)
            self.proxy._forget(self)
            self.done.set()

    def _forward(self) -> bool:
        """Forward until a side closes; return True if the pair must end with RST."""
        try:
            upstream = socket.create_connection(
                (self.proxy.target_host, self.proxy.target_port), timeout=_CONNECT_TIMEOUT
            )
        except OSError:
            return True  # the server is gone: the client sees a reset
        self.upstream = upstream
        for sock in (self.client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(_SEND_TIMEOUT)
        peers = {self.client: upstream, upstream: self.client}
        dead: set[socket.socket] = set()
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            for sock in peers:
                sel.register(sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                # A partition hides a close from the other side too, until it heals.
                if dead and not self.proxy.blackholed:
                    return False
                for key, _ in sel.select(_SELECT_TIMEOUT):
                    sock = key.fileobj
                    if sock is self._wake_r or not isinstance(sock, socket.socket):
                        continue
                    try:
                        data = sock.recv(_CHUNK)
                    except (ConnectionResetError, BrokenPipeError):
                        return True
                    except TimeoutError:
                        continue
                    if not data:
                        dead.add(sock)
                        sel.unregister(sock)
                        continue
                    if self.proxy.blackholed or peers[sock] in dead:
                        continue
                    delay = self.proxy.delay
                    if delay > 0 and self._stop.wait(delay):
                        return self.reset_requested
                    if not self._send_all(peers[sock], data):
                        return True
        return self.reset_requested

    def _send_all(self, sock: socket.socket, data: bytes) -> bool:
        """Send everything unless asked to stop; a timed-out send sent nothing."""
        view = memoryview(data)
        while view:
            if self._stop.is_set():
                return False
            try:
                sent = sock.send(view)
            except TimeoutError:
                continue
            except OSError:
                return False
            view = view[sent:]
        return True

    def _close(self, reset: bool) -> None:
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            if reset:
                _abort(sock)
            else:
                sock.close()
        self._wake_r.close()
        self._wake_w.close()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_host:target_port``.

    Faults: :meth:`reset_all` (connections reset), :meth:`stop` (server gone:
    resets and refused connects, until :meth:`start`), :meth:`blackhole` (packets
    vanish, nothing is closed) and :meth:`set_delay` (latency per forwarded chunk).
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._host = "127.0.0.1"
        self._port: int | None = None
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._accept_stop = threading.Event()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._closed = False
        self._blackholed = False
        self._delay = 0.0

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Listen (on a fresh port the first time, on the same port afterwards)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this FaultProxy is closed")
            if self._listener is not None:
                raise RuntimeError("this FaultProxy is already started")
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((self._host, self._port or 0))
                listener.listen(128)
            except BaseException:
                listener.close()
                raise
            self._port = int(listener.getsockname()[1])
            self._listener = listener
            self._wake_r, self._wake_w = socket.socketpair()
            self._accept_stop = threading.Event()
            self._acceptor = threading.Thread(
                target=self._accept_loop,
                args=(listener, self._wake_r, self._accept_stop),
                name="FaultProxy-accept",
                daemon=True,
            )
            self._acceptor.start()

    def stop(self) -> None:
        """Simulate the server going away: refuse new connects, reset open ones.

        :meth:`start` brings the proxy back on the same port.
        """
        with self._lock:
            acceptor, wake_w = self._acceptor, self._wake_w
            self._accept_stop.set()
            self._acceptor = None
        if wake_w is not None:
            try:
                wake_w.send(b"x")
            except OSError:
                pass
        if acceptor is not None:
            acceptor.join(_JOIN_TIMEOUT)
        with self._lock:
            # The accept thread closed the listener; these are ours to close.
            self._listener = None
            for sock in (self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()
            self._wake_r = self._wake_w = None
        self.reset_all()

    def close(self) -> None:
        """Stop everything and join the threads. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.stop()

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- faults --------------------------------------------------------------------

    def reset_all(self) -> None:
        """Abort every open proxied connection with RST, on both sides, and wait
        until they are closed."""
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.request_reset()
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for pair in pairs:
            pair.done.wait(max(0.0, deadline - time.monotonic()))

    def blackhole(self, on: bool = True) -> None:
        """Silently drop all bytes both ways, on open and new connections alike,
        closing nothing: a network partition. ``blackhole(False)`` heals it."""
        self._blackholed = on

    def set_delay(self, seconds: float) -> None:
        """Add ``seconds`` of latency to every chunk forwarded, in either direction."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._delay = float(seconds)

    # -- properties ----------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the port is chosen by start(); call it first")
        return self._port

    @property
    def blackholed(self) -> bool:
        return self._blackholed

    @property
    def delay(self) -> float:
        return self._delay

    @property
    def connections(self) -> int:
        """How many proxied connections are open right now."""
        with self._lock:
            return len(self._pairs)

    def dsn(self, base_dsn: str) -> str:
        """``base_dsn`` (libpq ``key=value`` form) pointed at this proxy instead."""
        out: list[str] = []
        for key, value in _parse_conninfo(base_dsn):
            if key in ("host", "hostaddr", "port"):
                continue
            out.append(f"{key}={_quote_conninfo(value)}")
        return " ".join([f"host={self.host}", f"port={self.port}", *out])

    # -- internals -----------------------------------------------------------------

    def _accept_loop(
        self, listener: socket.socket, wake: socket.socket, stop: threading.Event
    ) -> None:
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(listener, selectors.EVENT_READ)
                sel.register(wake, selectors.EVENT_READ)
                while not stop.is_set():
                    ready = sel.select(_SELECT_TIMEOUT)
                    if stop.is_set():
                        return
                    if not any(key.fileobj is listener for key, _ in ready):
                        continue
                    try:
                        client, _ = listener.accept()
                    except (BlockingIOError, TimeoutError, InterruptedError):
                        continue
                    except OSError:
                        return
                    with self._lock:
                        if stop.is_set():
                            _abort(client)
                            return
                        pair = _Pair(self, client)
                        self._pairs.add(pair)
                    pair.thread.start()
        finally:
            listener.close()

    def _forget(self, pair: _Pair) -> None:
        with self._lock:
            self._pairs.discard(pair)
