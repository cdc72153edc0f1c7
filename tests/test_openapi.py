"""docs/openapi.json: a valid OpenAPI document, true to the code, every status real.

The responses of every test through `Api` are checked against the spec by
openapi-core (tests/conftest.py: assert_documented); here each documented
status is made to happen, and the checker is shown to refuse what the spec
does not say.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pytest
from django.db import OperationalError
from django.urls import reverse
from openapi_spec_validator import validate as validate_spec
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from chat import api as chat_api
from chat import api_urls, protocol, reading, services, tokens
from chat.models import ApiToken, Room
from chatproject.settings import channel_layers_from_env
from tests.conftest import (
    LOBBY_MESSAGES,
    NOTHING,
    ROOMS,
    SPEC,
    Api,
    assert_documented,
    free_port,
    spec_operations,
    spec_schema,
)

pytestmark = pytest.mark.django_db


# ---------------------------------------------------------------------------
# The document itself
# ---------------------------------------------------------------------------


def test_the_spec_is_a_valid_openapi_document():
    validate_spec(SPEC)


def test_the_spec_validator_refuses_a_broken_document():
    broken = copy.deepcopy(SPEC)
    del broken["paths"]["/api/rooms/"]["get"]["responses"]
    broken["components"]["schemas"]["Error"]["type"] = "strnig"
    with pytest.raises(OpenAPIValidationError):
        validate_spec(broken)


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


def broken(
    name: str, call: Callable[[World], Any], module: Any = services
) -> Callable[[World], Any]:
    def scenario(world: World):
        def fail(*args: Any, **kwargs: Any):
            raise RuntimeError("boom")

        world.monkeypatch.setattr(module, name, fail)
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


def database_down(
    name: str, call: Callable[[World], Any], module: Any = services
) -> Callable[[World], Any]:
    def scenario(world: World):
        def locked(*args: Any, **kwargs: Any):
            raise OperationalError("database is locked")

        world.monkeypatch.setattr(module, name, locked)
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
POST_READ = ("post", "/api/rooms/{room}/read/")
READ, READ_1 = LOBBY_MESSAGES.replace("/messages/", "/read/"), {"seq": 1}
MSG = {"message": "hi", "client_id": "once"}
SINCE_1, TEXT = LOBBY_MESSAGES + "?since=1", "text/plain"

SCENARIOS: dict[tuple[str, str, str], Callable[[World], Any]] = {
    (*GET_ROOMS, "200"): gets(ROOMS, "reader"),
    (*GET_ROOMS, "401"): gets(ROOMS, "not-a-token"),
    (*GET_ROOMS, "429"): limited(gets(ROOMS)),
    (*GET_ROOMS, "500"): broken("room_list", gets(ROOMS)),
    (*GET_ROOMS, "503"): database_down("room_list", gets(ROOMS)),
    (*GET_MESSAGES, "200"): gets(LOBBY_MESSAGES + "?since=0&limit=5", "reader"),
    (*GET_MESSAGES, "400"): gets(LOBBY_MESSAGES + "?limit=0"),
    (*GET_MESSAGES, "401"): gets(LOBBY_MESSAGES, "not-a-token"),
    (*GET_MESSAGES, "403"): gets(LOBBY_MESSAGES, "restricted"),
    (*GET_MESSAGES, "404"): gets("/api/rooms/nowhere/messages/"),
    (*GET_MESSAGES, "429"): limited(gets(LOBBY_MESSAGES)),
    (*GET_MESSAGES, "500"): broken("room_messages_after", gets(SINCE_1)),
    (*GET_MESSAGES, "503"): database_down("room_messages_after", gets(SINCE_1)),
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
    (*POST_MESSAGES, "503"): database_down("message_post", posts(LOBBY_MESSAGES, MSG)),
    (*POST_READ, "200"): posts(READ, READ_1, "reader"),
    (*POST_READ, "400"): posts(READ, {"seq": 0}),
    (*POST_READ, "401"): posts(READ, READ_1, "not-a-token"),
    (*POST_READ, "403"): posts(READ, READ_1, "restricted"),
    (*POST_READ, "404"): posts("/api/rooms/nowhere/read/", READ_1),
    (*POST_READ, "413"): posts(READ, {"seq": 1, "pad": "x" * 70_000}),
    (*POST_READ, "415"): posts(READ, body="seq=1", content_type=TEXT),
    (*POST_READ, "429"): limited(posts(READ, READ_1)),
    (*POST_READ, "500"): broken("read_advance", posts(READ, READ_1), reading),
    (*POST_READ, "503"): database_down("read_advance", posts(READ, READ_1), reading),
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
        full=make_token(
            can_publish=True, can_push=True, push_to=ApiToken.PUSH_TO_ANYONE
        ),
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


def schemas_with_examples(node: Any, pointer: str = "") -> Iterator[tuple[str, Any]]:
    """Yields (JSON pointer of a schema, example) for every example in the spec."""
    if isinstance(node, dict):
        if "schema" in node and "example" in node:
            yield f"{pointer}/schema", node["example"]
        for key, value in node.items():
            escaped = str(key).replace("~", "~0").replace("/", "~1")
            yield from schemas_with_examples(value, f"{pointer}/{escaped}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from schemas_with_examples(value, f"{pointer}/{index}")


def test_spec_examples_are_valid():
    found = list(schemas_with_examples(SPEC))
    assert found
    for pointer, example in found:
        errors = [error.message for error in spec_schema(pointer).iter_errors(example)]
        assert not errors, f"the example at {pointer}: {errors}"


# ---------------------------------------------------------------------------
# The response check refuses what the spec does not say
# ---------------------------------------------------------------------------


def edit_body(response, change: Callable[[dict[str, Any]], Any]) -> None:
    body = json.loads(response.content)
    change(body)
    response.content = json.dumps(body).encode()


def set_field(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda body: body.__setitem__(name, value)


def drop_field(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda body: body.pop(name)


def set_status(status: int) -> Callable[[Any], None]:
    return lambda response: setattr(response, "status_code", status)


# Requests: (method, path, with a token).
PUBLISH = ("post", LOBBY_MESSAGES, True)
NO_TOKEN = ("get", ROOMS, False)
UNKNOWN_ROOM = ("get", "/api/rooms/nowhere/messages/", True)
UNKNOWN_PATH = ("get", "/api/nope", True)
HTML = ("Content-Type", "text/html")
# Each response passes the check as it comes, and must not once tampered with.
TAMPERINGS: dict[str, tuple[tuple[str, str, bool], Callable[[Any], None]]] = {
    "extra field": (PUBLISH, lambda r: edit_body(r, set_field("extra", 1))),
    "missing field": (PUBLISH, lambda r: edit_body(r, drop_field("ts"))),
    "wrong type": (PUBLISH, lambda r: edit_body(r, set_field("seq", "1"))),
    "below minimum": (PUBLISH, lambda r: edit_body(r, set_field("seq", 0))),
    "not a date-time": (PUBLISH, lambda r: edit_body(r, set_field("ts", "today"))),
    "not json": (PUBLISH, lambda r: setattr(r, "content", b"<p>created</p>")),
    "html": (PUBLISH, lambda r: r.headers.__setitem__(*HTML)),
    "undocumented status": (PUBLISH, set_status(418)),
    "missing header": (NO_TOKEN, lambda r: r.headers.pop("WWW-Authenticate")),
    "unknown error code": (
        UNKNOWN_ROOM, lambda r: edit_body(r, set_field("error", "gone_fishing")),
    ),
    "no detail": (UNKNOWN_ROOM, lambda r: edit_body(r, drop_field("detail"))),
    "unknown path answering 200": (UNKNOWN_PATH, set_status(200)),
    "unknown path answering html": (
        UNKNOWN_PATH, lambda r: r.headers.__setitem__(*HTML),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_the_response_check_refuses_what_the_spec_does_not_document(
    client, make_token, room, case
):
    (method, path, signed), tamper = TAMPERINGS[case]
    raw = make_token(can_publish=True, can_push=True, push_to=ApiToken.PUSH_TO_ANYONE)
    headers = {"Authorization": f"Bearer {raw}"} if signed else {}
    data = {"data": json.dumps({"message": "hi"}), "content_type": "application/json"}
    response = client.generic(
        method.upper(), path, headers=headers, **(data if method == "post" else {})
    )
    assert_documented(response)
    tamper(response)
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        assert_documented(response)
