"""The test clients' reconnect policy (harness.wire.reconnect_wait), which the
soak and the recovery figures depend on: it must back off as the page does."""

from chat.protocol import CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART, CLOSE_TRY_AGAIN_LATER
from harness.wire import (
    CLOSE_ABNORMAL,
    RECONNECT_CAP_SECONDS,
    RECONNECT_FIRST_SECONDS,
    STABLE_AFTER_SECONDS,
    reconnect_wait,
)


def waits(closes):
    """The waits after a series of (code, seconds open) closes."""
    wait, seen = None, []
    for code, open_seconds in closes:
        wait = reconnect_wait(wait, code, open_seconds)
        seen.append(wait)
    return seen


def test_sockets_that_keep_failing_back_off_up_to_the_cap():
    seen = waits([(CLOSE_ABNORMAL, 0)] * 6)
    assert seen[0] == RECONNECT_FIRST_SECONDS
    for earlier, later in zip(seen, seen[1:], strict=False):
        assert later == min(2 * earlier, RECONNECT_CAP_SECONDS)
    assert seen[-1] == RECONNECT_CAP_SECONDS


def test_a_drop_after_a_stable_socket_starts_the_backoff_afresh():
    # Backed off to the cap, then a socket that lived long enough drops: the
    # page waits its shortest again (a soak drops each page now and then).
    seen = waits([(CLOSE_ABNORMAL, 0)] * 6 + [(CLOSE_ABNORMAL, STABLE_AFTER_SECONDS)])
    assert seen[-2] == RECONNECT_CAP_SECONDS
    assert seen[-1] == RECONNECT_FIRST_SECONDS


def test_a_close_on_purpose_starts_afresh_and_a_short_lived_1013_does_not():
    backed_off = [(CLOSE_TRY_AGAIN_LATER, 0)] * 6
    for code in (CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART):
        assert waits(backed_off + [(code, 0)])[-1] == RECONNECT_FIRST_SECONDS
    assert waits(backed_off + [(CLOSE_TRY_AGAIN_LATER, 1)])[-1] == RECONNECT_CAP_SECONDS
