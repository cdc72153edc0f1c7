"""Presence: socket rows, join on a user's first socket, leave on their last."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from chat import presence
from chat.models import Connection, Room, Worker

pytestmark = pytest.mark.django_db


@pytest.fixture
def other_room(db) -> Room:
    return Room.objects.create(slug="other")


def open_socket(room: Room, user, channel: str, max_per_user: int = 20, **kw) -> bool:
    return presence.connection_open(
        room=room, user=user, channel_name=channel, max_per_user=max_per_user, **kw
    )


def close_socket(channel: str) -> bool:
    return presence.connection_close(channel_name=channel)


def members(room: Room) -> list[str]:
    names, more = presence.room_members(room=room)
    assert more is False
    return names


def diff(joins=(), leaves=(), members=0) -> dict[str, Any]:
    return {
        "type": "presence",
        "joins": list(joins),
        "leaves": list(leaves),
        "members": members,
    }


@pytest.fixture
def broadcasts(monkeypatch) -> list[tuple[str, dict[str, Any], str | None]]:
    """Records the presence diffs broadcast (slug, event, exclude)."""
    sent: list[tuple[str, dict[str, Any], str | None]] = []

    def record(slug: str, event: dict[str, Any], *, exclude_channel=None) -> None:
        sent.append((slug, event, exclude_channel))

    monkeypatch.setattr(presence, "broadcast_room", record)
    return sent


def test_only_a_users_first_socket_in_a_room_is_a_join(room, other_room, alice, bob):
    assert open_socket(room, alice, "a1") is True
    assert open_socket(room, alice, "a2") is False
    assert open_socket(room, bob, "b1") is True
    assert open_socket(other_room, alice, "a3") is True
    assert Connection.objects.count() == 4


def test_only_a_users_last_socket_in_a_room_is_a_leave(room, other_room, alice):
    for channel in ("a1", "a2"):
        open_socket(room, alice, channel)
    open_socket(other_room, alice, "a3")
    assert close_socket("a1") is False
    assert close_socket("a2") is True
    assert members(room) == []
    assert members(other_room) == ["alice"]


def test_closing_an_unknown_or_closed_socket_is_not_a_leave(room, alice):
    assert close_socket("never-opened") is False
    open_socket(room, alice, "a1")
    assert close_socket("a1") is True
    assert close_socket("a1") is False


def test_reopening_after_the_last_close_is_a_join_again(room, alice):
    open_socket(room, alice, "a1")
    close_socket("a1")
    assert open_socket(room, alice, "a2") is True


def test_members_are_distinct_sorted_and_per_room(room, other_room, make_user):
    zoe, alice, mike = (make_user(name) for name in ("zoe", "alice", "mike"))
    for user, channel in ((zoe, "z1"), (alice, "a1"), (zoe, "z2"), (alice, "a2")):
        open_socket(room, user, channel)
    open_socket(other_room, mike, "m1")
    assert members(room) == ["alice", "zoe"]
    assert members(other_room) == ["mike"]


def test_open_records_worker_and_truncated_address(room, alice):
    open_socket(room, alice, "a1", address="x" * 150)
    connection = Connection.objects.get(channel_name="a1")
    assert (connection.worker, connection.address) == (presence.WORKER_ID, "x" * 100)


def test_too_many_connections_at_the_per_user_limit(room, other_room, alice, bob):
    open_socket(room, alice, "a1", max_per_user=2)
    open_socket(other_room, alice, "a2", max_per_user=2)  # the limit spans rooms
    with pytest.raises(presence.TooManyConnections):
        open_socket(room, alice, "a3", max_per_user=2)
    assert not Connection.objects.filter(channel_name="a3").exists()
    assert open_socket(room, bob, "b1", max_per_user=2) is True
    close_socket("a1")
    assert open_socket(room, alice, "a3", max_per_user=2) is True


def kill_worker(worker_id: str = presence.WORKER_ID) -> None:
    """Ages a worker's lease past the limit, as if it stopped renewing it."""
    Worker.objects.filter(id=worker_id).update(
        heartbeat_at=timezone.now() - timedelta(seconds=3600)
    )


def open_on(worker_id: str, room: Room, user, channel: str) -> None:
    """Records a socket held by another worker process."""
    presence.worker_heartbeat(worker_id=worker_id)
    Connection.objects.create(
        room=room, user=user, channel_name=channel, worker=worker_id
    )


def test_sockets_of_a_worker_whose_lease_ran_out_are_not_online(room, alice, bob):
    open_on("other-worker", room, bob, "b1")
    open_socket(room, alice, "a1")
    assert members(room) == ["alice", "bob"]
    kill_worker("other-worker")
    assert members(room) == ["alice"]
    assert presence.user_socket_count(user=bob) == 0


def test_a_draining_workers_sockets_keep_their_users_online_but_do_not_count(
    room, alice
):
    """Its users reconnect elsewhere: not refused at the cap, and no join, as
    they never left."""
    open_on("stopping-worker", room, alice, "old")
    presence.worker_stopping(worker_id="stopping-worker")
    assert members(room) == ["alice"]
    assert open_socket(room, alice, "new", max_per_user=1) is False
    # Capped per address too.
    Connection.objects.filter(channel_name="new").delete()
    Connection.objects.filter(channel_name="old").update(network="192.0.2.1")
    opening = presence.SocketOpening(room, alice, "new", "192.0.2.1")
    assert presence.connections_open([opening], max_per_user=1, max_per_address=1) == [
        False
    ]


def test_sweep_forgets_a_dead_workers_sockets_and_its_lease(room, alice, bob):
    open_on("dead-worker", room, bob, "b1")
    open_on("dead-worker", room, bob, "b2")
    open_socket(room, alice, "a1")
    kill_worker("dead-worker")
    assert presence.workers_sweep() == 2
    assert list(Connection.objects.values_list("channel_name", flat=True)) == ["a1"]
    assert not Worker.objects.filter(id="dead-worker").exists()
    assert presence.workers_sweep() == 0


def test_sweep_forgets_sockets_of_a_worker_with_no_lease_row(room, bob):
    Connection.objects.create(room=room, user=bob, channel_name="b1", worker="gone")
    assert presence.workers_sweep() == 1
    assert Connection.objects.count() == 0


def test_a_live_lease_is_never_swept(room, alice):
    open_socket(room, alice, "a1")
    assert presence.workers_sweep() == 0
    assert members(room) == ["alice"]


def test_heartbeat_renews_an_aged_lease(room, alice):
    open_socket(room, alice, "a1")
    kill_worker()
    assert members(room) == []
    presence.worker_heartbeat()
    assert members(room) == ["alice"]
    assert presence.lease_taken() is False  # aged, but nobody swept it


def test_a_worker_notices_once_that_its_lease_was_swept(room, alice):
    presence.worker_heartbeat()
    assert presence.lease_taken() is False  # a first lease is not a taken one
    open_socket(room, alice, "a1")
    kill_worker()  # stalled past the lease
    assert presence.workers_sweep() == 1  # by a live peer
    presence.worker_heartbeat()  # awake again: the row is gone
    assert presence.lease_taken() is True
    assert presence.lease_taken() is False


@pytest.mark.django_db(transaction=True)
def test_sweep_sends_leave_only_for_users_with_no_live_socket(
    room, alice, bob, make_user, broadcasts
):
    carol = make_user("carol")
    open_on("dead-worker", room, bob, "b1")
    open_on("dead-worker", room, carol, "c1")
    open_socket(room, alice, "a1")
    # carol reconnected to this worker before the dead one was noticed.
    open_socket(room, carol, "c2")
    kill_worker("dead-worker")
    broadcasts.clear()
    presence.workers_sweep()
    assert broadcasts == [("lobby", diff(leaves=["bob"], members=2), None)]


@pytest.mark.django_db(transaction=True)
def test_reconnect_within_the_lease_is_not_a_join(room, bob, broadcasts):
    """A socket moving from a dying worker to a live one does not flicker."""
    open_on("dying-worker", room, bob, "b1")
    assert open_socket(room, bob, "b2") is False
    assert broadcasts == []


@pytest.mark.django_db(transaction=True)
def test_join_is_broadcast_for_the_first_socket_only(room, alice, bob, broadcasts):
    open_socket(room, alice, "a1")
    open_socket(room, alice, "a2")
    open_socket(room, bob, "b1")
    assert broadcasts == [
        ("lobby", diff(joins=["alice"], members=1), None),
        ("lobby", diff(joins=["bob"], members=2), None),
    ]


@pytest.mark.django_db(transaction=True)
def test_leave_is_broadcast_for_the_last_socket_only(room, alice, bob, broadcasts):
    for user, channel in ((alice, "a1"), (alice, "a2"), (bob, "b1")):
        open_socket(room, user, channel)
    broadcasts.clear()
    close_socket("a1")
    close_socket("a2")
    close_socket("b1")
    assert broadcasts == [
        ("lobby", diff(leaves=["alice"], members=1), None),
        ("lobby", diff(leaves=["bob"], members=0), None),
    ]


@pytest.mark.django_db(transaction=True)
def test_refused_connection_broadcasts_nothing(room, alice, broadcasts):
    open_socket(room, alice, "a1", max_per_user=1)
    with pytest.raises(presence.TooManyConnections):
        open_socket(room, alice, "a2", max_per_user=1)
    assert len(broadcasts) == 1


def test_a_diff_reports_each_user_as_they_are_now(room, alice, bob):
    """Diffs of two workers may cross; each one carries the current truth."""
    open_socket(room, alice, "a1")
    open_socket(room, bob, "b1")
    close_socket("b1")
    event = presence.room_presence_diff(slug="lobby", usernames={"alice", "bob"})
    assert event == diff(joins=["alice"], leaves=["bob"], members=1)


def test_members_come_in_pages(room, make_user):
    for name in ("dave", "alice", "carol", "bob"):
        open_socket(room, make_user(name), f"{name}-1")
    assert presence.room_members(room=room, limit=3) == (
        ["alice", "bob", "carol"],
        True,
    )
    assert presence.room_members(room=room, after="carol", limit=3) == (["dave"], False)
    assert presence.room_member_count(room=room) == 4


def test_a_sweep_costs_the_same_queries_for_any_number_of_sockets(room, make_user):
    """A dead worker's thousands of sockets must not hold up the database thread."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def sweep_of(count: int, worker_id: str) -> int:
        for index in range(count):
            open_on(
                worker_id,
                room,
                make_user(f"{worker_id}-{index}"),
                f"{worker_id}-c{index}",
            )
        kill_worker(worker_id)
        with CaptureQueriesContext(connection) as queries:
            assert presence.workers_sweep() == count
        return len(queries)

    assert sweep_of(2, "small") == sweep_of(40, "large")
    assert Connection.objects.count() == 0
