"""Real daphne processes for end-to-end tests (harness.processes), a stdlib HTTP
client, and sockets of harness.client's ChatSocket that are closed in teardown.

Nothing here goes through the test process's Django: the servers are child
processes on their own SQLite file, reached over loopback like a browser would.
"""

from __future__ import annotations

import http.cookiejar
import itertools
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from email.message import Message as HeaderMessage
from pathlib import Path
from typing import Any

import pytest
import redis

from harness.client import ChatSocket
from harness.processes import (  # noqa: F401 (REPO_ROOT: tests import it from here)
    LAUNCHER,
    PLAIN_DAPHNE,
    REPO_ROOT,
    Children,
    Daphne,
    manage,
)

# The worker launcher: daphne plus the drain on SIGTERM and server close codes.
WORKER_COMMAND = list(LAUNCHER)
# daphne as it comes, without the launcher: what the application must survive too.
PLAIN_DAPHNE_COMMAND = list(PLAIN_DAPHNE)

STARTUP_TIMEOUT = 20
HTTP_TIMEOUT = 10
PASSWORD = "a-Secret-pass-42"

# Variables of the test process that must not leak into a server's settings.
SCRUBBED_ENV = ("REDIS_URL", "DATABASE_URL", "DJANGO_TEST_SQLITE", "DJANGO_STATIC_ROOT")
# How much of each running server's log a failed test's report shows.
LOG_TAIL = 8000

# Servers started and not yet stopped, so a failure can show their logs.
_running = Children()


# ---------------------------------------------------------------------------
# daphne
# ---------------------------------------------------------------------------


# Run with `manage.py shell -c` and a JSON spec {"rooms": [...], "users": [...]}
# on stdin: creates the rooms and signed-in users in one process, and prints
# {username: sessionid} (far faster than signing up through the form).
SETUP_SCRIPT = """
import json, sys
from django.contrib.auth import get_user_model
from django.test import Client
from chat.models import Room

spec = json.load(sys.stdin)
for slug in spec["rooms"]:
    Room.objects.get_or_create(slug=slug)
sessions = {}
for username in spec["users"]:
    client = Client()
    client.force_login(get_user_model().objects.create_user(username))
    sessions[username] = client.cookies["sessionid"].value
print(json.dumps(sessions))
"""


class DaphneServer(Daphne):
    """One `daphne chatproject.asgi:application` child process on a free port.

    It gets its own temporary folder (log, and the SQLite file unless `db_path`
    names an existing one, so that several workers can share a database).
    """

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        db_path: Path | str | None = None,
        migrate: bool | None = None,
        port: int | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="chat-daphne-"))
        self.db_path = Path(db_path) if db_path else self.workdir / "db.sqlite3"
        # A database someone else made is already migrated, unless told otherwise.
        self.migrate = db_path is None if migrate is None else migrate
        server_env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
        server_env.update(
            {
                "DATABASE_URL": f"sqlite:///{self.db_path}",
                "DJANGO_DEBUG": "1",
                "DJANGO_SETTINGS_MODULE": "chatproject.settings",
                "PYTHONUNBUFFERED": "1",
            }
        )
        server_env.update(env or {})
        # With DEBUG off the pages link collectstatic's hashed file names, so
        # such a server collects its static files into its own folder first.
        debug = server_env["DJANGO_DEBUG"].strip().lower()
        self.collectstatic = debug not in {"", "1", "true", "yes", "on"}
        if self.collectstatic:
            server_env.setdefault("DJANGO_STATIC_ROOT", str(self.workdir / "static"))
        # A given port: a restart, where clients must find the server again.
        super().__init__(
            self.workdir / "daphne.log",
            env=server_env,
            port=port,
            command=command or WORKER_COMMAND,
            ready_path="/accounts/login/",
            registry=_running,
        )
        self.name = f"daphne {self.base_url}"

    def output(self, limit: int | None = None) -> str:
        """Returns what the child wrote so far (stdout and stderr together)."""
        return super().output(limit)

    def manage(self, *args: str) -> None:
        """Runs `manage.py ARGS` with the server's environment; fails loudly."""
        manage(*args, env=self.env)

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Migrates (if asked), collects the static files (DEBUG off), starts
        daphne and waits until it answers HTTP."""
        if self.migrate:
            self.manage("migrate", "--noinput", "-v0")
        if self.collectstatic:
            self.manage("collectstatic", "--noinput", "-v0")
        super().start(timeout)

    def stop(self, *args: Any) -> None:
        """Stops daphne by its pid (SIGTERM, then SIGKILL); removes its folder."""
        super().stop(*args)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> DaphneServer:
        self.start()
        return self


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Attaches the running servers' logs to a failure: their tracebacks are there."""
    report = yield
    if report.failed:
        for server in _running:
            report.sections.append(
                (f"daphne {server.base_url} log", server.output()[-LOG_TAIL:])
            )
    return report


# Each server (or group of workers) gets its own Redis database, so that room
# groups of servers alive at the same time never meet; db 0 is the unit tests'.
_redis_databases = itertools.cycle(range(1, 16))


def redis_url_for_test(redis_server) -> str:
    """Returns a URL to an empty database of the session's redis-server."""
    url = f"redis://127.0.0.1:{redis_server.port}/{next(_redis_databases)}"
    flush_redis(url)
    return url


def flush_redis(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture
def daphne_factory(request) -> Iterator[Callable[..., DaphneServer]]:
    """Returns start(env=None, *, redis_url=None, db_path=None, migrate=None,
    command=None).

    `command` runs instead of the worker launcher (e.g. PLAIN_DAPHNE_COMMAND).
    start() returns a running DaphneServer; start.new_redis_url() returns an
    empty Redis database for a group of workers (the session redis-server starts
    only when asked). Every server is stopped in teardown, the last started
    first: a worker sharing another's database stops before it is removed.
    """
    servers: list[DaphneServer] = []
    redis_urls: list[str] = []

    def start(
        env: dict[str, str] | None = None,
        *,
        redis_url: str | None = None,
        **kwargs: Any,
    ) -> DaphneServer:
        env = dict(env or {})
        if redis_url is not None:
            env["REDIS_URL"] = redis_url
        server = DaphneServer(env, **kwargs)
        servers.append(server)
        server.start()
        return server

    def new_redis_url() -> str:
        url = redis_url_for_test(request.getfixturevalue("redis_server"))
        redis_urls.append(url)
        return url

    start.new_redis_url = new_redis_url  # type: ignore[attr-defined]
    yield start
    for server in reversed(servers):
        server.stop()
    for url in redis_urls:
        flush_redis(url)


@pytest.fixture(scope="module", params=["memory", "redis"])
def daphne(request) -> Iterator[DaphneServer]:
    """One daphne per module and layer: in-memory, then Redis (REDIS_URL)."""
    env: dict[str, str] = {}
    redis_url = None
    if request.param == "redis":
        redis_url = redis_url_for_test(request.getfixturevalue("redis_server"))
        env["REDIS_URL"] = redis_url
    server = DaphneServer(env)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if redis_url is not None:
            flush_redis(redis_url)


# ---------------------------------------------------------------------------
# HTTP, standard library only
# ---------------------------------------------------------------------------


@dataclass
class HttpResponse:
    status: int
    url: str
    headers: HeaderMessage
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class HttpSession:
    """A cookie-keeping browser stand-in: urllib + a CookieJar, no proxies."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPCookieProcessor(self.jar),
        )

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.jar if c.name == name), None)

    def request(
        self,
        path: str,
        data: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> HttpResponse:
        """Returns the response (redirects followed); 4xx/5xx are returned too."""
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        request = urllib.request.Request(
            self.base_url + path, data=body, headers=headers or {}
        )
        try:
            with self.opener.open(request, timeout=HTTP_TIMEOUT) as response:
                return HttpResponse(
                    response.status, response.url, response.headers, response.read()
                )
        except urllib.error.HTTPError as error:
            with error:
                return HttpResponse(error.code, error.url, error.headers, error.read())

    def get(self, path: str, **kwargs: Any) -> HttpResponse:
        return self.request(path, **kwargs)

    def post_form(self, path: str, data: dict[str, str]) -> HttpResponse:
        """Posts a form as a browser does after GETting it: CSRF token, Referer."""
        page = self.get(path)
        assert page.status == 200, f"GET {path}: {page.status}\n{page.text}"
        token = self.cookie("csrftoken")
        assert token, f"GET {path} set no csrftoken cookie"
        return self.request(
            path,
            data={"csrfmiddlewaretoken": token, **data},
            headers={"Referer": self.base_url + path},
        )


def sign_up(base_url: str, username: str, password: str = PASSWORD) -> str:
    """Creates an account through the real sign-up form; returns its sessionid."""
    session = HttpSession(base_url)
    response = session.post_form(
        "/accounts/signup/",
        {"username": username, "password1": password, "password2": password},
    )
    assert response.status == 200, f"sign-up failed: {response.status}\n{response.text}"
    sessionid = session.cookie("sessionid")
    assert sessionid, f"sign-up set no sessionid; landed on {response.url}"
    return sessionid


def signed_in_session(base_url: str, sessionid: str) -> HttpSession:
    """Returns an HttpSession that sends the given session cookie."""
    session = HttpSession(base_url)
    session.jar.set_cookie(
        http.cookiejar.Cookie(
            version=0,
            name="sessionid",
            value=sessionid,
            port=None,
            port_specified=False,
            domain=urllib.parse.urlsplit(base_url).hostname,
            domain_specified=False,
            domain_initial_dot=False,
            path="/",
            path_specified=True,
            secure=False,
            expires=None,
            discard=True,
            comment=None,
            comment_url=None,
            rest={},
        )
    )
    return session


def create_room(base_url: str, sessionid: str, name: str) -> None:
    """Creates a room through the lobby form, as a signed-in user would."""
    response = signed_in_session(base_url, sessionid).post_form(
        "/chat/", {"name": name}
    )
    assert response.status == 200, f"lobby POST: {response.status}\n{response.text}"
    assert response.url.endswith(f"/chat/{name}/"), response.url


def unique_name(prefix: str) -> str:
    """Returns a fresh user or room name, so tests sharing a server never meet."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def api_call(
    base_url: str, method: str, path: str, token: str, data: Any = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Returns (status, headers, JSON body) of one API request, 4xx included."""
    request = urllib.request.Request(
        base_url + path,
        method=method,
        data=None if data is None else json.dumps(data).encode(),
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
        },
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=HTTP_TIMEOUT) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), json.loads(error.read())


@dataclass(frozen=True)
class Account:
    username: str
    sessionid: str


def new_account(base_url: str, prefix: str) -> Account:
    """Signs up a user with a fresh name (tests share one server per module)."""
    username = unique_name(prefix)
    return Account(username, sign_up(base_url, username))


# ---------------------------------------------------------------------------
# WebSocket: harness.client's ChatSocket
# ---------------------------------------------------------------------------


@pytest.fixture
async def ws_connect() -> AsyncIterator[Callable[..., Any]]:
    """Returns connect(server, room, sessionid=..., ...) -> ChatSocket.

    Every socket is closed in teardown. The options are open_connection's
    (harness.client): the Origin is the server's own unless `origin` says
    otherwise; `query` (e.g. "since=2"); `subprotocols` is what the client asks
    for (e.g. ["chat.batch"]). `welcome=True` also reads the welcome frame.
    """
    sockets: list[ChatSocket] = []

    async def connect_to(
        server: DaphneServer,
        room: str,
        *,
        welcome: bool = False,
        **options: Any,
    ):
        socket = await ChatSocket.open(server.base_url, room, **options)
        sockets.append(socket)
        if welcome:
            return socket, await socket.receive_type("welcome")
        return socket

    yield connect_to
    for socket in sockets:
        await socket.close()
