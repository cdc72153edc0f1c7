"""Top-level URLs: the admin, the chat, and the account pages."""

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from chat import views

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="chat:lobby", permanent=False)),
    path("admin/", admin.site.urls),
    path("chat/", include("chat.urls")),
    path("accounts/signup/", views.signup, name="signup"),
    path("accounts/", include("django.contrib.auth.urls")),
]
