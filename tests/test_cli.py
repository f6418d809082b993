"""The ``connguard`` command line: the demo's terminal output and interruption, and
the error contract (one line, exit status 2, never a password).

The demo runs in a subprocess, as a user would run it, so that the exit status, the
streams and the clean-up of everything it started are what is checked, not a
function's return value. Option and masking checks call :func:`connguard.cli.main`
in-process because they need no server and run in milliseconds. The demo's figures
and its HTML report are tested in ``test_demo.py``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from connguard import __version__, cli
from connguard.cli import main, mask_dsn
from connguard.demo import USER_REPORT

ROOT = Path(__file__).resolve().parent.parent
SECRET = "hunter2-s3cret"
SHORT = ["--requests", "120", "--concurrency", "30", "--quiet-seconds", "3", "--no-live"]


def _env(tmp: Path | None = None) -> dict[str, str]:
    """Our environment minus libpq's variables, which would redirect or authenticate
    the demo's connections behind the test's back; TMPDIR ``tmp`` if given, to see
    what the demo leaves there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    return env


def _run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connguard.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _assert_one_error_line(stderr: str) -> None:
    assert stderr.endswith("\n")
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith("connguard: error: "), stderr
    assert "Traceback" not in stderr


# -- the command line's shape ------------------------------------------------------------


def test_every_command_registers_itself(capsys: pytest.CaptureFixture[str]) -> None:
    """One ``add_<name>_command`` per subcommand in ``COMMANDS``; --help lists them."""
    assert cli.add_demo_command in cli.COMMANDS
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--requests", "--concurrency", "--server", "--dsn", "--max-connections",
                   "--quiet-seconds", "--report", "--no-live", "--json", "--port"):  # fmt: skip
        assert option in out


def test_help_says_what_the_user_report_is(capsys: pytest.CaptureFixture[str]) -> None:
    """ "The user report" is explained where --help first names it, in three sentences."""
    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "demo the user report, reproduced" in out
    assert " ".join(USER_REPORT.split()) in out
    assert main(["demo", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("The user report is a Django user's account") == 1
    assert 2 <= len(re.split(r"(?<=\.) ", USER_REPORT)) <= 3  # sentences, not an essay


# -- where the demo's report goes --------------------------------------------------------


@pytest.mark.parametrize(
    ("xdg", "expected"),
    [
        ("/srv/cache", "/srv/cache/connguard/demo-report.html"),
        ("", "{home}/.cache/connguard/demo-report.html"),
        ("relative/cache", "{home}/.cache/connguard/demo-report.html"),  # XDG: ignored
    ],
)
def test_default_report_path_is_the_user_cache_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, xdg: str, expected: str
) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert cli.default_report_path() == Path(expected.format(home=tmp_path))


def test_demo_help_names_the_default_report_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps long paths at their hyphens
    assert main(["demo", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"(default: {tmp_path / 'connguard' / 'demo-report.html'}, in your cache" in out


def test_report_directory_that_cannot_be_created_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default's directory is created; when it cannot be, the message says how to
    choose another place, before anything starts."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert main(["demo"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    _assert_one_error_line(err)
    assert f"cannot create {blocker / 'connguard'} for the report" in err
    assert "--report PATH" in err


# -- the demo in a terminal's place ------------------------------------------------------


@pytest.mark.real
@pytest.mark.servers
def test_demo_plain_output(tmp_path: Path) -> None:
    """--no-live, with no --report: the user report said before the first run, every
    run's burst line with its peak, the side-by-side table, the verdict, the report
    in the cache directory and its path last; nothing in the working directory; no
    terminal escapes (it is for logs and CI)."""
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "connguard.cli", "demo", *SHORT],
        capture_output=True,
        text=True,
        timeout=120,
        env={**_env(), "XDG_CACHE_HOME": str(cache)},
        stdin=subprocess.DEVNULL,
        check=False,
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    assert "\x1b[" not in out
    assert "run 1/2: stock Django" in out and "run 2/2: connguard" in out
    assert out.index("connguard demo: reproducing the user report") < out.index("run 1/2")
    assert "The user report is a Django user's account" in out
    # Every line leads with the run's peak so far, never above the run's peak (the
    # summary line) and never below a count it printed; every run, however short its
    # burst, says its peak when the burst is over.
    for key, title in (("stock", "stock Django"), ("connguard", "connguard")):
        lines = re.findall(rf"^  \[{key}\] (burst|quiet) .*  backends peak (\d+)/40, now (\d+) \(",
                           out, re.MULTILINE)  # fmt: skip
        (run_peak,) = re.findall(rf"^  {title}: peak (\d+) backends", out, re.MULTILINE)
        peaks = [int(peak) for _, peak, _ in lines]
        assert peaks == sorted(peaks) and peaks[-1] <= int(run_peak), out
        assert all(int(peak) >= max(int(now) for _, _, now in lines[: i + 1])
                   for i, (_, peak, _) in enumerate(lines)), out  # fmt: skip
        done = re.findall(rf"^  \[{key}\] burst done in [\d.]+ s  backends peak \d+/40", out,
                          re.MULTILINE)  # fmt: skip
        assert len(done) == 1, out
    assert re.search(r"^  \[stock\] quiet .* backends peak \d+/40, now \d+ ", out, re.M), out
    assert re.search(r"^ +stock Django +connguard$", out, re.MULTILINE), out
    for figure in ("peak backends", "backends after 3 s quiet", "failed requests",
                   "latency p50 / p99", "connections opened"):  # fmt: skip
        assert re.search(rf"^  {re.escape(figure)} +\S", out, re.MULTILINE), figure
    assert re.search(r"^  peak backends +\d+ \(of max_connections 40\) +\d+ \(of max_size 10\)$",
                     out, re.MULTILINE), out  # fmt: skip
    assert re.search(r"^(The leak, reproduced and fixed: s|S)tock Django peaked at ", out, re.M)
    report = cache / "connguard" / "demo-report.html"
    assert out.endswith(f"report: {report}\n")
    assert report.is_file()
    assert list(work.iterdir()) == []  # nothing in the working directory
    assert list((cache / "connguard").iterdir()) == [report]  # no temporary file left


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat_file.parent.name)] = int(
                stat_file.read_text().rsplit(")", 1)[1].split()[1]
            )
        except (OSError, IndexError, ValueError):
            continue
    found: set[int] = set()
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if (ppid == root or ppid in found) and pid not in found:
                found.add(pid)
                grew = True
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@dataclass(frozen=True)
class Interruption:
    signum: int
    to_group: bool
    """True: the whole process group, as a terminal's Ctrl-C (PostgreSQL gets it too);
    False: the demo alone, as ``kill <pid>``."""
    when: str
    """The progress line after which to interrupt, then ``after`` seconds more."""
    after: float
    quiet: str
    status: int
    message: str


INTERRUPTIONS = {
    "ctrl-c-stock-quiet": Interruption(
        signal.SIGINT, True, "[stock] quiet", 0.0, "30", 130, "connguard: interrupted\n"
    ),
    "ctrl-c-connguard-run": Interruption(
        signal.SIGINT, True, "run 2/2", 1.5, "1", 130, "connguard: interrupted\n"
    ),
    "sigterm-stock-quiet": Interruption(
        signal.SIGTERM, False, "[stock] quiet", 0.0, "30", 143, "connguard: terminated\n"
    ),
}


@pytest.mark.real
@pytest.mark.servers
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("case", INTERRUPTIONS.values(), ids=INTERRUPTIONS.keys())
def test_interrupted_demo_leaves_no_process_and_no_directory(
    tmp_path: Path, case: Interruption
) -> None:
    """Interrupted mid-run, the demo exits with one line, and neither a process it
    started (PostgreSQL, the web server, the migration) nor a temporary directory is
    left."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "connguard.cli", "demo", "--no-live", "--requests", "300",
         "--quiet-seconds", case.quiet, "--report", str(tmp_path / "r.html")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while not any(case.when in line for line in lines):
            assert proc.poll() is None, (lines, proc.stderr.read() if proc.stderr else "")
            assert time.monotonic() < deadline, f"never reached {case.when!r}: {lines}"
            started |= _descendants(proc.pid)
            time.sleep(0.05)
        until = time.monotonic() + case.after
        while True:
            started |= _descendants(proc.pid)
            if time.monotonic() >= until:
                break
            time.sleep(0.05)
        assert started, "the demo started no process"
        assert proc.poll() is None, lines
        if case.to_group:
            os.killpg(proc.pid, case.signum)
        else:
            os.kill(proc.pid, case.signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == case.status, err
    assert err == case.message
    time.sleep(0.2)  # orphans the kernel has not reaped yet
    assert [pid for pid in started if _alive(pid)] == []
    assert list(tmp.iterdir()) == []
    assert not (tmp_path / "r.html").exists()


_BROKEN_SERVER = """
import sys
import connguard.demo.servers as servers
servers.command = lambda server, port: [
    sys.executable, "-c", "import sys; print('boom: the site cannot start'); sys.exit(3)"
]
from connguard.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.real
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_failed_run_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """A web server that does not start: one line naming it and why (from its log),
    exit status 1, and the PostgreSQL and temporary directories are gone."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _BROKEN_SERVER, "demo", "--no-live",
         "--report", str(tmp_path / "r.html")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    started: set[int] = set()
    while proc.poll() is None:
        started |= _descendants(proc.pid)
        time.sleep(0.02)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert err == (
        "connguard: error: uvicorn did not start for the stock Django run: "
        "boom: the site cannot start\n"
    )
    assert "run 1/2: stock Django" in out
    time.sleep(0.2)
    assert started and [pid for pid in started if _alive(pid)] == []
    assert list(tmp.iterdir()) == []


# -- errors: one line, exit 2 ----------------------------------------------------------


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it) but
    not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("form", ["conninfo", "url"])
def test_unreachable_dsn_is_one_line_without_password(refused_port: int, form: str) -> None:
    if form == "conninfo":
        dsn = f"host=127.0.0.1 port={refused_port} user=app password={SECRET} dbname=x"
    else:
        dsn = f"postgresql://app:{SECRET}@127.0.0.1:{refused_port}/x"
    proc = _run("demo", "--dsn", dsn, timeout=30)
    assert proc.returncode == 2
    assert proc.stdout == ""
    _assert_one_error_line(proc.stderr)
    assert SECRET not in proc.stderr
    assert proc.stderr == (
        f"connguard: error: cannot connect to PostgreSQL at 127.0.0.1:{refused_port}: "
        "Connection refused\n"
    )


@pytest.mark.parametrize(
    "dsn",
    [
        "host=127.0.0.1 port={port} user=app password=" + SECRET,
        "postgresql://app:" + SECRET + "@127.0.0.1:{port}/x",
        "host={socket_dir} port={port} user=app",
        "host=nonexistent.invalid port={port} user=app connect_timeout=5",
    ],
)
def test_doctor_and_demo_word_cannot_connect_alike(
    refused_port: int, tmp_path: Path, dsn: str
) -> None:
    """One wording for one failure: the same line from both commands, exit status 2."""
    dsn = dsn.format(port=refused_port, socket_dir=tmp_path)
    lines = []
    for command in ("doctor", "demo"):
        proc = _run(command, "--dsn", dsn, timeout=30)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == ""
        _assert_one_error_line(proc.stderr)
        assert SECRET not in proc.stderr
        lines.append(proc.stderr)
    assert lines[0] == lines[1]
    assert lines[0].startswith("connguard: error: cannot connect to PostgreSQL at "), lines[0]


def test_port_in_use_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _run("demo", "--port", str(port), timeout=30)
    assert proc.returncode == 2
    assert proc.stdout == ""
    _assert_one_error_line(proc.stderr)
    assert f"port {port} on 127.0.0.1 is in use" in proc.stderr


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["demo", "--requests", "0"], "--requests"),
        (["demo", "--requests", "many"], "--requests"),
        (["demo", "--concurrency", "0"], "--concurrency"),
        (["demo", "--concurrency", "100000"], "--concurrency"),
        (["demo", "--server", "nginx"], "--server"),
        (["demo", "--quiet-seconds", "-1"], "--quiet-seconds"),
        (["demo", "--quiet-seconds", "nan"], "--quiet-seconds"),
        (["demo", "--max-connections", "0"], "--max-connections"),
        (["demo", "--max-connections", "12"], "at least 13"),
        (["demo", "--server", "gunicorn", "--max-connections", "22"], "at least 23"),
        (["demo", "--dsn", "host=x", "--max-connections", "50"], "--max-connections"),
        (["demo", "--dsn", " "], "--dsn is empty"),
        (["demo", "--port", "0"], "--port"),
        (["demo", "--port", "70000"], "--port"),
        (["demo", "--report", "/nonexistent/dir/r.html"], "does not exist"),
        (["demo", "--report", "/"], "is a directory"),
        (["demo", "--bogus"], "--bogus"),
        (["nonsense"], "nonsense"),
        ([], "COMMAND"),
    ],
)
def test_bad_options_exit_2_with_one_line(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    _assert_one_error_line(err)
    assert says in err


def test_bad_option_in_a_subprocess() -> None:
    proc = _run("demo", "--requests", "0", timeout=30)
    assert proc.returncode == 2
    assert proc.stdout == ""
    _assert_one_error_line(proc.stderr)
    assert "--requests" in proc.stderr


def test_stray_password_argument_is_masked(capsys: pytest.CaptureFixture[str]) -> None:
    """An unquoted DSN splits into several arguments; argparse echoes the extras."""
    assert main(["demo", "--dsn", "host=x", f"password={SECRET}"]) == 2
    err = capsys.readouterr().err
    _assert_one_error_line(err)
    assert SECRET not in err


def test_invalid_dsn_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dsn", f"hots=db password={SECRET}"]) == 2
    err = capsys.readouterr().err
    _assert_one_error_line(err)
    assert "invalid --dsn" in err and SECRET not in err


@pytest.mark.parametrize(("server", "advice"), [("uvicorn", "[demo]"), ("daphne", "daphne")])
def test_missing_web_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], server: str, advice: str
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == server else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert main(["demo", "--server", server]) == 2
    err = capsys.readouterr().err
    _assert_one_error_line(err)
    assert f"{server} is not installed" in err and advice in err


def test_missing_postgres_binaries(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("CONNGUARD_PG_BIN", str(tmp_path))
    assert main(["demo", "--report", str(tmp_path / "r.html")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    _assert_one_error_line(err)
    assert "--dsn" in err


# -- --version -------------------------------------------------------------------------


def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"connguard {__version__}\n"


def test_version_python_m_connguard() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "connguard", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"connguard {__version__}\n"


def test_version_has_one_source_a_scheme_and_a_changelog_entry() -> None:
    """``__version__`` is the one place the version is written: pyproject.toml reads it
    (hatch's dynamic version), it follows the scheme, and CHANGELOG.md's newest section
    is for it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["hatch"]["version"]["path"] == "src/connguard/__init__.py"
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+)?", __version__), __version__
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    versions = re.findall(r"^## (\S+)", changelog, re.MULTILINE)
    assert versions and versions[0] == __version__, versions
    installed = importlib.metadata.version("django-connguard")
    assert installed == __version__, f"installed metadata says {installed}: reinstall"
    # The install instructions name the wheel of this version.
    for doc in ("README.md", "docs/django.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        assert f"dist/django_connguard-{__version__}-py3-none-any.whl[psycopg]" in text, doc


# -- mask_dsn --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("host=db password=s3cret user=app", "host=db password=*** user=app"),
        ("password=s3cret", "password=***"),
        ("host=db password = s3cret port=5", "host=db password=*** port=5"),
        ("host=db password='with space' port=5", "host=db password=*** port=5"),
        ("host=db password='it\\'s' port=5", "host=db password=*** port=5"),
        ("host=db password=a&b'c port=5", "host=db password=*** port=5"),
        ("host=db sslpassword=keypass", "host=db sslpassword=***"),
        ("host=db PASSWORD=s3cret", "host=db PASSWORD=***"),
        ("postgresql://app:s3cret@db:5432/x", "postgresql://app:***@db:5432/x"),
        ("postgres://app:p%40ss@db/x?sslmode=require", "postgres://app:***@db/x?sslmode=require"),
        ("postgresql://app:p@ss@db/x", "postgresql://app:***@db/x"),
        (
            "postgresql://db/x?user=app&password=s3cret&sslmode=require",
            "postgresql://db/x?user=app&password=***&sslmode=require",
        ),
        ("postgresql://db/x?sslpassword=k", "postgresql://db/x?sslpassword=***"),
        # Nothing secret: unchanged.
        ("host=db port=5432 user=app dbname=x", "host=db port=5432 user=app dbname=x"),
        ("postgresql://app@db:5432/x", "postgresql://app@db:5432/x"),
        ("postgresql://db:5432/x", "postgresql://db:5432/x"),
        ("", ""),
        # Inside a message.
        (
            "cannot connect to 'postgresql://u:s3cret@h/d': refused",
            "cannot connect to 'postgresql://u:***@h/d': refused",
        ),
    ],
)
def test_mask_dsn(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked
    assert "s3cret" not in mask_dsn(dsn)
    assert mask_dsn(mask_dsn(dsn)) == mask_dsn(dsn)  # idempotent
