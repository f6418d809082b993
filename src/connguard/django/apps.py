"""``INSTALLED_APPS = [..., "connguard.django"]``: system checks and request scopes (and,
with ``CONNGUARD["opentelemetry"]``, the pools' OpenTelemetry instruments)."""

from __future__ import annotations

from django.apps import AppConfig


class ConnguardConfig(AppConfig):
    name = "connguard.django"
    label = "connguard"
    verbose_name = "connguard"

    def ready(self) -> None:
        from . import checks, scopes  # noqa: F401, PLC0415 - registers the checks

        scopes.install()
        from .conf import app_settings  # noqa: PLC0415

        if app_settings().opentelemetry:
            from connguard.diagnostics import otel  # noqa: PLC0415 - only when asked

            from . import pools  # noqa: PLC0415

            otel.instrument(pools.pools)
