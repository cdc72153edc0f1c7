"""Read positions, unread and mention counts, and mentions: the functions, and
the socket frames on the in-memory layer and on Redis."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from chat import protocol, reading, services
from chat.models import Membership, Mention, Message, Room
from tests.conftest import assert_event, db, post

# ---------------------------------------------------------------------------
# Mention parsing (pure)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("hi @bob", [("bob",)]),
        ("@bob, and @carol.", [("bob",), ("carol.", "carol")]),
        ("@bob @bob @bob", [("bob",)]),
        ("mail me@example.com or @@bob", []),
        ("(@bob) [@a.b-c]", [("bob",), ("a.b-c",)]),
        ("no mention here", []),
        ("@", []),
    ],
)
def test_mention_candidates(text, found):
    assert protocol.mention_candidates(text) == found


def test_a_message_counts_at_most_max_mentions_names():
    text = " ".join(f"@user{n}" for n in range(protocol.MAX_MENTIONS + 5))
    assert len(protocol.mention_candidates(text)) == protocol.MAX_MENTIONS


@pytest.mark.parametrize("seq", [0, -1, "3", 1.5, True, None, 2**63])
def test_a_read_frame_needs_a_positive_seq(seq):
    limits = protocol.Limits(1000, 100, 50, 200)
    frame = '{"type":"read"' + ("" if seq is None else f',"seq":{_json(seq)}') + "}"
    with pytest.raises(protocol.ProtocolError) as raised:
        protocol.parse_client_frame(frame, None, limits)
    assert raised.value.code == protocol.ERROR_INVALID_FIELD


def _json(value) -> str:
    import json

    return json.dumps(value)


def test_a_read_frame_parses():
    limits = protocol.Limits(1000, 100, 50, 200)
    command = protocol.parse_client_frame('{"type":"read","seq":7}', None, limits)
    assert command == protocol.MarkRead(seq=7)


# ---------------------------------------------------------------------------
# Read positions (database)
# ---------------------------------------------------------------------------


def seed(room: Room, user, count: int, text: str = "m") -> list[Message]:
    return [
        services.message_post(room=room, user=user, text=f"{text} {n}")[0]
        for n in range(count)
    ]


def position(room: Room, user) -> int | None:
    row = Membership.objects.filter(room=room, user=user).first()
    return row.read_seq if row is not None else None


@pytest.mark.django_db
def test_a_read_position_only_moves_forward(room, alice, bob):
    seed(room, bob, 10)
    assert position(room, alice) is None
    assert reading.read_advance(room=room, user=alice, seq=4) == 4
    assert reading.read_advance(room=room, user=alice, seq=2) is None
    assert reading.read_advance(room=room, user=alice, seq=4) is None
    assert position(room, alice) == 4
    assert reading.read_advance(room=room, user=alice, seq=7) == 7
    assert position(room, alice) == 7


@pytest.mark.django_db
def test_a_read_position_stops_at_the_newest_message(room, alice, bob):
    seed(room, bob, 3)
    assert reading.read_advance(room=room, user=alice, seq=1000) == 3
    assert position(room, alice) == 3
    assert reading.read_advance(room=room, user=alice, seq=1000) is None


@pytest.mark.django_db
def test_nothing_to_read_in_an_empty_room_records_nothing(room, alice):
    assert reading.read_advance(room=room, user=alice, seq=5) is None
    assert position(room, alice) is None


@pytest.mark.django_db
def test_read_positions_are_per_user_and_room(room, alice, bob):
    other = Room.objects.create(slug="other")
    seed(room, bob, 5)
    seed(other, bob, 5)
    reading.read_advance(room=room, user=alice, seq=2)
    reading.read_advance(room=other, user=bob, seq=5)
    assert reading.read_positions([(room, alice), (other, alice), (other, bob)]) == {
        (room.pk, alice.pk): 2,
        (other.pk, bob.pk): 5,
    }


# ---------------------------------------------------------------------------
# Mentions (database)
# ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_mention_of_an_existing_user_is_stored_with_the_message(
    room, alice, bob, make_user
):
    make_user("carol.")
    message, _ = services.message_post(
        room=room, user=alice, text="@bob and @nobody, ask @carol. or @bob. again"
    )
    message.refresh_from_db()
    assert message.mentions == ["bob", "carol."]
    assert services.message_event(message, room_slug="lobby")["mentions"] == [
        "bob",
        "carol.",
    ]
    assert sorted(
        Mention.objects.filter(message=message).values_list("user__username", "seq")
    ) == [("bob", 1), ("carol.", 1)]


@pytest.mark.django_db
def test_a_trailing_dot_names_the_user_without_it(room, alice, bob):
    message, _ = services.message_post(room=room, user=alice, text="thanks @bob.")
    assert message.mentions == ["bob"]


@pytest.mark.django_db
def test_inactive_users_and_yourself(room, alice, bob):
    bob.is_active = False
    bob.save()
    message, _ = services.message_post(room=room, user=alice, text="@bob @alice")
    # Yourself: shown, not counted.
    assert message.mentions == ["alice"]
    assert not Mention.objects.exists()


@pytest.mark.django_db
def test_posts_without_an_at_sign_cost_no_mention_query(room, alice, bob):
    services.message_post(room=room, user=alice, text="warm up")
    with CaptureQueriesContext(connection) as plain:
        services.message_post(room=room, user=alice, text="nothing to see")
    with CaptureQueriesContext(connection) as mentioning:
        services.message_post(room=room, user=alice, text="@bob look")
    assert not any("auth_user" in q["sql"] for q in plain.captured_queries)
    # The users, the mention rows, the mentioned person's place in the room.
    assert len(mentioning) == len(plain) + 3


# ---------------------------------------------------------------------------
# Counts in the room list
# ---------------------------------------------------------------------------


def counts(user) -> dict[str, tuple[int, int, bool]]:
    return {
        summary.slug: (summary.unread, summary.mentions, summary.member)
        for summary in services.room_list(user=user)
    }


@pytest.mark.django_db
def test_unread_and_mention_counts_follow_the_read_position(room, alice, bob):
    Room.objects.create(slug="other")
    seed(room, alice, 3)
    assert counts(bob)["lobby"] == counts(bob)["other"] == (0, 0, False)
    reading.read_advance(room=room, user=bob, seq=3)
    assert counts(bob)["lobby"] == (0, 0, True)
    seed(room, alice, 4)
    services.message_post(room=room, user=alice, text="@bob one")
    services.message_post(room=room, user=alice, text="@bob two")
    assert counts(bob)["lobby"] == (6, 2, True)
    reading.read_advance(room=room, user=bob, seq=8)
    assert counts(bob)["lobby"] == (1, 1, True)
    # What alice wrote she has read: the room is hers, nothing unread.
    assert counts(alice)["lobby"] == (0, 0, True)
    assert counts(bob)["other"] == (0, 0, False)


@pytest.mark.django_db
def test_posting_moves_the_posters_read_position_to_their_post(room, alice, bob):
    seed(room, bob, 3)
    reading.read_advance(room=room, user=alice, seq=1)
    services.message_post(room=room, user=alice, text="caught up")
    assert position(room, alice) == 4
    seed(room, bob, 2)
    assert counts(alice)["lobby"] == (2, 0, True)
    # Never back: a later read of an older seq leaves it.
    assert reading.read_advance(room=room, user=alice, seq=2) is None
    assert position(room, alice) == 4


@pytest.mark.django_db
def test_a_mention_in_a_room_never_visited_is_counted_from_it(room, alice, bob):
    seed(room, alice, 5)
    assert counts(bob)["lobby"] == (0, 0, False)
    services.message_post(room=room, user=alice, text="@bob welcome")
    seed(room, alice, 2)
    assert counts(bob)["lobby"] == (3, 1, True)
    # A position already there stays where it is.
    reading.read_advance(room=room, user=bob, seq=8)
    services.message_post(room=room, user=alice, text="@bob again")
    assert position(room, bob) == 8 and counts(bob)["lobby"] == (1, 1, True)


@pytest.mark.django_db
def test_a_deleted_mention_is_not_counted(room, alice, bob, make_user):
    from chat import moderation

    reading.read_advance(room=room, user=bob, seq=seed(room, alice, 1)[0].seq)
    message, _ = services.message_post(room=room, user=alice, text="@bob spam")
    assert counts(bob)["lobby"] == (1, 1, True)
    moderator = make_user("mod", is_staff=True, is_superuser=True)
    moderation.message_delete(message=message, actor=moderator)
    assert counts(bob)["lobby"][1] == 0


@pytest.mark.django_db
def test_the_room_list_with_counts_is_one_query_for_any_number_of_rooms(alice, bob):
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            services.room_list(user=bob)
        return len(captured)

    first = Room.objects.create(slug="first")
    seed(first, alice, 2, "@bob")
    reading.read_advance(room=first, user=bob, seq=1)
    one_room = queries()
    for n in range(20):
        room = Room.objects.create(slug=f"room-{n}")
        seed(room, alice, 30, "@bob hi")
        reading.read_advance(room=room, user=bob, seq=10)
    assert queries() == one_room
    # presence.live_worker_ids is its own query; the list is the other.
    assert one_room <= 2
    assert counts(bob)["room-3"] == (20, 20, True)


# ---------------------------------------------------------------------------
# Sockets: welcome, read frames, read and mention events
# ---------------------------------------------------------------------------

pytestmark_sockets = pytest.mark.django_db(transaction=True)


async def next_after_messages(client, kind: str) -> dict:
    """Returns the next frame that is not a `message` (those are skipped)."""
    frame = await client.receive()
    while frame["type"] == "message":
        frame = await client.receive()
    assert frame["type"] == kind, frame
    return frame


@pytestmark_sockets
async def test_welcome_carries_the_read_position(connect, alice, bob, room):
    _, welcome = await connect(alice)
    assert welcome["read_seq"] is None
    await db(seed, room, bob, 5)
    await db(reading.read_advance, room=room, user=alice, seq=3)
    _, welcome = await connect(alice)
    assert welcome["read_seq"] == 3
    assert welcome["last_seq"] == 5


@pytestmark_sockets
async def test_a_read_frame_reaches_every_socket_of_the_user(connect, alice, bob, room):
    await db(Room.objects.create, slug="other")
    tab_one, _ = await connect(alice)
    tab_two, _ = await connect(alice)
    elsewhere, _ = await connect(alice, "other")
    writer, _ = await connect(bob)
    for n in range(3):
        await post(writer, f"hi {n}")
    await tab_one.send({"type": "read", "seq": 2})
    for client in (tab_one, tab_two, elsewhere):
        read = await next_after_messages(client, "read")
        assert_event(read, "read", room="lobby", seq=2)
    assert await writer.receive_nothing()
    assert await db(position, room, alice) == 2


@pytestmark_sockets
async def test_a_read_frame_that_moves_nothing_sends_nothing(connect, alice, bob, room):
    reader, _ = await connect(alice)
    other_tab, _ = await connect(alice)
    await db(seed, room, bob, 3)
    await db(reading.read_advance, room=room, user=alice, seq=3)
    for client in (reader, other_tab):
        assert_event(await next_after_messages(client, "read"), "read", seq=3)
    await reader.send({"type": "read", "seq": 2})
    await reader.send({"type": "read", "seq": 3})
    assert await other_tab.receive_nothing(0.8)
    assert await db(position, room, alice) == 3


@pytestmark_sockets
async def test_read_frames_that_come_fast_are_stored_as_the_latest(
    connect, alice, bob, room, settings
):
    settings.CHAT_READ_INTERVAL_MS = 300
    reader, _ = await connect(alice)
    await db(seed, room, bob, 20)
    for seq in range(1, 21):
        await reader.send({"type": "read", "seq": seq})
    events = [await next_after_messages(reader, "read")]
    while events[-1]["seq"] < 20:
        events.append(await reader.receive_type("read"))
    seqs = [event["seq"] for event in events]
    # The first at once, then the latest: not one write per frame.
    assert seqs[0] == 1 and seqs[-1] == 20 and len(seqs) <= 3, seqs
    assert seqs == sorted(seqs)
    assert await db(position, room, alice) == 20


@pytestmark_sockets
async def test_a_bad_read_frame_gets_an_error_and_stores_nothing(
    connect, alice, bob, room
):
    reader, _ = await connect(alice)
    await db(seed, room, bob, 2)
    await reader.send({"type": "read", "seq": "2"})
    frame = await next_after_messages(reader, "error")
    assert frame["code"] == protocol.ERROR_INVALID_FIELD
    assert await db(position, room, alice) is None


@pytestmark_sockets
async def test_a_mention_reaches_the_mentioned_users_sockets_in_every_room(
    connect, alice, bob, room
):
    await db(Room.objects.create, slug="other")
    in_room, _ = await connect(bob)
    elsewhere, _ = await connect(bob, "other")
    writer, _ = await connect(alice)
    message = await post(writer, "@bob have a look, @nobody")
    assert message["mentions"] == ["bob"]
    # The room's broadcast and the user's are two groups: either comes first.
    in_room_frames = {
        frame["type"]: frame
        for frame in [await in_room.receive(), await in_room.receive()]
    }
    assert in_room_frames["message"]["mentions"] == ["bob"]
    for mention in (in_room_frames["mention"], await elsewhere.receive()):
        assert_event(
            mention,
            "mention",
            room="lobby",
            id=message["id"],
            seq=message["seq"],
            user="alice",
            message="@bob have a look, @nobody",
        )
    assert await writer.receive_nothing()
