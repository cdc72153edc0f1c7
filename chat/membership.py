"""Who may enter a room: public rooms, private rooms, direct messages.

A public room is open to every signed-in user. A private room or a direct
message is open to its members only (a Membership row each); to anyone else
it does not exist: the same 4404 and 404 as a missing room, and it is in no
list. A private room's creator adds and removes members (the admin can too);
a direct message is a private room of two, named after its two users' ids.
Removing a member closes their sockets in the room on every worker, through
the same kick as moderation.
"""

from __future__ import annotations

import logging

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import Exists, OuterRef, Q

from chat import protocol, reading
from chat.broadcast import send_kick
from chat.models import Membership, Room

logger = logging.getLogger(__name__)

# Direct messages are named dm-<lower user id>-<higher user id>; no other
# room may take a name that starts so.
DIRECT_PREFIX = "dm-"


class MembershipRefused(Exception):
    """The change is not allowed; the message says why, for the person asking."""


class RoomNameTaken(Exception):
    """A room of that name exists already (it may be one the user cannot see)."""


def is_reserved_name(slug: str) -> bool:
    """True for names only direct messages may have ("dm" is their URL's)."""
    return slug == "dm" or slug.startswith(DIRECT_PREFIX)


def visible_to(user: AbstractBaseUser) -> Q:
    """The rooms `user` may see, as a filter on Room: public, or theirs."""
    return Q(kind=Room.Kind.PUBLIC) | Exists(
        Membership.objects.filter(room=OuterRef("pk"), user=user)
    )


def room_visible(room: Room, user: AbstractBaseUser) -> bool:
    """True when `user` may enter `room`."""
    return room.is_public or Membership.objects.filter(room=room, user=user).exists()


def can_manage(room: Room, user: AbstractBaseUser) -> bool:
    """True when `user` may add and remove the members of private `room`."""
    if room.kind != Room.Kind.PRIVATE:
        return False
    return room.created_by_id == user.pk or user.has_perm("chat.change_membership")


def room_create(*, slug: str, user: AbstractBaseUser, private: bool) -> Room:
    """Creates a room named `slug`; a private one has `user` as its first member.

    Raises RoomNameTaken when the name is used, and ValueError when it is not
    a room name or is one kept for direct messages.
    """
    if not protocol.is_valid_room_name(slug) or is_reserved_name(slug):
        raise ValueError(slug)
    kind = Room.Kind.PRIVATE if private else Room.Kind.PUBLIC
    try:
        with transaction.atomic():
            room = Room.objects.create(slug=slug, kind=kind, created_by=user)
            if private:
                Membership.objects.create(room=room, user=user)
    except IntegrityError:
        raise RoomNameTaken(slug) from None
    return room


def room_enter_or_create(
    *, slug: str, user: AbstractBaseUser, private: bool = False
) -> Room:
    """Returns the room named `slug` for `user` to enter, creating it (private
    if asked) when no room has that name.

    Raises RoomNameTaken for a room they may not enter, and ValueError for a
    name that is not a room name or is kept for direct messages.
    """
    for _ in range(2):
        room = Room.objects.filter(slug=slug).first()
        if room is not None:
            if room_visible(room, user):
                return room
            raise RoomNameTaken(slug)
        try:
            return room_create(slug=slug, user=user, private=private)
        except RoomNameTaken:
            continue  # made by someone else meanwhile: look again
    raise RoomNameTaken(slug)


def member_add(
    *, room: Room, user: AbstractBaseUser, actor: AbstractBaseUser
) -> Membership:
    """Adds `user` to private `room`; returns their membership (new or not).

    They start with nothing read, so the room's messages count as unread.
    """
    if not can_manage(room, actor):
        raise MembershipRefused("only the room's creator can add members")
    if not user.is_active:
        raise MembershipRefused(f"{user.get_username()} cannot sign in")
    membership, created = Membership.objects.get_or_create(room=room, user=user)
    if created:
        logger.info("user %s added to %s by %s", user.pk, room.slug, actor.pk)
    return membership


def member_remove(
    *, room: Room, user: AbstractBaseUser, actor: AbstractBaseUser | None
) -> bool:
    """Removes `user` from private `room`: their sockets there close with 4403
    on every worker. Returns False when they were not a member.

    The creator (or the admin, `actor` None) removes anyone; anyone may leave.
    """
    if actor is not None and actor.pk != user.pk and not can_manage(room, actor):
        raise MembershipRefused("only the room's creator can remove members")
    if room.kind != Room.Kind.PRIVATE:
        raise MembershipRefused("only a private room has members to remove")
    with transaction.atomic():
        removed, _ = Membership.objects.filter(room=room, user=user).delete()
        if removed:
            transaction.on_commit(lambda: send_kick(user.pk, room.slug), robust=True)
    if removed:
        logger.info("user %s removed from %s by %s", user.pk, room.slug, actor)
    return bool(removed)


def direct_room_name(one: AbstractBaseUser, other: AbstractBaseUser) -> str:
    low, high = sorted((int(one.pk), int(other.pk)))
    return f"{DIRECT_PREFIX}{low}-{high}"


def direct_room(*, user: AbstractBaseUser, other: AbstractBaseUser) -> Room:
    """Returns the direct message of two users, opening it the first time."""
    if user.pk == other.pk:
        raise MembershipRefused("a direct message needs someone else")
    if not other.is_active:
        raise MembershipRefused(f"{other.get_username()} cannot sign in")
    slug = direct_room_name(user, other)
    with transaction.atomic():
        room, _ = Room.objects.get_or_create(
            slug=slug, defaults={"kind": Room.Kind.DIRECT, "created_by": user}
        )
        for member in (user, other):
            Membership.objects.get_or_create(room=room, user=member)
    return room


def room_members(room: Room) -> list[str]:
    """Returns the usernames of a private room's members, sorted."""
    return list(
        Membership.objects.filter(room=room)
        .order_by("user__username")
        .values_list("user__username", flat=True)
    )


def direct_partner(room: Room, viewer: AbstractBaseUser) -> str | None:
    """Returns the other person's name in a direct message (what the room is
    called for `viewer`), or None for any other room."""
    if room.kind != Room.Kind.DIRECT:
        return None
    return (
        Membership.objects.filter(room=room)
        .exclude(user=viewer)
        .values_list("user__username", flat=True)
        .first()
    )


def members_of(
    rooms_and_users: list[tuple[Room, list[AbstractBaseUser]]],
) -> list[list[AbstractBaseUser]]:
    """Keeps, of each list of users, those who may enter its room (all of
    them in a public room); one query for all the private ones."""
    private = [
        (room, user)
        for room, users in rooms_and_users
        if not room.is_public
        for user in users
    ]
    # A member of a private room is a user with a place (a read position) in it.
    members = reading.read_positions(private)
    return [
        users
        if room.is_public
        else [user for user in users if (room.pk, user.pk) in members]
        for room, users in rooms_and_users
    ]
