"""Limits from settings, per-socket rate limits, and the per-user one shared by
every worker; all with an injectable clock."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache

from chat import protocol


def frame_limits(*, max_frame_bytes: int | None = None) -> protocol.Limits:
    """Returns what a post or frame is checked against, from settings at call time.

    The HTTP API passes its own body limit; the socket uses CHAT_MAX_FRAME_BYTES.
    """
    return protocol.Limits(
        max_frame_bytes=max_frame_bytes or settings.CHAT_MAX_FRAME_BYTES,
        max_message_length=settings.CHAT_MAX_MESSAGE_LENGTH,
        history_page=settings.CHAT_HISTORY_PAGE,
        history_max=settings.CHAT_HISTORY_MAX,
    )


class TokenBucket:
    """Allows `capacity` actions at once, refilled at `capacity / window` per second."""

    def __init__(
        self,
        capacity: int,
        window_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.rate = capacity / window_seconds
        self.clock = clock
        self.tokens = float(capacity)
        self.updated = clock()

    def allow(self) -> bool:
        """Returns True and takes a token if one is available."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def retry_after(self) -> float:
        """Returns the seconds until the next token."""
        return max(0.0, (1 - self.tokens) / self.rate)


class Throttle:
    """Lets one action through per `interval_seconds`; the rest are dropped quietly."""

    def __init__(
        self, interval_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval_seconds
        self.clock = clock
        self.last: float | None = None

    def allow(self) -> bool:
        """Returns True when the previous allowed action is old enough."""
        now = self.clock()
        if self.last is not None and now - self.last < self.interval:
            return False
        self.last = now
        return True


class WindowCounts(Protocol):
    """Where a SharedRateLimit counts: the channel layer (chat.hub) or this process."""

    async def window_count(
        self, key: str, index: int, ttl: int, delta: int = 1
    ) -> tuple[int, int]:
        """Adds `delta` to window `index` of `key`; returns (previous, current)."""


class LocalWindowCounts:
    """Window counts in this process: the in-memory layer's (`make run`)."""

    PRUNE_EVERY = 1000

    def __init__(self) -> None:
        # key -> (window index, previous window's count, this window's count)
        self._counts: dict[str, tuple[int, int, int]] = {}
        self._adds = 0

    async def window_count(
        self, key: str, index: int, ttl: int, delta: int = 1
    ) -> tuple[int, int]:
        last = self._counts.get(key)
        if last is None or last[0] < index - 1:
            previous, current = 0, 0
        elif last[0] == index - 1:
            previous, current = last[2], 0
        else:
            previous, current = last[1], last[2]
        current += delta
        self._counts[key] = (index, previous, current)
        self._adds += 1
        if self._adds % self.PRUNE_EVERY == 0:
            self._counts = {k: v for k, v in self._counts.items() if v[0] >= index - 1}
        return previous, current


class SharedRateLimit:
    """`limit` actions per `window` seconds per key, counted where every worker sees it.

    A sliding window estimated from two fixed ones (the current window's count
    plus the previous one's, weighted by how much of it still overlaps), as
    Redis rate limiters commonly do: one round trip, no burst of twice the
    limit at a window's edge. A refused action is not counted.
    """

    def __init__(
        self,
        name: str,
        limit: int,
        window_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.limit = limit
        self.window = window_seconds
        self.clock = clock

    async def acquire(self, counts: WindowCounts, key: str) -> float | None:
        """Counts one action for `key`: None if allowed, else the seconds to wait."""
        if self.limit <= 0 or self.window <= 0:
            return None
        now = self.clock()
        index = math.floor(now / self.window)
        into = (now - index * self.window) / self.window
        name = f"{self.name}:{key}"
        ttl = math.ceil(self.window * 2) + 1
        previous, current = await counts.window_count(name, index, ttl)
        if previous * (1 - into) + current <= self.limit:
            return None
        await counts.window_count(name, index, ttl, delta=-1)
        return self._retry_after(previous, current - 1, into)

    def _retry_after(self, previous: int, current: int, into: float) -> float:
        left = (1 - into) * self.window
        if previous > 0:
            # The previous window's share fades at previous / window per second.
            needed = previous * (1 - into) + current + 1 - self.limit
            wait = needed * self.window / previous
            if wait <= left:
                return wait
        return left


class CacheWindowCounts:
    """Window counts in Django's cache, for a channel layer with no counter of
    its own (channels_redis's pub/sub layer): with Redis the cache is the
    first Redis server, which every worker shares. Three round trips, on a
    thread, where the hub's layers take one."""

    async def window_count(
        self, key: str, index: int, ttl: int, delta: int = 1
    ) -> tuple[int, int]:
        return await sync_to_async(self._count, thread_sensitive=False)(
            key, index, ttl, delta
        )

    def _count(self, key: str, index: int, ttl: int, delta: int) -> tuple[int, int]:
        cache = caches["default"]
        current = f"chat:rate:{key}:{index}"
        cache.add(current, 0, timeout=ttl)
        try:
            count = cache.incr(current, delta)
        except ValueError:  # expired between add and incr
            count = max(delta, 0)
            cache.set(current, count, timeout=ttl)
        return int(cache.get(f"chat:rate:{key}:{index - 1}", 0)), count


# For a channel layer that has no counter of its own: the cache when it is
# shared, else this process's.
_process_counts = LocalWindowCounts()
_cache_counts = CacheWindowCounts()


def shared_counts(layer: object) -> WindowCounts:
    """Returns where `layer`'s workers share their counts (chat.hub's layers do)."""
    if hasattr(layer, "window_count"):
        return layer
    if isinstance(caches["default"], LocMemCache):
        return _process_counts
    return _cache_counts
