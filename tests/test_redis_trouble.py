"""Redis going away and coming back: a clear close, never a hang, nothing lost."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time

import pytest
from channels.layers import get_channel_layer
from django.test import Client as HttpClient

from chat import presence, protocol, tokens, worker
from chat.hub import RedisHubLayer
from chat.models import Connection, Message, Worker
from tests.conftest import RedisServer, db, post, redis_layer_config

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
async def private_redis(settings, channel_layer):
    """A redis-server of this test alone, so it can be stopped and restarted.

    The channel layer points at it for the test, and back afterwards.
    """
    server = RedisServer()
    server.start()
    previous = settings.CHANNEL_LAYERS
    settings.CHANNEL_LAYERS = {"default": redis_layer_config(server.url)}
    yield server
    if server.process is not None and server.process.poll() is None:
        layer = get_channel_layer()
        close_pools = getattr(layer, "close_pools", None)  # pub/sub has none
        if close_pools is not None:
            # After a restart the pool may hold connections the old server
            # closed: flush on new ones.
            await close_pools()
        await layer.flush()
        if close_pools is not None:
            await close_pools()
    settings.CHANNEL_LAYERS = previous
    server.stop()


async def assert_unavailable_close(client) -> None:
    frame = await client.receive_type("error", timeout=10)
    assert frame["code"] == protocol.ERROR_UNAVAILABLE
    assert await client.receive_close(timeout=10) == protocol.CLOSE_TRY_AGAIN_LATER


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
async def test_open_socket_gets_1013_when_redis_goes_away_and_keeps_what_was_stored(
    private_redis, connect, alice, room
):
    a, _ = await connect(alice)
    await post(a, "before the outage")
    private_redis.stop()
    await assert_unavailable_close(a)
    assert await db(Connection.objects.count) == 0, "the socket left presence"
    assert await db(Message.objects.count) == 1
    private_redis.start()


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
async def test_connect_while_redis_is_down_gets_1013_then_works_once_it_is_back(
    private_redis, connect, alice, bob, room
):
    private_redis.stop()
    refused = await connect(alice, welcome=False)
    await assert_unavailable_close(refused)
    assert await db(Connection.objects.count) == 0

    private_redis.start()
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    await a.wait_presence(joins=("bob",))
    sent = await post(b, "back again")
    assert await a.receive() == sent


class RecordingSocket:
    """Stands in for a consumer: records the close code the worker sends."""

    def __init__(self) -> None:
        self.codes: list[int | None] = []

    async def close(self, code: int | None = None) -> None:
        self.codes.append(code)


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
async def test_a_redis_restart_closes_this_workers_sockets_with_1012(private_redis):
    watch = worker.LayerWatch()
    socket = RecordingSocket()
    worker._sockets.add(socket)
    try:
        assert await watch.check() is False, "the first look only learns the run_id"
        assert await watch.check() is False, "same server, nothing to do"
        private_redis.stop()
        assert await watch.check() is False, "down is not a restart (yet)"
        private_redis.start()
        assert await watch.check() is True
        assert socket.codes == [protocol.CLOSE_SERVICE_RESTART]
    finally:
        worker.socket_closed(socket)


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
async def test_a_hung_redis_does_not_hold_up_the_lease(private_redis, settings):
    """The Redis checks wait out their timeouts on a hung server; the lease
    must keep its cadence meanwhile, or the worker's live sockets count as
    gone (a peer sweeps them, a push finds none)."""
    settings.CHAT_WORKER_LEASE_SECONDS = 0.6  # renewed every 0.2 s
    renewals: list = []

    def heartbeat_at():
        return (
            Worker.objects.filter(id=presence.WORKER_ID)
            .values_list("heartbeat_at", flat=True)
            .first()
        )

    worker.ensure_heartbeat()
    private_redis.process.send_signal(signal.SIGSTOP)
    try:
        # Each look at the stopped Redis waits out its 2-s timeout.
        deadline = asyncio.get_running_loop().time() + 3
        while asyncio.get_running_loop().time() < deadline:
            seen = await db(heartbeat_at)
            if seen is not None and seen not in renewals:
                renewals.append(seen)
            await asyncio.sleep(0.05)
    finally:
        private_redis.process.send_signal(signal.SIGCONT)
        await worker.stop_worker_loop()
    assert len(renewals) >= 5, f"{len(renewals)} renewal(s) in 3 s of a hung Redis"


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
async def test_redis_run_ids_cover_every_shard(private_redis, redis_server, settings):
    settings.CHANNEL_LAYERS = {
        "default": redis_layer_config(f"{private_redis.url},{redis_server.url}")
    }
    run_ids = await worker.redis_run_ids()
    assert run_ids is not None and len(set(run_ids)) == 2
    private_redis.stop()
    assert await worker.redis_run_ids() is None
    private_redis.start()


async def api_post(owner, path: str, body: dict, **scopes: bool):
    """Posts `body` to the HTTP API with a new token of `owner`'s."""
    _, raw = await db(tokens.api_token_create, owner=owner, name="ci", **scopes)
    return await db(
        HttpClient().post,
        path,
        body,
        content_type="application/json",
        headers={"Authorization": f"Bearer {raw}"},
    )


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
async def test_publish_while_redis_is_down_is_stored_and_reaches_a_resuming_page(
    private_redis, connect, alice, room
):
    """The store is the truth: the live broadcast is best effort."""
    private_redis.stop()
    text = "built while Redis was away"
    response = await api_post(
        alice, "/api/rooms/lobby/messages/", {"message": text}, can_publish=True
    )
    assert response.status_code == 201, response.content
    private_redis.start()
    _, welcome = await connect(alice, query="since=0")
    assert [m["message"] for m in welcome["messages"]] == [text]


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
async def test_push_while_redis_is_down_is_a_503_with_retry_after(
    private_redis, alice, bob
):
    private_redis.stop()
    response = await api_post(
        alice, "/api/users/alice/push/", {"event": "ping"}, can_push=True
    )
    assert response.status_code == 503
    assert (response.json()["error"], response["Retry-After"]) == ("unavailable", "5")
    private_redis.start()


async def test_a_cancelled_receive_ends_even_when_the_cancel_meets_a_read_timeout(
    redis_server,
):
    """redis-py on Python 3.11 can lose a cancel that lands as a blocking read
    times out; channels_redis then blocks again and an event loop's shutdown
    waits for the task for ever. Short reads make that moment come often: the
    stock layer got stuck within a few hundred cancels in every try."""
    layer = RedisHubLayer(hosts=[redis_server.url])
    layer.brpop_timeout = 0.01
    channel = await layer.new_channel()
    try:
        for attempt in range(500):
            receiving = asyncio.ensure_future(layer.receive(channel))
            await asyncio.sleep(random.uniform(0, 2 * layer.brpop_timeout))
            # The first cancel lets the pop under way end; a second one (an
            # event loop's shutdown, daphne's kill) stops the read at once.
            receiving.cancel()
            await asyncio.sleep(0)
            receiving.cancel()
            # A bound for a hang, not a timing: an ended receive ends at once.
            done, _ = await asyncio.wait({receiving}, timeout=5)
            assert done, f"cancel {attempt} was lost: the receive still reads"
    finally:
        await layer.close_pools()


async def test_a_receive_cancelled_as_its_pop_returns_keeps_the_message_it_took(
    redis_server,
):
    """A process reads all its channels through one blocking pop at a time,
    made by whichever receive holds the layer's lock. A socket that closes
    cancels its receive; if that receive's pop has just taken a message for
    another socket, a cancel that lands before the reply is read threw the
    message away (on a loaded machine the loop often comes round to both at
    once). The cancelled receive must hand what it took to the others."""
    layer = RedisHubLayer(hosts=[redis_server.url])
    closing, staying = await layer.new_channel(), await layer.new_channel()
    try:
        holder = asyncio.ensure_future(layer.receive(closing))
        while not await blocked_in_a_pop(layer):
            await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(layer.receive(staying))
        await asyncio.sleep(0)  # it waits for the lock or for its buffer
        # Another process sends while this loop is busy elsewhere: when the
        # loop comes round, the pop's reply and the cancel are both there.
        sending = threading.Thread(
            target=send_from_elsewhere, args=(redis_server, staying)
        )
        sending.start()
        sending.join()
        time.sleep(0.2)
        holder.cancel()
        # A bound for a hang, not a timing.
        done, _ = await asyncio.wait({waiting}, timeout=10)
        assert done, "the message the cancelled receive took was lost"
        assert waiting.result()["text"] == "for who stays"
        assert holder.cancelled()
    finally:
        await layer.close_pools()


def send_from_elsewhere(redis_server: RedisServer, channel: str) -> None:
    async def send() -> None:
        layer = RedisHubLayer(hosts=[redis_server.url])
        await layer.send(channel, {"type": "chat.event", "text": "for who stays"})
        await layer.close_pools()

    asyncio.run(send())


async def blocked_in_a_pop(layer: RedisHubLayer) -> bool:
    info = await layer.connection(0).info("clients")
    return info["blocked_clients"] >= 1


async def test_a_broadcast_the_layer_drops_is_counted_and_warned(
    redis_server, settings, caplog
):
    """A channel over CHAT_LAYER_CAPACITY loses the message (the sockets then
    fill the gap by seq): /metrics counts it and the log says so at WARNING."""
    from channels.layers import channel_layers

    from chat import metrics

    config = redis_layer_config(redis_server.url)
    config["CONFIG"]["capacity"] = 1
    settings.CHANNEL_LAYERS = {"default": config}
    layer = channel_layers["default"]
    channel = await layer.new_channel()
    await layer.group_add("room.full", channel)
    before = metrics.LAYER_DROPS._value.get()
    caplog.set_level("WARNING")
    for n in range(3):  # nobody reads: the first fits, the other two do not
        await layer.group_send("room.full", {"type": "chat.event", "text": str(n)})
    assert metrics.LAYER_DROPS._value.get() - before == 2
    warned = [r for r in caplog.records if "over capacity" in r.getMessage()]
    assert [r.levelname for r in warned] == ["WARNING", "WARNING"]
    assert b"chat_layer_dropped_messages_total" in metrics.exposition()
    await layer.flush()
    await layer.close_pools()
