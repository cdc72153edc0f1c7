"""Who is in which room: one Connection row per open socket, users derived from them.

A user joins with their first socket in a room and leaves with their last one, so
a second tab is not a second person. Each worker process holds a lease (a Worker
row it renews); only sockets of live workers count, and the sockets of a worker
whose lease ran out are swept by the others, with `leave` events. That heals a
worker killed without running its disconnect handlers.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from datetime import timedelta

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from chat import protocol
from chat.broadcast import broadcast_room
from chat.models import Connection, Room, Worker

logger = logging.getLogger(__name__)

# Names this worker process (shown by the admin); the random part keeps a
# restarted process that reuses a pid from inheriting a dead one's sockets.
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class TooManyConnections(Exception):
    """The user already has the allowed number of open sockets."""


# ---------------------------------------------------------------------------
# Worker leases
# ---------------------------------------------------------------------------


def _lease_cutoff():
    return timezone.now() - timedelta(seconds=settings.CHAT_WORKER_LEASE_SECONDS)


def live_worker_ids() -> QuerySet:
    """Returns (as a subquery) the ids of workers whose lease has not run out."""
    return Worker.objects.filter(heartbeat_at__gte=_lease_cutoff()).values("id")


def live_connections() -> QuerySet:
    """Returns the sockets held by live workers: the ones that count as online."""
    return Connection.objects.filter(worker__in=live_worker_ids())


def worker_heartbeat(*, worker_id: str = WORKER_ID) -> None:
    """Renews this worker's lease (creating it on the first call)."""
    now = timezone.now()
    updated = Worker.objects.filter(id=worker_id).update(heartbeat_at=now)
    if not updated:
        Worker.objects.get_or_create(id=worker_id, defaults={"heartbeat_at": now})


def workers_sweep() -> int:
    """Forgets every socket of a worker whose lease ran out; returns how many.

    Each socket goes as if it had closed, so a user with no socket left
    elsewhere gets a `leave`. Safe to run from several workers at once.
    """
    dead_workers = list(
        Worker.objects.filter(heartbeat_at__lt=_lease_cutoff()).values_list(
            "id", flat=True
        )
    )
    # Rows of a worker with no lease row at all are dead too.
    orphans = Connection.objects.exclude(worker__in=Worker.objects.values("id"))
    stale = list(
        Connection.objects.filter(worker__in=dead_workers).values_list(
            "channel_name", "room__slug", "user_id"
        )
    ) + list(orphans.values_list("channel_name", "room__slug", "user_id"))
    for channel_name, room_slug, user_id in stale:
        connection_close(channel_name=channel_name)
        _discard_from_groups(channel_name, room_slug, user_id)
    if dead_workers:
        Worker.objects.filter(id__in=dead_workers, heartbeat_at__lt=_lease_cutoff()).delete()
        logger.info(
            "swept %d socket(s) of dead worker(s) %s", len(stale), ", ".join(dead_workers)
        )
    return len(stale)


def _discard_from_groups(channel_name: str, room_slug: str, user_id: int) -> None:
    # The dead worker never left its groups; without this its channels would
    # stay in them (and be sent to) until the layer's group expiry.
    layer = get_channel_layer()
    for group in (protocol.room_group_name(room_slug), protocol.user_group_name(user_id)):
        async_to_sync(layer.group_discard)(group, channel_name)


# ---------------------------------------------------------------------------
# Sockets and members
# ---------------------------------------------------------------------------


def room_members(*, room: Room) -> list[str]:
    """Returns the sorted usernames with at least one live socket in the room."""
    return sorted(
        set(live_connections().filter(room=room).values_list("user__username", flat=True))
    )


def user_socket_count(*, user: AbstractBaseUser) -> int:
    """Returns how many live sockets the user has open, in all rooms."""
    return live_connections().filter(user=user).count()


def _member_count(room: Room) -> int:
    return live_connections().filter(room=room).values("user").distinct().count()


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
        worker_heartbeat()
        if user_socket_count(user=user) >= max_per_user:
            raise TooManyConnections(user.get_username())
        first = not live_connections().filter(room=locked, user=user).exists()
        Connection.objects.create(
            room=locked,
            user=user,
            channel_name=channel_name,
            worker=WORKER_ID,
            address=address[:100],
        )
        if first:
            event = protocol.event_join(
                user=user.get_username(), members=_member_count(locked)
            )
            # robust: presence is best effort while Redis is down; the socket
            # itself is refused by the consumer in that case.
            transaction.on_commit(
                lambda: broadcast_room(locked.slug, event, exclude_channel=channel_name),
                robust=True,
            )
    return first


def connection_close(*, channel_name: str) -> bool:
    """Forgets a socket; returns True when it was its user's last one in the room."""
    with transaction.atomic():
        connection = (
            Connection.objects.select_related("user")
            .filter(channel_name=channel_name)
            .first()
        )
        if connection is None:
            return False
        locked = Room.objects.select_for_update().get(pk=connection.room_id)
        # Deleting by channel name: a concurrent sweep may have taken it already.
        deleted, _ = Connection.objects.filter(channel_name=channel_name).delete()
        if not deleted:
            return False
        last = not live_connections().filter(room=locked, user=connection.user).exists()
        if last:
            event = protocol.event_leave(
                user=connection.user.get_username(), members=_member_count(locked)
            )
            transaction.on_commit(
                lambda: broadcast_room(locked.slug, event), robust=True
            )
    return last
