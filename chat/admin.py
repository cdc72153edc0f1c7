"""Admin: rooms and messages, for looking inside the running chat."""

from django.contrib import admin
from django.db.models import Count

from chat.models import Connection, Message, Room


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = ["slug", "online", "last_seq", "last_message_at", "created_at"]
    search_fields = ["slug"]
    list_filter = ["created_at", "last_message_at"]
    readonly_fields = ["last_seq", "last_message_at", "created_at"]
    date_hierarchy = "created_at"

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(
            online_count=Count("connections__user", distinct=True)
        )

    @admin.display(description="online", ordering="online_count")
    def online(self, room: Room) -> int:
        return room.online_count


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["room", "seq", "author", "short_body", "created_at", "client_id"]
    list_filter = ["room", "created_at"]
    search_fields = ["body", "author", "room__slug"]
    list_select_related = ["room"]
    readonly_fields = ["room", "seq", "user", "author", "client_id", "created_at"]
    raw_id_fields = ["user"]
    date_hierarchy = "created_at"

    @admin.display(description="message")
    def short_body(self, message: Message) -> str:
        return message.body if len(message.body) <= 80 else message.body[:79] + "…"


@admin.register(Connection)
class ConnectionAdmin(admin.ModelAdmin):
    list_display = ["user", "room", "worker", "address", "connected_at"]
    list_filter = ["room", "worker"]
    search_fields = ["user__username", "room__slug", "channel_name"]
    list_select_related = ["user", "room"]

    def has_add_permission(self, request) -> bool:
        # Rows come from open sockets only.
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
