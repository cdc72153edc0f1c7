"""ChatConsumer over the real ASGI stack, on the in-memory layer and on Redis."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser
from django.test import Client as HttpClient
from django.urls import re_path

from chat import protocol, services
from chat.consumers import ChatConsumer
from chat.models import Connection, Message, Room
from tests.conftest import ORIGIN, assert_event, db, post, redis_layer_config

pytestmark = pytest.mark.django_db(transaction=True)


async def assert_error(client, code: str, ref: str | None = None) -> dict:
    frame = await client.receive_type("error")
    assert frame["code"] == code, frame
    assert frame["detail"], "an error frame must say what is wrong"
    assert frame["ref"] == ref
    return frame


async def stored_bodies(room_slug: str = "lobby") -> list[str]:
    return await db(
        lambda: list(
            Message.objects.filter(room__slug=room_slug)
            .order_by("seq")
            .values_list("body", flat=True)
        )
    )


# ---------------------------------------------------------------------------
# Handshake
# ---------------------------------------------------------------------------


async def test_welcome_lists_members_and_empty_backlog(connect, alice, room):
    _, welcome = await connect(alice)
    assert_event(
        welcome,
        "welcome",
        room="lobby",
        user="alice",
        members=["alice"],
        messages=[],
        has_more=False,
    )


async def test_anonymous_socket_is_closed_with_4401(connect, room):
    client = await connect(AnonymousUser(), welcome=False)
    assert await client.receive_close() == protocol.CLOSE_NOT_SIGNED_IN


async def test_socket_without_session_is_closed_with_4401(connect, room):
    client = await connect(None, welcome=False)
    assert await client.receive_close() == protocol.CLOSE_NOT_SIGNED_IN


async def test_session_cookie_signs_the_socket_in(connect, alice, room):
    http = HttpClient()
    await db(http.force_login, alice)
    cookie = f"sessionid={http.cookies['sessionid'].value}".encode()
    _, welcome = await connect(None, headers=[ORIGIN, (b"cookie", cookie)])
    assert_event(welcome, "welcome", user="alice")


async def test_a_handshake_is_accepted_before_the_database_thread_is_free(
    connect, alice, room
):
    # Under a storm of handshakes the one database thread is busy for seconds;
    # daphne drops a socket not accepted within its accept timeout, with no
    # close code. So accepting must not wait for it: the user is read after.
    http = HttpClient()
    await db(http.force_login, alice)
    cookie = f"sessionid={http.cookies['sessionid'].value}".encode()
    started, release = threading.Event(), threading.Event()

    def hold_the_thread() -> None:
        started.set()
        release.wait(10)

    held = asyncio.ensure_future(database_sync_to_async(hold_the_thread)())
    try:
        await asyncio.wait_for(asyncio.to_thread(started.wait), 5)
        client = await connect(
            None, headers=[ORIGIN, (b"cookie", cookie)], welcome=False
        )
    finally:
        release.set()
        await held
    assert_event(await client.receive_type("welcome"), "welcome", user="alice")


async def test_a_socket_whose_session_is_signed_out_is_closed_with_4401(
    connect, alice, room
):
    http = HttpClient()
    await db(http.force_login, alice)
    cookie = f"sessionid={http.cookies['sessionid'].value}".encode()
    await db(http.logout)
    client = await connect(None, headers=[ORIGIN, (b"cookie", cookie)], welcome=False)
    assert await client.receive_close() == protocol.CLOSE_NOT_SIGNED_IN


async def test_foreign_origin_is_refused_at_the_handshake(channel_layer, alice, room):
    from chatproject.asgi import application

    communicator = WebsocketCommunicator(
        application, "/ws/chat/lobby/", headers=[(b"origin", b"http://evil.example")]
    )
    communicator.scope["user"] = alice
    connected, _ = await communicator.connect()
    assert not connected
    await communicator.disconnect()


async def test_missing_origin_is_refused(channel_layer, alice, room):
    from chatproject.asgi import application

    communicator = WebsocketCommunicator(application, "/ws/chat/lobby/")
    communicator.scope["user"] = alice
    connected, _ = await communicator.connect()
    assert not connected
    await communicator.disconnect()


@pytest.mark.parametrize(
    "name", ["UPPER", "room%0A", "-dash", "a" * 65, "caf%C3%A9", "%D9%A3"]
)
async def test_invalid_room_name_is_closed_with_4404(connect, alice, room, name):
    client = await connect(alice, room=name, welcome=False)
    assert await client.receive_close() == protocol.CLOSE_NO_SUCH_ROOM
    assert await db(Connection.objects.count) == 0


async def test_unknown_room_is_closed_with_4404(connect, alice, room):
    client = await connect(alice, room="nowhere", welcome=False)
    assert await client.receive_close() == protocol.CLOSE_NO_SUCH_ROOM


async def test_too_many_sockets_of_one_user_close_with_4429(
    connect, alice, room, settings
):
    settings.CHAT_MAX_CONNECTIONS_PER_USER = 2
    await connect(alice)
    await connect(alice)
    third = await connect(alice, welcome=False)
    assert await third.receive_close() == protocol.CLOSE_TOO_MANY_CONNECTIONS
    assert await db(Connection.objects.count) == 2


async def test_each_refusal_is_logged_with_who_where_and_why(
    connect, alice, bob, room, caplog, settings
):
    from chat import moderation

    settings.CHAT_MAX_CONNECTIONS_PER_USER = 1
    await db(moderation.user_ban, room=room, user=bob, actor=None)
    http = HttpClient()
    await db(http.force_login, alice)
    session_id = http.cookies["sessionid"].value
    cookie = f"sessionid={session_id}".encode()
    caplog.set_level("INFO", logger="chat.security")
    refused = [
        await connect(AnonymousUser(), welcome=False),
        await connect(bob, welcome=False),
        await connect(alice, "no-such-room", welcome=False),
    ]
    await connect(None, headers=[ORIGIN, (b"cookie", cookie)])
    refused.append(await connect(alice, welcome=False))  # her second: one too many
    for client in refused:
        await client.receive_close()
    lines = [r.getMessage() for r in caplog.records if r.name == "chat.security"]
    assert [line.split(" (")[1].split(")")[0] for line in lines] == [
        "not signed in",
        "banned from the room",
        "no such room",
        "too many sockets of the user or address",
    ]
    origin = ORIGIN[1].decode()
    assert all(f"origin {origin!r}" in line for line in lines), lines
    assert f"user {bob.pk}," in lines[1] and f"user {alice.pk}," in lines[3]
    assert not any(session_id in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------
# Access ends on open sockets (chat.access)
# ---------------------------------------------------------------------------


async def signed_in(connect, user, room: str = "lobby"):
    """Signs `user` in over HTTP and opens a socket on that session."""
    http = HttpClient()
    await db(http.force_login, user)
    cookie = f"sessionid={http.cookies['sessionid'].value}".encode()
    client, _ = await connect(None, room, headers=[ORIGIN, (b"cookie", cookie)])
    return http, client


async def test_logout_closes_the_sockets_of_that_session_with_4401(
    connect, alice, room
):
    http, first = await signed_in(connect, alice)
    second_tab, _ = await connect(
        None,
        headers=[ORIGIN, (b"cookie", f"sessionid={http.session.session_key}".encode())],
    )
    _, other_device = await signed_in(connect, alice)
    await db(http.logout)
    assert await first.receive_close() == protocol.CLOSE_NOT_SIGNED_IN
    assert await second_tab.receive_close() == protocol.CLOSE_NOT_SIGNED_IN
    # The other device's session was not logged out: it still chats.
    await post(other_device, "still here")


def test_a_logout_names_its_session_to_the_workers_by_a_digest_only(alice, monkeypatch):
    from chat import access
    from chat.auth import session_digest

    sent: list[tuple[int, str | None]] = []
    monkeypatch.setattr(
        access,
        "send_revoke",
        lambda user_id, session=None: sent.append((user_id, session)),
    )
    http = HttpClient()
    http.force_login(alice)
    key = http.session.session_key
    http.logout()
    assert sent == [(alice.pk, session_digest(key))]
    assert key not in sent[0][1]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(
            lambda u: (u.set_password("a-New-pass-43"), u.save()), id="password"
        ),
        pytest.param(
            lambda u: (setattr(u, "is_active", False), u.save()), id="deactivated"
        ),
        pytest.param(lambda u: u.delete(), id="deleted"),
    ],
)
async def test_a_change_that_ends_the_sign_in_closes_every_socket_with_4401(
    connect, alice, bob, room, change
):
    _, laptop = await signed_in(connect, alice)
    _, phone = await signed_in(connect, alice)
    _, bystander = await signed_in(connect, bob)
    await db(lambda: change(type(alice).objects.get(pk=alice.pk)))
    assert await laptop.receive_close() == protocol.CLOSE_NOT_SIGNED_IN
    assert await phone.receive_close() == protocol.CLOSE_NOT_SIGNED_IN
    await post(bystander, "bob is unaffected")


async def test_a_change_that_keeps_the_sign_in_keeps_the_socket(connect, alice, room):
    _, socket = await signed_in(connect, alice)

    def rename_and_sign_in_elsewhere() -> None:
        user = type(alice).objects.get(pk=alice.pk)
        user.first_name = "Alice"
        user.save()
        HttpClient().force_login(user)  # writes last_login

    await db(rename_and_sign_in_elsewhere)
    await post(socket, "still signed in")


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------


async def test_message_reaches_everyone_with_gapless_seq(connect, alice, bob, room):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    await a.wait_presence(joins=("bob",))

    first = await post(a, "hello", client_id="c-1")
    assert_event(
        first,
        "message",
        seq=1,
        user="alice",
        message="hello",
        room="lobby",
        client_id="c-1",
    )
    assert isinstance(first["id"], int) and first["ts"].endswith("Z")
    assert await b.receive() == first

    second = await post(b, "hi alice")
    assert_event(second, "message", seq=2, user="bob", client_id=None)
    assert await a.receive() == second
    assert await stored_bodies() == ["hello", "hi alice"]


async def test_a_write_rounds_messages_in_one_group_message_reach_the_socket_in_order(
    connect, alice, bob, room
):
    """Posts stored together go out as one group message (`texts`); the
    socket gets each as its own event, in seq order, the sender's own too."""
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    await a.wait_presence(joins=("bob",))
    posts = [
        services.Post(room=room, user=user, text=text)
        for user, text in ((alice, "one"), (bob, "two"), (alice, "three"))
    ]
    await database_sync_to_async(services.messages_post)(posts)
    for client in (a, b):
        got = [await client.receive() for _ in posts]
        assert [(e["seq"], e["message"]) for e in got] == [
            (1, "one"),
            (2, "two"),
            (3, "three"),
        ]


async def test_tutorial_frame_is_accepted_as_a_post(connect, alice, room):
    a, _ = await connect(alice)
    await a.send({"message": "from the tutorial"})
    assert_event(await a.receive(), "message", message="from the tutorial", seq=1)


async def test_retried_client_id_is_stored_once_and_the_room_hears_the_original(
    connect, alice, bob, room
):
    """The room may not have heard the first try (its worker died after the
    commit), so the retry is broadcast again; pages drop a seq they have."""
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    await a.wait_presence(joins=("bob",))
    original = await post(a, "once", client_id="retry-1")
    assert await b.receive() == original

    await a.send({"type": "message", "message": "once", "client_id": "retry-1"})
    assert await a.receive() == original
    assert await b.receive() == original
    assert await b.receive_nothing()
    assert await stored_bodies() == ["once"]


async def test_retry_after_reconnect_gets_the_original(connect, alice, room):
    a, _ = await connect(alice)
    original = await post(a, "sent before the drop", client_id="c-9")
    await a.close()
    again, _ = await connect(alice, query="since=1")
    await again.send(
        {"type": "message", "message": "sent before the drop", "client_id": "c-9"}
    )
    assert await again.receive() == original
    assert await stored_bodies() == ["sent before the drop"]


async def test_message_does_not_leak_to_another_room(connect, alice, bob, room):
    await db(Room.objects.create, slug="other")
    a, _ = await connect(alice)
    b, _ = await connect(bob, room="other")
    await post(a, "only for lobby")
    assert await b.receive_nothing()


async def test_message_text_is_stripped_and_stored_as_sent(connect, alice, room):
    a, _ = await connect(alice)
    frame = await post(a, "  <script>alert(1)</script>\nline two  ")
    assert frame["message"] == "<script>alert(1)</script>\nline two"


# ---------------------------------------------------------------------------
# Errors: one error frame each, and the socket stays open
# ---------------------------------------------------------------------------

ERROR_CASES = [
    ("not json", protocol.ERROR_BAD_JSON),
    ('{"type": "message", "message": NaN}', protocol.ERROR_BAD_JSON),
    ("[1, 2]", protocol.ERROR_NOT_AN_OBJECT),
    ('"just a string"', protocol.ERROR_NOT_AN_OBJECT),
    ('{"type": "dance"}', protocol.ERROR_UNKNOWN_TYPE),
    ("{}", protocol.ERROR_UNKNOWN_TYPE),
    ('{"type": "message", "message": "   "}', protocol.ERROR_EMPTY_MESSAGE),
    ('{"type": "message", "message": 42}', protocol.ERROR_INVALID_MESSAGE),
    ('{"type": "message", "message": "a\\u0000b"}', protocol.ERROR_INVALID_MESSAGE),
    ('{"type": "message", "message": "\\ud800"}', protocol.ERROR_INVALID_MESSAGE),
    (
        '{"type": "message", "message": "x", "client_id": ""}',
        protocol.ERROR_INVALID_CLIENT_ID,
    ),
    ('{"type": "history", "limit": 0}', protocol.ERROR_INVALID_FIELD),
    ('{"type": "history", "before": "7"}', protocol.ERROR_INVALID_FIELD),
    ("   ", protocol.ERROR_EMPTY_FRAME),
]


@pytest.mark.parametrize("text,code", ERROR_CASES)
async def test_bad_frame_gets_error_and_socket_stays_open(
    connect, alice, room, text, code
):
    a, _ = await connect(alice)
    await a.send_text(text)
    await assert_error(a, code)
    assert_event(await post(a, "still here"), "message", seq=1)
    assert await stored_bodies() == ["still here"]


async def test_repeated_bad_frames_close_the_socket_with_1008(
    connect, alice, room, settings
):
    settings.CHAT_BAD_FRAMES_PER_MINUTE = 3
    a, _ = await connect(alice)
    b, _ = await connect(alice)
    for _ in range(3):
        await a.send_text("{not json")
        await assert_error(a, protocol.ERROR_BAD_JSON)
    # Refused posts are not bad frames: a closed or rate-limited post is.
    assert_event(await post(a, "still here"), "message", seq=1)
    await a.send_text('{"type": "nope"}')
    await assert_error(a, protocol.ERROR_UNKNOWN_TYPE)
    assert await a.receive_close() == protocol.CLOSE_POLICY_VIOLATION
    # Only that socket: the same user's other socket goes on.
    assert_event(await b.receive_type("message"), "message", seq=1)
    assert_event(await post(b, "other socket"), "message", seq=2)
    assert await stored_bodies() == ["still here", "other socket"]


async def test_bad_frames_below_the_limit_leave_the_socket_open(
    connect, alice, room, settings
):
    settings.CHAT_BAD_FRAMES_PER_MINUTE = 3
    a, _ = await connect(alice)
    for _ in range(3):
        await a.send_text("[]")
        await assert_error(a, protocol.ERROR_NOT_AN_OBJECT)
    assert_event(await post(a, "fine"), "message", seq=1)


async def test_too_long_message_is_refused_with_its_client_id(
    connect, alice, room, settings
):
    settings.CHAT_MAX_MESSAGE_LENGTH = 10
    a, _ = await connect(alice)
    await a.send({"type": "message", "message": "x" * 11, "client_id": "long-1"})
    await assert_error(a, protocol.ERROR_MESSAGE_TOO_LONG, ref="long-1")
    assert_event(await post(a, "x" * 10), "message", seq=1)


async def test_default_length_limit_is_2000_characters(connect, alice, room):
    a, _ = await connect(alice)
    await a.send({"type": "message", "message": "y" * 2001})
    await assert_error(a, protocol.ERROR_MESSAGE_TOO_LONG)
    assert_event(await post(a, "y" * 2000), "message", seq=1)


async def test_binary_frame_gets_error_not_a_crash(connect, alice, room):
    a, _ = await connect(alice)
    await a.communicator.send_to(bytes_data=b"\x00\x01binary")
    await assert_error(a, protocol.ERROR_BINARY_FRAME)
    assert_event(await post(a, "after binary"), "message", seq=1)


async def test_empty_frames_get_errors_not_a_crash(connect, alice, room):
    a, _ = await connect(alice)
    # send_to() refuses empty data, so the ASGI events are sent as daphne would.
    await a.communicator.send_input({"type": "websocket.receive", "text": ""})
    await assert_error(a, protocol.ERROR_EMPTY_FRAME)
    await a.communicator.send_input({"type": "websocket.receive", "bytes": b""})
    await assert_error(a, protocol.ERROR_EMPTY_FRAME)
    assert_event(await post(a, "after empty"), "message", seq=1)


async def test_oversized_frame_gets_error(connect, alice, room, settings):
    settings.CHAT_MAX_FRAME_BYTES = 1024
    a, _ = await connect(alice)
    await a.send({"type": "message", "message": "z" * 2000})
    await assert_error(a, protocol.ERROR_FRAME_TOO_LARGE)


async def test_flood_is_rate_limited_and_nothing_stored_twice(
    connect, alice, room, settings
):
    settings.CHAT_RATE_MESSAGES = 3
    settings.CHAT_RATE_WINDOW_SECONDS = 60
    a, _ = await connect(alice)
    for n in range(3):
        await post(a, f"m{n}")
    await a.send({"type": "message", "message": "m3", "client_id": "flood"})
    await assert_error(a, protocol.ERROR_RATE_LIMITED, ref="flood")
    assert await stored_bodies() == ["m0", "m1", "m2"]


async def test_posting_on_over_the_rate_limit_closes_with_1008(
    connect, alice, bob, room, settings
):
    settings.CHAT_RATE_MESSAGES = 2
    settings.CHAT_RATE_WINDOW_SECONDS = 3600
    settings.CHAT_BAD_FRAMES_PER_MINUTE = 3
    a, _ = await connect(alice)
    for n in range(2):
        await post(a, f"m{n}")
    for n in range(4):
        await a.send({"type": "message", "message": "flood", "client_id": f"f{n}"})
    for n in range(4):
        await assert_error(a, protocol.ERROR_RATE_LIMITED, ref=f"f{n}")
    assert await a.receive_close() == protocol.CLOSE_POLICY_VIOLATION
    b, _ = await connect(bob)
    await post(b, "bob is fine")
    assert await stored_bodies() == ["m0", "m1", "bob is fine"]


async def rooms(*slugs: str) -> list[str]:
    """Creates rooms besides the lobby, for sockets that must not hear each other."""
    await db(lambda: [Room.objects.create(slug=slug) for slug in slugs])
    return ["lobby", *slugs]


async def stored_in_rooms() -> list[str]:
    return await db(lambda: sorted(Message.objects.values_list("body", flat=True)))


async def test_the_post_rate_limit_holds_per_user_across_sockets(
    connect, alice, bob, room, settings
):
    settings.CHAT_RATE_MESSAGES = 3
    settings.CHAT_RATE_WINDOW_SECONDS = 3600
    sockets = [(await connect(alice, slug))[0] for slug in await rooms("r1", "r2")]
    for n, socket in enumerate(sockets):
        await post(socket, f"m{n}")
    for socket in sockets:
        await socket.send({"type": "message", "message": "more", "client_id": "x"})
        await assert_error(socket, protocol.ERROR_RATE_LIMITED, ref="x")
    # Another user's budget is their own.
    b, _ = await connect(bob, "r1")
    await post(b, "bob's turn")
    assert await stored_in_rooms() == ["bob's turn", "m0", "m1", "m2"]


# ---------------------------------------------------------------------------
# Presence
# ---------------------------------------------------------------------------


async def test_join_and_leave_are_sent_as_presence_diffs(connect, alice, bob, room):
    a, _ = await connect(alice)
    await a.wait_presence(joins=("alice",))
    b, welcome = await connect(bob)
    assert welcome["members"] == ["alice", "bob"]
    assert (welcome["member_count"], welcome["members_more"]) == (2, False)
    assert_event(
        await a.receive_presence(), "presence", joins=["bob"], leaves=[], members=2
    )
    await b.close()
    assert_event(
        await a.receive_presence(), "presence", joins=[], leaves=["bob"], members=1
    )


async def test_joins_within_an_interval_are_one_diff(
    connect, make_user, room, settings
):
    settings.CHAT_PRESENCE_INTERVAL_MS = 1000
    a, _ = await connect(await db(make_user, "watcher"))
    for index in range(5):
        await connect(await db(make_user, f"user{index}"))
    diff = await a.receive_presence(timeout=3)
    assert_event(diff, "presence", members=6, leaves=[])
    assert diff["joins"] == ["user0", "user1", "user2", "user3", "user4", "watcher"]
    assert await a.presence_nothing(timeout=1.2)


async def test_a_user_who_came_and_went_within_an_interval_is_reported_gone(
    connect, alice, bob, room, settings
):
    settings.CHAT_PRESENCE_INTERVAL_MS = 500
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    await b.close()
    diff = await a.receive_presence(timeout=3)
    assert_event(diff, "presence", joins=["alice"], leaves=["bob"], members=1)


async def test_second_tab_does_not_emit_join(connect, alice, bob, room):
    a, _ = await connect(alice)
    await connect(bob)
    await a.wait_presence(joins=("bob",))
    _, welcome = await connect(bob)
    assert welcome["members"] == ["alice", "bob"]
    assert await a.presence_nothing()


async def test_leave_only_after_the_last_tab_closes(connect, alice, bob, room):
    a, _ = await connect(alice)
    b1, _ = await connect(bob)
    b2, _ = await connect(bob)
    await a.wait_presence(joins=("bob",))
    await b1.close()
    assert await a.presence_nothing()
    assert await db(Connection.objects.filter(user=bob).count) == 1
    await b2.close()
    assert_event(await a.receive_presence(), "presence", leaves=["bob"], members=1)
    assert await db(Connection.objects.filter(user=bob).count) == 0


async def test_welcome_lists_a_first_page_of_members_and_the_rest_on_request(
    connect, make_user, room, settings
):
    settings.CHAT_MEMBERS_PAGE = 2
    for name in ("carol", "alice", "bob", "dave"):
        await connect(await db(make_user, name))
    watcher, welcome = await connect(await db(make_user, "erin"))
    assert welcome["members"] == ["alice", "bob"]
    assert (welcome["member_count"], welcome["members_more"]) == (5, True)
    await watcher.send({"type": "members", "after": "bob"})
    assert_event(
        await watcher.receive(),
        "members",
        after="bob",
        members=["carol", "dave"],
        has_more=True,
    )
    await watcher.send({"type": "members", "after": "dave"})
    assert_event(await watcher.receive(), "members", members=["erin"], has_more=False)


async def test_typing_goes_to_others_not_the_typist(connect, alice, bob, room):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    await a.wait_presence(joins=("bob",))
    await a.send({"type": "typing"})
    assert_event(await b.receive(), "typing", user="alice")
    assert await a.receive_nothing()


async def test_typing_is_throttled(connect, alice, bob, room, settings):
    settings.CHAT_TYPING_INTERVAL_SECONDS = 60
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    await a.wait_presence(joins=("bob",))
    await a.send({"type": "typing"})
    await a.send({"type": "typing"})
    await b.receive_type("typing")
    assert await b.receive_nothing()


# ---------------------------------------------------------------------------
# Backlog, history, resume
# ---------------------------------------------------------------------------


async def seed(room_slug: str, count: int, author) -> None:
    from chat import services

    room_obj = await db(Room.objects.get, slug=room_slug)
    for n in range(1, count + 1):
        await db(services.message_post, room=room_obj, user=author, text=f"m{n}")


def seqs(frame: dict) -> list[int]:
    return [message["seq"] for message in frame["messages"]]


async def test_welcome_has_the_last_page_of_the_backlog(connect, alice, room, settings):
    settings.CHAT_HISTORY_PAGE = 5
    await seed("lobby", 7, alice)
    _, welcome = await connect(alice)
    assert seqs(welcome) == [3, 4, 5, 6, 7]
    assert welcome["has_more"] is True
    assert welcome["messages"][-1]["message"] == "m7"


async def test_history_pages_back_to_the_first_message(connect, alice, room, settings):
    settings.CHAT_HISTORY_PAGE = 3
    await seed("lobby", 7, alice)
    a, welcome = await connect(alice)
    assert seqs(welcome) == [5, 6, 7]
    collected = seqs(welcome)
    before = collected[0]
    while True:
        await a.send({"type": "history", "before": before, "limit": 3})
        page = await a.receive_type("history")
        assert page["before"] == before
        collected = seqs(page) + collected
        if not page["has_more"]:
            break
        before = seqs(page)[0]
    assert collected == [1, 2, 3, 4, 5, 6, 7]


async def test_since_returns_exactly_what_was_missed(connect, alice, bob, room):
    a, _ = await connect(alice)
    for n in range(3):
        await post(a, f"seen {n}")
    await a.close()
    b, _ = await connect(bob)
    for n in range(4):
        await post(b, f"missed {n}")
    again, welcome = await connect(alice, query="since=3")
    assert seqs(welcome) == [4, 5, 6, 7]
    assert [m["message"] for m in welcome["messages"]] == [
        f"missed {n}" for n in range(4)
    ]
    assert welcome["has_more"] is True
    assert await again.receive_nothing()


async def test_since_at_the_newest_seq_returns_nothing(connect, alice, room):
    await seed("lobby", 2, alice)
    _, welcome = await connect(alice, query="since=2")
    assert welcome["messages"] == []


async def test_since_too_far_back_sends_the_latest_page(connect, alice, room, settings):
    settings.CHAT_RESUME_MAX = 3
    settings.CHAT_HISTORY_PAGE = 2
    await seed("lobby", 6, alice)
    _, welcome = await connect(alice, query="since=1")
    assert seqs(welcome) == [5, 6]
    assert welcome["has_more"] is True


async def test_invalid_since_gets_error_then_a_normal_welcome(connect, alice, room):
    await seed("lobby", 1, alice)
    a = await connect(alice, query="since=-4", welcome=False)
    await assert_error(a, protocol.ERROR_INVALID_SINCE)
    welcome = await a.receive_type("welcome")
    assert seqs(welcome) == [1]


async def test_backlog_0_welcomes_with_no_messages_then_only_what_comes_next(
    connect, alice, bob, room
):
    """A bot or a ticker asks for no backlog: its welcome carries none, says
    older ones exist, and gives the newest seq to resume from."""
    await seed("lobby", 3, alice)
    ticker, welcome = await connect(alice, query="backlog=0")
    assert welcome["messages"] == [] and welcome["has_more"] is True
    assert welcome["last_seq"] == 3
    b, _ = await connect(bob)
    await post(b, "next")
    live = await ticker.receive_type("message")
    assert live["seq"] == 4 and live["message"] == "next"
    _, resumed = await connect(alice, query=f"since={welcome['last_seq']}")
    assert seqs(resumed) == [4]


async def test_backlog_n_keeps_the_latest_n_and_since_wins_over_it(
    connect, alice, room
):
    await seed("lobby", 3, alice)
    _, welcome = await connect(alice, query="backlog=2")
    assert seqs(welcome) == [2, 3] and welcome["has_more"] is True
    _, welcome = await connect(alice, query="backlog=5")
    assert seqs(welcome) == [1, 2, 3] and welcome["has_more"] is False
    _, welcome = await connect(alice, query="since=1&backlog=0")
    assert seqs(welcome) == [2, 3]


async def test_backlog_0_in_an_empty_room_says_nothing_is_older(connect, alice, room):
    _, welcome = await connect(alice, query="backlog=0")
    assert welcome["messages"] == [] and welcome["has_more"] is False
    assert welcome["last_seq"] == 0


@pytest.mark.parametrize("value", ["-1", "x", "51", ""])
async def test_invalid_backlog_gets_error_then_a_normal_welcome(
    connect, alice, room, settings, value
):
    settings.CHAT_HISTORY_PAGE = 50
    await seed("lobby", 1, alice)
    a = await connect(alice, query=f"backlog={value}", welcome=False)
    if value == "":
        # An empty value is no value: an ordinary welcome, no error.
        welcome = await a.receive_type("welcome")
    else:
        await assert_error(a, protocol.ERROR_INVALID_BACKLOG)
        welcome = await a.receive_type("welcome")
    assert seqs(welcome) == [1]


async def test_welcome_costs_the_same_queries_for_any_backlog(alice, room):
    """Query-count guard: the welcome must not cost a query per message."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from chat import services

    def welcome_queries() -> tuple[int, int]:
        with CaptureQueriesContext(connection) as queries:
            welcome = services.room_welcome(
                room=room, user=alice, since=None, page_size=50, resume_max=500
            )
        return len(queries), len(welcome["messages"])

    empty_queries, _ = await db(welcome_queries)
    await seed("lobby", 60, alice)
    assert await db(welcome_queries) == (empty_queries, 50)


# ---------------------------------------------------------------------------
# Fan-out across two channel-layer instances (what separate workers do)
# ---------------------------------------------------------------------------


class SecondWorker:
    """A second worker in this process: its own layer instance on the same Redis."""

    ALIAS = "second"

    def __init__(self, connect) -> None:
        from channels.security.websocket import AllowedHostsOriginValidator

        from chat.auth import SocketAuthStack

        self._connect = connect
        self.clients: list = []
        self.application = AllowedHostsOriginValidator(
            SocketAuthStack(
                URLRouter(
                    [
                        re_path(
                            r"^ws/chat/(?P<room>[^/]+)/$",
                            ChatConsumer.as_asgi(channel_layer_alias=self.ALIAS),
                        )
                    ]
                )
            )
        )

    @property
    def layer(self):
        return get_channel_layer(self.ALIAS)

    async def connect(self, user, **kwargs):
        """Opens a socket served by this worker (its consumer uses its layer)."""
        client, welcome = await self._connect(user, app=self.application, **kwargs)
        self.clients.append(client)
        return client, welcome

    @contextmanager
    def sending(self) -> Iterator[list[str]]:
        """While inside, what the app sends (its broadcasts) leaves through this
        worker's layer instance, as it would from a process of its own.

        Yields the groups sent to that way (by group_send, or by the worker's
        sender's group_send_many; a group may be listed twice).
        """
        from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers

        layer, default = self.layer, channel_layers[DEFAULT_CHANNEL_LAYER]
        group_send, group_send_many = layer.group_send, layer.group_send_many
        sent: list[str] = []

        async def recorded(group: str, message: dict) -> None:
            sent.append(group)
            await group_send(group, message)

        async def recorded_many(sends: list) -> None:
            sent.extend(group for group, _ in sends)
            await group_send_many(sends)

        layer.group_send, layer.group_send_many = recorded, recorded_many
        channel_layers.backends[DEFAULT_CHANNEL_LAYER] = layer
        try:
            yield sent
        finally:
            channel_layers.backends[DEFAULT_CHANNEL_LAYER] = default
            del layer.group_send, layer.group_send_many


@pytest.fixture
async def second_worker(connect, settings, redis_server) -> AsyncIterator[SecondWorker]:
    """A second worker; its sockets are closed and its layer flushed in teardown."""
    settings.CHANNEL_LAYERS = {
        "default": redis_layer_config(redis_server.url),
        SecondWorker.ALIAS: redis_layer_config(redis_server.url),
    }
    worker = SecondWorker(connect)
    yield worker
    # Before the layer closes: a socket's disconnect still leaves its groups.
    for client in worker.clients:
        await client.close()
    await worker.layer.flush()
    await worker.layer.close_pools()


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
async def test_two_layer_instances_on_one_redis_fan_out(
    connect, second_worker, alice, bob, room
):
    a, _ = await connect(alice)
    b, _ = await second_worker.connect(bob)
    await a.wait_presence(joins=("bob",))

    with second_worker.sending() as sent:
        from_b = await post(b, "from the second worker")
    assert protocol.room_group_name("lobby") in sent
    assert await a.receive() == from_b
    from_a = await post(a, "from the first worker")
    assert await b.receive() == from_a
    assert (from_a["seq"], from_b["seq"]) == (2, 1)


async def test_reading_on_one_worker_reaches_the_users_socket_on_another(
    connect, second_worker, alice, bob, room
):
    here, _ = await connect(alice)
    there, _ = await second_worker.connect(alice)
    writer, _ = await connect(bob)
    await post(writer, "read me")
    for client in (here, there):
        assert (await client.receive_type("message"))["seq"] == 1
    with second_worker.sending() as sent:
        await there.send({"type": "read", "seq": 1})
        for client in (there, here):
            assert_event(await client.receive_type("read"), "read", room="lobby", seq=1)
    assert protocol.user_group_name(alice.pk) in sent


async def test_the_post_rate_limit_is_shared_by_the_workers(
    connect, second_worker, alice, room, settings
):
    settings.CHAT_RATE_MESSAGES = 2
    settings.CHAT_RATE_WINDOW_SECONDS = 3600
    lobby, other = await rooms("r1")
    here, _ = await connect(alice, lobby)
    there, _ = await second_worker.connect(alice, room=other)
    await post(here, "one")
    await post(there, "two")
    for socket in (here, there):
        await socket.send({"type": "message", "message": "three", "client_id": "c"})
        await assert_error(socket, protocol.ERROR_RATE_LIMITED, ref="c")
    assert await stored_in_rooms() == ["one", "two"]
