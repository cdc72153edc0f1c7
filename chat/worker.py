"""The worker process's background duty: renew its lease and sweep dead workers."""

from __future__ import annotations

import asyncio
import logging

from channels.db import database_sync_to_async
from django.conf import settings

from chat import presence

logger = logging.getLogger(__name__)

_heartbeat_task: asyncio.Task | None = None


def ensure_heartbeat() -> None:
    """Starts the lease loop on the running event loop unless it already runs there.

    Called on every connect: the loop starts with the first socket a process
    serves (and again under a new event loop, as in tests).
    """
    global _heartbeat_task
    loop = asyncio.get_running_loop()
    task = _heartbeat_task
    if task is None or task.done() or task.get_loop() is not loop:
        _heartbeat_task = loop.create_task(_heartbeat_loop(), name="chat-worker-lease")


async def _heartbeat_loop() -> None:
    while True:
        try:
            await database_sync_to_async(presence.worker_heartbeat)()
            await database_sync_to_async(presence.workers_sweep)()
        except Exception:
            # A database or Redis outage must not end the loop: the lease is
            # renewed again once they answer.
            logger.exception("worker lease renewal failed")
        await asyncio.sleep(settings.CHAT_WORKER_LEASE_SECONDS / 3)
