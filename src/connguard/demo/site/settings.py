"""The user report's site, configurable from the environment for the acceptance tests.

DOCSITE_DB          JSON: {"HOST", "PORT", "NAME", "USER", "PASSWORD", "OPTIONS"}; OPTIONS
                    (e.g. sslmode, from ``connguard demo --dsn``) go to the driver
DOCSITE_ENGINE      connguard (default) | stock | native (Django's own psycopg_pool)
DOCSITE_CONN_MAX_AGE  "0", "15", "None"...
DOCSITE_HEALTH_CHECKS "1" for CONN_HEALTH_CHECKS = True
DOCSITE_POOL        JSON for OPTIONS["pool"]
DOCSITE_MIDDLEWARE  connguard (default) | close (the report's close-everything middleware) | none
DOCSITE_DAPHNE      "1": daphne in INSTALLED_APPS (runserver then serves ASGI)
DOCSITE_APP_NAME    application_name, so tests count this site's backends
DOCSITE_DRIVER      psycopg2: hide psycopg 3 so Django (and connguard) use psycopg2
DOCSITE_EXTRA_URLS  a module whose ``urlpatterns`` are mounted under ``/x/`` (the test
                    suite's probe views live in ``tests/``, not in the package)
DOCSITE_ASSUME_ROLE OPTIONS["assume_role"]
DOCSITE_STATUS_TOKEN / DOCSITE_STATUS_DIR  CONNGUARD["status_token"] / ["status_dir"];
                    with a token, the status view is mounted at /connguard/status
"""

import json
import os
import sys

if os.environ.get("DOCSITE_DRIVER") == "psycopg2":
    sys.modules["psycopg"] = None  # type: ignore[assignment]  # Django falls back

SECRET_KEY = "connguard-demo-site-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "connguard.demo.site.urls"
WSGI_APPLICATION = "connguard.demo.site.wsgi.application"
ASGI_APPLICATION = "connguard.demo.site.asgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = ["connguard.django", "connguard.demo.site"]
if os.environ.get("DOCSITE_DAPHNE") == "1":
    INSTALLED_APPS.insert(0, "daphne")

_middleware = os.environ.get("DOCSITE_MIDDLEWARE", "connguard")
MIDDLEWARE = {
    "connguard": ["connguard.django.middleware.ConnguardMiddleware"],
    "close": ["connguard.demo.site.middleware.DatabaseConnectionMiddleware"],
    "none": [],
}[_middleware]

_db = json.loads(os.environ.get("DOCSITE_DB", "{}"))
_engine = os.environ.get("DOCSITE_ENGINE", "connguard")
_max_age_text = os.environ.get("DOCSITE_CONN_MAX_AGE", "0")
_options: dict[str, object] = {
    **_db.get("OPTIONS", {}),
    "application_name": os.environ.get("DOCSITE_APP_NAME", "docsite"),
}
if os.environ.get("DOCSITE_ASSUME_ROLE"):
    _options["assume_role"] = os.environ["DOCSITE_ASSUME_ROLE"]
if _engine in ("connguard", "native"):
    _options["pool"] = json.loads(os.environ.get("DOCSITE_POOL", "{}")) or True

DATABASES = {
    "default": {
        "ENGINE": {
            "connguard": "connguard.backends.postgresql",
            "stock": "django.db.backends.postgresql",
            "native": "django.db.backends.postgresql",
        }[_engine],
        "HOST": _db.get("HOST", "127.0.0.1"),
        "PORT": _db.get("PORT", 5432),
        "NAME": _db.get("NAME", "docsite"),
        "USER": _db.get("USER", "postgres"),
        "PASSWORD": _db.get("PASSWORD", ""),
        "CONN_MAX_AGE": None if _max_age_text == "None" else int(_max_age_text),
        "CONN_HEALTH_CHECKS": os.environ.get("DOCSITE_HEALTH_CHECKS") == "1",
        "OPTIONS": _options,
    }
}

CONNGUARD: dict[str, object] = {"retry_after": 2}
if os.environ.get("DOCSITE_STATUS_TOKEN"):
    CONNGUARD["status_token"] = os.environ["DOCSITE_STATUS_TOKEN"]
if os.environ.get("DOCSITE_STATUS_DIR"):
    CONNGUARD["status_dir"] = os.environ["DOCSITE_STATUS_DIR"]
EXTRA_URLS = os.environ.get("DOCSITE_EXTRA_URLS", "")

# Server errors (5xx) go to stderr, one line each with the exception: the server's
# log is where ``connguard demo`` reads why requests failed (an HTTP client sees only
# "500"). Django's defaults print nothing when DEBUG is off.
LOGGING = {
    "version": 1,
    "formatters": {"one_line": {"()": "connguard.demo.site.logs.OneLineFormatter"}},
    "handlers": {
        "stderr": {"class": "logging.StreamHandler"},
        "request_errors": {"class": "logging.StreamHandler", "formatter": "one_line"},
    },
    "loggers": {
        "connguard": {"handlers": ["stderr"], "level": "WARNING"},
        "django.request": {"handlers": ["request_errors"], "level": "ERROR", "propagate": False},
    },
}
