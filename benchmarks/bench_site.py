"""A whole request through Django's handler, in-process: what ``bench_instructions.py
--site`` counts (and anyone can time). The site is the one ``django-admin
startproject`` makes (its seven middleware, auth, sessions, messages; connguard's
sites add ``ConnguardMiddleware`` first, as its docs ask), with one view
that runs ``SELECT 1`` through a cursor; each request is a WSGI call of Django's
``WSGIHandler``, as a server makes it, with the response read and closed.

Unlike the bare cycle (``request_started``, ``ensure_connection()``,
``request_finished``), this pays for what a real request does around the database:
URL resolution, middleware, the response, and an acquire whose site is walked from
the view's query up to Django's handler."""

from __future__ import annotations

import io
from typing import Any

from django.urls import path  # reads no setting: importable before configure()

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
]


def bare_settings(database: dict[str, Any], connguard: bool) -> dict[str, Any]:
    """``settings.configure()`` keywords for the bare cycle's site on ``database``:
    that one database, and connguard's app when it is connguard's."""
    return {
        "DATABASES": {"default": database},
        "INSTALLED_APPS": ["connguard.django"] if connguard else [],
        "USE_TZ": True,
        "TIME_ZONE": "UTC",
    }


def settings_for(database: dict[str, Any], connguard: bool) -> dict[str, Any]:
    """``settings.configure()`` keywords for the whole site on ``database``; with
    connguard, its middleware first, as docs/django.md (and ``connguard.W002``) ask."""
    bare = bare_settings(database, connguard)
    first = ["connguard.django.middleware.ConnguardMiddleware"] if connguard else []
    return {
        **bare,
        "INSTALLED_APPS": APPS + bare["INSTALLED_APPS"],
        "MIDDLEWARE": first + MIDDLEWARE,
        "ROOT_URLCONF": __name__,
        "ALLOWED_HOSTS": ["*"],
        "SECRET_KEY": "bench-site-not-secret",
    }


def one(request: Any) -> Any:
    from django.db import connection
    from django.http import HttpResponse

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return HttpResponse("ok")


urlpatterns = [path("one", one)]


def requester() -> Any:
    """A function that makes one request (``GET /one``) and checks its answer."""
    from django.core.handlers.wsgi import WSGIHandler

    handler = WSGIHandler()

    def start_response(status: str, headers: Any) -> None:
        if not status.startswith("200"):
            raise RuntimeError(f"GET /one answered {status}")

    def request() -> None:
        environ = {
            "REQUEST_METHOD": "GET", "PATH_INFO": "/one", "QUERY_STRING": "",
            "SERVER_NAME": "bench", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(),
        }  # fmt: skip
        response = handler(environ, start_response)
        b"".join(response)
        response.close()

    return request
