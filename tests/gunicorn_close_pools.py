"""A gunicorn configuration (``-c python:tests.gunicorn_close_pools``): the master
closes its pools once it is ready, before it forks the workers. docs/django.md's
explicit way for ``--preload`` to leave the master without connections."""

from typing import Any


def when_ready(server: Any) -> None:
    from django.db import connections

    for conn in connections.all(initialized_only=True):
        conn.close()  # gives back the lease a query at import may still hold
        conn.close_pool()
