"""What the chat stores: rooms, their messages, the sockets open in them, and
what each person has read and where they were mentioned."""

from django.conf import settings
from django.db import models
from django.db.models import Q


class Room(models.Model):
    class Kind(models.TextChoices):
        # Any signed-in user may enter.
        PUBLIC = "public", "public"
        # Members only: its creator (or the admin) adds and removes them.
        PRIVATE = "private", "private"
        # A private room of two, opened from a person's name.
        DIRECT = "direct", "direct message"

    slug = models.SlugField(max_length=64, unique=True)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.PUBLIC)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    # The seq of the newest message; bumped under a row lock so seqs have no holes.
    last_seq = models.PositiveBigIntegerField(default=0)
    # Deletions so far: each deleted message gets the next number, so a page
    # that resumes says the last one it saw and learns the ones it missed.
    deletions = models.PositiveBigIntegerField(default=0)
    last_message_at = models.DateTimeField(null=True, blank=True)
    # A closed room can be read but not posted to (moderation).
    is_closed = models.BooleanField(default=False)

    class Meta:
        ordering = ["slug"]
        permissions = [
            ("close_room", "Can close and reopen rooms"),
            ("kick_user", "Can kick users out of rooms"),
        ]

    def __str__(self) -> str:
        return self.slug

    @property
    def is_public(self) -> bool:
        return self.kind == self.Kind.PUBLIC


class Message(models.Model):
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="messages")
    seq = models.PositiveBigIntegerField()
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="chat_messages",
    )
    # The name shown with the message, kept even if the account goes away.
    author = models.CharField(max_length=150)
    body = models.TextField()
    client_id = models.CharField(max_length=64, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    # Soft delete: the row and its seq stay, so seqs keep no holes.
    deleted_at = models.DateTimeField(null=True, blank=True)
    # The room's deletion number of this message's deletion (Room.deletions).
    deletion = models.PositiveBigIntegerField(null=True, blank=True, editable=False)
    deleted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    # The usernames the text mentions with @name (existing users, at the time
    # it was stored), as the `message` event carries them.
    mentions = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["room", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["room", "seq"], name="message_room_seq"),
            models.UniqueConstraint(
                fields=["room", "deletion"],
                condition=Q(deletion__isnull=False),
                name="message_room_deletion",
            ),
            # A retried send carries the same client_id: it must not be stored twice.
            models.UniqueConstraint(
                fields=["room", "user", "client_id"],
                condition=Q(client_id__isnull=False),
                name="message_room_user_client_id",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.room.slug}#{self.seq} {self.author}: {self.body[:40]}"


class Membership(models.Model):
    """A person's place in a room: how far they have read.

    In a public room it is made by their first read there; in a private room
    or a direct message it is what lets them in, made when they are added.
    `read_seq` never moves back.
    """

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="chat_memberships",
    )
    # The last seq of the room they have seen (0: none yet).
    read_seq = models.PositiveBigIntegerField(default=0)
    joined_at = models.DateTimeField(auto_now_add=True)
    read_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["user", "room"], name="membership_user_room"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.room} (read to #{self.read_seq})"


class Mention(models.Model):
    """One user mentioned by one message; what the mention counts count."""

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_mentions"
    )
    # The message's room and seq, so a count needs no join to the messages.
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="+")
    seq = models.PositiveBigIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["message", "user"], name="mention_message_user"
            ),
        ]
        indexes = [
            models.Index(fields=["user", "room", "seq"], name="mention_user_room_seq"),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.room}#{self.seq}"


class Worker(models.Model):
    """A worker process holding sockets; alive while it renews its lease."""

    id = models.CharField(max_length=200, primary_key=True)
    started_at = models.DateTimeField(auto_now_add=True)
    heartbeat_at = models.DateTimeField(db_index=True)
    # Sockets this worker closed with 4008 for falling behind (as of its last
    # heartbeat; /metrics has the live figure).
    slow_closes = models.PositiveIntegerField(default=0)
    # Draining to stop (SIGTERM): its sockets' rows stay online until the
    # lease runs out (their users reconnect elsewhere with no leave/join
    # flicker), but no longer count toward the caps per user and per address.
    # A database default too: a worker of the release before, in the same
    # rolling deploy, inserts its lease row without this column.
    stopping = models.BooleanField(default=False, db_default=False)

    def __str__(self) -> str:
        return self.id


class Connection(models.Model):
    """One open WebSocket: the presence store that join, leave and members read."""

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="connections")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="chat_connections",
    )
    channel_name = models.CharField(max_length=200, unique=True)
    # The worker process that holds the socket (Worker.id). Not a foreign key:
    # a row must be written even while its worker's lease row is being swept.
    worker = models.CharField(max_length=200, db_index=True)
    address = models.CharField(max_length=100, blank=True)
    # What the per-address cap counts: the address, or its /64 for IPv6.
    network = models.CharField(max_length=100, blank=True, editable=False)
    connected_at = models.DateTimeField(auto_now_add=True)
    # Events waiting in the socket's outgoing queue, and the most it held, as
    # of its worker's last heartbeat (shown by the admin).
    queued_events = models.PositiveIntegerField(default=0)
    peak_queued_events = models.PositiveIntegerField(default=0)

    class Meta:
        indexes = [
            models.Index(fields=["room", "user"], name="connection_room_user"),
            # The per-address socket cap counts by it at every handshake.
            models.Index(fields=["network"], name="connection_network"),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.room} via {self.worker}"


class RoomBan(models.Model):
    """Keeps a user out of a room until `expires_at` (for ever when it is empty)."""

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="bans")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="room_bans"
    )
    reason = models.CharField(max_length=500, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["room", "user"], name="roomban_room_user")]

    def __str__(self) -> str:
        return f"{self.user} banned from {self.room}"


class ModerationAction(models.Model):
    """The record of one moderation step: who did what, to whom, when."""

    class Kind(models.TextChoices):
        DELETE_MESSAGE = "delete_message", "delete message"
        CLOSE_ROOM = "close_room", "close room"
        REOPEN_ROOM = "reopen_room", "reopen room"
        KICK = "kick", "kick"
        BAN = "ban", "ban"
        UNBAN = "unban", "unban"

    kind = models.CharField(max_length=32, choices=Kind.choices)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        related_name="+",
    )
    room = models.ForeignKey(Room, on_delete=models.SET_NULL, null=True, blank=True)
    target_user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    message = models.ForeignKey(
        Message, on_delete=models.SET_NULL, null=True, blank=True
    )
    detail = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        when = f"{self.created_at:%Y-%m-%d %H:%M}"
        return f"{self.get_kind_display()} by {self.actor} at {when}"


class ApiToken(models.Model):
    """A bearer token for the HTTP API; only its SHA-256 is stored."""

    name = models.CharField(max_length=100)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    # The first characters of the raw token, to tell tokens apart in lists.
    prefix = models.CharField(max_length=12, editable=False)
    can_publish = models.BooleanField(default=False, help_text="post into rooms")
    can_push = models.BooleanField(default=False, help_text="push events to users")
    PUSH_TO_OWNER = "owner"
    PUSH_TO_LISTED = "listed"
    PUSH_TO_ANYONE = "anyone"
    # Whom a push-scoped token may push to: by default only its owner.
    push_to = models.CharField(
        max_length=10,
        choices=[
            (PUSH_TO_OWNER, "the owner's own sockets"),
            (PUSH_TO_LISTED, "the users listed below"),
            (PUSH_TO_ANYONE, "any user"),
        ],
        default=PUSH_TO_OWNER,
        help_text="whom this token may push to",
    )
    push_users = models.ManyToManyField(
        settings.AUTH_USER_MODEL,
        blank=True,
        related_name="+",
        help_text="the users it may push to, when restricted to a list",
    )
    room = models.ForeignKey(
        Room,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        help_text="restrict publishing to this room",
    )
    author_name = models.CharField(
        max_length=150,
        blank=True,
        help_text="name shown on published messages (default: the owner's username)",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"
