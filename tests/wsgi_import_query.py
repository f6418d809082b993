"""The docsite's WSGI application, plus what many sites do at import time: one query
(a cache warm-up, a feature-flag read). ``DOCSITE_IMPORT_QUERY``: ``close`` (the
default) then gives the connection back as docs/django.md asks
(``connection.close()``); ``keep`` does not. Under ``gunicorn --preload`` this runs in
the master, before it forks the workers."""

import os

from django.db import connection

from connguard.demo.site.wsgi import application

__all__ = ["application"]

with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
if os.environ.get("DOCSITE_IMPORT_QUERY", "close") == "close":
    connection.close()
