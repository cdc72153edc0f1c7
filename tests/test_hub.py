"""The fan-out hub under the layer's group API, and the sockets' bounded outboxes.

Run on the in-memory layer and on channels_redis with a real Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from channels.layers import get_channel_layer
from django.db import connection
from django.test.utils import CaptureQueriesContext

from chat import metrics, presence, protocol, services
from chat.broadcast import broadcast_room_async
from chat.hub import GROUP_KEY
from chat.models import Room
from tests.conftest import assert_event, db, post, until

pytestmark = pytest.mark.django_db(transaction=True)


def hub():
    return get_channel_layer().hub


def typing(user: str) -> dict:
    return protocol.event_typing(user=user)


async def test_a_room_broadcast_reaches_each_socket_once(connect, alice, bob, room):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    message = await post(a, "hello")
    assert await b.receive() == message
    assert await a.receive_nothing() and await b.receive_nothing()


async def test_a_socket_in_two_rooms_gets_each_rooms_broadcast_once(
    connect, alice, bob, room
):
    await db(Room.objects.create, slug="other")
    a_lobby, _ = await connect(alice)
    a_other, _ = await connect(alice, room="other")
    b_other, _ = await connect(bob, room="other")
    in_other = await post(b_other, "in other")
    assert await a_other.receive() == in_other
    assert await a_lobby.receive_nothing(), "no leak into the other room"
    in_lobby = await post(a_lobby, "in lobby")
    assert in_lobby["room"] == "lobby"
    assert await a_other.receive_nothing() and await b_other.receive_nothing()


async def test_a_socket_closing_mid_broadcast_breaks_nothing(connect, alice, bob, room):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    leaving, _ = await connect(bob)
    group = protocol.room_group_name("lobby")

    async def send_all() -> None:
        for n in range(20):
            await broadcast_room_async("lobby", typing(f"u{n}"))

    # Close one socket while broadcasts to its room are on their way.
    sending = asyncio.ensure_future(send_all())
    await leaving.close()
    await sending
    for client in (a, b):
        users = [(await client.receive())["user"] for _ in range(20)]
        assert users == [f"u{n}" for n in range(20)]
    assert len(hub().members[group]) == 2
    assert await a.receive_nothing()


async def test_a_closed_socket_leaves_the_hub(connect, alice, room):
    a, _ = await connect(alice)
    group = protocol.room_group_name("lobby")
    assert len(hub().members[group]) == 1 and len(hub().sinks) == 1
    await a.close()
    assert group not in hub().members
    assert hub().sinks == {}


async def test_a_kick_still_takes_the_consumers_own_path(connect, alice, room):
    """Messages the hub does not take itself (a kick) reach the consumer's handler."""
    from chat.broadcast import send_kick_async

    a, _ = await connect(alice)
    await send_kick_async(alice.pk, "lobby")
    assert await a.receive_close() == protocol.CLOSE_FORBIDDEN


async def test_a_channel_without_a_sink_keeps_the_stock_path(connect, alice, room):
    """A plain listener on the layer (no hub sink) still gets group messages."""
    layer = get_channel_layer()
    channel = await layer.new_channel()
    group = protocol.room_group_name("lobby")
    await layer.group_add(group, channel)
    a, _ = await connect(alice)
    message = await post(a, "to everyone")
    received = await asyncio.wait_for(layer.receive(channel), 3)
    assert json.loads(received["text"]) == message
    await layer.group_discard(group, channel)


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
async def test_a_message_a_socket_fails_on_does_not_stop_the_hubs_reading(
    connect, alice, room, monkeypatch
):
    """The hub reads one worker's broadcasts for all its sockets: one message
    a socket cannot take (one from a newer release in a rolling deploy) must
    not leave every socket of the worker open and deaf."""
    from chat.consumers import ChatConsumer

    a, _ = await connect(alice)
    deliver = ChatConsumer.hub_deliver

    def fails_on_the_odd_one(self, message: dict) -> bool:
        if message.get("odd"):
            raise KeyError("text")
        return deliver(self, message)

    monkeypatch.setattr(ChatConsumer, "hub_deliver", fails_on_the_odd_one)
    await get_channel_layer().group_send(
        protocol.room_group_name("lobby"), {"type": "chat.event", "odd": True}
    )
    assert_event(await post(a, "heard after it"), "message", message="heard after it")


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
async def test_redis_holds_one_group_member_per_worker_not_per_socket(
    connect, make_user, room, redis_server
):
    import redis.asyncio

    for index in range(5):
        await connect(await db(make_user, f"user{index}"))
    layer = get_channel_layer()
    client = redis.asyncio.from_url(redis_server.url)
    try:
        key = layer._group_key(protocol.room_group_name("lobby"))
        assert await client.zcard(key) == 1
    finally:
        await client.aclose()


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
async def test_sockets_opening_at_once_each_get_their_users_pushes(
    connect, make_user, room, redis_server
):
    import redis.asyncio

    from chat.broadcast import send_to_user_async

    users = [await db(make_user, f"user{index:02d}") for index in range(30)]
    # Joined at once: their user groups go upstream together, in one pipeline.
    opened = await asyncio.gather(*(connect(user) for user in users))
    layer = get_channel_layer()
    client = redis.asyncio.from_url(redis_server.url)
    try:
        for user in users:
            key = layer._group_key(protocol.user_group_name(user.pk))
            assert await client.zcard(key) == 1
            assert 0 < await client.ttl(key) <= layer.group_expiry
    finally:
        await client.aclose()
    for user, (socket, _) in zip(users, opened, strict=True):
        await send_to_user_async(
            user.pk, protocol.event_push(event="hello", data=user.username)
        )
        assert_event(await socket.receive_type("push"), "push", data=user.username)


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
async def test_a_refresh_joins_every_stale_group_again_in_few_round_trips(
    connect, make_user, room, redis_server
):
    """Redis expires a group a worker does not renew: the worker loop's refresh
    joins each again, all of them in a pipeline or two, not one trip each."""
    import redis.asyncio

    users = [await db(make_user, f"user{index:02d}") for index in range(20)]
    sockets = await asyncio.gather(*(connect(user) for user in users))
    layer = get_channel_layer()
    keys = [layer._group_key(protocol.user_group_name(user.pk)) for user in users]
    client = redis.asyncio.from_url(redis_server.url)
    pipelines = 0
    original = layer._group_add_many

    async def counted(joins):
        nonlocal pipelines
        pipelines += 1
        await original(joins)

    layer._joins.many = counted  # one call per round trip
    try:
        await client.delete(*keys)  # as if they had expired
        joined = await layer.hub.refresh(older_than=0)
        assert joined == len(layer.hub.joined) >= len(keys)
        for key in keys:
            assert await client.zcard(key) == 1
            assert 0 < await client.ttl(key) <= layer.group_expiry
        assert pipelines <= 2, f"{pipelines} round trips for {joined} groups"
    finally:
        await client.aclose()
    assert len(sockets) == len(users)


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
async def test_a_backlog_for_this_process_comes_in_few_round_trips_each_in_order(
    channel_layer, redis_server
):
    """A worker's channels share one Redis key: a backlog in it is read a
    batch a round trip, each channel's messages in the order they were sent."""
    import redis.asyncio

    layer = get_channel_layer()
    first, second = await layer.new_channel(), await layer.new_channel()
    for number in range(150):
        channel = first if number % 2 == 0 else second
        await layer.send(channel, {"type": "numbered", "number": number})
    client = redis.asyncio.from_url(redis_server.url)
    try:
        before = (await client.info("stats"))["total_commands_processed"]
        got_first = [(await layer.receive(first))["number"] for _ in range(75)]
        got_second = [(await layer.receive(second))["number"] for _ in range(75)]
        commands = (await client.info("stats"))["total_commands_processed"] - before
    finally:
        await client.aclose()
    assert got_first == list(range(0, 150, 2))
    assert got_second == list(range(1, 150, 2))
    # Two batches of a blocking pop and a pop of the rest, and the INFO.
    assert commands <= 5, f"{commands} Redis commands to read 150 messages"


@contextlib.asynccontextmanager
async def round_trips(layer) -> AsyncIterator[list[int]]:
    """Counts the Redis round trips `layer` makes meanwhile (on its first
    server): a command or a pipeline takes a connection from the pool each."""
    pool = layer.connection(0).connection_pool
    trips = [0]
    get_connection = pool.get_connection

    async def counted(*args, **kwargs):
        trips[0] += 1
        return await get_connection(*args, **kwargs)

    pool.get_connection = counted
    try:
        yield trips
    finally:
        pool.get_connection = get_connection


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
async def test_a_group_send_to_three_workers_takes_two_round_trips(
    channel_layer, redis_server, settings
):
    """Three layers on one Redis are three workers in one room's group."""
    from tests.conftest import redis_layer_config

    names = ["default", "second", "third"]
    settings.CHANNEL_LAYERS = {
        name: redis_layer_config(redis_server.url) for name in names
    }
    layers = [get_channel_layer(name) for name in names]
    channels = [await layer.new_channel() for layer in layers]
    for layer, channel in zip(layers, channels, strict=True):
        await layer.group_add("room.three", channel)
    async with round_trips(layers[0]) as trips:
        await layers[0].group_send("room.three", {"type": "chat.event", "text": "x"})
    try:
        received = [
            await layer.receive(channel)
            for layer, channel in zip(layers, channels, strict=True)
        ]
    finally:
        for layer in layers[1:]:
            await layer.close_pools()
    assert [message["text"] for message in received] == ["x", "x", "x"]
    assert trips == [2], f"{trips[0]} round trips for one group_send"


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
async def test_messages_to_many_groups_go_in_two_round_trips_each_in_order(
    channel_layer, redis_server, settings
):
    """What a worker's sender has queued (a write round's rooms, a busy
    worker's rounds) goes out together; each channel pops its messages in
    the order they were queued, however many share one script."""
    from tests.conftest import redis_layer_config

    names = ["default", "second"]
    settings.CHANNEL_LAYERS = {
        name: redis_layer_config(redis_server.url) for name in names
    }
    layers = [get_channel_layer(name) for name in names]
    channels = [await layer.new_channel() for layer in layers]
    # Both workers are in room.a, only the second in room.b.
    await layers[0].group_add("room.a", channels[0])
    await layers[1].group_add("room.a", channels[1])
    await layers[1].group_add("room.b", channels[1])
    sends = [
        ("room.a" if n % 3 else "room.b", {"type": "chat.event", "text": str(n)})
        for n in range(60)
    ]
    async with round_trips(layers[0]) as trips:
        await layers[0].group_send_many(sends)
    try:
        first = [(await layers[0].receive(channels[0]))["text"] for _ in range(40)]
        second = [(await layers[1].receive(channels[1]))["text"] for _ in range(60)]
    finally:
        await layers[1].close_pools()
    assert first == [str(n) for n in range(60) if n % 3]
    assert second == [str(n) for n in range(60)]
    assert trips == [2], f"{trips[0]} round trips for {len(sends)} group messages"


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
async def test_a_redis_server_down_loses_only_the_messages_it_carries(
    channel_layer, redis_server
):
    """Sharded over two servers, one down: the group messages of the other
    still go out, and the sender hears of the failure."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from chat.hub import RedisHubLayer
    from harness.processes import free_port

    hosts = [
        {"address": redis_server.url, "socket_timeout": 2},
        {"address": f"redis://127.0.0.1:{free_port()}", "socket_connect_timeout": 2},
    ]
    # A worker whose channels live on the server that is up (index 0).
    while True:
        layer = RedisHubLayer(hosts=hosts)
        channel = await layer.new_channel()
        if layer.consistent_hash(layer.non_local_name(channel)) == 0:
            break
    live, dead = (
        next(
            f"room.s{n}" for n in range(100) if layer.consistent_hash(f"room.s{n}") == i
        )
        for i in (0, 1)
    )
    await layer.group_add(live, channel)
    try:
        with pytest.raises(RedisConnectionError):
            await layer.group_send_many(
                [
                    (dead, {"type": "chat.event", "text": "lost"}),
                    (live, {"type": "chat.event", "text": "1"}),
                    (live, {"type": "chat.event", "text": "2"}),
                ]
            )
        received = [
            (await asyncio.wait_for(layer.receive(channel), 5))["text"]
            for _ in range(2)
        ]
    finally:
        await layer.close_pools()
    assert received == ["1", "2"]


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
async def test_a_worker_with_no_socket_in_a_room_receives_nothing_for_it(
    connect, alice, bob, room, redis_server, settings
):
    """Two layers on one Redis are two workers; only one has a socket in the room."""
    import redis.asyncio

    from tests.conftest import redis_layer_config

    settings.CHANNEL_LAYERS = {
        "default": redis_layer_config(redis_server.url),
        "second": redis_layer_config(redis_server.url),
    }
    await db(Room.objects.create, slug="other")
    a, _ = await connect(alice)
    second = get_channel_layer("second")
    b_channel = await second.new_channel()
    second.hub.attach(b_channel, _Recorder())
    await second.group_add(protocol.room_group_name("other"), b_channel)
    await post(a, "lobby only")
    client = redis.asyncio.from_url(redis_server.url)
    try:
        lobby_key = get_channel_layer()._group_key(protocol.room_group_name("lobby"))
        members = await client.zrange(lobby_key, 0, -1)
        assert len(members) == 1
        assert not any(
            member.decode().startswith(f"specific.{second.client_prefix}!")
            for member in members
        )
        assert second.hub.sinks[b_channel].messages == []
    finally:
        await client.aclose()
        await second.group_discard(protocol.room_group_name("other"), b_channel)
        await second.flush()
        await second.close_pools()


class _Recorder:
    def __init__(self) -> None:
        self.messages: list[dict] = []

    def hub_deliver(self, message: dict) -> bool:
        self.messages.append(message)
        return True


async def test_the_group_key_never_reaches_a_socket(connect, alice, bob, room):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    sent = await post(a, "plain")
    frame = await b.receive()
    assert frame == sent and GROUP_KEY not in frame


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


async def test_a_batch_client_gets_queued_events_as_one_array(connect, alice, room):
    a, welcome = await connect(alice, subprotocols=[protocol.SUBPROTOCOL_BATCH])
    assert a.raw[0].startswith("[") and welcome["type"] == "welcome"
    group = protocol.room_group_name("lobby")
    # Queued all at once (no await in between): the writer finds them together.
    for n in range(3):
        hub().dispatch(group, _chat_event(typing(f"u{n}")))
    users = [(await a.receive())["user"] for _ in range(3)]
    assert users == ["u0", "u1", "u2"]
    assert (
        a.raw[-1]
        == "[" + ",".join(protocol.encode(typing(f"u{n}")) for n in range(3)) + "]"
    )


async def test_a_client_without_batches_gets_one_event_per_frame(connect, alice, room):
    a, _ = await connect(alice)
    assert a.raw[0].startswith("{")
    group = protocol.room_group_name("lobby")
    for n in range(3):
        hub().dispatch(group, _chat_event(typing(f"u{n}")))
    users = [(await a.receive())["user"] for _ in range(3)]
    assert users == ["u0", "u1", "u2"]
    assert a.raw[-3:] == [protocol.encode(typing(f"u{n}")) for n in range(3)]


def _chat_event(event: dict) -> dict:
    return {"type": "chat.event", "text": protocol.encode(event)}


# ---------------------------------------------------------------------------
# Slow readers
# ---------------------------------------------------------------------------


async def test_a_socket_over_its_queue_bound_is_closed_as_too_slow(
    connect, alice, bob, room, settings
):
    settings.CHAT_SEND_QUEUE_FRAMES = 5
    slow, _ = await connect(alice)
    other, _ = await connect(bob, room="lobby")
    closes = _slow_closes("frames")
    group = protocol.room_group_name("lobby")
    # Ten events queued before the writer runs: the sixth overflows the bound.
    for n in range(10):
        hub().dispatch(group, _chat_event(typing(f"u{n}")))
    assert await slow.receive_close() == protocol.CLOSE_TOO_SLOW
    assert _slow_closes("frames") == closes + 2, "both sockets fell behind alike"
    assert await other.receive_close() == protocol.CLOSE_TOO_SLOW


async def test_a_slow_socket_does_not_hold_up_the_others(
    connect, alice, bob, room, settings
):
    settings.CHAT_SEND_QUEUE_FRAMES = 5
    slow, _ = await connect(alice)
    fast, _ = await connect(bob)
    group = protocol.room_group_name("lobby")
    slow_sink = next(sink for sink in hub().sinks.values() if sink.user.pk == alice.pk)
    # Only the slow socket's queue is already full.
    for _ in range(5):
        slow_sink.outbox.push(protocol.encode(typing("filler")))
    hub().dispatch(group, _chat_event(typing("everyone")))
    assert await slow.receive_close() == protocol.CLOSE_TOO_SLOW
    assert_event(await fast.receive(), "typing", user="everyone")


def _slow_closes(reason: str) -> float:
    return metrics.SLOW_CLOSES.labels(
        worker=metrics.WORKER_ID, reason=reason
    )._value.get()


# ---------------------------------------------------------------------------
# A cheap connect
# ---------------------------------------------------------------------------


def test_a_socket_is_checked_and_recorded_in_a_fixed_number_of_queries(
    room, alice, bob, monkeypatch
):
    noted: list[tuple[str, str]] = []
    monkeypatch.setattr(
        presence.diffs, "note", lambda slug, user: noted.append((slug, user))
    )
    services.sockets_open([services.SocketRequest("lobby", bob, "b1", "127.0.0.1")])
    with CaptureQueriesContext(connection) as queries:
        ((opened_room, welcome),) = services.sockets_open(
            [services.SocketRequest("lobby", alice, "a1", "127.0.0.1")]
        )
    assert opened_room == room and welcome["members"] == ["alice", "bob"]
    assert noted == [("lobby", "bob"), ("lobby", "alice")]
    # room, ban, [begin, room lock, lease, socket counts, insert, commit],
    # read positions, backlog, members page.
    assert len(queries) == 11, "\n".join(q["sql"] for q in queries)


# ---------------------------------------------------------------------------
# The outbox alone
# ---------------------------------------------------------------------------


def outbox_for(sent: list[str], closed: list[tuple[str, int]], send=None, **kwargs):
    """Returns an outbox that records what it sends and why it closed."""
    from chat.outbox import Outbox, OutboxLimits

    async def send_text(text: str) -> None:
        sent.append(text)

    async def on_overflow(reason: str, dropped: int) -> None:
        closed.append((reason, dropped))

    limits = dict(
        max_frames=100, max_bytes=10_000, stall_seconds=0.3, transport_high_water=1000
    )
    limits.update(kwargs.pop("limits", {}))
    return Outbox(
        send or send_text,
        limits=OutboxLimits(**limits),
        on_overflow=on_overflow,
        **{"batch": False, **kwargs},
    )


async def test_an_outbox_closes_a_socket_whose_transport_does_not_drain():
    sent: list[str] = []
    closed: list[tuple[str, int]] = []
    outbox = outbox_for(sent, closed, backlog=lambda: 5000)
    outbox.start()
    outbox.push('"a"')
    outbox.push('"b"')
    await until(lambda: closed)
    assert closed == [("stalled", 2)] and sent == []


async def test_an_outbox_waits_for_its_transport_and_then_sends_in_order():
    sent: list[str] = []
    closed: list[tuple[str, int]] = []
    backlog = [5000]
    outbox = outbox_for(sent, closed, backlog=lambda: backlog[0], batch=True)
    outbox.start()
    for text in ('"a"', '"b"', '"c"'):
        outbox.push(text)
    await asyncio.sleep(0.1)
    assert sent == []
    backlog[0] = 0
    await until(lambda: sent)
    assert sent == ['["a","b","c"]'] and closed == []


async def test_outboxes_on_a_watched_transport_write_in_rounds_without_a_task_each():
    """On daphne (a transport probe) a send never waits: the flusher's round
    writes every due socket, so 200 sockets hold no writer task between
    broadcasts, and each still gets its frames in order."""
    sent: list[list[str]] = [[] for _ in range(200)]
    closed: list[tuple[str, int]] = []
    before = len(asyncio.all_tasks())
    outboxes = [outbox_for(sent[n], closed, backlog=lambda: 0) for n in range(200)]
    for outbox in outboxes:
        outbox.start()
    assert len(asyncio.all_tasks()) == before
    for text in ('"a"', '"b"', '"c"'):
        for outbox in outboxes:
            outbox.push(text)
    await until(lambda: all(len(frames) == 3 for frames in sent))
    assert all(frames == ['"a"', '"b"', '"c"'] for frames in sent) and not closed
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before


async def test_an_outbox_whose_transport_fills_writes_on_its_own_then_rejoins_rounds():
    sent: list[str] = []
    closed: list[tuple[str, int]] = []
    backlog = [0]
    outbox = outbox_for(sent, closed, backlog=lambda: backlog[0])
    outbox.start()
    outbox.push('"a"')
    await until(lambda: sent)
    backlog[0] = 5000
    outbox.push('"b"')
    outbox.push('"c"')
    await asyncio.sleep(0.1)
    assert sent == ['"a"']
    backlog[0] = 0
    await until(lambda: len(sent) == 3)
    outbox.push('"d"')
    await until(lambda: len(sent) == 4)
    assert sent == ['"a"', '"b"', '"c"', '"d"'] and not closed


async def test_an_outbox_bounds_its_bytes():
    sent: list[str] = []
    closed: list[tuple[str, int]] = []
    outbox = outbox_for(sent, closed, limits={"max_bytes": 10})
    outbox.push('"12345"')
    outbox.push('"67890"')
    await asyncio.sleep(0)
    assert closed == [("bytes", 1)] and len(outbox) == 0


async def test_a_send_that_waits_too_long_counts_as_stalled():
    """Under a server with backpressure (no transport probe) send itself waits."""
    closed: list[tuple[str, int]] = []

    async def never(text: str) -> None:
        await asyncio.sleep(3600)

    outbox = outbox_for([], closed, send=never, limits={"stall_seconds": 0.2})
    outbox.start()
    outbox.push('"a"')
    outbox.push('"b"')
    await until(lambda: closed)
    assert closed == [("stalled", 1)]


async def test_queue_figures_and_slow_closes_reach_the_admin(
    connect, alice, room, settings, admin_client
):
    from chat import worker
    from chat.models import Connection, Worker

    a, _ = await connect(alice)
    group = protocol.room_group_name("lobby")
    for n in range(3):
        hub().dispatch(group, _chat_event(typing(f"u{n}")))
    for _ in range(3):
        await a.receive()
    worker.socket_closed_too_slow()
    assert await worker.report_send_queues() >= 1
    row = await db(Connection.objects.get, user=alice)
    assert (row.queued_events, row.peak_queued_events) == (0, 3)
    lease = await db(Worker.objects.get, id=presence.WORKER_ID)
    assert lease.slow_closes >= 1
    page = await db(admin_client.get, "/admin/chat/connection/")
    assert b"peak queued events" in page.content.lower()
    page = await db(admin_client.get, "/admin/chat/worker/")
    assert b"slow closes" in page.content.lower()


@pytest.mark.parametrize(
    ("batch", "frames"),
    [(False, ['"a"', '"b"', '"last"']), (True, ['["a","b","last"]'])],
)
async def test_finishing_an_outbox_writes_what_it_held_then_the_last_event(
    batch, frames
):
    sent: list[str] = []
    outbox = outbox_for(sent, [], batch=batch, backlog=lambda: 0)
    outbox.start()
    outbox.push('"a"')
    outbox.push('"b"')
    await outbox.finish('"last"')
    assert sent == frames
    outbox.push('"after"')
    await asyncio.sleep(0.1)  # a round would have written it by now
    assert sent == frames


@pytest.mark.parametrize(
    "text", ["", '"a"', "é" * 63, "é" * 64, "x" * 65535, "✓" * 30000]
)
def test_a_prepared_frame_is_the_text_frame_a_websocket_client_reads(text):
    """Byte lengths, not character counts, choose the header (7, 16 or 64 bits)."""
    from websockets.frames import Frame, Opcode
    from websockets.streams import StreamReader

    from chat.transport import prepare_text_frame

    frame = prepare_text_frame(text)
    reader = StreamReader()
    reader.feed_data(frame.data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    with pytest.raises(StopIteration) as parsed:
        next(parser)
    read = parsed.value.value
    assert read.opcode == Opcode.TEXT and read.fin and not read.rsv1
    assert read.data.decode() == text and frame.payload_size == len(text.encode())
    assert reader.at_eof()


async def test_a_write_round_builds_one_frame_for_the_sockets_with_the_same_events():
    """A room's fan-out: the sockets that have the same events queued get the
    very same bytes, built once; a socket with other events or without
    batches gets its own frame."""
    written: list[list[bytes]] = [[] for _ in range(5)]

    def writer(n):
        def write_frame(frame) -> bool:
            written[n].append(frame.data)
            return True

        return write_frame

    sent: list[str] = []
    outboxes = [
        outbox_for(sent, [], backlog=lambda: 0, batch=n != 4, write_frame=writer(n))
        for n in range(5)
    ]
    for outbox in outboxes:
        outbox.start()
    texts = ['"a"', '"b"']
    for n, outbox in enumerate(outboxes):
        for text in texts if n != 3 else [*texts, '"c"']:
            outbox.push(text)
    await until(lambda: all(written[n] for n in range(4)) and len(written[4]) == 2)
    first = written[0][0]
    assert first.endswith(b'["a","b"]')
    assert written[1][0] is first and written[2][0] is first
    assert written[3][0].endswith(b'["a","b","c"]')
    assert [w[-3:] for w in written[4]] == [b'"a"', b'"b"'] and sent == []


async def test_an_outbox_sends_the_text_when_the_transport_takes_no_prepared_frame():
    sent: list[str] = []
    outbox = outbox_for(
        sent, [], backlog=lambda: 0, batch=True, write_frame=lambda frame: False
    )
    outbox.start()
    outbox.push('"a"')
    outbox.push('"b"')
    await until(lambda: sent)
    assert sent == ['["a","b"]']


@pytest.mark.parametrize("finish", [False, True])
async def test_a_batch_larger_than_daphne_sends_goes_out_in_several_frames(finish):
    """daphne refuses to send a message over 1 MiB, and an event's text is UTF-8
    of up to 4 bytes a character: a queue of 300 posts of 2,000 emoji (2.4 MB)
    goes out as several frames under that limit, every event once, in order."""
    sent: list[str] = []
    outbox = outbox_for(
        sent,
        [],
        batch=True,
        backlog=lambda: 0,
        limits={"max_frames": 1000, "max_bytes": 1024 * 1024},
    )
    texts = [json.dumps(f"{n}:" + "😀" * 2000, ensure_ascii=False) for n in range(300)]
    for text in texts:
        outbox.push(text)
    if finish:
        await outbox.finish(texts[-1])
        texts.append(texts[-1])
    else:
        outbox.start()
        await until(lambda: sum(len(json.loads(frame)) for frame in sent) == 300)
    assert len(sent) > 1
    assert all(len(frame.encode()) <= 1024 * 1024 for frame in sent)
    assert [event for frame in sent for event in json.loads(frame)] == [
        json.loads(text) for text in texts
    ]
