"""Shared fixtures: a real redis-server, users and rooms, WebSocket communicators,
and the HTTP API's test client, whose every answer is checked against the spec.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.core.cache import caches
from django.test import AsyncClient, override_settings
from django.test import Client as HttpClient
from openapi_core import Config, OpenAPI
from openapi_core.contrib.django import DjangoOpenAPIRequest, DjangoOpenAPIResponse
from openapi_core.exceptions import OpenAPIError
from openapi_core.templating.paths.exceptions import OperationNotFound, PathNotFound
from openapi_schema_validator import OAS31Validator, oas31_format_checker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from chat import tokens
from chat.models import ApiToken, Room
from harness.client import EventReader
from harness.processes import RedisServer, free_port  # noqa: F401 (tests import them)

RECEIVE_TIMEOUT = 3

# A test that hangs ends the run with its id and its pending tasks.
pytest_plugins = ["tests.hang_watch"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, with no persistence."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


# Parametrized fixtures whose "redis" case asks for `redis_server`.
REDIS_PARAMETRIZED = ("channel_layer", "rate_cache")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks `redis` each test that starts a redis-server, so that `make unit`
    (`-m "not redis"`) runs the rest without one.
    """
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        if "redis_server" in getattr(item, "fixturenames", ()) or any(
            params.get(name) == "redis" for name in REDIS_PARAMETRIZED
        ):
            item.add_marker(pytest.mark.redis)


def redis_layer_config(url: str) -> dict[str, Any]:
    from chatproject.settings import channel_layers_from_env

    return channel_layers_from_env(url)["default"]


@pytest.fixture(params=["memory", "redis"])
async def channel_layer(request, settings) -> AsyncIterator[str]:
    """Runs a test on the in-memory layer and on channels_redis with a real Redis."""
    if request.param == "memory":
        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "chat.hub.InMemoryHubLayer"}}
    else:
        server = request.getfixturevalue("redis_server")
        settings.CHANNEL_LAYERS = {"default": redis_layer_config(server.url)}
    yield request.param
    layer = get_channel_layer()
    await layer.flush()
    if hasattr(layer, "close_pools"):
        await layer.close_pools()


# ---------------------------------------------------------------------------
# Users and rooms
# ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def presence_diffs(settings) -> Iterator[None]:
    """Presence diffs start empty in every test and come quickly; the worker's
    lease starts unheld (each test's database starts without its row)."""
    from chat import presence

    settings.CHAT_PRESENCE_INTERVAL_MS = 50
    presence.diffs.reset()
    presence.lease_forget()
    yield
    presence.diffs.reset()
    presence.lease_forget()


@pytest.fixture(scope="session", autouse=True)
def static_files_without_collectstatic(tmp_path_factory) -> Iterator[None]:
    """Pages render in the test process, which never ran collectstatic.

    pytest-django turns DEBUG off, and then the manifest storage refuses every
    {% static %} it has no manifest for (and WhiteNoise warns of a missing
    STATIC_ROOT); tests/browser/test_static.py checks the real one in a worker.
    """
    from django.conf import settings

    plain = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}
    with override_settings(
        STORAGES={**settings.STORAGES, "staticfiles": plain},
        STATIC_ROOT=tmp_path_factory.mktemp("static"),
    ):
        yield


@pytest.fixture(autouse=True)
def fast_password_hashing(settings) -> None:
    # Test users need a password, not a costly hash of it.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def make_user(db):
    def make(username: str, **extra: Any):
        return get_user_model().objects.create_user(
            username=username, password="a-Secret-pass-42", **extra
        )

    return make


@pytest.fixture
def alice(make_user):
    return make_user("alice")


@pytest.fixture
def bob(make_user):
    return make_user("bob")


@pytest.fixture
def room(db) -> Room:
    return Room.objects.create(slug="lobby")


# ---------------------------------------------------------------------------
# WebSocket communicators
# ---------------------------------------------------------------------------

ORIGIN = (b"origin", b"http://127.0.0.1")


class Client(EventReader):
    """A WebsocketCommunicator connected as one user, read as EventReader reads
    (presence diffs kept apart, so tests of other frames need not know when a
    diff falls between them)."""

    def __init__(self, communicator: WebsocketCommunicator) -> None:
        super().__init__()
        self.communicator = communicator
        self.closed = False

    async def send(self, frame: dict[str, Any]) -> None:
        await self.communicator.send_json_to(frame)

    async def send_text(self, text: str) -> None:
        await self.communicator.send_to(text_data=text)

    async def _recv(self, timeout: float) -> str:
        return await self.communicator.receive_from(timeout=timeout)

    async def receive_nothing(self, timeout: float = 0.3) -> bool:
        """True when no frame but presence diffs arrives within `timeout`."""
        while not await self.communicator.receive_nothing(timeout=timeout):
            await self._read(RECEIVE_TIMEOUT)
        return not self.frames

    async def presence_nothing(self, timeout: float = 0.3) -> bool:
        """True when no presence diff arrives within `timeout` (others are kept)."""
        while not await self.communicator.receive_nothing(timeout=timeout):
            await self._read(RECEIVE_TIMEOUT)
        return not self.presence

    async def receive_close(self, timeout: float = RECEIVE_TIMEOUT) -> int:
        """Returns the close code the server sent (after any frames before it)."""
        while True:
            output = await self.communicator.receive_output(timeout)
            if output["type"] == "websocket.close":
                # The consumer still waits for the server's websocket.disconnect,
                # which close() sends, as daphne would.
                return output.get("code", 1000)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.communicator.disconnect()


@pytest.fixture
async def connect(channel_layer) -> AsyncIterator:
    """Returns connect(user, room) -> Client; every client is closed in teardown.

    Goes through the project's real ASGI stack (Origin check, session auth,
    URL routing). `welcome=True` also reads and returns the welcome frame.
    """
    from chatproject.asgi import application

    clients: list[Client] = []

    async def connect_as(
        user,
        room: str = "lobby",
        *,
        query: str = "",
        headers: list[tuple[bytes, bytes]] | None = None,
        app=None,
        welcome: bool = True,
        subprotocols: list[str] | None = None,
    ):
        path = f"/ws/chat/{room}/" + (f"?{query}" if query else "")
        communicator = WebsocketCommunicator(
            app or application,
            path,
            headers=[ORIGIN] if headers is None else headers,
            subprotocols=subprotocols,
        )
        if user is not None:
            communicator.scope["user"] = user
        connected, _ = await communicator.connect(timeout=RECEIVE_TIMEOUT)
        assert connected, "the handshake was refused"
        client = Client(communicator)
        clients.append(client)
        if welcome:
            return client, await client.receive_type("welcome")
        return client

    yield connect_as
    for client in clients:
        await client.close()
    # Nothing may still use the database when the test's database is flushed
    # (on PostgreSQL a TRUNCATE then deadlocks with it): no presence diff
    # left to send, no lease loop, and the database thread idle.
    from chat import presence, worker

    presence.diffs.reset()
    await worker.stop_worker_loop()
    await database_sync_to_async(lambda: None)()


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Waits (bounded) until `condition()` is true; the caller asserts after."""
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)


def assert_event(frame: dict[str, Any], type: str, **fields: Any) -> None:
    """Asserts a server frame's type and the given fields."""
    assert frame["type"] == type, frame
    for key, value in fields.items():
        assert frame.get(key) == value, (
            f"{key}: {frame.get(key)!r} != {value!r} in {frame}"
        )


async def post(client: Client, text: str, **extra: Any) -> dict[str, Any]:
    """Posts a message and returns the broadcast copy the sender gets back."""
    await client.send({"type": "message", "message": text, **extra})
    return await client.receive_type("message")


async def db(func, *args, **kwargs):
    """Runs a sync ORM call from an async test."""
    return await database_sync_to_async(func)(*args, **kwargs)


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix) -> None:
    """Tests close database connections after each call (CONN_MAX_AGE 0).

    The consumers' database thread would otherwise keep its connection past
    the last test, and PostgreSQL refuses to drop a database still in use.
    """
    from django.conf import settings

    settings.DATABASES["default"]["CONN_MAX_AGE"] = 0


# ---------------------------------------------------------------------------
# HTTP API: docs/openapi.json, the test client, tokens
# ---------------------------------------------------------------------------

SPEC_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
SPEC: dict[str, Any] = json.loads(SPEC_PATH.read_text())
# Not validated here, where a broken document would stop every test of the
# suite: test_openapi.py validates it (openapi-spec-validator).
OPENAPI = OpenAPI.from_file_path(str(SPEC_PATH), config=Config(spec_validator_cls=None))
# Where $refs into the spec resolve for openapi-schema-validator.
SPEC_URI = "urn:chat:openapi"
SPEC_REGISTRY = Registry().with_resource(
    SPEC_URI, Resource.from_contents(SPEC, default_specification=DRAFT202012)
)

ROOMS = "/api/rooms/"
LOBBY_MESSAGES = "/api/rooms/lobby/messages/"
NOTHING = object()


def spec_operations() -> list[tuple[str, str]]:
    """Returns (method, path template) for every operation in the spec."""
    return [
        (method, path)
        for path, item in SPEC["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    ]


def spec_schema(pointer: str) -> OAS31Validator:
    """Returns a validator of the spec's schema at `pointer` ("/components/...")."""
    return OAS31Validator(
        {"$ref": f"{SPEC_URI}#{pointer}"},
        registry=SPEC_REGISTRY,
        format_checker=oas31_format_checker,
    )


class SpecRequest(DjangoOpenAPIRequest):
    """A test client's request as openapi-core should match it against the spec."""

    # The test client's "testserver" stands for the server the spec names.
    host_url = SPEC["servers"][0]["url"]
    # Only responses are checked, and the API reads its body as a stream (to
    # hold its size limit), which leaves request.body unreadable.
    body = b""
    # The routes are regexes (re_path), which openapi-core cannot read as
    # templates: it matches the path against the spec's paths instead.
    path_pattern = None

    @property
    def path(self) -> str:
        # The API takes its paths with or without the trailing slash.
        return self.request.path.removesuffix("/") + "/"


def explain(error: Exception) -> str:
    """Returns an openapi-core error with the schema errors that caused it."""
    lines = [repr(error)]
    cause = error.__cause__
    while cause is not None:
        lines.append(repr(cause))
        lines += [
            f"  at {'/'.join(map(str, e.absolute_path)) or '$'}: {e.message}"
            for e in getattr(cause, "schema_errors", ())
        ]
        cause = cause.__cause__
    return "\n".join(lines)


def assert_documented(response) -> None:
    """Fails unless the spec documents this response (status, body, headers)."""
    django_request = getattr(response, "wsgi_request", None) or response.asgi_request
    request = SpecRequest(django_request)
    call = f"{request.method.upper()} {django_request.get_full_path()}"
    try:
        OPENAPI.validate_response(request, DjangoOpenAPIResponse(response))
    except (PathNotFound, OperationNotFound):
        # Not an operation of the spec: only a JSON 404 or 405 may come back.
        assert response.status_code in (404, 405), f"{call}: {response.status_code}"
        assert response["Content-Type"] == "application/json", response.content[:200]
        error_schema = spec_schema("/components/schemas/Error")
        errors = list(error_schema.iter_errors(json.loads(response.content)))
        assert not errors, f"{call} {response.status_code}: {errors}"
    except OpenAPIError as error:
        pytest.fail(
            f"{call} {response.status_code}: not a response docs/openapi.json "
            f"documents:\n{explain(error)}\n{response.content[:500]!r}"
        )


@pytest.fixture
def fresh_rate_counters(settings) -> None:
    """Gives a test its own, empty per-process cache for the API's rate counters."""
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "test-api",
        }
    }
    caches["default"].clear()


class Api:
    """Calls the API through Django's test client; every answer is spec-checked."""

    def __init__(self, client: HttpClient | AsyncClient) -> None:
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
        assert_documented(response)
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
        assert_documented(response)
        return response

    def get(self, path: str, **kwargs: Any):
        return self.request("get", path, **kwargs)

    def post(self, path: str, data: Any = NOTHING, **kwargs: Any):
        return self.request("post", path, data=data, **kwargs)


@pytest.fixture
def api(client, fresh_rate_counters) -> Api:
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
    return make_token(can_publish=True, can_push=True, push_to=ApiToken.PUSH_TO_ANYONE)


def assert_error(response, status: int, code: str) -> dict[str, Any]:
    """Asserts an API error response's status and code; returns its body."""
    assert response.status_code == status, response.content
    body = response.json()
    assert body["error"] == code, body
    assert body["detail"], "an error must say what is wrong"
    return body
