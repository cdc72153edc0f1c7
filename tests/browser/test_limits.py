"""The pages follow the server's limits, which reach them as data-* attributes
rendered from settings: a server started with other limits gets a page that
keeps to them (history requests, typing frames, message length, room names)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import pairwise

import pytest
from playwright.sync_api import expect

from chat import protocol
from tests.browser.conftest import (
    RECONNECT_MS,
    SERVER_ENV,
    DaphneServer,
    new_account,
    new_room,
    open_room,
    post_messages,
    send,
    texts,
    wait_connected,
    wait_for_texts,
)
from tests.browser.test_protocol import Relay, open_relayed_room

# Far below the defaults (50, 200, 500, 2 s, 2000): a page with the defaults
# copied into it asks for more than this server answers.
HISTORY_PAGE = 4
HISTORY_MAX = 6
RESUME_MAX = 8
TYPING_INTERVAL_SECONDS = 3
MAX_LENGTH = 50
LIMITS_ENV = {
    **SERVER_ENV,
    "CHAT_HISTORY_PAGE": str(HISTORY_PAGE),
    "CHAT_HISTORY_MAX": str(HISTORY_MAX),
    "CHAT_RESUME_MAX": str(RESUME_MAX),
    "CHAT_TYPING_INTERVAL_SECONDS": str(TYPING_INTERVAL_SECONDS),
    "CHAT_MAX_MESSAGE_LENGTH": str(MAX_LENGTH),
}

# Records when the page sends each frame, on the page's own clock.
RECORD_SENDS = """(() => {
    const send = WebSocket.prototype.send;
    window.__sent = [];
    WebSocket.prototype.send = function (data) {
        window.__sent.push([performance.now(), data]);
        return send.call(this, data);
    };
})();"""

# Fills the lobby's name field and submits the form; returns whether the
# page's own check let it through (the submission itself is cancelled).
LOBBY_VERDICT = """name => {
    const form = document.getElementById("room-form");
    form.querySelector("input[name=name]").value = name;
    let refused = null;
    const record = (event) => {
        refused = event.defaultPrevented;
        event.preventDefault();
    };
    form.addEventListener("submit", record);
    form.requestSubmit();
    form.removeEventListener("submit", record);
    return refused === false;
}"""


@pytest.fixture(scope="module")
def server() -> Iterator[DaphneServer]:
    """A daphne of its own, with the limits above."""
    server = DaphneServer(LIMITS_ENV)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def history_limits(relay: Relay) -> list[int]:
    """Returns the `limit` of each history request the page sent (None: none)."""
    return [frame.get("limit") for frame in relay.history_requests()]


def errors(relay: Relay) -> list[dict]:
    with relay.lock:
        return [event for event in relay.received if event.get("type") == "error"]


def test_the_room_page_carries_the_servers_limits(browsing, server):
    alice = new_account(server.base_url, "alice")
    room = new_room(server, alice)
    page = open_room(browsing, server, alice, room)
    section = page.locator("section.room")
    expect(section).to_have_attribute("data-max-length", str(MAX_LENGTH))
    expect(section).to_have_attribute("data-history-max", str(HISTORY_MAX))
    expect(section).to_have_attribute(
        "data-typing-interval-ms", str(TYPING_INTERVAL_SECONDS * 1000)
    )
    send(page, "x" * (MAX_LENGTH + 1))
    expect(page.locator("#composer-error")).to_contain_text(
        f"the limit is {MAX_LENGTH}."
    )


def test_a_gap_longer_than_the_history_limit_is_filled_in_requests_within_it(
    browsing, server
):
    page, context, relay, alice, bob, room = open_relayed_room(browsing, server)
    post_messages(server, bob, room, ["first"])
    wait_for_texts(page, ["first"])

    # 13 broadcasts are lost: more than one request may ask for.
    lost = [f"lost {n:02d}" for n in range(1, 14)]
    relay.drop_texts = set(lost)
    post_messages(server, bob, room, [*lost, "after"])
    wanted = ["first", *lost, "after"]
    wait_for_texts(page, wanted)
    assert texts(page) == wanted
    # Newest first, each as large as the server allows, and nothing refused.
    assert history_limits(relay) == [6, 6, 1]
    assert errors(relay) == []
    expect(page.locator("#composer-error")).to_have_text("")


def test_a_resume_that_missed_too_much_fills_the_rest_within_the_limit(
    browsing, server
):
    page, context, relay, alice, bob, room = open_relayed_room(browsing, server)
    post_messages(server, bob, room, ["first"])
    wait_for_texts(page, ["first"])

    page.evaluate("() => window.dispatchEvent(new Event('offline'))")
    context.set_offline(True)
    expect(page.locator("body")).to_have_attribute("data-connection", "offline")
    # More than CHAT_RESUME_MAX: the welcome holds only the last page.
    missed = [f"missed {n:02d}" for n in range(1, 15)]
    post_messages(server, bob, room, missed)
    context.set_offline(False)
    wait_connected(page, timeout=RECONNECT_MS)
    assert re.search(r"\?since=1&deletions=0$", relay.routes[-1].url), relay.routes[
        -1
    ].url

    wanted = ["first", *missed]
    wait_for_texts(page, wanted)
    assert texts(page) == wanted
    # 14 missed, 4 in the welcome: 10 more, in requests of at most 6.
    assert history_limits(relay) == [6, 4]
    assert errors(relay) == []


def test_typing_frames_keep_to_the_servers_interval(browsing, server):
    alice = new_account(server.base_url, "alice")
    room = new_room(server, alice)
    context = browsing.context(server, alice)
    context.add_init_script(RECORD_SENDS)
    page = open_room(browsing, server, alice, room, context=context)

    # Five seconds of steady typing.
    page.locator("#message-input").press_sequentially("x" * 25, delay=200)
    sent = page.evaluate("window.__sent")
    times = [at for at, data in sent if '"typing"' in data]
    assert len(times) >= 2, sent
    gaps = [later - earlier for earlier, later in pairwise(times)]
    # Never sooner than the server's interval, which would drop the frame.
    assert min(gaps) >= TYPING_INTERVAL_SECONDS * 1000, gaps


NAMES = [
    "general",
    "Room-1",
    "a",
    "0-start",
    "-dash-first",
    "_under-first",
    "a" * 64,
    "a" * 65,
    "café",
    "with space",
    "dot.ted",
    "١٢٣",
    "  padded  ",
    "UPPER_case-9",
    "tab\tinside",
]


def test_the_lobby_checks_room_names_with_the_servers_rule(browsing, server):
    alice = new_account(server.base_url, "alice")
    context = browsing.context(server, alice)
    lobby = browsing.page(context, "/chat/")
    section = lobby.locator("section.lobby")
    expect(section).to_have_attribute(
        "data-room-name-pattern", protocol.ROOM_NAME_PATTERN.pattern
    )
    for name in NAMES:
        verdict = lobby.evaluate(LOBBY_VERDICT, name)
        assert verdict == protocol.is_valid_room_name(name.strip().lower()), name


def test_the_lobby_takes_its_room_name_rule_from_the_page(browsing, server):
    """The page's check is the attribute's rule, not a copy of it."""
    alice = new_account(server.base_url, "alice")
    context = browsing.context(server, alice)
    pattern = protocol.ROOM_NAME_PATTERN.pattern

    def narrower_rule(route) -> None:
        response = route.fetch()
        body = response.text()
        attribute = f'data-room-name-pattern="{pattern}"'
        route.fulfill(
            response=response,
            body=body.replace(attribute, 'data-room-name-pattern="[a-z]{1,3}"'),
        )

    context.route(re.compile(r"/chat/$"), narrower_rule)
    lobby = browsing.page(context, "/chat/")
    expect(lobby.locator("section.lobby")).to_have_attribute(
        "data-room-name-pattern", "[a-z]{1,3}"
    )
    assert lobby.evaluate(LOBBY_VERDICT, "abc") is True
    assert lobby.evaluate(LOBBY_VERDICT, "abcd") is False
    assert lobby.evaluate(LOBBY_VERDICT, "ab1") is False
