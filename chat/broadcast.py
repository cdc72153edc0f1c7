"""The one seam through which every room event reaches the sockets of a room.

Events are encoded once here; the group message carries the ready text and the
consumer's handler only sends it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from chat.protocol import ServerEvent, encode, room_group_name, user_group_name

# What a channel-layer call (a send here; a join, a leave or a receive in the
# consumer) raises while Redis cannot be reached.
LAYER_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.RedisError,
    OSError,
    asyncio.TimeoutError,
)

# Channel-layer message types; ChatConsumer.chat_event and chat_kick handle them.
CHAT_EVENT = "chat.event"
CHAT_KICK = "chat.kick"


def _group_message(event: ServerEvent, exclude_channel: str | None) -> dict[str, Any]:
    message: dict[str, Any] = {"type": CHAT_EVENT, "text": encode(event)}
    if exclude_channel is not None:
        message["exclude"] = exclude_channel
    return message


async def broadcast_room_async(
    slug: str, event: ServerEvent, *, exclude_channel: str | None = None
) -> None:
    """Sends `event` to every socket in room `slug` (but `exclude_channel`)."""
    await get_channel_layer().group_send(
        room_group_name(slug), _group_message(event, exclude_channel)
    )


def broadcast_room(
    slug: str, event: ServerEvent, *, exclude_channel: str | None = None
) -> None:
    """Sync form of broadcast_room_async, for services, views and the admin."""
    async_to_sync(broadcast_room_async)(slug, event, exclude_channel=exclude_channel)


async def push_user_async(user_id: int, event: ServerEvent) -> None:
    """Sends `event` to every open socket of one user, in every room."""
    await get_channel_layer().group_send(
        user_group_name(user_id), _group_message(event, None)
    )


def push_user(user_id: int, event: ServerEvent) -> None:
    """Sync form of push_user_async."""
    async_to_sync(push_user_async)(user_id, event)


async def kick_user_async(user_id: int, room_slug: str) -> None:
    """Closes every socket of one user in one room, on every worker, with 4403."""
    await get_channel_layer().group_send(
        user_group_name(user_id), {"type": CHAT_KICK, "room": room_slug}
    )


def kick_user(user_id: int, room_slug: str) -> None:
    """Sync form of kick_user_async."""
    async_to_sync(kick_user_async)(user_id, room_slug)
