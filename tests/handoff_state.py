"""What a connection's session looks like when nobody has changed it (issue 8).

Shared by the probe views (``tests/site_session_state.py``, imported inside the site's
server process) and the tests (``tests/test_handoff_servers.py``): one definition of
the baseline, so a probe's verdict and a test's reading of it cannot drift apart.
No Django import here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KINDS = (
    "search_path",
    "role",
    "statement_timeout",
    "guc",
    "temp",
    "advisory",
    "listen",
    "prepare",
    "reset_role",
    "withhold",
)
"""Every kind of session state a dirty view can leave behind (``/x/dirty/<kind>``)."""

LOGIN_ROLE = "postgres"
"""The role the site logs in as (``session_user``)."""

TIME_ZONE = "UTC"
"""What Django sets on each connection (``USE_TZ = True``). The test database's own
default is different (see the fixture), so a reset that forgets to re-apply Django's
set-up shows here."""

PROBE_SQL = """
SELECT current_user::text,
       session_user::text,
       current_setting('search_path'),
       current_setting('statement_timeout'),
       current_setting('app.tenant', true),
       current_setting('TimeZone'),
       ARRAY(SELECT relname::text FROM pg_class
             WHERE relpersistence = 't' AND relkind = 'r'
               AND relnamespace = pg_my_temp_schema() ORDER BY 1),
       ARRAY(SELECT objid::bigint FROM pg_locks
             WHERE locktype = 'advisory' AND pid = pg_backend_pid() ORDER BY 1),
       ARRAY(SELECT c::text FROM pg_listening_channels() AS c ORDER BY 1),
       ARRAY(SELECT name::text FROM pg_prepared_statements WHERE from_sql ORDER BY 1),
       ARRAY(SELECT name::text FROM pg_cursors WHERE name <> '' ORDER BY 1),
       pg_backend_pid()
"""
"""What a request's connection carries, read by the request's first statement.
Prepared statements count only those made by SQL (``from_sql``), cursors only named
ones: a driver's own protocol-level statements and the probe's own (unnamed) portal
are not state a view left behind."""

PROBE_FIELDS = (
    "current_user",
    "session_user",
    "search_path",
    "statement_timeout",
    "app_tenant",
    "time_zone",
    "temp_tables",
    "advisory_locks",
    "listening",
    "prepared",
    "cursors",
    "backend_pid",
)


def baseline(user: str = LOGIN_ROLE) -> dict[str, Any]:
    """The probe's fields on a connection nobody changed; ``user``: the role requests
    run as (Django's ``assume_role``, or the login role)."""
    return {
        "current_user": user,
        "session_user": LOGIN_ROLE,
        "search_path": '"$user", public',
        "statement_timeout": "0",
        "app_tenant": None,  # '' after a RESET ALL / DISCARD ALL: also clean
        "time_zone": TIME_ZONE,
        "temp_tables": [],
        "advisory_locks": [],
        "listening": [],
        "prepared": [],
        "cursors": [],
    }


def foreign_state(probe: Mapping[str, Any], user: str = LOGIN_ROLE) -> dict[str, Any]:
    """The fields of ``probe`` that differ from the baseline: state some earlier
    request left on the connection. Empty when the connection is clean."""
    out: dict[str, Any] = {}
    for name, expected in baseline(user).items():
        seen = probe.get(name)
        if name == "app_tenant" and seen in (None, ""):
            continue
        if seen != expected:
            out[name] = seen
    return out
