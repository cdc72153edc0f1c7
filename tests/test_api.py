"""The HTTP API (chat/api.py): publish, push, read, authentication, rate limit, errors.

Every response a test gets through `Api` (tests/conftest.py) is checked against
docs/openapi.json by openapi-core; tests/test_openapi.py checks the spec itself.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any
from urllib.parse import unquote

import pytest
import redis
from django.test import AsyncClient, Client
from django.urls import resolve, reverse

from chat import api as chat_api
from chat import moderation, protocol, services, tokens
from chat.models import ApiToken, Message, Room
from chatproject.settings import caches_from_env
from tests.conftest import (
    LOBBY_MESSAGES,
    ROOMS,
    SPEC,
    Api,
    assert_error,
    assert_event,
    db,
)

# Each test gets its own, empty rate counters (the `api` fixture brings them too).
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fresh_rate_counters")]


def stored(room_slug: str = "lobby") -> list[tuple[str, str, str | None]]:
    return list(
        Message.objects.filter(room__slug=room_slug)
        .order_by("seq")
        .values_list("author", "body", "client_id")
    )


def spec_template(path: str) -> str:
    """Returns the spec's path template for an API path, from its route."""
    match = resolve(path.split("?", 1)[0])
    kwargs = {name: f"{{{name}}}" for name in match.kwargs}
    route = unquote(reverse(f"api:{match.url_name}", kwargs=kwargs))
    return route.removesuffix("/") + "/"  # the slash is optional


# ---------------------------------------------------------------------------
# Publish
# ---------------------------------------------------------------------------


def test_publish_stores_the_message_and_answers_201_with_it(api, publisher, room):
    response = api.post(
        LOBBY_MESSAGES, {"message": "  build 7 passed "}, token=publisher
    )
    assert response.status_code == 201
    body = response.json()
    message = Message.objects.get()
    assert body == services.message_event(message, room_slug="lobby")
    assert_event(
        body, "message", room="lobby", user="alice", message="build 7 passed",
        seq=1, client_id=None,
    )  # fmt: skip
    assert message.user.username == "alice"


def test_publish_shows_the_tokens_author_name(api, make_token, room):
    raw = make_token(can_publish=True, author_name="CI bot")
    response = api.post(LOBBY_MESSAGES, {"message": "hi"}, token=raw)
    assert response.json()["user"] == "CI bot"
    assert stored() == [("CI bot", "hi", None)]


def test_repeated_client_id_answers_200_with_the_first_message(api, publisher, room):
    data = {"message": "deploy done", "client_id": "deploy-42"}
    first = api.post(LOBBY_MESSAGES, data, token=publisher)
    again = api.post(LOBBY_MESSAGES, {**data, "message": "other"}, token=publisher)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert stored() == [("alice", "deploy done", "deploy-42")]


def test_publish_without_trailing_slash_works_too(api, publisher, room):
    response = api.post(LOBBY_MESSAGES.rstrip("/"), {"message": "x"}, token=publisher)
    assert response.status_code == 201


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({}, chat_api.ERROR_MISSING_FIELD),
        ({"client_id": "x"}, chat_api.ERROR_MISSING_FIELD),
        ({"message": "   "}, protocol.ERROR_EMPTY_MESSAGE),
        ({"message": "x" * 11}, protocol.ERROR_MESSAGE_TOO_LONG),
        ({"message": 42}, protocol.ERROR_INVALID_MESSAGE),
        ({"message": None}, protocol.ERROR_INVALID_MESSAGE),
        ({"message": "a\x00b"}, protocol.ERROR_INVALID_MESSAGE),
        ({"message": "a\ud800b"}, protocol.ERROR_INVALID_MESSAGE),
        ({"message": "hi", "client_id": "has space"}, protocol.ERROR_INVALID_CLIENT_ID),
        ({"message": "hi", "client_id": "x" * 65}, protocol.ERROR_INVALID_CLIENT_ID),
        ({"message": "hi", "client_id": 7}, protocol.ERROR_INVALID_CLIENT_ID),
        ([{"message": "hi"}], protocol.ERROR_NOT_AN_OBJECT),
        ("hi", protocol.ERROR_NOT_AN_OBJECT),
    ],
)
def test_publish_applies_the_sockets_rules(api, publisher, room, settings, data, code):
    settings.CHAT_MAX_MESSAGE_LENGTH = 10
    assert_error(api.post(LOBBY_MESSAGES, data, token=publisher), 400, code)
    assert stored() == []


def test_newlines_and_tabs_are_text(api, publisher, room):
    response = api.post(LOBBY_MESSAGES, {"message": "a\n\tb"}, token=publisher)
    assert response.json()["message"] == "a\n\tb"


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b" ",
        b'{"message": NaN}',
        b'{"message": "a", "message": "b"}',
        b'{"message": "caf\xe9"}',  # Latin-1, not UTF-8
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_bad_json_is_400(api, publisher, room, settings, body):
    settings.CHAT_API_MAX_BODY_BYTES = 1_000_000
    response = api.post(LOBBY_MESSAGES, body=body, token=publisher)
    assert_error(response, 400, protocol.ERROR_BAD_JSON)


def test_body_over_the_limit_is_413(api, publisher, room, settings):
    settings.CHAT_API_MAX_BODY_BYTES = 100
    data = {"message": "x" * 50}
    assert api.post(LOBBY_MESSAGES, data, token=publisher).status_code == 201
    data = {"message": "x" * 100}
    response = api.post(LOBBY_MESSAGES, data, token=publisher)
    assert_error(response, 413, chat_api.ERROR_BODY_TOO_LARGE)
    assert len(stored()) == 1


def test_body_limit_holds_without_a_content_length(rf, settings):
    """Under ASGI the body may come without Content-Length: the bytes read count."""
    settings.CHAT_API_MAX_BODY_BYTES = 100
    body = json.dumps({"message": "x" * 200})
    request = rf.post(LOBBY_MESSAGES, data=body, content_type="application/json")
    del request.META["CONTENT_LENGTH"]
    with pytest.raises(chat_api.ApiError) as refused:
        chat_api.read_json_object(request)
    assert refused.value.status == 413


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-www-form-urlencoded",
        "text/plain",
        "application/json; charset=latin-1",
        "multipart/form-data; boundary=x",
    ],
)
def test_body_that_is_not_json_is_415(api, publisher, room, content_type):
    response = api.post(
        LOBBY_MESSAGES, body="message=hi", content_type=content_type, token=publisher
    )
    assert_error(response, 415, chat_api.ERROR_UNSUPPORTED_MEDIA_TYPE)


def test_json_with_utf8_charset_is_accepted(api, publisher, room):
    response = api.post(
        LOBBY_MESSAGES,
        {"message": "héllo ✓"},
        content_type="application/json; charset=UTF-8",
        token=publisher,
    )
    assert response.status_code == 201
    assert response.json()["message"] == "héllo ✓"


def test_publish_into_an_unknown_room_is_404(api, publisher, room):
    for path in ("/api/rooms/nowhere/messages/", "/api/rooms/Not%20A%20Slug/messages/"):
        assert_error(
            api.post(path, {"message": "x"}, token=publisher), 404, "unknown_room"
        )


def test_publish_into_a_closed_room_is_409(api, publisher, room):
    Room.objects.filter(pk=room.pk).update(is_closed=True)
    response = api.post(LOBBY_MESSAGES, {"message": "x"}, token=publisher)
    assert_error(response, 409, protocol.ERROR_ROOM_CLOSED)
    assert stored() == []


def test_publish_needs_the_publish_scope(api, make_token, room):
    raw = make_token(can_push=True, push_to=ApiToken.PUSH_TO_ANYONE)
    response = api.post(LOBBY_MESSAGES, {"message": "x"}, token=raw)
    assert_error(response, 403, tokens.FORBIDDEN_SCOPE)
    assert 'error="insufficient_scope"' in response["WWW-Authenticate"]


def test_room_restricted_token_publishes_only_in_its_room(api, make_token, room):
    other = Room.objects.create(slug="other")
    raw = make_token(can_publish=True, room=other)
    assert (
        api.post("/api/rooms/other/messages/", {"message": "x"}, token=raw).status_code
        == 201
    )
    for slug in ("lobby", "nowhere"):
        response = api.post(f"/api/rooms/{slug}/messages/", {"message": "x"}, token=raw)
        assert_error(response, 403, tokens.FORBIDDEN_ROOM)
    assert stored() == []


@pytest.mark.django_db(transaction=True)
async def test_publish_reaches_the_sockets_in_the_room(
    connect, alice, bob, room, make_token
):
    """On the in-memory layer and on Redis: the page sees the API's message."""
    raw = await db(make_token, can_publish=True, author_name="CI")
    bob_client, _ = await connect(bob)
    elsewhere = await db(Room.objects.create, slug="elsewhere")
    alice_elsewhere, _ = await connect(alice, elsewhere.slug)
    response = await Api(AsyncClient()).arequest(
        "post",
        LOBBY_MESSAGES,
        token=raw,
        data={"message": "from CI", "client_id": "c1"},
    )
    assert response.status_code == 201
    frame = await bob_client.receive_type("message")
    assert frame == response.json()
    assert_event(frame, "message", user="CI", message="from CI", client_id="c1")
    assert await alice_elsewhere.receive_nothing()
    # A retried publish is answered with the original, which the room hears
    # again (the first broadcast may never have gone out).
    again = await Api(AsyncClient()).arequest(
        "post",
        LOBBY_MESSAGES,
        token=raw,
        data={"message": "from CI", "client_id": "c1"},
    )
    assert again.status_code == 200
    assert await bob_client.receive_type("message") == again.json() == frame
    assert await bob_client.receive_nothing()


def test_timestamps_in_responses_are_utc(api, publisher, room):
    ts = api.post(LOBBY_MESSAGES, {"message": "x"}, token=publisher).json()["ts"]
    assert (
        datetime.fromisoformat(ts.replace("Z", "+00:00")).utcoffset().total_seconds()
        == 0
    )


# ---------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_push_reaches_every_socket_of_the_user_and_no_one_else(
    connect, alice, bob, room, make_token
):
    raw = await db(make_token, can_push=True, push_to=ApiToken.PUSH_TO_ANYONE)
    other = await db(Room.objects.create, slug="other")
    bob_lobby, _ = await connect(bob)
    alice_lobby, _ = await connect(alice)
    await bob_lobby.wait_presence(joins=("alice",))
    alice_other, _ = await connect(alice, other.slug)

    data = {"event": "build.finished", "data": {"id": 7, "ok": True, "tags": ["a"]}}
    response = await Api(AsyncClient()).arequest(
        "post", "/api/users/alice/push/", token=raw, data=data
    )
    assert response.status_code == 202
    assert response.json() == {"sockets": 2}
    for socket in (alice_lobby, alice_other):
        assert_event(
            await socket.receive(), "push", event="build.finished", data=data["data"]
        )
    assert await bob_lobby.receive_nothing()


def test_push_to_a_user_with_no_socket_reaches_none(api, make_token, bob):
    raw = make_token(can_push=True, push_to=ApiToken.PUSH_TO_ANYONE)
    response = api.post("/api/users/bob/push/", {"event": "ping"}, token=raw)
    assert response.status_code == 202
    assert response.json() == {"sockets": 0}


@pytest.mark.parametrize(
    "data", [None, 0, "text", [1, {"a": None}], {"deep": {"x": 1}}]
)
def test_push_data_may_be_any_json(api, make_token, bob, data):
    raw = make_token(can_push=True, push_to=ApiToken.PUSH_TO_ANYONE)
    response = api.post("/api/users/bob/push/", {"event": "e", "data": data}, token=raw)
    assert response.status_code == 202


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({}, chat_api.ERROR_MISSING_FIELD),
        ({"data": 1}, chat_api.ERROR_MISSING_FIELD),
        ({"event": ""}, protocol.ERROR_INVALID_FIELD),
        ({"event": "has space"}, protocol.ERROR_INVALID_FIELD),
        ({"event": "x" * 65}, protocol.ERROR_INVALID_FIELD),
        ({"event": 5}, protocol.ERROR_INVALID_FIELD),
        ([], protocol.ERROR_NOT_AN_OBJECT),
    ],
)
def test_push_refuses_bad_fields(api, make_token, bob, data, code):
    raw = make_token(can_push=True, push_to=ApiToken.PUSH_TO_ANYONE)
    assert_error(api.post("/api/users/bob/push/", data, token=raw), 400, code)


def test_push_to_an_unknown_or_disabled_user_is_404(api, make_token, make_user):
    raw = make_token(can_push=True, push_to=ApiToken.PUSH_TO_ANYONE)
    make_user("gone", is_active=False)
    for name in ("nobody", "gone"):
        response = api.post(f"/api/users/{name}/push/", {"event": "e"}, token=raw)
        assert_error(response, 404, chat_api.ERROR_UNKNOWN_USER)


def test_push_needs_the_push_scope(api, make_token, bob):
    raw = make_token(can_publish=True)
    response = api.post("/api/users/bob/push/", {"event": "e"}, token=raw)
    assert_error(response, 403, tokens.FORBIDDEN_SCOPE)


def test_a_new_push_token_reaches_its_owner_only(api, make_token, bob):
    raw = make_token(can_push=True)  # alice's, with the default reach
    own = api.post("/api/users/alice/push/", {"event": "e"}, token=raw)
    assert own.status_code == 202, own.content
    # Another user, or a name no one has: the same answer, so a restricted
    # token cannot tell which names exist.
    for name in ("bob", "nobody"):
        response = api.post(f"/api/users/{name}/push/", {"event": "e"}, token=raw)
        assert_error(response, 403, tokens.FORBIDDEN_USER)


def test_a_push_token_restricted_to_listed_users_reaches_those_only(
    api, make_token, bob, make_user
):
    carol = make_user("carol")
    raw = make_token(
        can_push=True, push_to=ApiToken.PUSH_TO_LISTED, push_users=[bob, carol]
    )
    for name in ("bob", "carol"):
        response = api.post(f"/api/users/{name}/push/", {"event": "e"}, token=raw)
        assert response.status_code == 202, response.content
    for name in ("alice", "nobody"):  # not even its owner, unless listed
        response = api.post(f"/api/users/{name}/push/", {"event": "e"}, token=raw)
        assert_error(response, 403, tokens.FORBIDDEN_USER)


def test_a_push_token_for_anyone_reaches_any_user(api, make_token, bob):
    raw = make_token(can_push=True, push_to=ApiToken.PUSH_TO_ANYONE)
    response = api.post("/api/users/bob/push/", {"event": "e"}, token=raw)
    assert response.status_code == 202, response.content


# ---------------------------------------------------------------------------
# Read
# ---------------------------------------------------------------------------


def post_many(room: Room, user, count: int) -> None:
    for number in range(1, count + 1):
        services.message_post(room=room, user=user, text=f"m{number}")


def seqs(response) -> list[int]:
    return [message["seq"] for message in response.json()["messages"]]


def test_rooms_lists_online_count_and_last_activity(api, make_token, alice, room):
    from chat import presence

    raw = make_token()
    quiet = Room.objects.create(slug="quiet")
    services.message_post(room=room, user=alice, text="hi")
    presence.connection_open(room=room, user=alice, channel_name="c1", max_per_user=5)
    response = api.get(ROOMS, token=raw)
    assert response.status_code == 200
    rooms = response.json()["rooms"]
    by_name = {entry["room"]: entry for entry in rooms}
    assert rooms[0]["room"] == "lobby"  # most recently active first
    assert by_name["lobby"]["online"] == 1
    assert by_name["quiet"]["online"] == 0
    room.refresh_from_db()
    assert by_name["lobby"]["last_activity"] == protocol.format_timestamp(
        room.last_message_at
    )
    assert by_name["quiet"]["last_activity"] == protocol.format_timestamp(
        quiet.created_at
    )


def test_messages_without_since_are_the_newest_page(api, make_token, alice, room):
    raw = make_token()
    post_many(room, alice, 5)
    response = api.get(f"{LOBBY_MESSAGES}?limit=3", token=raw)
    assert seqs(response) == [3, 4, 5]
    assert response.json()["has_more"] is False
    assert response.json()["next_since"] == 5


def test_polling_with_since_pages_forward_without_gaps(api, make_token, alice, room):
    raw = make_token()
    post_many(room, alice, 5)
    first = api.get(f"{LOBBY_MESSAGES}?since=0&limit=2", token=raw).json()
    assert [m["seq"] for m in first["messages"]] == [1, 2]
    assert (first["has_more"], first["next_since"]) == (True, 2)
    second = api.get(f"{LOBBY_MESSAGES}?since=2&limit=3", token=raw).json()
    assert [m["seq"] for m in second["messages"]] == [3, 4, 5]
    assert (second["has_more"], second["next_since"]) == (False, 5)
    idle = api.get(f"{LOBBY_MESSAGES}?since=5", token=raw).json()
    assert (idle["messages"], idle["has_more"], idle["next_since"]) == ([], False, 5)


def test_polled_messages_are_the_message_events(api, make_token, alice, room):
    raw = make_token()
    message, _ = services.message_post(room=room, user=alice, text="x", client_id="k")
    response = api.get(f"{LOBBY_MESSAGES}?since=0", token=raw)
    assert response.json()["messages"] == [
        services.message_event(message, room_slug="lobby")
    ]


def test_deleted_messages_are_not_polled(api, make_token, alice, room):
    from django.utils import timezone

    raw = make_token()
    post_many(room, alice, 3)
    Message.objects.filter(seq=2).update(deleted_at=timezone.now())
    assert seqs(api.get(f"{LOBBY_MESSAGES}?since=0", token=raw)) == [1, 3]


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("since=-1", protocol.ERROR_INVALID_SINCE),
        ("since=abc", protocol.ERROR_INVALID_SINCE),
        ("since=%D9%A3", protocol.ERROR_INVALID_SINCE),  # Arabic-Indic three
        ("limit=0", protocol.ERROR_INVALID_FIELD),
        ("limit=201", protocol.ERROR_INVALID_FIELD),
        ("limit=ten", protocol.ERROR_INVALID_FIELD),
    ],
)
def test_bad_query_parameters_are_400(api, make_token, room, query, code):
    raw = make_token()
    assert_error(api.get(f"{LOBBY_MESSAGES}?{query}", token=raw), 400, code)


def test_a_banned_owners_token_can_neither_read_nor_post_that_room(
    api, publisher, room, alice, bob, make_token
):
    services.message_post(room=room, user=bob, text="before the ban")
    ban = moderation.user_ban(room=room, user=alice, actor=bob, reason="spam")
    assert_error(api.get(LOBBY_MESSAGES, token=publisher), 403, chat_api.ERROR_BANNED)
    refused = api.post(LOBBY_MESSAGES, {"message": "sneaky"}, token=publisher)
    assert_error(refused, 403, chat_api.ERROR_BANNED)
    assert list(Message.objects.values_list("body", flat=True)) == ["before the ban"]
    # Only alice's own tokens, only in that room, only while the ban lasts.
    bobs = make_token(owner=bob, can_publish=True)
    assert api.post(LOBBY_MESSAGES, {"message": "hi"}, token=bobs).status_code == 201
    Room.objects.create(slug="elsewhere")
    elsewhere = "/api/rooms/elsewhere/messages/"
    assert api.post(elsewhere, {"message": "hi"}, token=publisher).status_code == 201
    moderation.ban_lift(ban=ban, actor=bob)
    assert api.get(LOBBY_MESSAGES, token=publisher).status_code == 200


def test_reading_an_unknown_room_is_404(api, make_token, room):
    raw = make_token()
    response = api.get("/api/rooms/nowhere/messages/", token=raw)
    assert_error(response, 404, chat_api.ERROR_UNKNOWN_ROOM)


def test_a_closed_room_can_still_be_read(api, make_token, alice, room):
    raw = make_token()
    post_many(room, alice, 1)
    Room.objects.filter(pk=room.pk).update(is_closed=True)
    assert seqs(api.get(LOBBY_MESSAGES, token=raw)) == [1]


def test_room_restricted_token_reads_only_its_room(api, make_token, room):
    Room.objects.create(slug="other")
    raw = make_token(can_publish=True, room=room)
    assert [r["room"] for r in api.get(ROOMS, token=raw).json()["rooms"]] == ["lobby"]
    assert api.get(LOBBY_MESSAGES, token=raw).status_code == 200
    response = api.get("/api/rooms/other/messages/", token=raw)
    assert_error(response, 403, tokens.FORBIDDEN_ROOM)


def test_any_live_token_reads_every_room(api, make_token, room):
    Room.objects.create(slug="other")
    raw = make_token()  # no scope at all
    assert {r["room"] for r in api.get(ROOMS, token=raw).json()["rooms"]} >= {
        "lobby",
        "other",
    }
    assert api.get("/api/rooms/other/messages/", token=raw).status_code == 200


# ---------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------


def test_authenticate_marks_the_token_used(api, alice, make_token):
    raw = make_token()
    assert ApiToken.objects.get().last_used_at is None
    assert api.get(ROOMS, token=raw).status_code == 200
    assert ApiToken.objects.get().last_used_at is not None


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic YWxpY2U6c2VjcmV0",
        "Token abc",
        "Bearer a b",
    ],
)
def test_request_without_a_bearer_token_is_401(api, room, header):
    headers = {} if header is None else {"Authorization": header}
    for response in (
        api.get(ROOMS, headers=headers),
        api.post(LOBBY_MESSAGES, {"message": "x"}, headers=headers),
        api.post("/api/users/alice/push/", {"event": "e"}, headers=headers),
    ):
        assert_error(response, 401, chat_api.ERROR_MISSING_TOKEN)
        assert response["WWW-Authenticate"] == 'Bearer realm="chat"'


def test_unknown_token_is_401(api, room, publisher):
    response = api.post(LOBBY_MESSAGES, {"message": "x"}, token=publisher + "x")
    assert_error(response, 401, chat_api.ERROR_INVALID_TOKEN)
    assert 'error="invalid_token"' in response["WWW-Authenticate"]


def test_bearer_scheme_is_case_insensitive(api, room, publisher):
    response = api.get(ROOMS, headers={"Authorization": f"bearer {publisher}"})
    assert response.status_code == 200


def test_revoked_token_is_refused(api, alice, room):
    token, raw = tokens.api_token_create(owner=alice, name="ci", can_publish=True)
    assert api.post(LOBBY_MESSAGES, {"message": "before"}, token=raw).status_code == 201
    tokens.api_token_revoke(token=token)
    response = api.post(LOBBY_MESSAGES, {"message": "after"}, token=raw)
    body = assert_error(response, 401, chat_api.ERROR_INVALID_TOKEN)
    assert "revoked" in body["detail"]
    assert_error(api.get(ROOMS, token=raw), 401, chat_api.ERROR_INVALID_TOKEN)
    assert stored() == [("alice", "before", None)]


def test_token_of_a_disabled_account_is_refused(api, alice, room, publisher):
    alice.is_active = False
    alice.save()
    assert_error(api.get(ROOMS, token=publisher), 401, chat_api.ERROR_INVALID_TOKEN)


def test_session_cookie_does_not_authenticate_the_api(client, alice, room):
    """CSRF is off for the API, so a session must not be enough to post."""
    client.force_login(alice)
    response = Api(client).post(LOBBY_MESSAGES, {"message": "x"})
    assert_error(response, 401, chat_api.ERROR_MISSING_TOKEN)


# ---------------------------------------------------------------------------
# CSRF
# ---------------------------------------------------------------------------


def test_api_needs_no_csrf_token(publisher, room):
    api_client = Api(Client(enforce_csrf_checks=True))
    response = api_client.post(LOBBY_MESSAGES, {"message": "x"}, token=publisher)
    assert response.status_code == 201


def test_csrf_is_still_enforced_on_the_lobby_form(alice):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(alice)
    response = browser.post("/chat/", {"name": "sneaky"})
    assert response.status_code == 403
    assert not Room.objects.filter(slug="sneaky").exists()


# ---------------------------------------------------------------------------
# Rate limit
# ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["locmem", "redis"])
def rate_cache(request, settings) -> str:
    """Runs a rate-limit test on LocMem and on Redis (what a cluster uses)."""
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        settings.CACHES = caches_from_env(server.url)
        client = redis.Redis.from_url(server.url)
        # Token ids repeat from test to test: start from no counters.
        for key in client.scan_iter("chat:*api-rate*"):
            client.delete(key)
        client.close()
    return request.param


def test_rate_limit_is_reached_and_recovers(
    api, make_token, room, settings, monkeypatch, rate_cache, redis_server
):
    settings.CHAT_API_RATE_REQUESTS = 3
    settings.CHAT_API_RATE_WINDOW_SECONDS = 10
    clock = FakeClock(1_000_003.5)  # 3.5 s into a 10-second window
    monkeypatch.setattr(tokens, "clock", clock)
    raw, other = make_token(), make_token()

    for _ in range(3):
        assert api.get(ROOMS, token=raw).status_code == 200
    limited = api.get(ROOMS, token=raw)
    assert_error(limited, 429, protocol.ERROR_RATE_LIMITED)
    assert limited["Retry-After"] == "7"  # 6.5 s, rounded up
    # Every endpoint shares the budget, and a refused post stores nothing...
    assert api.post(LOBBY_MESSAGES, {"message": "x"}, token=raw).status_code == 429
    assert stored() == []
    # ...but each token has its own.
    assert api.get(ROOMS, token=other).status_code == 200

    clock.now += 6.5  # the next window
    assert api.get(ROOMS, token=raw).status_code == 200
    if rate_cache == "redis":
        # The counter is in Redis, where every worker sees it.
        client = redis.Redis.from_url(redis_server.url)
        assert list(client.scan_iter("chat:*api-rate*"))
        client.close()


def test_rate_limit_zero_turns_it_off(api, make_token, settings, monkeypatch):
    settings.CHAT_API_RATE_REQUESTS = 0
    raw = make_token()
    assert all(api.get(ROOMS, token=raw).status_code == 200 for _ in range(5))


def test_rate_limit_fails_open_when_the_cache_is_down(
    api, make_token, settings, caplog
):
    """A dead cache must not take the API down: requests pass, and it is logged."""
    settings.CACHES = caches_from_env("redis://127.0.0.1:1/0")  # nothing listens
    settings.CHAT_API_RATE_REQUESTS = 1
    raw = make_token()
    with caplog.at_level(logging.ERROR, logger="chat.tokens"):
        assert api.get(ROOMS, token=raw).status_code == 200
        assert api.get(ROOMS, token=raw).status_code == 200
    assert "rate-limit cache unavailable" in caplog.text


# ---------------------------------------------------------------------------
# Methods, unknown paths, server errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "method"),
    [
        (ROOMS, "post"),
        (ROOMS, "delete"),
        (LOBBY_MESSAGES, "put"),
        (LOBBY_MESSAGES, "patch"),
        ("/api/users/bob/push/", "get"),
        ("/api/users/bob/push/", "delete"),
    ],
)
def test_wrong_method_is_405_with_allow(api, path, method, room):
    response = api.request(method, path)
    assert_error(response, 405, chat_api.ERROR_METHOD_NOT_ALLOWED)
    documented = {
        m.upper() for m in SPEC["paths"][spec_template(path)] if m != "parameters"
    }
    assert set(response["Allow"].split(", ")) == documented


@pytest.mark.parametrize(
    "path", ["/api", "/api/", "/api/nope", "/api/rooms/lobby/", "/api/users/"]
)
@pytest.mark.parametrize("method", ["get", "post"])
def test_unknown_api_path_is_a_json_404(api, path, method, publisher):
    response = api.request(method, path, token=publisher, data={"message": "x"})
    assert_error(response, 404, chat_api.ERROR_NOT_FOUND)


@pytest.mark.parametrize("debug", [False, True])
def test_a_bad_host_gets_a_json_400_under_api_and_stores_nothing(
    settings, debug, room, publisher
):
    settings.DEBUG = debug
    client = Client(HTTP_HOST="evil.example")
    headers = {"HTTP_AUTHORIZATION": f"Bearer {publisher}"}
    for response in (
        client.get(ROOMS, **headers),
        client.post(
            LOBBY_MESSAGES, {"message": "x"}, content_type="application/json", **headers
        ),
        client.post("/api", {}, content_type="application/json"),
    ):
        assert response["Content-Type"] == "application/json"
        assert_error(response, 400, chat_api.ERROR_BAD_REQUEST)
    assert Message.objects.count() == 0
    # The pages keep Django's own answer.
    page = client.get("/chat/")
    assert page.status_code == 400
    assert page["Content-Type"].startswith("text/html")


def test_unexpected_error_is_a_json_500_without_details(
    api, publisher, room, monkeypatch, caplog
):
    def broken(**kwargs: Any):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(services, "message_post", broken)
    with caplog.at_level(logging.ERROR, logger="chat.api"):
        response = api.post(LOBBY_MESSAGES, {"message": "x"}, token=publisher)
    assert_error(response, 500, chat_api.ERROR_SERVER_ERROR)
    assert b"secret internals" not in response.content
    assert b"Traceback" not in response.content
    assert "secret internals" in caplog.text  # the server log has it


def test_a_database_that_does_not_answer_is_a_503_with_retry_after(
    api, publisher, room, monkeypatch
):
    from django.db import OperationalError

    def locked(**kwargs: Any):
        raise OperationalError("database is locked")

    monkeypatch.setattr(services, "message_post", locked)
    response = api.post(LOBBY_MESSAGES, {"message": "x"}, token=publisher)
    assert_error(response, 503, protocol.ERROR_UNAVAILABLE)
    assert response["Retry-After"] == "5"
    assert not Message.objects.exists()
