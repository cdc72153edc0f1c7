"""DatabaseBatch: calls that arrive while the database thread is busy go together."""

from __future__ import annotations

import asyncio
import threading

from channels.db import database_sync_to_async

from chat.batching import DatabaseBatch, each


async def hold_database_thread():
    """Occupies the database thread; returns (release, the held call)."""
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(10)

    held = asyncio.ensure_future(database_sync_to_async(hold)())
    await asyncio.wait_for(asyncio.to_thread(started.wait), 5)
    return release, held


async def test_calls_that_wait_for_the_thread_go_in_one_call_in_order():
    calls: list[list[int]] = []

    def many(items: list[int]) -> list[int | Exception]:
        calls.append(list(items))
        return [ValueError(item) if item == 3 else item * 10 for item in items]

    batch = DatabaseBatch(many)
    release, held = await hold_database_thread()
    waiting = [asyncio.ensure_future(batch(n)) for n in range(1, 6)]
    await asyncio.sleep(0.05)
    release.set()
    await held
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert calls == [[1, 2, 3, 4, 5]]
    assert outcomes[:2] == [10, 20] and outcomes[3:] == [40, 50]
    assert isinstance(outcomes[2], ValueError)  # to its own caller only


async def test_an_idle_batch_sends_each_call_alone_and_splits_at_max_size():
    calls: list[list[int]] = []
    batch = DatabaseBatch(lambda items: calls.append(list(items)) or items, max_size=2)
    assert await batch(1) == 1
    release, held = await hold_database_thread()
    waiting = [asyncio.ensure_future(batch(n)) for n in (2, 3, 4)]
    await asyncio.sleep(0.05)
    release.set()
    await held
    assert await asyncio.gather(*waiting) == [2, 3, 4]
    assert calls == [[1], [2, 3], [4]]


async def test_a_failing_batch_fails_every_caller_and_the_next_one_runs():
    def many(items: list[int]) -> list[int]:
        if 0 in items:
            raise RuntimeError("database gone")
        return items

    batch = DatabaseBatch(many)
    release, held = await hold_database_thread()
    waiting = [asyncio.ensure_future(batch(n)) for n in (0, 1)]
    await asyncio.sleep(0.05)
    release.set()
    await held
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert await batch(2) == 2


async def test_each_keeps_one_items_error_to_itself():
    many = each(lambda n: 1 // n)
    assert [type(o) for o in many([1, 0, 1])] == [int, ZeroDivisionError, int]
