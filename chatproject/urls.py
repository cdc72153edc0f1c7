"""Top-level URLs: the admin, the chat, its HTTP API, accounts, and health checks."""

from django.contrib import admin
from django.urls import include, path, re_path
from django.views.generic import RedirectView

from chat import api, health, views

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="chat:lobby", permanent=False)),
    path("admin/", admin.site.urls),
    path("chat/", include("chat.urls")),
    path("api/", include("chat.api_urls")),
    # Without its slash, /api is the API's 404 too, never a redirect that a
    # POST cannot follow.
    re_path(r"^api$", api.not_found),
    path("accounts/signup/", views.signup, name="signup"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", health.metrics_view, name="metrics"),
]
