"""The status board (connguard.diagnostics.snapshots), the status view's access rule
and ``connguard status --url``'s one-line errors; no server needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from connguard.cli import main
from connguard.diagnostics import status
from connguard.diagnostics.snapshots import Board, Publisher, process_snapshot

from .fakes import FakeDriver, wait_until
from .servers import django_script, free_port


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def snapshot(pid: int, taken_at: float) -> dict[str, Any]:
    return {"pid": pid, "host": "h", "taken_at": taken_at, "pools": []}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_board_reads_the_live_fresh_snapshots_and_drops_the_dead(tmp_path: Path) -> None:
    clock = Clock()
    board = Board(tmp_path / "b", stale_after=5.0, clock=clock)
    me, parent, gone = os.getpid(), os.getppid(), dead_pid()
    board.publish(snapshot(me, clock.now))
    board.publish(snapshot(parent, clock.now - 6))  # alive, but not refreshed for 6 s
    board.publish(snapshot(gone, clock.now))
    (tmp_path / "b" / "junk.json").write_text("{")
    (tmp_path / "b" / f".{me}.1.tmp").write_text("{")  # a write in progress
    assert [s["pid"] for s in board.read()] == [me]
    assert not (tmp_path / "b" / f"{gone}.json").exists(), "a dead process's file is removed"
    assert (tmp_path / "b" / f"{parent}.json").exists(), "a stale one is only left out"
    assert board.read(exclude=me) == []
    clock.now -= 2
    assert sorted(s["pid"] for s in board.read()) == sorted([me, parent])
    board.withdraw()
    assert [s["pid"] for s in board.read()] == [parent]


def test_board_publishes_atomically_under_concurrent_readers(tmp_path: Path) -> None:
    board = Board(tmp_path, stale_after=1e9)
    big = {**snapshot(os.getpid(), 0.0), "pools": [{"x": "y" * 100_000}]}
    bad: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                for s in board.read():
                    assert len(s["pools"][0]["x"]) == 100_000
            except BaseException as exc:
                bad.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    for _ in range(200):
        board.publish(big)
    stop.set()
    for reader in readers:
        reader.join()
    assert not bad, bad[0]


def test_publisher_publishes_this_process_and_withdraws(tmp_path: Path) -> None:
    from connguard.pool import Pool, PoolConfig

    pool = Pool(FakeDriver(), PoolConfig(min_size=0, max_size=2), name="pub", housekeeping=False)
    board = Board(tmp_path, stale_after=60)
    publisher = Publisher(board, lambda: [pool], interval=0.01)
    lease = pool.acquire()
    publisher.ensure()
    publisher.ensure()  # once per process
    wait_until(lambda: any(s["pools"] and s["pools"][0]["leases"] for s in board.read()))
    (seen,) = board.read()
    assert seen["pid"] == os.getpid() and seen["pools"][0]["pool"] == "pub"
    assert seen["pools"][0]["stats"]["in_use"] == 1
    publisher.stop()
    wait_until(lambda: board.read() == [])
    lease.release()
    pool.close()


def test_format_processes_names_each_process() -> None:
    text = status.format_processes([snapshot(11, 5.0), snapshot(12, 3.0)])
    assert "process 11 on h\n" in text and "process 12 on h (snapshot 2.0 s older)" in text
    assert "no pool yet" in text
    assert "none has served a request" in status.format_processes([])


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://x/status", "must be an http:// or https:// URL"),
        (f"http://127.0.0.1:{free_port()}/connguard/status", "cannot read http://127.0.0.1:"),
    ],
)
def test_cli_status_errors_are_one_line(
    url: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--url", url]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and expected in err, err


def test_cli_status_reads_json_and_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a stand-in server: the token travels as a bearer header (from the
    environment when not given), and a page that is not connguard's is said so."""
    import http.server

    seen: list[str | None] = []
    body = {"taken_at": 1.0, "processes": [snapshot(7, 1.0)]}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            payload = json.dumps(body if self.path == "/s" else {"x": 1}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        monkeypatch.setenv(status.TOKEN_ENV, "from-the-environment")
        assert main(["status", "--url", f"{base}/s"]) == 0
        assert "process 7 on h" in capsys.readouterr().out
        assert main(["status", "--url", f"{base}/s", "--json", "--token", "given"]) == 0
        assert json.loads(capsys.readouterr().out) == body
        assert seen == ["Bearer from-the-environment", "Bearer given"]
        assert main(["status", "--url", f"{base}/other"]) == 2
        assert "not connguard's status" in capsys.readouterr().err
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_process_snapshot_is_json_ready() -> None:
    data = process_snapshot([])
    assert json.loads(json.dumps(data)) == data and data["pid"] == os.getpid()


VIEW_SCRIPT = r"""
import json, os, types
import django
from django.conf import settings
settings.configure(
    INSTALLED_APPS=["connguard.django"], ALLOWED_HOSTS=["*"], DATABASES={},
    CONNGUARD={"status_token": "t" * 20, "status_dir": os.environ["STATUS_DIR"]},
    ROOT_URLCONF="__main__",
)
django.setup()
from django.urls import include, path
urlpatterns = [path("connguard/", include("connguard.django.urls"))]
from django.test import RequestFactory, override_settings
from connguard.django import views

rf = RequestFactory()
def call(headers=None, user=None):
    request = rf.get("/connguard/status", headers=headers or {})
    if user is not None:
        request.user = user
    response = views.status(request)
    return response.status_code, response.content
staff = types.SimpleNamespace(is_active=True, is_staff=True)
plain = types.SimpleNamespace(is_active=True, is_staff=False)
inactive = types.SimpleNamespace(is_active=False, is_staff=True)
out = {
    "anonymous": call()[0],
    "plain_user": call(user=plain)[0],
    "inactive_staff": call(user=inactive)[0],
    "staff": call(user=staff)[0],
    "token": call({"Authorization": "Bearer " + "t" * 20})[0],
    "wrong_token": call({"Authorization": "Bearer " + "t" * 19 + "u"})[0],
    "basic_scheme": call({"Authorization": "Basic " + "t" * 20})[0],
}
with override_settings(CONNGUARD={}):
    out["token_unset"] = call({"Authorization": "Bearer "})[0]
out["mounted"] = views.mounted()
with override_settings(ROOT_URLCONF="connguard"):  # a module with no urlpatterns
    out["mounted_without_urls"] = views.mounted()
def page(user=None, query=""):
    request = rf.get("/connguard/" + query)
    if user is not None:
        request.user = user
    return views.live(request)
out["page_anonymous"] = page().status_code
out["page_plain_user"] = page(user=plain).status_code
staff_page = page(user=staff)
out["page_staff"] = staff_page.status_code
out["page_reads_status"] = b'const STATUS_URL = "/connguard/status";' in staff_page.content
opened = page(query="?token=" + "t" * 20)
out["page_token_redirects"] = (opened.status_code, opened["Location"])
digest = opened.cookies[views.COOKIE].value
out["cookie_is_not_the_token"] = digest != "t" * 20 and "t" * 20 not in digest
request = rf.get("/connguard/status")
request.COOKIES[views.COOKIE] = digest
out["cookie_opens_status"] = views.status(request).status_code
request = rf.get("/connguard/status")
request.COOKIES[views.COOKIE] = "0" * 64
out["wrong_cookie"] = views.status(request).status_code
code, body = call(user=staff)
data = json.loads(body)
out["own_pid_first"] = data["processes"][0]["pid"] == os.getpid()
out["no_token_in_body"] = ("t" * 20).encode() not in body
print(json.dumps(out))
"""


def test_status_view_is_for_staff_or_the_token(tmp_path: Path) -> None:
    out = django_script(VIEW_SCRIPT, STATUS_DIR=str(tmp_path))
    assert out == {
        "anonymous": 403, "plain_user": 403, "inactive_staff": 403, "staff": 200,
        "token": 200, "wrong_token": 403, "basic_scheme": 403, "token_unset": 403,
        "own_pid_first": True, "no_token_in_body": True,
        "page_anonymous": 403, "page_plain_user": 403, "page_staff": 200,
        "page_reads_status": True, "page_token_redirects": [302, "/connguard/"],
        "cookie_is_not_the_token": True, "cookie_opens_status": 200, "wrong_cookie": 403,
        "mounted": True, "mounted_without_urls": False,
    }  # fmt: skip


def test_board_refuses_a_directory_others_may_write(tmp_path: Path) -> None:
    """Under a shared temporary directory another user could plant snapshots: a
    directory that is not this user's own, or that others may write in, is neither
    read nor written."""
    shared = tmp_path / "shared"
    shared.mkdir()
    board = Board(shared, stale_after=60)
    board.publish(snapshot(os.getpid(), board._clock()))
    assert [s["pid"] for s in board.read()] == [os.getpid()]
    shared.chmod(0o777)
    assert board.read() == []
    with pytest.raises(PermissionError, match="others may write"):
        board.publish(snapshot(os.getpid(), board._clock()))
    shared.chmod(0o700)


def test_default_directories_tell_sites_apart() -> None:
    from connguard.diagnostics.snapshots import default_directory

    one, other = default_directory("shop.settings|/srv/shop"), default_directory("blog|/srv/b")
    assert one != other and one.parent == other.parent
    assert one.name.startswith(f"connguard-status-{os.getuid()}-{os.getppid()}-")
