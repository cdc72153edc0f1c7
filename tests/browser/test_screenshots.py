"""The room at phone and desktop width, with screenshots for a reviewer.

They land in test-output/browser/; docs/screenshots/room.png and read-state.png
(in the README) are copies of room-1280.png and read-state-1280.png, which
shows the "New" line, a mention and the room list's counts.
"""

from __future__ import annotations

from playwright.sync_api import expect

from tests.browser.conftest import (
    DESKTOP,
    PHONE,
    Account,
    create_room,
    open_room,
    post_messages,
    screenshot_path,
    send,
    sign_up,
    stored_read_seq,
    wait_for_texts,
    wait_until,
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


def test_read_state_at_desktop_and_phone_width(browsing, server):
    """Carol comes back to #design: the "New" line, a mention of her, and her
    other room's counts beside it (and behind the Rooms button on a phone)."""
    carol = Account("carol", sign_up(server.base_url, "carol"))
    dave = Account("dave", sign_up(server.base_url, "dave"))
    for name in ("design", "releases"):
        create_room(server.base_url, dave.sessionid, name)
    post_messages(
        server, dave, "design", ["Sketches for the sidebar are up.", "Two options."]
    )
    post_messages(server, dave, "releases", ["1.4 is tagged."])
    for name, last in (("design", "Two options."), ("releases", "1.4 is tagged.")):
        visit = open_room(browsing, server, carol, name)
        wait_for_texts(visit, [last])
        wait_until(
            lambda name=name: stored_read_seq(server, "carol", name) is not None,
            f"carol's visit to #{name} to be stored",
        )
        visit.close()
    post_messages(
        server,
        dave,
        "design",
        [
            "Went with option B: badges right of the name.",
            "@carol can you check the phone layout?",
            "The mention badge is the red one.",
        ],
    )
    post_messages(server, dave, "releases", ["1.5 freeze on Friday", "@carol ok?"])

    page = open_room(browsing, server, carol, "design")
    expect(page.locator("#messages li.new-line")).to_be_in_viewport()
    expect(page.locator("#messages li.mention-me")).to_have_count(1)
    others = page.locator('#room-list li[data-room="releases"] .counts')
    expect(others).to_have_attribute("data-unread", "2")
    expect(others).to_have_attribute("data-mentions", "1")
    expect(page).to_have_title("(2, @1) #design · Chat")
    page.screenshot(path=screenshot_path("read-state-1280.png"))
    assert_fits(page, DESKTOP)

    page.set_viewport_size(PHONE)
    assert_fits(page, PHONE)
    page.locator("#room-list-toggle").click()
    expect(page.locator("#room-list-panel")).to_be_visible()
    page.screenshot(path=screenshot_path("read-state-360.png"))

    lobby = browsing.page(page.context, "/chat/")
    expect(lobby.locator('#rooms tr[data-room="releases"] .counts')).to_have_attribute(
        "data-mentions", "1"
    )
    lobby.screenshot(path=screenshot_path("lobby-1280.png"))
