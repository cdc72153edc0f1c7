"""Limits from settings, and per-socket rate limits with an injectable clock."""

from __future__ import annotations

import time
from collections.abc import Callable

from django.conf import settings

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
