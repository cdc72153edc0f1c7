"""Moderation end to end: the real admin over HTTP, felt at once by real pages.

A superuser logs in to /admin/ on the same daphne the pages talk to, and every
step is the plain form POST the admin's own buttons send; ids come from the
admin's search results, as an operator would find them.
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass

import pytest
from playwright.sync_api import Page, WebSocket, expect

from tests.browser.conftest import (
    REPO_ROOT,
    DaphneServer,
    new_account,
    new_room,
    notices,
    open_room,
    pending_count,
    query_db,
    send,
    stored_count,
    texts,
    unique_name,
    wait_connected,
    wait_for_texts,
)
from tests.integration.conftest import PASSWORD, HttpResponse, HttpSession

ROOMS = "/admin/chat/room/"
MESSAGES = "/admin/chat/message/"
SOCKETS = "/admin/chat/connection/"
BANS = "/admin/chat/roomban/"
USERS = "/admin/auth/user/"

# The page's text for close code 4403, in connection.js (any other 44xx says
# "Disconnected (…)").
REMOVED = "You were removed from this room, or are not allowed in it."

CSRF_INPUT = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
SELECTED = re.compile(r'name="_selected_action" value="(\d+)"')
MESSAGE_LIST = re.compile(r'<ul class="messagelist">(.*?)</ul>', re.S)
TAG = re.compile(r"<[^>]+>")


# ---------------------------------------------------------------------------
# The admin, driven over HTTP
# ---------------------------------------------------------------------------


@dataclass
class AdminSite:
    """A superuser's signed-in HTTP session on the server's /admin/."""

    http: HttpSession

    def form_post(self, path: str, data: dict[str, str]) -> HttpResponse:
        """GETs `path`, then POSTs `data` with the CSRF token of its form."""
        page = self.http.get(path)
        assert page.status == 200, f"GET {path}: {page.status}\n{page.text[:2000]}"
        token = CSRF_INPUT.search(page.text)
        assert token, f"GET {path} has no form with a CSRF token"
        response = self.http.request(
            path,
            data={"csrfmiddlewaretoken": token[1], **data},
            headers={"Referer": self.http.base_url + path},
        )
        status = response.status
        assert status == 200, f"POST {path}: {status}\n{response.text[:2000]}"
        return response

    def log_in(self, username: str, password: str) -> None:
        response = self.form_post(
            "/admin/login/?next=/admin/",
            {"username": username, "password": password, "next": "/admin/"},
        )
        assert urllib.parse.urlsplit(response.url).path == "/admin/", response.url

    def ids(self, changelist: str, **query: str) -> list[int]:
        """Returns the ids a changelist search lists (its action checkboxes)."""
        response = self.http.get(f"{changelist}?{urllib.parse.urlencode(query)}")
        assert response.status == 200, f"{changelist}: {response.status}"
        return [int(pk) for pk in SELECTED.findall(response.text)]

    def one_id(self, changelist: str, **query: str) -> int:
        ids = self.ids(changelist, **query)
        assert len(ids) == 1, f"{changelist} {query} lists {ids}"
        return ids[0]

    def action(self, changelist: str, name: str, pk: int, **extra: str) -> list[str]:
        """Runs a changelist action on one row; returns the messages it shows."""
        response = self.form_post(
            changelist, {"action": name, "_selected_action": str(pk), **extra}
        )
        # An action that ran redirects back to the list (a refused one re-renders).
        assert urllib.parse.urlsplit(response.url).path == changelist, response.url
        return flash_messages(response)


def flash_messages(response: HttpResponse) -> list[str]:
    """Returns the texts of the admin's message list on a page."""
    found = MESSAGE_LIST.search(response.text)
    if not found:
        return []
    items = re.findall(r"<li[^>]*>(.*?)</li>", found[1], re.S)
    return [html.unescape(TAG.sub("", item)).strip() for item in items]


def form_errors(response: HttpResponse) -> list[str]:
    """Returns the texts of the error lists on a form page that was refused."""
    lists = re.findall(
        r'<ul class="errorlist[^"]*"[^>]*>(.*?)</ul>', response.text, re.S
    )
    return [html.unescape(TAG.sub(" ", found)).strip() for found in lists]


@pytest.fixture(scope="module")
def admin_site(server: DaphneServer) -> AdminSite:
    """A superuser made in the server's own database, logged in over HTTP."""
    username = unique_name("admin")
    result = subprocess.run(
        [sys.executable, "manage.py", "createsuperuser", "--noinput"],
        cwd=REPO_ROOT,
        env={
            **server.env,
            "DJANGO_SUPERUSER_USERNAME": username,
            "DJANGO_SUPERUSER_PASSWORD": PASSWORD,
            "DJANGO_SUPERUSER_EMAIL": f"{username}@example.com",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"createsuperuser:\n{result.stdout}{result.stderr}"
    site = AdminSite(HttpSession(server.base_url))
    site.log_in(username, PASSWORD)
    return site


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def recorded(server: DaphneServer, room: str) -> list[str]:
    """Returns the kinds of the room's moderation record, oldest first."""
    rows = query_db(
        server,
        "SELECT a.kind FROM chat_moderationaction a JOIN chat_room r"
        " ON r.id = a.room_id WHERE r.slug = ? ORDER BY a.id",
        room,
    )
    return [kind for (kind,) in rows]


def watch_sockets(page: Page) -> list[WebSocket]:
    """Returns a list of the WebSockets `page` opens from now on (reloads too)."""
    opened: list[WebSocket] = []
    page.on("websocket", lambda socket: opened.append(socket))
    return opened


def watch_closes(page: Page) -> list[int]:
    """Returns a list of the close codes `page`'s sockets see from now on.

    Read from the page's console (connection.js logs each close): Playwright's
    own close event carries no code.
    """
    codes: list[int] = []

    def on_console(message) -> None:
        words = message.text.split()
        if words[:2] == ["socket", "closed"]:
            codes.append(int(words[2]))

    page.on("console", on_console)
    return codes


def expect_removed(page: Page) -> None:
    """The page was closed with 4403: it says so and schedules no reconnect.

    The page decides in the close handler itself: a retry would show
    "reconnecting" with a countdown and the "Reconnect now" button at once.
    """
    expect(page.locator("body")).to_have_attribute("data-connection", "offline")
    expect(page.locator("#status-text")).to_have_text(REMOVED)
    expect(page.locator("#reconnect-now")).to_be_hidden()
    expect(page.locator("#send")).to_be_disabled()


def expect_read_only(page: Page, closed: bool) -> None:
    """The page is connected, and read-only exactly when the room is closed."""
    expect(page.locator("body")).to_have_attribute("data-connection", "open")
    banner = page.locator("#room-closed")
    composer = page.locator("#message-input")
    if closed:
        expect(banner).to_be_visible()
        expect(composer).to_have_attribute("readonly", "")
        expect(page.locator("#send")).to_be_disabled()
    else:
        expect(banner).to_be_hidden()
        expect(composer).not_to_have_attribute("readonly", "")
        expect(page.locator("#send")).to_be_enabled()


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


def test_a_message_deleted_in_the_admin_leaves_every_open_page_and_history(
    browsing, server, admin_site
):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice)
    page_a = open_room(browsing, server, alice, room)
    page_b = open_room(browsing, server, bob, room)
    spam = f"buy cheap {unique_name('pills')}"
    send(page_b, spam)
    send(page_b, "a keeper")
    for page in (page_a, page_b):
        wait_for_texts(page, [spam, "a keeper"])

    # The operator finds the message by its text: the id the pages show.
    spam_id = admin_site.one_id(MESSAGES, q=spam)
    assert page_a.locator(f'#messages li.message[data-id="{spam_id}"]').count() == 1
    shown = admin_site.action(MESSAGES, "delete_selected", spam_id, post="yes")
    assert shown == ["Successfully deleted 1 message."]

    for page in (page_a, page_b):
        expect(page.locator("#messages li.message .body")).to_have_text(["a keeper"])
        # The keeper now heads its own group, with its author shown.
        expect(page.locator("#messages li.message").first).not_to_have_class(
            re.compile("continued")
        )
    page_a.reload()
    wait_connected(page_a)
    wait_for_texts(page_a, ["a keeper"])  # the welcome's history, all in one frame
    assert texts(page_a) == ["a keeper"]

    # A soft delete: the admin still has it, under "deleted", and the record.
    assert admin_site.ids(MESSAGES, q=spam, deleted="yes") == [spam_id]
    assert admin_site.ids(MESSAGES, q=spam, deleted="no") == []
    assert recorded(server, room) == ["delete_message"]


def test_closing_a_room_in_the_admin_makes_pages_read_only_until_reopened(
    browsing, server, admin_site
):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice)
    page_a = open_room(browsing, server, alice, room)
    page_b = open_room(browsing, server, bob, room)
    room_id = admin_site.one_id(ROOMS, q=room)
    composer = page_a.locator("#message-input")
    draft = "a thought worth keeping"
    composer.fill(draft)

    assert admin_site.action(ROOMS, "close_rooms", room_id) == [f"Closed: {room}."]
    expect_read_only(page_a, closed=True)
    expect(composer).to_have_value(draft)
    composer.press("Enter")  # refused by the page itself: nothing goes out
    expect(composer).to_have_value(draft)
    assert pending_count(page_a) == 0

    # A page opened while the room is closed learns it from `welcome.closed`.
    page_b.reload()
    expect_read_only(page_b, closed=True)
    expect(page_b.locator("#status-text")).to_have_text("Connected")

    assert admin_site.action(ROOMS, "reopen_rooms", room_id) == [f"Reopened: {room}."]
    for page in (page_a, page_b):
        expect_read_only(page, closed=False)
    composer.press("Enter")
    for page in (page_a, page_b):
        wait_for_texts(page, [draft])
    expect(composer).to_have_value("")
    assert stored_count(server, room, draft) == 1
    assert recorded(server, room) == ["close_room", "reopen_room"]


def test_a_user_kicked_in_the_admin_is_removed_and_does_not_reconnect(
    browsing, server, admin_site
):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice)
    page_a = open_room(browsing, server, alice, room)
    page_b = open_room(browsing, server, bob, room)
    # The join announced, not only counted: a kick within the same presence
    # interval would fold the join and the leave into one leave, with no notice.
    expect(page_a.locator("#messages li.notice").last).to_have_text(
        f"{bob.username} joined"
    )
    expect(page_a.locator("#member-count")).to_have_text("2")
    reconnects = watch_sockets(page_b)

    socket_id = admin_site.one_id(SOCKETS, q=bob.username)
    assert admin_site.action(SOCKETS, "kick_users", socket_id) == ["Kicked 1 user(s)."]
    expect_removed(page_b)
    expect(page_a.locator("#messages li.notice").last).to_have_text(
        f"{bob.username} left"
    )
    expect(page_a.locator("#member-count")).to_have_text("1")
    send(page_a, "after the kick")
    wait_for_texts(page_a, ["after the kick"])
    assert "after the kick" not in texts(page_b)
    assert reconnects == []
    assert admin_site.ids(SOCKETS, q=bob.username) == []

    # A kick is not a ban: coming back by hand works.
    page_b.reload()
    wait_connected(page_b)
    wait_for_texts(page_b, ["after the kick"])
    expect(page_a.locator("#messages li.notice").last).to_have_text(
        f"{bob.username} joined"
    )
    assert recorded(server, room) == ["kick"]


def test_a_user_banned_in_the_admin_is_removed_and_refused_on_reload(
    browsing, server, admin_site
):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice)
    elsewhere = new_room(server, alice, "elsewhere")
    page_a = open_room(browsing, server, alice, room)
    page_b = open_room(browsing, server, bob, room)
    # The join announced, not only counted: a kick within the same presence
    # interval would fold the join and the leave into one leave, with no notice.
    expect(page_a.locator("#messages li.notice").last).to_have_text(
        f"{bob.username} joined"
    )
    expect(page_a.locator("#member-count")).to_have_text("2")

    response = admin_site.form_post(
        f"{BANS}add/",
        {
            "room": str(admin_site.one_id(ROOMS, q=room)),
            "user": str(admin_site.one_id(USERS, q=bob.username)),
            "reason": "flooding",
            "expires_at_0": "",
            "expires_at_1": "",
            "_save": "Save",
        },
    )
    assert urllib.parse.urlsplit(response.url).path == BANS, form_errors(response)
    assert flash_messages(response) == [
        f"The room ban “{bob.username} banned from {room}” was added successfully."
    ]
    expect_removed(page_b)
    expect(page_a.locator("#messages li.notice").last).to_have_text(
        f"{bob.username} left"
    )
    expect(page_a.locator("#member-count")).to_have_text("1")

    # A reload is refused at the handshake (4403), with no retry after it. A
    # handshake the browser saw dropped (1006: the worker too slow to answer
    # on a loaded machine) is retried, as any drop is; only the 4403 is final.
    attempts = watch_sockets(page_b)
    closes = watch_closes(page_b)
    page_b.reload()
    expect_removed(page_b)
    # Another room is not affected by the ban.
    page_other = open_room(browsing, server, bob, elsewhere, context=page_b.context)
    send(page_other, "still welcome here")
    wait_for_texts(page_other, ["still welcome here"])
    assert closes[-1:] == [4403], closes
    assert all(code < 4400 for code in closes[:-1]), closes
    assert len(attempts) == len(closes), ([s.url for s in attempts], closes)
    assert notices(page_a) == [f"{bob.username} joined", f"{bob.username} left"]
    assert recorded(server, room) == ["ban"]
