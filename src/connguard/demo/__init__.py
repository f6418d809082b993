"""``connguard demo``: the user report, reproduced with stock Django and fixed with
connguard, on a throwaway PostgreSQL. ``connguard.demo.site`` is the report's site
(documents whose pages are images behind a permission query); the test suite and
the benchmarks run it under real servers too.

The modules, from the bottom up: :mod:`~connguard.demo.servers` starts the site
under a real web server, :mod:`~connguard.demo.load` replays the burst of image
loads, :mod:`~connguard.demo.sampler` watches ``pg_stat_activity`` and the pool,
:mod:`~connguard.demo.database` provides the PostgreSQL, :mod:`~connguard.demo.runner`
runs stock Django then connguard, :mod:`~connguard.demo.figures` turns samples into
the summary, :mod:`~connguard.demo.view` shows progress in the terminal and
:mod:`~connguard.demo.report` writes the HTML report.

This module stays free of imports: Django imports ``connguard.demo.site`` through it.
"""

from __future__ import annotations

__all__ = ["USER_REPORT", "DemoError"]

USER_REPORT = (
    "The user report is a Django user's account of a site that ran out of database "
    "connections: it shows documents as page images, each image behind a permission "
    "query, with CONN_MAX_AGE=15 and CONN_HEALTH_CHECKS=True. Every page load left "
    "connections idle in pg_stat_activity for hours, each with a different last query "
    "and never reused, until PostgreSQL (and pgbouncer in front of it) refused new ones; "
    "CONN_MAX_AGE 0 or None and pgbouncer changed nothing, and only a middleware that "
    "closes every connection after every request made it stop."
)
"""What "the user report" is, in three sentences, wherever the command line first
names it (``connguard --help``, the demo's first line, the HTML report). The README
says the same in its own words."""


class DemoError(Exception):
    """A failure reported as one line without a traceback.

    ``status`` 2 means the user can fix it (bad option, port in use, unreachable or
    unsuitable server); 1 means the demo itself could not complete (a server that
    would not start). The message never holds a password: it names servers by host
    and port, never by DSN.
    """

    def __init__(self, message: str, *, status: int = 2) -> None:
        super().__init__(message)
        self.status = status
