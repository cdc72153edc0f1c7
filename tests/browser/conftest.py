"""Headless Chromium (Playwright, sync API) against real daphne processes.

The browser is Debian's /usr/bin/chromium (`make test` installs it); Playwright's
own browser download is never used. Every wait is on DOM state with a timeout,
every page and server is closed in teardown, and a failing test's report shows
the browser console and the servers' logs.
"""

from __future__ import annotations

import functools
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from harness.client import ChatSocket, SocketThread
from tests.integration.conftest import (  # noqa: F401 (daphne_factory: a fixture)
    REPO_ROOT,
    Account,
    DaphneServer,
    _running,
    create_room,
    daphne_factory,
    new_account,
    sign_up,
    unique_name,
)

CHROMIUM = os.environ.get("CHAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # we run as root in CI
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
OUTPUT_DIR = REPO_ROOT / "test-output" / "browser"
# Every wait in these tests is bounded by this (or by a longer, named one).
WAIT_MS = 10_000
# A reconnect after a server restart: backoff with jitter can take a few tries.
RECONNECT_MS = 30_000
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 360, "height": 740}

# The browser tests post faster than a person; history pages are short so that
# a few dozen messages make several pages.
SERVER_ENV = {"CHAT_RATE_MESSAGES": "1000", "CHAT_HISTORY_PAGE": "20"}

expect.set_options(timeout=WAIT_MS)


def pytest_collection_modifyitems(config, items) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.browser)


# ---------------------------------------------------------------------------
# Browser and server
# ---------------------------------------------------------------------------


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the package; closed when its tests are done."""
    if shutil.which(CHROMIUM) is None:
        raise RuntimeError(f"{CHROMIUM} is not installed (make test installs chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="package")
def server() -> Iterator[DaphneServer]:
    """One daphne (in-memory layer, own SQLite file) shared by the package."""
    server = DaphneServer(SERVER_ENV)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------
# Pages, with their console kept for the failure report
# ---------------------------------------------------------------------------


@dataclass
class Browsing:
    """Opens signed-in browser contexts and pages; closes them all at the end."""

    browser: Browser
    console: list[str]
    contexts: list[BrowserContext] = field(default_factory=list)

    def context(
        self, server: DaphneServer, account: Account | None, viewport=DESKTOP
    ) -> BrowserContext:
        """Returns a new context (its own cookies) signed in as `account`."""
        context = self.browser.new_context(viewport=viewport, base_url=server.base_url)
        context.set_default_timeout(WAIT_MS)
        if account is not None:
            context.add_cookies(
                [
                    {
                        "name": "sessionid",
                        "value": account.sessionid,
                        "url": server.base_url,
                    }
                ]
            )
        self.contexts.append(context)
        return context

    def page(self, context: BrowserContext, path: str) -> Page:
        """Returns a new tab of `context` showing `path`, its console recorded."""
        page = context.new_page()
        label = f"{len(self.console)}:{path}"
        page.on(
            "console",
            lambda msg: self.console.append(f"[{label}] {msg.type}: {msg.text}"),
        )
        page.on(
            "pageerror", lambda exc: self.console.append(f"[{label}] pageerror: {exc}")
        )
        page.goto(path)
        return page

    def close(self) -> None:
        for context in self.contexts:
            try:
                context.close()
            except Exception as exc:  # a context of a browser that already died
                self.console.append(f"closing a context failed: {exc}")


@pytest.fixture
def browsing(browser, request) -> Iterator[Browsing]:
    console: list[str] = []
    request.node.browser_console = console
    browsing = Browsing(browser, console)
    yield browsing
    browsing.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Adds the browser console and the servers' logs to a failure report."""
    report = yield
    if report.failed:
        console = getattr(item, "browser_console", None)
        if console is not None:
            report.sections.append(("browser console", "\n".join(console) or "(empty)"))
        for server in _running:
            report.sections.append(
                (f"daphne {server.base_url} log", server.output()[-8000:])
            )
    return report


# ---------------------------------------------------------------------------
# Room page helpers: they wait on DOM state, never on time
# ---------------------------------------------------------------------------


def open_room(
    browsing: Browsing,
    server: DaphneServer,
    account: Account,
    room: str,
    *,
    context: BrowserContext | None = None,
    viewport=DESKTOP,
) -> Page:
    """Opens `room` as `account` and waits until its socket is connected."""
    context = context or browsing.context(server, account, viewport)
    page = browsing.page(context, f"/chat/{room}/")
    wait_connected(page)
    return page


def wait_connected(page: Page, timeout: int = WAIT_MS) -> None:
    expect(page.locator("body")).to_have_attribute(
        "data-connection", "open", timeout=timeout
    )


def send(page: Page, text: str) -> None:
    """Types `text` into the composer and presses Enter, as a person would."""
    composer = page.locator("#message-input")
    composer.fill(text)
    composer.press("Enter")


def shown_messages(page: Page) -> list[dict[str, Any]]:
    """Returns the stored messages on the page, top to bottom (not pending ones)."""
    return page.locator("#messages").evaluate("""list => Array.from(
            list.querySelectorAll("li.message:not(.pending)"), li => ({
            seq: Number(li.dataset.seq),
            id: Number(li.dataset.id),
            user: li.dataset.user,
            text: li.querySelector(".body").textContent,
            own: li.classList.contains("own"),
        }))""")


def texts(page: Page) -> list[str]:
    return [message["text"] for message in shown_messages(page)]


def wait_for_texts(page: Page, wanted: list[str], timeout: int = WAIT_MS) -> None:
    """Waits until every text in `wanted` is shown as a stored message."""
    page.wait_for_function(
        """wanted => {
            const bodies = Array.from(
                document.querySelectorAll("#messages li.message:not(.pending) .body"),
                el => el.textContent);
            return wanted.every(text => bodies.includes(text));
        }""",
        arg=wanted,
        timeout=timeout,
    )


def pending_count(page: Page) -> int:
    return page.locator("#messages li.message.pending").count()


def notices(page: Page) -> list[str]:
    return page.locator("#messages li.notice").all_text_contents()


def members(page: Page) -> list[str]:
    """Returns the member list's names (without the "you" badge)."""
    return page.locator("#members li").evaluate_all(
        "items => items.map(li => li.firstChild.textContent)"
    )


def new_room(server: DaphneServer, owner: Account, prefix: str = "room") -> str:
    name = unique_name(prefix)
    create_room(server.base_url, owner.sessionid, name)
    return name


@functools.cache
def socket_thread() -> SocketThread:
    """The loop that serves the plain sockets these tests open beside the page."""
    return SocketThread()


def pytest_sessionfinish(session) -> None:
    if socket_thread.cache_info().currsize:
        socket_thread().close()


def post_messages(
    server: DaphneServer, account: Account, room: str, messages: list[str]
) -> list[dict[str, Any]]:
    """Posts `messages` in one burst over a plain socket; returns their stored
    copies, in order."""

    async def post() -> list[dict[str, Any]]:
        socket = await ChatSocket.open(
            server.base_url, room, sessionid=account.sessionid
        )
        try:
            await socket.receive_type("welcome")
            return await socket.post_burst(messages)
        finally:
            await socket.close()

    return socket_thread().run(post())


def hold_sockets(
    stack: ExitStack, server: DaphneServer, accounts: list[Account], room: str
) -> dict[str, ChatSocket]:
    """Opens one plain socket per account in `room`, closed when `stack` is;
    returns them by username once every socket's join is known to the room."""
    thread = socket_thread()

    async def hold() -> dict[str, ChatSocket]:
        sockets: dict[str, ChatSocket] = {}
        for account in accounts:
            socket = await ChatSocket.open(
                server.base_url, room, sessionid=account.sessionid
            )
            stack.callback(close_socket, socket)
            await socket.receive_type("welcome")
            sockets[account.username] = socket
        if accounts:
            # The last one's own join comes in a presence diff (to every
            # socket, its own too) that also carries every join before it:
            # once it is here, no diff about these sockets can reach a page
            # opened later.
            last = accounts[-1].username
            while last not in (await socket.receive_presence())["joins"]:
                pass
        return sockets

    return thread.run(hold())


def close_socket(socket: ChatSocket) -> None:
    """Closes a socket that `hold_sockets` opened (before its stack does)."""
    socket_thread().run(socket.close())


def query_db(server: DaphneServer, sql: str, *params: Any) -> list[tuple]:
    """Reads the server's SQLite file (read-only) for what the page cannot show."""
    uri = f"file:{server.db_path}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=5) as connection:
        return connection.execute(sql, params).fetchall()


def wait_until(
    predicate: Callable[[], bool], what: str, timeout: float = WAIT_MS / 1000
):
    """Polls server-side state (not the page) until `predicate` holds, or fails."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def stored_count(server: DaphneServer, room: str, text: str) -> int:
    rows = query_db(
        server,
        "SELECT COUNT(*) FROM chat_message m JOIN chat_room r ON r.id = m.room_id "
        "WHERE r.slug = ? AND m.body = ?",
        room,
        text,
    )
    return rows[0][0]


def stored_read_seq(server: DaphneServer, username: str, room: str) -> int | None:
    """Returns how far the server has stored that `username` read `room`."""
    rows = query_db(
        server,
        "SELECT m.read_seq FROM chat_membership m"
        " JOIN auth_user u ON u.id = m.user_id JOIN chat_room r ON r.id = m.room_id"
        " WHERE u.username = ? AND r.slug = ?",
        username,
        room,
    )
    return rows[0][0] if rows else None


def screenshot_path(name: str) -> Path:
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    return OUTPUT_DIR / name
