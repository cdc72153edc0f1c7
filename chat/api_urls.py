"""URLs of the HTTP API, mounted at /api/ (docs/api.md, docs/openapi.json).

The trailing slash is optional: APPEND_SLASH cannot redirect a POST, and a
client of an API should not need to guess. Anything else under /api/ is a JSON
404, never the HTML one.
"""

from django.urls import re_path

from chat import api

app_name = "api"

urlpatterns = [
    re_path(r"^rooms/?$", api.rooms, name="rooms"),
    re_path(
        r"^rooms/(?P<room>[^/]+)/messages/?$", api.room_messages, name="room-messages"
    ),
    re_path(r"^rooms/(?P<room>[^/]+)/read/?$", api.room_read, name="room-read"),
    re_path(r"^users/(?P<username>[^/]+)/push/?$", api.user_push, name="user-push"),
    re_path(r"^(?P<rest>.*)$", api.not_found, name="not-found"),
]
