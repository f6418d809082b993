from django.apps import AppConfig


class DocsiteConfig(AppConfig):
    name = "tests.docsite"
    label = "docsite"
