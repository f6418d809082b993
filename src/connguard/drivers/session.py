"""PostgreSQL session state: which statements may change it, and one statement that
takes it all back.

Reset policy ``"auto"`` resets a connection only when its holder may have changed
session state. HikariCP tracks "dirty bits" set by API calls; connguard also sees the
SQL going through the fence, so :func:`changes_session` looks at each statement. It
errs toward "yes": a keyword inside a string literal or a comment costs one needless
reset, never a leak. What it cannot see is state changed *inside* server code: a
function, a ``DO`` block (counted as a change, since it may do anything), a trigger, or
``ALTER ROLE ... SET`` defaults. Sites that rely on those choose ``reset="always"``.

:data:`RESET_SQL` is ``DISCARD ALL`` spelled out as the statements it is documented to
run. ``DISCARD ALL`` itself refuses to share a query string with anything else (it
cannot run inside a transaction block, and a multi-statement string is one), so the
spelled-out form is what lets a reset and the re-applied baseline (time zone, role)
travel in a single round trip.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["RESET_SQL", "changes_session", "literal"]

# Commands that change the session when they start a statement. SET LOCAL, SET
# TRANSACTION and SET CONSTRAINTS last only until the transaction ends (the release's
# rollback takes them back).
_AT_START = re.compile(
    r"(?:(?:/\*.*?\*/|--[^\n]*(?:\n|\Z))\s*)*(?:"
    r"set\b(?!\s+(?:local|transaction|constraints)\b)|reset\b|discard\b|listen\b"
    r"|unlisten\b|prepare\b(?!\s+transaction\b)|deallocate\b|declare\b|load\b|do\b|call\b)",
    re.IGNORECASE | re.DOTALL,
)
# The first word of a statement, lower-cased, decides most cases without the regex.
_AT_START_WORDS = frozenset(
    [
        "set",
        "reset",
        "discard",
        "listen",
        "unlisten",
        "prepare",
        "deallocate",
        "declare",
        "load",
        "do",
        "call",
    ]
)
_NEEDS_REGEX = frozenset(("set", "prepare"))
_WORD = re.compile(r"[A-Za-z_]+").match
# Anywhere in a statement: functions and clauses with session-lifetime effects. Each
# is looked for only when its cheap substring is present (a plain ``in`` test is ~50x
# faster than a regular expression over a long ORM query).
_ANYWHERE = (
    ("set_config", re.compile(r"\bset_config\s*\(", re.IGNORECASE)),
    ("advisory_lock", re.compile(r"\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\(", re.IGNORECASE)),
    (
        "temp",
        re.compile(
            r"\btemp(?:orary)?\s+(?:recursive\s+)?(?:table|view|sequence)\b"
            r"|\binto\s+(?:unlogged\s+)?temp|\bpg_temp\s*\.",
            re.IGNORECASE,
        ),
    ),
    ("dblink_connect", None),
)


_seen: dict[str, bool] = {}  # verdicts per query text: an ORM repeats its queries
_SEEN_MAX = 4096


def changes_session(sql: Any) -> bool:
    """True when ``sql`` may change session state beyond its transaction.

    ``sql`` as a driver takes it: ``str``, ``bytes``, or a composed query object
    (``psycopg.sql``), which counts as a change (rendering it needs a connection).
    About 0.2 µs for a query seen before, 1-2 µs for a new one.
    """
    if type(sql) is not str:
        if isinstance(sql, bytes | bytearray | memoryview):
            sql = bytes(sql).decode("latin-1")
        elif isinstance(sql, str):
            sql = str(sql)
        else:
            return True
    verdict = _seen.get(sql)
    if verdict is None:
        verdict = _judge(sql)
        if len(_seen) >= _SEEN_MAX:
            _seen.clear()
        _seen[sql] = verdict
    return verdict


def _judge(sql: str) -> bool:
    for statement in sql.split(";") if ";" in sql else (sql,):
        head = statement.lstrip()
        if not head:
            continue
        word = _WORD(head) if head[0] not in "/-(" else None
        first = word.group().lower() if word is not None else "/"
        if first == "/" or first in _NEEDS_REGEX:
            if _AT_START.match(head):
                return True
        elif first in _AT_START_WORDS:
            return True
    lowered = sql.lower()
    for needle, pattern in _ANYWHERE:
        if needle in lowered and (pattern is None or pattern.search(sql)):
            return True
    return False


RESET_SQL = (
    "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; "
    "UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD PLANS; DISCARD TEMP; "
    "DISCARD SEQUENCES"
)
"""``DISCARD ALL``, as the statements PostgreSQL documents it to be, so more can follow
in the same query string."""


def literal(value: str) -> str:
    """``value`` as a PostgreSQL string literal (standard-conforming strings: the only
    character to escape is the quote itself; a NUL is refused)."""
    if "\x00" in value:
        raise ValueError("a PostgreSQL string cannot contain NUL")
    return "'" + value.replace("'", "''") + "'"
