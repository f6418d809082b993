"""The ``connguard`` command line.

``connguard demo`` is the user report (:data:`connguard.demo.USER_REPORT`: a site
whose connections piled up, idle and never reused, until PostgreSQL refused new
ones), reproduced and fixed in one command: the report's site under a real web
server, the report's burst of image loads against stock Django and then against
connguard, what PostgreSQL saw, side by side (see :mod:`connguard.demo`).

Each subcommand is one ``add_<name>_command`` function that registers its parser on
the subparsers object and points it at one ``cmd_<name>`` function; :data:`COMMANDS`
lists them. A command returns its exit status.

Errors a user can cause (bad options, a port in use, an unreachable server, missing
packages or PostgreSQL binaries) end in one ``connguard: error: ...`` line and exit
status 2, never a traceback, and never a password: every message that may quote a
DSN goes through :func:`mask_dsn` before it is printed. Ctrl-C ends with
``connguard: interrupted`` and status 130 after everything started was removed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from connguard import __version__
from connguard.demo import USER_REPORT, DemoError

if TYPE_CHECKING:
    from rich.console import Console

    from connguard.demo.runner import DemoOptions

__all__ = ["COMMANDS", "main", "mask_dsn"]

PROG = "connguard"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
DEBUG_ENV_VAR = "CONNGUARD_DEBUG"
"""Set to 1 to get the traceback of an unexpected error instead of one line."""

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


def _error(message: str) -> None:
    print(f"{PROG}: error: {mask_dsn(_first_line(message))}", file=sys.stderr, flush=True)


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


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = low - 1
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(
                f"must be an integer from {low} to {high} (got {value!r})"
            )
        return number

    return parse


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number <= 3600:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be seconds from 0 to 3600 (got {value!r})")
    return number


def _build_parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description=(
            "connguard: Django database connections that come back. A bounded, "
            "process-wide pool behind Django's PostgreSQL backend; these commands show "
            "what it fixes (demo) and who holds which connection on a server (doctor)."
        ),
        epilog=USER_REPORT,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in COMMANDS:
        add_command(commands)
    return parser


# -- connguard demo --------------------------------------------------------------------

DEMO_REPORT_NAME = "demo-report.html"


def default_report_path() -> Path:
    """Where ``connguard demo`` writes its HTML report unless ``--report`` says:
    ``connguard/demo-report.html`` in the user's cache directory
    (``$XDG_CACHE_HOME``, else ``~/.cache`` on Linux, ``~/Library/Caches`` on macOS,
    ``%LOCALAPPDATA%`` on Windows); one file, replaced by the next run.

    Not the working directory: the demo is run from anywhere, often from a checkout
    (this project's or, more likely, the user's own site), where a generated file
    shows up as untracked and no ``.gitignore`` of ours applies. Not the temporary
    directory: it is shared with other users (a fixed name there is an invitation to
    symlink tricks) and cleaned at reboot, while the report is meant to be kept and
    shared. The path is printed at the end of every run. Without a home directory,
    ``./connguard-demo-report.html`` (which .gitignore lists).
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    try:
        home = Path.home()
    except (RuntimeError, KeyError):  # no HOME and no passwd entry (a bare container)
        return Path.cwd() / f"connguard-{DEMO_REPORT_NAME}"
    if os.path.isabs(xdg):  # the XDG rule: a relative value is ignored
        base = Path(xdg)
    elif sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA", "")
        base = Path(local) if local else home / "AppData" / "Local"
    elif sys.platform == "darwin":
        base = home / "Library" / "Caches"
    else:
        base = home / ".cache"
    return base / "connguard" / DEMO_REPORT_NAME


def add_demo_command(commands: argparse._SubParsersAction[_Parser]) -> None:
    """Register ``connguard demo``."""
    from connguard.demo.servers import DEMO_SERVERS  # noqa: PLC0415

    demo = commands.add_parser(
        "demo",
        help="the user report, reproduced with stock Django and fixed with connguard",
        description=(
            "The user report, reproduced with stock Django and fixed with connguard. "
            + USER_REPORT
            + " The demo starts a throwaway PostgreSQL (or uses --dsn) with a small "
            "max_connections, serves that site (pages as images, a permission query per "
            "image) under a real web server, and replays a burst of parallel image loads "
            "against it twice: stock Django with CONN_MAX_AGE=15 and "
            "CONN_HEALTH_CHECKS=True, then the same site on connguard. It shows what "
            "PostgreSQL saw, live, then a summary, and writes an HTML report."
        ),
    )
    demo.add_argument(
        "--requests", type=_positive_int, default=600, help="image requests per run (default: 600)"
    )
    demo.add_argument(
        "--concurrency",
        type=_bounded_int(1, 500),
        default=30,
        help="requests in flight at once (default: 30)",
    )
    demo.add_argument(
        "--server", choices=DEMO_SERVERS, default="uvicorn", help="web server (default: uvicorn)"
    )
    demo.add_argument(
        "--dsn",
        help=(
            "use this PostgreSQL (libpq conninfo or URL) instead of starting one; the demo "
            "creates a database connguard_demo there and drops it afterwards. The stock "
            "run may take every free connection of that server for a while: not for a "
            "server others use"
        ),
    )
    demo.add_argument(
        "--max-connections",
        type=_bounded_int(1, 10_000),
        default=None,
        help="max_connections of the embedded PostgreSQL (default: 40)",
    )
    demo.add_argument(
        "--quiet-seconds",
        type=_seconds,
        default=20.0,
        help="seconds of sampling after each burst, where the leak shows (default: 20)",
    )
    demo.add_argument(
        "--port",
        type=_bounded_int(1, 65_535),
        default=None,
        help="the web server's port on 127.0.0.1 (default: any free port)",
    )
    demo.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="PATH",
        help=(
            "where to write the HTML report, replacing any file there (default: "
            f"{default_report_path()}, in your cache directory; the path is printed "
            "at the end)"
        ),
    )
    demo.add_argument(
        "--no-live",
        action="store_true",
        help="print plain progress lines instead of a live view (for logs and CI)",
    )
    demo.add_argument(
        "--json",
        action="store_true",
        help="print the figures as one JSON document on stdout (progress goes to stderr)",
    )
    demo.set_defaults(func=cmd_demo)


def _check_installed(server: str) -> None:
    """Say what is missing before starting anything, rather than fail half-way. The
    ``demo`` extra brings Django, psycopg, uvicorn and gunicorn; daphne (Twisted) is
    left out of it for its weight."""
    from connguard.demo.servers import SERVER_MODULES  # noqa: PLC0415

    extra = "'django-connguard[demo]'"
    for module, what, package in (
        ("django", "Django", extra),
        ("psycopg", "psycopg 3", extra),
        (SERVER_MODULES[server], server, extra if server != "daphne" else "daphne"),
    ):
        if importlib.util.find_spec(module) is None:
            raise CliError(f"{what} is not installed: python -m pip install {package}")


def _report_path(given: Path | None) -> Path:
    """The report's path, checked before the demo starts: a file in a writable
    directory. The default's directory is created; a given one must exist."""
    report = default_report_path() if given is None else given
    if given is None:
        try:
            report.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CliError(
                f"cannot create {report.parent} for the report ({exc.strerror or exc}): "
                "name another place with --report PATH"
            ) from None
    if report.is_dir():
        raise CliError(f"--report {report} is a directory: name a file")
    parent = report.resolve().parent
    if not parent.is_dir():
        raise CliError(f"--report {report}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CliError(f"--report {report}: directory {parent} is not writable")
    return report.resolve()


def _demo_options(args: argparse.Namespace) -> tuple[DemoOptions, Path]:
    """The command line as :class:`~connguard.demo.runner.DemoOptions` and the
    report's path, after the checks argparse cannot make (they depend on each other
    or on the machine)."""
    from connguard.demo.runner import DemoOptions, min_connections  # noqa: PLC0415
    from connguard.demo.servers import port_in_use  # noqa: PLC0415

    if args.dsn is not None and args.max_connections is not None:
        raise CliError(
            "--max-connections sets up the embedded PostgreSQL; with --dsn the server's "
            "own max_connections applies"
        )
    if args.dsn is not None and not args.dsn.strip():
        raise CliError("--dsn is empty")
    max_connections = 40 if args.max_connections is None else args.max_connections
    needed = min_connections(args.server)
    if args.dsn is None and max_connections < needed:
        raise CliError(
            f"--max-connections {max_connections} is too small: connguard's pool under "
            f"{args.server} and the demo's monitor need at least {needed}"
        )
    if args.port is not None and port_in_use(args.port):
        raise CliError(f"port {args.port} on 127.0.0.1 is in use: pick another --port")
    _check_installed(args.server)
    report = _report_path(args.report)
    return DemoOptions(
        requests=args.requests,
        concurrency=args.concurrency,
        server=args.server,
        dsn=args.dsn,
        max_connections=max_connections,
        quiet_seconds=args.quiet_seconds,
        port=args.port,
    ), report


def _live_console(stream: TextIO) -> Console | None:
    """A rich console on ``stream`` when a live view makes sense there, else None."""
    if not stream.isatty() or importlib.util.find_spec("rich") is None:
        return None
    from rich.console import Console  # noqa: PLC0415

    return Console(file=stream)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run ``connguard demo``; see :func:`add_demo_command`."""
    from connguard.demo.figures import DemoResult  # noqa: PLC0415
    from connguard.demo.interrupts import Interrupts  # noqa: PLC0415
    from connguard.demo.report import write_report  # noqa: PLC0415
    from connguard.demo.runner import run_demo  # noqa: PLC0415
    from connguard.demo.view import (  # noqa: PLC0415
        LiveView,
        PlainView,
        View,
        plain_summary,
        rich_summary,
    )

    options, report = _demo_options(args)
    progress = sys.stderr if args.json else sys.stdout
    console = None if args.no_live else _live_console(progress)
    view: View = LiveView(console) if console is not None else PlainView(progress)
    interrupts = Interrupts()
    try:
        with interrupts:
            try:
                result: DemoResult = run_demo(options, view, interrupts)
            finally:
                view.close()
            result.report = str(write_report(result, report))
    except KeyboardInterrupt:
        if interrupts.terminated:
            print(f"{PROG}: terminated", file=sys.stderr, flush=True)
            return EXIT_TERMINATED
        raise
    if args.json:
        json.dump(result.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        print(f"report: {result.report}", file=progress, flush=True)
    elif console is not None:
        rich_summary(result, console)
        console.print(f"report: {result.report}", highlight=False, markup=False)
    else:
        plain_summary(result, sys.stdout)
        print(f"report: {result.report}")
    sys.stdout.flush()
    cg = result.run("connguard")
    if cg.failed or cg.peak_backends > (cg.budget or 0):
        _error(
            f"the connguard run did not hold its bounds (peak {cg.peak_backends} backends, "
            f"{cg.failed} failed requests): see {result.report}"
        )
        return EXIT_FAILED
    return EXIT_OK


# -- doctor ----------------------------------------------------------------------------


def _max_size(value: str) -> tuple[str, int]:
    alias, sep, number = value.partition("=")
    if not sep or not alias or not number.isdigit() or int(number) < 1:
        raise argparse.ArgumentTypeError(
            f"expected ALIAS=N with N >= 1 (for example default=10), got {value!r}"
        )
    return alias, int(number)


def add_doctor_command(commands: argparse._SubParsersAction[_Parser]) -> None:
    """Register ``connguard doctor``."""
    doctor = commands.add_parser(
        "doctor",
        help="read pg_stat_activity and explain who holds which connection",
        description=(
            "Read pg_stat_activity and pg_settings on a PostgreSQL server, classify every "
            "client backend (active, idle in a pool, idle in transaction, likely leak), "
            "check the connection budget and say what to change. Exit status 1 when it "
            "finds a problem. Needs only a role with pg_monitor. No Django project needed "
            "(inside one, use: python manage.py connguard doctor)."
        ),
    )
    doctor.add_argument("--dsn", required=True, help="the server (libpq conninfo or URL)")
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON")
    doctor.add_argument(
        "--idle-threshold",
        type=_seconds,
        default=300.0,
        help="seconds idle before an untagged backend counts as a likely leak (default: 300)",
    )
    doctor.add_argument(
        "--max-size",
        type=_max_size,
        action="append",
        default=[],
        metavar="ALIAS=N",
        help="a pool's max_size, for the budget (repeatable; default: not checked)",
    )
    doctor.add_argument(
        "--pgbouncer", metavar="DSN", help="pgbouncer's admin console, to read its pool mode"
    )
    doctor.set_defaults(func=cmd_doctor)


def _connect(dsn: str, what: str) -> Any:
    """A connection for doctor; failing, one line worded as the demo's (see
    :func:`connguard.diagnostics.doctor.cannot_connect`)."""
    from connguard.diagnostics.doctor import cannot_connect  # noqa: PLC0415
    from connguard.drivers import load_driver  # noqa: PLC0415

    try:
        driver = load_driver(None, conninfo=dsn, application_name="connguard-doctor")
    except ImportError as exc:
        raise CliError(str(exc)) from None
    try:
        return driver.connect(10.0)
    except Exception as exc:
        raise CliError(mask_dsn(cannot_connect(what, dsn, exc))) from None


def cmd_doctor(args: argparse.Namespace) -> int:
    """Run ``connguard doctor``; see :func:`add_doctor_command`."""
    from connguard.diagnostics import doctor  # noqa: PLC0415

    for option, dsn in (("--dsn", args.dsn), ("--pgbouncer", args.pgbouncer)):
        invalid = None if dsn is None else doctor.conninfo_error(dsn)
        if invalid is not None:
            raise CliError(f"invalid {option}: {invalid}")
    conn = _connect(args.dsn, "PostgreSQL")
    bouncer = _connect(args.pgbouncer, "pgbouncer") if args.pgbouncer else None
    try:
        text, status = doctor.run(
            conn,
            as_json_output=args.json,
            idle_threshold=args.idle_threshold,
            max_size=dict(args.max_size),
            pgbouncer=bouncer,
        )
    finally:
        conn.close()
        if bouncer is not None:
            bouncer.close()
    sys.stdout.write(mask_dsn(text))
    return status


# -- connguard status --------------------------------------------------------------------


def add_status_command(commands: argparse._SubParsersAction[_Parser]) -> None:
    """Register ``connguard status``."""
    from connguard.diagnostics.status import TOKEN_ENV  # noqa: PLC0415

    status = commands.add_parser(
        "status",
        help="a running server's pools and leases, every worker process",
        description=(
            "Read a running server's connguard status view (mount "
            'path("connguard/", include("connguard.django.urls")) in its urls.py) and '
            "print every worker process's pools: gauges, counters, and every lease with "
            "its age, thread, request and acquire site."
        ),
    )
    status.add_argument(
        "--url", required=True, help="the status view, e.g. http://127.0.0.1:8000/connguard/status"
    )
    status.add_argument("--json", action="store_true", help="print the answer as JSON")
    status.add_argument(
        "--token",
        help=f"the view's CONNGUARD['status_token'] (default: ${TOKEN_ENV})",
    )
    status.add_argument(
        "--timeout", type=_seconds, default=10.0, help="seconds to wait for the answer (10)"
    )
    status.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    """Run ``connguard status``; see :func:`add_status_command`."""
    from connguard.diagnostics import status  # noqa: PLC0415

    try:
        data = status.fetch(args.url, token=args.token, timeout=args.timeout)
    except status.StatusUnavailable as exc:
        raise CliError(str(exc)) from None
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(status.format_processes(data["processes"]))
    return EXIT_OK


# -- entry point -----------------------------------------------------------------------

COMMANDS: tuple[Callable[[argparse._SubParsersAction[_Parser]], None], ...] = (
    add_demo_command,
    add_doctor_command,
    add_status_command,
)
"""Every subcommand's registration function, in the order ``--help`` lists them."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status instead of exiting, for tests."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        # Masked: "unrecognized arguments" may echo a mis-quoted DSN's password.
        _error(str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    try:
        status: int = args.func(args)
    except CliError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except DemoError as exc:
        _error(str(exc))
        return exc.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # ``connguard demo --json | head``: the reader left; the work is done and cleaned
        # up. Point stdout at devnull so the interpreter's final flush stays quiet.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as exc:
        if os.environ.get(DEBUG_ENV_VAR) == "1":
            raise
        _error(f"{type(exc).__name__}: {_one_line(exc)} ({DEBUG_ENV_VAR}=1 shows where)")
        return EXIT_FAILED
    return status


if __name__ == "__main__":
    sys.exit(main())
