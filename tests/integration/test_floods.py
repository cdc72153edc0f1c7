"""Floods against a real daphne worker: a user's posts are limited however many
sockets they use, a client that will not stop is closed, and others chat on."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from websockets.exceptions import ConnectionClosed

from harness.client import ChatSocket
from tests.conftest import assert_event
from tests.integration.conftest import create_room, new_account, unique_name

pytestmark = pytest.mark.integration

RATE = 20  # posts per user per window (CHAT_RATE_MESSAGES)
REFUSALS = 30  # rate_limited answers a socket gets before 1008 (CHAT_BAD_FRAMES_…)
FLOOD = 1000


def flood_server(daphne_factory):
    return daphne_factory(
        {
            "CHAT_RATE_MESSAGES": str(RATE),
            "CHAT_RATE_WINDOW_SECONDS": "3600",
            "CHAT_BAD_FRAMES_PER_MINUTE": str(REFUSALS),
        }
    )


async def flood(socket: ChatSocket, count: int, prefix: str) -> int:
    """Sends `count` posts as fast as the socket takes them; returns how many went."""
    for n in range(count):
        try:
            await socket.send({"type": "message", "message": f"{prefix}{n}"})
        except ConnectionClosed:  # closed by the server part way: the point
            return n
    return count


def posts_by(frames: list[dict], username: str) -> int:
    return sum(1 for f in frames if f["type"] == "message" and f["user"] == username)


async def test_a_flood_from_one_socket_is_limited_then_closed_and_others_chat_on(
    daphne_factory, ws_connect
):
    server = flood_server(daphne_factory)
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = unique_name("room")
    create_room(server.base_url, bob.sessionid, room)
    flooder, _ = await ws_connect(server, room, sessionid=alice.sessionid, welcome=True)
    reader, _ = await ws_connect(server, room, sessionid=bob.sessionid, welcome=True)

    sending = asyncio.ensure_future(flood(flooder, FLOOD, "spam"))
    # bob posts while the flood is on, and gets his own copy back.
    mine = await reader.post("bob during the flood", client_id="bob-1")
    while mine.get("client_id") != "bob-1":
        mine = await reader.receive()
    await sending
    code, frames = await flooder.receive_close(timeout=30)

    errors = Counter(f["code"] for f in frames if f["type"] == "error")
    accepted = posts_by(frames, alice.username)
    assert code == 1008
    assert accepted == RATE
    # Every refused post was told so, until the close.
    assert errors == {"rate_limited": REFUSALS + 1}
    await reader._read_for(1.0)
    assert posts_by(list(reader.frames), alice.username) <= RATE
    reader.frames.clear()
    assert_event(await reader.post("bob after the flood"), "message", user=bob.username)
    assert "Traceback" not in server.output()


async def test_twenty_sockets_of_one_user_share_one_limit(daphne_factory, ws_connect):
    server = flood_server(daphne_factory)
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = unique_name("room")
    create_room(server.base_url, bob.sessionid, room)
    reader, _ = await ws_connect(server, room, sessionid=bob.sessionid, welcome=True)
    sockets = [
        (await ws_connect(server, room, sessionid=alice.sessionid, welcome=True))[0]
        for _ in range(20)
    ]
    per_socket = FLOOD // len(sockets)
    await asyncio.gather(
        *(flood(s, per_socket, f"s{n}-") for n, s in enumerate(sockets))
    )
    # What the room got from alice, read by bob once the answers have settled.
    await reader._read_for(3.0)
    accepted = posts_by(list(reader.frames), alice.username)
    assert 0 < accepted <= RATE
    # Her sockets were told of the refusals.
    refused = 0
    for socket in sockets:
        try:
            await socket._read_for(0.2)
        except ConnectionClosed:
            pass  # closed with 1008 after too many refusals: its frames are kept
        refused += sum(
            1
            for f in socket.frames
            if f["type"] == "error" and f["code"] == "rate_limited"
        )
    assert refused > 0
    reader.frames.clear()
    assert_event(await reader.post("bob is fine"), "message", user=bob.username)
    assert "Traceback" not in server.output()
