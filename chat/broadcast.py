"""The one seam through which every room event reaches the sockets of a room.

Events are encoded once here; the group message carries the ready text (or
the texts of the messages one write round stored in a room, in order) and the
consumer's handler only sends it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from chat.protocol import ServerEvent, encode, room_group_name, user_group_name
from chat.sender import sender

# What a channel-layer call (a send here; a join, a leave or a receive in the
# consumer) raises while Redis cannot be reached.
LAYER_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.RedisError,
    OSError,
    asyncio.TimeoutError,
)

# Channel-layer message types; ChatConsumer.chat_event, chat_kick and chat_revoke
# handle them.
CHAT_EVENT = "chat.event"
CHAT_KICK = "chat.kick"
CHAT_REVOKE = "chat.revoke"


def event_texts(message: dict[str, Any]) -> list[str]:
    """The encoded events of a CHAT_EVENT group message: its `text`, or the
    `texts` of a write round's messages (broadcast_room_events)."""
    texts = message.get("texts")
    return texts if texts is not None else [message["text"]]


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


def _send_from_sync(group: str, message: dict[str, Any]) -> None:
    """A group_send from sync code: handed to the worker's loop (chat.sender),
    or sent before returning where no loop is bound."""
    if not sender.submit(group, message):
        async_to_sync(get_channel_layer().group_send)(group, message)


def broadcast_room_events(slug: str, events: list[ServerEvent]) -> None:
    """broadcast_room for the events of one write round in one room, in order:
    one group message (`texts`), so one layer round trip and one read per
    worker for all of them, not one each."""
    if len(events) == 1:
        broadcast_room(slug, events[0])
        return
    message = {"type": CHAT_EVENT, "texts": [encode(event) for event in events]}
    _send_from_sync(room_group_name(slug), message)


def broadcast_room(
    slug: str, event: ServerEvent, *, exclude_channel: str | None = None
) -> None:
    """Sync form of broadcast_room_async, for services, views and the admin.

    In a worker it returns at once: the message goes out after the ones
    before it (chat.sender says why).
    """
    _send_from_sync(room_group_name(slug), _group_message(event, exclude_channel))


async def send_to_user_async(user_id: int, event: ServerEvent) -> None:
    """Sends `event` to every open socket of one user, in every room.

    Only the send: services.user_push is the operation that counts the sockets.
    """
    await get_channel_layer().group_send(
        user_group_name(user_id), _group_message(event, None)
    )


def send_to_user(user_id: int, event: ServerEvent) -> None:
    """Sync form of send_to_user_async; returns at once in a worker, as
    broadcast_room does."""
    _send_from_sync(user_group_name(user_id), _group_message(event, None))


async def send_kick_async(user_id: int, room_slug: str) -> None:
    """Tells every socket of one user in one room, on every worker, to close with 4403.

    Only the send: moderation.user_kick and user_ban record the kick first.
    """
    await get_channel_layer().group_send(
        user_group_name(user_id), {"type": CHAT_KICK, "room": room_slug}
    )


def send_kick(user_id: int, room_slug: str) -> None:
    """Sync form of send_kick_async."""
    async_to_sync(send_kick_async)(user_id, room_slug)


def send_revoke(user_id: int, *, session: str | None = None) -> None:
    """Tells every socket of one user, on every worker, that their sign-in changed.

    With `session` (chat.auth.session_digest of a session key), the sockets
    of that session close with 4401 (a logout); without, each socket checks
    its own session again. Returns at once in a worker, as broadcast_room does.
    """
    message: dict[str, Any] = {"type": CHAT_REVOKE}
    if session is not None:
        message["session"] = session
    _send_from_sync(user_group_name(user_id), message)
