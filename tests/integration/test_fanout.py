"""The delivery path against real daphne workers: the per-socket outbox that
closes a stuck reader (4008), `chat.batch` frames over a real socket, the hub's
one Redis group member per worker, and presence diffs while a room fills.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from harness.client import RECEIVE_TIMEOUT, ChatSocket
from harness.processes import manage
from tests.integration.conftest import (
    HTTP_TIMEOUT,
    PLAIN_DAPHNE_COMMAND,
    SETUP_SCRIPT,
    WORKER_COMMAND,
    DaphneServer,
    unique_name,
)

pytestmark = pytest.mark.integration

# Small bounds, so that a stuck reader is found out quickly.
SLOW_READER_ENV = {
    "CHAT_SEND_QUEUE_FRAMES": "200",
    "CHAT_SEND_STALL_SECONDS": "3",
    # One client posts the whole flood.
    "CHAT_RATE_MESSAGES": "100000",
}
# At most this many messages; the flood stops one chunk after the close.
FLOOD_MESSAGES = 3000
FLOOD_CHUNK = 50
# How much a worker's resident memory may grow during the flood (generous):
# without the bounds, what a stuck socket cannot take piles up in daphne's
# transport for as long as the room talks.
RSS_GROWTH_LIMIT = 50 * 1024 * 1024
# The stuck socket's receive buffer (the kernel rounds it up to its minimum),
# and the segment size it announces: on loopback (64 KiB segments) the
# server's kernel would otherwise take a megabyte or more before daphne's
# transport holds anything, and the outbox only sees what the transport holds.
TINY_RCVBUF = 1024
SMALL_MSS = 536
# Bounded waits, generous for a loaded machine.
FLOOD_TIMEOUT = 60
CLOSE_TIMEOUT = 20


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """A migrated SQLite file, made once per module: migrate takes seconds."""
    path = tmp_path_factory.mktemp("chat-template") / "db.sqlite3"
    settings_of = DaphneServer(db_path=path)  # only for its environment
    shutil.rmtree(settings_of.workdir, ignore_errors=True)
    manage("migrate", "--noinput", "-v0", env=settings_of.env)
    return path


@pytest.fixture
def start(daphne_factory, template_db, tmp_path) -> Callable[..., DaphneServer]:
    """Like daphne_factory, every worker of a test on one fresh copy of the
    migrated database; start.new_redis_url() as there."""
    db_path = tmp_path / "db.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{template_db}{suffix}")
        if source.exists():
            shutil.copyfile(source, f"{db_path}{suffix}")

    def start_worker(env: dict[str, str] | None = None, **kwargs: Any) -> DaphneServer:
        return daphne_factory(env, db_path=db_path, migrate=False, **kwargs)

    start_worker.new_redis_url = daphne_factory.new_redis_url  # type: ignore
    return start_worker


def make_users(
    server: DaphneServer, count: int, *, rooms: Sequence[str] = ()
) -> dict[str, str]:
    """Creates rooms and signed-in users in the server's database in one go.

    Returns {username: sessionid}, names sorted as the server sorts them.
    Sixty sign-ups through the form would spend the test on password hashing.
    """
    spec = {
        "rooms": list(rooms),
        "users": sorted(unique_name(f"u{n:02d}") for n in range(count)),
    }
    result = manage("shell", "-c", SETUP_SCRIPT, env=server.env, input=json.dumps(spec))
    return json.loads(result.stdout.strip().splitlines()[-1])


def metric_total(server: DaphneServer, name: str) -> float:
    """Returns the sum of every sample of metric `name` on the worker's /metrics."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{server.base_url}/metrics", timeout=HTTP_TIMEOUT) as response:
        text = response.read().decode()
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(text))


def rss_bytes(server: DaphneServer) -> int:
    """Returns the worker process's resident set size (VmRSS)."""
    path = f"/proc/{server.process.pid}/status"
    with open(path) as lines:
        for line in lines:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in {path}")


async def eventually(check, *, what: str, timeout: float) -> None:
    """Waits (bounded) until `check()` is true."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------
# A stuck reader: a raw socket with a tiny receive buffer that stops reading
# ---------------------------------------------------------------------------

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class StuckReader:
    """A WebSocket handshake by hand over a blocking socket, then no reading.

    The receive buffer is set before connect, so the window the server sees is
    tiny from the first byte; nothing reads from it unless told to.
    """

    def __init__(self, server: DaphneServer, room: str, sessionid: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY_RCVBUF)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, SMALL_MSS)
        self.sock.settimeout(RECEIVE_TIMEOUT)
        self.sock.connect(("127.0.0.1", server.port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws/chat/{room}/ HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{server.port}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            f"Origin: {server.base_url}\r\n"
            f"Cookie: sessionid={sessionid}\r\n"
            "\r\n"
        )
        self.sock.sendall(request.encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += self._exactly(1)  # byte by byte: leave the frames unread
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        assert status_line.split()[1] == "101", head
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in header_lines if line)
        }
        accept = base64.b64encode(
            hashlib.sha1((key + WS_GUID).encode()).digest()
        ).decode()
        assert headers.get("sec-websocket-accept") == accept, head

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise EOFError("the server closed the connection")
            data += chunk
        return data

    def read_frame(self) -> tuple[int, bytes]:
        """Returns (opcode, payload) of the next frame (servers do not mask)."""
        first, second = self._exactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._exactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._exactly(8))
        return first & 0x0F, self._exactly(length)

    def read_until_closed(self, timeout: float) -> int | None:
        """Reads until the server ends the connection; returns its close code,
        or None when it was reset or ended without a close frame."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                opcode, payload = self.read_frame()
                if opcode == 0x8:
                    return struct.unpack("!H", payload[:2])[0] if payload else None
        except (EOFError, ConnectionResetError):
            return None
        except TimeoutError:
            pass
        raise AssertionError(f"the connection was still open after {timeout} s")

    def close(self) -> None:
        self.sock.close()


async def flood_with_a_stuck_reader(start, ws_connect, command) -> None:
    server = start(SLOW_READER_ENV, command=command)
    room = unique_name("flood")
    users = make_users(server, 3, rooms=[room])
    poster_name, stuck_name, reader_name = users

    poster, _ = await ws_connect(
        server, room, sessionid=users[poster_name], welcome=True
    )
    reader, _ = await ws_connect(
        server, room, sessionid=users[reader_name], welcome=True
    )
    stuck = await asyncio.to_thread(StuckReader, server, room, users[stuck_name])
    collectors: list[asyncio.Task] = []
    try:
        # It joined: its welcome came (and is the last thing it reads).
        opcode, payload = await asyncio.to_thread(stuck.read_frame)
        assert opcode == 0x1 and json.loads(payload)["type"] == "welcome", payload
        await reader.wait_presence(joins=[stuck_name])
        closes_before = metric_total(server, "chat_slow_socket_closes_total")
        rss_before = rss_bytes(server)

        seqs: dict[str, list[int]] = {reader_name: [], poster_name: []}

        async def collect(client: ChatSocket, into: list[int]) -> None:
            while True:
                frame = await client.receive(timeout=FLOOD_TIMEOUT)
                if frame["type"] == "message":
                    into.append(frame["seq"])
                else:
                    assert frame["type"] == "typing", frame

        async def echoed(count: int) -> None:
            # Every live reader has the first `count` messages (or one failed).
            while any(len(got) < count for got in seqs.values()):
                for task in collectors:
                    if task.done():
                        task.result()
                        raise AssertionError("a reader stopped")
                await asyncio.sleep(0.01)

        collectors += [
            asyncio.create_task(collect(reader, seqs[reader_name])),
            asyncio.create_task(collect(poster, seqs[poster_name])),
        ]
        # Post in chunks until the worker closes the stuck socket, then one
        # chunk more: the room goes on without it. How many it takes depends
        # on the kernel's buffers and the machine, so it is not fixed.
        filler = "x" * 1000
        sent = 0
        closed_after = None
        try:
            async with asyncio.timeout(FLOOD_TIMEOUT):
                while sent < FLOOD_MESSAGES:
                    for _ in range(FLOOD_CHUNK):
                        await poster.send(
                            {"type": "message", "message": f"{sent} {filler}"}
                        )
                        sent += 1
                    await echoed(sent)
                    if closed_after is not None:
                        break
                    closes = await asyncio.to_thread(
                        metric_total, server, "chat_slow_socket_closes_total"
                    )
                    if closes > closes_before:
                        closed_after = sent
        except TimeoutError:
            raise AssertionError(
                f"the flood was not through within {FLOOD_TIMEOUT} s: {sent} "
                f"sent, readers at {[len(got) for got in seqs.values()]}, the "
                f"stuck socket closed after {closed_after}"
            ) from None
        assert closed_after is not None, (
            f"the stuck socket was still open after {sent} messages of ~1 KiB"
        )

        # The room did not wait for the stuck socket: every message, once, in order.
        assert seqs[reader_name] == list(range(1, sent + 1))
        assert seqs[poster_name] == seqs[reader_name]
        growth = rss_bytes(server) - rss_before
        assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB"
        assert metric_total(server, "chat_dropped_events_total") > 0
        # The server ended the connection: a 4008 close frame, if it got
        # through what was queued before it, or a reset.
        code = await asyncio.to_thread(stuck.read_until_closed, CLOSE_TIMEOUT)
        assert code in (4008, None), code
        # The stuck user is gone from the room; the others saw it leave. The
        # collectors stop first: one socket has one reader at a time.
        for task in collectors:
            task.cancel()
        await asyncio.gather(*collectors, return_exceptions=True)
        await reader.wait_presence(leaves=[stuck_name], timeout=CLOSE_TIMEOUT)
        assert reader.view == {poster_name, reader_name}
    finally:
        for task in collectors:
            task.cancel()
        stuck.close()


async def test_a_stuck_reader_is_closed_and_the_room_gets_everything(start, ws_connect):
    """Under the worker launcher, what `make run` and the cluster start."""
    await flood_with_a_stuck_reader(start, ws_connect, WORKER_COMMAND)


async def test_a_stuck_reader_is_closed_under_plain_daphne_too(start, ws_connect):
    """The guard is the application's (chatproject.asgi), not the launcher's."""
    await flood_with_a_stuck_reader(start, ws_connect, PLAIN_DAPHNE_COMMAND)


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


async def test_chat_batch_gets_arrays_and_a_plain_client_objects(start, ws_connect):
    server = start({"CHAT_RATE_MESSAGES": "1000"})
    room = unique_name("batch")
    users = make_users(server, 2, rooms=[room])
    plain_name, batch_name = users
    plain, _ = await ws_connect(server, room, sessionid=users[plain_name], welcome=True)
    assert plain.subprotocol is None
    batch, batch_welcome = await ws_connect(
        server,
        room,
        sessionid=users[batch_name],
        subprotocols=["chat.batch"],
        welcome=True,
    )
    assert batch.subprotocol == "chat.batch"
    assert batch_welcome["user"] == batch_name

    count = 40
    async with asyncio.timeout(RECEIVE_TIMEOUT * 4):
        for n in range(count):
            await plain.send({"type": "message", "message": f"m{n}"})
        seen: dict[str, list[tuple[int, str]]] = {}
        for name, client in ((plain_name, plain), (batch_name, batch)):
            seen[name] = []
            while len(seen[name]) < count:
                frame = await client.receive()
                if frame["type"] == "message":
                    seen[name].append((frame["seq"], frame["message"]))
        # And the diff of the batch client's own arrival.
        await batch.wait_presence(joins=[batch_name])
        await plain.wait_presence(joins=[batch_name])

    expected = [(n + 1, f"m{n}") for n in range(count)]
    assert seen[plain_name] == expected
    assert seen[batch_name] == expected
    for text in batch.raw:
        events = json.loads(text)
        assert isinstance(events, list) and events, text
        assert all(isinstance(event, dict) and "type" in event for event in events)
    assert json.loads(batch.raw[0])[0]["type"] == "welcome"
    for text in plain.raw:
        assert isinstance(json.loads(text), dict), text


# ---------------------------------------------------------------------------
# Two workers and Redis: one group member per worker
# ---------------------------------------------------------------------------


def group_members(redis_url: str, room: str) -> set[bytes]:
    """The channels in the room's channels_redis group (its `_group_key`)."""
    client = redis.Redis.from_url(redis_url)
    try:
        # One read: a sorted set holds each channel once, and a second read
        # (ZCARD) could see a worker that left the group in between.
        return set(client.zrange(f"asgi:group:room.{room}", 0, -1))
    finally:
        client.close()


async def test_a_rooms_redis_group_holds_one_member_per_worker(start, ws_connect):
    redis_url = start.new_redis_url()
    one = start(redis_url=redis_url)
    two = start(redis_url=redis_url)
    shared, lonely = unique_name("shared"), unique_name("lonely")
    users = make_users(one, 6, rooms=[shared, lonely])
    names = list(users)

    # Five sockets in `shared`: three on worker one, two on worker two.
    on_one = [
        (await ws_connect(one, shared, sessionid=users[n], welcome=True))[0]
        for n in names[:3]
    ]
    on_two = [
        (await ws_connect(two, shared, sessionid=users[n], welcome=True))[0]
        for n in names[3:5]
    ]
    # `lonely` has sockets on worker one only (a second tab of names[0] too).
    for name in (names[0], names[0], names[5]):
        await ws_connect(one, lonely, sessionid=users[name], welcome=True)

    both = group_members(redis_url, shared)
    only_one = group_members(redis_url, lonely)
    assert len(both) == 2, both  # one per worker, not five
    assert len(only_one) == 1, only_one  # worker two is not in it at all
    assert only_one < both
    (two_member,) = both - only_one

    # Messages still reach every socket on both workers through those members.
    await on_two[0].send({"type": "message", "message": "across"})
    for client in on_one + on_two:
        frame = await client.receive_type("message")
        assert frame["message"] == "across"

    # Worker two's last socket in `shared` closes: its member goes.
    for client in on_two:
        await client.close()
    await eventually(
        lambda: group_members(redis_url, shared) == only_one,
        what="worker two left the room's Redis group",
        timeout=RECEIVE_TIMEOUT,
    )
    assert two_member not in group_members(redis_url, shared)
    await on_one[0].wait_presence(leaves=names[3:5])


# ---------------------------------------------------------------------------
# A room fills: presence diffs, not a frame per person per socket
# ---------------------------------------------------------------------------

FILL_USERS = 60
FILL_WORKERS = 2
# Longer than the default 500 ms: on a slow machine the fill takes seconds, and
# the point is the cost per interval, not per person. Each client then gets at
# most one diff per worker per interval while it is in the room.
FILL_INTERVAL_MS = 1000


async def test_a_room_filling_up_costs_far_less_than_a_frame_per_join_per_socket(
    start, ws_connect
):
    env = {
        "CHAT_PRESENCE_INTERVAL_MS": str(FILL_INTERVAL_MS),
        # Sixty sockets just closed: teardown need not wait the full 10 s drain.
        "CHAT_DRAIN_SECONDS": "2",
    }
    redis_url = start.new_redis_url()
    workers = [start(env, redis_url=redis_url) for _ in range(FILL_WORKERS)]
    room = unique_name("fill")
    users = make_users(workers[0], FILL_USERS, rooms=[room])

    clients: list[ChatSocket] = []
    opened: list[float] = []
    pumps: list[asyncio.Task] = []

    async def pump(client: ChatSocket) -> None:
        # Keeps reading, as a page does; ends when the socket closes.
        try:
            while True:
                client.take(await client.connection.recv())
        except Exception:
            return

    try:
        # One after another, alternating workers: each handshake is done before
        # the next begins; the welcome and the diffs are read as they come.
        for index, sessionid in enumerate(users.values()):
            opened.append(time.monotonic())
            worker = workers[index % FILL_WORKERS]
            client = await ws_connect(worker, room, sessionid=sessionid)
            clients.append(client)
            pumps.append(asyncio.create_task(pump(client)))

        everyone = set(users)
        try:
            async with asyncio.timeout(RECEIVE_TIMEOUT * 3):
                while any(client.view != everyone for client in clients):
                    await asyncio.sleep(0.05)
        except TimeoutError:
            wrong = {
                n: sorted(everyone ^ (c.view or set()))
                for n, c in zip(users, clients, strict=True)
                if c.view != everyone
            }
            raise AssertionError(
                f"views that are not the room, off by: {wrong}"
            ) from None
        # A diff still under way (the last interval) must not spoil them.
        await asyncio.sleep(FILL_INTERVAL_MS / 1000 + 0.5)
        ended = time.monotonic()

        quadratic = FILL_USERS * (FILL_USERS - 1) // 2
        frames = [len(client.raw) for client in clients]
        for name, client, since in zip(users, clients, opened, strict=True):
            assert client.view == everyone, name
            # A welcome, then presence diffs only (nobody posted).
            assert [event["type"] for event in client.frames] == ["welcome"], name
            assert len(client.raw) == 1 + len(client.presence), name
            # At most one diff per worker per interval while it was there.
            intervals = (ended - since) / (FILL_INTERVAL_MS / 1000)
            assert len(client.presence) <= FILL_WORKERS * (intervals + 2), (
                name,
                len(client.presence),
                round(intervals, 1),
            )
        assert sum(frames) < FILL_USERS * 10, (sum(frames), quadratic, frames)
        # The newest client's diffs end with the whole room counted.
        assert FILL_USERS in [diff["members"] for diff in clients[-1].presence]
    finally:
        for task in pumps:
            task.cancel()
        # All at once: sixty close handshakes one by one take seconds.
        await asyncio.gather(*(client.close() for client in clients))
