"""Settings for Django's own ``tests/runtests.py`` on connguard (``.ci/django-suite``).

Django's ``tests/test_sqlite.py`` with ``default`` and ``other`` on connguard's ENGINE,
on the embedded PostgreSQL that ``.ci/django-suite`` starts (its port in
``CONNGUARD_SUITE_PG_PORT``). ``CONNGUARD_SUITE_ENGINE`` (``.ci/django-suite --engine``)
``stock`` runs the same on Django's own ENGINE without a pool, ``native`` with Django's
own pool (psycopg_pool), for comparison.
``runtests.py`` supplies INSTALLED_APPS, MIDDLEWARE,
TEMPLATES... itself. ``TEST_RUNNER`` records every test's outcome as JSON for the
stage to compare with ``.ci/django-suite-expected.txt``.
"""

import os

_port = int(os.environ["CONNGUARD_SUITE_PG_PORT"])
_engine = os.environ.get("CONNGUARD_SUITE_ENGINE", "connguard")


def _database(name: str) -> dict[str, object]:
    if _engine in ("stock", "native"):
        return {"ENGINE": "django.db.backends.postgresql", "HOST": "127.0.0.1",
                "PORT": _port, "USER": "postgres", "NAME": name,
                "OPTIONS": {"pool": True} if _engine == "native" else {}}  # fmt: skip
    return {
        "ENGINE": "connguard.backends.postgresql",
        "HOST": "127.0.0.1",
        "PORT": _port,
        "USER": "postgres",
        "NAME": name,
        # All of connguard's defaults, as a site that switches ENGINE would have them.
        "OPTIONS": {"pool": True},
    }


DATABASES = {"default": _database("django_suite"), "other": _database("django_suite_other")}

SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False

TEST_RUNNER = "django_suite_runner.RecordingRunner"
