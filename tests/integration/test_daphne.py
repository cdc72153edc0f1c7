"""End to end against real daphne processes: sign-up over HTTP, chat over WebSocket.

Each test runs on the in-memory layer and on channels_redis with a real Redis;
the last one runs two workers on one SQLite file and one Redis.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sqlite3
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from websockets.exceptions import ConnectionClosed, InvalidStatus

from harness.client import ChatSocket
from harness.processes import PostgresServer, RedisServer
from tests.conftest import assert_event, until
from tests.integration.conftest import (
    PASSWORD,
    PLAIN_DAPHNE_COMMAND,
    DaphneServer,
    HttpSession,
    create_room,
    new_account,
    signed_in_session,
    unique_name,
)

pytestmark = pytest.mark.integration


async def post(socket: ChatSocket, text: str) -> dict[str, Any]:
    """Posts a message and returns the broadcast copy the sender gets back.

    Presence diffs may come in between (a user who just closed a socket leaves
    a moment later, whatever the test does next): `receive` passes over them.
    """
    frame = await socket.post(text)
    assert_event(frame, "message", message=text)
    return frame


def new_room(server: DaphneServer) -> str:
    """Creates a room of one's own, so the module's shared server stays quiet."""
    name = unique_name("room")
    create_room(server.base_url, new_account(server.base_url, "owner").sessionid, name)
    return name


# ---------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------


async def test_two_users_chat_both_ways_in_general(daphne, ws_connect):
    """The whole life of a conversation: welcome, presence, messages, leave."""
    alice = new_account(daphne.base_url, "alice")
    bob = new_account(daphne.base_url, "bob")

    alice_ws, welcome = await ws_connect(
        daphne, "general", sessionid=alice.sessionid, welcome=True
    )
    assert_event(welcome, "welcome", room="general", user=alice.username)
    assert alice.username in welcome["members"]

    bob_ws, welcome = await ws_connect(
        daphne, "general", sessionid=bob.sessionid, welcome=True
    )
    assert_event(welcome, "welcome", room="general", user=bob.username)
    assert {alice.username, bob.username} <= set(welcome["members"])
    assert welcome["member_count"] == len(welcome["members"])
    assert welcome["members_more"] is False
    # The module's server is shared: count on the others, not on a total.
    others = welcome["member_count"] - 2
    diff = await alice_ws.wait_presence(joins=[bob.username])
    assert bob.username in diff["joins"]
    assert diff["members"] == others + 2
    # The joiner gets the diff of its own arrival too.
    await bob_ws.wait_presence(joins=[bob.username])

    first = await post(alice_ws, "hello bob")
    assert_event(first, "message", room="general", user=alice.username)
    assert await bob_ws.receive() == first

    second = await post(bob_ws, "hi alice")
    assert_event(second, "message", user=bob.username, seq=first["seq"] + 1)
    assert await alice_ws.receive() == second

    await bob_ws.close()
    diff = await alice_ws.wait_presence(leaves=[bob.username])
    assert diff["members"] == others + 1
    assert alice_ws.view is not None
    assert alice.username in alice_ws.view and bob.username not in alice_ws.view


async def test_since_resumes_exactly_and_fresh_connect_shows_history(
    daphne, ws_connect
):
    """A reconnect gets what it missed, and only that; a newcomer the backlog."""
    room = new_room(daphne)
    alice = new_account(daphne.base_url, "alice")
    bob = new_account(daphne.base_url, "bob")

    alice_ws, welcome = await ws_connect(
        daphne, room, sessionid=alice.sessionid, welcome=True
    )
    assert welcome["messages"] == []
    seen = [await post(alice_ws, "one"), await post(alice_ws, "two")]
    assert [frame["seq"] for frame in seen] == [1, 2]
    await alice_ws.close()

    bob_ws, _ = await ws_connect(daphne, room, sessionid=bob.sessionid, welcome=True)
    missed = [await post(bob_ws, "three"), await post(bob_ws, "four")]

    _, resumed = await ws_connect(
        daphne, room, sessionid=alice.sessionid, query="since=2", welcome=True
    )
    assert resumed["messages"] == missed
    assert resumed["has_more"] is True

    _, fresh = await ws_connect(daphne, room, sessionid=alice.sessionid, welcome=True)
    assert fresh["messages"] == seen + missed
    assert fresh["has_more"] is False


async def test_bad_json_gets_an_error_frame_and_the_socket_stays_usable(
    daphne, ws_connect
):
    room = new_room(daphne)
    alice = new_account(daphne.base_url, "alice")
    socket, _ = await ws_connect(daphne, room, sessionid=alice.sessionid, welcome=True)

    await socket.send_text('{"type": "message", "message": ')
    assert_event(await socket.receive(), "error", code="bad_json", ref=None)

    frame = await post(socket, "still here")
    assert_event(frame, "message", user=alice.username, seq=1)


@pytest.mark.parametrize("command", [None, PLAIN_DAPHNE_COMMAND])
async def test_repeated_bad_frames_close_with_1008_under_either_command(
    daphne_factory, ws_connect, command
):
    server = daphne_factory({"CHAT_BAD_FRAMES_PER_MINUTE": "2"}, command=command)
    room = new_room(server)
    alice = new_account(server.base_url, "alice")
    socket, _ = await ws_connect(server, room, sessionid=alice.sessionid, welcome=True)
    for _ in range(3):
        await socket.send_text("{oops")
    code, frames = await socket.receive_close()
    assert code == 1008
    assert [frame["code"] for frame in frames] == ["bad_json"] * 3
    # The worker is fine: a new socket posts.
    again, _ = await ws_connect(server, room, sessionid=alice.sessionid, welcome=True)
    assert_event(await post(again, "after"), "message", seq=1)


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------


async def test_sockets_from_one_address_over_the_cap_close_with_4429(
    daphne_factory, ws_connect
):
    server = daphne_factory({"CHAT_MAX_CONNECTIONS_PER_ADDRESS": "2"})
    room = new_room(server)
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    first, _ = await ws_connect(server, room, sessionid=alice.sessionid, welcome=True)
    await ws_connect(server, room, sessionid=bob.sessionid, welcome=True)
    # A third user, the same address (loopback): one too many.
    carol = new_account(server.base_url, "carol")
    third = await ws_connect(server, room, sessionid=carol.sessionid)
    code, _ = await third.receive_close()
    assert code == 4429
    # A socket that closes makes room for the next, once its row is gone.
    await first.close()
    welcome = None
    for _ in range(50):
        again = await ws_connect(server, room, sessionid=carol.sessionid)
        try:
            welcome = await again.receive_type("welcome")
            break
        except ConnectionClosed as closed:
            assert closed.rcvd.code == 4429
        await asyncio.sleep(0.1)
    assert welcome is not None, "carol was never let in after alice left"
    assert "Traceback" not in server.output()


async def test_anonymous_socket_is_closed_with_4401(daphne, ws_connect):
    socket = await ws_connect(daphne, "general")
    assert await socket.receive_close() == (4401, [])


async def test_unknown_room_is_closed_with_4404(daphne, ws_connect):
    alice = new_account(daphne.base_url, "alice")
    socket = await ws_connect(daphne, "no-such-room", sessionid=alice.sessionid)
    assert await socket.receive_close() == (4404, [])


async def test_foreign_origin_is_refused_at_the_handshake(daphne, ws_connect):
    """Cross-site WebSocket hijacking: a valid cookie from another site's page."""
    alice = new_account(daphne.base_url, "alice")
    with pytest.raises(InvalidStatus) as refused:
        await ws_connect(
            daphne,
            "general",
            sessionid=alice.sessionid,
            origin="http://evil.example",
        )
    assert refused.value.response.status_code == 403


# ---------------------------------------------------------------------------
# Pages and static files
# ---------------------------------------------------------------------------


def test_room_page_loads_its_scripts_served_by_daphne(daphne):
    """Under DEBUG a bare daphne must serve /static/ itself, or the page is dead."""
    alice = new_account(daphne.base_url, "alice")
    page = signed_in_session(daphne.base_url, alice.sessionid).get("/chat/general/")
    assert page.status == 200
    assert page.url == f"{daphne.base_url}/chat/general/"  # not sent to the login
    assert "/static/chat/room.js" in page.text

    # An ES module: a browser runs it only when it is served as JavaScript.
    script = HttpSession(daphne.base_url).get("/static/chat/room.js")
    assert script.status == 200
    assert "javascript" in script.headers.get("Content-Type", "")
    assert 'from "./connection.js"' in script.text
    imported = HttpSession(daphne.base_url).get("/static/chat/connection.js")
    assert imported.status == 200
    assert "javascript" in imported.headers.get("Content-Type", "")
    assert "new WebSocket(" in imported.text


# ---------------------------------------------------------------------------
# Two workers
# ---------------------------------------------------------------------------


async def test_two_workers_share_one_database_and_redis(daphne_factory, ws_connect):
    """Horizontal scaling: presence and messages cross from worker to worker."""
    redis_url = daphne_factory.new_redis_url()
    one = daphne_factory(redis_url=redis_url)
    two = daphne_factory(redis_url=redis_url, db_path=one.db_path)
    alice = new_account(one.base_url, "alice")
    bob = new_account(two.base_url, "bob")

    alice_ws, _ = await ws_connect(
        one, "general", sessionid=alice.sessionid, welcome=True
    )
    bob_ws, welcome = await ws_connect(
        two, "general", sessionid=bob.sessionid, welcome=True
    )
    assert welcome["members"] == sorted([alice.username, bob.username])
    assert welcome["member_count"] == 2
    # bob's diff crosses from worker two to alice on worker one.
    diff = await alice_ws.wait_presence(joins=[bob.username])
    assert diff["members"] == 2

    first = await post(alice_ws, "from worker one")
    assert await bob_ws.receive() == first
    second = await post(bob_ws, "from worker two")
    assert await alice_ws.receive() == second
    assert second["seq"] == first["seq"] + 1

    await bob_ws.close()
    diff = await alice_ws.wait_presence(leaves=[bob.username])
    assert diff["members"] == 1
    assert alice_ws.view == {alice.username}


def log_in(base_url: str, username: str) -> HttpSession:
    """Signs in once more, as a second device would: a session of its own."""
    session = HttpSession(base_url)
    response = session.post_form(
        "/accounts/login/", {"username": username, "password": PASSWORD}
    )
    assert response.status == 200 and session.cookie("sessionid"), response.text
    return session


def log_out(session: HttpSession) -> None:
    """Logs out as the page's button does: a POST with the CSRF token."""
    session.get("/chat/")
    response = session.request(
        "/accounts/logout/",
        data={"csrfmiddlewaretoken": session.cookie("csrftoken")},
        headers={"Referer": session.base_url + "/chat/"},
    )
    assert response.status == 200, response.text


async def test_logout_and_a_new_password_close_sockets_on_every_worker(
    daphne_factory, ws_connect
):
    """A session that ends closes its sockets with 4401 on whichever worker."""
    redis_url = daphne_factory.new_redis_url()
    one = daphne_factory(redis_url=redis_url)
    two = daphne_factory(redis_url=redis_url, db_path=one.db_path)
    alice = new_account(one.base_url, "alice")
    laptop = signed_in_session(one.base_url, alice.sessionid)
    phone = log_in(two.base_url, alice.username)

    laptop_on_one = await ws_connect(one, "general", sessionid=alice.sessionid)
    laptop_on_two = await ws_connect(two, "general", sessionid=alice.sessionid)
    phone_on_two = await ws_connect(
        two, "general", sessionid=phone.cookie("sessionid"), welcome=True
    )
    for socket in (laptop_on_one, laptop_on_two):
        await socket.receive_type("welcome")

    log_out(laptop)
    for socket in (laptop_on_one, laptop_on_two):
        code, _ = await socket.receive_close()
        assert code == 4401
    # The phone's session was not logged out.
    await post(phone_on_two[0], "the phone still chats")

    # A new password set through the other worker ends the phone's session too.
    changed = signed_in_session(one.base_url, phone.cookie("sessionid")).post_form(
        "/accounts/password_change/",
        {
            "old_password": PASSWORD,
            "new_password1": "a-New-pass-43",
            "new_password2": "a-New-pass-43",
        },
    )
    assert changed.status == 200 and "password_change/done" in changed.url
    code, _ = await phone_on_two[0].receive_close()
    assert code == 4401


# ---------------------------------------------------------------------------
# Moderation across a Redis restart
# ---------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone, so that it can be stopped or hung."""
    redis = RedisServer()
    redis.start()
    try:
        yield redis
    finally:
        if redis.process is not None and redis.process.poll() is None:
            redis.process.send_signal(signal.SIGCONT)  # if a test hung it
        redis.stop()


async def connect_when_ready(server, ws_connect, room: str, sessionid: str, **options):
    """Connects as a page does after a 1013: again, until the welcome comes."""
    for _ in range(100):
        socket = await ws_connect(server, room, sessionid=sessionid, **options)
        try:
            frame = await socket.receive()
        except ConnectionClosed:
            frame = None
        if frame is not None and frame["type"] == "welcome":
            return socket, frame
        await asyncio.sleep(0.2)
    raise AssertionError("the worker never took sockets again")


DELETE_SCRIPT = """
from chat import moderation
from chat.models import Message
message = Message.objects.get(room__slug={room!r}, seq={seq})
moderation.message_delete(message=message, actor=None)
"""


async def test_a_deletion_lost_while_redis_was_away_reaches_the_resuming_page(
    daphne_factory, ws_connect, own_redis
):
    redis = own_redis
    server = daphne_factory(redis_url=redis.url)
    room = new_room(server)
    alice = new_account(server.base_url, "alice")
    socket, welcome = await ws_connect(
        server, room, sessionid=alice.sessionid, welcome=True
    )
    seen = welcome["deletions"]
    posted = [await post(socket, f"m{n}") for n in range(3)]

    redis.stop()
    code, _ = await socket.receive_close(timeout=30)
    assert code == 1013
    # A moderator deletes m1 meanwhile: stored, but its live event has no
    # Redis to go through, and the page was away anyway.
    server.manage("shell", "-c", DELETE_SCRIPT.format(room=room, seq=2))
    redis.start()

    # Reconnect as the page does, until the worker has Redis back.
    query = f"since={posted[-1]['seq']}&deletions={seen}"
    _, welcome = await connect_when_ready(
        server, ws_connect, room, alice.sessionid, query=query
    )
    assert welcome["deleted"] == [{"id": posted[1]["id"], "seq": 2}]
    assert welcome["deletions"] == seen + 1
    assert welcome["messages"] == []


async def test_one_client_id_sent_through_two_workers_at_once_is_stored_once(
    daphne_factory, ws_connect
):
    """A page that resends on another worker while the first try is in flight:
    one row, and both sockets get that message (the page shows it once: the
    retry is broadcast again, and a page drops a seq it has)."""
    redis_url = daphne_factory.new_redis_url()
    one = daphne_factory(redis_url=redis_url)
    two = daphne_factory(redis_url=redis_url, db_path=one.db_path)
    room = new_room(one)
    alice = new_account(one.base_url, "alice")
    for attempt in range(5):
        here = await ws_connect(one, room, sessionid=alice.sessionid, welcome=True)
        there = await ws_connect(two, room, sessionid=alice.sessionid, welcome=True)
        client_id = f"race-{attempt}"
        frame = {
            "type": "message",
            "message": f"once {attempt}",
            "client_id": client_id,
        }
        await asyncio.gather(here[0].send(frame), there[0].send(frame))
        copies = []
        for socket, welcome in (here, there):
            # The last attempt's retry may reach this socket too, as a page
            # gets a seq it already has.
            copy = await socket.receive_type("message")
            while copy["seq"] <= welcome["last_seq"]:
                copy = await socket.receive_type("message")
            assert copy["client_id"] == client_id
            copies.append((copy["id"], copy["seq"], copy["message"]))
        assert copies[0] == copies[1]
        await here[0].close()
        await there[0].close()
    # A fresh socket's backlog: each text once, in order, no gap.
    _, welcome = await ws_connect(one, room, sessionid=alice.sessionid, welcome=True)
    assert [(m["seq"], m["message"]) for m in welcome["messages"]] == [
        (n + 1, f"once {n}") for n in range(5)
    ]
    for server in (one, two):
        assert "Traceback" not in server.output(limit=None)


async def test_a_resend_after_a_kill_between_store_and_broadcast_reaches_the_room(
    daphne_factory, ws_connect, own_redis
):
    """The worst moment for a kill: the post is stored, its broadcast has not
    gone out. The page resends it with its client_id through another worker:
    one row, the sender gets the original message, and so does the room,
    which had not heard it (a quiet room has no later seq to show the hole)."""
    one = daphne_factory(redis_url=own_redis.url)
    two = daphne_factory(redis_url=own_redis.url, db_path=one.db_path)
    room = new_room(one)
    alice = new_account(one.base_url, "alice")
    bob = new_account(one.base_url, "bob")
    sender, _ = await ws_connect(one, room, sessionid=alice.sessionid, welcome=True)
    listener, _ = await ws_connect(two, room, sessionid=bob.sessionid, welcome=True)
    before = await post(sender, "heard by all")
    assert (await listener.receive_type("message"))["id"] == before["id"]
    frame = {"type": "message", "message": "stored, not heard", "client_id": "dies-1"}
    layer_redis = redis.Redis.from_url(own_redis.url)
    counted = posts_counted(layer_redis)

    # Held up by the database until Redis takes no more writes, the post is
    # stored and its broadcast waits: the worker is killed at that moment.
    holder = sqlite3.connect(one.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        await sender.send(frame)
        await until(lambda: posts_counted(layer_redis) != counted, timeout=10)
        assert posts_counted(layer_redis) != counted, "the post never got counted"
        layer_redis.client_pause(30_000, all=False)  # writes only
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    try:
        await until(lambda: stored_ids(one.db_path, "dies-1"), timeout=10)
        assert stored_ids(one.db_path, "dies-1"), "the post was never stored"
        one.process.kill()
        one.process.wait(10)
    finally:
        layer_redis.client_unpause()
    assert await listener.receive_nothing(timeout=1)

    # The page reconnects to the other worker and resends what had no answer.
    again, welcome = await ws_connect(
        two,
        room,
        sessionid=alice.sessionid,
        welcome=True,
        query=f"since={before['seq']}",
    )
    (original_id,) = stored_ids(one.db_path, "dies-1")
    assert [m["id"] for m in welcome["messages"]] == [original_id]
    acknowledged = await again.post(frame["message"], client_id="dies-1")
    assert (acknowledged["id"], acknowledged["seq"]) == (original_id, before["seq"] + 1)
    heard = await listener.receive_type("message")
    assert (heard["id"], heard["client_id"]) == (original_id, "dies-1")
    assert stored_ids(one.db_path, "dies-1") == [original_id]
    assert "Traceback" not in two.output(limit=None)


def posts_counted(client: redis.Redis) -> dict[bytes, int]:
    """The per-user post counters (chat.limits) in the layer's Redis."""
    return {key: int(client.get(key)) for key in client.keys("*:rate:*")}


def stored_ids(db_path: Path, client_id: str) -> list[int]:
    with sqlite3.connect(db_path) as connection:
        rows = connection.execute(
            "SELECT id FROM chat_message WHERE client_id = ?", (client_id,)
        ).fetchall()
    return [row[0] for row in rows]


# ---------------------------------------------------------------------------
# A Redis that hangs
# ---------------------------------------------------------------------------

HANG_SECONDS = 15


async def test_a_hung_redis_gets_unavailable_in_seconds_and_the_worker_recovers(
    daphne_factory, ws_connect, own_redis
):
    redis = own_redis
    server = daphne_factory(redis_url=redis.url)
    room, quiet_room = new_room(server), new_room(server)
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    poster, _ = await ws_connect(server, room, sessionid=alice.sessionid, welcome=True)
    reader, _ = await ws_connect(server, room, sessionid=bob.sessionid, welcome=True)
    pid = server.process.pid

    redis.process.send_signal(signal.SIGSTOP)
    stopped_at = asyncio.get_running_loop().time()
    try:
        # A room this worker has not joined needs Redis: 1013, not a hang
        # until the connection's 30 s timeout.
        newcomer = await ws_connect(server, quiet_room, sessionid=bob.sessionid)
        code, frames = await newcomer.receive_close(timeout=HANG_SECONDS)
        assert (code, [f["code"] for f in frames]) == (1013, ["unavailable"])
        # A post needs Redis for its count: unavailable, never a fake ack.
        await poster.send({"type": "message", "message": "during", "client_id": "d"})
        code, frames = await poster.receive_close(timeout=HANG_SECONDS)
        assert (code, [f["code"] for f in frames]) == (1013, ["unavailable"])
        left = HANG_SECONDS - (asyncio.get_running_loop().time() - stopped_at)
        await asyncio.sleep(max(0.0, left))
    finally:
        redis.process.send_signal(signal.SIGCONT)

    # Back: the page reconnects, resends with the same client_id, and the
    # socket that waited through it all hears it. No worker restarted.
    again, welcome = await connect_when_ready(
        server, ws_connect, room, alice.sessionid, query="since=0"
    )
    assert welcome["messages"] == []  # "during" was never stored
    sent = await again.post("during", client_id="d")
    assert sent["message"] == "during"
    assert (await reader.receive())["id"] == sent["id"]
    assert server.process.pid == pid and server.process.poll() is None


async def test_a_resume_while_posts_go_on_ends_with_each_message_once_in_order(
    daphne_factory, ws_connect
):
    """Offline while 50 are posted, back in the middle of them: the welcome and
    the live messages together, taken by seq as the page takes them, are every
    message once, in order, then the live ones."""
    server = daphne_factory(
        {"CHAT_RATE_MESSAGES": "1000"}, redis_url=daphne_factory.new_redis_url()
    )
    room = new_room(server)
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    poster, _ = await ws_connect(server, room, sessionid=bob.sessionid, welcome=True)
    reader, _ = await ws_connect(server, room, sessionid=alice.sessionid, welcome=True)
    last = (await post(poster, "before"))["seq"]
    assert (await reader.receive())["seq"] == last
    await reader.close()

    under_way = asyncio.Event()

    async def post_fifty() -> list[int]:
        seqs = []
        for n in range(50):
            seqs.append((await post(poster, f"m{n}"))["seq"])
            if n == 9:
                under_way.set()  # the resume comes once ten are stored
        return seqs

    posting = asyncio.ensure_future(post_fifty())
    await under_way.wait()
    again, welcome = await ws_connect(
        server, room, sessionid=alice.sessionid, welcome=True, query=f"since={last}"
    )
    posted = await posting
    live = await post(poster, "live")
    seen: dict[int, str] = {m["seq"]: m["message"] for m in welcome["messages"]}
    while live["seq"] not in seen:
        frame = await again.receive()
        if frame["type"] == "message":
            assert frame["seq"] > last
            seen.setdefault(frame["seq"], frame["message"])
    assert sorted(seen) == [*posted, live["seq"]] == list(range(last + 1, last + 52))
    assert [seen[seq] for seq in posted] == [f"m{n}" for n in range(50)]
    assert len(welcome["messages"]) >= 10


# ---------------------------------------------------------------------------
# A database that is locked
# ---------------------------------------------------------------------------


async def test_a_post_while_the_database_is_locked_is_unavailable_then_stored_once(
    daphne_factory, ws_connect
):
    """Another process holds SQLite's write lock for 10 s, longer than the
    worker's busy timeout: the post is refused, not broadcast, the worker still
    answers, and the resend afterwards is stored once."""
    server = daphne_factory({"DJANGO_DB_TIMEOUT": "2"})
    room = new_room(server)
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    poster, _ = await ws_connect(server, room, sessionid=alice.sessionid, welcome=True)
    reader, _ = await ws_connect(server, room, sessionid=bob.sessionid, welcome=True)
    frame = {"type": "message", "message": "while locked", "client_id": "locked-1"}

    holder = sqlite3.connect(server.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the write lock
    try:
        locked_at = asyncio.get_running_loop().time()
        await poster.send(frame)
        error = await poster.receive(timeout=15)
        assert (error["type"], error["code"], error["ref"]) == (
            "error",
            "unavailable",
            "locked-1",
        )
        # The worker answers meanwhile.
        status, _, _ = await asyncio.to_thread(http_get, server, "/healthz")
        assert status == 200
        assert await reader.receive_nothing(timeout=0.5)
        left = 10 - (asyncio.get_running_loop().time() - locked_at)
        await asyncio.sleep(max(0.0, left))
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    stored = await poster.post(frame["message"], client_id="locked-1")
    assert (stored["type"], stored["client_id"]) == ("message", "locked-1")
    assert (await reader.receive())["id"] == stored["id"]
    again = await poster.post(frame["message"], client_id="locked-1")
    assert again["id"] == stored["id"]  # the same row, acknowledged again
    _, welcome = await ws_connect(server, room, sessionid=bob.sessionid, welcome=True)
    assert [m["message"] for m in welcome["messages"]] == ["while locked"]
    assert "Traceback" not in server.output(limit=None)


def http_get(server, path: str) -> tuple[int, dict, bytes]:
    with urllib.request.urlopen(server.base_url + path, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test alone, so that it can be stopped."""
    folder = Path(tempfile.mkdtemp(prefix="chat-pg-"))
    folder.chmod(0o755)  # run as the postgres user, it must reach its folder
    server = PostgresServer(folder / "postgres")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def test_a_post_while_postgresql_is_down_is_unavailable_then_stored_once(
    daphne_factory, ws_connect, postgres
):
    server = daphne_factory(
        {"DATABASE_URL": postgres.url, "CHAT_WORKER_LEASE_SECONDS": "3"}
    )
    room = new_room(server)
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    carol = new_account(server.base_url, "carol")
    poster, _ = await ws_connect(server, room, sessionid=alice.sessionid, welcome=True)
    reader, _ = await ws_connect(server, room, sessionid=bob.sessionid, welcome=True)
    leaving, _ = await ws_connect(server, room, sessionid=carol.sessionid, welcome=True)
    await poster.wait_presence(joins=[carol.username])
    frame = {"type": "message", "message": "while down", "client_id": "down-1"}

    postgres.stop()
    try:
        await poster.send(frame)
        error = await poster.receive(timeout=15)
        assert (error["type"], error["code"], error["ref"]) == (
            "error",
            "unavailable",
            "down-1",
        )
        assert await reader.receive_nothing(timeout=0.5)
        status, _, _ = await asyncio.to_thread(http_get, server, "/healthz")
        assert status == 200
        # A new socket needs the database too: 1013, to try again later.
        newcomer = await ws_connect(server, room, sessionid=bob.sessionid)
        code, frames = await newcomer.receive_close(timeout=15)
        assert (code, [f["code"] for f in frames]) == (1013, ["unavailable"])
        # A socket that closes now cannot have its presence row deleted.
        await leaving.close()
    finally:
        postgres.start()

    # Once the database answers, the worker loop forgets that socket: carol
    # leaves, rather than staying online until the worker's lease ends.
    await poster.wait_presence(leaves=[carol.username], timeout=15)
    stored = await poster.post(frame["message"], client_id="down-1")
    assert (stored["type"], stored["client_id"]) == ("message", "down-1")
    assert (await reader.receive())["id"] == stored["id"]
    _, welcome = await ws_connect(server, room, sessionid=bob.sessionid, welcome=True)
    assert [m["message"] for m in welcome["messages"]] == ["while down"]
