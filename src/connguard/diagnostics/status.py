"""This process's pools, as data and as text: what ``manage.py connguard status``
prints. Every active lease with its holder (thread), its owner (request, task,
thread), its age and where it was acquired (``file:line``)."""

from __future__ import annotations

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
