"""Chat pages: the lobby and a room."""

from django.urls import path

from chat import views

app_name = "chat"

urlpatterns = [
    path("", views.lobby, name="lobby"),
    # No trailing slash, so no room name can ever shadow it.
    path("rooms.json", views.lobby_rooms, name="lobby_rooms"),
    path("<str:room>/", views.room, name="room"),
]
