"""Who is in which room: one Connection row per open socket, users derived from them.

A user joins with their first socket in a room and leaves with their last one, so
a second tab is not a second person. join and leave are broadcast on commit.
"""

from __future__ import annotations

import logging
import os
import socket

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from chat import protocol
from chat.broadcast import broadcast_room
from chat.models import Connection, Room

logger = logging.getLogger(__name__)

# Names the worker process that holds a socket (shown by the admin).
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


class TooManyConnections(Exception):
    """The user already has the allowed number of open sockets."""


def room_members(*, room: Room) -> list[str]:
    """Returns the sorted usernames with at least one socket in the room."""
    return sorted(
        set(
            Connection.objects.filter(room=room).values_list(
                "user__username", flat=True
            )
        )
    )


def _member_count(room: Room) -> int:
    return Connection.objects.filter(room=room).values("user").distinct().count()


def connection_open(
    *,
    room: Room,
    user: AbstractBaseUser,
    channel_name: str,
    address: str = "",
    max_per_user: int,
) -> bool:
    """Records an open socket; returns True when it is the user's first in the room.

    Raises TooManyConnections when the user already has `max_per_user` sockets.
    """
    with transaction.atomic():
        # Locking the room row serialises open/close in one room, so two tabs
        # opening at once cannot both count as the first.
        locked = Room.objects.select_for_update().get(pk=room.pk)
        if Connection.objects.filter(user=user).count() >= max_per_user:
            raise TooManyConnections(user.get_username())
        Connection.objects.create(
            room=locked,
            user=user,
            channel_name=channel_name,
            worker=WORKER_ID,
            address=address[:100],
        )
        first = not Connection.objects.filter(room=locked, user=user).exclude(
            channel_name=channel_name
        ).exists()
        if first:
            event = protocol.event_join(
                user=user.get_username(), members=_member_count(locked)
            )
            transaction.on_commit(
                lambda: broadcast_room(locked.slug, event, exclude_channel=channel_name)
            )
    return first


def connection_close(*, channel_name: str) -> bool:
    """Forgets a socket; returns True when it was its user's last one in the room."""
    with transaction.atomic():
        connection = (
            Connection.objects.select_related("user").filter(channel_name=channel_name).first()
        )
        if connection is None:
            return False
        locked = Room.objects.select_for_update().get(pk=connection.room_id)
        connection.delete()
        last = not Connection.objects.filter(room=locked, user=connection.user).exists()
        if last:
            event = protocol.event_leave(
                user=connection.user.get_username(), members=_member_count(locked)
            )
            transaction.on_commit(lambda: broadcast_room(locked.slug, event))
    return last



def connections_forget_all() -> int:
    """Deletes every socket row; returns how many.

    Only right when one worker serves everything and is starting: whatever rows
    exist then were left by a previous run that did not shut down cleanly.
    """
    deleted, _ = Connection.objects.all().delete()
    if deleted:
        logger.info("forgot %d stale connection rows", deleted)
    return deleted
