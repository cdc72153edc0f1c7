"""Chat pages: the lobby and a room."""

from django.urls import path

from chat import views

app_name = "chat"

urlpatterns = [
    path("", views.lobby, name="lobby"),
    # No trailing slash, so no room name can ever shadow it.
    path("rooms.json", views.lobby_rooms, name="lobby_rooms"),
    # "dm" is no room name a user can take (membership.DIRECT_PREFIX).
    path("dm/<str:username>/", views.direct, name="direct"),
    path("<str:room>/", views.room, name="room"),
    path("<str:room>/members/", views.member_add, name="member_add"),
    path(
        "<str:room>/members/<str:username>/remove/",
        views.member_remove,
        name="member_remove",
    ),
]
