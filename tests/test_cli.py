"""The ``connguard`` command line: the demo end to end, and its error contract.

The demo runs in a subprocess, as a user would run it, so that the exit status, the
streams and the clean-up of its private server are what is checked, not a function's
return value. Option and masking checks call :func:`connguard.cli.main` in-process
because they need no server and run in milliseconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connguard import __version__, cli
from connguard.cli import main, mask_dsn

SECRET = "hunter2-s3cret"


def _env() -> dict[str, str]:
    """Our environment minus libpq's variables, which would redirect or authenticate
    the demo's connections behind the test's back."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


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


# -- the demo, end to end --------------------------------------------------------------


@pytest.mark.real
@pytest.mark.parametrize(
    ("driver", "max_size"),
    [("psycopg", 10), ("psycopg2", 3)],
)
def test_demo_json_end_to_end(driver: str, max_size: int) -> None:
    threads, queries = 20, 10
    proc = _run(
        "demo",
        "--threads", str(threads),
        "--queries-per-thread", str(queries),
        "--max-size", str(max_size),
        "--driver", driver,
        "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    result = json.loads(proc.stdout)
    stats = result["stats"]

    assert result["driver"] == stats["driver"] == driver
    assert result["threads"] == threads
    assert result["queries_done"] == result["queries_expected"] == threads * queries
    assert result["errors"] == 0
    # The server never saw more of the pool's connections than max_size...
    assert 1 <= result["peak_server_backends"] <= max_size
    assert result["peak_pool_size"] <= max_size
    assert result["bounded"] is True
    assert result["samples"] >= 2
    # ...and the pool's own books balance.
    assert stats["acquires"] == stats["releases"] == threads * queries
    assert stats["in_use"] == stats["waiting"] == 0
    assert stats["timeouts"] == stats["leaks"] == stats["connect_errors"] == 0
    assert stats["max_size"] == max_size
    assert stats["size"] <= max_size
    assert stats["opened"] <= max_size  # nothing was closed, so nothing was reopened
    assert stats["acquire_wait"]["count"] == threads * queries
    assert stats["hold_time"]["count"] == threads * queries
    for name in ("acquire_wait", "hold_time"):
        ms = result["latency_ms"][name]
        assert 0 <= ms["p50"] <= ms["p99"] <= ms["max"]
    assert result["pool_warnings"] == []
    assert "password" not in result["dsn"]


@pytest.mark.real
def test_demo_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["demo", "--threads", "6", "--queries-per-thread", "3", "--max-size", "2"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert err == ""
    assert re.search(r"queries done +18 / 18 \(6 x 3\)", out), out
    assert "peak server backends" in out and "max_size 2: bounded" in out
    assert "acquires=18 releases=18" in out
    assert "in_use=0" in out
    assert "acquire wait" in out and "hold time" in out


def _children(pid: int) -> list[int]:
    kids = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat_file.parent.name))
    return kids


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


@pytest.mark.real
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_demo_ctrl_c_cleans_up() -> None:
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it: the server's
    processes get it too, and the command must still exit 130 with one line and
    leave neither the postmaster nor its data directory behind."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "connguard.cli", "demo", "--queries-per-thread", "1000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        postmaster, data_dir = None, None
        deadline = time.monotonic() + 30
        while postmaster is None and time.monotonic() < deadline:
            for kid in _children(proc.pid):
                argv = _cmdline(kid)
                if argv and argv[0].endswith("postgres") and "-D" in argv:
                    postmaster, data_dir = kid, Path(argv[argv.index("-D") + 1])
            time.sleep(0.02)
        assert postmaster is not None and data_dir is not None, "the demo started no server"
        time.sleep(0.5)  # into the threads' work
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert err == "connguard: interrupted\n"
    assert out == ""
    assert not Path(f"/proc/{postmaster}").exists()
    assert not data_dir.parent.exists()


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
    proc = _run("demo", "--dsn", dsn, "--threads", "2", timeout=30)
    assert proc.returncode == 2
    assert proc.stdout == ""
    _assert_one_error_line(proc.stderr)
    assert SECRET not in proc.stderr
    assert "cannot connect" in proc.stderr and str(refused_port) in proc.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--threads", "0"],
        ["demo", "--threads", "-3"],
        ["demo", "--queries-per-thread", "many"],
        ["demo", "--max-size", "0"],
        ["demo", "--driver", "sqlite"],
        ["demo", "--bogus"],
        ["nonsense"],
        [],
    ],
)
def test_bad_options_exit_2_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    _assert_one_error_line(err)


def test_threads_zero_in_a_subprocess() -> None:
    proc = _run("demo", "--threads", "0", timeout=30)
    assert proc.returncode == 2
    _assert_one_error_line(proc.stderr)
    assert "--threads" in proc.stderr


def test_stray_password_argument_is_masked(capsys: pytest.CaptureFixture[str]) -> None:
    """An unquoted DSN splits into several arguments; argparse echoes the extras."""
    assert main(["demo", "--dsn", "host=x", f"password={SECRET}"]) == 2
    err = capsys.readouterr().err
    _assert_one_error_line(err)
    assert SECRET not in err


def test_missing_driver(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_driver(*args: Any, **kwargs: Any) -> Any:
        raise ImportError(
            "psycopg2 is not importable (psycopg2: No module named 'psycopg2'): "
            "install django-connguard[psycopg2]"
        )

    monkeypatch.setattr(cli, "load_driver", no_driver)
    assert main(["demo", "--dsn", f"host=127.0.0.1 password={SECRET}", "--driver", "psycopg2"]) == 2
    err = capsys.readouterr().err
    _assert_one_error_line(err)
    assert "install django-connguard[psycopg2]" in err


def test_missing_postgres_binaries(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("CONNGUARD_PG_BIN", str(tmp_path))
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
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
