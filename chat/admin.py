"""Admin: look inside the running chat and moderate it.

Online figures come from the presence store (live workers only), the same truth
the chat itself uses. Every moderation step goes through chat.moderation, so it
takes effect on every worker at once and is recorded as a ModerationAction.
"""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, Exists, IntegerField, OuterRef, Subquery
from django.db.models.functions import Coalesce
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from chat import membership, moderation, presence, protocol, tokens
from chat.models import (
    ApiToken,
    Connection,
    Membership,
    Message,
    ModerationAction,
    Room,
    RoomBan,
    Worker,
)

RECENT_MESSAGES = 20


def count_of(queryset, field: str, *, distinct: bool = False, by: str = "room"):
    """Returns a subquery counting `field` over `queryset` (filtered by OuterRef).

    `by` is the field of `queryset` that the OuterRef filters on.
    """
    counted = (
        queryset.order_by()
        .values(by)
        .annotate(n=Count(field, distinct=distinct))
        .values("n")
    )
    return Coalesce(Subquery(counted, output_field=IntegerField()), 0)


def admin_link(obj, text: str | None = None) -> str:
    """Returns a link to the admin change page of `obj` (or "-" for None)."""
    if obj is None:
        return "-"
    meta = obj._meta
    url = reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk])
    return format_html('<a href="{}">{}</a>', url, text or str(obj))


class ViewOnlyMixin:
    """For rows the chat itself writes: never added or edited in the admin."""

    # False also takes deleting away (the default leaves it to permissions).
    deletable = True

    def has_add_permission(self, request, *args) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        # The change page still shows the row, read-only, to those who may
        # view it; a POST to it is refused (403).
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return self.deletable and super().has_delete_permission(request, obj)


# ---------------------------------------------------------------------------
# Rooms
# ---------------------------------------------------------------------------


class ActivityFilter(admin.SimpleListFilter):
    title = "activity"
    parameter_name = "active"
    WINDOWS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}

    def lookups(self, request, model_admin):
        return [("hour", "Active in the last hour"), ("day", "Active in the last day")]

    def queryset(self, request, queryset):
        window = self.WINDOWS.get(self.value())
        if window is None:
            return queryset
        return queryset.filter(last_message_at__gte=timezone.now() - window)


class ConnectionInline(ViewOnlyMixin, admin.TabularInline):
    """The sockets open in the room right now, on live workers."""

    model = Connection
    verbose_name = "open socket"
    verbose_name_plural = "open sockets (live workers only)"
    fields = [
        "user",
        "worker",
        "connected_at",
        "address",
        "queued_events",
        "peak_queued_events",
        "channel_name",
    ]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False

    def get_queryset(self, request):
        return (
            presence.live_connections()
            .select_related("user")
            .order_by("user__username", "connected_at")
        )


class MembershipForm(forms.ModelForm):
    class Meta:
        model = Membership
        fields = ["user"]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # A member is added or removed, never changed into someone else.
        if self.instance.pk is not None and "user" in self.fields:
            self.fields["user"].disabled = True


class MembershipInline(admin.TabularInline):
    """The people whose room it is, and how far each has read.

    In a private room the admin adds and removes members here (through
    chat.membership, so a removed member's sockets close); elsewhere it is
    read-only: a public room's rows are read positions, a direct message
    keeps its two.
    """

    model = Membership
    form = MembershipForm
    verbose_name = "member"
    verbose_name_plural = "members and read positions"
    fields = ["user", "read_seq", "unread", "read_at", "joined_at"]
    readonly_fields = ["read_seq", "unread", "read_at", "joined_at"]
    raw_id_fields = ["user"]
    extra = 0
    show_change_link = False

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .select_related("user", "room")
            .order_by("user__username")
        )

    def get_readonly_fields(self, request, obj=None):
        if self._manages(request, obj):
            return self.readonly_fields
        return ["user", *self.readonly_fields]

    def _manages(self, request, room) -> bool:
        return (
            room is not None
            and room.kind == Room.Kind.PRIVATE
            and request.user.has_perm("chat.change_membership")
        )

    def has_add_permission(self, request, obj=None) -> bool:
        return self._manages(request, obj)

    def has_change_permission(self, request, obj=None) -> bool:
        # The formset must accept the new rows; existing ones cannot change
        # (MembershipForm), and the others' rows are read-only.
        return self._manages(request, obj)

    def has_delete_permission(self, request, obj=None) -> bool:
        return self._manages(request, obj)

    @admin.display(description="unread")
    def unread(self, membership: Membership) -> int:
        return max(0, membership.room.last_seq - membership.read_seq)


class RoomAdminForm(forms.ModelForm):
    class Meta:
        model = Room
        fields = ["slug", "kind"]

    def clean_slug(self) -> str:
        slug = self.cleaned_data["slug"]
        if not protocol.is_valid_room_name(slug):
            raise forms.ValidationError(
                "Use 1-64 lower-case letters, digits, - or _, starting with a "
                "letter or digit."
            )
        if membership.is_reserved_name(slug):
            raise forms.ValidationError(
                "Names that start with dm- are kept for direct messages."
            )
        return slug

    def clean_kind(self) -> str:
        kind = self.cleaned_data["kind"]
        if kind == Room.Kind.DIRECT:
            raise forms.ValidationError(
                "A direct message is opened from a person's name."
            )
        return kind


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    form = RoomAdminForm
    list_display = [
        "slug",
        "kind",
        "online_members",
        "open_sockets",
        "messages_total",
        "messages_last_hour",
        "last_activity",
        "created_at",
        "is_closed",
    ]
    list_filter = ["kind", "is_closed", ActivityFilter, "created_at"]
    search_fields = ["slug"]
    readonly_fields = [
        "created_by",
        "last_seq",
        "last_message_at",
        "created_at",
        "is_closed",
        "online_now",
        "recent_messages",
    ]
    fields = [
        "slug",
        "kind",
        "created_by",
        "is_closed",
        "created_at",
        "last_seq",
        "last_message_at",
        "online_now",
        "recent_messages",
    ]
    inlines = [ConnectionInline, MembershipInline]
    actions = ["close_rooms", "reopen_rooms"]

    def get_readonly_fields(self, request, obj=None):
        # Renaming a room would strand the sockets in its old group; a room
        # made private or public would let in or shut out who is there.
        if obj is not None:
            return ["slug", "kind", *self.readonly_fields]
        return self.readonly_fields

    def save_model(self, request, obj: Room, form, change: bool) -> None:
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)

    def save_formset(self, request, form, formset, change) -> None:
        if formset.model is not Membership:
            super().save_formset(request, form, formset, change)
            return
        # Through chat.membership: a removed member's sockets close. Saved
        # with commit=False only to learn what the rows ask for.
        room = form.instance
        formset.save(commit=False)
        for removed in formset.deleted_objects:
            membership.member_remove(room=room, user=removed.user, actor=None)
        for added in formset.new_objects:
            membership.member_add(room=room, user=added.user, actor=request.user)

    def get_queryset(self, request):
        # One subquery per figure: joining sockets and messages in one query
        # would read sockets x messages rows for a busy room.
        sockets = presence.live_connections().filter(room=OuterRef("pk"))
        messages = Message.objects.filter(room=OuterRef("pk"), deleted_at__isnull=True)
        hour_ago = timezone.now() - timedelta(hours=1)
        return (
            super()
            .get_queryset(request)
            .annotate(
                online_count=count_of(sockets, "user", distinct=True),
                socket_count=count_of(sockets, "id"),
                message_count=count_of(messages, "id"),
                recent_count=count_of(messages.filter(created_at__gte=hour_ago), "id"),
                last_activity_at=Coalesce("last_message_at", "created_at"),
            )
        )

    @admin.display(description="online", ordering="online_count")
    def online_members(self, room: Room) -> int:
        return room.online_count

    @admin.display(description="sockets", ordering="socket_count")
    def open_sockets(self, room: Room) -> int:
        return room.socket_count

    @admin.display(description="messages", ordering="message_count")
    def messages_total(self, room: Room) -> int:
        return room.message_count

    @admin.display(description="last hour", ordering="recent_count")
    def messages_last_hour(self, room: Room) -> int:
        return room.recent_count

    @admin.display(description="last activity", ordering="last_activity_at")
    def last_activity(self, room: Room):
        return room.last_activity_at

    @admin.display(description="online now")
    def online_now(self, room: Room) -> str:
        rows = (
            presence.live_connections()
            .filter(room=room)
            .values("user__id", "user__username")
            .annotate(sockets=Count("id"))
            .order_by("user__username")
        )
        if not rows:
            return "nobody"
        sockets_url = reverse("admin:chat_connection_changelist")
        return format_html(
            '<ul>{}</ul><a href="{}?room__id__exact={}">Kick or ban from the open '
            "sockets list</a>",
            format_html_join(
                "",
                "<li>{} ({} socket{})</li>",
                (
                    (
                        row["user__username"],
                        row["sockets"],
                        "" if row["sockets"] == 1 else "s",
                    )
                    for row in rows
                ),
            ),
            sockets_url,
            room.pk,
        )

    @admin.display(description=f"last {RECENT_MESSAGES} messages")
    def recent_messages(self, room: Room) -> str:
        recent = list(room.messages.order_by("-seq")[:RECENT_MESSAGES])[::-1]
        if not recent:
            return "none yet"
        return format_html(
            "<table>{}</table>",
            format_html_join(
                "",
                "<tr><td>#{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                (
                    (
                        message.seq,
                        timezone.localtime(message.created_at).strftime(
                            "%Y-%m-%d %H:%M:%S"
                        ),
                        message.author,
                        admin_link(message, message.body[:120]),
                        "deleted" if message.deleted_at else "",
                    )
                    for message in recent
                ),
            ),
        )

    def has_close_permission(self, request) -> bool:
        return request.user.has_perm("chat.close_room")

    @admin.action(
        description="Close the selected rooms (read-only)", permissions=["close"]
    )
    def close_rooms(self, request, queryset) -> None:
        self._set_closed(request, queryset, closed=True)

    @admin.action(description="Reopen the selected rooms", permissions=["close"])
    def reopen_rooms(self, request, queryset) -> None:
        self._set_closed(request, queryset, closed=False)

    def _set_closed(self, request, queryset, *, closed: bool) -> None:
        changed = [
            room.slug
            for room in queryset
            if moderation.room_set_closed(room=room, closed=closed, actor=request.user)
        ]
        verb = "Closed" if closed else "Reopened"
        if changed:
            self.message_user(
                request, f"{verb}: {', '.join(changed)}.", messages.SUCCESS
            )
        else:
            self.message_user(request, "Nothing to change.", messages.INFO)


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------


class DeletedFilter(admin.SimpleListFilter):
    title = "deleted"
    parameter_name = "deleted"

    def lookups(self, request, model_admin):
        return [("no", "Visible"), ("yes", "Deleted")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(deleted_at__isnull=False)
        if self.value() == "no":
            return queryset.filter(deleted_at__isnull=True)
        return queryset


@admin.register(Message)
class MessageAdmin(ViewOnlyMixin, admin.ModelAdmin):
    # Posted through the chat or the API, never typed in here; what was said
    # is not rewritten. Deleting (soft) stays possible with its permission.
    list_display = [
        "created_at",
        "room_link",
        "seq",
        "author_link",
        "short_body",
        "is_deleted",
    ]
    list_display_links = ["created_at"]
    list_filter = [DeletedFilter, "room", ("created_at", admin.DateFieldListFilter)]
    search_fields = ["body", "author", "user__username"]
    list_select_related = ["room", "user"]
    date_hierarchy = "created_at"
    readonly_fields = [
        "room",
        "seq",
        "user",
        "author",
        "body",
        "mentions",
        "client_id",
        "created_at",
        "deleted_at",
        "deleted_by",
    ]

    def has_view_permission(self, request, obj=None) -> bool:
        return request.user.has_perm("chat.view_message") or request.user.has_perm(
            "chat.delete_message"
        )

    @admin.display(description="room", ordering="room__slug")
    def room_link(self, message: Message) -> str:
        return admin_link(message.room)

    @admin.display(description="author", ordering="author")
    def author_link(self, message: Message) -> str:
        return (
            admin_link(message.user, message.author) if message.user else message.author
        )

    @admin.display(description="message")
    def short_body(self, message: Message) -> str:
        return message.body if len(message.body) <= 80 else message.body[:79] + "…"

    @admin.display(description="deleted", boolean=True)
    def is_deleted(self, message: Message) -> bool:
        return message.deleted_at is not None

    # Deleting from the admin is a soft delete that every open page sees at once.

    def delete_model(self, request, obj: Message) -> None:
        moderation.message_delete(message=obj, actor=request.user)

    def delete_queryset(self, request, queryset) -> None:
        moderation.messages_delete(messages=queryset, actor=request.user)


# ---------------------------------------------------------------------------
# Sockets, kicks and bans
# ---------------------------------------------------------------------------


class LiveFilter(admin.SimpleListFilter):
    title = "worker"
    parameter_name = "live"

    def lookups(self, request, model_admin):
        return [("yes", "Live workers"), ("no", "Dead workers (awaiting sweep)")]

    def queryset(self, request, queryset):
        live = presence.live_worker_ids()
        if self.value() == "yes":
            return queryset.filter(worker__in=live)
        if self.value() == "no":
            return queryset.exclude(worker__in=live)
        return queryset


@admin.register(Connection)
class ConnectionAdmin(ViewOnlyMixin, admin.ModelAdmin):
    # Rows come from open sockets only; deleting one would not close the
    # socket (kick instead).
    deletable = False
    list_display = [
        "user",
        "room",
        "worker",
        "connected_at",
        "address",
        "queued_events",
        "peak_queued_events",
    ]
    list_filter = [LiveFilter, "room", "worker"]
    search_fields = ["user__username", "room__slug", "worker", "address"]
    list_select_related = ["user", "room"]
    actions = ["kick_users", "ban_users"]

    def has_view_permission(self, request, obj=None) -> bool:
        return request.user.has_perm(
            "chat.view_connection"
        ) or self.has_kick_permission(request)

    def has_kick_permission(self, request) -> bool:
        return request.user.has_perm("chat.kick_user")

    def has_ban_permission(self, request) -> bool:
        return request.user.has_perm("chat.add_roomban")

    def _pairs(self, queryset):
        return {(c.room, c.user) for c in queryset.select_related("room", "user")}

    @admin.action(
        description="Kick the selected users out of those rooms", permissions=["kick"]
    )
    def kick_users(self, request, queryset) -> None:
        pairs = self._pairs(queryset)
        for room, user in pairs:
            moderation.user_kick(room=room, user=user, actor=request.user)
        self.message_user(request, f"Kicked {len(pairs)} user(s).", messages.SUCCESS)

    @admin.action(
        description="Ban the selected users from those rooms (no expiry)",
        permissions=["ban"],
    )
    def ban_users(self, request, queryset) -> None:
        pairs = self._pairs(queryset)
        for room, user in pairs:
            moderation.user_ban(
                room=room, user=user, actor=request.user, reason="from the admin"
            )
        self.message_user(request, f"Banned {len(pairs)} user(s).", messages.SUCCESS)


@admin.register(RoomBan)
class RoomBanAdmin(admin.ModelAdmin):
    list_display = [
        "user",
        "room",
        "reason",
        "expires_at",
        "created_by",
        "created_at",
        "active",
    ]
    list_filter = ["room", "created_at", "expires_at"]
    search_fields = ["user__username", "room__slug", "reason"]
    list_select_related = ["user", "room", "created_by"]
    autocomplete_fields = ["user", "room"]
    fields = ["room", "user", "reason", "expires_at", "created_by", "created_at"]
    readonly_fields = ["created_by", "created_at"]

    @admin.display(boolean=True, description="in force")
    def active(self, ban: RoomBan) -> bool:
        return ban.expires_at is None or ban.expires_at > timezone.now()

    def get_readonly_fields(self, request, obj=None):
        # A ban is lifted by deleting it; editing who or where would bypass the kick.
        if obj is not None:
            return ["room", "user", *self.readonly_fields]
        return self.readonly_fields

    def save_model(self, request, obj: RoomBan, form, change: bool) -> None:
        if change:
            moderation.ban_change(
                ban=obj,
                actor=request.user,
                reason=obj.reason,
                expires_at=obj.expires_at,
            )
            return
        moderation.user_ban(
            room=obj.room,
            user=obj.user,
            actor=request.user,
            reason=obj.reason,
            expires_at=obj.expires_at,
            ban=obj,
        )

    def delete_model(self, request, obj: RoomBan) -> None:
        moderation.ban_lift(ban=obj, actor=request.user)

    def delete_queryset(self, request, queryset) -> None:
        for ban in queryset.select_related("room", "user"):
            moderation.ban_lift(ban=ban, actor=request.user)


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


@admin.register(ModerationAction)
class ModerationActionAdmin(ViewOnlyMixin, admin.ModelAdmin):
    # The record is append-only.
    deletable = False
    list_display = [
        "created_at",
        "kind",
        "actor",
        "room",
        "target_user",
        "message_link",
        "detail",
    ]
    list_filter = ["kind", ("created_at", admin.DateFieldListFilter), "room"]
    search_fields = ["actor__username", "target_user__username", "room__slug", "detail"]
    list_select_related = ["actor", "room", "target_user", "message"]
    date_hierarchy = "created_at"

    @admin.display(description="message")
    def message_link(self, action: ModerationAction) -> str:
        return (
            admin_link(action.message, f"#{action.message.seq}")
            if action.message
            else "-"
        )


@admin.register(Worker)
class WorkerAdmin(ViewOnlyMixin, admin.ModelAdmin):
    list_display = [
        "id",
        "started_at",
        "heartbeat_at",
        "alive",
        "sockets",
        "slow_closes",
    ]
    readonly_fields = ["id", "started_at", "heartbeat_at", "slow_closes"]

    def get_queryset(self, request):
        # Both columns in the list's one query, not two queries per row.
        sockets = Connection.objects.filter(worker=OuterRef("pk"))
        live = presence.live_worker_ids().filter(id=OuterRef("pk"))
        return (
            super()
            .get_queryset(request)
            .annotate(
                lease_valid=Exists(live),
                socket_count=count_of(sockets, "id", by="worker"),
            )
            .order_by("-heartbeat_at")
        )

    @admin.display(boolean=True, description="lease valid")
    def alive(self, worker: Worker) -> bool:
        return worker.lease_valid

    @admin.display(description="sockets")
    def sockets(self, worker: Worker) -> int:
        return worker.socket_count


# ---------------------------------------------------------------------------
# API tokens
# ---------------------------------------------------------------------------


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Tokens of the HTTP API; the raw token is shown once, right after adding."""

    list_display = [
        "name",
        "prefix",
        "owner",
        "can_publish",
        "can_push",
        "push_to",
        "room",
        "created_at",
        "last_used_at",
        "active",
    ]
    list_filter = [
        "can_publish",
        "can_push",
        ("revoked_at", admin.EmptyFieldListFilter),
    ]
    search_fields = ["name", "prefix", "owner__username"]
    list_select_related = ["owner", "room"]
    raw_id_fields = ["owner"]
    filter_horizontal = ["push_users"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke_tokens"]

    @admin.display(boolean=True, description="active")
    def active(self, token: ApiToken) -> bool:
        return token.revoked_at is None

    def save_model(self, request, obj: ApiToken, form, change: bool) -> None:
        raw = None if change else tokens.api_token_set_secret(obj)
        super().save_model(request, obj, form, change)
        if raw is not None:
            # Only the hash is stored: this message is the one chance to copy it.
            messages.warning(
                request,
                f"The token {obj.name!r} is {raw} (copy it now: it is not stored "
                "and cannot be shown again).",
            )

    @admin.action(description="Revoke selected tokens")
    def revoke_tokens(self, request, queryset) -> None:
        revoked = sum(tokens.api_token_revoke(token=token) for token in queryset)
        self.message_user(request, f"{revoked} token(s) revoked.")
