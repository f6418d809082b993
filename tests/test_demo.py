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

import html
import io
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
from rich.console import Console

from connguard.demo import USER_REPORT
from connguard.demo.database import Postgres
from connguard.demo.figures import DemoResult, RunResult, percentile, request_errors, verdict
from connguard.demo.report import DJANGO_DOCS_URL, adoption_diff, render_report
from connguard.demo.runner import DemoOptions, plans
from connguard.demo.sampler import Sample
from connguard.demo.view import LiveState, LiveView, PlainView, sparkline, sparkline_scale
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
            if key == "href" and tag == "a":
                continue  # a link to read (the docs), not a resource the page fetches
            if re.match(r"\s*(https?:)?//", a.get(key, "")):
                self.external.append(a[key])

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._svg = None


@pytest.mark.real
@pytest.mark.servers
def test_report_renders_both_charts_with_every_sample(demo_run: DemoRun, tmp_path: Path) -> None:
    html = demo_run.report.read_text(encoding="utf-8")
    # Nothing is fetched: no src or <link href> leaves the page (an <a href> to the docs
    # is for the reader; test_report_ends_with_how_to_adopt_this counts those).
    assert not re.search(r"""\bsrc\s*=\s*["']?(https?:)?//""", html)
    assert not re.search(r"""<link\b[^>]*\bhref\s*=\s*["']?(https?:)?//""", html)
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


# -- the report page, without servers -----------------------------------------------------


def _sample(
    t: float, active: int = 0, idle: int = 0, tx: int = 0, other: int = 0
) -> dict[str, float]:
    return {"t": t, "backends": active + idle + tx + other, "active": active, "idle": idle,
            "idle_in_transaction": tx, "other": other}  # fmt: skip


def _report_result(*, stock_tx: int = 0) -> DemoResult:
    """Both runs as the demo records them (settings from the real plans), with samples
    in which nothing is ever starting and, unless ``stock_tx``, nothing idle in a
    transaction."""
    pg = Postgres(source="embedded", conninfo="", host="127.0.0.1", port=5432,
                  user="postgres", password=None, version="17.2", max_connections=40,
                  free_connections=37)  # fmt: skip
    stock_plan, cg_plan = plans(3.0)
    stock = _run("stock", 39, 39)
    stock.title, stock.settings = stock_plan.title, stock_plan.settings(pg, "uvicorn", 8000)
    stock.samples = [_sample(0.0), _sample(0.5, active=30, tx=stock_tx), _sample(1.0, idle=39)]
    cg = _run("connguard", 10, 1, pool=True)
    cg.title, cg.settings = cg_plan.title, cg_plan.settings(pg, "uvicorn", 8001)
    cg.samples = [_sample(0.0), _sample(0.5, active=10), _sample(1.0, idle=1)]
    cg.pool_samples = [{"t": 0.5, "size": 10, "in_use": 10, "idle": 0, "waiting": 5}]
    return DemoResult(
        version="0.1.0.dev0",
        postgres=pg.as_dict(),
        options=DemoOptions(requests=100, concurrency=10, quiet_seconds=3.0).as_dict(),
        runs=[stock, cg],
    )


def _legend_series(page: str) -> list[str]:
    legend = re.search(r'<ul class="legend">(.*?)</ul>', page, re.S)
    assert legend is not None
    return re.findall(r'<li data-series="([\w-]+)">', legend.group(1))


def test_report_legend_lists_only_what_a_chart_shows() -> None:
    page = render_report(_report_result())
    assert _legend_series(page) == ["active", "idle", "backends", "pool-size", "burst"]
    assert "idle in transaction" not in page.split('<ul class="legend">')[1].split("</ul>")[0]
    page = render_report(_report_result(stock_tx=2))
    assert _legend_series(page) == [
        "active", "idle", "idle_in_transaction", "backends", "pool-size", "burst"
    ]  # fmt: skip


def test_report_says_what_the_user_report_is() -> None:
    page = render_report(_report_result())
    assert html.escape(USER_REPORT, quote=True) in page
    assert page.index('id="user-report"') < page.index('id="summary"')


def test_report_ends_with_how_to_adopt_this() -> None:
    """The last section: the settings diff from the user report's settings (with the
    pool at production values, not the demo's short max_idle) and the docs."""
    page = render_report(_report_result())
    sections = re.findall(r'<section id="([\w-]+)">', page)
    assert sections[-1] == "adopt", sections
    adopt = page[page.index('<section id="adopt">') :]
    assert "<h2>How to adopt this</h2>" in adopt
    assert adoption_diff(_report_result()) == [
        " DATABASES = {",
        '     "default": {',
        '-        "ENGINE": "django.db.backends.postgresql",',
        '+        "ENGINE": "connguard.backends.postgresql",',
        '         "NAME": ..., "USER": ..., "PASSWORD": ..., "HOST": ..., "PORT": ...,',
        '-        "CONN_MAX_AGE": 15,',
        '-        "CONN_HEALTH_CHECKS": True,',
        '         "OPTIONS": {',
        '+            "pool": {"min_size": 1, "max_size": 10, "timeout": 5},',
        "         },",
        "     },",
        " }",
        " INSTALLED_APPS = [",
        "     ...,",
        '+    "connguard.django",',
        " ]",
        " MIDDLEWARE = [",
        '+    "connguard.django.middleware.ConnguardMiddleware",  # first',
        "     ...,",
        " ]",
    ]
    for line in adoption_diff(_report_result()):
        assert html.escape(line, quote=True) in adopt
    assert f'<a href="{DJANGO_DOCS_URL}#install">docs/django.md</a>' in adopt
    assert (
        "The demo's <code>max_idle</code> (0.75 s) and <code>housekeeping_interval</code> "
        "(0.5 s) are shortened" in adopt
    )
    # The only addresses in the page are links to read, never resources to fetch.
    assert re.findall(r"""(?:src|href)\s*=\s*["']?((?:https?:)?//[^"' >]*)""", page) == [
        f"{DJANGO_DOCS_URL}#install"
    ]


# -- the terminal views, without servers --------------------------------------------------


def _state(phase: str, *, now: int, peak: int, final: bool = False, elapsed: float = 1.0,
           history: tuple[int, ...] = ()) -> LiveState:  # fmt: skip
    return LiveState(
        key="stock", title="stock Django", phase=phase, elapsed=elapsed,
        quiet_left=2.0 if phase == "quiet" else None,
        sample=Sample(0.0, now, 0, 0, now), history=list(history), max_connections=40,
        pool=None, requests=120, done=60, failed=0, peak=peak, final=final,
        history_seconds=24.0,
    )  # fmt: skip


def test_plain_view_prints_a_short_burst_with_its_peak() -> None:
    """A burst shorter than the interval between lines still gets its line, with the
    peak (the connguard run used to print none: its first line was the quiet period)."""
    out = io.StringIO()
    view = PlainView(out, every=2.0)
    view.start_run("connguard", "the pool", 1, 2)
    view.update(_state("burst", now=4, peak=10, elapsed=0.3))  # within 2 s: no line
    view.update(_state("burst", now=3, peak=10, elapsed=0.8, final=True))
    view.update(_state("quiet", now=3, peak=10))
    lines = out.getvalue().splitlines()
    assert lines == [
        "run 2/2: connguard: the pool",
        "  [stock] burst done in 0.8 s  backends peak 10/40, now 3 (active 0, idle 3)  "
        "pool -  requests 60/120 done, 0 failed",
        "  [stock] quiet   2.0 s left  backends peak 10/40, now 3 (active 0, idle 3)  "
        "pool -  requests 60/120 done, 0 failed",
    ]


def test_plain_view_burst_line_shows_the_peak_not_a_dip() -> None:
    out = io.StringIO()
    view = PlainView(out, every=0.0)
    view.start_run("stock Django", "the report's settings", 0, 2)
    view.update(_state("burst", now=7, peak=39, elapsed=2.0))
    line = out.getvalue().splitlines()[-1]
    assert "backends peak 39/40, now 7 (" in line
    assert "backends 7/40" not in line


def test_sparkline_keeps_the_peak_and_says_its_scale() -> None:
    values = [0] * 100 + [40] + [0] * 139  # one sample at the top, among 240
    spark = sparkline(values, 40)
    assert len(spark) == 40 and spark.count("█") == 1 and set(spark) == {"▁", "█"}
    assert sparkline([0, 20, 40], 40) == "▁▅█"
    state = _state("burst", now=7, peak=39, history=tuple(values))
    assert sparkline_scale(state) == "0 to 40 (max_connections), last 24 s"
    console = Console(file=io.StringIO(), width=120, color_system=None)
    view = LiveView(console)
    view._heading = "run 1/2: stock Django"
    console.print(view._render(state))
    drawn = console.file.getvalue()  # type: ignore[attr-defined]
    assert spark in drawn and "0 to 40 (max_connections), last 24 s" in drawn
