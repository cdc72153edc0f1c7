"""The per-worker fan-out hub, under the channel layer's group API.

Consumers still `group_add` on connect, `group_discard` on disconnect and
broadcast with `group_send`. A socket that registers a sink with its layer's hub
joins a group in this process only; the hub joins the layer's group once for
the whole process, so a broadcast crosses Redis once per worker and the hub
hands it to every local sink of the group: no channel-layer message and no
consumer dispatch per socket. Channels without a sink (a plain consumer, a test
listening on a channel) keep the stock path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from channels.layers import InMemoryChannelLayer
from channels_redis.core import RedisChannelLayer

from chat import metrics
from chat.batching import Batch
from chat.limits import LocalWindowCounts

logger = logging.getLogger(__name__)

# Key a group message carries across the layer, so that the hub of each worker
# knows which of its groups it was sent to.
GROUP_KEY = "__hub_group__"
# Seconds to wait before reading the hub's channel again after a layer error.
RETRY_SECONDS = 0.5
# Between cancels of a Redis receive that has not ended yet.
CANCEL_RETRY_SECONDS = 0.05


class Sink(Protocol):
    def hub_deliver(self, message: dict[str, Any]) -> bool:
        """Takes a group message for one socket; False: deliver it the stock way."""


class Hub:
    """The sockets of one process by group, and the process's membership upstream."""

    def __init__(self, layer: HubLayerMixin) -> None:
        self.layer = layer
        self.sinks: dict[str, Sink] = {}
        self.members: dict[str, set[str]] = {}
        # Groups the hub's own channel has joined on the layer, with the time of
        # the last join (it is refreshed before the layer's group expiry).
        self.joined: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._channel: str | None = None
        self._reader: asyncio.Task | None = None

    # -- sockets -------------------------------------------------------------

    def attach(self, channel: str, sink: Sink) -> None:
        """Registers the sink of a socket of this process."""
        self.sinks[channel] = sink

    def detach(self, channel: str) -> None:
        """Forgets a socket (its groups are left with group_discard first)."""
        self.sinks.pop(channel, None)

    # -- membership ----------------------------------------------------------

    async def add(self, group: str, channel: str) -> None:
        self.members.setdefault(group, set()).add(channel)
        if not self.layer.hub_upstream:
            return
        # A second socket must not return before the first one's upstream join
        # is done: it would read its backlog while broadcasts could still miss it.
        async with self._lock(group):
            if group not in self.joined and self.members.get(group):
                await self.layer.upstream_group_add(group, await self.channel())
                self.joined[group] = time.monotonic()

    async def discard(self, group: str, channel: str) -> None:
        channels = self.members.get(group)
        if channels is not None:
            channels.discard(channel)
        if channels:
            return
        self.members.pop(group, None)
        if not self.layer.hub_upstream:
            return
        async with self._lock(group):
            if group in self.joined and not self.members.get(group):
                del self.joined[group]
                await self.layer.upstream_group_discard(group, await self.channel())

    def drop(self, channel: str, groups) -> None:
        """Forgets a socket's memberships here only (the layer is unreachable).

        A group left with no local socket is no longer counted as joined, so
        the next socket joins it upstream again: after a Redis outage the
        server may have lost it.
        """
        for group in groups:
            channels = self.members.get(group)
            if channels is not None:
                channels.discard(channel)
                if not channels:
                    del self.members[group]
                    self.joined.pop(group, None)

    async def refresh(self, older_than: float) -> int:
        """Joins again the groups joined more than `older_than` seconds ago."""
        if not self.layer.hub_upstream:
            return 0
        now = time.monotonic()
        stale = [group for group, at in self.joined.items() if now - at > older_than]
        if not stale:
            return 0
        channel = await self.channel()
        # Together, so that the layer sends them in a pipeline or two rather
        # than one round trip per group.
        await asyncio.gather(
            *(self.layer.upstream_group_add(group, channel) for group in stale)
        )
        joined_at = time.monotonic()
        for group in stale:
            self.joined[group] = joined_at
        return len(stale)

    def forget_upstream(self) -> None:
        """Called when the layer's server lost every group (a Redis restart)."""
        self.joined.clear()

    def _lock(self, group: str) -> asyncio.Lock:
        lock = self._locks.get(group)
        if lock is None:
            lock = self._locks[group] = asyncio.Lock()
        return lock

    # -- delivery ------------------------------------------------------------

    def dispatch(self, group: str, message: dict[str, Any]) -> int:
        """Hands a group message to every local sink of `group`; returns how many."""
        channels = self.members.get(group)
        if not channels:
            return 0
        delivered = 0
        for channel in tuple(channels):
            sink = self.sinks.get(channel)
            if sink is None:
                continue
            if not sink.hub_deliver(message):
                self._forward(channel, message)
            delivered += 1
        return delivered

    def _forward(self, channel: str, message: dict[str, Any]) -> None:
        # A message the sink does not take on the fast path (a kick) goes to
        # the socket's own channel, to its consumer's handler, as in Channels.
        task = asyncio.ensure_future(self.layer.upstream_send(channel, dict(message)))
        task.add_done_callback(_log_failure)

    # -- the hub's channel (upstream layers only) -----------------------------

    async def channel(self) -> str:
        if self._channel is None:
            self._channel = await self.layer.new_channel()
        self.ensure_reader()
        return self._channel

    def ensure_reader(self) -> None:
        loop = asyncio.get_running_loop()
        reader = self._reader
        if reader is None or reader.done() or reader.get_loop() is not loop:
            self._reader = loop.create_task(self._read(), name="chat-hub-reader")

    async def _read(self) -> None:
        channel = await self.channel()
        while True:
            try:
                message = await self.layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A cancel that reaches redis-py while it reconnects can come
                # out as a connection error: stop all the same.
                if asyncio.current_task().cancelling():
                    raise asyncio.CancelledError from None
                logger.warning("hub: reading the layer failed; retrying", exc_info=True)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            group = message.pop(GROUP_KEY, None)
            if group is not None:
                try:
                    self.dispatch(group, message)
                except Exception:
                    # One message a socket cannot take (e.g. one from a newer
                    # release mid-deploy) must not end the reading for all.
                    logger.exception("hub: delivering a message to %s failed", group)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("hub: forwarding a message failed: %r", task.exception())


class HubLayerMixin:
    """The group API of a channel layer, with the hub under it for local sinks."""

    # True when the layer spans processes: the hub then joins upstream groups.
    hub_upstream = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hub = Hub(self)

    async def group_add(self, group: str, channel: str) -> None:
        if channel in self.hub.sinks:
            self.require_valid_group_name(group)
            await self.hub.add(group, channel)
        else:
            await super().group_add(group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        if channel in self.hub.sinks or channel in self.hub.members.get(group, ()):
            await self.hub.discard(group, channel)
        else:
            await super().group_discard(group, channel)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        await super().group_send(group, {**message, GROUP_KEY: group})

    async def group_send_many(self, sends: list[tuple[str, dict[str, Any]]]) -> None:
        """group_send for each (group, message), in order (chat.sender's
        queue); the Redis layer sends them all in two round trips."""
        for group, message in sends:
            await self.group_send(group, message)

    async def upstream_group_add(self, group: str, channel: str) -> None:
        await super().group_add(group, channel)

    async def upstream_group_discard(self, group: str, channel: str) -> None:
        await super().group_discard(group, channel)

    async def upstream_send(self, channel: str, message: dict[str, Any]) -> None:
        message.pop(GROUP_KEY, None)
        await super().send(channel, message)


class InMemoryHubLayer(HubLayerMixin, InMemoryChannelLayer):
    """The in-memory layer (one process) with the hub: broadcasts go straight to it."""

    hub_upstream = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counts = LocalWindowCounts()

    async def window_count(
        self, key: str, index: int, ttl: int, delta: int = 1
    ) -> tuple[int, int]:
        """The shared counter of chat.limits.SharedRateLimit: this process's."""
        return await self.counts.window_count(key, index, ttl, delta)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        self.require_valid_group_name(group)
        self.hub.dispatch(group, message)
        # Channels without a sink (if any) get it the stock way; the stock
        # group_send walks every channel of the process, so only when needed.
        if self.groups.get(group):
            await InMemoryChannelLayer.group_send(self, group, message)


class _ReadEnded(Exception):
    """A read stops after a pop that took nothing, its receive cancelled."""


async def _cancel_until_done(reading: asyncio.Task) -> None:
    # A cancel that lands as redis-py's blocking read times out can be lost
    # on Python 3.11 (the timeout takes it for its own): the read returns
    # nothing and channels_redis blocks again. So: cancelled until it ends.
    while not reading.done():
        reading.cancel()
        try:
            await asyncio.wait({reading}, timeout=CANCEL_RETRY_SECONDS)
        except asyncio.CancelledError:
            pass  # on the way out already


# channels_redis's group_send script for many messages at once, with the
# expired messages of each channel dropped in it too (channels_redis sends
# that as a pipeline first). KEYS: a channel key for each message (a key may
# come more than once); ARGV: the messages, then a capacity for each, then the
# time now, the expired messages' cutoff and the keys' expiry. A key's pops
# go by score: a key's later message gets a higher one, as a later
# group_send's time would be (1 µs more, written in full: Lua's own number
# format keeps 14 digits, a tenth of a millisecond).
GROUP_SEND_SCRIPT = """
local count = #KEYS
local now = tonumber(ARGV[2 * count + 1])
local cutoff, expiry = ARGV[2 * count + 2], ARGV[2 * count + 3]
local over_capacity = 0
local last = {}
for i = 1, count do
    local key = KEYS[i]
    if last[key] == nil then
        redis.call('ZREMRANGEBYSCORE', key, 0, cutoff)
        last[key] = now - 0.000001
    end
    if redis.call('ZCARD', key) < tonumber(ARGV[count + i]) then
        last[key] = math.max(now, last[key] + 0.000001)
        redis.call('ZADD', key, string.format('%.17g', last[key]), ARGV[i])
        redis.call('EXPIRE', key, expiry)
    else
        over_capacity = over_capacity + 1
    end
end
return over_capacity
"""


class RedisHubLayer(HubLayerMixin, RedisChannelLayer):
    """channels_redis's layer with the hub: one group member per worker process."""

    # Seconds a pop blocks (channels_redis: 5). A cancelled receive lets its
    # pop end (receive_single), so this bounds how long a closed socket's
    # consumer, and a worker's shutdown, wait for it; an idle worker pays one
    # empty pop a second.
    brpop_timeout = 1
    # Messages one read of this process's channels takes at most.
    pop_batch = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._joins = Batch(self._group_add_many)
        # The lowest score group_send_many may give next (see there).
        self._next_score = 0.0
        # Reads whose receive was cancelled: they end after the pop under way.
        self._last_pop: set[asyncio.Task] = set()

    async def receive_single(self, channel: str) -> tuple[Any, dict[str, Any]]:
        # One read at a time per process (the receive lock's holder's) pops
        # the messages of all its channels. A socket that closes cancels its
        # receive; a cancel that reaches the pop as its reply comes in throws
        # away a message taken for another socket. So the read runs as a task
        # of its own: a cancel lets the pop in progress end (it blocks for
        # brpop_timeout at most), keeps what it took, and only then ends.
        if "!" in channel:
            reading = asyncio.ensure_future(self._pop_batch(channel))
        else:
            reading = asyncio.ensure_future(super().receive_single(channel))
        try:
            return await asyncio.shield(reading)
        except asyncio.CancelledError:
            self._last_pop.add(reading)
            try:
                await asyncio.wait({reading}, timeout=self.brpop_timeout + 1)
            except asyncio.CancelledError:
                pass  # cancelled again: on the way out, stop the read now
            finally:
                self._last_pop.discard(reading)
            await _cancel_until_done(reading)
            if not reading.cancelled() and reading.exception() is None:
                # Kept for the receive of its channel, as channels_redis does
                # with what its reads get.
                if "!" in channel:
                    self._buffer(*reading.result())
            raise

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        await self.group_send_many([(group, message)])

    async def group_send_many(self, sends: list[tuple[str, dict[str, Any]]]) -> None:
        """channels_redis's group_send for each (group, message), in order, in
        two round trips per Redis server for all of them, where it takes four
        each: the groups' live members in one pipeline, then one script. A
        message to a full channel is dropped and counted (the sockets fill the
        gap by seq). With several Redis servers, one that fails loses only
        what goes through it; the first error is raised once the rest is sent.
        """
        failure: Exception | None = None
        groups: dict[int, dict[str, None]] = {}  # per server, each group once
        for group, _ in sends:
            assert self.require_valid_group_name(group), "Group name not valid"
            groups.setdefault(self.consistent_hash(group), {})[group] = None
        members: dict[str, list[str]] = {}
        cutoff = int(time.time()) - self.group_expiry  # members that expired
        for index, names in groups.items():
            try:
                async with self.connection(index).pipeline(transaction=False) as pipe:
                    for group in names:
                        key = self._group_key(group)
                        pipe.zremrangebyscore(key, min=0, max=cutoff)
                        pipe.zrange(key, 0, -1)
                    replies = await pipe.execute()
            except Exception as error:
                failure = failure or error
                continue
            for group, channels in zip(names, replies[1::2], strict=True):
                members[group] = [channel.decode("utf8") for channel in channels]
        # Per Redis server: each message's channel keys, in the order sent.
        keys: dict[int, list[str]] = {}
        contents: dict[int, list[bytes]] = {}
        capacities: dict[int, list[int]] = {}
        for group, message in sends:
            if group not in members:
                continue  # its server failed
            by_server, messages, capacity = self._map_channel_keys_to_connection(
                members[group], {**message, GROUP_KEY: group}
            )
            for index, channel_keys in by_server.items():
                keys.setdefault(index, []).extend(channel_keys)
                contents.setdefault(index, []).extend(messages[k] for k in channel_keys)
                capacities.setdefault(index, []).extend(
                    capacity[k] for k in channel_keys
                )
        for index, channel_keys in keys.items():
            # A key's scores in one script run up from `now` by a microsecond
            # a message: the next call starts above them, whatever the clock.
            now = max(time.time(), self._next_score)
            self._next_score = now + (len(channel_keys) + 1) / 1e6
            try:
                dropped = await self.connection(index).eval(
                    GROUP_SEND_SCRIPT,
                    len(channel_keys),
                    *channel_keys,
                    *contents[index],
                    *capacities[index],
                    now,
                    int(now) - int(self.expiry),
                    self.expiry,
                )
            except Exception as error:
                failure = failure or error
                continue
            if dropped:
                metrics.LAYER_DROPS.inc(dropped)
                logger.warning(
                    "%s of %s channel messages over capacity in groups %s",
                    dropped,
                    len(channel_keys),
                    ", ".join(sorted({group for group, _ in sends})),
                )
        if failure is not None:
            raise failure

    async def _pop_batch(self, channel: str) -> tuple[Any, dict[str, Any]]:
        """receive_single for this process's channels, which share one Redis
        key: one round trip takes the first message to come and up to
        pop_batch - 1 queued behind it, where channels_redis takes four per
        message (its backup queue's script, the pop, the backup's add and
        pop). All but the last go into their channels' buffers, in order; the
        last is returned for receive() to buffer after them.

        With no backup queue, what a pop took is lost only if its read is
        cancelled twice (the process is stopping; see receive_single)."""
        assert self.require_valid_channel_name(channel, receive=True)
        key = self.prefix + channel
        connection = self.connection(self.consistent_hash(channel))
        # The buffers must hold a whole batch: a full one drops its oldest.
        batch = max(1, min(self.pop_batch, self.capacity))
        contents: list[bytes] = []
        while not contents:
            async with connection.pipeline(transaction=False) as pipe:
                pipe.bzpopmin(key, timeout=self.brpop_timeout)
                pipe.zpopmin(key, batch - 1)
                first, rest = await pipe.execute()
            # A message can come between the blocking pop's timeout and the next.
            contents = [first[1]] if first is not None else []
            contents += [member for member, _ in rest]
            if not contents and asyncio.current_task() in self._last_pop:
                raise _ReadEnded  # its receive was cancelled: pop no more
        routed = [self._unpack(content, channel) for content in contents]
        for targets, message in routed[:-1]:
            self._buffer(targets, message)
        return routed[-1]

    def _unpack(self, content: bytes, channel: str) -> tuple[Any, dict[str, Any]]:
        # As channels_redis's receive_single: the message names its channels.
        message = self.deserialize(content)
        return message.pop("__asgi_channel__", channel), message

    def _buffer(self, targets: Any, message: dict[str, Any]) -> None:
        for target in targets if isinstance(targets, list) else [targets]:
            self.receive_buffer[target].put_nowait(message)

    async def _brpop_with_clean(self, index: int, channel: str, timeout: float):
        member = await super()._brpop_with_clean(index, channel, timeout)
        if member is None and asyncio.current_task() in self._last_pop:
            raise _ReadEnded  # its receive was cancelled: pop no more
        return member

    async def window_count(
        self, key: str, index: int, ttl: int, delta: int = 1
    ) -> tuple[int, int]:
        """The shared counter of chat.limits.SharedRateLimit, in the layer's Redis.

        Every worker on this layer counts in the same keys: one round trip.
        """
        name = f"{self.prefix}:rate:{key}"
        async with self.connection(self.consistent_hash(name)).pipeline(
            transaction=False
        ) as pipe:
            pipe.get(f"{name}:{index - 1}")
            pipe.incrby(f"{name}:{index}", delta)
            pipe.expire(f"{name}:{index}", ttl)
            previous, current, _ = await pipe.execute()
        return int(previous or 0), int(current)

    async def upstream_group_add(self, group: str, channel: str) -> None:
        # Each socket joins its user's group: a storm of handshakes is as many
        # joins at once, which go together in one pipeline per Redis server,
        # not two round trips each on a pooled connection each.
        await self._joins((group, channel))

    async def _group_add_many(self, joins: list[tuple[str, str]]) -> None:
        # What channels_redis's group_add does, for many groups at once.
        by_server: dict[int, list[tuple[str, str]]] = {}
        for group, channel in joins:
            by_server.setdefault(self.consistent_hash(group), []).append(
                (group, channel)
            )
        now = time.time()
        for index, pairs in by_server.items():
            async with self.connection(index).pipeline(transaction=False) as pipe:
                for group, channel in pairs:
                    key = self._group_key(group)
                    pipe.zadd(key, {channel: now})
                    pipe.expire(key, self.group_expiry)
                await pipe.execute()

    async def flush(self) -> None:
        # Every group is gone with the flush: join again on the next add.
        self.hub.forget_upstream()
        await super().flush()
