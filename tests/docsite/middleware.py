"""The report's work-around, verbatim in spirit: close every connection after
every request. Used only as a benchmark anchor."""

from django.db import connections
from django.utils.deprecation import MiddlewareMixin


class DatabaseConnectionMiddleware(MiddlewareMixin):
    def process_response(self, request, response):
        for conn in connections.all():
            if conn.connection is not None:
                conn.close()
        return response

    def process_exception(self, request, exception):
        for conn in connections.all():
            if conn.connection is not None:
                conn.close()
