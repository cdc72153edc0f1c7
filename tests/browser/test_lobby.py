"""The lobby in a real browser: a live room list, entering and creating rooms."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from tests.browser.conftest import (
    new_account,
    new_room,
    open_room,
    post_messages,
    unique_name,
    wait_connected,
)

# The lobby refreshes every 5 s; the test makes it 0.3 s (the same code path).
LIVE_MS = 5_000


def test_the_room_list_updates_live_without_a_reload(browsing, server):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice)
    lobby = browsing.page(browsing.context(server, alice), "/chat/")
    row = lobby.locator(f'#rooms tr[data-room="{room}"]')
    expect(row.locator(".online")).to_have_text("0")
    expect(row.locator(".activity time")).to_have_text(re.compile("now|second"))
    created = row.locator(".activity time").get_attribute("datetime")
    lobby.evaluate("""() => {
            window.__sameDocument = true;
            document.querySelector(".lobby").dataset.refreshMs = "300";
            document.dispatchEvent(new Event("visibilitychange"));
        }""")

    # Bob comes in and talks: the count and the activity change in place.
    page_b = open_room(browsing, server, bob, room)
    expect(row.locator(".online")).to_have_text("1", timeout=LIVE_MS)
    post_messages(server, bob, room, ["anyone here?"])
    expect(row.locator(".activity time")).not_to_have_attribute(
        "datetime", created, timeout=LIVE_MS
    )
    # The most recently active room comes first.
    expect(lobby.locator("#rooms tbody tr").first).to_have_attribute(
        "data-room", room, timeout=LIVE_MS
    )

    # A room someone else creates appears; one everybody leaves goes to 0.
    other = new_room(server, bob, "fresh")
    expect(lobby.locator(f'#rooms tr[data-room="{other}"]')).to_have_count(
        1, timeout=LIVE_MS
    )
    page_b.close()
    expect(row.locator(".online")).to_have_text("0", timeout=LIVE_MS)
    assert lobby.evaluate("window.__sameDocument") is True  # never reloaded


def test_a_bad_room_name_is_explained_and_a_good_one_enters_by_keyboard(
    browsing, server
):
    alice = new_account(server.base_url, "alice")
    lobby = browsing.page(browsing.context(server, alice), "/chat/")
    name_field = lobby.get_by_label("Room name")
    error = lobby.locator("#room-name-error")

    # Keyboard only: Tab to the field, type, Enter.
    lobby.locator("body").focus()
    for _ in range(10):
        lobby.keyboard.press("Tab")
        if lobby.evaluate("document.activeElement.name") == "name":
            break
    else:
        raise AssertionError("Tab never reached the room name field")
    lobby.keyboard.type("Not a room!")
    lobby.keyboard.press("Enter")
    expect(error).to_contain_text("is not a room name")
    expect(error).to_contain_text("Lower-case letters, digits")
    expect(name_field).to_have_attribute("aria-invalid", "true")
    expect(lobby).to_have_url(re.compile(r"/chat/$"))

    # The server says the same when the page's check is bypassed.
    lobby.evaluate(
        "HTMLFormElement.prototype.submit.call(document.getElementById('room-form'))"
    )
    expect(lobby.locator("#room-name-error")).to_contain_text(
        "Use 1-64 lower-case letters"
    )
    expect(lobby.get_by_label("Room name")).to_have_attribute("aria-invalid", "true")

    # A good name, in any case: the room is created and entered.
    wanted = unique_name("Café-Free").replace("é", "e")
    name_field = lobby.get_by_label("Room name")
    name_field.fill("")
    name_field.focus()
    lobby.keyboard.type(wanted)
    lobby.keyboard.press("Enter")
    expect(lobby).to_have_url(re.compile(rf"/chat/{wanted.lower()}/$"))
    wait_connected(lobby)
    expect(lobby.locator("h1")).to_have_text(f"#{wanted.lower()}")
