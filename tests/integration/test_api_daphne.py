"""The HTTP API end to end: real daphne workers, real Redis, real sockets, curl.

A token made by `manage.py create_api_token`, the README's curl line posting
into a room a socket has open, and two workers sharing publish, push and the
per-token rate limit (counted in Redis through Django's cache).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess

import pytest

from harness.client import ChatSocket
from harness.processes import manage
from tests.conftest import assert_event
from tests.integration.conftest import (
    REPO_ROOT,
    DaphneServer,
    api_call,
    create_room,
    new_account,
    unique_name,
)

pytestmark = pytest.mark.integration

README = (REPO_ROOT / "README.md").read_text()


def create_token(server: DaphneServer, owner: str, *flags: str) -> str:
    """Runs manage.py create_api_token against the server's database."""
    result = manage(
        "create_api_token", "--owner", owner, "--name", "integration", *flags,
        env=server.env, timeout=60,
    )  # fmt: skip
    return result.stdout.strip()


async def assert_silent(socket: ChatSocket, timeout: float = 0.5) -> None:
    """Nothing but presence diffs comes within `timeout`."""
    assert await socket.receive_nothing(timeout), list(socket.frames)


def new_room(server: DaphneServer, owner_session: str) -> str:
    name = unique_name("room")
    create_room(server.base_url, owner_session, name)
    return name


async def test_readme_curl_posts_into_an_open_room(daphne, ws_connect):
    """The README's one-liner, run as it is written, against a real daphne."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    section = README.split("## HTTP API", 1)[1].split("\n## ", 1)[0]
    (line,) = [line for line in section.splitlines() if line.startswith("curl ")]
    alice = new_account(daphne.base_url, "alice")
    room = new_room(daphne, alice.sessionid)
    token = create_token(daphne, alice.username, "--publish")
    command = line.replace("http://127.0.0.1:8000", daphne.base_url).replace(
        "/api/rooms/general/", f"/api/rooms/{room}/"
    )
    assert command != line

    page, _ = await ws_connect(daphne, room, sessionid=alice.sessionid, welcome=True)
    result = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", command],
        env={"PATH": "/usr/bin:/bin", "TOKEN": token},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert_event(answer, "message", room=room, user=alice.username, seq=1)
    assert await page.receive() == answer


async def test_two_workers_share_publish_push_and_the_rate_limit(
    daphne_factory, ws_connect
):
    redis_url = daphne_factory.new_redis_url()
    env = {"CHAT_API_RATE_REQUESTS": "4", "CHAT_API_RATE_WINDOW_SECONDS": "86400"}
    one = daphne_factory(env, redis_url=redis_url)
    two = daphne_factory(env, redis_url=redis_url, db_path=one.db_path)
    alice = new_account(one.base_url, "alice")
    bob = new_account(two.base_url, "bob")
    room = new_room(one, alice.sessionid)
    token = create_token(
        one, bob.username, "--publish", "--push", "--push-to", alice.username,
        "--author", "CI",
    )  # fmt: skip

    bob_two, _ = await ws_connect(two, room, sessionid=bob.sessionid, welcome=True)
    alice_one, _ = await ws_connect(one, room, sessionid=alice.sessionid, welcome=True)
    await bob_two.wait_presence(joins=[alice.username])
    alice_two, _ = await ws_connect(
        two, "general", sessionid=alice.sessionid, welcome=True
    )

    # 1: published through worker one, seen on both workers.
    status, _, message = await asyncio.to_thread(
        api_call,
        one.base_url,
        "POST",
        f"/api/rooms/{room}/messages/",
        token,
        {"message": "hi"},
    )
    assert status == 201, message
    assert_event(message, "message", user="CI", message="hi")
    assert await bob_two.receive() == message
    assert await alice_one.receive() == message

    # 2: pushed through worker one to both of alice's sockets, not to bob.
    status, _, pushed = await asyncio.to_thread(
        api_call,
        one.base_url,
        "POST",
        f"/api/users/{alice.username}/push/",
        token,
        {"event": "e"},
    )
    assert (status, pushed) == (202, {"sockets": 2})
    for socket in (alice_one, alice_two):
        assert_event(await socket.receive(), "push", event="e", data=None)
    await assert_silent(bob_two)

    # 3, 4 through worker two; the 5th, on worker one, is over the shared budget.
    for _ in range(2):
        status, _, _ = await asyncio.to_thread(
            api_call, two.base_url, "GET", "/api/rooms/", token
        )
        assert status == 200
    status, headers, body = await asyncio.to_thread(
        api_call, one.base_url, "GET", "/api/rooms/", token
    )
    assert (status, body["error"]) == (429, "rate_limited")
    assert re.fullmatch(r"[1-9][0-9]*", headers["Retry-After"])
