"""Calls that arrive together are made together.

Channels runs every database call of a worker on one thread, one call after
another. When hundreds of sockets open at once, each handshake's trip would
wait behind all the others and repeat the same work (the room, its latest
messages, its members); and each would join its groups in Redis with round
trips of its own, on a connection of its own. A Batch queues the calls that
arrive while the previous ones are under way and hands them over as one call
to a function that does many at once. An idle worker sends each call on at
once, alone, so nothing waits for a batch to fill.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from channels.db import database_sync_to_async

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batch(Generic[Item, Result]):
    """`await batch(item)`: the outcome for that item of `await many(items)`.

    `many` returns one outcome per item, in order (None stands for all of them
    when it returns nothing); an outcome that is an exception is raised to
    that item's caller only. An exception from `many` itself goes to every
    caller of the batch.
    """

    def __init__(
        self,
        many: Callable[
            [list[Item]], Awaitable[Sequence[Result | BaseException] | None]
        ],
        max_size: int = 100,
    ) -> None:
        self.many = many
        self.max_size = max_size
        self._pending: list[tuple[Item, asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None

    async def __call__(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future))
        drainer = self._drainer
        if drainer is None or drainer.done() or drainer.get_loop() is not loop:
            self._drainer = loop.create_task(self._drain(), name="chat-batch")
        return await future

    async def _drain(self) -> None:
        try:
            await self._drain_pending()
        except asyncio.CancelledError:
            # The loop is shutting down: no caller is left waiting for ever.
            for _, future in self._pending:
                future.cancel()
            self._pending.clear()
            raise

    async def _drain_pending(self) -> None:
        while self._pending:
            batch = self._pending[: self.max_size]
            del self._pending[: self.max_size]
            # A caller that gave up (its socket closed) still had its item
            # done with the rest: the batch is under way as one call.
            try:
                outcomes = await self.many([item for item, _ in batch])
            except Exception as error:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            if outcomes is None:
                outcomes = [None] * len(batch)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)


class DatabaseBatch(Batch[Item, Result]):
    """A Batch whose `many` is sync and runs on the database thread."""

    def __init__(
        self,
        many: Callable[[list[Item]], Sequence[Result | BaseException]],
        max_size: int = 100,
    ) -> None:
        super().__init__(database_sync_to_async(many), max_size)


def each(
    function: Callable[[Any], Result],
) -> Callable[[list[Any]], list[Result | Exception]]:
    """Makes a one-item function a DatabaseBatch `many`: one call per item, one trip."""

    def many(items: list[Any]) -> list[Result | Exception]:
        outcomes: list[Result | Exception] = []
        for item in items:
            try:
                outcomes.append(function(item))
            except Exception as error:
                outcomes.append(error)
        return outcomes

    return many
