"""The user report's work-around: close every connection after every request.

Shipped only as a comparison point for the benchmarks; do not use it.
"""

from __future__ import annotations

from django.db import connections
from django.http import HttpRequest, HttpResponseBase
from django.utils.deprecation import MiddlewareMixin


class DatabaseConnectionMiddleware(MiddlewareMixin):
    def process_response(
        self, request: HttpRequest, response: HttpResponseBase
    ) -> HttpResponseBase:
        close_all()
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> None:
        close_all()


def close_all() -> None:
    for conn in connections.all():
        if conn.connection is not None:
            conn.close()
