"""The chat as it is deployed: nginx (deploy/nginx.conf) in front of three workers
on PostgreSQL and Redis, all real processes started by deploy/cluster.py.

Clients (harness.client.ChatPage) connect through nginx and behave like the
page: on 1001/1006/1012/1013 they reconnect through nginx with ?since=<last
seq> and resend what the room has not echoed yet, with the same client_id.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import psycopg
import pytest
import redis
from channels_redis.utils import _consistent_hash

from deploy.cluster import Cluster
from harness.client import ChatPage, ChatSocket
from harness.processes import LAUNCHER, PLAIN_DAPHNE, http_get
from tests.integration.conftest import (
    SETUP_SCRIPT,
    HttpSession,
    api_call,
    unique_name,
)

pytestmark = pytest.mark.integration

# Short, so that a dead worker's sockets are swept within seconds.
LEASE_SECONDS = 3
DRAIN_SECONDS = 5
CLUSTER_ENV = {
    "CHAT_WORKER_LEASE_SECONDS": str(LEASE_SECONDS),
    "CHAT_DRAIN_SECONDS": str(DRAIN_SECONDS),
}
# Generous: three workers, nginx, Redis and PostgreSQL share two cores in CI.
TIMEOUT = 20


# ---------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[Cluster]:
    """One cluster for the module: the tests use fresh rooms and users."""
    with Cluster(workers=3, env=CLUSTER_ENV) as cluster:
        yield cluster


@pytest.fixture
def cluster(shared_cluster: Cluster) -> Iterator[Cluster]:
    """The shared cluster, whole again: a test may have stopped a worker or Redis."""
    for server in shared_cluster.redis:
        if not server.alive():
            server.start()
    for index, worker in enumerate(shared_cluster.workers):
        if not worker.alive():
            shared_cluster.restart_worker(index)
    yield shared_cluster
    while shared_cluster.extra_workers:
        shared_cluster.extra_workers.pop().stop()


def log_excerpt(cluster: Cluster, limit: int = 1500) -> str:
    return "".join(
        f"\n--- {name} ---\n{text[-limit:]}" for name, text in cluster.logs().items()
    )


async def eventually(
    check: Callable[[], bool],
    *,
    what: str | Callable[[], str],
    cluster: Cluster,
    timeout: float = TIMEOUT,
) -> float:
    """Waits until `check()` is true; returns the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            said = what() if callable(what) else what
            raise AssertionError(
                f"{said}: not within {timeout} s{log_excerpt(cluster)}"
            )
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def make_users(
    cluster: Cluster, count: int, *, rooms: Sequence[str] = ()
) -> dict[str, str]:
    """Creates rooms and signed-in users in one go; returns {username: sessionid}.

    Sign-up through the form is tested once below; thirty of them would spend
    most of a test on password hashing.
    """
    spec = {"rooms": list(rooms), "users": [unique_name("u") for _ in range(count)]}
    result = cluster.manage("shell", "-c", SETUP_SCRIPT, input=json.dumps(spec))
    return json.loads(result.stdout.strip().splitlines()[-1])


def sockets_by_user(cluster: Cluster, room: str) -> dict[str, list[tuple[str, str]]]:
    """Returns {username: [(worker id, client address), ...]} for the room's sockets."""
    with psycopg.connect(cluster.database_url, autocommit=True) as db:
        rows = db.execute(
            "SELECT u.username, c.worker, c.address FROM chat_connection c"
            " JOIN auth_user u ON u.id = c.user_id"
            " JOIN chat_room r ON r.id = c.room_id WHERE r.slug = %s",
            (room,),
        ).fetchall()
    found: dict[str, list[tuple[str, str]]] = {}
    for username, worker, address in rows:
        found.setdefault(username, []).append((worker, address))
    return found


def worker_of(cluster: Cluster, room: str) -> dict[str, str]:
    """Returns {username: worker id} for users with one socket in the room."""
    return {
        user: sockets[0][0]
        for user, sockets in sockets_by_user(cluster, room).items()
        if len(sockets) == 1
    }


def worker_rows(cluster: Cluster, worker_id: str) -> int:
    with psycopg.connect(cluster.database_url, autocommit=True) as db:
        return db.execute(
            "SELECT count(*) FROM chat_connection WHERE worker = %s", (worker_id,)
        ).fetchone()[0]


# ---------------------------------------------------------------------------
# Clients that behave like the page (harness.client.ChatPage)
# ---------------------------------------------------------------------------


@pytest.fixture
async def clients() -> Any:
    """Returns open(cluster, room, users, **options) -> [ChatPage]; closes all.

    Through nginx unless `via` names a worker's base URL; the other options
    are ChatPage's (reconnect, headers, local_addr).
    """
    opened: list[ChatPage] = []

    async def open_clients(
        cluster: Cluster,
        room: str,
        users: dict[str, str],
        *,
        via: str | None = None,
        **options: Any,
    ) -> list[ChatPage]:
        # One at a time: least_conn then deals them out evenly.
        new = []
        for username, sessionid in users.items():
            client = ChatPage(
                via or cluster.url,
                room,
                username,
                sessionid,
                welcome_timeout=TIMEOUT,
                diagnose=lambda: log_excerpt(cluster),
                **options,
            )
            opened.append(client)
            new.append(await client.start())
        return new

    yield open_clients
    await asyncio.gather(*(client.stop() for client in opened))


def has_all(client: ChatPage, count: int) -> bool:
    return set(client.messages) >= set(range(1, count + 1))


async def wait_all_have(
    cluster: Cluster, group: Sequence[ChatPage], count: int
) -> None:
    await eventually(
        lambda: all(has_all(client, count) for client in group),
        what=lambda: (
            f"every client got seqs 1..{count}; missing some: "
            + str({c.username: len(c.messages) for c in group if not has_all(c, count)})
        ),
        cluster=cluster,
    )


async def wait_all_heard_live(
    cluster: Cluster, group: Sequence[ChatPage], count: int
) -> None:
    """Waits until every client got seqs 1..count as live broadcasts.

    Holding them is not enough: broadcasts posted through different workers
    may arrive out of order, and a page fills the hole below a later seq from
    history before the earlier broadcast comes.
    """

    def heard(client: ChatPage) -> bool:
        return set(client.live_seqs) >= set(range(1, count + 1))

    await eventually(
        lambda: all(heard(client) for client in group),
        what=lambda: (
            f"every client heard seqs 1..{count} live; missing some: "
            + str(
                {
                    c.username: sorted(set(range(1, count + 1)) - set(c.live_seqs))
                    for c in group
                    if not heard(c)
                }
            )
        ),
        cluster=cluster,
    )


def assert_same_messages(group: Sequence[ChatPage], count: int) -> None:
    """Every client holds exactly seqs 1..count, with the same content for each."""
    reference = group[0].messages
    assert sorted(reference) == list(range(1, count + 1))
    for client in group[1:]:
        assert client.messages == reference, client.username


def assert_undisturbed(group: Sequence[ChatPage]) -> None:
    for client in group:
        assert client.closes == [], f"{client.username} was closed: {client.closes}"
        assert client.errors() == [], f"{client.username}: {client.errors()}"


# ---------------------------------------------------------------------------
# HTTP through nginx
# ---------------------------------------------------------------------------


def test_nginx_serves_static_files_and_a_worker_alone_does_too(cluster):
    """nginx serves /static/ from STATIC_ROOT (collectstatic) without asking a
    worker; a worker reached directly serves the same files (WhiteNoise)."""
    path = "/static/chat/room.js"
    collected = (cluster.static_root / "chat" / "room.js").read_bytes()
    through_nginx = HttpSession(cluster.url).get(path)
    assert (through_nginx.status, through_nginx.body) == (200, collected)
    # nginx's own `expires 1h`; WhiteNoise sends another max-age.
    assert through_nginx.headers["Cache-Control"] == "max-age=3600"
    direct = HttpSession(cluster.workers[0].base_url).get(path)
    assert (direct.status, direct.body) == (200, collected)
    assert direct.headers["Cache-Control"] != "max-age=3600"


def test_readyz_through_nginx_is_ready(cluster):
    status, body = http_get(f"{cluster.url}/readyz")
    assert status == 200, body
    assert json.loads(body)["status"] == "ready"
    assert json.loads(body)["worker"] in {worker.id for worker in cluster.workers}


def test_metrics_come_from_each_worker_not_through_nginx(cluster):
    assert http_get(f"{cluster.url}/metrics")[0] == 404
    for worker in cluster.workers:
        status, body = http_get(f"{worker.base_url}/metrics")
        assert status == 200
        assert f'chat_open_sockets{{worker="{worker.id}"}}' in body.decode()


def test_sign_up_form_with_a_browser_origin_passes_csrf_through_nginx(cluster):
    """Django checks a form's Origin against Host: nginx must pass the port on."""
    session = HttpSession(cluster.url)
    page = session.get("/accounts/signup/")
    assert page.status == 200
    username = unique_name("form")
    response = session.request(
        "/accounts/signup/",
        data={
            "csrfmiddlewaretoken": session.cookie("csrftoken"),
            "username": username,
            "password1": "a-Secret-pass-42",
            "password2": "a-Secret-pass-42",
        },
        headers={"Origin": cluster.url, "Referer": f"{cluster.url}/accounts/signup/"},
    )
    assert response.status == 200, response.text[:2000]
    assert session.cookie("sessionid"), response.url


async def test_workers_see_the_client_address_nginx_saw_not_a_forged_one(
    cluster, clients
):
    """nginx overwrites X-Forwarded-For and the workers run with --proxy-headers."""
    room = unique_name("addr")
    users = make_users(cluster, 1, rooms=[room])
    # Any 127.x address is loopback: a source nginx sees, unlike its own 127.0.0.1.
    await clients(
        cluster,
        room,
        users,
        headers={"X-Forwarded-For": "203.0.113.9"},
        local_addr="127.0.0.5",
    )
    [(_, address)] = sockets_by_user(cluster, room)[next(iter(users))]
    assert address == "127.0.0.5"


# ---------------------------------------------------------------------------
# Fan-out across workers
# ---------------------------------------------------------------------------


async def test_thirty_clients_on_three_workers_each_get_every_message_once(
    cluster, clients
):
    room = unique_name("fanout")
    users = make_users(cluster, 30, rooms=[room])
    group = await clients(cluster, room, users)
    spread = Counter(worker_of(cluster, room).values())
    assert set(spread) == {worker.id for worker in cluster.workers}, spread
    assert sum(spread.values()) == 30

    # Everyone at once: each message reaches every client exactly once.
    posts = [client.post(f"{client.username} #{n}") for client in group for n in (1, 2)]
    await asyncio.gather(*posts)
    await wait_all_heard_live(cluster, group, 60)
    for client in group:
        assert sorted(client.live_seqs) == list(range(1, 61)), client.username
    assert_same_messages(group, 60)

    # Taking turns across the workers (each post acknowledged before the next):
    # every client sees them in seq order.
    for client in group:
        client_id = await client.post(f"{client.username} in turn")
        await eventually(
            partial(client.acked, client_id),
            what="the post was echoed",
            cluster=cluster,
        )
    await wait_all_heard_live(cluster, group, 90)
    for client in group:
        assert client.live_seqs[60:] == list(range(61, 91)), client.username
    assert_same_messages(group, 90)
    assert_undisturbed(group)


# ---------------------------------------------------------------------------
# A worker dies, a worker stops
# ---------------------------------------------------------------------------


def busiest_worker(cluster: Cluster, room: str) -> int:
    """Returns the index of the worker holding the most sockets of the room."""
    spread = Counter(worker_of(cluster, room).values())
    index = max(
        range(len(cluster.workers)), key=lambda i: spread[cluster.workers[i].id]
    )
    assert spread[cluster.workers[index].id] >= 2, spread
    return index


def presence_since(client: ChatPage, start: int) -> list[tuple[str, str]]:
    """Returns ("join" | "leave", user) for each name in the presence diffs the
    client got after its frame `start`."""
    return [
        (kind, user)
        for frame in client.frames[start:]
        if frame["type"] == "presence"
        for kind, key in (("join", "joins"), ("leave", "leaves"))
        for user in frame[key]
    ]


async def presence_settled(cluster: Cluster, group: Sequence[ChatPage]) -> None:
    """Waits until every client's member list is the group: diffs come up to an
    interval after the joins, and a test that counts later diffs must not see
    those."""
    everyone = {client.username for client in group}

    def off() -> str:
        wrong = {c.username: sorted(c.view ^ everyone) for c in group}
        return f"every member list was the group; off: {wrong}"

    await eventually(
        lambda: all(client.view == everyone for client in group),
        what=off,
        cluster=cluster,
    )


async def post_from(group: Sequence[ChatPage], text: str) -> int:
    """Posts one message from each client; returns how many."""
    for client in group:
        await client.post(f"{text} ({client.username})")
    return len(group)


async def test_kill_9_clients_resume_elsewhere_and_the_gone_user_leaves(
    cluster, clients
):
    room = unique_name("kill")
    users = make_users(cluster, 9, rooms=[room])
    group = await clients(cluster, room, users)
    index = busiest_worker(cluster, room)
    dead_id = cluster.workers[index].id
    where = worker_of(cluster, room)
    on_dead = [c for c in group if where[c.username] == dead_id]
    others = [c for c in group if c not in on_dead]
    # One of them closed the page meanwhile: only the lease sweep can tell.
    gone, movers = on_dead[0], on_dead[1:]
    gone.reconnect = False

    count = await post_from(others, "before")
    await wait_all_have(cluster, group, count)
    await presence_settled(cluster, group)

    seen_before = {c.username: len(c.frames) for c in group}
    assert cluster.kill_worker(index, signal.SIGKILL) == -signal.SIGKILL
    killed_at = time.monotonic()
    count += await post_from(others, "while they reconnect")
    await eventually(
        lambda: all(len(c.welcomes) == 2 for c in movers),
        what="the dead worker's clients reconnected through nginx",
        cluster=cluster,
    )
    count += await post_from(movers, "after the move")
    survivors = others + movers
    await wait_all_have(cluster, survivors, count)
    assert_same_messages(survivors, count)

    # Swept once the lease ran out: about twice the lease at most.
    await eventually(
        lambda: all(gone.username in c.seen("leaves") for c in survivors),
        what=f"everyone saw {gone.username} leave",
        cluster=cluster,
        timeout=2 * LEASE_SECONDS + 6,
    )
    assert time.monotonic() - killed_at < 2 * LEASE_SECONDS + 6
    assert worker_rows(cluster, dead_id) == 0

    for mover in movers:
        assert mover.closes == [1006], mover.closes
    assert_undisturbed(others)
    # The movers came back within the lease: to the others they never left.
    for client in survivors:
        presence = presence_since(client, seen_before[client.username])
        assert presence == [("leave", gone.username)], (
            client.username,
            gone.username,
            [m.username for m in movers],
            presence,
        )
    # And what the page shows: everyone but the one who went.
    for client in survivors:
        assert client.view == {c.username for c in survivors}, client.username
    [newcomer] = await clients(cluster, room, make_users(cluster, 1))
    assert newcomer.welcomes[0]["members"] == sorted(
        {c.username for c in survivors} | {newcomer.username}
    )


async def test_sigterm_closes_with_1001_and_clients_resume_without_flicker(
    cluster, clients
):
    room = unique_name("term")
    users = make_users(cluster, 9, rooms=[room])
    group = await clients(cluster, room, users)
    index = busiest_worker(cluster, room)
    draining = cluster.workers[index]
    where = worker_of(cluster, room)
    movers = [c for c in group if where[c.username] == draining.id]
    others = [c for c in group if c not in movers]

    count = await post_from(group, "before")
    await wait_all_have(cluster, group, count)
    await presence_settled(cluster, group)

    seen_before = {c.username: len(c.frames) for c in group}
    draining.send_signal(signal.SIGTERM)
    count += await post_from(others, "during the drain")
    await eventually(
        lambda: all(len(c.welcomes) == 2 for c in movers),
        what="the draining worker's clients reconnected through nginx",
        cluster=cluster,
    )
    assert await asyncio.to_thread(draining.wait, DRAIN_SECONDS + 5) == 0
    count += await post_from(movers, "after the move")
    await wait_all_have(cluster, group, count)
    assert_same_messages(group, count)

    # The drained worker's rows stay until its lease runs out and they are
    # swept; the users have sockets elsewhere by then, so nobody leaves.
    await eventually(
        lambda: worker_rows(cluster, draining.id) == 0,
        what="the drained worker's sockets were swept",
        cluster=cluster,
        timeout=2 * LEASE_SECONDS + 6,
    )
    await asyncio.sleep(0.5)
    for mover in movers:
        assert mover.closes == [1001], mover.closes
    assert_undisturbed(others)
    for client in group:
        presence = presence_since(client, seen_before[client.username])
        assert presence == [], (client.username, [m.username for m in movers], presence)
        assert client.view == {c.username for c in group}, client.username


async def test_sigterm_while_sockets_close_still_exits_within_the_drain_limit(
    cluster, clients
):
    """Disconnect handlers still running at SIGTERM must not keep the worker alive."""
    room = unique_name("exit")
    users = make_users(cluster, 6, rooms=[room])
    worker = await asyncio.to_thread(cluster.start_worker)
    group = await clients(cluster, room, users, via=worker.base_url)
    # Posts keep the worker busy, so the handlers run as the signal comes.
    await post_from(group, "bye")
    await asyncio.gather(*(client.stop() for client in group))
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, DRAIN_SECONDS + 2) == 0


# ---------------------------------------------------------------------------
# Redis trouble
# ---------------------------------------------------------------------------


async def test_redis_restart_closes_sockets_and_chat_resumes_without_worker_restarts(
    cluster, clients
):
    await redis_restart_resumes(cluster, clients)


@pytest.fixture(scope="module")
def plain_daphne_cluster() -> Iterator[Cluster]:
    """Workers run as `daphne chatproject.asgi:application`, not the launcher."""
    with Cluster(workers=2, env=CLUSTER_ENV, worker_command=PLAIN_DAPHNE) as cluster:
        yield cluster


async def test_redis_restart_under_plain_daphne_leaves_no_deaf_socket(
    plain_daphne_cluster, clients
):
    # daphne's own close refuses 1012 and 1013; without them a socket stayed
    # open after the restart and heard nothing from the other worker.
    await redis_restart_resumes(plain_daphne_cluster, clients)


async def redis_restart_resumes(cluster: Cluster, clients) -> None:
    """Redis loses everything (SHUTDOWN NOSAVE) and is back 3 s later on its
    port: every socket of two rooms, on every worker, hears its room again."""
    rooms = [unique_name("redis"), unique_name("redis")]
    users = make_users(cluster, 9, rooms=rooms)
    newcomer_name, newcomer_session = users.popitem()
    names = list(users)
    groups = {
        room: await clients(cluster, room, {n: users[n] for n in names[i::2]})
        for i, room in enumerate(rooms)
    }
    everyone = [client for group in groups.values() for client in group]
    pids = [worker.pid for worker in cluster.workers]
    counts = {room: await post_from(group, "before") for room, group in groups.items()}
    for room, group in groups.items():
        await wait_all_have(cluster, group, counts[room])
    # A socket that does not reconnect, to see what the server tells it.
    watcher = await ChatSocket.open(
        cluster.workers[0].base_url, rooms[0], sessionid=users[names[0]]
    )
    await watcher.receive_type("welcome")

    server = cluster.redis[0]
    client = redis.Redis(host="127.0.0.1", port=server.port)
    try:
        client.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # the server closed the connection as it exited
    finally:
        client.close()
    await asyncio.to_thread(server.wait, TIMEOUT)
    code, frames = await watcher.receive_close(TIMEOUT)
    assert code == 1013, (code, frames)
    assert [f.get("code") for f in frames if f["type"] == "error"] == ["unavailable"], (
        frames
    )
    await eventually(
        lambda: all(c.closes for c in everyone),
        what="every socket closed when Redis went away",
        cluster=cluster,
    )
    # Posted while Redis is away: kept by the pages and resent once they resume.
    for room, group in groups.items():
        counts[room] += await post_from(group, "during the outage")
    await asyncio.sleep(3)
    server.start()

    for room, group in groups.items():
        counts[room] += await post_from(group, "after the restart")
    [newcomer] = await clients(cluster, rooms[0], {newcomer_name: newcomer_session})
    await newcomer.post("a new socket")
    counts[rooms[0]] += 1
    groups[rooms[0]].append(newcomer)
    for room, group in groups.items():
        await wait_all_have(cluster, group, counts[room])
        assert_same_messages(group, counts[room])
        stored = stored_bodies(cluster, room)
        assert [seq for seq, _ in stored] == list(range(1, counts[room] + 1))

    for client in everyone:
        # 1013 while Redis was away; 1012 when a worker saw it come back empty.
        assert client.closes and set(client.closes) <= {1012, 1013}, client.closes
    assert [worker.pid for worker in cluster.workers] == pids
    assert all(worker.alive() for worker in cluster.workers)


async def test_worker_started_while_redis_is_down_is_unready_until_it_is_back(
    cluster,
):
    cluster.redis[0].stop()
    try:
        worker = await asyncio.to_thread(cluster.start_worker)
        status, body = http_get(f"{worker.base_url}/readyz")
        assert status == 503, body
        assert "Redis" in json.loads(body)["reason"]
        # The load balancer sees it too, through any worker.
        status, body = http_get(f"{cluster.url}/readyz")
        assert status == 503 and "Redis" in json.loads(body)["reason"], body

        # It stays up and keeps answering rather than exiting to be restarted.
        await asyncio.sleep(LEASE_SECONDS)
        assert worker.alive()
        assert http_get(f"{worker.base_url}/healthz")[0] == 200
    finally:
        cluster.redis[0].start()
    await eventually(
        lambda: http_get(f"{worker.base_url}/readyz")[0] == 200,
        what="/readyz turned 200 once Redis was back",
        cluster=cluster,
    )
    assert http_get(f"{cluster.url}/readyz")[0] == 200


# ---------------------------------------------------------------------------
# Redis under Sentinel
# ---------------------------------------------------------------------------


def rate_counts(server) -> dict[bytes, int]:
    """The API's rate counters (chat.tokens) held by one Redis server."""
    client = redis.Redis(host="127.0.0.1", port=server.port)
    try:
        return {key: int(client.get(key)) for key in client.keys("*api-rate*")}
    finally:
        client.close()


@pytest.mark.parametrize(
    "worker_command", [LAUNCHER, PLAIN_DAPHNE], ids=["launcher", "plain-daphne"]
)
async def test_sentinel_failover_moves_the_layer_and_the_cache_to_the_new_primary(
    clients, worker_command
):
    with Cluster(
        workers=2, sentinel=True, env=CLUSTER_ENV, worker_command=worker_command
    ) as cluster:
        room = unique_name("failover")
        users = make_users(cluster, 7, rooms=[room])
        names = list(users)
        newcomer_name, newcomer_session = users.popitem()
        group = await clients(cluster, room, users)
        assert len(set(worker_of(cluster, room).values())) == 2
        token = cluster.manage(
            "create_api_token", "--owner", names[0], "--name", "failover",
            "--publish", "--push",
        ).stdout.strip()  # fmt: skip
        path = f"/api/rooms/{room}/messages/"
        publish = partial(api_call, cluster.url, "POST", path, token)
        push = partial(
            api_call, cluster.url, "POST", f"/api/users/{names[0]}/push/", token
        )
        # Each worker's cache pool is made now, while the first primary serves.
        for index, worker in enumerate(cluster.workers):
            body = {"message": f"by the API {index}", "client_id": f"api-{index}"}
            assert api_call(worker.base_url, "POST", path, token, body)[0] == 201
        count = 2 + await post_from(group, "before")
        await wait_all_have(cluster, group, count)
        # A socket that does not reconnect, to see what the server tells it.
        watcher = await ChatSocket.open(
            cluster.workers[0].base_url, room, sessionid=users[names[1]]
        )
        await watcher.receive_type("welcome")
        pids = [worker.pid for worker in cluster.workers]
        old, replica = cluster.redis
        assert cluster.redis_primary() == f"127.0.0.1:{old.port}"

        old.kill()
        killed = time.monotonic()
        # The primary is gone and not yet replaced: no fake acknowledgement.
        code, frames = await watcher.receive_close(TIMEOUT)
        assert code == 1013, (code, frames)
        assert [f.get("code") for f in frames if f["type"] == "error"] == [
            "unavailable"
        ], frames
        assert http_get(f"{cluster.workers[0].base_url}/readyz")[0] == 503
        # A publish is stored, and reaches the pages when they resume.
        status, _, body = publish({"message": "while none", "client_id": "api-none"})
        assert status == 201, body
        # The pages post on: each is resent until the room echoes it.
        count += 1 + await post_from(group, "during the failover")

        await eventually(
            lambda: cluster.redis_primary() == f"127.0.0.1:{replica.port}",
            what="the sentinels promoted the replica",
            cluster=cluster,
        )
        await eventually(
            lambda: all(
                http_get(f"{worker.base_url}/readyz")[0] == 200
                for worker in cluster.workers
            ),
            what="every worker ready on the new primary",
            cluster=cluster,
        )
        # Every socket hears the room again, a new one too, and the cache (the
        # API's rate counters) answers from the new primary.
        [newcomer] = await clients(cluster, room, {newcomer_name: newcomer_session})
        await newcomer.post("after the failover")
        for index, worker in enumerate(cluster.workers):
            counted = sum(rate_counts(replica).values())
            body = {"message": f"again {index}", "client_id": f"api-again-{index}"}
            assert api_call(worker.base_url, "POST", path, token, body)[0] == 201
            assert sum(rate_counts(replica).values()) > counted, worker.name
        count += 3
        everyone = [*group, newcomer]
        await wait_all_have(cluster, everyone, count)
        recovered = time.monotonic() - killed
        status, _, body = push({"event": "new.primary"})
        assert (status, body["sockets"]) == (202, 1), body
        await eventually(
            lambda: (
                [f["event"] for f in group[0].frames if f["type"] == "push"]
                == ["new.primary"]
            ),
            what="the push reached its user's page",
            cluster=cluster,
        )
        assert_same_messages(everyone, count)
        stored = stored_bodies(cluster, room)
        assert [seq for seq, _ in stored] == list(range(1, count + 1))
        assert len({body for _, body in stored}) == count, "a post stored twice"
        assert not any(client.unacked for client in everyone)
        for client in group:
            # 1013 while no primary answered; 1012 when a worker saw the new one.
            assert client.closes and set(client.closes) <= {1012, 1013}, client.closes
        assert [worker.pid for worker in cluster.workers] == pids
        print(f"every socket receiving {recovered:.1f} s after the primary was killed")


# ---------------------------------------------------------------------------
# A sharded channel layer
# ---------------------------------------------------------------------------


def rooms_on_each_shard(shards: int) -> list[str]:
    """Returns one fresh room name per Redis server, by channels_redis's own hash."""
    rooms: dict[int, str] = {}
    while len(rooms) < shards:
        room = unique_name("shard")
        rooms.setdefault(_consistent_hash(f"room.{room}", shards), room)
    return [rooms[index] for index in range(shards)]


async def test_two_redis_servers_shard_rooms_and_fan_out_reaches_every_worker(clients):
    with Cluster(workers=2, redis_servers=2, env=CLUSTER_ENV) as sharded:
        rooms = rooms_on_each_shard(2)
        users = make_users(sharded, 8, rooms=rooms)
        names = list(users)
        groups = {
            room: await clients(sharded, room, {n: users[n] for n in names[i::2]})
            for i, room in enumerate(rooms)
        }
        for room, group in groups.items():
            spread = set(worker_of(sharded, room).values())
            assert spread == {worker.id for worker in sharded.workers}, room
            count = await post_from(group, "sharded")
            await wait_all_have(sharded, group, count)
            assert_same_messages(group, count)
            assert_undisturbed(group)

        # Each room's group lives on the server its name hashes to.
        for index, (server, room) in enumerate(zip(sharded.redis, rooms, strict=True)):
            client = redis.Redis.from_url(server.url)
            try:
                assert client.exists(f"asgi:group:room.{room}")
                assert not client.exists(f"asgi:group:room.{rooms[1 - index]}")
            finally:
                client.close()
        for group in groups.values():
            for client in group:
                await client.stop()


# ---------------------------------------------------------------------------
# Ordering under churn
# ---------------------------------------------------------------------------

SENDERS, RECEIVERS, PER_SENDER = 5, 10, 200


@pytest.fixture(scope="module")
def churn_cluster() -> Iterator[Cluster]:
    """Three workers of its own (two of them go down), posts unlimited."""
    env = {**CLUSTER_ENV, "CHAT_RATE_MESSAGES": "1000000"}
    with Cluster(workers=3, env=env) as cluster:
        yield cluster


def stored_bodies(cluster: Cluster, room: str) -> list[tuple[int, str]]:
    with psycopg.connect(cluster.database_url, autocommit=True) as db:
        return db.execute(
            "SELECT m.seq, m.body FROM chat_message m"
            " JOIN chat_room r ON r.id = m.room_id WHERE r.slug = %s ORDER BY m.seq",
            (room,),
        ).fetchall()


async def test_five_senders_keep_their_order_while_one_worker_stops_and_one_dies(
    churn_cluster, clients
):
    cluster = churn_cluster
    room = unique_name("churn")
    users = make_users(cluster, SENDERS + RECEIVERS, rooms=[room])
    pages = await clients(cluster, room, users)
    senders = pages[:SENDERS]
    posted = 0

    async def send_all(index: int, page: ChatPage) -> None:
        nonlocal posted
        for n in range(PER_SENDER):
            await page.post(f"s{index}-{n:03d}")
            posted += 1
            await asyncio.sleep(0.01)

    sending = asyncio.gather(*(send_all(i, page) for i, page in enumerate(senders)))
    total = SENDERS * PER_SENDER
    await eventually(
        lambda: posted >= total // 3, what="a third posted", cluster=cluster
    )
    stopped = asyncio.to_thread(cluster.kill_worker, 0, signal.SIGTERM)
    await eventually(lambda: posted >= total // 2, what="half posted", cluster=cluster)
    assert await asyncio.to_thread(cluster.kill_worker, 1, signal.SIGKILL) == (
        -signal.SIGKILL
    )
    assert await stopped == 0
    await sending
    await eventually(
        lambda: all(not page.unacked for page in senders),
        what=lambda: (
            "every post acknowledged; unacked: "
            + str({p.username: len(p.unacked) for p in senders if p.unacked})
        ),
        cluster=cluster,
        timeout=3 * TIMEOUT,
    )

    stored = stored_bodies(cluster, room)
    # Each post once, no gap in seq, each sender's posts in the order sent.
    assert [seq for seq, _ in stored] == list(range(1, total + 1))
    assert sorted(body for _, body in stored) == sorted(
        f"s{i}-{n:03d}" for i in range(SENDERS) for n in range(PER_SENDER)
    )
    for i in range(SENDERS):
        mine = [body for _, body in stored if body.startswith(f"s{i}-")]
        assert mine == sorted(mine), f"sender {i} out of order"
    # Every page, reconnecting as pages do, ends with the database's sequence.
    await wait_all_have(cluster, pages, total)
    for page in pages:
        assert [(s, page.messages[s]["message"]) for s in sorted(page.messages)] == (
            stored
        ), page.username
    assert any(page.closes for page in pages), "no page was moved at all"
