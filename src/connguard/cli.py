"""The ``connguard`` command: see the pool's guarantees on a real server in seconds.

``connguard demo`` exists so that a newcomer can check the claim the whole project
rests on (many threads, a bounded number of server connections, nothing leaked)
without writing a Django project first: it starts a throwaway PostgreSQL (or uses
``--dsn``), hammers one pool from many threads, and measures the server side
independently through ``pg_stat_activity`` rather than trusting the pool's own
gauges.

Errors a user can cause (bad options, an unreachable server, a missing driver or
missing PostgreSQL binaries) end in one ``connguard: error: ...`` line and exit
status 2, never a traceback, and never a password: every DSN and every driver
message goes through :func:`mask_dsn` before it is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TextIO

from connguard import __version__
from connguard.drivers import load_driver
from connguard.pool import Driver, Pool, PoolConfig

__all__ = ["main", "mask_dsn"]

PROG = "connguard"
DEMO_APP_NAME = "connguard-demo"
"""``application_name`` of the pool's connections: what the sampler counts."""
MONITOR_APP_NAME = "connguard-demo-monitor"
"""The sampler's own connection, named differently so that it never counts itself."""
DEMO_QUERY = "SELECT pg_sleep(0.002)"
SAMPLE_INTERVAL = 0.05
EMBEDDED_MAX_CONNECTIONS = 40
CONNECT_TIMEOUT = 5.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# -- masking ---------------------------------------------------------------------------

_MASK = "***"
# URL user info: ``scheme://user:secret@``. libpq ends the user info at the first '/',
# so the secret runs to the last '@' before it: over-masking an invalid URL is fine,
# printing part of a password is not.
_URL_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*):[^/\s]*@")
# A URL query parameter: ``?password=...`` or ``&sslpassword=...`` (value percent-encoded).
_URL_PASSWORD = re.compile(r"(?P<head>[?&]\w*password)=[^&#\s]*", re.IGNORECASE)
# A conninfo keyword: ``password=secret``, ``password = 'a \' b'``, ``sslpassword=...``.
# Not after '?' or '&': those are URL parameters, handled above without eating the rest.
_CONNINFO_PASSWORD = re.compile(
    r"(?<![?&\w])(?P<key>\w*password)\s*=\s*(?:'(?:[^'\\]|\\.)*'?|\S*)", re.IGNORECASE
)


def mask_dsn(text: str) -> str:
    """Hide every password in ``text``: a libpq conninfo string, a URL, or a message
    that quotes either.

    Applied to anything that may echo a DSN before it is printed, because terminal
    output ends up in CI logs, bug reports and screenshots. Covers ``password`` and
    ``sslpassword`` keywords (quoted or not), ``user:secret@`` in URLs, and password
    parameters in a URL's query string.
    """
    text = _URL_USERINFO.sub(lambda m: f"{m['head']}:{_MASK}@", text)
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}={_MASK}", text)
    return _CONNINFO_PASSWORD.sub(lambda m: f"{m['key']}={_MASK}", text)


def _first_line(text: str) -> str:
    """First non-empty line: driver and server errors span several lines (hints, log
    tails) and the contract is one line on stderr."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _one_line(exc: BaseException) -> str:
    """An exception as one masked line, for messages we did not write ourselves."""
    return mask_dsn(_first_line(str(exc)) or type(exc).__name__)


# -- argument parsing ------------------------------------------------------------------


class CliError(Exception):
    """A failure the user can act on: reported as one line, exit status 2."""


class _UsageError(Exception):
    """Raised instead of argparse's print-usage-and-exit, so the report stays one line
    and :func:`main` can return the status instead of raising SystemExit."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (got {value!r})")
    return number


def _build_parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="connguard: a bounded, leak-proof, observable PostgreSQL connection pool.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="run many threads through one small pool against PostgreSQL",
        description=(
            "Start a throwaway PostgreSQL (or use --dsn), run THREADS threads of short "
            "queries through one pool of at most MAX_SIZE connections, and show that the "
            "server never saw more than MAX_SIZE of them, with the pool's statistics."
        ),
    )
    demo.add_argument(
        "--dsn",
        help="use this server (libpq conninfo or URL) instead of starting one",
    )
    demo.add_argument("--threads", type=_positive_int, default=50, help="default: 50")
    demo.add_argument("--queries-per-thread", type=_positive_int, default=40, help="default: 40")
    demo.add_argument(
        "--max-size", type=_positive_int, default=10, help="pool max_size (default: 10)"
    )
    demo.add_argument(
        "--driver",
        choices=("psycopg", "psycopg2"),
        default=None,
        help="default: psycopg if installed, else psycopg2",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON document")
    demo.set_defaults(func=_cmd_demo)
    return parser


# -- demo ------------------------------------------------------------------------------


@dataclass
class _Sampler:
    """Counts the pool's backends on the server every ``SAMPLE_INTERVAL`` seconds.

    A separate plain connection, not the pool, so that the bound is checked by the
    server rather than by the code under test; the pool's own size is sampled too,
    for comparison.
    """

    driver: Driver
    conn: Any
    pool: Pool
    stop: threading.Event = field(default_factory=threading.Event)
    peak_backends: int = 0
    peak_pool_size: int = 0
    samples: int = 0
    error: BaseException | None = None
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                (DEMO_APP_NAME,),
            )
            row = cur.fetchone()
        self.peak_backends = max(self.peak_backends, int(row[0]))
        self.peak_pool_size = max(self.peak_pool_size, self.pool.stats().size)
        self.samples += 1

    def _run(self) -> None:
        try:
            self.sample()
            while not self.stop.wait(SAMPLE_INTERVAL):
                self.sample()
        except Exception as exc:
            self.error = exc

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="connguard-demo-sampler")
        self._thread.daemon = True
        self._thread.start()

    def halt(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def finish(self) -> None:
        """Stop sampling and take one last sample, so a very short run counts too."""
        self.halt()
        if self.error is None:
            try:
                self.sample()
            except Exception as exc:
                self.error = exc


@dataclass
class _Work:
    """What the worker threads share: the pool, the start and stop signals, and one
    tally slot per thread (each thread writes only its own, so no lock is needed)."""

    pool: Pool
    queries: int
    done: list[int]
    go: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)

    def worker(self, index: int) -> None:
        """Run ``queries`` short queries, one lease each; stop everyone on the first error.

        ``conn.cursor()`` rather than ``conn.execute()``: psycopg2 connections have no
        ``execute``.
        """
        self.go.wait()
        for _ in range(self.queries):
            if self.stop.is_set():
                return
            try:
                with self.pool.connection() as conn, conn.cursor() as cur:
                    cur.execute(DEMO_QUERY)
                    cur.fetchone()
            except Exception as exc:
                if not self.stop.is_set():
                    self.errors.append(exc)
                    self.stop.set()
                return
            self.done[index] += 1


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Let cleanup finish even if Ctrl-C is pressed again: a half-cleaned-up run would
    leave a postmaster and its files behind. Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _LogCollector(logging.Handler):
    """Keeps the pool's warnings for the report instead of letting them interleave with
    it on stderr (on Ctrl-C in a terminal the server is interrupted too, and the
    pool's reconnect warnings would bury the one-line "interrupted")."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.messages) < 100:
            self.messages.append(mask_dsn(_first_line(record.getMessage())))


@contextlib.contextmanager
def _collect_pool_logs() -> Iterator[_LogCollector]:
    logger = logging.getLogger("connguard")
    collector = _LogCollector()
    propagate = logger.propagate
    logger.addHandler(collector)
    logger.propagate = False
    try:
        yield collector
    finally:
        logger.removeHandler(collector)
        logger.propagate = propagate


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C back until the block ends, then raise KeyboardInterrupt.

    For server start-up: interrupting initdb or the postmaster half-way makes the
    server's children die uncleanly, leaving shared-memory segments behind. The block
    takes well under a second. A failure in the block after Ctrl-C (from a terminal,
    the server's processes get the signal too) is reported as the interrupt it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    except Exception:
        if pending:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def _connect_monitor(driver_name: str | None, dsn: str) -> tuple[Driver, Any]:
    try:
        driver = load_driver(driver_name, conninfo=dsn, application_name=MONITOR_APP_NAME)
    except ImportError as exc:
        raise CliError(_one_line(exc)) from None
    try:
        conn = driver.connect(CONNECT_TIMEOUT)
    except Exception as exc:
        raise CliError(f"cannot connect to '{mask_dsn(dsn)}': {_one_line(exc)}") from None
    return driver, conn


def _start_embedded(max_size: int) -> Any:
    """Start the throwaway server; imported lazily so ``--dsn`` and ``--version`` work
    without the test bed's imports, and missing binaries become one clear line."""
    from connguard.testing.postgres import EmbeddedPostgres, find_bin_dir  # noqa: PLC0415

    try:
        find_bin_dir()
    except RuntimeError as exc:
        raise CliError(f"{_one_line(exc)}; or pass --dsn to use a running server") from None
    # Room for the pool, the sampler and a margin, even with a larger --max-size.
    server = EmbeddedPostgres(max_connections=max(EMBEDDED_MAX_CONNECTIONS, max_size + 10))
    try:
        with _sigint_deferred():
            server.start()
    except RuntimeError as exc:
        server.cleanup()
        raise CliError(f"cannot start the embedded PostgreSQL: {_one_line(exc)}") from None
    except BaseException:
        server.cleanup()
        raise
    return server


def _ms(hist: dict[str, Any] | None) -> dict[str, float]:
    if not hist:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    return {k: round(float(hist[k]) * 1000.0, 3) for k in ("p50", "p99", "max", "mean")}


def _run_demo(args: argparse.Namespace, dsn: str, server_label: str) -> dict[str, Any]:
    """Run the threads against ``dsn`` and return the JSON-ready result.

    The pool, the sampler and the threads are torn down however this ends (success,
    error or Ctrl-C); the caller owns only the server.
    """
    threads, queries, max_size = args.threads, args.queries_per_thread, args.max_size
    monitor_driver, monitor = _connect_monitor(args.driver, dsn)
    pool: Pool | None = None
    sampler: _Sampler | None = None
    work: _Work | None = None
    workers: list[threading.Thread] = []
    try:
        with monitor.cursor() as cur:
            cur.execute("SHOW server_version")
            server_version = str(cur.fetchone()[0])
        driver = load_driver(args.driver, conninfo=dsn, application_name=DEMO_APP_NAME)
        config = PoolConfig(min_size=min(2, max_size), max_size=max_size, timeout=10.0)
        pool = Pool(driver, config, name="demo")
        sampler = _Sampler(monitor_driver, monitor, pool)
        sampler.start()
        work = _Work(pool, queries, [0] * threads)
        for i in range(threads):
            t = threading.Thread(
                target=work.worker,
                args=(i,),
                name=f"connguard-demo-{i}",
                daemon=True,  # never keep a Ctrl-C'd process alive
            )
            t.start()
            workers.append(t)
        started = time.perf_counter()
        work.go.set()  # all threads start together, to contend for real
        for t in workers:
            t.join()
        elapsed = time.perf_counter() - started
        sampler.finish()
        if sampler.error is not None:
            raise CliError(f"sampling pg_stat_activity failed: {_one_line(sampler.error)}")
        stats = pool.stats().as_dict()
    finally:
        with _sigint_ignored():
            if work is not None:
                work.stop.set()
                work.go.set()
            if sampler is not None:
                sampler.halt()
            if pool is not None:
                pool.close()  # wakes waiters with PoolClosed
            deadline = time.monotonic() + 5.0
            for t in workers:
                t.join(max(0.0, deadline - time.monotonic()))
            monitor_driver.close(monitor)
    errors = work.errors
    total = sum(work.done)
    return {
        "server": server_label,
        "server_version": server_version,
        "dsn": mask_dsn(dsn),
        "driver": driver.name,
        "threads": threads,
        "queries_per_thread": queries,
        "queries_expected": threads * queries,
        "queries_done": total,
        "errors": len(errors),
        "first_error": _one_line(errors[0]) if errors else None,
        "elapsed_s": round(elapsed, 4),
        "queries_per_s": round(total / elapsed, 1) if elapsed > 0 else None,
        "max_size": max_size,
        "peak_server_backends": sampler.peak_backends,
        "peak_pool_size": sampler.peak_pool_size,
        "samples": sampler.samples,
        "bounded": sampler.peak_backends <= max_size and sampler.peak_pool_size <= max_size,
        "latency_ms": {
            "acquire_wait": _ms(stats["acquire_wait"]),
            "hold_time": _ms(stats["hold_time"]),
        },
        "stats": stats,
    }


def _print_table(result: dict[str, Any], out: TextIO) -> None:
    stats = result["stats"]
    wait, hold = result["latency_ms"]["acquire_wait"], result["latency_ms"]["hold_time"]
    gauges = ("size", "idle", "in_use", "waiting", "opening", "closing")
    counters = (
        "acquires", "releases", "waits", "timeouts", "refusals", "resets", "opened",
        "connect_errors", "health_check_failures", "leaks",
    )  # fmt: skip
    closed = [k for k in stats if k.startswith("closed_")]
    bounded = "bounded" if result["bounded"] else "NOT BOUNDED"
    qps = result["queries_per_s"]
    rows = [
        ("server", f"{result['server']} (PostgreSQL {result['server_version']})"),
        ("driver", result["driver"]),
        ("threads", str(result["threads"])),
        (
            "queries done",
            f"{result['queries_done']} / {result['queries_expected']} "
            f"({result['threads']} x {result['queries_per_thread']})",
        ),
        ("elapsed", f"{result['elapsed_s']:.2f} s" + (f" ({qps:.0f} queries/s)" if qps else "")),
        (
            "peak server backends",
            f"{result['peak_server_backends']} (max_size {result['max_size']}: {bounded}; "
            f"{result['threads']} threads shared them)",
        ),
        ("peak pool size", f"{result['peak_pool_size']} ({result['samples']} samples)"),
        ("pool gauges", " ".join(f"{k}={stats[k]}" for k in gauges)),
        ("pool counters", " ".join(f"{k}={stats[k]}" for k in counters[:5])),
        ("", " ".join(f"{k}={stats[k]}" for k in counters[5:])),
        ("closed", " ".join(f"{k.removeprefix('closed_')}={stats[k]}" for k in closed)),
        ("acquire wait", f"p50 {wait['p50']:.3f} ms  p99 {wait['p99']:.3f} ms  "
                         f"max {wait['max']:.3f} ms"),
        ("hold time", f"p50 {hold['p50']:.3f} ms  p99 {hold['p99']:.3f} ms  "
                      f"max {hold['max']:.3f} ms"),
    ]  # fmt: skip
    if result["pool_warnings"]:
        warnings = result["pool_warnings"]
        rows.append(("pool warnings", f"{len(warnings)}, first: {warnings[0]}"))
    if result["errors"]:
        rows.append(("errors", f"{result['errors']}: {result['first_error']}"))
    width = max(len(label) for label, _ in rows)
    print(f"{PROG} demo: one pool, many threads", file=out)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}", file=out)
    print("  (latencies are histogram bucket bounds: upper estimates)", file=out)


def _cmd_demo(args: argparse.Namespace) -> int:
    server: Any = None
    try:
        if args.dsn is not None:
            dsn, label = args.dsn, f"--dsn {mask_dsn(args.dsn)}"
        else:
            server = _start_embedded(args.max_size)
            dsn, label = server.dsn, f"embedded, {server.host}:{server.port}"
        with _collect_pool_logs() as logs:
            result = _run_demo(args, dsn, label)
        result["pool_warnings"] = logs.messages
    finally:
        if server is not None:
            with _sigint_ignored():
                server.cleanup()
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_table(result, sys.stdout)
    sys.stdout.flush()
    ok = (
        result["errors"] == 0
        and result["bounded"]
        and result["queries_done"] == result["queries_expected"]
    )
    if not ok:
        reason = result["first_error"] or "the pool exceeded max_size"
        print(f"{PROG}: error: demo failed: {reason}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# -- entry point -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status instead of exiting, for tests."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        # Masked: "unrecognized arguments" may echo a mis-quoted DSN's password.
        print(f"{PROG}: error: {mask_dsn(_first_line(str(exc)))}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    try:
        status: int = args.func(args)
    except CliError as exc:
        # Built from masked parts already: masking again could swallow the punctuation
        # that follows a masked DSN.
        print(f"{PROG}: error: {_first_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # ``connguard demo --json | head``: the reader left; the work is done and cleaned
        # up. Point stdout at devnull so the interpreter's final flush stays quiet.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    return status


if __name__ == "__main__":
    sys.exit(main())
