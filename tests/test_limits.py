"""Rate limits, per socket and per user, driven by a fake clock."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async

from chat.limits import LocalWindowCounts, SharedRateLimit, Throttle, TokenBucket


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def allowed(limiter: TokenBucket | Throttle, times: int) -> list[bool]:
    return [limiter.allow() for _ in range(times)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_bucket_allows_a_burst_of_capacity_then_refuses(clock):
    bucket = TokenBucket(3, 3, clock=clock)
    assert allowed(bucket, 4) == [True, True, True, False]


def test_bucket_refills_at_capacity_per_window(clock):
    bucket = TokenBucket(4, 2, clock=clock)  # 2 tokens a second
    allowed(bucket, 4)
    clock.advance(0.25)
    assert not bucket.allow()
    clock.advance(0.25)
    assert allowed(bucket, 2) == [True, False]
    clock.advance(1)
    assert allowed(bucket, 3) == [True, True, False]


def test_bucket_never_holds_more_than_capacity_after_idling(clock):
    bucket = TokenBucket(2, 1, clock=clock)
    clock.advance(3600)
    assert allowed(bucket, 3) == [True, True, False]


def test_refused_attempts_do_not_consume_tokens(clock):
    bucket = TokenBucket(1, 1, clock=clock)
    assert bucket.allow()
    clock.advance(0.5)
    assert allowed(bucket, 5) == [False] * 5
    clock.advance(0.5)
    assert bucket.allow()


def test_retry_after_is_the_time_until_the_next_token(clock):
    bucket = TokenBucket(2, 4, clock=clock)  # one token every 2 s
    assert bucket.retry_after() == 0
    allowed(bucket, 2)
    assert bucket.retry_after() == pytest.approx(2.0)
    clock.advance(1.5)
    assert not bucket.allow()
    assert bucket.retry_after() == pytest.approx(0.5)
    clock.advance(0.5)
    assert bucket.allow()


def test_bucket_uses_the_injected_clock_not_real_time(clock):
    bucket = TokenBucket(1, 0.001, clock=clock)
    bucket.allow()
    assert not bucket.allow()  # real time has passed, the fake clock has not


def test_throttle_lets_the_first_action_through(clock):
    assert Throttle(2, clock=clock).allow()


def test_throttle_drops_actions_within_the_interval(clock):
    throttle = Throttle(2, clock=clock)
    throttle.allow()
    clock.advance(1.75)
    assert not throttle.allow()
    clock.advance(0.25)  # exactly the interval
    assert throttle.allow()


def test_dropped_actions_do_not_restart_the_interval(clock):
    throttle = Throttle(2, clock=clock)
    throttle.allow()
    for _ in range(3):
        clock.advance(0.5)
        assert not throttle.allow()
    clock.advance(0.5)
    assert throttle.allow()
    assert not throttle.allow()


# ---------------------------------------------------------------------------
# SharedRateLimit: the per-user limit every worker counts together
# ---------------------------------------------------------------------------


async def acquired(limit: SharedRateLimit, counts, times: int, key: str = "u1"):
    return [await limit.acquire(counts, key) for _ in range(times)]


async def test_a_shared_limit_allows_its_limit_then_says_how_long_to_wait(clock):
    clock.now = 10_000.0  # the start of a window
    limit, counts = SharedRateLimit("posts", 3, 10, clock=clock), LocalWindowCounts()
    first = await acquired(limit, counts, 5)
    assert first[:3] == [None, None, None]
    # No previous window: the wait is the rest of this one.
    assert first[3] == first[4] == pytest.approx(10.0)
    # Another key has its own count.
    assert await limit.acquire(counts, "u2") is None


async def test_a_refused_action_is_not_counted(clock):
    clock.now = 10_000.0
    limit, counts = SharedRateLimit("posts", 2, 10, clock=clock), LocalWindowCounts()
    await acquired(limit, counts, 50)  # a flood: 2 allowed, 48 refused
    clock.advance(10)  # the next window; the previous one counts 2, not 50
    # 2 * (1 - 0) from the window before: nothing yet.
    assert await limit.acquire(counts, "u1") == pytest.approx(5.0)
    clock.advance(5)  # half of it still overlaps: 2 * 0.5 = 1, so one more
    assert await acquired(limit, counts, 2) == [None, pytest.approx(5.0)]


async def test_a_window_edge_gives_no_burst_of_twice_the_limit(clock):
    clock.now = 10_009.0  # a second before the window ends
    limit, counts = SharedRateLimit("posts", 4, 10, clock=clock), LocalWindowCounts()
    assert await acquired(limit, counts, 4) == [None] * 4
    clock.advance(1.5)  # just past the edge: the 4 still weigh 3.8
    assert [wait is None for wait in await acquired(limit, counts, 4)] == [False] * 4
    # A fixed window would have let 4 more through here.


async def test_a_limit_of_zero_turns_the_shared_limit_off(clock):
    limit, counts = SharedRateLimit("posts", 0, 10, clock=clock), LocalWindowCounts()
    assert await acquired(limit, counts, 100) == [None] * 100


async def test_without_a_layer_counter_the_shared_cache_counts(redis_server, settings):
    """channels_redis's pub/sub layer has no counter: the workers share the
    cache's Redis instead, as two processes with their own cache clients do."""
    from django.core.cache import caches

    from chat.limits import CacheWindowCounts, shared_counts

    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": redis_server.url,
            "KEY_PREFIX": f"limits-test-{id(settings)}",
        }
    }
    counts = shared_counts(object())
    assert isinstance(counts, CacheWindowCounts)
    limit = SharedRateLimit("posts", 2, 3600, clock=lambda: 7200.0)
    one, two = CacheWindowCounts(), CacheWindowCounts()
    assert await limit.acquire(one, "u1") is None
    assert await limit.acquire(two, "u1") is None
    assert await limit.acquire(one, "u1") is not None
    await sync_to_async(caches["default"].delete)("chat:rate:posts:u1:2")


def test_with_a_cache_of_its_own_a_process_counts_alone(settings):
    from chat.limits import LocalWindowCounts, shared_counts

    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    }
    assert isinstance(shared_counts(object()), LocalWindowCounts)
