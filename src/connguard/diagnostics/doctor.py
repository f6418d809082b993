"""``connguard doctor``: read the server's view of its connections and explain it.

It reads ``pg_stat_activity`` and ``pg_settings``, names every client backend
(application tag, client address, user, state, idle for how long, last query),
classifies it (active, idle in a pool, idle in transaction, a likely leak...), adds
up the budget (hosts x processes x ``max_size`` against ``max_connections``), and
says in plain words what it sees and what to change. Works with a role that has
``pg_monitor``; says what it could not see without it.

Collection (:func:`collect`) is separate from judgement (:func:`diagnose`), so the
rules are tested on snapshots and the SQL on a real server.

:func:`cannot_connect` words a failed connection for ``connguard doctor`` and
``connguard demo --dsn`` alike: ``cannot connect to PostgreSQL at HOST:PORT: <reason>``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .tags import Tag, parse_tag

HIDDEN = "<insufficient privilege>"

# libpq names the server it tried: 'connection to server at "db" (10.0.0.2), port 5432
# failed: ' or 'connection to server on socket "/run/postgresql/.s.PGSQL.5432" failed: ';
# psycopg 3 puts 'connection failed: ' or 'connection is bad: ' in front.
_LIBPQ_TARGET = re.compile(
    r'^(?:connection (?:failed|is bad): )?connection to server (?:at "(?P<host>[^"]*)"'
    r'(?: \([^)]*\))?, port (?P<port>\d+)|on socket "(?P<socket>[^"]*)") failed: '
)
_DRIVER_PREFIX = re.compile(r"^connection (?:failed|is bad): ")


def cannot_connect(what: str, conninfo: str, exc: BaseException) -> str:
    """``cannot connect to <what> at HOST:PORT: <reason>``: one line, for a connection
    that failed (``what``: ``PostgreSQL``, ``pgbouncer``).

    The place is the one libpq says it tried (a socket is named by its directory and
    port), else the one ``conninfo`` names; the reason is libpq's, without the
    preamble that repeats the place. Only host and port are taken from ``conninfo``,
    so no password can reach the message.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    where: str | None = None
    found = _LIBPQ_TARGET.match(text)
    if found is not None:
        if found["socket"] is not None:
            directory, _, name = found["socket"].rpartition("/")
            where = f"{directory or '/'}:{name.rpartition('.')[2]}"
        else:
            where = _host_port(found["host"], found["port"])
        text = text[found.end() :]
    else:
        text = _DRIVER_PREFIX.sub("", text)
        where = _where(conninfo)
    reason = " ".join(text.split()) or type(exc).__name__
    return f"cannot connect to {what}{f' at {where}' if where else ''}: {reason}"


def conninfo_error(conninfo: str) -> str | None:
    """Why ``conninfo`` is not a valid libpq conninfo or URL (one line), or None: it
    is, or no driver is installed to tell."""
    try:
        _conninfo_params(conninfo)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return lines[0] if lines else type(exc).__name__
    return None


def _where(conninfo: str) -> str | None:
    """HOST:PORT as libpq would pick them from ``conninfo`` and the environment, or
    None when ``conninfo`` cannot be read (then the reason says why)."""
    try:
        params = _conninfo_params(conninfo)
    except Exception:
        return None
    if params is None:
        return None
    host = params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST")
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    return _host_port(str(host or "the default host"), str(port))


def _host_port(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _conninfo_params(conninfo: str) -> Mapping[str, Any] | None:
    """``conninfo`` (keywords or URL) parsed by whichever driver is installed (None
    without one); the driver's error if it is not valid."""
    for module, function in (
        ("psycopg.conninfo", "conninfo_to_dict"),
        ("psycopg2.extensions", "parse_dsn"),
    ):
        try:
            parse = getattr(importlib.import_module(module), function)
        except ImportError:
            continue
        params: Mapping[str, Any] = parse(conninfo)
        return params
    return None


@dataclass(frozen=True, slots=True)
class Backend:
    pid: int
    user: str | None
    database: str | None
    application_name: str
    client_addr: str | None
    state: str | None
    state_seconds: float | None  # since the last state change (idle for how long)
    xact_seconds: float | None
    query: str | None
    tag: Tag | None

    @property
    def visible(self) -> bool:
        return self.query != HIDDEN


@dataclass(slots=True)
class Snapshot:
    server_version: str
    settings: dict[str, str]
    backends: list[Backend]
    can_see_all: bool
    pgbouncer: dict[str, str] | None = None

    @property
    def max_connections(self) -> int:
        return int(self.settings.get("max_connections", "100"))

    @property
    def reserved(self) -> int:
        return int(self.settings.get("superuser_reserved_connections", "3")) + int(
            self.settings.get("reserved_connections", "0")
        )


@dataclass(slots=True)
class Finding:
    severity: str  # "problem", "warning" or "info"
    code: str
    message: str
    fix: str
    pids: list[int] = field(default_factory=list)


_SETTINGS = (
    "max_connections",
    "superuser_reserved_connections",
    "reserved_connections",
    "idle_session_timeout",
    "idle_in_transaction_session_timeout",
)

_ACTIVITY_SQL = """
SELECT pid, usename, datname, coalesce(application_name, ''), host(client_addr),
       state, extract(epoch FROM now() - state_change),
       extract(epoch FROM now() - xact_start), query
FROM pg_stat_activity
WHERE (backend_type = 'client backend' OR backend_type IS NULL)
  AND pid <> pg_backend_pid()
ORDER BY pid
"""


def collect(conn: Any, pgbouncer: Any = None) -> Snapshot:
    """Read the server (and pgbouncer's admin console, when given) through DB-API
    connections (psycopg 3 or psycopg2)."""
    cur = conn.cursor()
    try:
        cur.execute("SHOW server_version")
        version = str(cur.fetchone()[0])
        cur.execute(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(_SETTINGS),)
        )
        settings = {str(name): str(value) for name, value in cur.fetchall()}
        cur.execute(_ACTIVITY_SQL)
        rows = cur.fetchall()
        cur.execute(
            "SELECT rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') "
            "FROM pg_roles WHERE rolname = current_user"
        )
        row = cur.fetchone()
        can_see_all = bool(row and row[0])
    finally:
        cur.close()
    backends = [
        Backend(
            pid=int(r[0]),
            user=r[1],
            database=r[2],
            application_name=r[3],
            client_addr=r[4],
            state=r[5],
            state_seconds=None if r[6] is None else float(r[6]),
            xact_seconds=None if r[7] is None else float(r[7]),
            query=HIDDEN if r[5] is None and r[8] is None else r[8],
            tag=parse_tag(r[3]),
        )
        for r in rows
    ]
    return Snapshot(version, settings, backends, can_see_all, _pgbouncer_config(pgbouncer))


def _pgbouncer_config(conn: Any) -> dict[str, str] | None:
    if conn is None:
        return None
    cur = conn.cursor()
    try:
        cur.execute("SHOW CONFIG")
        return {str(row[0]): str(row[1]) for row in cur.fetchall()}
    finally:
        cur.close()


def classify(backend: Backend, idle_threshold: float) -> str:
    """One word (or three) for a backend."""
    state = backend.state or ("hidden" if not backend.visible else "unknown")
    if state.startswith("idle in transaction"):
        return "idle in transaction"
    if state == "active":
        return "active"
    if state == "idle":
        if backend.tag is not None:
            return "idle in pool"
        if (backend.state_seconds or 0) >= idle_threshold:
            return "likely leak"
        return "idle"
    return state


def _age(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def _short(query: str | None, limit: int = 60) -> str:
    text = " ".join((query or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "..."


def diagnose(
    snap: Snapshot,
    *,
    idle_threshold: float = 300.0,
    idle_in_transaction_threshold: float = 60.0,
    max_size: dict[str, int] | None = None,
) -> list[Finding]:
    """Judge a snapshot. ``max_size`` maps an alias to its pool's ``max_size`` when
    known (``manage.py connguard doctor`` knows; ``--max-size`` says it)."""
    findings: list[Finding] = []
    backends = snap.backends

    # A client that opens connections and never reuses them.
    groups: dict[tuple[Any, ...], list[Backend]] = defaultdict(list)
    for b in backends:
        if b.tag is None and b.state == "idle" and (b.state_seconds or 0) >= idle_threshold:
            groups[(b.client_addr, b.user, b.database, b.application_name)].append(b)
    for (addr, user, _db, app), members in groups.items():
        if len(members) < 3:
            continue
        distinct = len({m.query for m in members})
        oldest = min(m.state_seconds or 0 for m in members)
        where = addr or "a local socket"
        name = f" (application_name {app!r})" if app else ""
        pattern = (
            ", each with a different last query: a client that opens connections and "
            "never reuses them. This is the pattern of Django under ASGI with "
            "CONN_MAX_AGE > 0."
            if distinct > len(members) // 2
            else ": a client that keeps many connections it does not use."
        )
        findings.append(
            Finding(
                "problem",
                "idle-pileup",
                f"{len(members)} backends idle for over {_age(oldest)} from {where}{name} "
                f"as user {user} with no connguard tag{pattern}",
                "Use ENGINE 'connguard.backends.postgresql' (connections go back when each "
                "request ends), or CONN_MAX_AGE = 0 at least; idle_session_timeout on the "
                "server cuts such sessions meanwhile.",
                [m.pid for m in members],
            )
        )

    # A transaction begun and never finished.
    for b in backends:
        if (b.state or "").startswith("idle in transaction") and (
            b.state_seconds or 0
        ) >= idle_in_transaction_threshold:
            who = (
                f"connguard {b.tag.prefix} on {b.tag.host} pid {b.tag.pid} alias {b.tag.alias}"
                if b.tag
                else f"{b.client_addr or 'local socket'} ({b.application_name or 'no name'})"
            )
            findings.append(
                Finding(
                    "problem",
                    "idle-in-transaction",
                    f"pid {b.pid} idle in transaction for {_age(b.state_seconds or 0)} "
                    f"(query: {_short(b.query)}), from {who}: a request or task that began "
                    "a transaction and never finished it. It holds its locks and its "
                    "connection.",
                    "Find the code that opened it (the tag names host, process and alias); "
                    "set idle_in_transaction_session_timeout so the server ends such "
                    "sessions.",
                    [b.pid],
                )
            )

    findings.extend(_budget(snap, max_size or {}))
    findings.extend(_pgbouncer(snap))

    if not snap.can_see_all or any(not b.visible for b in backends):
        findings.append(
            Finding(
                "info",
                "limited-view",
                "This role cannot see other users' queries and states in "
                "pg_stat_activity; backends of other roles are counted but not judged.",
                "GRANT pg_monitor TO <this role> (or run doctor as a superuser).",
            )
        )
    return findings


def _budget(snap: Snapshot, max_size: dict[str, int]) -> list[Finding]:
    available = snap.max_connections - snap.reserved
    used = len(snap.backends)
    out: list[Finding] = []
    # Processes seen per connguard project and alias, from the tags.
    seen: dict[tuple[str, str], set[tuple[str, int]]] = defaultdict(set)
    for b in snap.backends:
        if b.tag is not None:
            seen[(b.tag.prefix, b.tag.alias)].add((b.tag.host, b.tag.pid))
    total = 0
    parts = []
    for (prefix, alias), processes in sorted(seen.items()):
        hosts = len({host for host, _ in processes})
        per_host = max(
            sum(1 for h, _ in processes if h == host) for host in {h for h, _ in processes}
        )
        size = max_size.get(alias)
        if size is None:
            continue
        budget = hosts * per_host * size
        total += budget
        parts.append(
            f"{hosts} host{'s' if hosts != 1 else ''} x {per_host} process"
            f"{'es' if per_host != 1 else ''} x max_size {size} = {budget} ({prefix}/{alias})"
        )
    if parts and total > available:
        out.append(
            Finding(
                "problem",
                "budget",
                f"{'; '.join(parts)}: {total} > max_connections {snap.max_connections} - "
                f"{snap.reserved} reserved = {available}. Under load the pools can ask for "
                "more connections than the server accepts.",
                "Lower max_size, run fewer processes, or raise max_connections (or put "
                "pgbouncer in transaction mode in front).",
            )
        )
    elif parts:
        out.append(
            Finding(
                "info",
                "budget",
                f"{'; '.join(parts)}: {total} <= max_connections {snap.max_connections} - "
                f"{snap.reserved} reserved = {available}.",
                "",
            )
        )
    if used >= 0.8 * available:
        out.append(
            Finding(
                "warning",
                "near-limit",
                f"{used} client backends of {available} available "
                f"({snap.max_connections} - {snap.reserved} reserved): "
                f"{100 * used // max(available, 1)} % used.",
                "See the other findings for who holds them.",
            )
        )
    return out


def _pgbouncer(snap: Snapshot) -> list[Finding]:
    out: list[Finding] = []
    by_addr: dict[str | None, list[Backend]] = defaultdict(list)
    for b in snap.backends:
        if b.application_name.lower().startswith("pgbouncer"):
            by_addr[b.client_addr].append(b)
    for addr, members in by_addr.items():
        out.append(
            Finding(
                "info",
                "pgbouncer",
                f"{len(members)} backends from {addr or 'a local socket'} look like "
                "pgbouncer's server connections: the applications behind it are not "
                "visible here. Run doctor with --pgbouncer (its admin console) to see "
                "its pool mode.",
                "",
                [m.pid for m in members],
            )
        )
    config = snap.pgbouncer
    if config is not None:
        mode = config.get("pool_mode", "?")
        implication = {
            "session": "each client connection pins a server connection for as long as it "
            "is open: pgbouncer adds no reuse, and idle Django connections hold server "
            "connections. Budget as if it were not there.",
            "transaction": "server connections are shared between transactions: "
            "session state (SET, prepared statements, advisory locks, WITH HOLD "
            "cursors) does not survive; Django needs DISABLE_SERVER_SIDE_CURSORS = True.",
            "statement": "every statement may run on a different server connection: "
            "transactions do not work; Django cannot run on it.",
        }.get(mode, "unknown pool mode.")
        out.append(
            Finding(
                "warning" if mode == "session" else "info",
                "pgbouncer-mode",
                f"pgbouncer pool_mode={mode}, max_client_conn="
                f"{config.get('max_client_conn', '?')}, default_pool_size="
                f"{config.get('default_pool_size', '?')}: {implication}",
                "See docs/django.md, 'Behind pgbouncer'.",
            )
        )
    return out


def has_problem(findings: list[Finding]) -> bool:
    return any(f.severity == "problem" for f in findings)


def as_json(snap: Snapshot, findings: list[Finding], idle_threshold: float) -> str:
    data = {
        "server_version": snap.server_version,
        "settings": snap.settings,
        "can_see_all": snap.can_see_all,
        "backends": [
            {
                **{k: v for k, v in dataclasses.asdict(b).items() if k != "tag"},
                "tag": dataclasses.asdict(b.tag) if b.tag else None,
                "class": classify(b, idle_threshold),
            }
            for b in snap.backends
        ],
        "findings": [dataclasses.asdict(f) for f in findings],
        "problem": has_problem(findings),
    }
    return json.dumps(data, indent=2, default=str)


def render(snap: Snapshot, findings: list[Finding], idle_threshold: float) -> str:
    """The table (grouped backends) and the findings, as plain text."""
    groups: dict[tuple[str, str, str, str], list[Backend]] = defaultdict(list)
    for b in snap.backends:
        who = (
            f"{b.tag.prefix}/{b.tag.alias} @{b.tag.host}" if b.tag else (b.application_name or "-")
        )
        key = (who, b.client_addr or "local", b.user or "?", classify(b, idle_threshold))
        groups[key].append(b)
    header = ("application", "client", "user", "state", "n", "idle (max)", "last query")
    rows = [header]
    for (who, addr, user, cls), members in sorted(groups.items()):
        idle = max((m.state_seconds or 0) for m in members)
        rows.append(
            (who, addr, user, cls, str(len(members)), _age(idle), _short(members[0].query, 40))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        f"PostgreSQL {snap.server_version}: {len(snap.backends)} client backends, "
        f"max_connections {snap.max_connections} ({snap.reserved} reserved)",
        "",
    ]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.append("")
    if not findings:
        lines.append("No problems found.")
    for f in findings:
        lines.append(f"[{f.severity}] {f.message}")
        if f.fix:
            lines.append(f"    fix: {f.fix}")
    return "\n".join(lines) + "\n"


def run(
    conn: Any,
    *,
    as_json_output: bool = False,
    idle_threshold: float = 300.0,
    max_size: dict[str, int] | None = None,
    pgbouncer: Any = None,
) -> tuple[str, int]:
    """Collect, judge and render; returns (output, exit status: 1 on a problem)."""
    snap = collect(conn, pgbouncer)
    findings = diagnose(snap, idle_threshold=idle_threshold, max_size=max_size)
    text = (
        as_json(snap, findings, idle_threshold)
        if as_json_output
        else render(snap, findings, idle_threshold)
    )
    return text, 1 if has_problem(findings) else 0
