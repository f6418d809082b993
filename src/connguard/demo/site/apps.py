from django.apps import AppConfig


class DocsiteConfig(AppConfig):
    name = "connguard.demo.site"
    label = "docsite"
    # Whatever DEFAULT_AUTO_FIELD the project sets, the migration stays as written.
    default_auto_field = "django.db.models.BigAutoField"
