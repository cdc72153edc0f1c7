"""Sends a worker's sync broadcasts from its event loop, in order, without waiting.

A post's broadcast goes out when its transaction commits, on the database
thread (one per worker). With async_to_sync that thread would wait for the
event loop to get round to the group_send and for Redis to answer, and every
handshake and post queued behind it would wait too. Bound to the worker's
loop (by its first socket), the thread hands the message over and goes on;
one task on the loop sends them in the order they came.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from typing import Any

from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)


class OrderedSender:
    # Group messages sent together at most (one Redis script runs them all,
    # and Redis does nothing else meanwhile).
    MAX_SENDS = 100

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[tuple[str, dict[str, Any]]] = deque()
        self._task: asyncio.Task | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sends from `loop` from now on (the worker's; tests run a loop each)."""
        if self.loop is not loop:
            self.loop, self._task = loop, None
            self._pending.clear()

    def submit(self, group: str, message: dict[str, Any]) -> bool:
        """Queues a group_send; False with no running loop bound (send it yourself)."""
        loop = self.loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return False
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._put(group, message)
        else:
            # A fresh context: the database thread's must not leak into the task.
            loop.call_soon_threadsafe(
                self._put, group, message, context=contextvars.Context()
            )
        return True

    def _put(self, group: str, message: dict[str, Any]) -> None:
        self._pending.append((group, message))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._send_pending(), name="chat-broadcasts"
            )

    async def _send_pending(self) -> None:
        layer = get_channel_layer()
        send_many = getattr(layer, "group_send_many", None)
        if send_many is None:
            most = 1

            async def send_many(sends: list) -> None:
                await layer.group_send(*sends[0])

        else:
            # What queued while the last ones went out goes out together: a
            # write round's rooms, or the rounds of a busy worker.
            most = self.MAX_SENDS
        while self._pending:
            count = min(len(self._pending), most)
            sends = [self._pending.popleft() for _ in range(count)]
            try:
                await send_many(sends)
            except Exception:
                # What was stored stays stored: the sockets fill the gap by seq.
                groups = ", ".join(sorted({group for group, _ in sends}))
                logger.warning("could not broadcast to %s", groups, exc_info=True)


sender = OrderedSender()
