"""``INSTALLED_APPS = [..., "connguard.django"]``: system checks and request scopes."""

from __future__ import annotations

from django.apps import AppConfig


class ConnguardConfig(AppConfig):
    name = "connguard.django"
    label = "connguard"
    verbose_name = "connguard"

    def ready(self) -> None:
        from . import checks, scopes  # noqa: F401, PLC0415 - registers the checks

        scopes.install()
