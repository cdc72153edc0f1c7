"""The room page in a real browser: conversation, presence, typing, safe text."""

from __future__ import annotations

import json
import re

from playwright.sync_api import expect

from tests.browser.conftest import (
    PHONE,
    members,
    new_account,
    new_room,
    notices,
    open_room,
    pending_count,
    query_db,
    send,
    shown_messages,
    texts,
    wait_for_texts,
    wait_until,
)


def test_two_users_chat_both_ways_and_see_join_typing_and_leave(browsing, server):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice)

    page_a = open_room(browsing, server, alice, room)
    expect(page_a.locator("#members li")).to_have_count(1)
    page_b = open_room(browsing, server, bob, room)

    # Each sees the other: a join line for the one already there, both lists.
    expect(page_a.locator("#messages li.notice")).to_have_text(
        [f"{bob.username} joined"]
    )
    for page in (page_a, page_b):
        expect(page.locator("#member-count")).to_have_text("2")
        assert members(page) == sorted([alice.username, bob.username])
    expect(page_b.locator("#members li.own")).to_contain_text(bob.username)

    # Typing shows on the other page only, and goes away by itself.
    page_a.locator("#message-input").press_sequentially("hel")
    expect(page_b.locator("#typing")).to_have_text(f"{alice.username} is typing…")
    expect(page_a.locator("#typing")).to_have_text("")
    expect(page_b.locator("#typing")).to_have_text("", timeout=8_000)

    # Both ways; the message ends the author's typing line at once.
    page_a.locator("#message-input").press_sequentially("lo")
    expect(page_b.locator("#typing")).to_have_text(f"{alice.username} is typing…")
    page_a.locator("#message-input").press("Enter")
    wait_for_texts(page_b, ["hello"])
    expect(page_b.locator("#typing")).to_have_text("")
    send(page_b, "hi alice")
    send(page_b, "how are you?")
    for page in (page_a, page_b):
        wait_for_texts(page, ["hello", "hi alice", "how are you?"])
        assert texts(page) == ["hello", "hi alice", "how are you?"]
        assert pending_count(page) == 0

    # Own messages are marked; one author's run is one group with one header.
    own_a = [m["own"] for m in shown_messages(page_a)]
    own_b = [m["own"] for m in shown_messages(page_b)]
    assert own_a == [True, False, False] and own_b == [False, True, True]
    groups = page_a.locator("#messages li.message:not(.continued) .author")
    expect(groups).to_have_count(2)
    expect(page_a.locator("#messages li.message .day")).to_have_count(1)
    expect(page_a.locator("#messages li.message .day")).to_have_text("Today")
    # Local times, not UTC strings.
    time_text = page_a.locator("#messages li.message time").first.text_content()
    assert re.fullmatch(r"\d{1,2}[:.]\d{2}(\s?[AP]M)?", time_text.strip()), time_text

    # Bob leaves: Alice sees the line and the list shrink.
    page_b.close()
    expect(page_a.locator("#messages li.notice").last).to_have_text(
        f"{bob.username} left"
    )
    expect(page_a.locator("#member-count")).to_have_text("1")
    assert members(page_a) == [alice.username]


def test_a_user_with_two_tabs_is_one_member_and_closing_one_sends_no_leave(
    browsing, server
):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice)
    page_b = open_room(browsing, server, bob, room)

    context_a = browsing.context(server, alice)
    tab_1 = open_room(browsing, server, alice, room, context=context_a)
    tab_2 = open_room(browsing, server, alice, room, context=context_a)
    for page in (page_b, tab_1, tab_2):
        expect(page.locator("#member-count")).to_have_text("2")
        assert members(page) == sorted([alice.username, bob.username])
    expect(page_b.locator("#messages li.notice")).to_have_text(
        [f"{alice.username} joined"]
    )

    def sockets_of_alice() -> int:
        return query_db(
            server,
            "SELECT COUNT(*) FROM chat_connection c"
            " JOIN auth_user u ON u.id = c.user_id WHERE u.username = ?",
            alice.username,
        )[0][0]

    assert sockets_of_alice() == 2
    tab_2.close()
    # The server has forgotten the closed tab's socket: any leave would be out.
    wait_until(lambda: sockets_of_alice() == 1, "the closed tab's socket to be gone")
    send(tab_1, "still here")
    wait_for_texts(page_b, ["still here"])
    assert notices(page_b) == [f"{alice.username} joined"]
    expect(page_b.locator("#member-count")).to_have_text("2")

    # The last tab closing is a leave.
    tab_1.close()
    expect(page_b.locator("#messages li.notice").last).to_have_text(
        f"{alice.username} left"
    )
    assert members(page_b) == [bob.username]


XSS_PAYLOADS = [
    "<script>window.__xss = 'script'</script>",
    "<img src=x onerror=\"window.__xss = 'img'; alert(1)\">",
    "<svg/onload=alert('svg')>",
    "</li></ol><h1 id=injected>not a heading</h1>",
    "javascript:alert(1) &amp; &lt;b&gt;",
    "a" * 600,
    "مرحبا بالعالم — السلام عليكم",
    "👋🏽 emoji 🎉 family: 👨‍👩‍👧‍👦",
    "line one\n  indented line two",
]


def test_hostile_and_unusual_text_is_shown_as_typed_and_runs_nothing(browsing, server):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice)
    page_a = open_room(browsing, server, alice, room)
    page_b = open_room(browsing, server, bob, room, viewport=PHONE)
    dialogs: list[str] = []
    for page in (page_a, page_b):
        page.on(
            "dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss())
        )

    for payload in XSS_PAYLOADS:
        send(page_a, payload)
    for page in (page_a, page_b):
        wait_for_texts(page, XSS_PAYLOADS)
        assert texts(page) == XSS_PAYLOADS
        assert page.evaluate("window.__xss") is None
        for tag in ("script", "img", "svg", "h1#injected"):
            expect(page.locator(f"#messages {tag}")).to_have_count(0)
    assert dialogs == []

    # Long words wrap: nothing is wider than the phone's screen.
    overflow = page_b.evaluate("""() => ({
            page: document.documentElement.scrollWidth - window.innerWidth,
            list: (l => l.scrollWidth - l.clientWidth)(
                document.getElementById("messages")),
        })""")
    assert overflow == {"page": 0, "list": 0}, overflow
    # Right-to-left text is laid out right to left; Latin text is not.
    directions = page_b.locator("#messages li.message .body").evaluate_all(
        "els => els.map(el => el.matches(':dir(rtl)'))"
    )
    assert directions == [text.startswith("مرحبا") for text in XSS_PAYLOADS]


def test_keyboard_only_enter_sends_and_shift_enter_adds_a_line(browsing, server):
    alice = new_account(server.base_url, "alice")
    room = new_room(server, alice)
    page = open_room(browsing, server, alice, room)

    # Labelled fields and a live region for the messages.
    composer = page.get_by_label(f"Message #{room}")
    expect(composer).to_have_attribute("id", "message-input")
    expect(page.locator("#messages")).to_have_attribute("aria-live", "polite")

    # From the top of the page, Tab reaches the composer.
    page.locator("body").focus()
    for _ in range(15):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "message-input":
            break
    else:
        raise AssertionError("Tab never reached the message input")
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    expect(composer).to_have_value("first line\nsecond line")
    page.keyboard.press("Enter")
    wait_for_texts(page, ["first line\nsecond line"])
    expect(composer).to_have_value("")
    # Tab then Space on the Send button sends as well.
    page.keyboard.type("by button")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "send"
    page.keyboard.press("Space")
    wait_for_texts(page, ["by button"])


def test_too_long_text_stays_in_the_input_with_a_message(browsing, server):
    alice = new_account(server.base_url, "alice")
    room = new_room(server, alice)
    page = open_room(browsing, server, alice, room)
    too_long = "x" * 2001
    send(page, too_long)
    expect(page.locator("#composer-error")).to_contain_text("the limit is 2000")
    expect(page.locator("#message-input")).to_have_value(too_long)
    assert pending_count(page) == 0 and texts(page) == []


def test_the_tab_title_counts_unread_messages_while_hidden(browsing, server):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice)
    page_a = open_room(browsing, server, alice, room)
    page_b = open_room(browsing, server, bob, room)
    title = f"#{room} · Chat"
    expect(page_b).to_have_title(title)

    set_hidden(page_b, True)
    send(page_a, "one")
    send(page_a, "two")
    expect(page_b).to_have_title(f"(2) {title}")
    send(page_b, "my own does not count")  # typed in a background tab: still own
    wait_for_texts(page_a, ["my own does not count"])
    expect(page_b).to_have_title(f"(2) {title}")
    set_hidden(page_b, False)
    expect(page_b).to_have_title(title)


def set_hidden(page, hidden: bool) -> None:
    """Makes the page believe its tab went to the background (or came back)."""
    page.evaluate(
        """hidden => {
            Object.defineProperty(document, "hidden",
                {value: hidden, configurable: true});
            Object.defineProperty(document, "visibilityState",
                {value: hidden ? "hidden" : "visible", configurable: true});
            document.dispatchEvent(new Event("visibilitychange"));
        }""",
        hidden,
    )


# ---------------------------------------------------------------------------
# Moderation frames, injected between the real server and the page
# ---------------------------------------------------------------------------


def test_deleted_closed_room_and_kick_frames_change_the_page(browsing, server):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice)
    page_b = open_room(browsing, server, bob, room)

    routes = []

    def through(route):
        upstream = route.connect_to_server()

        def from_page(message):
            frame = json.loads(message)
            if frame.get("type") == "message" and frame["message"].startswith(
                "refuse:"
            ):
                # What the server answers in a closed room.
                route.send(
                    json.dumps(
                        {
                            "type": "error",
                            "code": "room_closed",
                            "detail": "this room is closed",
                            "ref": frame["client_id"],
                        }
                    )
                )
            else:
                upstream.send(message)

        route.on_message(from_page)
        routes.append(route)

    context_a = browsing.context(server, alice)
    context_a.route_web_socket(re.compile(r"/ws/chat/"), through)
    page_a = open_room(browsing, server, alice, room, context=context_a)

    send(page_b, "spam to delete")
    send(page_b, "a keeper")
    wait_for_texts(page_a, ["spam to delete", "a keeper"])
    spam = shown_messages(page_a)[0]
    routes[-1].send(
        json.dumps({"type": "deleted", "id": spam["id"], "seq": spam["seq"]})
    )
    expect(page_a.locator("#messages li.message .body")).to_have_text(["a keeper"])
    # The keeper now heads its own group.
    expect(page_a.locator("#messages li.message").first).not_to_have_class(
        re.compile("continued")
    )

    # A closed room: read only, and the draft stays.
    composer = page_a.locator("#message-input")
    composer.fill("my draft")
    routes[-1].send(json.dumps({"type": "room", "closed": True}))
    expect(page_a.locator("#room-closed")).to_be_visible()
    expect(composer).to_have_attribute("readonly", "")
    expect(page_a.locator("#send")).to_be_disabled()
    composer.press("Enter")
    expect(composer).to_have_value("my draft")
    assert pending_count(page_a) == 0

    routes[-1].send(json.dumps({"type": "room", "closed": False}))
    expect(page_a.locator("#room-closed")).to_be_hidden()
    composer.press("Enter")
    wait_for_texts(page_b, ["my draft"])

    # A post refused with room_closed comes back to the input, room read-only.
    send(page_a, "refuse: not now")
    expect(composer).to_have_value("refuse: not now")
    expect(page_a.locator("#room-closed")).to_be_visible()
    expect(page_a.locator("#composer-error")).to_contain_text("closed")
    assert pending_count(page_a) == 0
    routes[-1].send(json.dumps({"type": "room", "closed": False}))
    expect(page_a.locator("#send")).to_be_enabled()

    # Kicked (4403): said plainly, and no reconnect is even scheduled (a retry
    # would show "reconnecting" with a countdown at once, from the same event).
    connections = len(routes)
    routes[-1].close(code=4403, reason="")
    expect(page_a.locator("body")).to_have_attribute("data-connection", "offline")
    expect(page_a.locator("#status-text")).to_contain_text("removed from this room")
    expect(page_a.locator("#reconnect-now")).to_be_hidden()
    expect(composer).to_have_value("refuse: not now")  # still there to copy
    expect(page_a.locator("#send")).to_be_disabled()
    send(page_b, "after the kick")
    wait_for_texts(page_b, ["after the kick"])
    assert len(routes) == connections
    assert "after the kick" not in texts(page_a)
