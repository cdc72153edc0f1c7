"""A worker killed with SIGKILL: its users leave once its lease runs out."""

from __future__ import annotations

import asyncio
import signal

import pytest
from websockets.exceptions import ConnectionClosed

from tests.integration.conftest import new_account

pytestmark = pytest.mark.integration

LEASE_SECONDS = 2


def two_workers(daphne_factory, env: dict[str, str] | None = None):
    """Two workers on one SQLite file and one Redis, with a short lease, and a
    user signed up on each: (one, two, alice, bob)."""
    redis_url = daphne_factory.new_redis_url()
    env = {"CHAT_WORKER_LEASE_SECONDS": str(LEASE_SECONDS), **(env or {})}
    one = daphne_factory(env, redis_url=redis_url)
    two = daphne_factory(env, redis_url=redis_url, db_path=one.db_path)
    return (
        one,
        two,
        new_account(one.base_url, "alice"),
        new_account(two.base_url, "bob"),
    )


async def test_killed_workers_users_leave_within_twice_the_lease(
    daphne_factory, ws_connect
):
    """No disconnect handler runs after kill -9: the lease sweep must heal it."""
    one, two, alice, bob = two_workers(daphne_factory)

    alice_ws, _ = await ws_connect(
        one, "general", sessionid=alice.sessionid, welcome=True
    )
    await ws_connect(two, "general", sessionid=bob.sessionid, welcome=True)
    await alice_ws.wait_presence(joins=[bob.username])

    two.process.kill()
    two.process.wait()

    # Twice the lease plus the sweep interval, with room for a loaded machine.
    leave = await alice_ws.wait_presence(
        leaves=[bob.username], timeout=LEASE_SECONDS * 2 + 6
    )
    assert leave["members"] == 1
    assert alice_ws.view == {alice.username}
    _, welcome = await ws_connect(
        one, "general", sessionid=alice.sessionid, welcome=True
    )
    assert welcome["members"] == [alice.username]


async def test_a_stalled_worker_whose_lease_was_taken_closes_its_sockets_to_rejoin(
    daphne_factory, ws_connect
):
    """A worker stopped past its lease is swept by a live one; when it runs again
    it must not go on serving sockets the cluster has forgotten."""
    one, two, alice, bob = two_workers(daphne_factory)
    alice_ws, _ = await ws_connect(
        one, "general", sessionid=alice.sessionid, welcome=True
    )
    bob_ws, _ = await ws_connect(two, "general", sessionid=bob.sessionid, welcome=True)
    await alice_ws.wait_presence(joins=[bob.username])

    two.process.send_signal(signal.SIGSTOP)
    try:
        await alice_ws.wait_presence(
            leaves=[bob.username], timeout=LEASE_SECONDS * 2 + 6
        )
    finally:
        two.process.send_signal(signal.SIGCONT)

    # Told to reconnect, as after a restart: the page does so and resumes.
    code, _ = await bob_ws.receive_close(timeout=LEASE_SECONDS * 2 + 6)
    assert code == 1012
    bob_again, welcome = await ws_connect(
        two, "general", sessionid=bob.sessionid, welcome=True
    )
    assert welcome["members"] == sorted([alice.username, bob.username])
    await alice_ws.wait_presence(joins=[bob.username])
    sent = await bob_again.post("back from the stall")
    assert (await alice_ws.receive())["message"] == sent["message"]
    assert "Traceback" not in two.output()


async def test_a_stopped_workers_sockets_stop_counting_toward_the_caps(
    daphne_factory, ws_connect
):
    """A worker stopped with SIGTERM keeps its sockets' rows while it drains
    (their users reconnect elsewhere with no leave/join flicker), but they
    must not hold a cap until its lease runs out: users behind one address
    reconnecting at once after a deploy were refused with 4429."""
    one, two, alice, bob = two_workers(
        daphne_factory,
        # A lease far longer than the test: no peer's sweep helps.
        env={"CHAT_WORKER_LEASE_SECONDS": "120", "CHAT_MAX_CONNECTIONS_PER_USER": "1"},
    )
    alice_ws, _ = await ws_connect(
        one, "general", sessionid=alice.sessionid, welcome=True
    )
    bob_ws, _ = await ws_connect(two, "general", sessionid=bob.sessionid, welcome=True)
    await bob_ws.wait_presence(joins=[alice.username])

    one.process.send_signal(signal.SIGTERM)
    code, _ = await alice_ws.receive_close()
    assert code == 1001

    # At once, as a page whose jitter came out short: the old worker is still
    # draining, and its row already must not count.
    again = await ws_connect(two, "general", sessionid=alice.sessionid)
    try:
        welcome = await again.receive_type("welcome")
    except ConnectionClosed as closed:
        pytest.fail(f"refused with {closed.rcvd and closed.rcvd.code} while draining")
    assert welcome["members"] == sorted([alice.username, bob.username])
    assert one.process.wait(timeout=30) == 0
    assert bob_ws.view == {alice.username, bob.username}
    assert "could not mark the lease" not in one.output()


async def test_a_socket_open_past_the_group_expiry_still_hears_its_room(
    daphne_factory, ws_connect
):
    """Redis forgets a group nobody joins again; the worker loop rejoins its
    groups in time, so a long-lived socket keeps hearing the other worker."""
    expiry = LEASE_SECONDS * 2
    one, two, alice, bob = two_workers(
        daphne_factory, {"CHAT_LAYER_GROUP_EXPIRY": str(expiry)}
    )
    listener, _ = await ws_connect(
        one, "general", sessionid=alice.sessionid, welcome=True
    )
    poster, _ = await ws_connect(two, "general", sessionid=bob.sessionid, welcome=True)
    for round_ in range(3):
        # Each time longer ago than the expiry that the groups were joined.
        await asyncio.sleep(expiry + 1)
        sent = await poster.post(f"still there {round_}")
        heard = await listener.receive()
        assert (heard["type"], heard["id"]) == ("message", sent["id"])
