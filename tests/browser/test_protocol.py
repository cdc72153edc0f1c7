"""The page against the current socket protocol: batches, presence diffs, a paged
member list, the 4008 close, and requests forgotten with an abandoned socket."""

from __future__ import annotations

import json
import re
import threading
from contextlib import ExitStack
from typing import NamedTuple

from playwright.sync_api import BrowserContext, Page, expect

from tests.browser.conftest import (
    RECONNECT_MS,
    SERVER_ENV,
    WAIT_MS,
    close_socket,
    hold_sockets,
    members,
    new_account,
    new_room,
    notices,
    open_room,
    post_messages,
    shown_messages,
    texts,
    wait_connected,
    wait_for_texts,
)
from tests.integration.conftest import Account

SOCKETS = re.compile(r"/ws/chat/")

# Records the page's sockets and every frame they receive, before the page's
# scripts see it. With `protocols = null` the page asks for no subprotocol.
RECORD_SOCKETS = """(() => {
    const Native = window.WebSocket;
    const forced = %s;
    window.__sockets = [];
    window.__frames = [];
    window.WebSocket = class extends Native {
        constructor(url, protocols) {
            if (forced === null) super(url);
            else super(url, protocols);
            window.__sockets.push(this);
            this.addEventListener("message", (event) =>
                window.__frames.push(event.data));
        }
    };
})();"""


def wait_relayed(page, predicate, what: str) -> None:
    """Polls what a Relay saw until `predicate` holds, or fails.

    Playwright's sync API runs route handlers only inside its own calls, so
    this waits with page.wait_for_timeout (time.sleep would relay nothing).
    """
    for _ in range(WAIT_MS // 50):
        if predicate():
            return
        page.wait_for_timeout(50)
    raise AssertionError(f"timed out waiting for {what}")


class Relay:
    """Routes the page's sockets through to the server, and can drop frames.

    `drop_texts`: server `message` events with these texts never reach the
    page; `drop_history`: nor do `history` answers. `hold_texts`: a frame with
    such a message is held back (in `held`) and sent just after the next frame
    with a message, which so overtakes it. `sent` keeps what the page sent,
    `received` every server event, `routes` every routed socket (the last is
    the current one).
    """

    def __init__(self) -> None:
        self.drop_texts: set[str] = set()
        self.drop_history = False
        self.hold_texts: set[str] = set()
        self.held: list[str] = []
        self.sent: list[dict] = []
        self.received: list[dict] = []
        self.routes = []
        self.lock = threading.Lock()

    def keep(self, event: dict) -> bool:
        if event.get("type") == "message" and event.get("message") in self.drop_texts:
            return False
        return not (event.get("type") == "history" and self.drop_history)

    def __call__(self, route) -> None:
        upstream = route.connect_to_server()

        def from_page(message) -> None:
            with self.lock:
                self.sent.append(json.loads(message))
            upstream.send(message)

        def from_server(message) -> None:
            data = json.loads(message)
            with self.lock:
                self.received.extend(data if isinstance(data, list) else [data])
            events = data if isinstance(data, list) else [data]
            kept = [event for event in events if self.keep(event)]
            if not kept:
                return
            texts = {e.get("message") for e in kept if e.get("type") == "message"}
            if texts & self.hold_texts:
                self.held.append(json.dumps(kept))
                return
            route.send(json.dumps(kept) if isinstance(data, list) else message)
            if texts and self.held:
                for frame in self.held:
                    route.send(frame)
                self.held.clear()

        route.on_message(from_page)
        upstream.on_message(from_server)
        self.routes.append(route)

    def presence_events(self) -> list[dict]:
        with self.lock:
            return [event for event in self.received if event.get("type") == "presence"]

    def history_requests(self) -> list[dict]:
        with self.lock:
            return [frame for frame in self.sent if frame.get("type") == "history"]


class RelayedRoom(NamedTuple):
    page: Page
    context: BrowserContext
    relay: Relay
    alice: Account
    bob: Account
    room: str


def open_relayed_room(browsing, server) -> RelayedRoom:
    """Alice's page in a new room of hers, its sockets through a Relay; Bob
    may post there."""
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice)
    relay = Relay()
    context = browsing.context(server, alice)
    context.route_web_socket(SOCKETS, relay)
    page = open_room(browsing, server, alice, room, context=context)
    return RelayedRoom(page, context, relay, alice, bob, room)


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def test_the_page_asks_for_batches_and_shows_a_burst_once_in_order(browsing, server):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice)
    context = browsing.context(server, alice)
    context.add_init_script(RECORD_SOCKETS % "undefined")
    page = open_room(browsing, server, alice, room, context=context)
    assert page.evaluate("window.__sockets.map(ws => ws.protocol)") == ["chat.batch"]

    burst = [f"burst {n:02d}" for n in range(1, 61)]
    with ExitStack() as stack:
        # Bob stays while he posts: his join cannot cancel out within one
        # presence interval, so a presence diff must reach the page.
        hold_sockets(stack, server, [bob], room)
        stored = post_messages(server, bob, room, burst)
        wait_for_texts(page, burst)
        page.wait_for_function(
            "name => [...document.querySelectorAll('#members li')]"
            ".some(li => li.firstChild.textContent === name)",
            arg=bob.username,
        )
    assert texts(page) == burst
    assert [m["seq"] for m in shown_messages(page)] == [m["seq"] for m in stored]

    frames = page.evaluate("window.__frames")
    decoded = [json.loads(frame) for frame in frames]
    assert all(isinstance(frame, list) and frame for frame in decoded), frames[:3]
    events = [event for frame in decoded for event in frame]
    sent = [e["message"] for e in events if e["type"] == "message"]
    assert sent == burst  # each once, in order, from the server too
    # Bob's join reached the page in a batch too.
    assert any(e["type"] == "presence" for e in events)


def test_the_page_still_reads_one_event_per_frame(browsing, server):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice)
    context = browsing.context(server, alice)
    context.add_init_script(RECORD_SOCKETS % "null")
    page = open_room(browsing, server, alice, room, context=context)
    assert page.evaluate("window.__sockets.map(ws => ws.protocol)") == [""]

    page_b = open_room(browsing, server, bob, room)
    expect(page.locator("#messages li.notice")).to_have_text([f"{bob.username} joined"])
    expect(page.locator("#member-count")).to_have_text("2")
    send_texts = ["one", "two", "three"]
    post_messages(server, bob, room, send_texts)
    wait_for_texts(page, send_texts)
    assert texts(page) == send_texts
    frames = page.evaluate("window.__frames")
    assert all(isinstance(json.loads(frame), dict) for frame in frames)
    page_b.close()
    expect(page.locator("#messages li.notice").last).to_have_text(
        f"{bob.username} left"
    )
    expect(page.locator("#member-count")).to_have_text("1")


# ---------------------------------------------------------------------------
# Presence diffs and the paged member list
# ---------------------------------------------------------------------------


def test_presence_diffs_are_idempotent_and_many_names_make_one_notice(browsing, server):
    page, context, relay, alice, _, room = open_relayed_room(browsing, server)
    expect(page.locator("#member-count")).to_have_text("1")
    # The page's own join (every socket gets it) says nothing.
    wait_relayed(
        page,
        lambda: any(alice.username in e["joins"] for e in relay.presence_events()),
        "the page's own join",
    )
    page.evaluate("() => new Promise(requestAnimationFrame)")  # handled by now
    assert notices(page) == []

    def inject(*events) -> None:
        relay.routes[-1].send(json.dumps(list(events)))

    crowd = ["zed-1", "zed-2", "zed-3", "zed-4", "zed-5"]
    inject(
        {
            "type": "presence",
            "joins": [alice.username, *reversed(crowd)],
            "leaves": ["nobody-here"],
            "members": 6,
        }
    )
    expect(page.locator("#member-count")).to_have_text("6")
    assert notices(page) == ["zed-1, zed-2 and 3 others joined"]
    assert members(page) == sorted([alice.username, *crowd])

    # Again, with one news item: only it is said. Two events in one frame.
    inject(
        {"type": "presence", "joins": ["zed-1"], "leaves": ["zed-2"], "members": 5},
        {"type": "presence", "joins": [], "leaves": ["zed-3", "zed-4"], "members": 3},
    )
    expect(page.locator("#member-count")).to_have_text("3")
    assert notices(page) == [
        "zed-1, zed-2 and 3 others joined",
        "zed-2 left",
        "zed-3 and zed-4 left",
    ]
    assert members(page) == sorted([alice.username, "zed-1", "zed-5"])


def test_a_paged_member_list_shows_the_count_and_loads_the_rest(
    browsing, daphne_factory
):
    server = daphne_factory({**SERVER_ENV, "CHAT_MEMBERS_PAGE": "2"})
    # "aaa-…" sorts before "mmm-…": the viewer is on the first page.
    viewer = new_account(server.base_url, "aaa")
    others = [new_account(server.base_url, "mmm") for _ in range(4)]
    room = new_room(server, viewer)
    everyone = sorted([viewer.username, *(a.username for a in others)])

    with ExitStack() as stack:
        sockets = hold_sockets(stack, server, others, room)
        page = open_room(browsing, server, viewer, room)
        more = page.locator("#members-more")
        expect(page.locator("#member-count")).to_have_text("5")
        assert members(page) == everyone[:2]
        expect(more).to_be_visible()
        expect(more).to_have_text("Show 3 more")

        more.click()
        expect(page.locator("#members li")).to_have_count(4)
        assert members(page) == everyone[:4]
        expect(more).to_have_text("Show 1 more")
        more.press("Enter")
        expect(more).to_be_hidden()
        assert members(page) == everyone
        expect(page.locator("#member-count")).to_have_text("5")
        # Focus stays in the member list when the control goes away.
        assert page.evaluate("document.activeElement.id") == "members"

        # The list stays live once complete.
        last = everyone[-1]
        close_socket(sockets[last])
        expect(page.locator("#member-count")).to_have_text("4")
        expect(page.locator("#messages li.notice").last).to_have_text(f"{last} left")
        assert members(page) == everyone[:-1]


def test_a_join_while_the_list_is_partial_is_counted_and_shown_once(
    browsing, daphne_factory
):
    server = daphne_factory({**SERVER_ENV, "CHAT_MEMBERS_PAGE": "2"})
    viewer = new_account(server.base_url, "aaa")
    others = [new_account(server.base_url, "mmm") for _ in range(3)]
    late = new_account(server.base_url, "zzz")
    room = new_room(server, viewer)
    everyone = sorted([viewer.username, *(a.username for a in others)])

    with ExitStack() as stack:
        hold_sockets(stack, server, others, room)
        page = open_room(browsing, server, viewer, room)
        expect(page.locator("#member-count")).to_have_text("4")
        assert members(page) == everyone[:2]
        hold_sockets(stack, server, [late], room)
        expect(page.locator("#member-count")).to_have_text("5")
        expect(page.locator("#messages li.notice")).to_have_text(
            [f"{late.username} joined"]
        )
        more = page.locator("#members-more")
        expect(more).to_have_text("Show 2 more")
        more.click()
        expect(more).to_be_hidden()
        # The late joiner was listed with the join and is not listed twice.
        assert members(page) == sorted([*everyone, late.username])


# ---------------------------------------------------------------------------
# Closes and abandoned sockets
# ---------------------------------------------------------------------------


def test_a_too_slow_close_reconnects_and_resumes(browsing, server):
    page, context, relay, alice, bob, room = open_relayed_room(browsing, server)
    post_messages(server, bob, room, ["before"])
    wait_for_texts(page, ["before"])

    relay.drop_texts = {"queued then dropped"}
    post_messages(server, bob, room, ["queued then dropped"])
    relay.routes[-1].close(code=4008, reason="too slow")
    expect(page.locator("body")).not_to_have_attribute("data-connection", "open")
    expect(page.locator("#status-text")).not_to_contain_text("Disconnected")
    wait_connected(page, timeout=RECONNECT_MS)
    assert len(relay.routes) == 2
    assert re.search(r"\?since=\d+&deletions=\d+$", relay.routes[-1].url), relay.routes[
        -1
    ].url
    relay.drop_texts = set()
    post_messages(server, bob, room, ["after"])
    wait_for_texts(page, ["before", "queued then dropped", "after"])
    assert texts(page) == ["before", "queued then dropped", "after"]


def test_load_older_works_after_going_offline_with_a_page_in_flight(browsing, server):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice)
    # The browser server's CHAT_HISTORY_PAGE is 20: 3 pages.
    wanted = [f"old {n:02d}" for n in range(1, 56)]
    for start in range(0, len(wanted), 11):
        post_messages(server, bob, room, wanted[start : start + 11])
    context = browsing.context(server, alice)
    page = open_room(browsing, server, alice, room, context=context)
    messages = page.locator("#messages")
    expect(messages).not_to_have_attribute("aria-busy", "true")
    shown_before = len(texts(page))
    assert shown_before < len(wanted)

    # A page of history is asked for, and the network goes in the same
    # instant: its answer never comes.
    asked = page.evaluate("""() => {
        const button = document.getElementById("load-older");
        button.click();
        const busy = document.getElementById("messages").getAttribute("aria-busy");
        window.dispatchEvent(new Event("offline"));
        return busy;
    }""")
    assert asked == "true"
    context.set_offline(True)
    expect(page.locator("body")).to_have_attribute("data-connection", "offline")
    context.set_offline(False)
    wait_connected(page, timeout=RECONNECT_MS)
    expect(messages).not_to_have_attribute("aria-busy", "true")

    # Scrolling up reads back to the start again.
    history_start = page.locator("#history-start")
    for _ in range(10):
        if history_start.is_visible():
            break
        count = len(texts(page))
        messages.evaluate("list => { list.scrollTop = 0; }")
        page.wait_for_function(
            """n => document.querySelectorAll('#messages li.message').length > n
                || !document.getElementById('history-start').hidden""",
            arg=count,
        )
    expect(history_start).to_be_visible()
    assert texts(page) == wanted


def test_a_broadcast_overtaken_by_the_next_one_is_not_asked_for(browsing, server):
    page, context, relay, alice, bob, room = open_relayed_room(browsing, server)
    post_messages(server, bob, room, ["first"])
    wait_for_texts(page, ["first"])

    # Posted through two workers, seq n+1 can arrive just after seq n+2: a
    # hole for a moment, which every page of the room asking history for
    # would turn into a query per page.
    relay.hold_texts = {"overtaken"}
    post_messages(server, bob, room, ["overtaken"])
    wait_relayed(page, lambda: relay.held, "the held broadcast")
    post_messages(server, bob, room, ["overtaking"])
    wait_for_texts(page, ["first", "overtaken", "overtaking"])

    # A broadcast that is really lost is still asked for, after the same wait;
    # by then the wait for the overtaken one has long passed.
    relay.drop_texts = {"lost"}
    post_messages(server, bob, room, ["lost", "after"])
    wait_for_texts(page, ["first", "overtaken", "overtaking", "lost", "after"])
    after = shown_messages(page)[-1]["seq"]
    assert [frame["before"] for frame in relay.history_requests()] == [after]


def test_gaps_are_filled_after_going_offline_with_a_gap_request_in_flight(
    browsing, server
):
    page, context, relay, alice, bob, room = open_relayed_room(browsing, server)
    post_messages(server, bob, room, ["first"])
    wait_for_texts(page, ["first"])

    # A broadcast is lost and so is the answer to the page's request for it;
    # the network goes before anything else comes.
    relay.drop_texts = {"lost 1"}
    relay.drop_history = True
    post_messages(server, bob, room, ["lost 1", "after 1"])
    wait_for_texts(page, ["after 1"])
    wait_relayed(page, relay.history_requests, "the page's request for the gap")
    page.evaluate("() => window.dispatchEvent(new Event('offline'))")
    context.set_offline(True)
    expect(page.locator("body")).to_have_attribute("data-connection", "offline")
    relay.drop_history = False
    relay.drop_texts = set()
    context.set_offline(False)
    wait_connected(page, timeout=RECONNECT_MS)
    # The abandoned request is asked again on the new socket.
    wait_for_texts(page, ["first", "lost 1", "after 1"])

    # And a new gap is filled as usual.
    relay.drop_texts = {"lost 2"}
    post_messages(server, bob, room, ["lost 2", "after 2"])
    wait_for_texts(page, ["first", "lost 1", "after 1", "lost 2", "after 2"])
    assert texts(page) == ["first", "lost 1", "after 1", "lost 2", "after 2"]
