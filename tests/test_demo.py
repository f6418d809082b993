"""``connguard demo`` end to end, in its short mode, as a user runs it.

The figures come from its ``--json`` output: stock Django keeps its backends after
the burst (the leak of the user report), connguard stays within ``max_size`` and is
back to ``min_size`` after the quiet period. The HTML report is rendered by headless
Chromium, and the assertions are on the page as the browser built it (after its
script drew the charts). A screenshot is kept under ``artifacts/``.

The figures' arithmetic (percentiles, server log reasons, the verdict) is tested
without any server at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from connguard.demo.figures import DemoResult, RunResult, percentile, request_errors, verdict
from connguard.testing.postgres import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
SECRET = "hunter2-s3cret"
SHORT = ["--requests", "120", "--concurrency", "30", "--quiet-seconds", "3", "--no-live"]
MAX_SIZE, MIN_SIZE = 10, 1


def _env(tmp: Path | None = None) -> dict[str, str]:
    """Our environment minus libpq's variables, which would redirect or authenticate
    the demo's connections behind the test's back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    return env


def _demo(*args: str, tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connguard.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(tmp),
        stdin=subprocess.DEVNULL,
        check=False,
    )


@dataclass
class DemoRun:
    proc: subprocess.CompletedProcess[str]
    result: dict[str, Any]
    report: Path
    tmp: Path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """One short demo for the module: its JSON, its report, and its TMPDIR (which it
    must leave empty)."""
    base = tmp_path_factory.mktemp("demo")
    tmp = base / "tmp"
    tmp.mkdir()
    report = base / "report.html"
    proc = _demo(*SHORT, "--json", "--report", str(report), tmp=tmp)
    assert proc.returncode == 0, proc.stderr
    return DemoRun(proc, json.loads(proc.stdout), report, tmp)


# -- the figures ----------------------------------------------------------------------


@pytest.mark.real
@pytest.mark.servers
def test_json_shows_the_leak_in_stock_django_and_none_in_connguard(demo_run: DemoRun) -> None:
    result = demo_run.result
    stock, cg = result["runs"]["stock"], result["runs"]["connguard"]
    assert result["options"]["requests"] == 120
    assert result["postgres"]["max_connections"] == 40
    assert result["postgres"]["source"] == "embedded"

    # Stock Django, the report's settings under uvicorn: the backends pile up and stay.
    assert stock["settings"]["DATABASES"]["default"]["ENGINE"] == "django.db.backends.postgresql"
    assert stock["settings"]["DATABASES"]["default"]["CONN_MAX_AGE"] == 15
    assert stock["settings"]["MIDDLEWARE"] == []
    assert stock["pool"] is None
    # The burst leaves them behind and nobody closes them in the quiet period (only a
    # garbage collection in the server's process would, and an idle process runs none;
    # one may run during the burst, so how many are left varies: usually all 39).
    assert stock["peak_backends"] > MAX_SIZE
    after_burst = [s for s in stock["samples"] if s["t"] >= stock["burst_seconds"] + 0.5]
    assert len(after_burst) >= 10
    assert {s["backends"] for s in after_burst} == {stock["backends_at_end"]}, after_burst
    assert stock["backends_at_end"] >= 1
    assert stock["ok"] + stock["failed"] == 120
    for failure in stock["failures"]:  # if the server ran out, it says why
        assert failure["why"].startswith("HTTP 500"), failure
        assert "too many clients" in failure["why"], failure
    leftovers = [row for row in stock["at_end"] if row["state"] == "idle"]
    assert len(leftovers) == stock["backends_at_end"]
    assert all("docsite_page" in row["query"] for row in leftovers)  # the permission query

    # connguard: bounded by max_size during the burst, back to min_size after.
    assert cg["settings"]["DATABASES"]["default"]["ENGINE"] == "connguard.backends.postgresql"
    assert cg["pool"]["max_size"] == MAX_SIZE and cg["pool"]["min_size"] == MIN_SIZE
    assert cg["budget"] == MAX_SIZE
    assert 1 <= cg["peak_backends"] <= MAX_SIZE
    assert cg["backends_at_end"] <= MIN_SIZE
    assert cg["failed"] == 0 and cg["ok"] == 120 and cg["failures"] == []
    assert cg["pool"]["peak_size"] <= MAX_SIZE
    assert cg["pool"]["size_at_end"] == MIN_SIZE
    assert 1 <= cg["connections_opened"] <= MAX_SIZE  # as PostgreSQL counted them
    assert cg["pool"]["opened"] == cg["connections_opened"]
    assert stock["connections_opened"] > cg["connections_opened"]

    for run in (stock, cg):
        times = [s["t"] for s in run["samples"]]
        assert len(times) >= 20 and times == sorted(times)
        assert max(s["backends"] for s in run["samples"]) == run["peak_backends"]
        assert run["samples"][-1]["backends"] == run["backends_at_end"]
        assert run["latency_ms"]["p50"] <= run["latency_ms"]["p99"]
        assert run["burst_seconds"] > 0
    assert cg["pool_samples"] and not stock["pool_samples"]

    assert result["verdict"].endswith(
        "connguard peaked at {} (max_size 10), was back to {} (min_size 1) and failed none.".format(
            cg["peak_backends"], cg["backends_at_end"]
        )
    )
    assert [row["figure"] for row in result["summary"]][1:] == [
        "peak backends",
        "backends after 3 s quiet",
        "failed requests",
        "latency p50 / p99",
        "connections opened",
    ]
    assert result["report"] == str(demo_run.report)


@pytest.mark.real
@pytest.mark.servers
def test_progress_goes_to_stderr_with_json_and_nothing_is_left_behind(demo_run: DemoRun) -> None:
    err = demo_run.proc.stderr
    assert "run 1/2: stock Django" in err and "run 2/2: connguard" in err
    assert "Traceback" not in err
    assert list(demo_run.tmp.iterdir()) == []  # PostgreSQL, logs: all removed


# -- the report, rendered by a browser ------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium on PATH (.ci/run installs Debian's chromium)")


def _browse(url: str, tmp: Path, *args: str) -> str:
    """Run headless Chromium on ``url`` in its own session with a fresh profile and
    no network of its own; return its stdout. Its process group is ended whatever
    happens."""
    profile = tmp / f"profile-{len(list(tmp.iterdir()))}"
    proc = subprocess.Popen(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--disable-quic", f"--user-data-dir={profile}", *args, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}"
    return out


class _Page(HTMLParser):
    """The elements the assertions need, from the DOM Chromium dumped."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs: dict[str, dict[str, str]] = {}
        self.lines: dict[str, dict[str, str]] = {}
        self.header_runs: list[str] = []
        self.cells: Counter[str] = Counter()
        self.external: list[str] = []
        self.root: dict[str, str] = {}
        self._svg: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "html":
            self.root = a
        if tag == "svg" and a.get("id", "").startswith("chart-"):
            self._svg = a["id"].removeprefix("chart-")
            self.svgs[self._svg] = a
        if tag == "polyline" and self._svg and "series-backends" in a.get("class", ""):
            self.lines[self._svg] = a
        if tag == "th" and "data-run" in a:
            self.header_runs.append(a["data-run"])
        if tag == "td" and "data-run" in a:
            self.cells[a["data-run"]] += 1
        for key in ("src", "href"):
            if re.match(r"\s*(https?:)?//", a.get(key, "")):
                self.external.append(a[key])

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._svg = None


@pytest.mark.real
@pytest.mark.servers
def test_report_renders_both_charts_with_every_sample(demo_run: DemoRun, tmp_path: Path) -> None:
    html = demo_run.report.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(" not in html

    page = _Page()
    page.feed(_browse(demo_run.report.as_uri(), tmp_path, "--dump-dom"))
    assert page.root.get("data-charts") == "drawn", "the report's script did not run"
    assert not page.external
    for key in ("stock", "connguard"):
        samples = demo_run.result["runs"][key]["samples"]
        svg, line = page.svgs[key], page.lines[key]
        assert int(svg["data-points"]) == len(samples)
        assert int(svg["data-peak"]) == demo_run.result["runs"][key]["peak_backends"]
        assert [int(v) for v in line["data-values"].split(",")] == [s["backends"] for s in samples]
        assert len(line["points"].split()) == len(samples)
    assert page.header_runs == ["stock", "connguard"]
    assert page.cells["stock"] == page.cells["connguard"] == 5  # one per figure

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "demo-report.png"
    shot.unlink(missing_ok=True)
    _browse(demo_run.report.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1320,2400")
    assert shot.stat().st_size > 10_000
    print(f"report screenshot: {shot}")


# -- an existing server (--dsn) ---------------------------------------------------------


@pytest.fixture
def password_pg() -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(max_connections=50, password=SECRET)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.mark.real
@pytest.mark.servers
def test_dsn_uses_a_database_of_its_own_and_never_shows_the_password(
    password_pg: EmbeddedPostgres, tmp_path: Path
) -> None:
    report = tmp_path / "report.html"
    proc = _demo(*SHORT, "--dsn", password_pg.url, "--server", "daphne", "--json",
                 "--report", str(report))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for text in (proc.stdout, proc.stderr, report.read_text(encoding="utf-8")):
        assert SECRET not in text
    result = json.loads(proc.stdout)
    assert result["postgres"]["source"] == "dsn"
    assert result["postgres"]["port"] == password_pg.port
    assert result["options"]["dsn"] is True and result["options"]["max_connections"] is None
    cg = result["runs"]["connguard"]
    assert cg["settings"]["DATABASES"]["default"]["PASSWORD"] == "***"
    assert cg["settings"]["server"].startswith("python -m daphne")
    assert cg["peak_backends"] <= MAX_SIZE and cg["backends_at_end"] <= MIN_SIZE
    assert cg["failed"] == 0
    # daphne leaks too (its garbage collector may close some of the leaked connections).
    assert result["runs"]["stock"]["peak_backends"] > MAX_SIZE
    databases = password_pg.psql("SELECT datname FROM pg_database").split()
    assert "connguard_demo" not in databases, "the demo's database was left behind"


# -- the figures' arithmetic, without servers -------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0


def test_request_errors_reads_the_sites_one_line_log() -> None:
    log = "\n".join(
        [
            "INFO:     started",
            "docsite request error: Internal Server Error: /doc/1/page/2.png | "
            'OperationalError: connection failed: connection to server at "127.0.0.1", '
            "port 5432 failed: FATAL:  sorry, too many clients already",
            "docsite request error: Internal Server Error: /doc/2/page/3.png | "
            'OperationalError: connection failed: connection to server at "127.0.0.1", '
            "port 5432 failed: FATAL:  sorry, too many clients already",
            "docsite request error: Service Unavailable: /doc/3/page/4.png",
            "something else",
        ]
    )
    assert request_errors(log) == Counter(
        {"OperationalError: sorry, too many clients already": 2, "Service Unavailable": 1}
    )


def _run(key: str, peak: int, end: int, failed: int = 0, pool: bool = False) -> RunResult:
    run = RunResult(
        key=key, title=key, settings={}, server="uvicorn", processes=1, requests=100,
        concurrency=10, ok=100 - failed, failed=failed, peak_backends=peak,
        backends_at_end=end, quiet_seconds=20,
    )  # fmt: skip
    if failed:
        run.failures = Counter({"HTTP 500": failed})
        run.server_errors = Counter({"OperationalError: sorry, too many clients already": failed})
    if pool:
        run.pool = {"min_size": 1, "max_size": 10, "processes": 1}
    return run


def _result(stock: RunResult, cg: RunResult) -> DemoResult:
    return DemoResult(
        version="x",
        postgres={"max_connections": 40},
        options={"quiet_seconds": 20.0},
        runs=[stock, cg],
    )


def test_verdict_names_the_leak_and_the_fix() -> None:
    text = verdict(_result(_run("stock", 39, 39, failed=50), _run("connguard", 10, 1, pool=True)))
    assert text == (
        "The leak, reproduced and fixed: stock Django peaked at 39 backends, still held 39 "
        "of them 20 s after the burst and failed 50 of 100 requests (HTTP 500: sorry, too "
        "many clients already); connguard peaked at 10 (max_size 10), was back to 1 "
        "(min_size 1) and failed none."
    )


def test_verdict_says_when_connguard_did_not_hold() -> None:
    text = verdict(_result(_run("stock", 8, 8), _run("connguard", 12, 3, failed=2, pool=True)))
    assert text.startswith("In this run connguard did not hold its bounds: it exceeded")
    assert "kept 3 backends (min_size 1)" in text and "failed 2 requests" in text
