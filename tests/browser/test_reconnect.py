"""Reconnecting: a server restart and a dropped network lose nothing, repeat nothing."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.browser.conftest import (
    RECONNECT_MS,
    SERVER_ENV,
    new_account,
    new_room,
    open_room,
    pending_count,
    post_messages,
    send,
    shown_messages,
    stored_count,
    texts,
    wait_connected,
    wait_for_texts,
)


def assert_each_once_in_seq_order(page, wanted: list[str]) -> None:
    """Every wanted text shows exactly once; seqs run 1, 2, 3 … without a hole."""
    shown = shown_messages(page)
    for text in wanted:
        assert [m["text"] for m in shown].count(text) == 1, (text, shown)
    assert [m["seq"] for m in shown] == list(range(1, len(shown) + 1)), shown
    assert pending_count(page) == 0


def test_server_restart_resumes_without_loss_or_duplicates(
    browsing, daphne_factory, tmp_path
):
    db_path = tmp_path / "db.sqlite3"
    first = daphne_factory(SERVER_ENV, db_path=db_path, migrate=True)
    alice = new_account(first.base_url, "alice")
    bob = new_account(first.base_url, "bob")
    carol = new_account(first.base_url, "carol")
    room = new_room(first, alice)
    page_a = open_room(browsing, first, alice, room)
    page_b = open_room(browsing, first, bob, room)
    send(page_a, "before 1")
    send(page_b, "before 2")
    for page in (page_a, page_b):
        wait_for_texts(page, ["before 1", "before 2"])

    first.stop()
    for page in (page_a, page_b):
        expect(page.locator("body")).not_to_have_attribute("data-connection", "open")
        expect(page.locator("#status-text")).to_contain_text("Reconnecting in")
    # Typed while the server is away: queued, shown as waiting.
    send(page_a, "typed offline 1")
    send(page_a, "typed offline 2")
    expect(page_a.locator("#messages li.pending")).to_have_count(2)

    # The same port and database, as after a deploy. Carol posts at once,
    # racing the pages' reconnects: each message must land exactly once
    # whether it comes in the resume backlog or live.
    second = daphne_factory(SERVER_ENV, db_path=db_path, port=first.port)
    while_away = ["while away 1", "while away 2", "while away 3"]
    post_messages(second, carol, room, while_away)

    everything = [
        "before 1",
        "before 2",
        "typed offline 1",
        "typed offline 2",
        *while_away,
    ]
    for page in (page_a, page_b):
        wait_connected(page, timeout=RECONNECT_MS)
        wait_for_texts(page, everything)
        expect(page.locator("#messages li.message:not(.pending)")).to_have_count(7)
        assert_each_once_in_seq_order(page, everything)
    assert texts(page_a) == texts(page_b)
    # "before" first, and the queued two in the order they were typed.
    shown = texts(page_a)
    assert shown[:2] == ["before 1", "before 2"]
    assert shown.index("typed offline 1") < shown.index("typed offline 2")
    for text in everything:
        assert stored_count(second, room, text) == 1, text

    # And the conversation simply goes on.
    send(page_b, "after")
    wait_for_texts(page_a, ["after"])


def test_dropped_network_resumes_with_missed_messages_and_resends_once(
    browsing, server
):
    alice = new_account(server.base_url, "alice")
    bob = new_account(server.base_url, "bob")
    room = new_room(server, alice)
    page_a = open_room(browsing, server, alice, room)
    context_b = browsing.context(server, bob)
    page_b = open_room(browsing, server, bob, room, context=context_b)
    send(page_a, "hello")
    wait_for_texts(page_b, ["hello"])

    context_b.set_offline(True)
    expect(page_b.locator("body")).to_have_attribute("data-connection", "offline")
    expect(page_b.locator("#status-text")).to_contain_text("Offline")
    missed = ["missed 1", "missed 2", "missed 3"]
    for text in missed:
        send(page_a, text)
    wait_for_texts(page_a, missed)
    # Bob types while offline: it waits on his page, and his draft is kept.
    send(page_b, "sent while offline")
    expect(page_b.locator("#messages li.pending")).to_have_count(1)
    expect(page_b.locator("#messages li.pending .body")).to_have_text(
        "sent while offline"
    )
    assert "missed 1" not in texts(page_b)

    context_b.set_offline(False)
    wait_connected(page_b, timeout=RECONNECT_MS)
    everything = ["hello", *missed, "sent while offline"]
    for page in (page_a, page_b):
        wait_for_texts(page, everything)
        expect(page.locator("#messages li.message:not(.pending)")).to_have_count(5)
        assert_each_once_in_seq_order(page, everything)
    assert texts(page_b) == everything
    assert stored_count(server, room, "sent while offline") == 1
