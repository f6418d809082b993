"""connguard's pools as a ``django-health-check`` check (version 4).

.. code-block:: python

    # urls.py
    from health_check.views import HealthCheckView

    path("ht/", HealthCheckView.as_view(checks=[
        "health_check.checks.Cache",
        ("connguard.django.health_check.ConnguardPool", {"alias": "default"}),
    ])),

A pool that cannot connect is ``ServiceUnavailable``; a saturated one (every
connection in use, requests queued) is ``ServiceWarning``. See
:mod:`connguard.django.health` for what is tested. Importing this module needs
``django-health-check``; nothing else in connguard imports it.
"""

from __future__ import annotations

import dataclasses
import datetime

from health_check.base import HealthCheck
from health_check.exceptions import ServiceUnavailable, ServiceWarning

from . import health


@dataclasses.dataclass
class ConnguardPool(HealthCheck):
    """The connguard pool of one database alias in this process."""

    alias: str = "default"
    timeout = datetime.timedelta(seconds=health.TEST_TIMEOUT + 1)

    def run(self) -> None:
        result = health.check(self.alias)
        if result.status == "fail":
            raise ServiceUnavailable(result.detail)
        if result.status == "warn":
            raise ServiceWarning(result.detail)
