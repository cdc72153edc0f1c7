"""The room at phone and desktop width, with screenshots for a reviewer.

They land in test-output/browser/; docs/screenshots/room.png (in the README) is
a copy of room-1280.png.
"""

from __future__ import annotations

from playwright.sync_api import expect

from tests.browser.conftest import (
    DESKTOP,
    PHONE,
    Account,
    open_room,
    screenshot_path,
    send,
    sign_up,
    wait_for_texts,
)

CONVERSATION = [
    ("bob", "Morning! Did the deploy go out?"),
    ("alice", "It did, about ten minutes ago."),
    ("alice", "Reconnects resumed with ?since, nothing lost."),
    ("bob", "Nice. The phone layout works too?"),
    (
        "alice",
        "Checked at 360 px:\nmembers on top, the list scrolls, the composer stays put.",
    ),
    ("bob", "<b>markup</b> stays text, as it should"),
]


def test_room_at_phone_and_desktop_width(browsing, server):
    # Fixed, readable names: no other test signs up "alice" or "bob".
    alice = Account("alice", sign_up(server.base_url, "alice"))
    bob = Account("bob", sign_up(server.base_url, "bob"))
    page_a = open_room(browsing, server, alice, "general")
    page_b = open_room(browsing, server, bob, "general")
    pages = {"alice": page_a, "bob": page_b}
    for author, text in CONVERSATION:
        send(pages[author], text)
        wait_for_texts(page_a, [text])
    page_b.locator("#message-input").press_sequentially("See you")
    expect(page_a.locator("#typing")).to_have_text("bob is typing…")

    page_a.screenshot(path=screenshot_path("room-1280.png"))
    assert_fits(page_a, DESKTOP)

    page_a.set_viewport_size(PHONE)
    expect(page_a.locator("#messages li.message").last).to_be_in_viewport()
    page_a.screenshot(path=screenshot_path("room-360.png"))
    assert_fits(page_a, PHONE)

    lobby = browsing.page(page_a.context, "/chat/")
    expect(lobby.locator('#rooms tr[data-room="general"] .online')).to_have_text("2")
    lobby.set_viewport_size(PHONE)
    lobby.screenshot(path=screenshot_path("lobby-360.png"))
    width = lobby.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], width


def assert_fits(page, viewport) -> None:
    """Nothing scrolls sideways, and the list, the composer and Send are on screen."""
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= viewport["width"], f"{width} px wide at {viewport}"
    for selector in ("#messages", "#message-input", "#send", "#members"):
        box = page.locator(selector).bounding_box()
        assert box is not None, selector
        assert box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"], (
            selector,
            box,
        )
        assert box["y"] >= 0 and box["y"] + box["height"] <= viewport["height"], (
            selector,
            box,
        )
