"""Top-level URLs: the admin, the chat, its HTTP API, accounts, and health checks."""

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from chat import health, views

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="chat:lobby", permanent=False)),
    path("admin/", admin.site.urls),
    path("chat/", include("chat.urls")),
    path("api/", include("chat.api_urls")),
    path("accounts/signup/", views.signup, name="signup"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", health.metrics_view, name="metrics"),
]
