"""The test clients' reconnect policy (harness.wire.reconnects_after and
reconnect_wait), which the soak and the recovery figures depend on: it must
reconnect when the page does and back off as the page does."""

import re
from pathlib import Path

import pytest

from chat import protocol
from chat.protocol import CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART, CLOSE_TRY_AGAIN_LATER
from harness.wire import (
    CLOSE_ABNORMAL,
    RECONNECT_CAP_SECONDS,
    RECONNECT_FIRST_SECONDS,
    STABLE_AFTER_SECONDS,
    reconnect_wait,
    reconnects_after,
)

CONNECTION_JS = Path(__file__).parent.parent / "chat/static/chat/connection.js"


def the_pages_policy_closes() -> set[int]:
    """The codes after which the page stops (CLOSE_REASONS in connection.js)."""
    reasons = re.search(
        r"const CLOSE_REASONS = \{(.*?)\n\};", CONNECTION_JS.read_text(), re.S
    )
    return {int(code) for code in re.findall(r"^\s*(\d{4}):", reasons.group(1), re.M)}


def test_the_test_clients_stop_where_the_page_stops():
    stops = the_pages_policy_closes()
    assert {protocol.CLOSE_POLICY_VIOLATION, protocol.CLOSE_FORBIDDEN} <= stops
    for code in stops | {4400, 4499}:
        assert not reconnects_after(code), code


@pytest.mark.parametrize(
    "code",
    [
        CLOSE_GOING_AWAY,
        CLOSE_ABNORMAL,
        1009,  # a frame too big, closed by daphne
        1011,  # the server failed: a page that stopped would stay offline
        CLOSE_SERVICE_RESTART,
        CLOSE_TRY_AGAIN_LATER,
        protocol.CLOSE_TOO_SLOW,
    ],
)
def test_the_test_clients_reconnect_after_any_other_close(code):
    assert reconnects_after(code)


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
