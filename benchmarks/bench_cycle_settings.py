"""Settings for ``bench_django.py --cycle``: the demo site's, with one database alias
per variant, so that one process can run every variant and interleave them finely
(short batches, rotating order) on a machine whose speed drifts from second to second.

Every alias is the same database (``DOCSITE_DB``) with its own ``application_name``
(``bench-cycle-<alias>``), so the PostgreSQL backends of each alias can be told apart
and their CPU time read. ``default`` is the stock backend with ``CONN_MAX_AGE=None``.
"""

from connguard.demo.site.settings import *  # noqa: F403
from connguard.demo.site.settings import DATABASES as _SITE_DATABASES

POOL_SIZE = 4  # as bench_django.POOL_SIZE
_site = _SITE_DATABASES["default"]
_options = {k: v for k, v in _site["OPTIONS"].items() if k not in ("pool", "application_name")}
_STOCK = "django.db.backends.postgresql"
_CONNGUARD = "connguard.backends.postgresql"


def _alias(alias: str, engine: str, max_age: int | None, pool: dict | None = None) -> dict:
    options = {**_options, "application_name": f"bench-cycle-{alias}"}
    if pool is not None:
        options["pool"] = {"min_size": POOL_SIZE, "max_size": POOL_SIZE, **pool}
    return {**_site, "ENGINE": engine, "CONN_MAX_AGE": max_age, "OPTIONS": options}


DATABASES = {
    "default": _alias("default", _STOCK, None),
    "native": _alias("native", _STOCK, 0, {}),
    "rollback": _alias("rollback", _CONNGUARD, 0, {"reset": "rollback"}),
    "auto": _alias("auto", _CONNGUARD, 0, {"reset": "auto"}),
    "always": _alias("always", _CONNGUARD, 0, {"reset": "always"}),
    "rollback_guc": _alias("rollback_guc", _CONNGUARD, 0, {"reset": "rollback"}),
    "auto_guc": _alias("auto_guc", _CONNGUARD, 0, {"reset": "auto"}),
}
MIDDLEWARE: list[str] = []
