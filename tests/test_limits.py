"""Per-socket rate limits, driven by a fake clock."""

from __future__ import annotations

import pytest

from chat.limits import Throttle, TokenBucket


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
