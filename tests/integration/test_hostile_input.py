"""Hostile input against a real worker: broken JSON and frames that mean harm,
sizes at and over every limit, WebSocket protocol garbage over raw TCP, room
names and cookies that try to get somewhere, foreign Origins, smuggled headers,
SQL-ish text, what the log says (and must not say), and a fuzzer.

Each case checks the exact answer (an error frame's code, a close code, an
HTTP status), that nothing was stored or broadcast, that the socket or the
worker is still fine afterwards, and that the worker logged no traceback.

The module's worker runs as production does (DEBUG off), with the bad-frame
and message rate limits raised so that one socket can take many bad frames;
the tests of those limits start a worker of their own.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chat import protocol
from harness.client import ChatSocket
from harness.processes import LOOPBACK, manage
from harness.rawframes import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    RawSocket,
    encode_frame,
    http_exchange,
)
from tests.conftest import assert_event
from tests.integration.conftest import (
    HTTP_TIMEOUT,
    DaphneServer,
    create_room,
    flush_redis,
    new_account,
    redis_url_for_test,
    signed_in_session,
    unique_name,
)
from tests.strategies import client_frames

pytestmark = pytest.mark.integration

# What the module's worker runs with: production's DEBUG, and room for many bad
# frames and posts on one socket (the limits themselves are tested apart).
HOSTILE_ENV = {
    "DJANGO_DEBUG": "0",
    "DJANGO_SECRET_KEY": "hostile-input-tests-not-a-real-secret-0123456789abcdef",
    "CHAT_BAD_FRAMES_PER_MINUTE": "100000",
    "CHAT_RATE_MESSAGES": "100000",
    # An origin of another site that the deployment trusts on purpose.
    "DJANGO_CSRF_TRUSTED_ORIGINS": "https://trusted.example",
}
TRUSTED_ORIGIN = "https://trusted.example"
# The defaults the module's worker keeps (chatproject/settings.py).
LIMITS = protocol.Limits(
    max_frame_bytes=16 * 1024,
    max_message_length=2000,
    history_page=50,
    history_max=200,
)
# daphne's --websocket-max-message-size default: over it daphne closes with 1009.
DAPHNE_MAX_MESSAGE = 1024 * 1024
RAW_TIMEOUT = 5
QUIET = 0.3


@pytest.fixture(scope="module", params=["memory", "redis"])
def server(request) -> Iterator[DaphneServer]:
    """One worker per module and layer, DEBUG off, bad-frame limit raised."""
    env = dict(HOSTILE_ENV)
    redis_url = None
    if request.param == "redis":
        redis_url = redis_url_for_test(request.getfixturevalue("redis_server"))
        env["REDIS_URL"] = redis_url
    worker = DaphneServer(env)
    try:
        worker.start()
        yield worker
    finally:
        worker.stop()
        if redis_url is not None:
            flush_redis(redis_url)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def full_log(server: DaphneServer) -> str:
    """Returns everything the worker wrote so far (not just the tail)."""
    return server.output(limit=None)


def assert_no_traceback(server: DaphneServer) -> None:
    log = full_log(server)
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]


def new_room(server: DaphneServer, owner_sessionid: str) -> str:
    name = unique_name("room")
    create_room(server.base_url, owner_sessionid, name)
    return name


async def assert_quiet(socket: ChatSocket, timeout: float = QUIET) -> None:
    """Nothing but presence diffs arrives: no broadcast, no stray answer."""
    assert await socket.receive_nothing(timeout), list(socket.frames)


async def post(socket: ChatSocket, text: str) -> dict[str, Any]:
    frame = await socket.post(text)
    assert_event(frame, "message", message=text)
    return frame


async def two_in_a_room(server: DaphneServer, ws_connect):
    """Returns (room, alice, alice's socket, bob, bob's socket) in a new room."""
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice.sessionid)
    alice_ws, _ = await ws_connect(
        server, room, sessionid=alice.sessionid, welcome=True
    )
    bob_ws, _ = await ws_connect(server, room, sessionid=bob.sessionid, welcome=True)
    return room, alice, alice_ws, bob, bob_ws


async def assert_both_see_next_post(
    sender: ChatSocket, other: ChatSocket, seq: int, text: str = "still fine"
) -> None:
    """The socket posts, both sockets get it, with the seq that proves that
    nothing else was stored before it."""
    frame = await post(sender, text)
    assert frame["seq"] == seq, frame
    assert await other.receive() == frame


def shell(server: DaphneServer, code: str) -> str:
    """Runs Python in `manage.py shell` on the worker's database; returns the
    last line it printed (the shell prints what it imported first)."""
    output = manage("shell", "-c", code, env=server.env, timeout=60).stdout
    lines = output.strip().splitlines()
    return lines[-1] if lines else ""


def user_id(server: DaphneServer, username: str) -> int:
    return int(
        shell(
            server,
            "from django.contrib.auth import get_user_model; "
            f"print(get_user_model().objects.get(username={username!r}).pk)",
        )
    )


def redis_keys(server: DaphneServer) -> list[bytes]:
    client = redis.Redis.from_url(server.env["REDIS_URL"])
    try:
        return list(client.scan_iter(count=1000))
    finally:
        client.close()


def is_redis(server: DaphneServer) -> bool:
    return bool(server.env.get("REDIS_URL"))


def names_room(key: bytes, name: str) -> bool:
    """True when a Redis key is the group of room `name`, or (for a name too
    long to turn up by chance) holds it anywhere."""
    encoded = name.encode("utf-8", "surrogatepass")
    # protocol.room_group_name refuses an invalid name; its format is this.
    group = b"room." + encoded
    return key.endswith(b":" + group) or (len(encoded) >= 16 and encoded in key)


async def assert_no_redis_key_names(
    server: DaphneServer, name: str, timeout: float = 3
) -> None:
    """No key of the worker's Redis is left for room `name` (its group), once
    the socket's disconnect has run."""
    if not is_redis(server):
        return
    deadline = time.monotonic() + timeout
    while True:
        left = [key for key in redis_keys(server) if names_room(key, name)]
        if not left or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert left == [], left


def rss_bytes(pid: int) -> int:
    """Returns a process's resident set size (VmRSS)."""
    status = Path(f"/proc/{pid}/status").read_text()
    kilobytes = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert kilobytes, status
    return int(kilobytes.group(1)) * 1024


def raw_open(
    server: DaphneServer, room: str, sessionid: str, **headers: str
) -> RawSocket:
    """Opens a room's socket by hand; returns it after its welcome frame."""
    raw = RawSocket.open(
        LOOPBACK,
        server.port,
        f"/ws/chat/{room}/",
        {"Origin": server.base_url, "Cookie": f"sessionid={sessionid}", **headers},
        timeout=RAW_TIMEOUT,
    )
    welcome = raw.receive_frame()
    assert welcome.opcode == OP_TEXT, welcome
    assert_event(json.loads(welcome.payload), "welcome", room=room)
    return raw


def is_presence(frame: Frame) -> bool:
    return frame.opcode == OP_TEXT and json.loads(frame.payload)["type"] == "presence"


def raw_receive(raw: RawSocket) -> Frame:
    """Returns the next frame but presence diffs (they come on their own time)."""
    while True:
        frame = raw.receive_frame()
        if not is_presence(frame):
            return frame


# ---------------------------------------------------------------------------
# 1. Bad JSON
# ---------------------------------------------------------------------------

BAD_JSON_FRAMES = [
    ('{"type":', "bad_json"),
    ('"hi"', "not_an_object"),
    ("null", "not_an_object"),
    ("[]", "not_an_object"),
    ("42", "not_an_object"),
    # Deep nesting that fits the 16 KiB frame limit: the decoder's recursion.
    ("[" * 16_000, "bad_json"),
    ('{"a":' * 3_000, "bad_json"),
    # 100,000 of them: refused by size before any parsing.
    ("[" * 100_000, "frame_too_large"),
    ("NaN", "bad_json"),
    ('{"type":"message","message":"x","n":Infinity}', "bad_json"),
    ('{"type":"message","message":"x","n":-Infinity}', "bad_json"),
    # Python refuses to convert an integer of over 4,300 digits.
    ("1" * 5_000, "bad_json"),
    ('{"type":"history","limit":' + "9" * 5_000 + "}", "bad_json"),
    ('{"type":"message","type":"typing","message":"x"}', "bad_json"),
    ('{"type":"message","message":"a","message":"b"}', "bad_json"),
    ('{"type":"message","message":"\\ud800"}', "invalid_message"),
    ('{"message":"tail \\udfff"}', "invalid_message"),
    ('{"type":"message","message":"a\\u0000b"}', "invalid_message"),
    # A raw NUL inside a JSON string is not JSON.
    ('{"type":"message","message":"a\x00b"}', "bad_json"),
    ("\x00", "bad_json"),
    ("{'type': 'message'}", "bad_json"),
    ('{"type":"message","message":"x"} trailing', "bad_json"),
]


async def test_bad_json_frames_each_get_their_error_and_store_nothing(
    server, ws_connect
):
    room, alice, alice_ws, bob, bob_ws = await two_in_a_room(server, ws_connect)
    for text, code in BAD_JSON_FRAMES:
        await alice_ws.send_text(text)
        frame = await alice_ws.receive()
        assert frame["type"] == "error" and frame["code"] == code, (text[:60], frame)
        assert frame["ref"] is None, frame
    await assert_quiet(bob_ws)
    # Nothing was stored: the next post is the room's first.
    await assert_both_see_next_post(alice_ws, bob_ws, seq=1)
    assert_no_traceback(server)


async def test_frames_over_the_chat_limit_get_frame_too_large_and_stay_open(
    server, ws_connect
):
    """16 KiB + 1 and 64 KiB: under daphne's 1 MiB, so the chat answers."""
    room, alice, alice_ws, bob, bob_ws = await two_in_a_room(server, ws_connect)
    over = json.dumps({"type": "message", "message": "x" * LIMITS.max_frame_bytes})
    for text in (over, "x" * (64 * 1024), json.dumps({"message": "y" * 65_536})):
        await alice_ws.send_text(text)
        assert_event(await alice_ws.receive(), "error", code="frame_too_large")
    await assert_quiet(bob_ws)
    await assert_both_see_next_post(alice_ws, bob_ws, seq=1)
    assert_no_traceback(server)


# ---------------------------------------------------------------------------
# 2. Schema
# ---------------------------------------------------------------------------

SCHEMA_FRAMES = [
    ({}, "unknown_type"),
    ({"text": "hi"}, "unknown_type"),
    ({"type": None}, "unknown_type"),
    ({"type": ""}, "unknown_type"),
    ({"type": "MESSAGE", "message": "hi"}, "unknown_type"),
    ({"type": "message "}, "unknown_type"),
    ({"type": "nonsense"}, "unknown_type"),
    ({"type": 1}, "unknown_type"),
    ({"type": True}, "unknown_type"),
    ({"type": ["message"], "message": "hi"}, "unknown_type"),
    ({"type": {"message": "hi"}}, "unknown_type"),
    ({"type": "message"}, "invalid_message"),
    ({"type": "message", "message": None}, "invalid_message"),
    ({"type": "message", "message": 5}, "invalid_message"),
    ({"type": "message", "message": ["hi"]}, "invalid_message"),
    ({"type": "message", "message": {"text": "hi"}}, "invalid_message"),
    ({"message": False}, "invalid_message"),
    ({"type": "message", "message": "   "}, "empty_message"),
    ({"type": "message", "message": " \n\t \r\n"}, "empty_message"),
    ({"type": "message", "message": "\u2003\u00a0"}, "empty_message"),
    ({"type": "message", "message": ""}, "empty_message"),
    ({"type": "message", "message": "bell\x07"}, "invalid_message"),
    ({"type": "message", "message": "esc\x1b[31m"}, "invalid_message"),
    ({"type": "message", "message": "hi", "client_id": ""}, "invalid_client_id"),
    ({"type": "message", "message": "hi", "client_id": 5}, "invalid_client_id"),
    ({"type": "message", "message": "hi", "client_id": "a b"}, "invalid_client_id"),
    ({"type": "message", "message": "hi", "client_id": "x" * 65}, "invalid_client_id"),
    ({"type": "history", "before": "5"}, "invalid_field"),
    ({"type": "history", "before": 0}, "invalid_field"),
    ({"type": "history", "before": -1}, "invalid_field"),
    ({"type": "history", "before": True}, "invalid_field"),
    ({"type": "history", "before": 1.5}, "invalid_field"),
    ({"type": "history", "limit": 0}, "invalid_field"),
    ({"type": "history", "limit": 201}, "invalid_field"),
    ({"type": "history", "limit": "50"}, "invalid_field"),
    ({"type": "history", "limit": None}, "invalid_field"),
    ({"type": "members", "after": 5}, "invalid_field"),
    ({"type": "members", "after": ["a"]}, "invalid_field"),
    ({"type": "members", "after": "x" * 151}, "invalid_field"),
]

# Names a frame's `type` must never reach: the consumer's handlers and methods
# (Channels dispatches `a.b` to `a_b`) and the channel layer's message types.
HANDLER_NAMES = [
    "chat.event",
    "chat_event",
    "chat.kick",
    "chat_kick",
    "websocket.connect",
    "websocket_connect",
    "websocket.receive",
    "websocket_receive",
    "websocket.disconnect",
    "websocket_disconnect",
    "websocket.close",
    "websocket.send",
    "__init__",
    "__call__",
    "__class__",
    "__dict__",
    "dispatch",
    "connect",
    "disconnect",
    "receive",
    "send",
    "close",
    "accept",
    "hub_deliver",
    "send_direct",
    "send_event",
    "send_text",
    "send_error",
    "refuse_frame",
    "post_message",
    "close_unavailable",
    "close_too_slow",
    "open_session",
    "join_groups",
    "leave_groups",
]


async def test_frames_of_the_wrong_shape_get_their_error_and_store_nothing(
    server, ws_connect
):
    room, alice, alice_ws, bob, bob_ws = await two_in_a_room(server, ws_connect)
    for body, code in SCHEMA_FRAMES:
        await alice_ws.send(body)
        frame = await alice_ws.receive()
        assert frame["type"] == "error" and frame["code"] == code, (body, frame)
    await assert_quiet(bob_ws)
    await assert_both_see_next_post(alice_ws, bob_ws, seq=1)
    assert_no_traceback(server)


async def test_a_refused_post_names_its_client_id_in_ref(server, ws_connect):
    room, alice, alice_ws, bob, bob_ws = await two_in_a_room(server, ws_connect)
    await alice_ws.send({"type": "message", "message": "  ", "client_id": "c-1"})
    assert_event(await alice_ws.receive(), "error", code="empty_message", ref="c-1")
    await assert_quiet(bob_ws)


async def test_handler_names_as_type_are_unknown_types(server, ws_connect):
    """A frame cannot call a handler: `chat.kick` does not close, `chat.event`
    does not broadcast, `close` does not close."""
    room, alice, alice_ws, bob, bob_ws = await two_in_a_room(server, ws_connect)
    fields = {
        "room": room,
        "text": json.dumps({"type": "message", "message": "forged"}),
        "message": "forged",
        "code": 1000,
        "bytes": None,
    }
    for name in HANDLER_NAMES:
        await alice_ws.send({"type": name, **fields})
        frame = await alice_ws.receive()
        assert frame["type"] == "error" and frame["code"] == "unknown_type", (
            name,
            frame,
        )
        assert frame["ref"] is None, frame
    await assert_quiet(bob_ws)
    await assert_both_see_next_post(alice_ws, bob_ws, seq=1)
    assert_no_traceback(server)


async def test_extra_fields_are_ignored_and_not_echoed(server, ws_connect):
    """Unknown fields of a valid frame are dropped: the post is stored as it
    would be without them, and nothing of them reaches the room."""
    room, alice, alice_ws, bob, bob_ws = await two_in_a_room(server, ws_connect)
    await alice_ws.send(
        {
            "type": "message",
            "message": "plain",
            "user": "someone-else",
            "seq": 999,
            "id": 1,
            "room": "general",
            "ts": "1999-01-01T00:00:00.000Z",
            "is_staff": True,
        }
    )
    frame = await alice_ws.receive()
    assert_event(frame, "message", message="plain", user=alice.username, seq=1)
    assert frame["room"] == room
    assert set(frame) == set(protocol.MessageEvent.__annotations__), frame
    assert await bob_ws.receive() == frame
    assert_no_traceback(server)


async def test_bad_frames_past_the_limit_close_with_1008(daphne_factory, ws_connect):
    """Each bad frame gets its error, then the close; other sockets go on."""
    server = daphne_factory(
        {**HOSTILE_ENV, "CHAT_BAD_FRAMES_PER_MINUTE": "5", "CHAT_RATE_MESSAGES": "20"}
    )
    room, alice, alice_ws, bob, bob_ws = await two_in_a_room(server, ws_connect)
    bad = ["{", "[]", '{"type":"x"}', '{"type":"history","limit":0}', "", '{"a":1}']
    for text in bad:
        await alice_ws.send_text(text)
    code, frames = await alice_ws.receive_close()
    assert code == protocol.CLOSE_POLICY_VIOLATION
    assert [frame["code"] for frame in frames] == [
        "bad_json",
        "not_an_object",
        "unknown_type",
        "invalid_field",
        "empty_frame",
        "unknown_type",
    ]
    await assert_quiet(bob_ws)
    # The other socket is fine, and the user may come back.
    again, _ = await ws_connect(server, room, sessionid=alice.sessionid, welcome=True)
    await assert_both_see_next_post(bob_ws, again, seq=1)
    assert_no_traceback(server)


# ---------------------------------------------------------------------------
# 3. Size
# ---------------------------------------------------------------------------


async def test_a_message_of_2000_emoji_is_stored_byte_for_byte(server, ws_connect):
    room, alice, alice_ws, bob, bob_ws = await two_in_a_room(server, ws_connect)
    # Four UTF-8 bytes each, outside the BMP (two UTF-16 units in a browser).
    text = "😀🏳🌈𝄞" * (LIMITS.max_message_length // 4)
    assert len(text) == LIMITS.max_message_length
    # Unescaped: as \ud83d\ude00 escapes the frame would pass 16 KiB.
    await alice_ws.send_text(
        json.dumps({"type": "message", "message": text}, ensure_ascii=False)
    )
    frame = await alice_ws.receive()
    assert_event(frame, "message", message=text, seq=1)
    assert text in alice_ws.raw[-1]
    assert await bob_ws.receive() == frame
    _, welcome = await ws_connect(server, room, sessionid=bob.sessionid, welcome=True)
    assert welcome["messages"][-1]["message"].encode() == text.encode()

    over = text + "😀"
    await alice_ws.send_text(
        json.dumps(
            {"type": "message", "message": over, "client_id": "over-1"},
            ensure_ascii=False,
        )
    )
    assert_event(
        await alice_ws.receive(), "error", code="message_too_long", ref="over-1"
    )
    await assert_quiet(bob_ws)
    await assert_both_see_next_post(alice_ws, bob_ws, seq=2)
    assert_no_traceback(server)


async def test_frames_over_daphne_limit_close_with_1009_and_cost_no_memory(
    server, ws_connect
):
    """2 MiB frames: daphne closes each socket with 1009 (docs/protocol.md); the
    worker's other sockets are untouched and its memory does not grow."""
    room, alice, alice_ws, bob, bob_ws = await two_in_a_room(server, ws_connect)
    big = json.dumps({"type": "message", "message": "z" * (2 * DAPHNE_MAX_MESSAGE)})

    async def send_big() -> int | None:
        socket, _ = await ws_connect(
            server, room, sessionid=alice.sessionid, welcome=True
        )
        try:
            await socket.send_text(big)
        except ConnectionClosed:
            pass
        code, frames = await socket.receive_close()
        assert frames == [], frames
        return code

    # One first, so that what the first costs once (imports, buffers) is not
    # counted as growth.
    assert await send_big() == 1009
    before = rss_bytes(server.pid)
    codes = [await send_big() for _ in range(10)]
    after = rss_bytes(server.pid)
    assert codes == [1009] * 10
    assert after - before < 20 * 1024 * 1024, (before, after)
    await assert_quiet(bob_ws)
    await assert_quiet(alice_ws)
    await assert_both_see_next_post(alice_ws, bob_ws, seq=1)
    assert_no_traceback(server)


# ---------------------------------------------------------------------------
# 4. Binary, empty and broken frames
# ---------------------------------------------------------------------------


async def test_binary_and_empty_frames_get_their_errors(server, ws_connect):
    room, alice, alice_ws, bob, bob_ws = await two_in_a_room(server, ws_connect)
    answers = [
        (b'{"type":"message","message":"in bytes"}', "binary_frame"),
        (b"\x00\xff", "binary_frame"),
        (b"", "empty_frame"),
        ("", "empty_frame"),
        (" \n\t ", "empty_frame"),
    ]
    for data, code in answers:
        await alice_ws.connection.send(data)
        frame = await alice_ws.receive()
        assert frame["type"] == "error" and frame["code"] == code, (data, frame)
    await assert_quiet(bob_ws)
    await assert_both_see_next_post(alice_ws, bob_ws, seq=1)
    assert_no_traceback(server)


# What RFC 6455 breaks each does, and the close code it calls for (7.4.1):
# 1002 a protocol error, 1007 data that is not what the frame type says.
PROTOCOL_GARBAGE = [
    # (case, opcode, payload, encode_frame's options, close code)
    ("reserved bits set", OP_TEXT, b"{}", {"rsv": 4}, 1002),
    ("unmasked client frame", OP_TEXT, b"{}", {"mask": False}, 1002),
    ("invalid UTF-8 text", OP_TEXT, b'{"message":"\xc3\x28"}', {}, 1007),
    ("ping over 125 bytes", OP_PING, b"p" * 126, {}, 1002),
    ("fragmented ping", OP_PING, b"p", {"fin": False}, 1002),
    ("reserved data opcode", 0x3, b"x", {}, 1002),
    ("reserved control opcode", 0xB, b"x", {}, 1002),
    ("continuation with nothing to continue", OP_CONTINUATION, b"x", {}, 1002),
    ("close with an invalid code", OP_CLOSE, b"\x03\xe7", {}, 1002),
]


async def test_protocol_garbage_is_closed_as_rfc_6455_says(server, ws_connect):
    """A close frame with the RFC's code, then the TCP connection ends; the
    disconnect handler ran (the user left the room) and the worker goes on."""
    room, alice, alice_ws, bob, bob_ws = await two_in_a_room(server, ws_connect)
    mallory = new_account(server.base_url, "mallory")
    for case, opcode, payload, options, expected_code in PROTOCOL_GARBAGE:
        raw = await asyncio.to_thread(raw_open, server, room, mallory.sessionid)
        try:
            await alice_ws.wait_presence(joins=[mallory.username])
            raw.send_frame(opcode, payload, **options)
            frames, close = await asyncio.to_thread(raw.receive_until_close)
            assert [f for f in frames if not is_presence(f)] == [], case
            assert close is not None, f"{case}: dropped without a close frame"
            assert close.close_code == expected_code, (case, close)
            # The closing handshake, answered: the server then ends the connection.
            raw.answer_close(close)
            assert await asyncio.to_thread(raw.connection_ends), case
        finally:
            raw.close()
        # disconnect() ran: the user's only socket is gone, so the user left.
        await alice_ws.wait_presence(leaves=[mallory.username])
    await assert_quiet(alice_ws)
    await assert_quiet(bob_ws)
    await assert_both_see_next_post(alice_ws, bob_ws, seq=1)
    assert_no_traceback(server)


async def test_a_thousand_pings_get_a_thousand_pongs_and_the_socket_works(
    server, ws_connect
):
    room, alice, alice_ws, bob, bob_ws = await two_in_a_room(server, ws_connect)
    mallory = new_account(server.base_url, "mallory")
    raw = await asyncio.to_thread(raw_open, server, room, mallory.sessionid)

    def pings_then_post() -> tuple[list, dict]:
        payloads = [f"ping-{n}".encode() for n in range(1000)]
        raw.send_raw(b"".join(encode_frame(OP_PING, p) for p in payloads))
        pongs = [raw_receive(raw) for _ in payloads]
        assert [pong.opcode for pong in pongs] == [OP_PONG] * 1000
        assert [pong.payload for pong in pongs] == payloads
        raw.send_frame(OP_TEXT, json.dumps({"message": "after pings"}).encode())
        return pongs, json.loads(raw_receive(raw).payload)

    try:
        _, answer = await asyncio.to_thread(pings_then_post)
    finally:
        raw.close()
    assert_event(answer, "message", message="after pings", user=mallory.username)
    assert await alice_ws.receive() == answer
    assert await bob_ws.receive() == answer
    await alice_ws.wait_presence(leaves=[mallory.username])
    assert_no_traceback(server)


async def test_a_fragmented_text_message_is_one_frame_to_the_chat(server, ws_connect):
    """Fragments with a ping between them (RFC 6455 allows it) make one post."""
    room, alice, alice_ws, bob, bob_ws = await two_in_a_room(server, ws_connect)
    mallory = new_account(server.base_url, "mallory")
    raw = await asyncio.to_thread(raw_open, server, room, mallory.sessionid)
    body = json.dumps({"message": "in three parts"}).encode()
    try:
        raw.send_frame(OP_TEXT, body[:5], fin=False)
        raw.send_frame(OP_PING, b"between")
        raw.send_frame(OP_CONTINUATION, body[5:9], fin=False)
        raw.send_frame(OP_CONTINUATION, body[9:])
        pong = await asyncio.to_thread(raw_receive, raw)
        assert (pong.opcode, pong.payload) == (OP_PONG, b"between")
    finally:
        raw.close()
    frame = await alice_ws.receive()
    assert_event(frame, "message", message="in three parts", seq=1)
    assert await bob_ws.receive() == frame
    # A binary message in fragments is still a binary frame to the chat.
    raw = await asyncio.to_thread(raw_open, server, room, mallory.sessionid)
    try:
        raw.send_frame(OP_BINARY, b"{", fin=False)
        raw.send_frame(OP_CONTINUATION, b"}")
        answer = json.loads((await asyncio.to_thread(raw_receive, raw)).payload)
    finally:
        raw.close()
    assert_event(answer, "error", code="binary_frame")
    await assert_quiet(bob_ws)
    assert_no_traceback(server)


# ---------------------------------------------------------------------------
# 5. Room names
# ---------------------------------------------------------------------------

HOSTILE_ROOM_NAMES = [
    "",
    "a b",
    "room\n",
    "room\r\n",
    "room٣",
    "room１",
    "Room",
    "../x",
    "..",
    "%00",
    "\x00",
    "room\x00",
    "😀",
    "x' OR 1=1--",
    '"; DROP TABLE chat_room; --',
    "-room",
    "_room",
    "a" * 201,
]


def room_names() -> list[str]:
    """The hostile names, and unique ones of 64 (valid, but no such room) and
    65 characters (too long)."""
    stem = uuid.uuid4().hex
    return [*HOSTILE_ROOM_NAMES, (stem * 2)[:64], (stem * 3)[:65]]


async def test_hostile_room_names_get_404_and_4404_and_leave_nothing(
    server, ws_connect
):
    alice = new_account(server.base_url, "alice")
    page = signed_in_session(server.base_url, alice.sessionid)
    for name in room_names():
        quoted = urllib.parse.quote(name, safe="")
        response = page.get(f"/chat/{quoted}/")
        assert response.status == 404, (name, response.status, response.text[:300])
        socket = await ws_connect(server, quoted, sessionid=alice.sessionid)
        assert await socket.receive_close() == (protocol.CLOSE_NO_SUCH_ROOM, []), name
        await assert_no_redis_key_names(server, name)
    # The worker still serves sockets.
    room = new_room(server, alice.sessionid)
    socket, _ = await ws_connect(server, room, sessionid=alice.sessionid, welcome=True)
    await post(socket, "rooms still work")
    assert_no_traceback(server)


async def test_a_path_outside_the_rooms_is_refused_not_a_500(server, ws_connect):
    """Paths that no route matches (unquoted ../, a slash too many)."""
    alice = new_account(server.base_url, "alice")
    for room in ("../x", "a/b", "general/extra", "general//"):
        socket = await ws_connect(server, room, sessionid=alice.sessionid)
        assert await socket.receive_close() == (protocol.CLOSE_NO_SUCH_ROOM, []), room
    assert_no_traceback(server)


# ---------------------------------------------------------------------------
# 6. Authentication
# ---------------------------------------------------------------------------


def logged_out_sessionid(server: DaphneServer) -> str:
    """Signs up, then logs out through the page: the session is deleted."""
    account = new_account(server.base_url, "gone")
    session = signed_in_session(server.base_url, account.sessionid)
    assert session.get("/chat/").status == 200
    response = session.request(
        "/accounts/logout/",
        data={"csrfmiddlewaretoken": session.cookie("csrftoken")},
        headers={"Referer": server.base_url + "/chat/"},
    )
    assert response.status == 200, response.text[:300]
    return account.sessionid


def expired_sessionid(server: DaphneServer) -> str:
    """Signs up, then moves the session's expiry into the past."""
    account = new_account(server.base_url, "expired")
    shell(
        server,
        "from datetime import timedelta; "
        "from django.contrib.sessions.models import Session; "
        "from django.utils import timezone; "
        f"Session.objects.filter(session_key={account.sessionid!r})"
        ".update(expire_date=timezone.now() - timedelta(days=1))",
    )
    return account.sessionid


async def test_sockets_without_a_live_session_get_4401_and_leave_nothing(
    server, ws_connect
):
    owner = new_account(server.base_url, "owner")
    room = new_room(server, owner.sessionid)
    cookies = {
        "no cookie": None,
        "garbage": "not-a-session",
        "garbage of the right shape": "a" * 32,
        "quotes and semicolons": '"x; sessionid=y"',
        "logged out": logged_out_sessionid(server),
        "expired": expired_sessionid(server),
    }
    # Logged out and expired really are dead: the page sends them to sign in.
    for case in ("logged out", "expired"):
        page = signed_in_session(server.base_url, cookies[case]).get(f"/chat/{room}/")
        assert "/accounts/login/" in page.url, (case, page.url)

    async def refuse_all() -> None:
        for case, sessionid in cookies.items():
            socket = await ws_connect(server, room, sessionid=sessionid)
            assert await socket.receive_close() == (4401, []), case

    await refuse_all()
    await assert_no_redis_key_names(server, room)
    # Nobody is in the room but whoever comes now.
    watcher, welcome = await ws_connect(
        server, room, sessionid=owner.sessionid, welcome=True
    )
    assert welcome["members"] == [owner.username]
    assert welcome["member_count"] == 1
    await watcher.wait_presence(joins=[owner.username])
    await refuse_all()
    assert await watcher.presence_nothing(2 * QUIET), list(watcher.presence)
    await assert_quiet(watcher)
    _, again = await ws_connect(server, room, sessionid=owner.sessionid, welcome=True)
    assert again["members"] == [owner.username]
    assert_no_traceback(server)


# ---------------------------------------------------------------------------
# 7. Cross-site WebSocket hijacking
# ---------------------------------------------------------------------------


def foreign_origins(server: DaphneServer) -> dict[str, str | None]:
    return {
        "another site": "http://evil.example",
        "no Origin": None,
        "null (sandboxed frame, file:)": "null",
        "the same host, another port": f"http://{LOOPBACK}:{server.port + 1}",
        "the same host, https": f"https://{LOOPBACK}:{server.port}",
        "the host as a suffix": f"http://{LOOPBACK}.evil.example:{server.port}",
        "the host as user info": f"http://{LOOPBACK}@evil.example:{server.port}",
        # Another name of the same machine is another origin, as in browsers.
        "another name of the host": f"http://localhost:{server.port}",
    }


async def handshake_status(
    server: DaphneServer, room: str, sessionid: str, origin: str | None
) -> int | str:
    """Returns the HTTP status that refused the handshake, or the first frame's
    type when the socket opened."""
    headers = {"Cookie": f"sessionid={sessionid}"}
    if origin is not None:
        headers["Origin"] = origin
    try:
        async with connect(
            f"{server.ws_url}/ws/chat/{room}/",
            additional_headers=headers,
            proxy=None,
            open_timeout=HTTP_TIMEOUT,
        ) as socket:
            async with asyncio.timeout(HTTP_TIMEOUT):
                return json.loads(await socket.recv())["type"]
    except InvalidStatus as refused:
        return refused.response.status_code


async def test_foreign_origins_are_refused_with_403(server):
    alice = new_account(server.base_url, "alice")
    room = new_room(server, alice.sessionid)
    answers = {
        case: await handshake_status(server, room, alice.sessionid, origin)
        for case, origin in foreign_origins(server).items()
    }
    assert answers == {case: 403 for case in answers}
    assert_no_traceback(server)


async def test_the_servers_own_origin_is_let_in(server):
    alice = new_account(server.base_url, "alice")
    room = new_room(server, alice.sessionid)
    for origin in (server.base_url, TRUSTED_ORIGIN):
        answer = await handshake_status(server, room, alice.sessionid, origin)
        assert answer == "welcome", origin


def test_the_worker_runs_with_debug_off(server):
    """A 404 is the site's page, not Django's technical page with its URLconf."""
    assert server.env["DJANGO_DEBUG"] == "0"
    alice = new_account(server.base_url, "alice")
    page = signed_in_session(server.base_url, alice.sessionid).get("/chat/a%20b/")
    assert page.status == 404
    assert "URLconf" not in page.text and "Traceback" not in page.text


# ---------------------------------------------------------------------------
# 8. Header smuggling
# ---------------------------------------------------------------------------


def handshake_request(
    server: DaphneServer, path: str, sessionid: str, note: bytes
) -> bytes:
    """A WebSocket handshake with a header of value `note` before its Origin."""
    return b"\r\n".join(
        [
            f"GET {path} HTTP/1.1".encode(),
            f"Host: {LOOPBACK}:{server.port}".encode(),
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            b"Sec-WebSocket-Version: 13",
            b"X-Note: " + note,
            f"Origin: {server.base_url}".encode(),
            f"Cookie: sessionid={sessionid}".encode(),
            b"",
            b"",
        ]
    )


@pytest.mark.parametrize("smuggled", [b"\x0b", b"\x1c"], ids=["VT", "FS"])
def test_a_control_character_in_a_header_is_400_before_the_app(server, smuggled):
    alice = new_account(server.base_url, "alice")
    room = new_room(server, alice.sessionid)
    # A path of its own, so that the log shows whether the app saw it.
    socket_path = f"/ws/chat/{room}/"
    page_path = f"/chat/{unique_name('nothere')}/"

    answer = http_exchange(
        LOOPBACK,
        server.port,
        handshake_request(
            server,
            socket_path,
            alice.sessionid,
            b"one" + smuggled + b"Origin: http://evil.example",
        ),
        timeout=2,
    )
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"Invalid header value" in answer
    page = (
        f"GET {page_path} HTTP/1.1\r\nHost: {LOOPBACK}:{server.port}\r\n".encode()
        + b"X-Note: one"
        + smuggled
        + f"two\r\nCookie: sessionid={alice.sessionid}\r\n\r\n".encode()
    )
    answer = http_exchange(LOOPBACK, server.port, page, timeout=2)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]

    log = full_log(server)
    assert f"WSCONNECTING {socket_path}" not in log
    assert f"Not Found: {page_path}" not in log
    # The same requests without the character do reach the app (and its log).
    answer = http_exchange(
        LOOPBACK,
        server.port,
        handshake_request(server, socket_path, alice.sessionid, b"one two"),
        timeout=1,
    )
    assert answer.startswith(b"HTTP/1.1 101 "), answer[:200]
    assert (
        signed_in_session(server.base_url, alice.sessionid).get(page_path).status == 404
    )
    log = full_log(server)
    assert f"WSCONNECTING {socket_path}" in log
    assert f"Not Found: {page_path}" in log
    assert_no_traceback(server)


# ---------------------------------------------------------------------------
# 9. SQL-ish text
# ---------------------------------------------------------------------------

SQLISH_TEXTS = [
    "x' OR 1=1--",
    '"; DROP TABLE chat_message; --',
    "%",
    "_",
    "\\",
    "100% of a_b\\c",
    "'; SELECT * FROM auth_user WHERE username LIKE '%",
    "\\x00 \\u0000 %00",
    "$1 ?1 :name %(name)s {0}",
]


def create_token(server: DaphneServer, owner: str) -> str:
    result = manage(
        "create_api_token", "--owner", owner, "--name", "hostile",
        env=server.env, timeout=60,
    )  # fmt: skip
    return result.stdout.strip()


def api_get(server: DaphneServer, path: str, token: str) -> dict[str, Any]:
    request = urllib.request.Request(
        server.base_url + path, headers={"Authorization": f"Bearer {token}"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=HTTP_TIMEOUT) as response:
        assert response.status == 200
        return json.loads(response.read())


async def test_sql_like_text_is_stored_and_returned_byte_for_byte(server, ws_connect):
    room, alice, alice_ws, bob, bob_ws = await two_in_a_room(server, ws_connect)
    for seq, text in enumerate(SQLISH_TEXTS, start=1):
        frame = await post(alice_ws, text)
        assert frame["seq"] == seq
        assert await bob_ws.receive() == frame
    await alice_ws.send({"type": "history", "limit": 50})
    history = await alice_ws.receive_type("history")
    assert [m["message"] for m in history["messages"]] == SQLISH_TEXTS
    token = create_token(server, alice.username)
    quoted = urllib.parse.quote(room)
    body = api_get(server, f"/api/rooms/{quoted}/messages/?since=0&limit=50", token)
    assert [m["message"] for m in body["messages"]] == SQLISH_TEXTS
    # The room, the users and the messages are all still there.
    _, welcome = await ws_connect(server, room, sessionid=bob.sessionid, welcome=True)
    assert [m["message"] for m in welcome["messages"]] == SQLISH_TEXTS
    assert_no_traceback(server)


# ---------------------------------------------------------------------------
# 10. Security logging
# ---------------------------------------------------------------------------


def assert_refusal_logged(
    log: str,
    *,
    reason: str,
    origin: str,
    user: str | None = None,
    address: str = LOOPBACK,
) -> None:
    """One log line names the refusal's reason, the client's address, the
    Origin it came with and (when there is one) the user, by id or name."""
    wanted = [re.compile(reason, re.IGNORECASE), re.compile(re.escape(address))]
    wanted.append(re.compile(re.escape(origin)))
    if user is not None:
        wanted.append(re.compile(rf"\b{user}\b"))
    lines = [line for line in log.splitlines() if all(p.search(line) for p in wanted)]
    # Every pattern but the address, which every access log line holds.
    clues = [wanted[0], *wanted[2:]]
    candidates = [
        line for line in log.splitlines() if any(p.search(line) for p in clues)
    ]
    assert lines, (
        f"no log line holds reason /{reason}/, address {address}, origin {origin}"
        + (f", user {user}" if user else "")
        + "; lines that come closest:\n"
        + "\n".join(candidates[-10:])
    )


async def test_a_refused_origin_is_logged(server):
    alice = new_account(server.base_url, "alice")
    room = new_room(server, alice.sessionid)
    origin = f"http://evil-{uuid.uuid4().hex[:8]}.example"
    assert await handshake_status(server, room, alice.sessionid, origin) == 403
    assert_refusal_logged(
        full_log(server), reason=r"refused|rejected|denied|not allowed", origin=origin
    )


async def test_a_socket_not_signed_in_is_logged(server, ws_connect):
    owner = new_account(server.base_url, "owner")
    room = new_room(server, owner.sessionid)
    # An allowed Origin that is not the address, so each must be logged.
    origin = TRUSTED_ORIGIN
    socket = await ws_connect(server, room, sessionid="not-a-session", origin=origin)
    assert await socket.receive_close() == (4401, [])
    await asyncio.sleep(QUIET)
    assert_refusal_logged(
        full_log(server), reason=r"not signed in|4401|anonymous", origin=origin
    )


async def test_a_banned_users_socket_is_logged(server, ws_connect):
    owner = new_account(server.base_url, "owner")
    mallory = new_account(server.base_url, "mallory")
    room = new_room(server, owner.sessionid)
    shell(
        server,
        "from django.contrib.auth import get_user_model; "
        "from chat import moderation; from chat.models import Room; "
        f"moderation.user_ban(room=Room.objects.get(slug={room!r}), "
        f"user=get_user_model().objects.get(username={mallory.username!r}), "
        "actor=None, reason='hostile input test')",
    )
    origin = TRUSTED_ORIGIN
    socket = await ws_connect(server, room, sessionid=mallory.sessionid, origin=origin)
    assert await socket.receive_close() == (protocol.CLOSE_FORBIDDEN, [])
    await asyncio.sleep(QUIET)
    assert_refusal_logged(
        full_log(server),
        reason=r"banned|4403",
        origin=origin,
        user=rf"(?:{user_id(server, mallory.username)}|{re.escape(mallory.username)})",
    )


async def test_too_many_bad_frames_is_logged(daphne_factory, ws_connect):
    server = daphne_factory({**HOSTILE_ENV, "CHAT_BAD_FRAMES_PER_MINUTE": "2"})
    mallory = new_account(server.base_url, "mallory")
    room = new_room(server, mallory.sessionid)
    origin = TRUSTED_ORIGIN
    socket, _ = await ws_connect(
        server, room, sessionid=mallory.sessionid, origin=origin, welcome=True
    )
    for _ in range(3):
        await socket.send_text("{")
    code, _ = await socket.receive_close()
    assert code == protocol.CLOSE_POLICY_VIOLATION
    assert_refusal_logged(
        full_log(server),
        reason=r"bad frames|1008",
        origin=origin,
        user=rf"(?:{user_id(server, mallory.username)}|{re.escape(mallory.username)})",
    )


async def test_the_log_holds_no_message_text_token_or_session_id(server, ws_connect):
    room, alice, alice_ws, bob, bob_ws = await two_in_a_room(server, ws_connect)
    secret_text = f"secret-text-{uuid.uuid4().hex}"
    await post(alice_ws, secret_text)
    # Refused texts too: the error frame may quote them, the log must not.
    refused_text = f"refused-text-{uuid.uuid4().hex}"
    await alice_ws.send({"type": "message", "message": refused_text + "\x07"})
    assert_event(await alice_ws.receive(), "error", code="invalid_message")
    await alice_ws.send_text('{"type":"message","message":"' + refused_text)
    assert_event(await alice_ws.receive(), "error", code="bad_json")
    token = create_token(server, alice.username)
    api_get(server, f"/api/rooms/{room}/messages/", token)
    wrong_session = uuid.uuid4().hex
    refused = await ws_connect(server, room, sessionid=wrong_session)
    assert (await refused.receive_close())[0] == 4401
    await asyncio.sleep(QUIET)
    log = full_log(server)
    secrets = {
        "message text": secret_text,
        "refused message text": refused_text,
        "API token": token,
        "the token's secret part": token[-16:],
        "alice's session id": alice.sessionid,
        "bob's session id": bob.sessionid,
        "a refused session id": wrong_session,
    }
    leaked = [what for what, secret in secrets.items() if secret in log]
    assert leaked == []


# ---------------------------------------------------------------------------
# 11. Fuzzing
# ---------------------------------------------------------------------------


def expected_answer(text: str) -> str | None:
    """Returns what the server answers a frame with, by the pure parser: an
    error's code, the type of the answer, or None (typing: no answer)."""
    try:
        command = protocol.parse_client_frame(text, None, LIMITS)
    except protocol.ProtocolError as error:
        return f"error:{error.code}"
    if isinstance(command, protocol.Typing):
        return None
    if isinstance(command, protocol.PostMessage):
        return "message"
    if isinstance(command, protocol.HistoryRequest):
        return "history"
    return "members"


class FuzzedSocket:
    """One socket that takes fuzzed frames, each followed by a marker frame
    whose error closes the list of the frame's answers."""

    def __init__(self, socket: ChatSocket) -> None:
        self.socket = socket
        self.count = 0
        # client_id -> the text stored with it (a retry echoes the original).
        self.stored: dict[str, str] = {}

    async def exchange(self, value: Any) -> None:
        text = json.dumps(value)
        expected = expected_answer(text)
        self.count += 1
        marker = f"marker-{self.count}"
        await self.socket.send_text(text)
        await self.socket.send({"type": marker})
        answers: list[dict[str, Any]] = []
        marked = False
        # A post's copy crosses the channel layer (Redis), so it may come after
        # the marker's error, which the socket sends straight back.
        while not marked or (
            expected == "message" and not any(a["type"] == "message" for a in answers)
        ):
            frame = await self.socket.receive()
            if frame.get("code") == "unknown_type" and marker in frame["detail"]:
                marked = True
            else:
                answers.append(frame)
        kinds = [
            f"error:{a['code']}" if a["type"] == "error" else a["type"] for a in answers
        ]
        assert kinds == ([] if expected is None else [expected]), (text, answers)
        if expected == "message":
            command = protocol.parse_client_frame(text, None, LIMITS)
            original = self.stored.setdefault(command.client_id, command.text)
            want = command.text if command.client_id is None else original
            assert answers[0]["message"] == want, (text, answers)


def test_fuzzed_frames_each_get_exactly_their_answer(server):
    """Arbitrary JSON, and frames of the real types with arbitrary fields: each
    gets exactly the answer the parser predicts, and the socket stays open."""
    loop = asyncio.new_event_loop()
    alice = new_account(server.base_url, "fuzz")
    room = new_room(server, alice.sessionid)
    socket = loop.run_until_complete(
        ChatSocket.open(server.base_url, room, sessionid=alice.sessionid)
    )
    fuzzed = FuzzedSocket(socket)

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(client_frames)
    def frames_are_answered(value: Any) -> None:
        loop.run_until_complete(asyncio.wait_for(fuzzed.exchange(value), 10))

    try:
        assert_event(loop.run_until_complete(socket.receive()), "welcome")
        frames_are_answered()
        # Still open, still posting.
        frame = loop.run_until_complete(socket.post("after the fuzz"))
        assert_event(frame, "message", message="after the fuzz")
    finally:
        loop.run_until_complete(socket.close())
        loop.close()
    assert_no_traceback(server)
