"""Moderation: delete a message, close or reopen a room, kick, ban and unban.

Each operation is recorded as a ModerationAction and takes effect on every
worker at once through the channel layer, after its transaction commits. The
live part is best effort: while Redis is away the stored state (deleted,
closed, banned) still holds for every page that reconnects.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from chat import protocol
from chat.broadcast import broadcast_room, send_kick
from chat.models import Message, ModerationAction, Room, RoomBan

logger = logging.getLogger(__name__)


def _record(
    kind: str,
    *,
    actor: AbstractBaseUser | None,
    room: Room | None = None,
    target_user: AbstractBaseUser | None = None,
    message: Message | None = None,
    detail: str = "",
) -> ModerationAction:
    return ModerationAction.objects.create(
        kind=kind,
        actor=actor,
        room=room,
        target_user=target_user,
        message=message,
        detail=detail[:500],
    )


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------


def message_delete(*, message: Message, actor: AbstractBaseUser | None) -> bool:
    """Soft-deletes a message and tells every open page; False if already gone.

    The row stays (hidden from history) so seqs keep no holes and the record
    of what was removed survives.
    """
    with transaction.atomic():
        locked = (
            Message.objects.select_for_update()
            .select_related("room")
            .get(pk=message.pk)
        )
        if locked.deleted_at is not None:
            return False
        # The room's next deletion number, under the room's row lock (the
        # lock posts take for their seq).
        room = Room.objects.select_for_update().get(pk=locked.room_id)
        room.deletions += 1
        room.save(update_fields=["deletions"])
        locked.deleted_at = timezone.now()
        locked.deleted_by = actor
        locked.deletion = room.deletions
        locked.save(update_fields=["deleted_at", "deleted_by", "deletion"])
        _record(
            ModerationAction.Kind.DELETE_MESSAGE,
            actor=actor,
            room=locked.room,
            target_user=locked.user,
            message=locked,
            detail=f"#{locked.seq} by {locked.author}: {locked.body[:200]}",
        )
        slug = locked.room.slug
        event = protocol.event_deleted(
            id=locked.pk, seq=locked.seq, deletion=locked.deletion
        )
        transaction.on_commit(lambda: broadcast_room(slug, event), robust=True)
    logger.info("message %s deleted by %s", message.pk, actor)
    return True


def messages_delete(
    *, messages: Iterable[Message], actor: AbstractBaseUser | None
) -> int:
    """Soft-deletes several messages; returns how many were not deleted before."""
    return sum(message_delete(message=message, actor=actor) for message in messages)


# ---------------------------------------------------------------------------
# Rooms
# ---------------------------------------------------------------------------


def room_set_closed(
    *, room: Room, closed: bool, actor: AbstractBaseUser | None
) -> bool:
    """Closes (read-only) or reopens a room; False when it already was so."""
    with transaction.atomic():
        locked = Room.objects.select_for_update().get(pk=room.pk)
        if locked.is_closed == closed:
            return False
        locked.is_closed = closed
        locked.save(update_fields=["is_closed"])
        kind = (
            ModerationAction.Kind.CLOSE_ROOM
            if closed
            else ModerationAction.Kind.REOPEN_ROOM
        )
        _record(kind, actor=actor, room=locked)
        event = protocol.event_room_state(closed=closed)
        transaction.on_commit(lambda: broadcast_room(locked.slug, event), robust=True)
    room.is_closed = closed
    logger.info(
        "room %s %s by %s", room.slug, "closed" if closed else "reopened", actor
    )
    return True


# ---------------------------------------------------------------------------
# Users
# ---------------------------------------------------------------------------


def user_kick(
    *,
    room: Room,
    user: AbstractBaseUser,
    actor: AbstractBaseUser | None,
    reason: str = "",
) -> None:
    """Closes every socket of `user` in `room` with 4403, on every worker."""
    with transaction.atomic():
        _record(
            ModerationAction.Kind.KICK,
            actor=actor,
            room=room,
            target_user=user,
            detail=reason,
        )
        transaction.on_commit(lambda: send_kick(user.pk, room.slug), robust=True)
    logger.info("user %s kicked from %s by %s", user.pk, room.slug, actor)


def banned_pairs(
    pairs: Iterable[tuple[Room, AbstractBaseUser]],
) -> set[tuple[int, int]]:
    """Returns the (room id, user id) of each pair that a ban keeps out now."""
    pairs = {(room.pk, user.pk) for room, user in pairs}
    if not pairs:
        return set()
    found = RoomBan.objects.filter(
        Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()),
        room__in={room_id for room_id, _ in pairs},
        user__in={user_id for _, user_id in pairs},
    )
    return set(found.values_list("room_id", "user_id")) & pairs


def user_ban(
    *,
    room: Room,
    user: AbstractBaseUser,
    actor: AbstractBaseUser | None,
    reason: str = "",
    expires_at: datetime | None = None,
    ban: RoomBan | None = None,
) -> RoomBan:
    """Bans `user` from `room` until `expires_at` (for ever if None) and kicks them.

    `ban` is an unsaved RoomBan to store (the admin's form builds one).
    """
    with transaction.atomic():
        if ban is None:
            ban = RoomBan(room=room, user=user)
        ban.reason = reason
        ban.expires_at = expires_at
        ban.created_by = actor
        ban.save()
        _record(
            ModerationAction.Kind.BAN,
            actor=actor,
            room=room,
            target_user=user,
            detail=f"{reason}{_until(expires_at)}".strip(),
        )
        transaction.on_commit(lambda: send_kick(user.pk, room.slug), robust=True)
    logger.info("user %s banned from %s by %s", user.pk, room.slug, actor)
    return ban


def _until(expires_at: datetime | None) -> str:
    return f" until {expires_at:%Y-%m-%d %H:%M} UTC" if expires_at else ""


def ban_change(
    *,
    ban: RoomBan,
    actor: AbstractBaseUser | None,
    reason: str,
    expires_at: datetime | None,
) -> RoomBan:
    """Changes a ban's reason or end, and records it.

    An end in the past ends the ban now: recorded as an unban, and the user
    may come back. Otherwise it is recorded as a ban with the new terms.
    """
    with transaction.atomic():
        ban.reason = reason
        ban.expires_at = expires_at
        ban.save(update_fields=["reason", "expires_at"])
        if expires_at is not None and expires_at <= timezone.now():
            kind, detail = ModerationAction.Kind.UNBAN, f"ended early: {reason}"
        else:
            kind = ModerationAction.Kind.BAN
            detail = f"changed: {reason}{_until(expires_at)}"
        _record(
            kind,
            actor=actor,
            room=ban.room,
            target_user=ban.user,
            detail=detail.strip(),
        )
    logger.info("ban of user %s in %s changed by %s", ban.user_id, ban.room_id, actor)
    return ban


def ban_lift(*, ban: RoomBan, actor: AbstractBaseUser | None) -> None:
    """Deletes a ban so the user may come back, and records who lifted it."""
    with transaction.atomic():
        _record(
            ModerationAction.Kind.UNBAN,
            actor=actor,
            room=ban.room,
            target_user=ban.user,
            detail=ban.reason,
        )
        ban.delete()
