"""Pools, as data and as text: what ``manage.py connguard status`` and ``connguard
status --url`` print. Every active lease with its holder (thread), its owner (request,
task, thread), its age and where it was acquired (``file:line``).

In-process, :func:`report` reads this process's pools. From outside, :func:`fetch`
reads a running server's status view (``connguard.django.urls``), which answers with
every worker process's snapshot, and :func:`format_processes` prints them."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any

from connguard.pool import Pool

_SETTINGS = ("min_size", "max_size", "timeout", "max_waiting", "max_lifetime", "max_idle",
             "leak_threshold", "reclaim")  # fmt: skip


def _owner(owner: object) -> dict[str, Any]:
    if owner is None:
        return {"kind": None, "name": None}
    info = dict(getattr(owner, "info", {}) or {})
    return {"kind": getattr(owner, "kind", type(owner).__name__),
            "name": getattr(owner, "name", repr(owner)), **info}  # fmt: skip


def report(pools: Iterable[Pool]) -> list[dict[str, Any]]:
    """One entry per pool: name, settings, stats (gauges and counters) and leases."""
    out = []
    for pool in pools:
        stats = pool.stats().as_dict()
        now = pool._clock()
        leases = [
            {
                "thread": lease.thread_name,
                "thread_alive": lease.thread is not None,
                "owner": _owner(lease.owner),
                "age": round(now - lease.acquired_at, 3),
                "where": lease.where(),
                "leak_reported": lease.leak_reported,
                "pinned": lease.pinned,
            }
            for lease in pool.leases()
        ]
        out.append({
            "pool": pool.name,
            "driver": pool.driver.name,
            "settings": {key: getattr(pool.config, key) for key in _SETTINGS},
            "stats": {k: v for k, v in stats.items() if not isinstance(v, dict)},
            "latency": {k: v for k, v in stats.items() if isinstance(v, dict)},
            "leases": leases,
        })  # fmt: skip
    return out


TOKEN_ENV = "CONNGUARD_STATUS_TOKEN"
"""The environment variable ``connguard status --url`` reads the bearer token from
when ``--token`` is not given (a token on the command line ends up in shell history)."""

HOW_TO_SEE_A_SERVER = (
    "To see a running server's pools (every worker process): mount "
    'path("connguard/", include("connguard.django.urls")) and run '
    "connguard status --url http://HOST/connguard/status (docs/diagnostics.md)."
)


class StatusUnavailable(Exception):
    """The status view could not be read; the message is one line for the user."""


def fetch(url: str, *, token: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """A running server's status (``{"taken_at": ..., "processes": [...]}``).

    ``token``: the view's ``CONNGUARD["status_token"]`` (default: the
    ``CONNGUARD_STATUS_TOKEN`` environment variable). Raises :class:`StatusUnavailable`
    with one line naming the URL and what went wrong.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StatusUnavailable(f"--url must be an http:// or https:// URL, got {url!r}")
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        hint = (
            f" (give the view's CONNGUARD['status_token'] with --token or {TOKEN_ENV})"
            if exc.code in (401, 403)
            else ""
        )
        raise StatusUnavailable(f"{url}: HTTP {exc.code} {exc.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusUnavailable(f"cannot read {url}: {reason}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise StatusUnavailable(f"{url}: the answer is not connguard's status (not JSON)") from None
    if not isinstance(data, dict) or not isinstance(data.get("processes"), list):
        raise StatusUnavailable(f"{url}: the answer is not connguard's status")
    return data


def format_processes(processes: list[dict[str, Any]]) -> str:
    """Every process's pools, one section per process (pid, host, age of its
    snapshot), as text for a terminal."""
    if not processes:
        return "No process has published its pools yet (none has served a request).\n"
    newest = max(float(p.get("taken_at", 0)) for p in processes)
    sections = []
    for snapshot in processes:
        age = newest - float(snapshot.get("taken_at", newest))
        head = f"process {snapshot.get('pid')} on {snapshot.get('host')}"
        head += f" (snapshot {age:.1f} s older)" if age >= 0.05 else ""
        pools = snapshot.get("pools") or []
        body = format_report(pools) if pools else "  no pool yet in this process\n"
        sections.append(f"{head}\n{body}")
    return "\n".join(sections)


def format_report(entries: list[dict[str, Any]]) -> str:
    """Readable text for a terminal."""
    if not entries:
        return "No connguard pool in this process (no connection has been used yet).\n"
    lines: list[str] = []
    for entry in entries:
        s = entry["stats"]
        settings = " ".join(f"{k}={v}" for k, v in entry["settings"].items())
        lines.append(f"pool {entry['pool']!r} ({entry['driver']}): {settings}")
        lines.append(
            f"  now     size={s['size']} in_use={s['in_use']} idle={s['idle']} "
            f"waiting={s['waiting']} opening={s['opening']}"
        )
        lines.append(
            f"  totals  acquires={s['acquires']} timeouts={s['timeouts']} "
            f"refusals={s['refusals']} opened={s['opened']} leaks={s['leaks']} "
            f"reclaims={s['reclaims']} dropped={s['dropped']}"
        )
        if not entry["leases"]:
            lines.append("  leases  none")
        for lease in entry["leases"]:
            owner = lease["owner"]
            holder = owner.get("name") or "-"
            if owner.get("path"):
                holder = f"{owner.get('method', '')} {owner['path']}".strip()
                if owner.get("view"):
                    holder += f" ({owner['view']})"
            alive = "" if lease["thread_alive"] else " [thread ended]"
            leak = " LEAK?" if lease["leak_reported"] else ""
            lines.append(
                f"  lease   {lease['age']:.1f}s  {owner.get('kind') or '-'}: {holder}  "
                f"thread {lease['thread']}{alive}{leak}"
            )
            for where in lease["where"][:3]:
                lines.append(f"            at {where}")
    return "\n".join(lines) + "\n"
