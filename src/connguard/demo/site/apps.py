from django.apps import AppConfig


class DocsiteConfig(AppConfig):
    name = "connguard.demo.site"
    label = "docsite"
