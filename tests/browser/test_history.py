"""Reading back: older pages on scrolling up, the place kept, a marker for new ones."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.browser.conftest import (
    new_account,
    new_room,
    open_room,
    post_messages,
    shown_messages,
)

# The browser server's CHAT_HISTORY_PAGE is 20: 65 messages make 4 pages.
TOTAL = 65


def seed(server, room: str, *accounts) -> list[str]:
    """Posts TOTAL numbered messages, authors taking turns (so each has a header)."""
    wanted = [f"message {n:02d}" for n in range(1, TOTAL + 1)]
    for start in range(0, TOTAL, 5):
        author = accounts[(start // 5) % len(accounts)]
        post_messages(server, author, room, wanted[start : start + 5])
    return wanted


def seqs(page) -> list[int]:
    return [m["seq"] for m in shown_messages(page)]


def top_of(page, seq: int) -> float:
    """Returns where message `seq` sits, relative to the top of the message list."""
    return page.locator("#messages").evaluate(
        """(list, seq) => list.querySelector(`li[data-seq="${seq}"]`)
            .getBoundingClientRect().top - list.getBoundingClientRect().top""",
        seq,
    )


def scroll_to_top(page) -> None:
    """Scrolls the message list to its top with the mouse wheel, and no further."""
    distance = page.locator("#messages").evaluate("l => l.scrollTop")
    page.locator("#messages").hover()
    page.mouse.wheel(0, -distance)


def test_scrolling_up_loads_older_history_in_order_keeping_the_place(browsing, server):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice)
    wanted = seed(server, room, alice, bob)

    page = open_room(browsing, server, bob, room)
    # The welcome holds the last page, and the view starts at the bottom.
    expect(page.locator("#messages li.message")).to_have_count(20)
    assert seqs(page) == list(range(46, 66))
    expect(page.locator("#load-older")).to_be_visible()
    assert page.locator("#messages").evaluate(
        "l => l.scrollHeight - l.scrollTop - l.clientHeight < 40"
    )

    for count, first in ((40, 26), (60, 6)):
        previous_first = seqs(page)[0]
        scroll_to_top(page)
        page.wait_for_function(
            "n => document.querySelectorAll('#messages li.message').length >= n",
            arg=count,
        )
        before = top_of(page, previous_first)
        assert seqs(page) == list(range(first, 66))
        # The message that was at the top is still where the reader left it,
        # not pushed away by the page that came in above it.
        assert 0 <= before < page.locator("#messages").evaluate("l => l.clientHeight")
        assert page.locator("#messages").evaluate("l => l.scrollTop") > 0

    scroll_to_top(page)
    expect(page.locator("#history-start")).to_be_visible()
    expect(page.locator("#history-start")).to_have_text(
        f"This is the start of #{room}."
    )
    expect(page.locator("#load-older")).to_be_hidden()
    shown = shown_messages(page)
    assert [m["seq"] for m in shown] == list(range(1, TOTAL + 1))
    assert [m["text"] for m in shown] == wanted


def test_a_marker_counts_new_messages_while_scrolled_up(browsing, server):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice)
    seed(server, room, alice, bob)
    page = open_room(browsing, server, bob, room)
    expect(page.locator("#messages li.message")).to_have_count(20)
    marker = page.locator("#new-messages")
    expect(marker).to_be_hidden()

    # The whole history loaded, then reading a little above the bottom: new
    # messages must not move the view.
    for _ in range(10):
        if page.locator("#history-start").is_visible():
            break
        count = page.locator("#messages li.message").count()
        scroll_to_top(page)
        page.wait_for_function(
            "n => document.querySelectorAll('#messages li.message').length > n",
            arg=count,
        )
    else:
        raise AssertionError("scrolling up never reached the start of the room")
    expect(page.locator("#messages li.message")).to_have_count(TOTAL)
    page.locator("#messages").evaluate(
        "l => { l.scrollTop = l.scrollHeight - l.clientHeight - 300; }"
    )
    reading = page.locator("#messages").evaluate("l => l.scrollTop")
    assert reading > 0
    post_messages(server, alice, room, ["new one"])
    expect(marker).to_have_text("1 new message ↓")
    post_messages(server, alice, room, ["new two"])
    expect(marker).to_have_text("2 new messages ↓")
    assert page.locator("#messages").evaluate("l => l.scrollTop") == reading

    # The marker takes the reader down, and goes away.
    marker.click()
    expect(marker).to_be_hidden()
    expect(page.locator("#messages li.message").last).to_be_in_viewport()
    expect(page.locator("#message-input")).to_be_focused()

    # At the bottom, new messages simply scroll into view.
    post_messages(server, alice, room, ["new three"])
    expect(page.locator("#messages li.message .body").last).to_have_text("new three")
    expect(page.locator("#messages li.message").last).to_be_in_viewport()
    expect(marker).to_be_hidden()
