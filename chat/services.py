"""Domain operations on rooms and messages, shared by the consumer, views and admin.

Plain sync functions; every write that others must see is broadcast only after
its transaction commits ("persisted before sent").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import Case, Count, F, OuterRef, Q, Subquery, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from chat import membership, moderation, presence, protocol, reading
from chat.broadcast import broadcast_room_events, send_to_user
from chat.models import Membership, Mention, Message, Room


class InvalidRoomName(ValueError):
    """The name is not a room slug (see protocol.is_valid_room_name)."""


# ---------------------------------------------------------------------------
# Rooms
# ---------------------------------------------------------------------------


def room_get(*, slug: str, user: AbstractBaseUser | None = None) -> Room | None:
    """Returns the room named `slug`, or None if it is invalid or does not exist.

    With `user`, also None for a room they may not enter: to them a private
    room they are not in does not exist.
    """
    if not protocol.is_valid_room_name(slug):
        return None
    room = Room.objects.filter(slug=slug).first()
    if (
        room is not None
        and user is not None
        and not membership.room_visible(room, user)
    ):
        return None
    return room


def room_get_or_create(*, slug: str) -> tuple[Room, bool]:
    """Returns the room named `slug`, creating it if needed, and whether it is new."""
    if not protocol.is_valid_room_name(slug):
        raise InvalidRoomName(slug)
    return Room.objects.get_or_create(slug=slug)


@dataclass(frozen=True)
class RoomSummary:
    slug: str
    online: int
    last_activity: datetime
    # For the user the list is for: messages after their read position, those
    # of them that mention them, and whether they have one (their room).
    unread: int = 0
    mentions: int = 0
    member: bool = False
    kind: str = Room.Kind.PUBLIC
    # A direct message's other person, for the user the list is for.
    partner: str | None = None

    @property
    def title(self) -> str:
        """What the room is called: #slug, or @name for a direct message."""
        return f"@{self.partner}" if self.partner else f"#{self.slug}"


def room_list(*, user: AbstractBaseUser | None = None) -> list[RoomSummary]:
    """Returns every room with its online count, most recently active first.

    For `user`, only the rooms they may see (public ones and their own), and
    each also says how many messages they have not read there and
    how many of those mention them: one query for the whole list, whatever
    the number of rooms and messages (unread is the room's newest seq minus
    the read position; a mention count reads only the unread mentions).
    """
    rooms = Room.objects.annotate(
        online=Count(
            "connections__user",
            distinct=True,
            filter=Q(connections__worker__in=presence.live_worker_ids()),
        ),
        last_activity=Coalesce(F("last_message_at"), F("created_at")),
    ).order_by("-last_activity", "slug")
    if user is not None:
        rooms = rooms.filter(membership.visible_to(user)).annotate(
            # A direct message's other member (no lookup for other rooms).
            partner=Case(
                When(
                    kind=Room.Kind.DIRECT,
                    then=Subquery(
                        Membership.objects.filter(room=OuterRef("pk"))
                        .exclude(user=user)
                        .values("user__username")[:1]
                    ),
                )
            ),
            read_seq=Subquery(
                Membership.objects.filter(room=OuterRef("pk"), user=user).values(
                    "read_seq"
                )[:1]
            ),
            mention_count=Coalesce(
                Subquery(
                    Mention.objects.filter(
                        room=OuterRef("pk"),
                        user=user,
                        seq__gt=OuterRef("read_seq"),
                        message__deleted_at__isnull=True,
                    )
                    .order_by()
                    .values("room")
                    .annotate(count=Count("pk"))
                    .values("count")
                ),
                0,
            ),
        )
    else:
        rooms = rooms.filter(kind=Room.Kind.PUBLIC)
    summaries = []
    for room in rooms:
        read_seq = getattr(room, "read_seq", None)
        summaries.append(
            RoomSummary(
                slug=room.slug,
                online=room.online,
                last_activity=room.last_activity,
                unread=max(0, room.last_seq - read_seq) if read_seq is not None else 0,
                mentions=getattr(room, "mention_count", 0),
                member=read_seq is not None,
                kind=room.kind,
                partner=getattr(room, "partner", None),
            )
        )
    return summaries


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------


def message_event(message: Message, *, room_slug: str) -> protocol.MessageEvent:
    """Returns the `message` event of a stored message."""
    return protocol.event_message(
        id=message.id,
        seq=message.seq,
        room=room_slug,
        user=message.author,
        message=message.body,
        ts=message.created_at,
        client_id=message.client_id,
        mentions=message.mentions,
    )


@dataclass(frozen=True)
class Post:
    """One message to store: what `message_post` takes, for `messages_post`."""

    room: Room
    user: AbstractBaseUser
    text: str
    client_id: str | None = None
    # The name shown (default: the username), for API tokens.
    author: str | None = None


PostOutcome = tuple[Message, bool] | Exception


def message_post(
    *,
    room: Room,
    user: AbstractBaseUser,
    text: str,
    client_id: str | None = None,
    author: str | None = None,
) -> tuple[Message, bool]:
    """Stores a message with the room's next seq and broadcasts it on commit.

    Returns (message, created). A `client_id` this user already used in this
    room returns the stored message and creates nothing: a retried send.
    Raises ProtocolError(room_closed) when the room is closed.
    `author` is the name shown (default: the username), for API tokens.
    """
    post = Post(room=room, user=user, text=text, client_id=client_id, author=author)
    (outcome,) = messages_post([post])
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def messages_post(posts: list[Post]) -> list[PostOutcome]:
    """Stores many posts in one transaction: `message_post` for each, in order.

    Returns one outcome per post: (message, created), or the ProtocolError
    that post alone gets. A worker's posts that arrive together share it
    (chat/batching.py), so a busy worker pays one transaction and one room
    update per room for all of them, not one each. Should the transaction fail
    as a whole, each post is tried again alone, so that one bad post does not
    fail the others; an IntegrityError first gets the batch one more try
    (`_store_posts_atomically`).
    """
    try:
        return _store_posts_atomically(posts)
    except Exception:
        if len(posts) == 1:
            raise
    outcomes: list[PostOutcome] = []
    for post in posts:
        try:
            outcomes.append(messages_post([post])[0])
        except Exception as error:
            outcomes.append(error)
    return outcomes


def _store_posts_atomically(posts: list[Post]) -> list[PostOutcome]:
    try:
        with transaction.atomic():
            return _store_posts(posts)
    except IntegrityError:
        # Another worker stored a copy of one of these posts (its client_id)
        # after the lookup and before the locks: looked up again, it is found.
        # (Any other IntegrityError, e.g. a user deleted meanwhile, which
        # PostgreSQL reports at the commit, fails again and goes up.)
        with transaction.atomic():
            return _store_posts(posts)


def _store_posts(posts: list[Post]) -> list[PostOutcome]:
    outcomes: list[PostOutcome | None] = [None] * len(posts)
    # Retries are looked up before the rooms are locked: every worker's write
    # rounds take the same rooms' locks one after another, so each statement
    # under them delays them all. A copy that another worker commits between
    # the lookup and the locks fails the insert on the unique index of (room,
    # user, client_id), and the batch is tried again (above).
    stored = _stored_by_client_id(posts)
    # The row locks serialise posts to a room, so seq has no holes. One query
    # locks every room of the batch, in the order of their ids: two workers'
    # batches naming the same rooms in other orders would deadlock (on
    # PostgreSQL). Every step below is one statement for all the rooms, so a
    # batch holds its locks for a handful of round trips, however many rooms.
    rooms = {
        room.pk: room
        for room in Room.objects.select_for_update()
        .filter(pk__in={post.room.pk for post in posts})
        .order_by("pk")
    }
    # A retry of a post stored earlier is broadcast again: its worker may
    # have died between commit and broadcast, and in a quiet room no later
    # seq shows the pages the hole. A page drops a seq it has.
    resent = dict(stored)
    now = timezone.now()
    new: list[Message] = []
    for index, post in enumerate(posts):
        locked = rooms.get(post.room.pk)
        if locked is None:
            # Deleted meanwhile (by the admin): this post alone fails.
            outcomes[index] = Room.DoesNotExist(f"room {post.room.slug} is gone")
            continue
        key = (locked.pk, post.user.pk, post.client_id)
        if post.client_id is not None and key in stored:
            outcomes[index] = (stored[key], False)
            if (message := resent.pop(key, None)) is not None:
                _broadcast_on_commit(locked, [message])
        elif locked.is_closed:
            outcomes[index] = protocol.ProtocolError(
                protocol.ERROR_ROOM_CLOSED,
                "the room is closed: it can be read but not posted to",
                post.client_id,
            )
        else:
            locked.last_seq += 1
            locked.last_message_at = now
            message = Message(
                room=locked,
                seq=locked.last_seq,
                user=post.user,
                author=post.author or post.user.get_username(),
                body=post.text,
                client_id=post.client_id,
            )
            new.append(message)
            outcomes[index] = (message, True)
            if post.client_id is not None:
                # A retry within the same batch gets this first copy.
                stored[key] = message
    if not new:
        return outcomes  # type: ignore[return-value]
    # One UPDATE for all the rooms (bulk_update's Case per field and room cost
    # more Python than the rest of the batch, under the locks).
    last_seqs = {message.room_id: message.seq for message in new}
    Room.objects.filter(pk__in=last_seqs).update(
        last_seq=Case(*(When(pk=pk, then=seq) for pk, seq in last_seqs.items())),
        last_message_at=now,
    )
    mentioned = membership.members_of(
        [
            (message.room, users)
            for message, users in zip(
                new, reading.mentioned_users([m.body for m in new]), strict=True
            )
        ]
    )
    for message, users in zip(new, mentioned, strict=True):
        message.mentions = [user.get_username() for user in users]
    Message.objects.bulk_create(new)
    reading.posters_read(new)
    reading.mentions_record(new, mentioned)
    by_room: dict[int, list[Message]] = {}
    for message in new:
        by_room.setdefault(message.room_id, []).append(message)
    for messages in by_room.values():
        _broadcast_on_commit(messages[0].room, messages)
    return outcomes  # type: ignore[return-value]


def _broadcast_on_commit(room: Room, messages: list[Message]) -> None:
    events = [message_event(message, room_slug=room.slug) for message in messages]
    # robust: the stored message is the truth and the live broadcast is best
    # effort (at most once by design); pages that miss it while Redis is away
    # fetch it with ?since or history.
    transaction.on_commit(
        lambda slug=room.slug, events=events: broadcast_room_events(slug, events),
        robust=True,
    )


def _stored_by_client_id(
    posts: list[Post],
) -> dict[tuple[int, Any, str], Message]:
    """The messages already stored under these posts' client_ids, by (room
    pk, user pk, client_id). A post's client_id is new but for a retry, so
    one cheap query finds the candidates (an OR of a Q per post costs more
    Python than the rest of a batch) and only a retry's message is read."""
    wanted = {
        (post.room.pk, post.user.pk, post.client_id)
        for post in posts
        if post.client_id is not None
    }
    if not wanted:
        return {}
    # order_by(): the model's default ordering would join the rooms to sort.
    # All three columns, so that the unique index on them is used: without
    # the user, each room's every message would be read.
    candidates = Message.objects.filter(
        room__in={room for room, _, _ in wanted},
        user__in={user for _, user, _ in wanted},
        client_id__in={client_id for _, _, client_id in wanted},
    ).order_by()
    found = [
        pk
        for pk, *key in candidates.values_list("pk", "room", "user", "client_id")
        if tuple(key) in wanted
    ]
    if not found:
        return {}
    return {
        (message.room_id, message.user_id, message.client_id): message
        for message in Message.objects.filter(pk__in=found).order_by()
    }


@dataclass(frozen=True)
class MessagePage:
    events: list[protocol.MessageEvent]
    # True when older messages exist before the first one in `events`.
    has_more: bool


def visible_messages(room: Room):
    """Returns the room's messages a reader may see (not deleted by a moderator)."""
    return Message.objects.filter(room=room, deleted_at__isnull=True)


def _page(room: Room, messages: list[Message]) -> list[protocol.MessageEvent]:
    return [message_event(message, room_slug=room.slug) for message in messages]


def room_history(*, room: Room, before: int | None, limit: int) -> MessagePage:
    """Returns up to `limit` messages with seq below `before`, oldest first."""
    queryset = visible_messages(room)
    if before is not None:
        queryset = queryset.filter(seq__lt=before)
    newest_first = list(queryset.order_by("-seq")[: limit + 1])
    has_more = len(newest_first) > limit
    return MessagePage(
        events=_page(room, newest_first[:limit][::-1]), has_more=has_more
    )


@dataclass(frozen=True)
class HistoryRead:
    """One `history` request: what `room_history` takes, for `room_histories`."""

    room: Room
    before: int | None
    limit: int


def room_histories(reads: list[HistoryRead]) -> list[MessagePage | Exception]:
    """`room_history` for each of the requests a worker got together; the
    same page is read once for all who asked. A hole in seq is the same on
    every socket of a room on a worker (they hear its broadcasts in one
    order), so its pages ask for the same page at the same moment. A read
    that fails is that request's outcome (chat.batching)."""
    pages: dict[tuple[int, int | None, int], MessagePage | Exception] = {}
    for read in reads:
        key = (read.room.pk, read.before, read.limit)
        if key not in pages:
            try:
                pages[key] = room_history(
                    room=read.room, before=read.before, limit=read.limit
                )
            except Exception as error:
                pages[key] = error
    return [pages[(read.room.pk, read.before, read.limit)] for read in reads]


def room_messages_after(
    *, room: Room, since: int, limit: int
) -> tuple[list[protocol.MessageEvent], bool]:
    """Returns up to `limit` messages with seq above `since`, oldest first.

    Also returns whether more follow them: a poller then asks again at once
    with the last seq it got.
    """
    messages = list(
        visible_messages(room).filter(seq__gt=since).order_by("seq")[: limit + 1]
    )
    return _page(room, messages[:limit]), len(messages) > limit


def room_messages_since(*, room: Room, since: int, limit: int) -> MessagePage | None:
    """Returns every message with seq above `since`, oldest first.

    Returns None when more than `limit` are missing: the caller then sends the
    latest page instead and the client fills the gap with `history`.
    """
    events, more_follow = room_messages_after(room=room, since=since, limit=limit)
    if more_follow:
        return None
    has_more = since > 0 and visible_messages(room).filter(seq__lte=since).exists()
    return MessagePage(events=events, has_more=has_more)


def room_welcome(
    *,
    room: Room,
    user: AbstractBaseUser,
    since: int | None,
    page_size: int,
    resume_max: int,
    deletions: int | None = None,
    members_page: int | None = None,
    shared: dict | None = None,
    backlog: int | None = None,
    read_seq: int | None = None,
) -> protocol.WelcomeEvent:
    """Returns the `welcome` event: members and the backlog (or what was missed).

    A resume that gives the last deletion number it saw (`deletions`) also
    gets the messages up to `since` deleted after it: a `deleted` event it
    missed (sent while Redis was away, or while the page was) is not lost.

    The member list is the first `members_page` of them (default
    CHAT_MEMBERS_PAGE); a client asks for the rest with `members`. Welcomes
    built with the same `shared` dict read the room's latest page and members
    once (the sockets of one handshake batch). Without `since`, `backlog`
    (at most `page_size`) keeps only that many of the latest messages.
    `read_seq` is the user's read position in the room (None: none yet).
    """
    shared = {} if shared is None else shared
    page = None
    if since is not None:
        page = room_messages_since(room=room, since=since, limit=resume_max)
    if page is None:
        key = ("latest", room.pk, page_size)
        if key not in shared:
            shared[key] = room_history(room=room, before=None, limit=page_size)
        page = shared[key]
    # The room row may be older than the page read after it.
    last_seq = max(room.last_seq, page.events[-1]["seq"] if page.events else 0)
    if since is None and backlog is not None and backlog < len(page.events):
        kept = page.events[len(page.events) - backlog :]
        page = MessagePage(events=kept, has_more=True)
    limit = settings.CHAT_MEMBERS_PAGE if members_page is None else members_page
    key = ("members", room.pk, limit)
    if key not in shared:
        members, more = presence.room_members(room=room, limit=limit)
        # Counting only when the page is full: below it, the page is the count.
        shared[key] = (
            members,
            presence.room_member_count(room=room) if more else len(members),
        )
    members, member_count = shared[key]
    deleted, deletions_now = [], room.deletions
    if since is not None and deletions is not None and deletions < room.deletions:
        deleted, deletions_now = deleted_since(
            room=room, deletions=deletions, up_to_seq=since, limit=resume_max
        )
    return protocol.event_welcome(
        room=room.slug,
        user=user.get_username(),
        members=members,
        member_count=member_count,
        messages=page.events,
        has_more=page.has_more,
        closed=room.is_closed,
        deletions=deletions_now,
        deleted=deleted,
        last_seq=last_seq,
        read_seq=read_seq,
    )


def deleted_since(
    *, room: Room, deletions: int, up_to_seq: int, limit: int
) -> tuple[list[protocol.DeletedRef], int]:
    """Returns the messages up to `up_to_seq` deleted after deletion number
    `deletions`, and the deletion number the page has then seen.

    At most `limit`, the oldest first: past the limit the number returned is
    that of the last one sent, so the next resume gets the rest.
    """
    rows = list(
        Message.objects.filter(room=room, deletion__gt=deletions)
        .order_by("deletion")
        .values_list("pk", "seq", "deletion")[: limit + 1]
    )
    seen = room.deletions if len(rows) <= limit else rows[limit - 1][2]
    return [
        {"id": pk, "seq": seq} for pk, seq, _ in rows[:limit] if seq <= up_to_seq
    ], seen


def room_members_page(*, room: Room, after: str | None) -> protocol.MembersEvent:
    """Returns the `members` event: the page of members after `after`."""
    members, more = presence.room_members(
        room=room, after=after, limit=settings.CHAT_MEMBERS_PAGE
    )
    return protocol.event_members(after=after, members=members, has_more=more)


class SocketRefused(Exception):
    """A socket may not open; `code` is the close code that says why."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class SocketRequest:
    """A socket asking to open: who, where, from which address, since which seq
    (and since which deletion, on a resume)."""

    slug: str
    user: AbstractBaseUser
    channel_name: str
    address: str = ""
    since: int | None = None
    deletions: int | None = None
    # How many of the latest messages the welcome carries (None: a page).
    backlog: int | None = None


def sockets_open(
    requests: list[SocketRequest],
) -> list[tuple[Room, protocol.WelcomeEvent] | SocketRefused]:
    """Checks and records sockets that open together; returns, for each, its
    room and `welcome` event, or the SocketRefused that says why not.

    One call (one trip to the database thread) for the whole handshake of many
    sockets: the rooms, the bans, the presence rows, the backlog and the
    members, in the same handful of queries for one socket as for a hundred
    in one room (a storm of handshakes, or a room filling up). The callers
    have joined their room's and user's groups already, so nothing posted or
    decided from here on is missed.
    """
    slugs = {r.slug for r in requests if protocol.is_valid_room_name(r.slug)}
    rooms = {room.slug: room for room in Room.objects.filter(slug__in=slugs)}
    banned = moderation.banned_pairs(
        (rooms[r.slug], r.user) for r in requests if r.slug in rooms
    )
    # Read positions, and for a private room membership: who may enter.
    positions = reading.read_positions(
        (rooms[r.slug], r.user) for r in requests if r.slug in rooms
    )
    results: list[tuple[Room, protocol.WelcomeEvent] | SocketRefused] = []
    admitted: list[tuple[int, SocketRequest, Room]] = []
    for request in requests:
        room = rooms.get(request.slug)
        if room is None or (
            not room.is_public and (room.pk, request.user.pk) not in positions
        ):
            # A room it may not enter does not exist, as far as it can tell.
            results.append(SocketRefused(protocol.CLOSE_NO_SUCH_ROOM))
        elif (room.pk, request.user.pk) in banned:
            results.append(SocketRefused(protocol.CLOSE_FORBIDDEN))
        else:
            admitted.append((len(results), request, room))
            results.append(None)  # filled in below
    recorded = presence.connections_open(
        [
            presence.SocketOpening(room, r.user, r.channel_name, r.address)
            for _, r, room in admitted
        ],
        max_per_user=settings.CHAT_MAX_CONNECTIONS_PER_USER,
        max_per_address=settings.CHAT_MAX_CONNECTIONS_PER_ADDRESS,
    )
    shared: dict = {}
    for (index, request, room), outcome in zip(admitted, recorded, strict=True):
        if isinstance(outcome, presence.TooManyConnections):
            results[index] = SocketRefused(protocol.CLOSE_TOO_MANY_CONNECTIONS)
        elif isinstance(outcome, Room.DoesNotExist):
            results[index] = SocketRefused(protocol.CLOSE_NO_SUCH_ROOM)
        else:
            results[index] = (
                room,
                room_welcome(
                    room=room,
                    user=request.user,
                    since=request.since,
                    deletions=request.deletions,
                    backlog=request.backlog,
                    page_size=settings.CHAT_HISTORY_PAGE,
                    resume_max=settings.CHAT_RESUME_MAX,
                    shared=shared,
                    read_seq=positions.get((room.pk, request.user.pk)),
                ),
            )
    return results


# ---------------------------------------------------------------------------
# HTTP API: polling and pushes
# ---------------------------------------------------------------------------


def user_get(*, username: str) -> AbstractBaseUser | None:
    """Returns the active user named `username`, or None."""
    User = get_user_model()
    return User._default_manager.filter(
        **{User.USERNAME_FIELD: username, "is_active": True}
    ).first()


def user_push(*, user: AbstractBaseUser, event: str, data: Any) -> int:
    """Sends a `push` event to every open socket of `user`; returns how many.

    The count comes from the presence store; the event goes to the user's
    group on every worker even when it is 0, since a socket opening right now
    has joined the group before its row is written.
    """
    sockets = presence.user_socket_count(user=user)
    send_to_user(user.pk, protocol.event_push(event=event, data=data))
    return sockets
