"""The pages work under their Content-Security-Policy: nothing is refused; and
the room page when its sign-in changes."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from tests.browser.conftest import (
    new_account,
    new_room,
    open_room,
    wait_connected,
    wait_for_texts,
    wait_until,
)
from tests.browser.conftest import send as send_text
from tests.integration.conftest import PASSWORD, Account, HttpSession


def csp_reports(console: list[str]) -> list[str]:
    return [line for line in console if "Content Security Policy" in line]


def test_the_pages_run_under_their_policy_with_nothing_refused(browsing, server):
    alice = new_account(server.base_url, "alice")
    room = new_room(server, alice)
    context = browsing.context(server, alice)
    violations: list[str] = []
    context.on(
        "page",
        lambda page: page.on("console", lambda msg: violations.append(msg.text)),
    )

    lobby = browsing.page(context, "/chat/")
    lobby.wait_for_load_state("networkidle")
    policy = context.request.get("/chat/").headers["content-security-policy"]
    assert "script-src 'self'" in policy
    # The room: its modules load and its socket opens and carries a message.
    page = open_room(browsing, server, alice, room, context=context)
    send_text(page, "under the policy")
    wait_for_texts(page, ["under the policy"])
    browsing.page(context, "/admin/login/").wait_for_load_state("networkidle")
    browsing.page(context, "/accounts/login/").wait_for_load_state("networkidle")

    assert csp_reports(browsing.console) == []
    assert csp_reports(violations) == []


SIGNED_OUT = "You are signed out. Log in again to chat."


def second_session(server, account: Account) -> Account:
    """Signs `account` in once more, as another device: a session of its own."""
    session = HttpSession(server.base_url)
    response = session.post_form(
        "/accounts/login/", {"username": account.username, "password": PASSWORD}
    )
    assert response.status == 200 and session.cookie("sessionid"), response.text
    return Account(account.username, session.cookie("sessionid"))


def test_a_new_password_keeps_this_browser_chatting_and_signs_the_others_out(
    browsing, server
):
    alice = new_account(server.base_url, "alice")
    room = new_room(server, alice)
    laptop = browsing.context(server, alice)
    chatting = open_room(browsing, server, alice, room, context=laptop)
    phone = open_room(browsing, server, second_session(server, alice), room)

    # In another tab of the laptop: Django signs this browser in again under
    # a new session key, which the open room page's socket does not have.
    form = browsing.page(laptop, "/accounts/password_change/")
    form.fill("input[name=old_password]", PASSWORD)
    form.fill("input[name=new_password1]", "a-New-pass-43")
    form.fill("input[name=new_password2]", "a-New-pass-43")
    form.click("[type=submit]")
    expect(form).to_have_url(re.compile(r"/accounts/password_change/done/$"))

    # The phone's session is over: it says so and stops.
    expect(phone.locator("#status-text")).to_have_text(SIGNED_OUT)
    expect(phone.locator("body")).to_have_attribute("data-connection", "offline")
    # The laptop's page was closed with 4401 too, and came back on its new
    # session: it still chats.
    wait_until(
        lambda: server.output(limit=None).count("socket closed with 4401") >= 2,
        what="both sockets closed with 4401",
    )
    wait_connected(chatting)
    send_text(chatting, "still here")
    wait_for_texts(chatting, ["still here"])
