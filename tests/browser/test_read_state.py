"""Read state in a real browser: read positions shared by a user's tabs, the
"New" line, unread and mention counts, mentions, desktop notifications.

Headless Chromium reports every page as visible and focused whatever is in
front: separate contexts, a second tab of one context, bring_to_front, a
window minimized through CDP (Browser.setWindowBounds) and CDP focus
emulation turned off all leave `visibilityState` "visible" and
`hasFocus()` true. So `attend` tells a page what a real tab would:
`document.hidden`, `visibilityState` and `hasFocus()`, with the events a
browser fires when they change (as test_room.set_hidden does).
"""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from tests.browser.conftest import (
    PHONE,
    WAIT_MS,
    new_account,
    new_room,
    open_room,
    post_messages,
    stored_read_seq,
    texts,
    wait_connected,
    wait_for_texts,
    wait_until,
)

# Records the `read` frames each page sends, in order.
RECORD_READS = """(() => {
    const send = WebSocket.prototype.send;
    window.__reads = [];
    WebSocket.prototype.send = function (data) {
        try {
            const frame = JSON.parse(data);
            if (frame.type === "read") window.__reads.push(frame.seq);
        } catch (err) {}
        return send.call(this, data);
    };
})();"""

# Records each notification the page creates (and permission requests), and
# keeps the objects so a test can click one; the browser still shows them.
RECORD_NOTIFICATIONS = """(() => {
    const Real = window.Notification;
    window.__notifications = [];
    window.__notes = [];
    window.__permissionRequests = 0;
    if (typeof Real !== "function") return;
    class Recorded extends Real {
        constructor(title, options = {}) {
            window.__notifications.push(
                {title, body: options.body, tag: options.tag});
            super(title, options);
            window.__notes.push(this);
        }
        static requestPermission(...args) {
            window.__permissionRequests += 1;
            return Real.requestPermission(...args);
        }
    }
    window.Notification = Recorded;
})();"""


# Makes the page believe its tab is in front (visible) or not and its
# window focused or not, firing the events a browser fires when they change.
ATTEND = """([visible, focused]) => {
    const wasVisible = document.visibilityState === "visible";
    const hadFocus = document.hasFocus();
    Object.defineProperty(document, "hidden", {value: !visible, configurable: true});
    Object.defineProperty(document, "visibilityState",
        {value: visible ? "visible" : "hidden", configurable: true});
    document.hasFocus = () => focused;
    if (wasVisible !== visible) document.dispatchEvent(new Event("visibilitychange"));
    if (hadFocus !== focused) {
        window.dispatchEvent(new Event(focused ? "focus" : "blur"));
    }
}"""


def attend(page: Page, *, visible: bool, focused: bool) -> None:
    """Puts the page's tab in front (visible) or behind, and its window in
    focus or not, as far as the page can tell."""
    page.evaluate(ATTEND, [visible, focused])


def open_in_background(browsing, server, account, room: str) -> Page:
    """Opens `room` in a tab that is behind another from the start (as a
    link opened in a new background tab is)."""
    context = browsing.context(server, account)
    context.add_init_script(f"({ATTEND})([false, false])")
    return open_room(browsing, server, account, room, context=context)


def refresh_often(page: Page, section: str, name: str, ms: int = 300) -> None:
    """Sets a page's polling interval (a data-* attribute the page reads on
    each poll) and restarts its timer, as a tab coming back to the front does."""
    page.evaluate(
        """([section, name, ms]) => {
            document.querySelector(section).dataset[name] = String(ms);
            document.dispatchEvent(new Event("visibilitychange"));
        }""",
        [section, name, ms],
    )


def title_of(room: str, count: str | None = None) -> str:
    return f"({count}) #{room} · Chat" if count else f"#{room} · Chat"


def sidebar_counts(page: Page, room: str):
    return page.locator(f'#room-list li[data-room="{room}"] .counts')


def reads(page: Page) -> list[int]:
    return page.evaluate("window.__reads")


# ---------------------------------------------------------------------------
# One user, two devices
# ---------------------------------------------------------------------------


def test_reading_on_one_device_clears_the_unread_count_on_the_other(browsing, server):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, bob)
    devices = []
    for _ in range(2):
        context = browsing.context(server, alice)
        context.add_init_script(RECORD_READS)
        devices.append(open_room(browsing, server, alice, room, context=context))
    away, here = devices
    # One tab in the background; one on screen in a window without focus.
    attend(away, visible=False, focused=False)
    attend(here, visible=True, focused=False)

    stored = post_messages(server, bob, room, ["one", "two", "three"])
    for page in devices:
        wait_for_texts(page, ["one", "two", "three"])
        expect(page).to_have_title(title_of(room, "3"))
        counts = sidebar_counts(page, room)
        expect(counts).to_have_attribute("data-unread", "3")
        expect(counts).to_have_text(re.compile("3 unread"))
    # Shown is not seen: neither told the server anything.
    assert reads(away) == [] and reads(here) == []

    # The user clicks into the window: what is in view is read, and the
    # server tells the other device, which clears its count.
    attend(here, visible=True, focused=True)
    expect(here).to_have_title(title_of(room))
    expect(away).to_have_title(title_of(room))
    expect(sidebar_counts(away, room)).to_have_attribute("data-unread", "0")
    last = stored[-1]["seq"]
    expect(away.locator("section.room")).to_have_attribute("data-read-seq", str(last))
    assert reads(here) == [last] and reads(away) == []
    wait_until(
        lambda: stored_read_seq(server, alice.username, room) == last,
        "the read position to be stored",
    )

    # More while the background tab stays behind: it counts them, the
    # front one reads them, never sending a position lower than before.
    more = post_messages(server, bob, room, ["four", "five"])
    wait_for_texts(away, ["four", "five"])
    expect(away.locator("section.room")).to_have_attribute(
        "data-read-seq", str(more[-1]["seq"])
    )
    expect(away).to_have_title(title_of(room))
    sent = reads(here)
    assert sent == sorted(set(sent)) and sent[-1] == more[-1]["seq"], sent
    assert reads(away) == []


# ---------------------------------------------------------------------------
# Coming back: the "New" line, the lobby's counts
# ---------------------------------------------------------------------------


def test_the_new_line_marks_what_came_while_away_and_the_lobby_counts_it(
    browsing, server
):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, bob)
    old = post_messages(server, bob, room, [f"old {n}" for n in range(1, 6)])

    # A first visit: nothing is new, and what is on screen is read.
    page = open_room(browsing, server, alice, room)
    wait_for_texts(page, ["old 5"])
    expect(page.locator("#messages li.new-line")).to_have_count(0)
    wait_until(
        lambda: stored_read_seq(server, alice.username, room) == old[-1]["seq"],
        "the first visit's read position to be stored",
    )
    page.reload()
    wait_connected(page)
    wait_for_texts(page, ["old 5"])
    expect(page.locator("#messages li.new-line")).to_have_count(0)
    expect(page).to_have_title(title_of(room))

    # Away in the lobby while Bob posts more than a screen and a page of
    # history (20 here), one of them a mention: the lobby's poll counts
    # them, and so does the page the server renders.
    page.goto("/chat/")
    refresh_often(page, ".lobby", "refreshMs")
    row_counts = page.locator(f'#rooms tr[data-room="{room}"] .counts')
    expect(row_counts).to_have_attribute("data-unread", "0")
    news = [f"new {n:02d}" for n in range(1, 31)]
    news[24] = f"new 25 for @{alice.username}"
    stored = post_messages(server, bob, room, news)
    expect(row_counts).to_have_attribute("data-unread", "30")
    expect(row_counts).to_have_attribute("data-mentions", "1")
    # The page as the server renders it, before any poll can change it.
    page.route("**/chat/rooms.json", lambda route: route.abort())
    page.reload()
    link = page.get_by_role("link", name=f"#{room} 30 unread, 1 mention")
    expect(link).to_be_visible()
    expect(link.locator(".badge")).to_have_text(["@1", "30"])

    page.unroute("**/chat/rooms.json")
    link.click()
    wait_connected(page)
    line = page.locator("#messages li.new-line")
    expect(line).to_have_count(1)
    # Above the first unread message, which is older than the welcome's
    # page: the view followed it up, and both are on screen.
    first_new = page.locator("#messages li.new-line + li.message")
    expect(first_new).to_have_attribute("data-seq", str(stored[0]["seq"]))
    expect(first_new.locator(".body")).to_have_text("new 01")
    expect(line).to_be_in_viewport()
    expect(first_new).to_be_in_viewport()
    # What lies below the screen is still unread.
    expect(page).to_have_title(re.compile(r"^\(\d+, @1\) "))
    assert stored_read_seq(server, alice.username, room) < stored[-1]["seq"]

    # Reading down to the end: nothing is unread, the line stays until
    # the next visit, which has none.
    page.locator("#messages").evaluate("l => { l.scrollTop = l.scrollHeight; }")
    expect(page).to_have_title(title_of(room))
    expect(line).to_have_count(1)
    # What comes now is read as it comes: the view stays at the bottom and
    # does not go back up to the line.
    live = post_messages(server, bob, room, [f"live {n:02d}" for n in range(1, 26)])
    wait_for_texts(page, ["live 25"])
    expect(page.locator("#messages li.message").last).to_be_in_viewport()
    expect(line).not_to_be_in_viewport()
    wait_until(
        lambda: stored_read_seq(server, alice.username, room) == live[-1]["seq"],
        "the end to be stored as read",
    )
    page.reload()
    wait_connected(page)
    wait_for_texts(page, ["live 25"])
    expect(page.locator("#messages li.new-line")).to_have_count(0)
    page.goto("/chat/")
    expect(page.locator(f'#rooms tr[data-room="{room}"] .counts')).to_have_attribute(
        "data-unread", "0"
    )


def test_reading_on_another_device_takes_the_new_line_and_the_count_away(
    browsing, server
):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, bob)
    old = post_messages(server, bob, room, ["old 1", "old 2"])
    first = open_room(browsing, server, alice, room)
    wait_until(
        lambda: stored_read_seq(server, alice.username, room) == old[-1]["seq"],
        "the first visit's read position to be stored",
    )
    first.close()
    post_messages(server, bob, room, ["new 1", "new 2", "new 3"])

    page = open_in_background(browsing, server, alice, room)
    line = page.locator("#messages li.new-line")
    expect(line).to_have_count(1)
    after_line = page.locator("#messages li.new-line + li.message")
    expect(after_line.locator(".body")).to_have_text("new 1")
    # Below the line, Bob's run starts again with his name.
    expect(after_line).not_to_have_class(re.compile(r"\bcontinued\b"))
    expect(page).to_have_title(title_of(room, "3"))
    assert stored_read_seq(server, alice.username, room) == old[-1]["seq"]

    # Read on the phone: this tab's line and count say nothing new any more.
    open_room(browsing, server, alice, room, viewport=PHONE)
    expect(page).to_have_title(title_of(room))
    expect(line).to_have_count(0)
    # Without the line, Bob's messages are one run again.
    new_1 = page.locator("#messages li.message", has_text="new 1")
    expect(new_1).to_have_class(re.compile(r"\bcontinued\b"))


# ---------------------------------------------------------------------------
# Mentions
# ---------------------------------------------------------------------------


def test_a_mention_is_highlighted_for_the_mentioned_user_only(browsing, server):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, bob)
    page_a = open_room(browsing, server, alice, room)
    page_b = open_room(browsing, server, bob, room)
    sent = [
        f"hey @{alice.username}, and @notauser",
        "no mention here",
        f"<b>@{alice.username}</b> <img src=x onerror=window.__xss=1>",
        f"@{bob.username} talks to himself",
    ]
    post_messages(server, bob, room, sent)
    for page in (page_a, page_b):
        wait_for_texts(page, sent)
        assert texts(page) == sent  # the text is unchanged, only marked up
    messages = page_a.locator("#messages li.message")
    expect(messages.nth(0)).to_have_class(re.compile(r"\bmention-me\b"))
    expect(messages.nth(0).locator(".mention")).to_have_text([f"@{alice.username}"])
    expect(messages.nth(0).locator(".mention.me")).to_have_count(1)
    expect(messages.nth(1)).not_to_have_class(re.compile(r"\bmention-me\b"))
    expect(messages.nth(1).locator(".mention")).to_have_count(0)
    expect(messages.nth(2)).to_have_class(re.compile(r"\bmention-me\b"))
    expect(messages.nth(2).locator("b, img")).to_have_count(0)
    assert page_a.evaluate("window.__xss") is None
    # Bob's mention of himself is his name, not a mention of Alice.
    expect(messages.nth(3).locator(".mention")).to_have_text([f"@{bob.username}"])
    expect(messages.nth(3)).not_to_have_class(re.compile(r"\bmention-me\b"))

    # For Bob, Alice's name is marked as a name, and nothing is his mention.
    expect(page_b.locator("#messages li.message.mention-me")).to_have_count(0)
    expect(
        page_b.locator("#messages li.message").nth(0).locator(".mention")
    ).to_have_text([f"@{alice.username}"])
    expect(page_b.locator("#messages .mention.me")).to_have_count(1)  # his own name


def test_a_mention_notifies_a_hidden_page_and_the_notification_opens_the_room(
    browsing, server
):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, bob)
    other = new_room(server, bob, "other")
    context = browsing.context(server, alice)
    context.grant_permissions(["notifications"], origin=server.base_url)
    context.add_init_script(RECORD_NOTIFICATIONS)
    page = open_room(browsing, server, alice, room, context=context)
    # Allowed already: nothing to ask.
    expect(page.locator("#notify-enable")).to_be_hidden()
    section = page.locator("section.room")

    # On screen, even in a window without focus (so not read): the message
    # itself says it, no notification.
    attend(page, visible=True, focused=False)
    post_messages(server, bob, room, [f"@{alice.username} on screen"])
    expect(section).to_have_attribute("data-mentions-handled", "1")
    assert page.evaluate("window.__notifications") == []

    attend(page, visible=False, focused=False)
    text = f"@{alice.username} are you there?"
    stored = post_messages(server, bob, room, [text])
    expect(section).to_have_attribute("data-mentions-handled", "2")
    assert page.evaluate("window.__notifications") == [
        {
            "title": f"@{bob.username} in #{room}",
            "body": text,
            "tag": f"mention-{stored[0]['id']}",
        }
    ]

    # A mention in another room reaches this page too; its notification
    # opens that room.
    elsewhere = post_messages(server, bob, other, [f"over here @{alice.username}"])
    expect(section).to_have_attribute("data-mentions-handled", "3")
    notes = page.evaluate("window.__notifications")
    assert notes[-1]["title"] == f"@{bob.username} in #{other}"
    assert notes[-1]["tag"] == f"mention-{elsewhere[0]['id']}"
    page.evaluate("window.__notes.at(-1).dispatchEvent(new Event('click'))")
    expect(page).to_have_url(re.compile(rf"/chat/{other}/$"))
    wait_connected(page)
    wait_for_texts(page, [f"over here @{alice.username}"])


def test_notifications_are_asked_for_on_a_click_only(browsing, server):
    alice = new_account(server.base_url, "alice")
    room = new_room(server, alice)
    context = browsing.context(server, alice)
    context.add_init_script(RECORD_NOTIFICATIONS)
    page = open_room(browsing, server, alice, room, context=context)
    button = page.get_by_role("button", name="Enable notifications")
    expect(button).to_be_visible()
    assert page.evaluate("window.__permissionRequests") == 0
    button.click()
    # Headless Chromium answers "denied" when nothing granted it: asked once,
    # and the button goes away with the browser's answer.
    expect(button).to_be_hidden()
    assert page.evaluate("[window.__permissionRequests, Notification.permission]") == [
        1,
        "denied",
    ]


# ---------------------------------------------------------------------------
# The room list beside the room
# ---------------------------------------------------------------------------


def test_the_room_list_counts_other_rooms_live_and_folds_away_on_a_phone(
    browsing, server
):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, bob, "here")
    other = new_room(server, bob, "there")
    never = new_room(server, bob, "never")
    post_messages(server, bob, other, ["before"])
    context = browsing.context(server, alice)
    # Alice has read #there once: it is one of her rooms.
    visit = open_room(browsing, server, alice, other, context=context)
    wait_until(
        lambda: stored_read_seq(server, alice.username, other) is not None,
        "the visit to be stored",
    )
    visit.close()

    page = open_room(browsing, server, alice, room, context=context)
    entries = page.locator("#room-list li")
    expect(entries).to_have_count(2)
    expect(entries.locator("a")).to_have_text(
        [re.compile(f"#{room}"), re.compile(f"#{other}")]
    )
    expect(page.locator(f'#room-list li[data-room="{never}"]')).to_have_count(0)
    current = page.locator(f'#room-list li[data-room="{room}"] a')
    expect(current).to_have_attribute("aria-current", "page")
    # From here on the list polls only when an event asks it to.
    refresh_often(page, "section.room", "roomsRefreshMs", 600_000)

    # A mention there shows at once: the `mention` event counts it, even
    # while rooms.json cannot be reached...
    counts = sidebar_counts(page, other)
    page.route("**/chat/rooms.json", lambda route: route.abort())
    post_messages(server, bob, other, ["plain", f"@{alice.username} look"])
    expect(counts).to_have_attribute("data-mentions", "1")
    expect(counts).to_have_attribute("data-unread", "1")
    expect(page.locator("#room-list-panel")).to_have_class(re.compile(r"\bstale\b"))
    # ...and asks for the list, which then counts the plain message too.
    page.unroute("**/chat/rooms.json")
    post_messages(server, bob, other, [f"@{alice.username} look"])
    expect(counts).to_have_attribute("data-mentions", "2")
    expect(counts).to_have_attribute("data-unread", "3")
    expect(
        page.get_by_role("link", name=f"#{other} 3 unread, 2 mentions")
    ).to_be_visible()
    expect(page).to_have_title(title_of(room, "3, @2"))

    # Read on another device: its `read` event clears the count here.
    reader = open_room(browsing, server, alice, other)
    wait_for_texts(reader, [f"@{alice.username} look"])
    expect(counts).to_have_attribute("data-unread", "0")
    expect(counts).to_have_attribute("data-mentions", "0")
    expect(page).to_have_title(title_of(room))

    # On a phone the list folds behind a button in the header, which counts
    # what is unread; it opens over the conversation and Escape closes it.
    reader.close()
    post_messages(server, bob, other, [f"@{alice.username} again"])
    page.set_viewport_size(PHONE)
    panel = page.locator("#room-list-panel")
    toggle = page.locator("#room-list-toggle")
    expect(panel).to_be_hidden()
    expect(toggle).to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "false")
    expect(toggle.locator(".counts")).to_have_attribute("data-mentions", "1")
    toggle.click()
    expect(panel).to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    page.locator(f'#room-list li[data-room="{other}"] a').focus()
    page.keyboard.press("Escape")
    expect(panel).to_be_hidden()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], width
    toggle.click()
    page.locator(f'#room-list li[data-room="{other}"] a').click()
    expect(page).to_have_url(re.compile(rf"/chat/{other}/$"), timeout=WAIT_MS)
