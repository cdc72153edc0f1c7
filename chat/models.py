"""What the chat stores: rooms, their messages, and the sockets open in them."""

from django.conf import settings
from django.db import models
from django.db.models import Q


class Room(models.Model):
    slug = models.SlugField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # The seq of the newest message; bumped under a row lock so seqs have no holes.
    last_seq = models.PositiveBigIntegerField(default=0)
    last_message_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


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

    class Meta:
        ordering = ["room", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["room", "seq"], name="message_room_seq"),
            # A retried send carries the same client_id: it must not be stored twice.
            models.UniqueConstraint(
                fields=["room", "user", "client_id"],
                condition=Q(client_id__isnull=False),
                name="message_room_user_client_id",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.room.slug}#{self.seq} {self.author}: {self.body[:40]}"


class Connection(models.Model):
    """One open WebSocket: the presence store that join, leave and members read."""

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="connections")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_connections"
    )
    channel_name = models.CharField(max_length=200, unique=True)
    # The worker process that holds the socket (host:pid).
    worker = models.CharField(max_length=200)
    address = models.CharField(max_length=100, blank=True)
    connected_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["room", "user"], name="connection_room_user")]

    def __str__(self) -> str:
        return f"{self.user} in {self.room} via {self.worker}"
