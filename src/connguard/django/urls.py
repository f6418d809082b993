"""``path("connguard/", include("connguard.django.urls"))`` mounts the live page (``""``),
``status`` (every
worker's pools and leases as JSON) and ``metrics`` (the same in Prometheus's text
format) and ``health`` (for a load balancer); see :mod:`connguard.django.views`."""

from django.urls import path

from . import views

app_name = "connguard"
urlpatterns = [
    path("", views.live, name="live"),
    path("status", views.status, name="status"),
    path("metrics", views.metrics, name="metrics"),
    path("health", views.health, name="health"),
]
