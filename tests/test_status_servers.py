"""Issue 12: ``connguard status --url`` and the Prometheus endpoint against running
servers, every worker seen.

A private PostgreSQL; the docsite under gunicorn (2 worker processes, gthread) and
uvicorn, with the status view mounted and a bearer token. Under load, every worker's
pools are in the answer, and what they say agrees with the server's own view: the
site's backends in ``pg_stat_activity`` are exactly the connections the answer's
pools hold, summed over workers, and what ``/connguard/metrics`` reports.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connguard.testing.postgres import EmbeddedPostgres

from .servers import (
    ROOT,
    django_script,
    docsite_database,
    free_port,
    get,
    manage,
    running,
    site_env,
)

pytestmark = [pytest.mark.real, pytest.mark.private, pytest.mark.servers]

TOKEN = "status-token-for-tests-0123456789"
POOL = {"min_size": 2, "max_size": 4}


@pytest.fixture(scope="module")
def status_db() -> Iterator[tuple[EmbeddedPostgres, dict[str, Any]]]:
    with docsite_database(40, "status-migrate") as site:
        yield site


def cli_status(url: str, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "connguard", "status", "--url", url, *args]
    if token is not None:
        cmd += ["--token", token]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def site_backends(pg: EmbeddedPostgres, app: str) -> int:
    out = pg.psql(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
        f"AND application_name LIKE '{app}|%'"
    )
    return int(out.strip())


def pooled(processes: list[dict[str, Any]]) -> int:
    """Connections the answer's pools hold (in use, idle, being reset), all workers."""
    total = 0
    for process in processes:
        for entry in process["pools"]:
            s = entry["stats"]
            total += s["in_use"] + s["idle"] + s.get("resetting", 0)
    return total


class Hammer:
    """Threads that keep requesting ``/one`` until stopped (the load)."""

    def __init__(self, port: int, threads: int = 6) -> None:
        self.port = port
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stop.is_set():
            status, _, _ = get(self.port, "/one", timeout=10)
            self.statuses.append(status)

    def __enter__(self) -> Hammer:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
def test_status_url_shows_every_worker_and_agrees_with_the_server(
    status_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path, server: str
) -> None:
    pg, db = status_db
    app = f"status-{server}"
    env = site_env(
        db,
        DOCSITE_APP_NAME=app,
        DOCSITE_POOL=json.dumps(POOL),
        DOCSITE_STATUS_TOKEN=TOKEN,
        DOCSITE_STATUS_DIR=str(tmp_path / "status"),
    )
    with running(server, db, tmp_path, **env) as srv:
        url = f"{srv.url}/connguard/status"
        # Anonymous: refused, and the CLI says why in one line, exit status 2.
        status, _, _ = get(srv.port, "/connguard/status")
        assert status == 403
        refused = cli_status(url, token=None)
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.count("\n") == 1 and "HTTP 403" in refused.stderr, refused.stderr

        with Hammer(srv.port) as load:
            seen: dict[str, Any] = {}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                answer = cli_status(url, "--json")
                assert answer.returncode == 0, answer.stderr
                seen = json.loads(answer.stdout)
                with_pools = [p for p in seen["processes"] if p["pools"]]
                if len(with_pools) == srv.processes:
                    break
            pids = {p["pid"] for p in seen["processes"] if p["pools"]}
            assert len(pids) == srv.processes, seen["processes"]
            text = cli_status(url)
            assert text.returncode == 0, text.stderr
            for pid in pids:
                assert f"process {pid} on " in text.stdout, text.stdout
            # The same through manage.py, which without --url says how to look.
            managed = manage(db, "connguard", "status", "--url", url, "--token", TOKEN)
            for pid in pids:
                assert f"process {pid} on " in managed, managed
            assert "connguard status --url" in manage(db, "connguard", "status")
            # Scraped under load: every worker, each within its bounds, and (one
            # worker's snapshot being at most a second old) never more than the server
            # could hold.
            under_load = scrape_connections(srv.port)
            assert set(under_load) == {str(pid) for pid in pids}, under_load
            assert all(0 < n <= POOL["max_size"] for n in under_load.values()), under_load
        assert load.statuses and set(load.statuses) == {200}, set(load.statuses)

        # At rest, what the pools hold, summed over workers, is what the server sees
        # (the snapshots of other workers are up to a second old: ask until they agree).
        deadline = time.monotonic() + 20
        agreed = None
        while time.monotonic() < deadline:
            answer = json.loads(cli_status(url, "--json").stdout)
            counted = pooled(answer["processes"])
            server_side = site_backends(pg, app)
            if counted == server_side and len(answer["processes"]) >= srv.processes:
                agreed = (counted, server_side)
                break
            time.sleep(0.05)  # polling the server and the view, bounded above
        assert agreed is not None, (counted, server_side, answer["processes"])
        assert agreed[0] >= POOL["min_size"] * srv.processes
        assert TOKEN not in json.dumps(answer)

        # The Prometheus endpoint says the same, every worker labelled by its pid.
        status, _, _ = get(srv.port, "/connguard/metrics")
        assert status == 403
        deadline = time.monotonic() + 20
        scraped = None
        while time.monotonic() < deadline:
            by_pid = scrape_connections(srv.port)
            if len(by_pid) == srv.processes and sum(by_pid.values()) == site_backends(pg, app):
                scraped = by_pid
                break
            time.sleep(0.05)  # polling the server and the endpoint, bounded above
        assert scraped is not None, (by_pid, site_backends(pg, app))
        # ... and per worker, what the pools' own stats say (the status view).
        answer = json.loads(cli_status(url, "--json").stdout)
        per_pid = {str(p["pid"]): float(pooled([p])) for p in answer["processes"] if p["pools"]}
        assert scrape_connections(srv.port) == per_pid


def scrape_connections(port: int) -> dict[str, float]:
    """``db_client_connection_count`` (idle + used) per worker pid, from the endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/connguard/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        response = conn.getresponse()
        body = response.read().decode()
        assert response.status == 200, body
        assert response.getheader("Content-Type", "").startswith("text/plain; version=")
    finally:
        conn.close()
    by_pid: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        if family.name == "db_client_connection_count":
            for sample in family.samples:
                by_pid[sample.labels["pid"]] = by_pid.get(sample.labels["pid"], 0) + sample.value
    return by_pid


def health(port: int, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("GET", "/connguard/health", headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_health_ok_saturated_and_unreachable(
    status_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path
) -> None:
    """``/connguard/health`` under uvicorn: 200 ``ok``; 200 ``warn`` while the only
    connection is held and a request waits for it; 503 ``fail`` when the database
    cannot be reached. Anonymous callers get the status only."""
    _, db = status_db
    pool = {"min_size": 0, "max_size": 1, "timeout": 10}
    env = site_env(
        db, DOCSITE_APP_NAME="status-health", DOCSITE_POOL=json.dumps(pool),
        DOCSITE_STATUS_TOKEN=TOKEN,
    )  # fmt: skip
    with running("uvicorn", db, tmp_path, **env) as srv:
        assert health(srv.port, token=None) == (200, {"status": "ok"})
        code, body = health(srv.port)
        assert code == 200 and body["pools"][0]["status"] == "ok", body
        holders = [
            threading.Thread(target=get, args=(srv.port, "/slow?ms=3000"), kwargs={"timeout": 30})
            for _ in range(2)
        ]
        for holder in holders:
            holder.start()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                code, body = health(srv.port)
                if body["status"] == "warn":
                    break
                time.sleep(0.02)  # polling, bounded above
            assert code == 200 and body["status"] == "warn", body
            (detail,) = body["pools"]
            # Seen from the figures (the connection out and a request queued), or by the
            # test checkout timing out behind them: both are the pool saturated.
            assert detail["detail"].startswith("saturated: "), detail
            assert detail["in_use"] == 1 and detail["max_size"] == 1, detail
        finally:
            for holder in holders:
                holder.join(30)

    down = {**db, "PORT": free_port()}
    env = site_env(
        down, DOCSITE_APP_NAME="status-down",
        DOCSITE_POOL=json.dumps({"timeout": 1, "connect_timeout": 1}), DOCSITE_STATUS_TOKEN=TOKEN,
    )  # fmt: skip
    with running("uvicorn", down, tmp_path, **env) as srv:
        assert health(srv.port, token=None) == (503, {"status": "fail"})
        code, body = health(srv.port)
        (detail,) = body["pools"]
        assert code == 503 and detail["status"] == "fail", body
        assert detail["detail"].startswith("cannot connect: "), detail
        assert "Connection refused" in detail["detail"] or "refused" in detail["detail"], detail


HEALTH_CHECK_SCRIPT = r"""
import json, os, sys
import django
from django.conf import settings
db = json.loads(os.environ["DB"])
base = {"ENGINE": "connguard.backends.postgresql", "NAME": db["NAME"], "USER": db["USER"],
        "HOST": db["HOST"], "OPTIONS": {"pool": {"timeout": 1, "connect_timeout": 1}}}
settings.configure(
    INSTALLED_APPS=["connguard.django"],
    DATABASES={"default": {**base, "PORT": db["PORT"]}, "down": {**base, "PORT": db["DOWN"]}},
)
django.setup()
from health_check.exceptions import ServiceUnavailable
from connguard.django.health_check import ConnguardPool
out = {}
ConnguardPool(alias="default").run()
out["default"] = "ok"
try:
    ConnguardPool(alias="down").run()
    out["down"] = "ok"
except ServiceUnavailable as exc:
    out["down"] = str(exc)
print(json.dumps(out))
"""


def test_django_health_check_plugin(status_db: tuple[EmbeddedPostgres, dict[str, Any]]) -> None:
    """``connguard.django.health_check.ConnguardPool`` (django-health-check 4): no error
    for a pool that can connect, ``ServiceUnavailable`` naming the cause otherwise."""
    _, db = status_db
    out = django_script(HEALTH_CHECK_SCRIPT, DB=json.dumps({**db, "DOWN": free_port()}))
    assert out["default"] == "ok"
    assert out["down"].startswith("Unavailable: cannot connect: "), out


def test_live_page_in_chromium_shows_leases_and_the_leak(
    status_db: tuple[EmbeddedPostgres, dict[str, Any]], tmp_path: Path
) -> None:
    """The live page, in headless Chromium, against gunicorn (2 workers) under load:
    both workers appear, leases come and go, and a deliberately leaked lease is
    highlighted with its ``file:line``. Anonymous: 403. The token opens it once and
    leaves only a cookie digest; the page's screenshot is kept with the test's files."""
    from .site_observe import GATE, LEAK_LINE
    from .test_demo import _browse

    _, db = status_db
    pool = {"min_size": 1, "max_size": 4, "leak_threshold": 0.3, "housekeeping_interval": 0.1}
    env = site_env(
        db, DOCSITE_APP_NAME="status-live", DOCSITE_POOL=json.dumps(pool),
        DOCSITE_STATUS_TOKEN=TOKEN, DOCSITE_EXTRA_URLS="tests.site_observe",
        DOCSITE_STATUS_DIR=str(tmp_path / "status"),
    )  # fmt: skip
    with running("gunicorn", db, tmp_path, **env) as srv:
        status, _, _ = get(srv.port, "/connguard/")
        assert status == 403
        status, _, _ = get(srv.port, "/connguard/?token=wrong-token-0123456789")
        assert status == 403
        status, headers, _ = get(srv.port, f"/connguard/?token={TOKEN}")
        assert status == 302 and headers["location"] == "/connguard/"
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie

        assert get(srv.port, "/x/leak")[0] == 200
        conninfo = f"host={db['HOST']} port={db['PORT']} dbname={db['NAME']} user={db['USER']}"
        with psycopg.connect(conninfo, autocommit=True) as gate:
            # /x/hold waits for the advisory lock the test holds: its lease is out until
            # the test lets go, however slow the machine (no timing in this test).
            gate.execute("SELECT pg_advisory_lock(%s)", [GATE])
            held = threading.Thread(target=get, args=(srv.port, "/x/hold"), kwargs={"timeout": 60})
            held.start()
            try:
                waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                waiting += f"AND objid = {GATE} AND NOT granted"
                deadline = time.monotonic() + 30
                while gate.execute(waiting).fetchone() != (1,) and time.monotonic() < deadline:
                    time.sleep(0.05)
                with Hammer(srv.port, threads=4):
                    # Every worker has served requests (and so publishes) before the page loads.
                    deadline = time.monotonic() + 20
                    while time.monotonic() < deadline:
                        out = cli_status(f"{srv.url}/connguard/status", "--json").stdout
                        answer = json.loads(out)
                        if len([p for p in answer["processes"] if p["pools"]]) == srv.processes:
                            break
                    shot = tmp_path / "live-page.png"
                    url = f"{srv.url}/connguard/?token={TOKEN}"
                    # The held request's lease is out now: it appears on the page...
                    dom = _browse(url, tmp_path, "--virtual-time-budget=6000", "--dump-dom")
                    assert "GET /x/hold" in dom, dom[-3000:]
                    _browse(url, tmp_path, "--virtual-time-budget=6000", "--window-size=1280,1600",
                            f"--screenshot={shot}")  # fmt: skip
            finally:
                gate.execute("SELECT pg_advisory_unlock(%s)", [GATE])
                held.join(60)
        # ... and is gone once the request is over (the leak stays): once every worker
        # has published since (each does once a second), which the status CLI shows.
        # Every worker's (a worker whose snapshot is late is no evidence: under load
        # one may miss a second).
        deadline = time.monotonic() + 20
        while True:
            out = cli_status(f"{srv.url}/connguard/status", "--json").stdout
            seen = [p for p in json.loads(out)["processes"] if p["pools"]]
            if len(seen) == srv.processes and "GET /x/hold" not in out:
                break
            assert time.monotonic() < deadline, f"the ended request's lease is still listed: {out}"
            time.sleep(0.1)
        later = _browse(url, tmp_path, "--virtual-time-budget=6000", "--dump-dom")
        assert "GET /x/hold" not in later and "site_observe.py" in later, later[-3000:]
        assert shot.exists() and shot.stat().st_size > 10_000
        state = dom.split('id="state"', 1)[1].split("</span>", 1)[0]
        assert "Last update" in state, state
        pids = {p["pid"] for p in answer["processes"] if p["pools"]}
        for pid in pids:
            assert f'data-pid="{pid}"' in dom, dom[-3000:]
        leak_rows = [row for row in dom.split("<tr") if 'class="lease leak"' in row]
        assert leak_rows, dom[-3000:]
        assert any(f"site_observe.py:{LEAK_LINE}" in row for row in leak_rows), leak_rows
        assert any("leaky-worker" in row for row in leak_rows), leak_rows
        assert TOKEN not in dom


TOOLBAR_SCRIPT = r"""
import json, os
import django
from django.conf import settings
db = json.loads(os.environ["DB"])
settings.configure(
    DEBUG=True, ROOT_URLCONF="__main__", ALLOWED_HOSTS=["*"], SECRET_KEY="x" * 50,
    INSTALLED_APPS=["django.contrib.staticfiles", "debug_toolbar", "connguard.django"],
    STATIC_URL="/static/",
    TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}],
    DEBUG_TOOLBAR_PANELS=["connguard.django.debug_toolbar.ConnguardPanel"],
    DATABASES={"default": {"ENGINE": "connguard.backends.postgresql", "NAME": db["NAME"],
               "USER": db["USER"], "HOST": db["HOST"], "PORT": db["PORT"],
               "OPTIONS": {"pool": {"min_size": 0, "max_size": 2}}}},
)
django.setup()
from django.core.signals import request_finished, request_started
from django.db import connection
from django.http import HttpResponse
from django.test import RequestFactory
from debug_toolbar.toolbar import DebugToolbar
from connguard.django.middleware import ConnguardMiddleware
urlpatterns = []

def view(request):
    with connection.cursor() as cursor:  # ACQUIRE_LINE: the lease is taken here
        cursor.execute("SELECT 1")
    with connection.cursor() as cursor:
        cursor.execute("SET application_name = 'changed'")  # the release resets it
    return HttpResponse("ok")

def quiet(request):
    return HttpResponse("no database")

out = {}
for name, target in (("query", view), ("quiet", quiet)):
    request = RequestFactory().get("/")
    request_started.send(sender=None, environ=request.META)
    toolbar = DebugToolbar(request, get_response=ConnguardMiddleware(target))
    panel = toolbar.get_panel_by_id("ConnguardPanel")
    panel.enable_instrumentation()
    response = panel.process_request(request)
    panel.generate_stats(request, response)
    panel.disable_instrumentation()
    request_finished.send(sender=None)
    out[name] = {"stats": panel.get_stats(), "subtitle": panel.nav_subtitle,
                 "content": str(panel.content)}
print(json.dumps(out))
"""


def test_debug_toolbar_panel_shows_the_requests_leases(
    status_db: tuple[EmbeddedPostgres, dict[str, Any]],
) -> None:
    """The django-debug-toolbar panel, through the toolbar's own machinery and
    ConnguardMiddleware: one lease, its wait and hold, the reset its session change
    cost, and the line that acquired it; a request that used no connection says so."""
    _, db = status_db
    out = django_script(TOOLBAR_SCRIPT, DB=json.dumps(db))
    (lease,) = out["query"]["stats"]["leases"]
    assert lease["alias"] == "default" and not lease["still_held"], lease
    assert lease["waited_ms"] >= 0 and lease["held_ms"] > 0, lease
    assert lease["cleanup"] == "reset (session state changed)", lease
    assert lease["server_side_cursor"] is False
    query_line = TOOLBAR_SCRIPT.splitlines().index(
        next(line for line in TOOLBAR_SCRIPT.splitlines() if "# ACQUIRE_LINE" in line)
    )
    assert lease["where"][0].startswith(f"<string>:{query_line + 1} in view"), lease["where"]
    assert out["query"]["subtitle"].startswith("1 lease(s), held ")
    assert "reset (session state changed)" in out["query"]["content"]
    assert out["quiet"]["stats"]["leases"] == []
    assert "leased no connection" in out["quiet"]["content"]
