"""The ``application_name`` tag every connguard connection carries.

Format: ``<prefix>|cg|<host>|<pid>|<alias>``, at most 63 bytes (PostgreSQL keeps
``NAMEDATALEN - 1`` bytes and replaces non-ASCII with ``?``). The prefix is the
project (or the ``application_name`` the user set); host, pid and alias say which
process of which server holds the backend, so ``pg_stat_activity`` on the server
answers "who holds this?" across many app servers. Set once at connect: no round
trip per checkout.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

MARKER = "|cg|"
MAX_BYTES = 63

_TAG = re.compile(r"^(?P<prefix>.*)\|cg\|(?P<host>[^|]*)\|(?P<pid>\d+)\|(?P<alias>[^|]*)$")
_UNSAFE = re.compile(r"[^\x20-\x7e]|\|")


@dataclass(frozen=True, slots=True)
class Tag:
    prefix: str
    host: str
    pid: int
    alias: str


def _clean(text: str, limit: int) -> str:
    return _UNSAFE.sub("_", text)[:limit]


def make_tag(prefix: str, alias: str, *, host: str | None = None, pid: int | None = None) -> str:
    """The tag for a connection opened now by this process."""
    host = _clean((host or socket.gethostname()).split(".")[0], 20)
    alias = _clean(alias, 16)
    pid_text = str(os.getpid() if pid is None else pid)
    tail = f"{MARKER}{host}|{pid_text}|{alias}"
    prefix = _clean(prefix, max(0, MAX_BYTES - len(tail)))
    return prefix + tail


def parse_tag(application_name: str | None) -> Tag | None:
    """The tag in ``application_name``, or None for a connection connguard did not
    open (stock Django, psql, a cron job...)."""
    if not application_name:
        return None
    found = _TAG.match(application_name)
    if found is None:
        return None
    return Tag(found["prefix"], found["host"], int(found["pid"]), found["alias"])
