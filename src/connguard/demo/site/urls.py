from django.conf import settings
from django.urls import include, path

from . import views

urlpatterns = [
    path("doc/<int:doc_id>/page/<int:page_no>.png", views.page_image),
    path("async/doc/<int:doc_id>/page/<int:page_no>.png", views.page_image_async),
    path("aorm/doc/<int:doc_id>/page/<int:page_no>.png", views.page_image_async_orm),
    path("stream/doc/<int:doc_id>", views.document_stream),
    path("slow", views.slow),
    path("one", views.one_query),
    path("connguard/stats", views.pool_stats),
    path("connguard/whoami", views.whoami),
]
if getattr(settings, "CONNGUARD", {}).get("status_token"):  # DOCSITE_STATUS_TOKEN
    urlpatterns.append(path("connguard/", include("connguard.django.urls")))

if getattr(settings, "EXTRA_URLS", ""):
    urlpatterns.append(path("x/", include(settings.EXTRA_URLS)))
