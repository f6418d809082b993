"""One line per failed request in the server's log, with the exception's first line.

Django logs a 500 with its whole traceback, or (with ``DEBUG`` off and the default
logging) not at all. ``connguard demo`` counts why requests failed by reading these
lines back from the server's log, so each must be one line, start with a fixed
marker, and carry the exception's type and message.
"""

from __future__ import annotations

import logging

MARKER = "docsite request error:"
"""Starts every line this formatter writes; :mod:`connguard.demo.figures` parses them."""


class OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{MARKER} {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            detail = next((part.strip() for part in str(exc).splitlines() if part.strip()), "")
            line += f" | {type(exc).__name__}: {detail}"
        return line
