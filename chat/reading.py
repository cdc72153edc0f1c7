"""What each person has read, and where they were mentioned.

Plain sync functions, like chat.services. A read position is one row per user
and room (Membership.read_seq): unread counts are the room's newest seq minus
it, so no count ever walks the messages. A mention is one row per mentioned
user and message (Mention), written with the message.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from chat import protocol
from chat.broadcast import send_to_user
from chat.models import Membership, Mention, Message, Room

# ---------------------------------------------------------------------------
# Read positions
# ---------------------------------------------------------------------------


def read_advance(*, room: Room, user: AbstractBaseUser, seq: int) -> int | None:
    """Moves `user`'s read position in `room` up to `seq`, never back.

    `seq` is cut to the room's newest. Returns the new position, or None when
    it did not move (already there or past it). Once the move commits, every
    socket of the user, in any room and on any worker, gets a `read` event:
    the other tabs and devices clear what they showed as unread.
    """
    with transaction.atomic():
        newest = Room.objects.filter(pk=room.pk).values_list("last_seq", flat=True)
        seq = min(seq, newest.first() or 0)
        if seq < 1:
            return None
        if not _raise_position(room, user, seq):
            _, created = Membership.objects.get_or_create(
                room=room,
                user=user,
                defaults={"read_seq": seq, "read_at": timezone.now()},
            )
            # Another request made the row first: move it, if it is behind.
            if not created and not _raise_position(room, user, seq):
                return None
        event = protocol.event_read(room=room.slug, seq=seq)
        transaction.on_commit(lambda: send_to_user(user.pk, event), robust=True)
    return seq


def _raise_position(room: Room, user: AbstractBaseUser, seq: int) -> bool:
    # The condition makes it monotonic under any interleaving of writers.
    return bool(
        Membership.objects.filter(room=room, user=user, read_seq__lt=seq).update(
            read_seq=seq, read_at=timezone.now()
        )
    )


def posters_read(messages: Sequence[Message]) -> None:
    """Moves each poster's read position to their newest message just stored.

    What you wrote you have read: your own posts never count as unread, and
    posting in a public room makes it one of yours. Called under the rooms'
    row locks, where these seqs are the rooms' newest, so the move is always
    forward; one statement for all the posters of a batch, in all its rooms.
    """
    newest: dict[tuple[int, int], int] = {}
    for message in messages:
        if message.user_id is not None:
            key = (message.room_id, message.user_id)
            newest[key] = max(newest.get(key, 0), message.seq)
    if not newest:
        return
    now = timezone.now()
    Membership.objects.bulk_create(
        [
            Membership(room_id=room_id, user_id=user_id, read_seq=seq, read_at=now)
            for (room_id, user_id), seq in newest.items()
        ],
        update_conflicts=True,
        unique_fields=["user", "room"],
        update_fields=["read_seq", "read_at"],
    )


def read_positions(
    pairs: Iterable[tuple[Room, AbstractBaseUser]],
) -> dict[tuple[int, int], int]:
    """Returns the read position of each (room, user) that has one, by
    (room pk, user pk), in one query for all of them."""
    pairs = list(pairs)
    if not pairs:
        return {}
    wanted = {(room.pk, user.pk) for room, user in pairs}
    rows = Membership.objects.filter(
        room_id__in={room for room, _ in wanted},
        user_id__in={user for _, user in wanted},
    ).values_list("room_id", "user_id", "read_seq")
    return {(room, user): seq for room, user, seq in rows if (room, user) in wanted}


# ---------------------------------------------------------------------------
# Mentions
# ---------------------------------------------------------------------------


def mentioned_users(
    texts: Sequence[str],
) -> list[list[AbstractBaseUser]]:
    """Returns, for each text, the active users it mentions with @name, in
    order and once each; one query for all the texts (none without an @)."""
    candidates = [protocol.mention_candidates(text) for text in texts]
    names = {name for found in candidates for options in found for name in options}
    if not names:
        return [[] for _ in texts]
    User = get_user_model()
    by_name = {
        user.get_username(): user
        for user in User._default_manager.filter(
            **{f"{User.USERNAME_FIELD}__in": names, "is_active": True}
        )
    }
    result: list[list[AbstractBaseUser]] = []
    for found in candidates:
        users: dict[int, AbstractBaseUser] = {}
        for options in found:
            user = next((by_name[name] for name in options if name in by_name), None)
            if user is not None:
                users.setdefault(user.pk, user)
        result.append(list(users.values()))
    return result


def mentions_record(
    messages: Sequence[Message], users: Sequence[Sequence[AbstractBaseUser]]
) -> None:
    """Stores who each just-stored message mentions, and tells them on commit.

    Mentioning yourself is shown (the message's `mentions`) but not counted
    and not notified. A public room becomes one of the mentioned person's
    rooms, with the mention its first unread message, so that it is counted.
    """
    rows: list[Mention] = []
    joined: list[Membership] = []
    for message, mentioned in zip(messages, users, strict=True):
        for user in mentioned:
            if user.pk == message.user_id:
                continue
            rows.append(
                Mention(message=message, user=user, room=message.room, seq=message.seq)
            )
            joined.append(
                Membership(room=message.room, user=user, read_seq=message.seq - 1)
            )
            event = protocol.event_mention(
                room=message.room.slug,
                id=message.id,
                seq=message.seq,
                user=message.author,
                message=message.body,
            )
            transaction.on_commit(
                lambda user_id=user.pk, event=event: send_to_user(user_id, event),
                robust=True,
            )
    if rows:
        Mention.objects.bulk_create(rows)
        # Those who have a position keep it.
        Membership.objects.bulk_create(joined, ignore_conflicts=True)
