"""Private rooms and direct messages in real Chromium: opened from a name,
made from the lobby, members added and removed on the page, and a third
person who cannot get in by any URL."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.browser.conftest import (
    new_account,
    new_room,
    open_room,
    send,
    texts,
    unique_name,
    wait_connected,
    wait_for_texts,
)

# connection.js's text for 4403.
REMOVED = "You were removed from this room, or are not allowed in it."


def test_a_direct_message_between_two_people_that_a_third_cannot_open(browsing, server):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    carol = new_account(server.base_url, "carol")
    room = new_room(server, alice)
    page_a = open_room(browsing, server, alice, room)
    open_room(browsing, server, bob, room)

    # From bob's name in the member list.
    page_a.locator("#members li a", has_text=bob.username).click()
    wait_connected(page_a)
    expect(page_a.locator("h1")).to_have_text(f"@{bob.username}")
    dm_path = page_a.url.removeprefix(server.base_url)
    assert dm_path.startswith("/chat/dm-"), dm_path
    send(page_a, "just between us")
    wait_for_texts(page_a, ["just between us"])

    # bob gets there from alice's name too: the same room.
    page_b = browsing.page(browsing.context(server, bob), f"/chat/dm/{alice.username}/")
    wait_connected(page_b)
    assert page_b.url.removeprefix(server.base_url) == dm_path
    expect(page_b.locator("h1")).to_have_text(f"@{alice.username}")
    wait_for_texts(page_b, ["just between us"])

    # carol: the same page as for a room that does not exist, no socket, no
    # messages, and not in her lists.
    context_c = browsing.context(server, carol)
    page_c = browsing.page(context_c, dm_path)
    expect(page_c.locator("h1")).to_contain_text("does not exist")
    assert "just between us" not in page_c.content()
    lobby_c = browsing.page(context_c, "/chat/")
    expect(lobby_c.locator(f'#rooms tr[data-room="{room}"]')).to_have_count(1)
    slug = dm_path.strip("/").removeprefix("chat/")
    expect(lobby_c.locator(f'#rooms tr[data-room="{slug}"]')).to_have_count(0)
    listed = lobby_c.evaluate(
        "async () => (await (await fetch('/chat/rooms.json')).json())"
        ".rooms.map(r => r.room)"
    )
    assert slug not in listed and room in listed


def test_a_private_room_made_in_the_lobby_whose_creator_adds_and_removes_members(
    browsing, server
):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    name = unique_name("plans")
    lobby = browsing.page(browsing.context(server, alice), "/chat/")
    lobby.locator("#room-form input[name=name]").fill(name)
    lobby.locator("#room-form input[name=private]").check()
    lobby.locator("#room-form button[type=submit]").click()
    wait_connected(lobby)
    expect(lobby.locator("h1")).to_contain_text(f"#{name}")
    expect(lobby.locator("h1 .room-kind")).to_have_text("private")

    # bob cannot get in before he is added.
    context_b = browsing.context(server, bob)
    outside = browsing.page(context_b, f"/chat/{name}/")
    expect(outside.locator("h1")).to_contain_text("does not exist")

    lobby.locator("#member-form input[name=username]").fill(bob.username)
    lobby.locator("#member-form button[type=submit]").click()
    expect(lobby.locator(".notices")).to_contain_text(f"{bob.username} can now enter")
    expect(lobby.locator("#room-members li")).to_have_count(2)
    wait_connected(lobby)

    page_b = open_room(browsing, server, bob, name, context=context_b)
    send(page_b, "glad to be in")
    wait_for_texts(lobby, ["glad to be in"])
    # Only the creator manages members.
    expect(page_b.locator("#member-form")).to_have_count(0)

    lobby.locator(f'#room-members li[data-member="{bob.username}"] button').click()
    expect(lobby.locator(".notices")).to_contain_text("was removed")
    # bob's open page is closed at once, and says why.
    expect(page_b.locator("#status-text")).to_have_text(REMOVED)
    page_b.reload()
    expect(page_b.locator("h1")).to_contain_text("does not exist")
    assert "glad to be in" not in page_b.content()
    assert texts(lobby) == ["glad to be in"]
