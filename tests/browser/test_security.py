"""The pages work under their Content-Security-Policy: nothing is refused."""

from __future__ import annotations

from tests.browser.conftest import new_account, new_room, open_room, wait_for_texts
from tests.browser.conftest import send as send_text


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
