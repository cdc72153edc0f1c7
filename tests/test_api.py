"""The HTTP API: every endpoint and error, checked against docs/openapi.json.

Every response a test gets through `Api` is checked against the spec (status
documented, body valid for its schema, documented headers present), and
test_every_documented_status_is_produced makes each documented status happen.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import redis
from django.core.cache import caches
from django.core.management import CommandError, call_command
from django.test import AsyncClient, Client
from django.urls import reverse

from chat import api as chat_api
from chat import api_urls, protocol, services, tokens
from chat.models import ApiToken, Message, Room
from chatproject.settings import caches_from_env, channel_layers_from_env
from tests.conftest import assert_event, db, free_port

pytestmark = pytest.mark.django_db

DOCS = Path(__file__).resolve().parent.parent / "docs"
SPEC = json.loads((DOCS / "openapi.json").read_text())
API_DOC = (DOCS / "api.md").read_text()
README = (Path(__file__).resolve().parent.parent / "README.md").read_text()

ROOMS = "/api/rooms/"
LOBBY_MESSAGES = "/api/rooms/lobby/messages/"
NOTHING = object()


# ---------------------------------------------------------------------------
# A tiny JSON Schema checker: the subset docs/openapi.json uses, no more
# ---------------------------------------------------------------------------

SCHEMA_KEYWORDS = {
    "$ref", "type", "properties", "required", "additionalProperties", "items",
    "enum", "const", "minimum", "maximum", "format", "pattern", "description",
}  # fmt: skip
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    """Follows a local $ref ("#/components/...") to what it names."""
    while "$ref" in node:
        target: Any = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def schema_errors(schema: dict[str, Any], value: Any, where: str = "$") -> list[str]:
    """Returns what is wrong with `value` under `schema` (empty when it is valid)."""
    schema = resolve(schema)
    unknown = set(schema) - SCHEMA_KEYWORDS
    assert not unknown, f"the checker does not know {unknown} (at {where})"
    if "const" in schema and value != schema["const"]:
        return [f"{where}: {value!r} is not {schema['const']!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} is not one of {schema['enum']}"]
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(TYPES[kind](value) for kind in types):
            return [f"{where}: {value!r} is not of type {types}"]
    errors: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [
            f"{where}: {name!r} is missing"
            for name in schema.get("required", [])
            if name not in value
        ]
        if schema.get("additionalProperties") is False:
            errors += [
                f"{where}: {name!r} is not in the schema"
                for name in value
                if name not in properties
            ]
        for name, sub in properties.items():
            if name in value:
                errors += schema_errors(sub, value[name], f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += schema_errors(schema["items"], item, f"{where}[{index}]")
    if TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: {value} > {schema['maximum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if schema.get("format") == "date-time" and not TIMESTAMP.fullmatch(value):
            errors.append(f"{where}: {value!r} is not a date-time")
    return errors


def spec_operations() -> list[tuple[str, str]]:
    """Returns (method, path template) for every operation in the spec."""
    return [
        (method, path)
        for path, item in SPEC["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    ]


def spec_template(path: str) -> str | None:
    """Returns the spec's path template that `path` matches, or None."""
    path = path.split("?", 1)[0]
    for template in SPEC["paths"]:
        pattern = re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(template))
        # The API takes its paths with or without the trailing slash.
        if re.fullmatch(pattern.removesuffix("/") + "/?", path):
            return template
    return None


def check_against_spec(method: str, path: str, response) -> None:
    """Fails unless the response is JSON the spec documents for this call."""
    assert response["Content-Type"] == "application/json", response.content[:200]
    data = json.loads(response.content)
    template = spec_template(path)
    operation = SPEC["paths"].get(template, {}).get(method.lower())
    if operation is None:
        # Not an operation of the spec: only a JSON 404 or 405 may come back.
        assert response.status_code in (404, 405), response.status_code
        assert not schema_errors({"$ref": "#/components/schemas/Error"}, data)
        return
    status = str(response.status_code)
    assert status in operation["responses"], (
        f"{method.upper()} {template} answered {status}, which docs/openapi.json "
        f"does not document: {data}"
    )
    documented = resolve(operation["responses"][status])
    schema = documented["content"]["application/json"]["schema"]
    errors = schema_errors(schema, data)
    assert not errors, f"{method.upper()} {path} {status}: {errors}"
    for header in documented.get("headers", {}):
        assert response.has_header(header), f"{status} without {header}"


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_rate_counters(settings) -> None:
    """Each test gets its own, empty per-process cache for the rate counters."""
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "test-api",
        }
    }
    caches["default"].clear()


class Api:
    """Calls the API through Django's test client; every answer is spec-checked."""

    def __init__(self, client: Client | AsyncClient) -> None:
        self.client = client

    def _args(
        self,
        token: str | None,
        data: Any,
        body: bytes | str | None,
        content_type: str,
        headers: dict[str, str] | None,
    ) -> dict[str, Any]:
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if body is None and data is not NOTHING:
            body = json.dumps(data)
        kwargs: dict[str, Any] = {"headers": headers}
        if body is not None:
            kwargs.update(data=body, content_type=content_type)
        return kwargs

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        data: Any = NOTHING,
        body: bytes | str | None = None,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ):
        args = self._args(token, data, body, content_type, headers)
        response = self.client.generic(method.upper(), path, **args)
        check_against_spec(method, path, response)
        return response

    async def arequest(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        data: Any = NOTHING,
        content_type: str = "application/json",
    ):
        args = self._args(token, data, None, content_type, None)
        response = await self.client.generic(method.upper(), path, **args)
        check_against_spec(method, path, response)
        return response

    def get(self, path: str, **kwargs: Any):
        return self.request("get", path, **kwargs)

    def post(self, path: str, data: Any = NOTHING, **kwargs: Any):
        return self.request("post", path, data=data, **kwargs)


@pytest.fixture
def api(client) -> Api:
    return Api(client)


@pytest.fixture
def make_token(alice) -> Callable[..., str]:
    """Returns make(owner=alice, **fields) -> the raw token of a new ApiToken."""

    def make(owner=None, **fields: Any) -> str:
        _, raw = tokens.api_token_create(
            owner=owner or alice, name=fields.pop("name", "test"), **fields
        )
        return raw

    return make


@pytest.fixture
def publisher(make_token, room) -> str:
    return make_token(can_publish=True, can_push=True)


def assert_error(response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["error"] == code, body
    assert body["detail"], "an error must say what is wrong"
    return body


def stored(room_slug: str = "lobby") -> list[tuple[str, str, str | None]]:
    return list(
        Message.objects.filter(room__slug=room_slug)
        .order_by("seq")
        .values_list("author", "body", "client_id")
    )


# ---------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------


def test_only_the_hash_and_a_prefix_of_a_token_are_stored(alice):
    token, raw = tokens.api_token_create(owner=alice, name="ci", can_publish=True)
    assert raw.startswith(tokens.TOKEN_MARK) and len(raw) > 40
    token.refresh_from_db()
    assert token.token_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert token.prefix == raw[:12]
    stored_values = [str(getattr(token, f.attname)) for f in ApiToken._meta.fields]
    assert raw not in stored_values


def test_two_tokens_never_share_a_secret(alice):
    _, first = tokens.api_token_create(owner=alice, name="a")
    _, second = tokens.api_token_create(owner=alice, name="b")
    assert first != second


def test_authenticate_marks_the_token_used(api, alice, make_token):
    raw = make_token()
    assert ApiToken.objects.get().last_used_at is None
    assert api.get(ROOMS, token=raw).status_code == 200
    assert ApiToken.objects.get().last_used_at is not None


def test_revoke_is_once_and_for_good(alice):
    token, raw = tokens.api_token_create(owner=alice, name="ci")
    assert tokens.api_token_revoke(token=token) is True
    assert tokens.api_token_revoke(token=token) is False
    with pytest.raises(tokens.InvalidToken):
        tokens.api_token_authenticate(raw=raw)


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
    raw = make_token(can_push=True)
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
    # A retried publish is answered, not broadcast again.
    again = await Api(AsyncClient()).arequest(
        "post",
        LOBBY_MESSAGES,
        token=raw,
        data={"message": "from CI", "client_id": "c1"},
    )
    assert again.status_code == 200
    assert await bob_client.receive_nothing()


# ---------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_push_reaches_every_socket_of_the_user_and_no_one_else(
    connect, alice, bob, room, make_token
):
    raw = await db(make_token, can_push=True)
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
    raw = make_token(can_push=True)
    response = api.post("/api/users/bob/push/", {"event": "ping"}, token=raw)
    assert response.status_code == 202
    assert response.json() == {"sockets": 0}


@pytest.mark.parametrize(
    "data", [None, 0, "text", [1, {"a": None}], {"deep": {"x": 1}}]
)
def test_push_data_may_be_any_json(api, make_token, bob, data):
    raw = make_token(can_push=True)
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
    raw = make_token(can_push=True)
    assert_error(api.post("/api/users/bob/push/", data, token=raw), 400, code)


def test_push_to_an_unknown_or_disabled_user_is_404(api, make_token, make_user):
    raw = make_token(can_push=True)
    make_user("gone", is_active=False)
    for name in ("nobody", "gone"):
        response = api.post(f"/api/users/{name}/push/", {"event": "e"}, token=raw)
        assert_error(response, 404, chat_api.ERROR_UNKNOWN_USER)


def test_push_needs_the_push_scope(api, make_token, bob):
    raw = make_token(can_publish=True)
    response = api.post("/api/users/bob/push/", {"event": "e"}, token=raw)
    assert_error(response, 403, tokens.FORBIDDEN_SCOPE)


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


def test_the_cache_follows_redis_url():
    assert caches_from_env(None)["default"]["BACKEND"].endswith("LocMemCache")
    assert caches_from_env(" ")["default"]["BACKEND"].endswith("LocMemCache")
    cache = caches_from_env("redis://a:6379/0, redis://b:6379/0")["default"]
    assert cache["BACKEND"] == "django.core.cache.backends.redis.RedisCache"
    assert cache["LOCATION"] == "redis://a:6379/0"


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
    "path", ["/api/", "/api/nope", "/api/rooms/lobby/", "/api/users/"]
)
@pytest.mark.parametrize("method", ["get", "post"])
def test_unknown_api_path_is_a_json_404(api, path, method, publisher):
    response = api.request(method, path, token=publisher, data={"message": "x"})
    assert_error(response, 404, chat_api.ERROR_NOT_FOUND)


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


# ---------------------------------------------------------------------------
# Every documented status happens (docs/openapi.json ↔ real responses)
# ---------------------------------------------------------------------------


@dataclass
class World:
    api: Api
    settings: Any
    monkeypatch: pytest.MonkeyPatch
    room: Room
    full: str  # publish + push, any room
    reader: str  # no scope
    restricted: str  # publish, in room "other" only


def broken(name: str, call: Callable[[World], Any]) -> Callable[[World], Any]:
    def scenario(world: World):
        def fail(*args: Any, **kwargs: Any):
            raise RuntimeError("boom")

        world.monkeypatch.setattr(services, name, fail)
        return call(world)

    return scenario


def limited(call: Callable[[World], Any]) -> Callable[[World], Any]:
    def scenario(world: World):
        world.settings.CHAT_API_RATE_REQUESTS = 1
        world.settings.CHAT_API_RATE_WINDOW_SECONDS = 3600
        world.monkeypatch.setattr(tokens, "clock", lambda: 1_000_000.0)
        call(world)
        return call(world)

    return scenario


def layer_down(call: Callable[[World], Any]) -> Callable[[World], Any]:
    def scenario(world: World):
        dead = f"redis://127.0.0.1:{free_port()}/0"
        world.settings.CHANNEL_LAYERS = channel_layers_from_env(dead)
        return call(world)

    return scenario


def twice(call: Callable[[World], Any]) -> Callable[[World], Any]:
    def scenario(world: World):
        call(world)
        return call(world)

    return scenario


def closed(call: Callable[[World], Any]) -> Callable[[World], Any]:
    def scenario(world: World):
        Room.objects.filter(pk=world.room.pk).update(is_closed=True)
        return call(world)

    return scenario


def posts(path: str, data: Any = NOTHING, token: str = "full", **kwargs: Any):
    return lambda w: w.api.post(path, data, token=getattr(w, token, token), **kwargs)


def gets(path: str, token: str = "full"):
    return lambda w: w.api.get(path, token=getattr(w, token, token))


PUSH = "/api/users/bob/push/"
GET_ROOMS, GET_MESSAGES = ("get", "/api/rooms/"), ("get", "/api/rooms/{room}/messages/")
POST_MESSAGES = ("post", "/api/rooms/{room}/messages/")
POST_PUSH = ("post", "/api/users/{username}/push/")
MSG = {"message": "hi", "client_id": "once"}
SINCE_1, TEXT = LOBBY_MESSAGES + "?since=1", "text/plain"

SCENARIOS: dict[tuple[str, str, str], Callable[[World], Any]] = {
    (*GET_ROOMS, "200"): gets(ROOMS, "reader"),
    (*GET_ROOMS, "401"): gets(ROOMS, "not-a-token"),
    (*GET_ROOMS, "429"): limited(gets(ROOMS)),
    (*GET_ROOMS, "500"): broken("room_list", gets(ROOMS)),
    (*GET_MESSAGES, "200"): gets(LOBBY_MESSAGES + "?since=0&limit=5", "reader"),
    (*GET_MESSAGES, "400"): gets(LOBBY_MESSAGES + "?limit=0"),
    (*GET_MESSAGES, "401"): gets(LOBBY_MESSAGES, "not-a-token"),
    (*GET_MESSAGES, "403"): gets(LOBBY_MESSAGES, "restricted"),
    (*GET_MESSAGES, "404"): gets("/api/rooms/nowhere/messages/"),
    (*GET_MESSAGES, "429"): limited(gets(LOBBY_MESSAGES)),
    (*GET_MESSAGES, "500"): broken("room_messages_after", gets(SINCE_1)),
    (*POST_MESSAGES, "200"): twice(posts(LOBBY_MESSAGES, MSG)),
    (*POST_MESSAGES, "201"): posts(LOBBY_MESSAGES, MSG),
    (*POST_MESSAGES, "400"): posts(LOBBY_MESSAGES, {"message": ""}),
    (*POST_MESSAGES, "401"): posts(LOBBY_MESSAGES, MSG, "not-a-token"),
    (*POST_MESSAGES, "403"): posts(LOBBY_MESSAGES, MSG, "reader"),
    (*POST_MESSAGES, "404"): posts("/api/rooms/nowhere/messages/", MSG),
    (*POST_MESSAGES, "409"): closed(posts(LOBBY_MESSAGES, MSG)),
    (*POST_MESSAGES, "413"): posts(LOBBY_MESSAGES, {"message": "x" * 70_000}),
    (*POST_MESSAGES, "415"): posts(LOBBY_MESSAGES, body="m=1", content_type=TEXT),
    (*POST_MESSAGES, "429"): limited(posts(LOBBY_MESSAGES, MSG)),
    (*POST_MESSAGES, "500"): broken("message_post", posts(LOBBY_MESSAGES, MSG)),
    (*POST_PUSH, "202"): posts(PUSH, {"event": "e", "data": [1]}),
    (*POST_PUSH, "400"): posts(PUSH, {"data": 1}),
    (*POST_PUSH, "401"): posts(PUSH, {"event": "e"}, "not-a-token"),
    (*POST_PUSH, "403"): posts(PUSH, {"event": "e"}, "reader"),
    (*POST_PUSH, "404"): posts("/api/users/nobody/push/", {"event": "e"}),
    (*POST_PUSH, "413"): posts(PUSH, {"event": "e", "data": "x" * 70_000}),
    (*POST_PUSH, "415"): posts(PUSH, body="event=e", content_type=TEXT),
    (*POST_PUSH, "429"): limited(posts(PUSH, {"event": "e"})),
    (*POST_PUSH, "500"): broken("user_push", posts(PUSH, {"event": "e"})),
    (*POST_PUSH, "503"): layer_down(posts(PUSH, {"event": "e"})),
}  # fmt: skip


def documented_statuses() -> list[tuple[str, str, str]]:
    return [
        (method, path, status)
        for method, path in spec_operations()
        for status in SPEC["paths"][path][method]["responses"]
    ]


@pytest.fixture
def world(api, make_token, alice, bob, room, settings, monkeypatch) -> World:
    services.message_post(room=room, user=alice, text="hello")
    other = Room.objects.create(slug="other")
    return World(
        api=api,
        settings=settings,
        monkeypatch=monkeypatch,
        room=room,
        full=make_token(can_publish=True, can_push=True),
        reader=make_token(),
        restricted=make_token(can_publish=True, room=other),
    )


@pytest.mark.parametrize(
    ("method", "path", "status"),
    documented_statuses(),
    ids=[f"{m.upper()} {p} {s}" for m, p, s in documented_statuses()],
)
def test_every_documented_status_is_produced(world, method, path, status):
    scenario = SCENARIOS.get((method, path, status))
    assert scenario, f"no test makes {method.upper()} {path} answer {status}"
    response = scenario(world)  # Api checks the body against the spec
    assert str(response.status_code) == status, response.content


def test_every_scenario_is_documented():
    assert set(SCENARIOS) == set(documented_statuses())


def test_every_api_route_is_in_the_spec():
    routes = set()
    for pattern in api_urls.urlpatterns:
        if pattern.name == "not-found":
            continue
        kwargs = {name: f"{{{name}}}" for name in pattern.pattern.regex.groupindex}
        path = unquote(reverse(f"api:{pattern.name}", kwargs=kwargs))
        routes.add(path.removesuffix("/") + "/")  # the slash is optional
    assert routes == set(SPEC["paths"])


def test_error_codes_in_the_spec_are_the_codes_of_the_api():
    documented = SPEC["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
    assert set(documented) == set(chat_api.ERROR_STATUS)


def test_spec_patterns_and_limits_match_the_code(settings):
    schemas = SPEC["components"]["schemas"]
    client_id = schemas["PublishRequest"]["properties"]["client_id"]["pattern"]
    assert client_id == f"^{protocol.CLIENT_ID_PATTERN.pattern}$"
    event = schemas["PushRequest"]["properties"]["event"]["pattern"]
    assert event == f"^{chat_api.EVENT_NAME_PATTERN.pattern}$"
    room = SPEC["components"]["parameters"]["room"]["schema"]["pattern"]
    assert room == f"^{protocol.ROOM_NAME_PATTERN.pattern}$"
    limit = SPEC["components"]["parameters"]["limit"]["schema"]
    assert limit["maximum"] == settings.CHAT_HISTORY_MAX


def test_spec_examples_are_valid():
    def examples(node: Any):
        if isinstance(node, dict):
            if "schema" in node and "example" in node:
                yield node["schema"], node["example"]
            for value in node.values():
                yield from examples(value)
        elif isinstance(node, list):
            for value in node:
                yield from examples(value)

    found = list(examples(SPEC))
    assert found
    for schema, example in found:
        assert not schema_errors(schema, example), example


# ---------------------------------------------------------------------------
# docs/api.md and the README
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(chat_api.ERROR_STATUS))
def test_every_error_code_is_in_the_api_doc(code):
    status = chat_api.ERROR_STATUS[code]
    assert f"| `{code}` | {status} |" in API_DOC, f"{code} ({status}) is not in api.md"


@pytest.mark.parametrize(("method", "path"), spec_operations())
def test_every_endpoint_has_a_curl_example(method, path):
    pattern = (
        re.escape(path)
        .replace(r"\{room\}", "[a-z0-9_-]+")
        .replace(r"\{username\}", "[A-Za-z0-9_.@+-]+")
    )
    curls = [line for line in API_DOC.splitlines() if line.startswith("curl ")]
    assert any(re.search(pattern, line) for line in curls), path
    if method == "post":
        assert any(re.search(pattern, line) and " -d " in line for line in curls)


def test_api_settings_are_in_the_readme(settings):
    for name in dir(settings):
        if name.startswith("CHAT_API_"):
            assert f"`{name}`" in README


def test_readme_has_a_one_line_curl_that_publishes():
    section = README.split("## HTTP API", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^curl .*-d .*/api/rooms/[a-z0-9_-]+/messages/", section, re.M)


# ---------------------------------------------------------------------------
# manage.py create_api_token
# ---------------------------------------------------------------------------


def run_command(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("create_api_token", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_command_prints_a_working_token_once(alice, room):
    out, err = run_command(
        "--owner", "alice", "--name", "ci", "--publish", "--push",
        "--room", "lobby", "--author", "CI bot",
    )  # fmt: skip
    raw = out.strip()
    token = tokens.api_token_authenticate(raw=raw)
    assert (token.name, token.owner, token.room, token.author_name) == (
        "ci", alice, room, "CI bot",
    )  # fmt: skip
    assert token.can_publish and token.can_push
    assert raw not in err and token.prefix in err


def test_command_defaults_to_a_read_only_token(alice):
    out, err = run_command("--owner", "alice", "--name", "dashboard")
    token = tokens.api_token_authenticate(raw=out.strip())
    assert not token.can_publish and not token.can_push and token.room is None
    assert "read only" in err


@pytest.mark.parametrize(
    "args",
    [
        ("--owner", "nobody", "--name", "x"),
        ("--owner", "alice", "--name", "x", "--room", "nowhere"),
        ("--owner", "alice", "--name", "x" * 101),
    ],
)
def test_command_refuses_bad_arguments(alice, args):
    with pytest.raises(CommandError):
        run_command(*args)
    assert not ApiToken.objects.exists()


# ---------------------------------------------------------------------------
# Admin
# ---------------------------------------------------------------------------


@pytest.fixture
def admin_client(client, make_user) -> Client:
    client.force_login(make_user("root", is_staff=True, is_superuser=True))
    return client


def test_admin_add_shows_the_raw_token_once(admin_client, alice, room, api):
    response = admin_client.post(
        "/admin/chat/apitoken/add/",
        {"name": "ci", "owner": alice.pk, "can_publish": "on", "author_name": ""},
        follow=True,
    )
    assert response.status_code == 200
    token = ApiToken.objects.get()
    notes = [str(m) for m in response.context["messages"]]
    raws = re.findall(r"chat_[A-Za-z0-9_-]{43}", " ".join(notes))
    assert len(raws) == 1, notes
    assert token.token_hash == tokens.token_hash(raws[0])
    assert api.post(LOBBY_MESSAGES, {"message": "x"}, token=raws[0]).status_code == 201
    # Shown once: pages after that show the prefix, never the token or its hash.
    for page in ("/admin/chat/apitoken/", f"/admin/chat/apitoken/{token.pk}/change/"):
        html = admin_client.get(page).content.decode()
        assert token.prefix in html
        assert raws[0] not in html and token.token_hash not in html


def test_admin_revoke_action(admin_client, alice, api):
    token, raw = tokens.api_token_create(owner=alice, name="ci")
    response = admin_client.post(
        "/admin/chat/apitoken/",
        {"action": "revoke_tokens", "_selected_action": [token.pk]},
    )
    assert response.status_code == 302
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert_error(api.get(ROOMS, token=raw), 401, chat_api.ERROR_INVALID_TOKEN)


def test_timestamps_in_responses_are_utc(api, publisher, room):
    ts = api.post(LOBBY_MESSAGES, {"message": "x"}, token=publisher).json()["ts"]
    assert (
        datetime.fromisoformat(ts.replace("Z", "+00:00")).utcoffset().total_seconds()
        == 0
    )
