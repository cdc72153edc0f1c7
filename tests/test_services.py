"""Domain operations on rooms and messages: seq, idempotent posts, history, lists."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from chat import presence, protocol, reading, services
from chat.models import Connection, Message, Room

pytestmark = pytest.mark.django_db


def post(room: Room, user, text: str = "hi", client_id: str | None = None):
    return services.message_post(room=room, user=user, text=text, client_id=client_id)


def seqs(page: services.MessagePage | None) -> list[int]:
    assert page is not None
    return [event["seq"] for event in page.events]


def stored_seqs(room: Room) -> list[int]:
    return list(room.messages.order_by("seq").values_list("seq", flat=True))


def open_socket(room: Room, user, channel_name: str) -> None:
    presence.connection_open(
        room=room, user=user, channel_name=channel_name, max_per_user=20
    )


@pytest.fixture
def other_room(db) -> Room:
    return Room.objects.create(slug="other")


@pytest.fixture
def five(room, alice) -> Room:
    """The `room` with messages m1..m5 (seq 1..5) by alice."""
    for n in range(1, 6):
        post(room, alice, f"m{n}")
    return room


@pytest.fixture
def broadcasts(monkeypatch) -> list[dict[str, Any]]:
    """Records what message_post broadcasts, whether it was stored by then, and
    in which group message (`round`: the events of one call share it)."""
    sent: list[dict[str, Any]] = []
    calls = iter(range(1_000_000))

    def record(slug: str, events: list[dict[str, Any]]) -> None:
        call = next(calls)
        for event in events:
            stored = Message.objects.filter(pk=event["id"]).exists()
            sent.append({"slug": slug, "event": event, "stored": stored, "round": call})

    monkeypatch.setattr(services, "broadcast_room_events", record)
    return sent


# ---------------------------------------------------------------------------
# message_post
# ---------------------------------------------------------------------------


def test_posts_get_gapless_seqs_independently_per_room(room, other_room, alice):
    results = [post(r, alice) for r in (room, other_room, room, room, other_room)]
    assert [(m.room.slug, m.seq, created) for m, created in results] == [
        ("lobby", 1, True),
        ("other", 1, True),
        ("lobby", 2, True),
        ("lobby", 3, True),
        ("other", 2, True),
    ]
    assert stored_seqs(room) == [1, 2, 3]
    assert stored_seqs(other_room) == [1, 2]
    room.refresh_from_db()
    assert room.last_seq == 3
    newest = results[3][0].created_at
    assert abs(room.last_message_at - newest) < timedelta(seconds=1)


def test_post_stores_author_body_and_client_id(room, alice):
    message, _ = post(room, alice, "hello", client_id="c-1")
    stored = Message.objects.get(pk=message.pk)
    assert (stored.user, stored.author, stored.body, stored.client_id) == (
        alice,
        "alice",
        "hello",
        "c-1",
    )


@pytest.mark.django_db(transaction=True)
def test_concurrent_posts_still_get_gapless_seqs(room, make_user, broadcasts):
    users = [make_user(f"user{n}") for n in range(4)]
    errors: list[BaseException] = []

    def poster(user) -> None:
        try:
            for n in range(5):
                post(room, user, f"{user.username}-{n}")
        except BaseException as error:  # surfaced below, not lost in the thread
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=poster, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert stored_seqs(room) == list(range(1, 21))


def test_repeated_client_id_returns_the_original_and_stores_once(room, alice):
    first, created = post(room, alice, "hi", client_id="c-1")
    assert created
    again, created = post(room, alice, "hi (retried)", client_id="c-1")
    assert (again.pk, again.seq, again.body, created) == (first.pk, 1, "hi", False)
    assert room.messages.count() == 1
    room.refresh_from_db()
    assert room.last_seq == 1


def test_same_client_id_by_another_user_or_in_another_room_is_new(
    room, other_room, alice, bob
):
    post(room, alice, client_id="c-1")
    _, by_bob = post(room, bob, client_id="c-1")
    _, elsewhere = post(other_room, alice, client_id="c-1")
    assert by_bob and elsewhere
    assert stored_seqs(room) == [1, 2]
    assert stored_seqs(other_room) == [1]


def test_posts_without_client_id_are_never_deduplicated(room, alice):
    assert [post(room, alice)[1] for _ in range(3)] == [True, True, True]
    assert room.messages.count() == 3


def test_database_refuses_a_duplicate_client_id_inserted_directly(room, alice):
    message, _ = post(room, alice, client_id="c-1")
    with pytest.raises(IntegrityError), transaction.atomic():
        Message.objects.create(
            room=room, seq=2, user=alice, author="alice", body="x", client_id="c-1"
        )
    assert room.messages.count() == 1


def test_database_refuses_a_duplicate_seq_in_a_room(room, alice):
    post(room, alice)
    with pytest.raises(IntegrityError), transaction.atomic():
        Message.objects.create(room=room, seq=1, user=alice, author="alice", body="x")


@pytest.mark.django_db(transaction=True)
def test_post_is_broadcast_once_after_it_is_stored(room, alice, broadcasts):
    message, _ = post(room, alice, "hi", client_id="c-1")
    assert len(broadcasts) == 1
    assert broadcasts[0]["slug"] == "lobby"
    assert broadcasts[0]["stored"], "broadcast before the message was committed"
    assert broadcasts[0]["event"] == services.message_event(message, room_slug="lobby")
    assert broadcasts[0]["event"]["client_id"] == "c-1"


@pytest.mark.django_db(transaction=True)
def test_post_in_a_rolled_back_transaction_is_never_broadcast(room, alice, broadcasts):
    with pytest.raises(RuntimeError), transaction.atomic():
        post(room, alice)
        raise RuntimeError("the caller fails after posting")
    assert broadcasts == []
    assert room.messages.count() == 0


@pytest.mark.django_db(transaction=True)
def test_a_retried_post_is_broadcast_again_as_it_was_stored(room, alice, broadcasts):
    """Its first broadcast may never have gone out (the worker died after the
    commit); a page drops a seq it already has."""
    post(room, alice, "hi", client_id="c-1")
    post(room, alice, "hi (retried)", client_id="c-1")
    assert len(broadcasts) == 2
    assert broadcasts[1]["event"] == broadcasts[0]["event"]
    assert broadcasts[1]["event"]["message"] == "hi"


# ---------------------------------------------------------------------------
# messages_post: the posts a worker got together, in one transaction
# ---------------------------------------------------------------------------


def many(*posts: tuple[Room, Any, str, str | None]) -> list[services.PostOutcome]:
    return services.messages_post(
        [
            services.Post(room=room, user=user, text=text, client_id=client_id)
            for room, user, text, client_id in posts
        ]
    )


@pytest.mark.django_db(transaction=True)
def test_a_batch_locks_its_rooms_in_one_order_whatever_order_the_posts_came_in(
    room, other_room, alice, bob
):
    """Two workers whose batches name the same rooms in opposite orders would
    each hold one room's row and wait for the other's: on PostgreSQL a
    deadlock, a second lost each time and every post of both batches tried
    again alone (a soak of 40 pages in 4 rooms fell minutes behind)."""
    later = Room.objects.create(slug="later")

    def locking(*posts: tuple[Room, Any, str, str | None]) -> list[str]:
        with CaptureQueriesContext(connection) as queries:
            many(*posts)
        return [q["sql"] for q in queries if q["sql"].startswith('SELECT "chat_room"')]

    for posts in (
        [
            (later, alice, "1", None),
            (room, bob, "2", None),
            (other_room, alice, "3", None),
        ],
        [
            (other_room, bob, "4", None),
            (later, alice, "5", None),
            (room, bob, "6", None),
        ],
    ):
        (sql,) = locking(*posts)
        assert sql.endswith('ORDER BY "chat_room"."id" ASC' + locking_clause()), sql
        for pk in (room.pk, other_room.pk, later.pk):
            assert re.search(rf"\b{pk}\b", sql.split(" IN ", 1)[1]), (pk, sql)


def locking_clause() -> str:
    # SQLite has no row locks: the transaction takes the database's write lock.
    return " FOR UPDATE" if connection.features.has_select_for_update else ""


@pytest.mark.django_db(transaction=True)
def test_posts_together_get_what_each_would_alone(
    room, other_room, alice, bob, broadcasts
):
    stored, _ = post(room, alice, "before", client_id="c-1")
    outcomes = many(
        (room, alice, "retried", "c-1"),
        (room, bob, "b1", "c-1"),
        (other_room, alice, "o1", None),
        (room, alice, "a2", "c-2"),
        (room, alice, "a2 again", "c-2"),
        (room, bob, "b2", None),
    )
    assert [(m.room.slug, m.seq, m.body, created) for m, created in outcomes] == [
        ("lobby", 1, "before", False),
        ("lobby", 2, "b1", True),
        ("other", 1, "o1", True),
        ("lobby", 3, "a2", True),
        ("lobby", 3, "a2", False),
        ("lobby", 4, "b2", True),
    ]
    assert outcomes[0][0].pk == stored.pk
    assert outcomes[3][0].pk == outcomes[4][0].pk
    assert stored_seqs(room) == [1, 2, 3, 4]
    assert stored_seqs(other_room) == [1]
    room.refresh_from_db()
    assert room.last_seq == 4
    # Each new message once, after the commit, in each room's order; the retry
    # of the one stored before is heard again, the retry within the batch not.
    # The new ones of a room go out together: one group message, one layer
    # round trip for all of them.
    assert [
        (b["slug"], b["event"]["seq"], b["stored"], b["round"]) for b in broadcasts
    ] == [
        ("lobby", 1, True, 0),
        ("lobby", 1, True, 1),
        ("lobby", 2, True, 2),
        ("lobby", 3, True, 2),
        ("lobby", 4, True, 2),
        ("other", 1, True, 3),
    ]
    assert broadcasts[1]["event"] == broadcasts[0]["event"]
    assert broadcasts[2]["event"] == services.message_event(
        outcomes[1][0], room_slug="lobby"
    )


def test_a_closed_room_refuses_its_posts_only(room, other_room, alice):
    Room.objects.filter(pk=other_room.pk).update(is_closed=True)
    outcomes = many((room, alice, "a", None), (other_room, alice, "b", "c-9"))
    message, created = outcomes[0]
    assert (message.seq, created) == (1, True)
    refused = outcomes[1]
    assert isinstance(refused, protocol.ProtocolError)
    assert (refused.code, refused.ref) == (protocol.ERROR_ROOM_CLOSED, "c-9")
    assert stored_seqs(other_room) == []


@pytest.mark.django_db(transaction=True)
def test_a_post_the_database_refuses_fails_alone(room, alice, broadcasts):
    ghost = get_user_model()(pk=10**9, username="ghost")  # no such row
    outcomes = many(
        (room, alice, "a", None), (room, ghost, "g", None), (room, alice, "b", None)
    )
    assert isinstance(outcomes[1], IntegrityError)
    assert [(m.body, m.seq) for m, _ in (outcomes[0], outcomes[2])] == [
        ("a", 1),
        ("b", 2),
    ]
    assert stored_seqs(room) == [1, 2]
    assert [b["event"]["seq"] for b in broadcasts] == [1, 2]


def test_posts_together_cost_the_queries_of_one(room, alice, bob):
    with CaptureQueriesContext(connection) as one:
        many((room, alice, "x", "c-0"))
    posts = [
        (room, user, f"m{n}", f"c-{n}") for n in range(1, 21) for user in (alice, bob)
    ]
    with CaptureQueriesContext(connection) as forty:
        outcomes = many(*posts)
    assert all(created for _, created in outcomes)
    assert len(forty) == len(one)
    messages = [q["sql"] for q in forty if q["sql"].startswith('SELECT "chat_message"')]
    assert messages and not any("ORDER BY" in sql for sql in messages)


def test_a_retry_is_looked_up_by_room_user_and_client_id(room, alice, bob):
    """The lookup names all three columns of the unique index on them: with
    room and client_id only, it reads each room's every message, under the
    rooms' locks."""
    post(room, alice, "first", client_id="c-1")
    with CaptureQueriesContext(connection) as queries:
        outcomes = many((room, alice, "again", "c-1"), (room, bob, "new", "c-1"))
    assert [(m.body, created) for m, created in outcomes] == [
        ("first", False),
        ("new", True),
    ]
    (lookup, *_) = [
        q["sql"] for q in queries if q["sql"].startswith('SELECT "chat_message"')
    ]
    for column in ("room_id", "user_id", "client_id"):
        assert f'"chat_message"."{column}" IN' in lookup, lookup


def test_retries_are_looked_up_before_the_rooms_are_locked(room, alice):
    """Every worker's write rounds take the same rooms' locks one after
    another: the lookup is not one more statement under them."""
    with CaptureQueriesContext(connection) as queries:
        many((room, alice, "a", "c-1"))
    sqls = [q["sql"] for q in queries]
    (lookup,) = [i for i, sql in enumerate(sqls) if '"client_id" IN' in sql]
    (locking,) = [
        i for i, sql in enumerate(sqls) if sql.startswith('SELECT "chat_room"')
    ]
    assert lookup < locking


@pytest.fixture
def next_lookup_misses(monkeypatch) -> Callable[[], list[int]]:
    """Returns miss(): from then on the retries' next lookup finds nothing,
    as when another worker stores a copy between a batch's lookup and its
    locks; miss() returns the sizes of the lookups made from then on."""

    def miss() -> list[int]:
        lookup = services._stored_by_client_id
        lookups: list[int] = []

        def missed_once(posts):
            lookups.append(len(posts))
            return {} if len(lookups) == 1 else lookup(posts)

        monkeypatch.setattr(services, "_stored_by_client_id", missed_once)
        return lookups

    return miss


@pytest.mark.django_db(transaction=True)
def test_a_copy_stored_after_the_lookup_is_found_on_a_second_try(
    room, alice, next_lookup_misses, broadcasts
):
    # The insert fails on the unique index, and the batch, tried again,
    # finds that copy.
    first, _ = post(room, alice, "first", client_id="c-1")
    lookups = next_lookup_misses()
    outcomes = many((room, alice, "again", "c-1"), (room, alice, "new", "c-2"))
    assert lookups == [2, 2]
    assert [(m.body, m.seq, created) for m, created in outcomes] == [
        ("first", 1, False),
        ("new", 2, True),
    ]
    assert outcomes[0][0].pk == first.pk
    assert stored_seqs(room) == [1, 2]
    room.refresh_from_db()
    assert room.last_seq == 2  # the failed try's seqs are rolled back
    # Only the try that committed is heard: the first, again, then the new one.
    assert [(b["event"]["message"], b["event"]["seq"]) for b in broadcasts] == [
        ("first", 1),
        ("first", 1),
        ("new", 2),
    ]


@pytest.mark.django_db(transaction=True)
def test_a_resend_whose_copy_is_stored_after_the_lookup_gets_that_copy(
    room, alice, next_lookup_misses
):
    # One post alone (a page's resend after a reconnect) has no other post
    # to be tried without: it is the batch's second try that finds the copy.
    first, _ = post(room, alice, "first", client_id="c-1")
    lookups = next_lookup_misses()
    message, created = post(room, alice, "again", client_id="c-1")
    assert lookups == [1, 1]
    assert (message.pk, created) == (first.pk, False)
    assert stored_seqs(room) == [1]


def test_a_post_to_a_room_deleted_meanwhile_fails_alone(room, other_room, alice):
    gone = Room.objects.get(pk=other_room.pk)
    Room.objects.filter(pk=other_room.pk).delete()
    outcomes = many((room, alice, "a", None), (gone, alice, "b", None))
    assert outcomes[0][0].seq == 1
    assert isinstance(outcomes[1], Room.DoesNotExist)
    assert stored_seqs(room) == [1]


def test_posts_to_many_rooms_together_cost_the_queries_of_one_room(room, alice, bob):
    """A batch holds its rooms' row locks while it writes: every step is one
    statement for all its rooms, so another worker's batch waits a handful of
    round trips, not a handful per room."""
    rooms = [room] + [Room.objects.create(slug=f"many-{n}") for n in range(9)]
    with CaptureQueriesContext(connection) as one_room:
        many((room, alice, "x", "c-0"), (room, bob, "y", "c-0"))
    posts = [
        (each, user, f"m{n}", f"c-{n}")
        for n, each in enumerate(rooms, start=1)
        for user in (alice, bob)
    ]
    with CaptureQueriesContext(connection) as ten_rooms:
        outcomes = many(*posts)
    assert [(m.room.slug, m.seq) for m, _ in outcomes[2:4]] == [
        ("many-0", 1),
        ("many-0", 2),
    ]
    assert len(ten_rooms) == len(one_room)
    for each in rooms[1:]:
        each.refresh_from_db()
        assert each.last_seq == 2
        assert stored_seqs(each) == [1, 2]
    assert reading.read_positions([(rooms[5], alice), (rooms[5], bob)]) == {
        (rooms[5].pk, alice.pk): 1,
        (rooms[5].pk, bob.pk): 2,
    }


# ---------------------------------------------------------------------------
# room_history, room_messages_since, room_welcome
# ---------------------------------------------------------------------------


def history(room: Room, before: int | None, limit: int) -> services.MessagePage:
    return services.room_history(room=room, before=before, limit=limit)


def test_history_of_an_empty_room_is_empty(room):
    page = history(room, None, 50)
    assert (page.events, page.has_more) == ([], False)


def test_the_same_history_page_asked_for_together_is_read_once(five, other_room, alice):
    """The sockets of a room on one worker see the same hole at the same
    moment; a worker behind would otherwise read the page once for each."""
    services.message_post(room=other_room, user=alice, text="elsewhere")
    reads = [
        services.HistoryRead(room=five, before=4, limit=2),
        services.HistoryRead(room=five, before=4, limit=2),
        services.HistoryRead(room=other_room, before=None, limit=2),
        services.HistoryRead(room=five, before=4, limit=2),
        services.HistoryRead(room=five, before=None, limit=1),
    ]
    with CaptureQueriesContext(connection) as queries:
        pages = services.room_histories(reads)
    assert [(seqs(page), page.has_more) for page in pages] == [
        ([2, 3], True),
        ([2, 3], True),
        ([1], False),
        ([2, 3], True),
        ([5], True),
    ]
    assert [page.events[0]["room"] for page in pages] == [
        five.slug,
        five.slug,
        other_room.slug,
        five.slug,
        five.slug,
    ]
    assert len(queries) == 3


@pytest.mark.parametrize(
    ("before", "limit", "expected", "has_more"),
    [
        (None, 2, [4, 5], True),
        (None, 5, [1, 2, 3, 4, 5], False),
        (None, 50, [1, 2, 3, 4, 5], False),
        (4, 2, [2, 3], True),
        (3, 2, [1, 2], False),
        (2, 2, [1], False),
        (1, 2, [], False),
        (99, 1, [5], True),
    ],
)
def test_history_pages_back_oldest_first(five, before, limit, expected, has_more):
    page = history(five, before, limit)
    assert (seqs(page), page.has_more) == (expected, has_more)


def test_history_before_beyond_the_seq_range_is_the_latest_page(five):
    # protocol accepts any positive `before`; the query must not overflow.
    assert seqs(history(five, 2**63, 2)) == [4, 5]
    assert seqs(history(five, 10**100, 2)) == [4, 5]


def test_history_events_are_message_events(five, alice):
    event = history(five, 2, 1).events[0]
    assert {k: event[k] for k in ("type", "seq", "room", "user", "message")} == {
        "type": "message",
        "seq": 1,
        "room": "lobby",
        "user": "alice",
        "message": "m1",
    }


def test_history_stays_in_its_room(five, other_room, bob):
    post(other_room, bob, "elsewhere")
    assert [e["message"] for e in history(other_room, None, 50).events] == ["elsewhere"]
    assert seqs(history(five, None, 50)) == [1, 2, 3, 4, 5]


def test_history_page_costs_one_query(five, bob, django_assert_num_queries):
    post(five, bob, "by bob")
    with django_assert_num_queries(1):
        page = history(five, None, 50)
    assert [e["user"] for e in page.events] == ["alice"] * 5 + ["bob"]


@pytest.mark.parametrize(
    ("since", "expected", "has_more"),
    [(0, [1, 2, 3, 4, 5], False), (2, [3, 4, 5], True), (5, [], True)],
)
def test_messages_since_returns_exactly_what_was_missed(
    five, since, expected, has_more
):
    page = services.room_messages_since(room=five, since=since, limit=10)
    assert (seqs(page), page.has_more) == (expected, has_more)


def test_messages_since_is_none_when_more_than_the_limit_are_missing(five):
    assert seqs(services.room_messages_since(room=five, since=2, limit=3)) == [3, 4, 5]
    assert services.room_messages_since(room=five, since=2, limit=2) is None


def welcome(room: Room, user, since: int | None, page_size: int = 2, resume_max=10):
    return services.room_welcome(
        room=room, user=user, since=since, page_size=page_size, resume_max=resume_max
    )


def test_welcome_without_since_sends_members_and_latest_page(five, alice, bob):
    open_socket(five, bob, "b1")
    open_socket(five, alice, "a1")
    event = welcome(five, alice, None)
    assert {k: v for k, v in event.items() if k != "messages"} == {
        "type": "welcome",
        "room": "lobby",
        "user": "alice",
        "members": ["alice", "bob"],
        "member_count": 2,
        "members_more": False,
        "has_more": True,
        "closed": False,
        "deletions": 0,
        "deleted": [],
        "last_seq": 5,
        "read_seq": None,
    }
    assert [m["seq"] for m in event["messages"]] == [4, 5]


def test_a_resume_learns_the_deletions_it_missed(five, alice):
    from chat import moderation

    by_seq = {m.seq: m for m in Message.objects.filter(room=five)}
    moderation.message_delete(message=by_seq[2], actor=None)  # seen by the page
    seen = welcome(Room.objects.get(pk=five.pk), alice, since=5)["deletions"]
    assert seen == 1
    # The page goes away; two more are deleted, one of them after it left.
    moderation.message_delete(message=by_seq[4], actor=None)
    moderation.message_delete(message=by_seq[1], actor=None)
    event = services.room_welcome(
        room=Room.objects.get(pk=five.pk),
        user=alice,
        since=5,
        deletions=seen,
        page_size=2,
        resume_max=10,
    )
    assert event["deleted"] == [
        {"id": by_seq[4].pk, "seq": 4},
        {"id": by_seq[1].pk, "seq": 1},
    ]
    assert event["deletions"] == 3
    # A page that gives no deletion number (a first connect, an old client)
    # gets none: it has shown nothing that could be stale.
    assert welcome(Room.objects.get(pk=five.pk), alice, since=5)["deleted"] == []


def test_a_resume_past_the_limit_gets_the_oldest_deletions_and_the_rest_next(
    five, alice
):
    from chat import moderation

    for message in Message.objects.filter(room=five).order_by("seq")[:3]:
        moderation.message_delete(message=message, actor=None)
    room = Room.objects.get(pk=five.pk)
    first = services.room_welcome(
        room=room, user=alice, since=5, deletions=0, page_size=2, resume_max=2
    )
    assert [d["seq"] for d in first["deleted"]] == [1, 2]
    assert first["deletions"] == 2  # not 3: the third is still to come
    rest = services.room_welcome(
        room=room,
        user=alice,
        since=5,
        deletions=first["deletions"],
        page_size=2,
        resume_max=2,
    )
    assert ([d["seq"] for d in rest["deleted"]], rest["deletions"]) == ([3], 3)


def test_welcome_lists_a_bounded_page_of_members(five, make_user, settings):
    settings.CHAT_MEMBERS_PAGE = 2
    for name in ("zack", "yuri", "xena"):
        open_socket(five, make_user(name), f"{name}-1")
    event = welcome(five, make_user("walt"), None)
    assert (event["members"], event["member_count"], event["members_more"]) == (
        ["xena", "yuri"],
        3,
        True,
    )


def test_welcome_with_since_sends_everything_missed_beyond_page_size(five, alice):
    event = welcome(five, alice, since=1, page_size=2)
    assert [m["seq"] for m in event["messages"]] == [2, 3, 4, 5]
    assert event["has_more"] is True


def test_welcome_with_since_up_to_date_sends_no_messages(five, alice):
    event = welcome(five, alice, since=5)
    assert (event["messages"], event["has_more"]) == ([], True)


def test_welcome_falls_back_to_latest_page_when_too_much_was_missed(five, alice):
    event = welcome(five, alice, since=0, page_size=2, resume_max=3)
    assert [m["seq"] for m in event["messages"]] == [4, 5]
    assert event["has_more"] is True


# ---------------------------------------------------------------------------
# Rooms
# ---------------------------------------------------------------------------


def summaries(*slugs: str) -> list[tuple[str, int]]:
    """Returns (slug, online) of room_list, in its order, for the named rooms only."""
    return [(s.slug, s.online) for s in services.room_list() if s.slug in slugs]


def test_room_list_counts_distinct_online_users(room, other_room, alice, bob):
    open_socket(room, alice, "a1")
    open_socket(room, alice, "a2")
    open_socket(room, bob, "b1")
    open_socket(other_room, alice, "a3")
    online = dict(summaries("lobby", "other"))
    assert online == {"lobby": 2, "other": 1}


def test_room_list_shows_empty_rooms_with_nobody_online(room):
    assert summaries("lobby") == [("lobby", 0)]


def test_room_list_orders_by_last_activity_then_slug(db):
    start = timezone.now() - timedelta(days=1)
    rooms = {
        # slug: (created_at, last_message_at)
        "quiet": (start + timedelta(hours=3), None),
        "busy": (start, start + timedelta(hours=4)),
        "stale": (start, start + timedelta(hours=1)),
        "b-tie": (start + timedelta(hours=2), None),
        "a-tie": (start + timedelta(hours=2), None),
    }
    for slug, (created_at, last_message_at) in rooms.items():
        Room.objects.create(slug=slug)
        Room.objects.filter(slug=slug).update(
            created_at=created_at, last_message_at=last_message_at
        )
    listed = services.room_list()
    assert [s.slug for s in listed if s.slug in rooms] == [
        "busy",
        "quiet",
        "a-tie",
        "b-tie",
        "stale",
    ]
    assert {s.slug: s.last_activity for s in listed}["quiet"] == rooms["quiet"][0]


def test_posting_moves_a_room_to_the_top(room, other_room, alice):
    post(other_room, alice)
    post(room, alice)
    assert [slug for slug, _ in summaries("lobby", "other")] == ["lobby", "other"]
    post(other_room, alice)
    assert [slug for slug, _ in summaries("lobby", "other")] == ["other", "lobby"]


def test_room_get_finds_existing_rooms_only(room):
    assert services.room_get(slug="lobby") == room
    assert services.room_get(slug="missing") is None


@pytest.mark.parametrize("slug", ["", "LOBBY", "lobby\n", "bad name", "٣", "a" * 65])
def test_room_get_with_an_invalid_name_is_none_without_a_query(
    room, slug, django_assert_num_queries
):
    with django_assert_num_queries(0):
        assert services.room_get(slug=slug) is None


def test_room_get_or_create_creates_once(db):
    room, created = services.room_get_or_create(slug="new-room")
    again, created_again = services.room_get_or_create(slug="new-room")
    assert (created, created_again, again.pk) == (True, False, room.pk)
    assert Room.objects.filter(slug="new-room").count() == 1


@pytest.mark.parametrize("slug", ["", "New", "new\n", "-new", "a" * 65])
def test_room_get_or_create_refuses_invalid_names(db, slug):
    before = Room.objects.count()
    with pytest.raises(services.InvalidRoomName):
        services.room_get_or_create(slug=slug)
    assert Room.objects.count() == before


# ---------------------------------------------------------------------------
# sockets_open: handshakes that arrive together
# ---------------------------------------------------------------------------


def request(slug: str, user, channel: str, since: int | None = None):
    return services.SocketRequest(slug, user, channel, "127.0.0.1", since)


def test_sockets_open_decides_each_socket_as_if_it_came_alone(
    five, other_room, alice, bob, make_user, settings
):
    from chat import moderation, protocol

    settings.CHAT_MAX_CONNECTIONS_PER_USER = 2
    carol = make_user("carol")
    moderation.user_ban(room=five, user=carol, actor=None)
    open_socket(other_room, bob, "b0")
    outcomes = services.sockets_open(
        [
            request("lobby", alice, "a1"),
            request("missing", alice, "a2"),
            request("lobby", carol, "c1"),  # banned here
            request("other", carol, "c2"),  # not there
            request("lobby", bob, "b1"),  # his second socket
            request("lobby", bob, "b2"),  # his third: one too many
            request("lobby", alice, "a3", since=3),
        ]
    )
    refused = [
        o.code if isinstance(o, services.SocketRefused) else None for o in outcomes
    ]
    assert refused == [
        None,
        protocol.CLOSE_NO_SUCH_ROOM,
        protocol.CLOSE_FORBIDDEN,
        None,
        None,
        protocol.CLOSE_TOO_MANY_CONNECTIONS,
        None,
    ]
    welcomes = {
        o[1]["user"] + str(i): o[1] for i, o in enumerate(outcomes) if not refused[i]
    }
    # Every admitted socket is in the members it is welcomed with.
    assert welcomes["alice0"]["members"] == ["alice", "bob"]
    assert welcomes["carol3"]["members"] == ["bob", "carol"]
    assert [m["seq"] for m in welcomes["alice0"]["messages"]] == [1, 2, 3, 4, 5]
    assert [m["seq"] for m in welcomes["alice6"]["messages"]] == [4, 5]
    recorded = set(Connection.objects.values_list("channel_name", flat=True))
    assert recorded == {"b0", "a1", "c2", "b1", "a3"}


def test_sockets_open_notes_each_user_once_per_room(
    room, alice, bob, monkeypatch, django_capture_on_commit_callbacks
):
    noted: list[tuple[str, str]] = []
    monkeypatch.setattr(
        presence.diffs, "note", lambda slug, user: noted.append((slug, user))
    )
    with django_capture_on_commit_callbacks(execute=True):
        services.sockets_open(
            [
                request("lobby", alice, "a1"),
                request("lobby", alice, "a2"),
                request("lobby", bob, "b1"),
            ]
        )
    assert noted == [("lobby", "alice"), ("lobby", "bob")]


def test_a_hundred_sockets_in_one_room_cost_the_queries_of_one(
    room, make_user, django_assert_num_queries
):
    users = [make_user(f"user{n:03d}") for n in range(100)]
    services.sockets_open([request("lobby", users[0], "c0")])  # the lease row exists
    with CaptureQueriesContext(connection) as one:
        services.sockets_open([request("lobby", users[1], "c1")])
    with django_assert_num_queries(len(one)):
        outcomes = services.sockets_open(
            [request("lobby", user, f"c{n}") for n, user in enumerate(users[2:], 2)]
        )
    assert all(not isinstance(o, services.SocketRefused) for o in outcomes)
    assert outcomes[-1][1]["member_count"] == 100


def test_sockets_from_one_address_are_capped_on_every_worker_together(
    room, make_user, settings
):
    from chat import protocol

    settings.CHAT_MAX_CONNECTIONS_PER_ADDRESS = 3
    users = [make_user(f"user{n}") for n in range(5)]
    # One socket of this address is held by another worker already.
    presence.worker_heartbeat(worker_id="other-worker")
    Connection.objects.create(
        room=room,
        user=users[0],
        channel_name="elsewhere",
        worker="other-worker",
        address="10.0.0.7",
        network="10.0.0.7",
    )
    outcomes = services.sockets_open(
        [
            services.SocketRequest("lobby", users[1], "a", "10.0.0.7", None),
            services.SocketRequest("lobby", users[2], "b", "10.0.0.7", None),
            services.SocketRequest("lobby", users[3], "c", "10.0.0.7", None),
            services.SocketRequest("lobby", users[4], "d", "10.0.0.8", None),
        ]
    )
    refused = [getattr(o, "code", None) for o in outcomes]
    assert refused == [None, None, protocol.CLOSE_TOO_MANY_CONNECTIONS, None]
    # No cap: as many as the users' own caps allow.
    settings.CHAT_MAX_CONNECTIONS_PER_ADDRESS = 0
    (outcome,) = services.sockets_open(
        [services.SocketRequest("lobby", users[3], "c2", "10.0.0.7", None)]
    )
    assert not isinstance(outcome, services.SocketRefused)


def test_an_ipv6_client_is_capped_by_its_slash_64(room, make_user, settings):
    from chat import protocol

    settings.CHAT_MAX_CONNECTIONS_PER_ADDRESS = 2
    users = [make_user(f"v6user{n}") for n in range(4)]
    addresses = ["2001:db8:1:2::a", "2001:db8:1:2::b", "2001:db8:1:2:ffff::1"]
    outcomes = services.sockets_open(
        [
            services.SocketRequest("lobby", user, f"c{n}", address, None)
            for n, (user, address) in enumerate(zip(users[:3], addresses, strict=True))
        ]
        # Another /64 is another client.
        + [services.SocketRequest("lobby", users[3], "d", "2001:db8:1:3::a", None)]
    )
    refused = [getattr(o, "code", None) for o in outcomes]
    assert refused == [None, None, protocol.CLOSE_TOO_MANY_CONNECTIONS, None]
    assert set(Connection.objects.values_list("network", flat=True)) == {
        "2001:db8:1:2::/64",
        "2001:db8:1:3::/64",
    }
