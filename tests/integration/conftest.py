"""Real daphne processes for end-to-end tests, and stdlib HTTP / WebSocket clients.

Nothing here goes through the test process's Django: the servers are child
processes on their own SQLite file, reached over loopback like a browser would.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from email.message import Message as HeaderMessage
from pathlib import Path
from typing import Any

import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
# The daphne next to the interpreter running the tests: the project's venv.
# The worker launcher: daphne plus the drain on SIGTERM and server close codes.
WORKER_COMMAND = [sys.executable, "-m", "chatproject.server"]
# daphne as it comes, without the launcher: what the application must survive too.
PLAIN_DAPHNE_COMMAND = [sys.executable, "-m", "daphne"]

STARTUP_TIMEOUT = 20
STOP_TIMEOUT = 10
HTTP_TIMEOUT = 10
# Generous: a real process and maybe a real Redis sit between send and receive.
RECEIVE_TIMEOUT = 5
PASSWORD = "a-Secret-pass-42"

# Variables of the test process that must not leak into a server's settings.
SCRUBBED_ENV = ("REDIS_URL", "DATABASE_URL", "DJANGO_TEST_SQLITE", "DJANGO_STATIC_ROOT")
# How much of each running server's log a failed test's report shows.
LOG_TAIL = 8000

# Servers started and not yet stopped, so a failure can show their logs.
_running: list[DaphneServer] = []


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


class DaphneServer:
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
        # The program in front of the daphne arguments: the launcher by default.
        self.command = list(command or WORKER_COMMAND)
        self.workdir = Path(tempfile.mkdtemp(prefix="chat-daphne-"))
        self.db_path = Path(db_path) if db_path else self.workdir / "db.sqlite3"
        # A database someone else made is already migrated, unless told otherwise.
        self.migrate = db_path is None if migrate is None else migrate
        # A given port: a restart, where clients must find the server again.
        self.port = port or free_port()
        self.log_path = self.workdir / "daphne.log"
        self.process: subprocess.Popen | None = None
        self.env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
        self.env.update(
            {
                "DATABASE_URL": f"sqlite:///{self.db_path}",
                "DJANGO_DEBUG": "1",
                "DJANGO_SETTINGS_MODULE": "chatproject.settings",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env.update(env or {})
        # With DEBUG off the pages link collectstatic's hashed file names, so
        # such a server collects its static files into its own folder first.
        debug = self.env["DJANGO_DEBUG"].strip().lower()
        self.collectstatic = debug not in {"", "1", "true", "yes", "on"}
        if self.collectstatic:
            self.env.setdefault("DJANGO_STATIC_ROOT", str(self.workdir / "static"))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def output(self) -> str:
        """Returns what the child wrote so far (stdout and stderr together)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def manage(self, *args: str) -> None:
        """Runs `manage.py ARGS` with the server's environment; fails loudly."""
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"manage.py {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )

    def start(self) -> None:
        """Migrates (if asked), collects the static files (DEBUG off), starts
        daphne and waits until it answers HTTP."""
        if self.migrate:
            self.manage("migrate", "--noinput", "-v0")
        if self.collectstatic:
            self.manage("collectstatic", "--noinput", "-v0")
        # A file, not a pipe: nobody reads a pipe while the tests run, and a
        # full pipe would block daphne.
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    *self.command,
                    "-b",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "chatproject.asgi:application",
                ],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _running.append(self)
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"daphne exited with {self.process.returncode} before it "
                    f"answered:\n{self.output()}"
                )
            try:
                opener.open(f"{self.base_url}/accounts/login/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # any status is an answer: the server is up
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                output = self.output()
                self.stop()
                raise RuntimeError(
                    f"daphne did not answer on {self.base_url} within "
                    f"{STARTUP_TIMEOUT} s:\n{output}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stops daphne by its pid (SIGTERM, then SIGKILL); removes its folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self in _running:
            _running.remove(self)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> DaphneServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


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


@dataclass(frozen=True)
class Account:
    username: str
    sessionid: str


def new_account(base_url: str, prefix: str) -> Account:
    """Signs up a user with a fresh name (tests share one server per module)."""
    username = unique_name(prefix)
    return Account(username, sign_up(base_url, username))


# ---------------------------------------------------------------------------
# WebSocket, the `websockets` client
# ---------------------------------------------------------------------------


class ChatSocket:
    """A websockets client connection with JSON helpers; every wait is bounded.

    Like the unit tests' `Client` (tests/conftest.py): presence diffs come on
    their own schedule, so `receive` passes over them (they are kept for
    `receive_presence`), and a `chat.batch` frame (a JSON array) is taken apart
    into its events. `raw` keeps the text of every frame, to check the framing;
    `view` is the member list as this client sees it (welcome, then diffs).
    """

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.frames: deque[dict[str, Any]] = deque()
        self.presence: deque[dict[str, Any]] = deque()
        self.raw: list[str] = []
        self.view: set[str] | None = None

    @property
    def subprotocol(self) -> str | None:
        return self.connection.subprotocol

    async def send(self, frame: dict[str, Any]) -> None:
        await self.connection.send(json.dumps(frame))

    async def send_text(self, text: str) -> None:
        await self.connection.send(text)

    def take(self, text: str) -> None:
        self.raw.append(text)
        decoded = json.loads(text)
        for event in decoded if isinstance(decoded, list) else [decoded]:
            if event.get("type") == "presence":
                self.presence.append(event)
                if self.view is not None:
                    self.view |= set(event["joins"])
                    self.view -= set(event["leaves"])
            else:
                if event.get("type") == "welcome":
                    self.view = set(event["members"])
                self.frames.append(event)

    async def _read(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                text = await self.connection.recv()
        except TimeoutError:
            raise AssertionError(f"no frame from the server within {timeout} s")
        self.take(text)

    async def receive(self, timeout: float = RECEIVE_TIMEOUT) -> dict[str, Any]:
        """Returns the next frame that is not a presence diff.

        Fails (not hangs) when none comes in time.
        """
        async with _deadline(timeout):
            while not self.frames:
                await self._read(timeout)
        return self.frames.popleft()

    async def receive_type(self, kind: str, timeout: float = RECEIVE_TIMEOUT) -> dict:
        """Returns the next frame (presence diffs aside), of type `kind`."""
        frame = await self.receive(timeout)
        assert frame["type"] == kind, frame
        return frame

    async def receive_presence(self, timeout: float = RECEIVE_TIMEOUT) -> dict:
        """Returns the next presence diff (other frames are kept for `receive`)."""
        async with _deadline(timeout):
            while not self.presence:
                await self._read(timeout)
        return self.presence.popleft()

    async def wait_presence(
        self,
        *,
        joins: Sequence[str] = (),
        leaves: Sequence[str] = (),
        timeout: float = RECEIVE_TIMEOUT,
    ) -> dict[str, Any]:
        """Reads diffs until every user of `joins` joined and of `leaves` left.

        Returns the diff that completed it. Each name in a diff is its state
        when the diff was sent, so a later diff overrides an earlier one: a
        user wanted in `joins` who shows up in `leaves` again is wanted again.
        """
        want_joins, want_leaves = set(joins), set(leaves)
        wanted = f"joins {sorted(joins)}, leaves {sorted(leaves)}"
        async with _deadline(timeout, wanted):
            while True:
                diff = await self.receive_presence(timeout)
                want_joins -= set(diff["joins"])
                want_joins |= set(joins) & set(diff["leaves"])
                want_leaves -= set(diff["leaves"])
                want_leaves |= set(leaves) & set(diff["joins"])
                if not want_joins and not want_leaves:
                    return diff

    async def wait_view(
        self, members: set[str], timeout: float = RECEIVE_TIMEOUT
    ) -> None:
        """Reads frames until `view` (welcome members plus diffs) is `members`."""
        try:
            async with asyncio.timeout(timeout):
                while self.view != members:
                    self.take(await self.connection.recv())
        except TimeoutError:
            raise AssertionError(
                f"the member list seen is {sorted(self.view or ())}, not "
                f"{sorted(members)}, after {timeout} s"
            )

    async def _read_for(self, timeout: float) -> None:
        """Reads (and keeps) every frame that comes within `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self.take(await self.connection.recv())
        except TimeoutError:
            pass

    async def receive_nothing(self, timeout: float = 0.5) -> bool:
        """True when no frame but presence diffs arrives within `timeout`."""
        await self._read_for(timeout)
        return not self.frames

    async def presence_nothing(self, timeout: float = 0.5) -> bool:
        """True when no presence diff arrives within `timeout` (others are kept)."""
        await self._read_for(timeout)
        return not self.presence

    async def receive_close(
        self, timeout: float = RECEIVE_TIMEOUT
    ) -> tuple[int | None, list[dict]]:
        """Returns the server's close code and the frames that came before it.

        Presence diffs are not among them: they are kept in `presence`.
        """
        async with asyncio.timeout(timeout):
            try:
                while True:
                    self.take(await self.connection.recv())
            except ConnectionClosed as closed:
                frames, self.frames = list(self.frames), deque()
                return (closed.rcvd.code if closed.rcvd else None), frames

    async def close(self) -> None:
        await self.connection.close()


class _deadline:
    """asyncio.timeout that fails with an AssertionError (what was awaited)."""

    def __init__(self, timeout: float, what: str = "a frame") -> None:
        self.timeout = timeout
        self.what = what
        self._inner = asyncio.timeout(timeout)

    async def __aenter__(self) -> None:
        await self._inner.__aenter__()

    async def __aexit__(self, kind, error, traceback) -> bool | None:
        try:
            return await self._inner.__aexit__(kind, error, traceback)
        except TimeoutError:
            raise AssertionError(
                f"no {self.what} from the server within {self.timeout} s"
            ) from None


@pytest.fixture
async def ws_connect() -> AsyncIterator[Callable[..., Any]]:
    """Returns connect(server, room, sessionid=..., ...) -> ChatSocket.

    Every socket is closed in teardown. The Origin is the server's own unless
    `origin` says otherwise; `welcome=True` also reads the welcome frame;
    `subprotocols` is what the client asks for (e.g. ["chat.batch"]).
    """
    sockets: list[ChatSocket] = []

    async def connect_to(
        server: DaphneServer,
        room: str,
        *,
        sessionid: str | None = None,
        query: str = "",
        origin: str | None = None,
        welcome: bool = False,
        subprotocols: Sequence[str] | None = None,
    ):
        uri = f"{server.ws_url}/ws/chat/{room}/" + (f"?{query}" if query else "")
        headers = {"Origin": origin or server.base_url}
        if sessionid is not None:
            headers["Cookie"] = f"sessionid={sessionid}"
        connection = await connect(
            uri,
            additional_headers=headers,
            proxy=None,
            open_timeout=RECEIVE_TIMEOUT,
            subprotocols=list(subprotocols) if subprotocols else None,
        )
        socket = ChatSocket(connection)
        sockets.append(socket)
        if welcome:
            return socket, await socket.receive_type("welcome")
        return socket

    yield connect_to
    for socket in sockets:
        await socket.close()
