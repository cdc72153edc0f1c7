"""What a worker process does besides serving sockets: renew its presence lease,
sweep dead workers, notice a Redis restart, and drain on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any, Protocol

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from chat import presence, sentinel
from chat.broadcast import LAYER_ERRORS
from chat.protocol import CLOSE_SERVICE_RESTART

logger = logging.getLogger(__name__)


class Closable(Protocol):
    async def close(self, code: int | None = None) -> None: ...


_sockets: weakref.WeakSet = weakref.WeakSet()
_heartbeat_task: asyncio.Task | None = None
_draining = False
_stopping: asyncio.Task | None = None


# ---------------------------------------------------------------------------
# Sockets of this process
# ---------------------------------------------------------------------------


def socket_opened(consumer: Closable) -> None:
    """Registers a consumer so that the worker can close it (Redis restart)."""
    _sockets.add(consumer)
    ensure_heartbeat()


def socket_closed(consumer: Closable) -> None:
    _sockets.discard(consumer)


# Sockets that closed while the database did not answer: their presence rows
# are forgotten by the worker loop once it does (else they would count as
# online until this worker's lease ends).
_unforgotten: set[str] = set()


def socket_close_failed(channel_name: str) -> None:
    """Notes a closed socket whose presence row could not be deleted."""
    _unforgotten.add(channel_name)


async def forget_closed_sockets() -> int:
    """Deletes the rows of sockets whose close failed; returns how many went."""
    forgotten = 0
    for channel_name in list(_unforgotten):
        await database_sync_to_async(presence.connection_close)(
            channel_name=channel_name
        )
        _unforgotten.discard(channel_name)
        forgotten += 1
    return forgotten


def queued_events() -> int:
    """Returns the events queued in the outboxes of this process's sockets."""
    return sum(len(figures[0]) for figures in _outboxes())


def _outboxes() -> list:
    return [
        (consumer.outbox, consumer.channel_name)
        for consumer in list(_sockets)
        if getattr(consumer, "outbox", None) is not None
    ]


_slow_closes = 0
# What the admin was last told of each socket's queue: channel -> (now, peak).
_reported: dict[str, tuple[int, int]] = {}


def socket_closed_too_slow() -> None:
    """Counts a socket closed with 4008 (reported with the lease)."""
    global _slow_closes
    _slow_closes += 1


async def report_send_queues() -> int:
    """Renews the lease and writes the queue figures that changed; returns how many.

    One trip to the database with the heartbeat, which writes anyway.
    """
    current = {
        channel: (len(outbox), outbox.peak_frames) for outbox, channel in _outboxes()
    }
    changed = {
        channel: figures
        for channel, figures in current.items()
        if _reported.get(channel, (0, 0)) != figures
    }
    await database_sync_to_async(presence.worker_heartbeat)(
        queue_figures=changed, slow_closes=_slow_closes
    )
    _reported.clear()
    _reported.update(current)
    return len(changed)


async def close_all_sockets(code: int) -> int:
    """Closes every socket of this process with `code`; returns how many."""
    consumers = list(_sockets)
    for consumer in consumers:
        try:
            await consumer.close(code=code)
        except Exception:
            logger.exception("could not close a socket")
    return len(consumers)


# ---------------------------------------------------------------------------
# Drain (graceful shutdown)
# ---------------------------------------------------------------------------


def begin_drain() -> asyncio.Task | None:
    """Marks the process as shutting down (see chatproject.server), and its
    lease as draining, so that its sockets stop counting toward the caps as
    their users reconnect elsewhere. Returns the task that marks the lease
    (None without a running loop)."""
    global _draining, _stopping
    _draining = True
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    _stopping = loop.create_task(_mark_stopping())
    return _stopping


async def _mark_stopping() -> None:
    try:
        await database_sync_to_async(presence.worker_stopping)()
    except Exception:
        logger.warning("could not mark the lease as draining", exc_info=True)


def is_draining() -> bool:
    """True while shutting down: closing sockets then keep their presence rows."""
    return _draining


# ---------------------------------------------------------------------------
# Channel layer health
# ---------------------------------------------------------------------------


def redis_hosts() -> list[dict[str, Any]]:
    """Returns the channel layer's Redis host entries (empty for in-memory).

    Each has an `address`, or `sentinels` and `master_name` (chat.sentinel).
    """
    config = settings.CHANNEL_LAYERS.get("default", {}).get("CONFIG", {})
    return [
        host
        for host in config.get("hosts", [])
        if isinstance(host, dict) and ("address" in host or "master_name" in host)
    ]


async def redis_run_ids(timeout: float = 2.0) -> tuple[str, ...] | None:
    """Returns the run_id of every layer Redis primary (it changes when one
    restarts, or when Sentinel promotes a replica).

    None when one of them does not answer; () for the in-memory layer.
    """
    run_ids = []
    for host in redis_hosts():
        try:
            async with sentinel.primary_client(host, timeout) as client:
                info: dict[str, Any] = await client.info("server")
        except LAYER_ERRORS:
            return None
        run_ids.append(str(info.get("run_id", "")))
    return tuple(run_ids)


class LayerWatch:
    """Notices a Redis restart: the group memberships of this worker are gone.

    A restarted Redis has forgotten every group, so this worker's sockets would
    silently receive nothing (daphne#147); closing them with 1012 makes the
    clients reconnect, join their groups again and resume with ?since.
    """

    def __init__(self) -> None:
        self.known: tuple[str, ...] | None = None

    async def check(self) -> bool:
        """Returns True (after closing the sockets) when a restart was seen."""
        current = await redis_run_ids()
        if current is None:
            return False
        restarted = self.known is not None and current != self.known
        self.known = current
        if restarted:
            hub = getattr(get_channel_layer(), "hub", None)
            if hub is not None:
                hub.forget_upstream()
            closed = await close_all_sockets(CLOSE_SERVICE_RESTART)
            logger.warning(
                "channel layer Redis restarted: closed %d socket(s) with 1012", closed
            )
        return restarted


# ---------------------------------------------------------------------------
# The background loop
# ---------------------------------------------------------------------------


async def refresh_hub_groups() -> int:
    """Joins the layer's groups again before their expiry (a day by default).

    The hub joins a room's group once per worker, when its first socket there
    opens; a room whose sockets stay longer than the expiry would go deaf.
    """
    layer = get_channel_layer()
    hub = getattr(layer, "hub", None)
    if hub is None:
        return 0
    return await hub.refresh(older_than=getattr(layer, "group_expiry", 86400) / 2)


def ensure_heartbeat() -> None:
    """Starts the worker loop on the running event loop unless it already runs there.

    Called on every connect: the loop starts with the first socket a process
    serves (and again under a new event loop, as in tests).
    """
    global _heartbeat_task
    loop = asyncio.get_running_loop()
    task = _heartbeat_task
    if task is None or task.done() or task.get_loop() is not loop:
        _heartbeat_task = loop.create_task(_worker_loop(), name="chat-worker-lease")


async def stop_worker_loop() -> None:
    """Stops this process's lease loop (a test's event loop ends with its test)."""
    global _heartbeat_task
    task, _heartbeat_task = _heartbeat_task, None
    running = asyncio.get_running_loop()
    if task is not None and not task.done() and task.get_loop() is running:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _worker_loop() -> None:
    """The lease and the Redis checks, side by side: a hung Redis waits out
    its timeouts in one without costing the other its cadence (a lease that
    lapses makes this worker's live sockets count as gone)."""
    layer_checks = asyncio.create_task(_layer_loop(), name="chat-worker-layer")
    try:
        await _lease_loop()
    finally:
        layer_checks.cancel()
        await asyncio.gather(layer_checks, return_exceptions=True)


async def _lease_loop() -> None:
    while True:
        try:
            if not is_draining():
                await report_send_queues()
            await forget_closed_sockets()
            await database_sync_to_async(presence.workers_sweep)()
            if presence.lease_taken():
                # Stalled past the lease: a peer swept this worker's sockets
                # (their users left). Serving them on would leave them out of
                # presence for good; reconnecting puts them back.
                closed = await close_all_sockets(CLOSE_SERVICE_RESTART)
                logger.warning(
                    "this worker's lease was taken while it stalled; "
                    "closed %d socket(s) with %d to reconnect",
                    closed,
                    CLOSE_SERVICE_RESTART,
                )
        except Exception:
            # A database outage must not end the loop: the lease is renewed
            # again once it answers.
            logger.exception("worker lease renewal failed")
        await _next_round()


async def _layer_loop() -> None:
    watch = LayerWatch()
    while True:
        try:
            await watch.check()
        except Exception:
            logger.exception("channel layer check failed")
        try:
            await refresh_hub_groups()
        except Exception:
            logger.warning("could not refresh the hub's groups", exc_info=True)
        await _next_round()


async def _next_round() -> None:
    if asyncio.current_task().cancelling():
        # A cancel that reached redis-py mid-call can come out as a
        # connection error, caught above: stop all the same.
        raise asyncio.CancelledError
    await asyncio.sleep(settings.CHAT_WORKER_LEASE_SECONDS / 3)
