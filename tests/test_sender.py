"""chat.sender: a worker's sync broadcasts leave from its event loop, in order,
and the thread that made them does not wait for them."""

from __future__ import annotations

import asyncio
import json
import threading

from channels.layers import get_channel_layer

from chat import broadcast, protocol
from chat.sender import sender
from tests.conftest import until


async def test_sync_broadcasts_in_a_worker_return_before_they_are_sent_and_go_in_order(
    monkeypatch,
):
    layer = get_channel_layer()
    gate = asyncio.Event()
    sent: list[str] = []

    async def held_group_send(group: str, message: dict) -> None:
        await gate.wait()  # Redis slow to answer, or the loop busy
        sent.append(json.loads(message["text"])["user"])

    monkeypatch.setattr(layer, "group_send", held_group_send)
    sender.bind(asyncio.get_running_loop())

    def commit_three() -> None:
        # What the database thread does after three posts commit.
        for n in range(3):
            broadcast.broadcast_room("lobby", protocol.event_typing(user=f"u{n}"))

    # A thread of its own (a daemon): one that waited for each send would
    # wait on the gate for ever.
    returned = threading.Event()
    threading.Thread(
        target=lambda: (commit_three(), returned.set()), daemon=True
    ).start()
    await until(returned.is_set, timeout=5)
    assert returned.is_set(), "the thread waited for its broadcasts to be sent"
    assert sent == []
    gate.set()
    await until(lambda: len(sent) == 3)
    assert sent == ["u0", "u1", "u2"]


def test_without_a_running_worker_loop_a_sync_broadcast_is_sent_before_it_returns(
    monkeypatch,
):
    """A management command or the admin under WSGI: no loop is bound."""
    layer = get_channel_layer()
    sent: list[str] = []

    async def recording_group_send(group: str, message: dict) -> None:
        sent.append(group)

    monkeypatch.setattr(layer, "group_send", recording_group_send)
    broadcast.broadcast_room("lobby", protocol.event_typing(user="u"))
    assert sent == [protocol.room_group_name("lobby")]


async def test_broadcasts_queued_while_one_is_sent_go_out_together_in_order(
    monkeypatch,
):
    """A write round's rooms, or a busy worker's rounds: one call to the
    layer (two Redis round trips) for all that queued, not one each."""
    layer = get_channel_layer()
    gate = asyncio.Event()
    calls: list[list[str]] = []

    async def held_group_send_many(sends: list) -> None:
        calls.append([json.loads(message["text"])["user"] for _, message in sends])
        await gate.wait()

    monkeypatch.setattr(layer, "group_send_many", held_group_send_many)
    sender.bind(asyncio.get_running_loop())
    broadcast.broadcast_room("lobby", protocol.event_typing(user="u0"))
    await until(lambda: calls)
    for n in range(1, 4):
        broadcast.broadcast_room(f"room-{n}", protocol.event_typing(user=f"u{n}"))
    gate.set()
    await until(lambda: len(calls) == 2)
    assert calls == [["u0"], ["u1", "u2", "u3"]]
