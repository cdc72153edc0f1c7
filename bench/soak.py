"""python -m bench.soak (`make soak`): the cluster under steady load for minutes.

On a local cluster as it is deployed (deploy/cluster.py: nginx, 3 workers,
Redis, PostgreSQL), pages that behave like the real one (harness.client's
ChatPage: reconnect, resume, resend, fill holes) sit in rooms of ten and each
posts at a steady rate. Meanwhile a page's connection drops now and then
(churn: a 1006, then a resume), and the workers are stopped with SIGTERM one
after another and started again, as a rolling deploy does.

Every few seconds it samples each worker's memory (RSS) and open files,
PostgreSQL's connections and Redis's used memory. At the end it stops posting,
waits until every post is acknowledged and every page holds its room's
messages, and compares each page with the database: nothing missing, nothing
twice, nothing the database does not hold. It prints a JSON report (latency
percentiles, the samples, the plateau figures, the comparison);
tests/integration/test_soak.py runs it in `make test` and checks the
comparison and the plateaus, never a time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import psycopg
import redis

from bench import accounts
from deploy.cluster import Cluster
from harness.client import ChatPage

ENV = {
    "CHAT_WORKER_LEASE_SECONDS": "5",
    "CHAT_DRAIN_SECONDS": "5",
    "CHAT_RATE_MESSAGES": "1000000",
}
ROOM_SIZE = 10
SAMPLE_SECONDS = 5
# Once posting stops: how long every page has to catch up.
SETTLE_SECONDS = 120


@dataclass
class Options:
    clients: int = 200
    rate: float = 2.0  # posts per second per client
    seconds: float = 300
    workers: int = 3
    churn_seconds: float = 1.0  # a page's connection drops this often
    restart_seconds: float = 60  # a worker is stopped (SIGTERM) this often


@dataclass
class Sample:
    at: float  # seconds since the load started
    workers_rss_kib: list[int]
    workers_open_files: list[int]
    database_connections: int
    redis_used_memory: int


@dataclass
class Report:
    options: dict
    posted: int = 0
    stored: int = 0
    deliveries: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    p99_ms_by_period: list[tuple[float, float]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    plateau: dict[str, dict[str, float]] = field(default_factory=dict)
    restarts: int = 0
    drops: int = 0
    reconnects: int = 0
    # How the pages' sockets were closed, by code: a 1011 is a server failure.
    closes: dict[int, int] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)
    unexpected: dict[str, int] = field(default_factory=dict)
    stored_twice: int = 0
    unacknowledged: int = 0


class SoakPage(ChatPage):
    """A page that also times each message it gets live, sender to screen.

    The text of a post carries the monotonic clock of the moment it was
    posted; pages and senders share one process, so one clock.
    """

    def __init__(self, *args, latencies: list[tuple[float, float]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.latencies = latencies

    async def handle(self, frame: dict) -> None:
        if frame.get("type") == "message" and frame.get("seq") not in self.messages:
            sent = posted_at(frame.get("message", ""))
            if sent is not None:
                self.latencies.append((sent, time.monotonic() - sent))
        await super().handle(frame)


def post_text(username: str, n: int) -> str:
    return f"{username}:{n}:{time.monotonic():.6f}"


def posted_at(text: str) -> float | None:
    try:
        return float(text.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def rooms_for(clients: int) -> list[str]:
    return [f"soak-{n}" for n in range((clients + ROOM_SIZE - 1) // ROOM_SIZE)]


def prepare(cluster: Cluster, clients: int) -> tuple[list[str], list[str]]:
    """The rooms and the users, written straight into the cluster's database."""
    accounts.setup_django(cluster.env)
    rooms = rooms_for(clients)
    accounts.create_rooms(rooms)
    return rooms, accounts.create_users(clients, prefix="soak")


def sample(cluster: Cluster, started: float) -> Sample:
    rss, files = [], []
    for worker in cluster.workers:
        pid = worker.pid
        rss.append(_rss_kib(pid) if pid else 0)
        files.append(_open_files(pid) if pid else 0)
    with psycopg.connect(cluster.database_url, autocommit=True) as db:
        (connections,) = db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        ).fetchone()
    used = redis.Redis.from_url(cluster.redis_url).info("memory")["used_memory"]
    return Sample(
        at=round(time.monotonic() - started, 1),
        workers_rss_kib=rss,
        workers_open_files=files,
        database_connections=int(connections),
        redis_used_memory=int(used),
    )


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def plateau(samples: list[Sample]) -> dict[str, dict[str, float]]:
    """Each figure's peak in the middle third of the run and in the last third.

    A leak grows from one to the other; a plateau does not. The first third
    is warm-up (pools fill, caches warm). Workers' figures are summed: a
    rolling restart moves sockets from one worker to another.
    """
    if len(samples) < 3:
        return {}
    third = len(samples) // 3
    middle, last = samples[third : 2 * third], samples[2 * third :]
    figures = {
        "workers_rss_kib": lambda s: sum(s.workers_rss_kib),
        "workers_open_files": lambda s: sum(s.workers_open_files),
        "database_connections": lambda s: s.database_connections,
        "redis_used_memory": lambda s: s.redis_used_memory,
    }
    return {
        name: {
            "middle_peak": max(of(s) for s in middle),
            "last_peak": max(of(s) for s in last),
        }
        for name, of in figures.items()
    }


def stored_messages(cluster: Cluster) -> tuple[dict[str, dict[int, str]], int]:
    """Each soak room's messages by seq, and how many client_ids are stored twice."""
    with psycopg.connect(cluster.database_url, autocommit=True) as db:
        rows = db.execute(
            "SELECT r.slug, m.seq, m.body FROM chat_message m"
            " JOIN chat_room r ON r.id = m.room_id WHERE r.slug LIKE 'soak-%%'"
        ).fetchall()
        (twice,) = db.execute(
            "SELECT count(*) FROM (SELECT 1 FROM chat_message"
            " WHERE client_id IS NOT NULL GROUP BY user_id, room_id, client_id"
            " HAVING count(*) > 1) AS repeated"
        ).fetchone()
    by_room: dict[str, dict[int, str]] = {}
    for slug, seq, body in rows:
        by_room.setdefault(slug, {})[seq] = body
    return by_room, int(twice)


async def run(options: Options, log=print) -> Report:
    report = Report(options=asdict(options))
    latencies: list[tuple[float, float]] = []
    # Every page comes from 127.0.0.1: the cap per address (256) stays as
    # deployed up to 200 pages, so a restart tests that a stopping worker's
    # sockets do not count toward it, and leaves that headroom above.
    env = {
        **ENV,
        "CHAT_MAX_CONNECTIONS_PER_ADDRESS": str(max(256, options.clients + 56)),
    }
    with Cluster(workers=options.workers, env=env) as cluster:
        rooms, sessions = await asyncio.to_thread(prepare, cluster, options.clients)
        pages = [
            SoakPage(
                cluster.url,
                rooms[n // ROOM_SIZE],
                f"soak{n}",
                session,
                latencies=latencies,
                welcome_timeout=60,
            )
            for n, session in enumerate(sessions)
        ]
        await asyncio.gather(*(page.start() for page in pages))
        log(f"{len(pages)} pages in {len(rooms)} rooms; load for {options.seconds} s")
        started = time.monotonic()
        deadline = started + options.seconds
        stopping = asyncio.Event()

        async def post_steadily(page: SoakPage) -> None:
            interval = 1 / options.rate
            await asyncio.sleep(random.uniform(0, interval))
            n = 0
            while time.monotonic() < deadline:
                await page.post(post_text(page.username, n))
                n += 1
                report.posted += 1
                await asyncio.sleep(interval)

        async def churn() -> None:
            while not stopping.is_set():
                await asyncio.sleep(options.churn_seconds)
                page = random.choice(pages)
                connection = page.connection
                if connection is not None and page.ready.is_set():
                    connection.transport.abort()  # as a dropped network: 1006
                    report.drops += 1

        async def roll() -> None:
            index = 0
            # None in the last half period: the run ends with every worker up.
            while time.monotonic() + 1.5 * options.restart_seconds < deadline:
                await asyncio.sleep(options.restart_seconds)
                worker = cluster.workers[index % len(cluster.workers)]
                log(f"{time.monotonic() - started:.0f} s: SIGTERM {worker.base_url}")
                worker.send_signal(signal.SIGTERM)
                await asyncio.to_thread(worker.wait, cluster.drain_seconds() + 10)
                await asyncio.to_thread(
                    cluster.restart_worker, index % len(cluster.workers)
                )
                report.restarts += 1
                index += 1

        async def watch() -> None:
            while not stopping.is_set():
                report.samples.append(await asyncio.to_thread(sample, cluster, started))
                # The pages keep every message to compare with the database at
                # the end, and Python's collector would scan them all, more
                # each minute: its pauses (0.4 s by the fourth minute at 40
                # pages) were counted as the server's latency. What is frozen
                # is only ever dropped at the end.
                gc.freeze()
                await asyncio.sleep(SAMPLE_SECONDS)

        helpers = [asyncio.create_task(f()) for f in (churn, roll, watch)]
        try:
            await asyncio.gather(*(post_steadily(page) for page in pages))
            await helpers[1]  # the last restart is done
            log(f"posting stopped after {report.posted} posts; settling")
            await settle(cluster, pages)
        finally:
            stopping.set()
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
        stored, report.stored_twice = await asyncio.to_thread(stored_messages, cluster)
        for page in pages:  # before they stop (1000)
            for code in page.closes:
                report.closes[code] = report.closes.get(code, 0) + 1
        behind = [page for page in pages if page.unacked]
        if behind:
            # Why a page never caught up is in the workers' logs, gone with
            # the cluster once it stops.
            for page in behind:
                log(f"left behind: {page.username}, closes {page.closes[-5:]}")
            for name, text in cluster.logs().items():
                if name.startswith("worker"):
                    log(f"--- {name}\n{text}")
        await asyncio.gather(*(page.stop() for page in pages))

    report.stored = sum(len(messages) for messages in stored.values())
    report.deliveries = len(latencies)
    report.reconnects = sum(len(page.welcomes) - 1 for page in pages)
    report.unacknowledged = sum(len(page.unacked) for page in pages)
    for page in pages:
        held = {seq: m["message"] for seq, m in page.messages.items()}
        expected = stored.get(page.room, {})
        missing = len(expected.keys() - held.keys())
        unexpected = sum(1 for seq, text in held.items() if expected.get(seq) != text)
        if missing:
            report.missing[page.username] = missing
        if unexpected:
            report.unexpected[page.username] = unexpected
    if latencies:
        ordered = sorted(latency for _, latency in latencies)
        report.latency_ms = {
            "p50": round(1000 * statistics.median(ordered), 1),
            "p99": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 1),
            "max": round(1000 * ordered[-1], 1),
        }
    report.plateau = plateau(report.samples)
    report.p99_ms_by_period = p99_by_period(latencies, started, SAMPLE_SECONDS * 2)
    return report


def p99_by_period(
    latencies: list[tuple[float, float]], started: float, period: float
) -> list[tuple[float, float]]:
    """The p99 of the messages posted in each period: (its start in s, ms)."""
    periods: dict[int, list[float]] = {}
    for sent, latency in latencies:
        periods.setdefault(int((sent - started) // period), []).append(latency)
    return [
        (n * period, round(1000 * sorted(v)[int(0.99 * (len(v) - 1))], 1))
        for n, v in sorted(periods.items())
    ]


async def settle(cluster: Cluster, pages: list[SoakPage]) -> None:
    """Waits (bounded) until every post is acknowledged and every page holds
    what the database holds for its room."""
    give_up = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < give_up:
        if not any(page.unacked for page in pages):
            stored, _ = await asyncio.to_thread(stored_messages, cluster)
            if all(stored.get(p.room, {}).keys() <= p.messages.keys() for p in pages):
                return
        await asyncio.sleep(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak")
    defaults = Options()
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument(
        "--rate", type=float, default=defaults.rate, help="posts/s each"
    )
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--churn-seconds", type=float, default=defaults.churn_seconds)
    parser.add_argument(
        "--restart-seconds", type=float, default=defaults.restart_seconds
    )
    args = parser.parse_args(argv)
    options = Options(**{f.name: getattr(args, f.name) for f in fields(Options)})
    # A SIGTERM (a timeout, a CI cancel) stops the cluster as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    report = asyncio.run(run(options, log=lambda line: print(line, file=sys.stderr)))
    print(json.dumps(asdict(report), indent=2))
    whole = not (report.missing or report.unexpected or report.stored_twice)
    return 0 if whole and not report.unacknowledged else 1


if __name__ == "__main__":
    sys.exit(main())
