"""python -m bench.recovery: how long the chat takes to recover from its faults.

On a local cluster as it is deployed (deploy/cluster.py: nginx, 3 workers,
Redis, PostgreSQL) with pages that behave like the real one (harness.client's
ChatPage: reconnect, resume, resend, fill holes), each fault is made and
timed from the moment it ends (or begins, for a worker that goes away) until
a probe message, posted at that moment, has reached every page. Prints a
Markdown table of the medians, for docs/reliability.md. Never run by the
tests: recovery times on a shared machine are figures, not assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import time

import psycopg
import redis

from bench import accounts
from deploy.cluster import Cluster
from harness.client import ChatPage

LEASE_SECONDS = 3
ENV = {
    "CHAT_WORKER_LEASE_SECONDS": str(LEASE_SECONDS),
    "CHAT_DRAIN_SECONDS": "5",
    "CHAT_RATE_MESSAGES": "1000000",
}
PAGES = 30
HANG_SECONDS = 15
OUTAGE_SECONDS = 3
GIVE_UP_SECONDS = 60


async def probe_everywhere(pages: list[ChatPage], sender: ChatPage, text: str) -> float:
    """Posts `text` now; returns the seconds until every page holds it."""
    started = time.monotonic()
    await sender.post(text)
    while True:
        if all(any(m["message"] == text for m in p.messages.values()) for p in pages):
            return time.monotonic() - started
        if time.monotonic() - started > GIVE_UP_SECONDS:
            raise RuntimeError(f"{text!r} did not reach every page")
        await asyncio.sleep(0.02)


async def worker_goes(cluster: Cluster, pages, index: int, signum: int) -> float:
    """A worker is killed or stopped; timed from the signal."""
    worker = cluster.workers[index]
    started = time.monotonic()
    worker.send_signal(signum)
    # Posted by a page of another worker, it must reach the moved pages too.
    sender = next(p for p in pages if p not in on_worker(cluster, pages, worker.id))
    took = await probe_everywhere(pages, sender, f"after signal {signum} {started}")
    await asyncio.to_thread(worker.wait, cluster.drain_seconds() + 5)
    await asyncio.to_thread(cluster.restart_worker, index)
    return took


def on_worker(cluster: Cluster, pages: list[ChatPage], worker_id: str) -> list:
    """The pages whose socket the worker `worker_id` holds (from presence)."""
    with psycopg.connect(cluster.database_url, autocommit=True) as db:
        names = {
            row[0]
            for row in db.execute(
                "SELECT u.username FROM chat_connection c"
                " JOIN auth_user u ON u.id = c.user_id WHERE c.worker = %s",
                (worker_id,),
            )
        }
    return [page for page in pages if page.username in names]


async def redis_restarts(cluster: Cluster, pages) -> float:
    """Redis stops for a few seconds and comes back empty; timed from its return."""
    cluster.redis[0].stop()
    await asyncio.sleep(OUTAGE_SECONDS)
    cluster.redis[0].start()
    return await probe_everywhere(pages, pages[0], f"after restart {time.time()}")


async def redis_hangs(cluster: Cluster, pages) -> float:
    """Redis is stopped (SIGSTOP) for 15 s; timed from SIGCONT."""
    process = cluster.redis[0].process
    process.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(HANG_SECONDS)
    finally:
        process.send_signal(signal.SIGCONT)
    return await probe_everywhere(pages, pages[0], f"after hang {time.time()}")


async def primary_killed(cluster: Cluster, pages) -> float:
    """Under Sentinel, the primary is killed (SIGKILL); timed from the kill
    until a probe posted at that moment (sent once a socket takes it) has
    reached every page. The killed server then comes back as the replica."""
    primary = cluster.redis_primary()
    [server] = [r for r in cluster.redis if primary == f"127.0.0.1:{r.port}"]
    started = time.monotonic()
    server.kill()
    took = await probe_everywhere(pages, pages[0], f"after failover {started}")
    await asyncio.to_thread(server.start)
    # Ready for the next round once the sentinels agree on the new primary and
    # it has the old one back as its replica.
    while not replica_in_sync(cluster):
        await asyncio.sleep(0.2)
    return took


def replica_in_sync(cluster: Cluster) -> bool:
    primary = cluster.redis_primary()
    if primary is None:
        return False
    host, port = primary.split(":")
    client = redis.Redis(host=host, port=int(port))
    try:
        info = client.info("replication")
    except redis.RedisError:
        return False
    finally:
        client.close()
    return info.get("connected_slaves") == 1 and info["slave0"]["state"] == "online"


SENTINEL_FAULT = "Redis primary killed under Sentinel (failover), from the kill"

FAULTS = {
    "a worker killed (SIGKILL), from the signal": lambda c, p: worker_goes(
        c, p, 0, signal.SIGKILL
    ),
    "a worker stopped (SIGTERM), from the signal": lambda c, p: worker_goes(
        c, p, 1, signal.SIGTERM
    ),
    f"Redis down {OUTAGE_SECONDS} s and back empty, from its return": redis_restarts,
    f"Redis hung {HANG_SECONDS} s (SIGSTOP), from SIGCONT": redis_hangs,
}


def prepare(cluster: Cluster) -> list[str]:
    """The room and the users, written straight into the cluster's database."""
    accounts.setup_django(cluster.env)
    accounts.create_rooms(["recovery"])
    return accounts.create_users(PAGES, prefix="recovery")


async def measure(rounds: int, sentinel: bool) -> dict[str, list[float]]:
    # A failover needs the Redis of `make cluster SENTINEL=1`; the other faults
    # would be failovers there too.
    faults = {SENTINEL_FAULT: primary_killed} if sentinel else FAULTS
    figures: dict[str, list[float]] = {name: [] for name in faults}
    with Cluster(workers=3, env=ENV, sentinel=sentinel) as cluster:
        sessions = await asyncio.to_thread(prepare, cluster)
        pages = [
            ChatPage(cluster.url, "recovery", f"recovery{n}", session)
            for n, session in enumerate(sessions)
        ]
        for page in pages:
            await page.start()
        try:
            await probe_everywhere(pages, pages[0], "warm-up")
            for round_ in range(rounds):
                for name, fault in faults.items():
                    took = await fault(cluster, pages)
                    figures[name].append(took)
                    print(f"round {round_ + 1}: {name}: {took:.2f} s", file=sys.stderr)
                    await asyncio.sleep(2 * LEASE_SECONDS)  # let presence settle
        finally:
            await asyncio.gather(*(page.stop() for page in pages))
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.recovery")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each fault")
    parser.add_argument(
        "--sentinel",
        action="store_true",
        help="Redis under Sentinel, and the primary killed: the failover alone",
    )
    args = parser.parse_args(argv)
    figures = asyncio.run(measure(args.rounds, args.sentinel))
    print(f"| fault ({PAGES} pages through nginx, 3 workers) | median s | runs s |")
    print("|---|---|---|")
    for name, runs in figures.items():
        listed = ", ".join(f"{run:.1f}" for run in runs)
        print(f"| {name} | {statistics.median(runs):.1f} | {listed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
