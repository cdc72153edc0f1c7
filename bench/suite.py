"""The benchmark suite: the chat ("ours") against the Channels tutorial's consumer.

    python -m bench [--rounds 3] [--workloads a,b,c,d,e,f,g,sweep]
                    [--servers ours,baseline] [--scale 1] [--no-write]

docs/performance.md describes every workload and figure. Everything it starts
(redis-server, workers, client processes) listens on loopback only and is
stopped by pid on every exit path, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import accounts, procs
from bench.loadgen import ClientPool
from harness import wire

SERVERS = ("ours", "baseline")
WORKLOADS = ("a", "b", "c", "d", "e", "f", "g", "sweep")
# Connect-bound workloads and the plot's sweep run in the first round only,
# unless --all-rounds: opening thousands of sockets dominates their run time.
ONCE = ("d", "e", "f", "sweep")
SLOW_CLOSES = "chat_slow_socket_closes_total"
START_MARK = "<!-- bench:results:start -->"
END_MARK = "<!-- bench:results:end -->"
# Sockets per user where a workload does not ask for distinct users: few users,
# so that presence does not turn a fan-out into a join storm.
USERS_PER_ROOM = 10


class Failed(Exception):
    """A run whose deliveries were not exactly once and in order, or did not start."""


@dataclass
class Plan:
    """One run: which sockets go where, who sends, what to measure."""

    sockets: list[dict]  # {"room", "user", "rcvbuf", "stuck"}
    senders: dict[str, dict] = field(default_factory=dict)
    duration: float = 0.0
    drain: float = 10.0  # seconds after the senders stop that count as in time
    grace: float = 20.0  # further seconds to wait, so that late is told from lost
    # Handshakes in flight per client process. Kept low where opening is not
    # what is measured: ours' connect path queues on the database, and many
    # handshakes at once starve some of them past connect_timeout.
    concurrency: int = 8
    connect_timeout: float = 120.0
    behind_ok: bool = False  # a shortfall is reported as the delivery ratio
    poll: bool = False  # watch RSS and the slow-socket metric during the send
    settle: float = 0.0  # seconds to wait after connecting, before RSS


@dataclass
class Context:
    args: argparse.Namespace
    workdir: Path
    env: dict[str, str]
    sessions: list[str]
    redis: procs.Child | None = None
    redis_url: str | None = None
    runs: int = 0


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def scaled(args, value: float, minimum: float) -> float:
    return max(minimum, value * args.scale)


def n(args, value: int, minimum: int = 2) -> int:
    return int(max(minimum, round(value * args.scale)))


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------


def percentile(ordered, fraction: float) -> float:
    if not len(ordered):
        return float("nan")
    rank = max(1, round(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def run_plan(ctx: Context, server: str, workers: int, plan: Plan, title: str) -> dict:
    """Starts workers and clients, runs the plan, stops everything; returns figures."""
    args = ctx.args
    ctx.runs += 1
    tag = f"r{ctx.runs}"
    rooms = sorted({s["room"] for s in plan.sockets})
    room_names = {room: f"{tag}x{room}" for room in rooms}
    if server == "ours":
        accounts.create_rooms(list(room_names.values()))
    env = dict(ctx.env)
    if workers > 1:
        procs.flush_redis(ctx.redis_url)
        env["REDIS_URL"] = ctx.redis_url
    started = procs.start_workers(server, workers, env, ctx.workdir, f"{tag}-{server}")
    pool = None
    try:
        children = [child for child, _ in started]
        ports = [port for _, port in started]
        pool = ClientPool(args.client_procs)
        pool.gather("ready", 60)
        rss_idle = sum(procs.rss_kib(c.pid) for c in children)
        jobs = [
            {
                "step": "job",
                "server": server,
                "subprotocol": server == "ours",
                "senders": {},
                "sockets": [],
                "concurrency": plan.concurrency,
                "timeout": plan.connect_timeout,
            }
            for _ in range(args.client_procs)
        ]
        senders = {}
        for key, spec in plan.senders.items():
            senders[key] = dict(spec, room=room_names[spec["room"]])
        for index, spec in enumerate(plan.sockets):
            port = ports[index % workers]
            jobs[index % args.client_procs]["sockets"].append(
                {
                    "id": index,
                    "room": room_names[spec["room"]],
                    "url": wire.socket_url(
                        f"http://{procs.LOOPBACK}:{port}", room_names[spec["room"]]
                    ),
                    "origin": f"http://{procs.LOOPBACK}:{port}",
                    "cookie": ctx.sessions[spec["user"] % len(ctx.sessions)],
                    "rcvbuf": spec.get("rcvbuf", 0),
                    "stuck": spec.get("stuck", False),
                }
            )
        connect_at = time.monotonic() + 0.2
        for job in jobs:
            job["senders"] = senders
            job["connect_at"] = connect_at
        log(
            f"  {title} / {server}: opening {len(plan.sockets)} sockets"
            f" on {workers} worker(s)"
        )
        pool.send(jobs)
        connected = pool.gather("connected", plan.connect_timeout * 2 + 60)
        log(
            f"  opened in {max(r['t_end'] for r in connected) - connect_at:.1f} s"
            + (f"; sending for {plan.duration:.0f} s" if plan.senders else "")
        )
        failures = [f for r in connected for f in r["failures"]]
        if failures:
            raise Failed(f"{len(failures)} socket(s) did not open, e.g. {failures[0]}")
        t_start = min(r["t_start"] for r in connected if r["t_start"])
        t_end = max(r["t_end"] for r in connected)
        result: dict[str, Any] = {
            "connect_s": t_end - t_start,
            "sockets_per_s": len(plan.sockets) / max(t_end - t_start, 1e-9),
            "fill_frames": sum(r["frames"] for r in connected),
            "fill_events": sum(r["events"] for r in connected),
            "batched": sum(r["batch"] for r in connected),
            "rss_idle_mib": rss_idle / 1024,
        }
        if plan.settle:
            time.sleep(plan.settle)
        rss_open = sum(procs.rss_kib(c.pid) for c in children)
        result["rss_open_mib"] = rss_open / 1024
        result["kib_per_socket"] = (rss_open - rss_idle) / len(plan.sockets)
        if not plan.senders:
            pool.broadcast({"step": "close"})
            pool.gather("closed", 60)
            return result
        # (warm-up first, then the measured phase)

        pids = {"workers": [c.pid for c in children], "clients": pool.pids}
        if workers > 1 and ctx.redis is not None:
            pids["redis"] = [ctx.redis.pid]
        cpu0 = {k: sum(map(procs.cpu_seconds, v)) for k, v in pids.items()}
        start = time.monotonic() + 0.3
        watch = {"rss_max": rss_open, "closes0": None, "closed_at": None}

        def tick() -> None:
            if not plan.poll:
                return
            watch["rss_max"] = max(
                watch["rss_max"], sum(procs.rss_kib(c.pid) for c in children)
            )
            if server == "ours" and watch["closed_at"] is None:
                total = sum(procs.metric_sum(p, SLOW_CLOSES) or 0 for p in ports)
                if watch["closes0"] is None:
                    watch["closes0"] = total
                elif total > watch["closes0"]:
                    watch["closed_at"] = time.monotonic() - start

        # Warm-up posts until every socket has one from each sender of its room.
        warm_until = time.monotonic() + 60
        for attempt in range(1000):
            pool.broadcast({"step": "warm", "attempt": attempt, "timeout": 1.0})
            cold = sum(r["cold"] for r in pool.gather("warmed", 60))
            if not cold:
                break
            if time.monotonic() > warm_until:
                raise Failed(
                    f"{cold} socket(s) never got a warm-up post: not in the room"
                )
        cpu0 = {k: sum(map(procs.cpu_seconds, v)) for k, v in pids.items()}
        start = time.monotonic() + 0.3
        tick()
        pool.broadcast({"step": "go", "start": start, "duration": plan.duration})
        sent_replies = pool.gather("sent", plan.duration + 120, tick)
        sent: dict[str, int] = {}
        for reply in sent_replies:
            sent.update(reply["sent"])
        stopped = time.monotonic()
        deadline = stopped + plan.drain
        pool.broadcast(
            {"step": "expect", "sent": sent, "deadline": deadline, "grace": plan.grace}
        )
        results = pool.gather("results", plan.drain + plan.grace + 60, tick)
        cpu1 = {k: sum(map(procs.cpu_seconds, v)) for k, v in pids.items()}
        tick()
        pool.broadcast({"step": "close"})
        closed = pool.gather("closed", 60)
        dead = [c for c in children if not c.alive()]
        if dead:
            raise Failed(f"{dead[0].name} died:\n{dead[0].output()}")
    finally:
        if pool is not None:
            pool.stop()
        for child, _ in started:
            child.stop()

    expected = sum(r["expected"] for r in results)
    delivered = sum(r["delivered"] for r in results)
    late = sum(r["late"] for r in results)
    latencies = array("f")
    for r in results:
        latencies.frombytes(r["latencies"])
    ordered = sorted(latencies)
    done = max(r["done_at"] for r in results)
    wall = max(done - start, 1e-9)
    per_k = 1000 / max(delivered + late, 1)
    result.update(
        {
            "posts": sum(sent.values()),
            "expected": expected,
            "delivered": delivered,
            "late": late,
            "ratio": delivered / expected if expected else float("nan"),
            "deliveries_per_s": (delivered + late) / wall,
            "p50_ms": percentile(ordered, 0.50),
            "p99_ms": percentile(ordered, 0.99),
            "worker_cpu_ms_per_k": (cpu1["workers"] - cpu0["workers"]) * per_k * 1000,
            "client_cpu_ms_per_k": (cpu1["clients"] - cpu0["clients"]) * per_k * 1000,
            "redis_cpu_ms_per_k": (
                (cpu1["redis"] - cpu0["redis"]) * per_k * 1000
                if "redis" in cpu0
                else float("nan")
            ),
            "frames": sum(r["frames"] for r in results),
            "events": sum(r["events"] for r in results),
            "rss_growth_mib": (watch["rss_max"] - rss_open) / 1024,
            "stuck_closed_s": watch["closed_at"],
            "stuck_codes": [c for r in closed for c in r["stuck_codes"]],
        }
    )
    problems = []
    duplicates = sum(r["duplicates"] for r in results)
    disorder = sum(r["out_of_order"] + r["seq_breaks"] for r in results)
    unexpected = [c for r in results for c in r["closed"]]
    if duplicates:
        problems.append(f"{duplicates} duplicate deliveries")
    if disorder:
        problems.append(f"{disorder} deliveries out of order")
    if unexpected:
        problems.append(
            f"{len(unexpected)} reading socket(s) closed, e.g. {unexpected[0]}"
        )
    missing = expected - delivered - late
    if missing and not (plan.behind_ok and server == "baseline"):
        problems.append(
            f"{missing} of {expected} deliveries lost "
            f"(not there {plan.drain + plan.grace:.0f} s after the last post)"
        )
    if not sent or not result["posts"]:
        problems.append("nothing was sent")
    if problems:
        raise Failed("; ".join(problems))
    return result


# ---------------------------------------------------------------------------
# Workloads: each returns rows of (row title, workers, plan, figures)
# ---------------------------------------------------------------------------

# figure key -> (title, format)
FIGURES = {
    "deliveries_per_s": ("deliveries/s", "{:.0f}"),
    "p50_ms": ("p50 latency ms", "{:.1f}"),
    "p99_ms": ("p99 latency ms", "{:.1f}"),
    "ratio": ("delivery ratio", "{:.3f}"),
    "worker_cpu_ms_per_k": ("worker CPU ms / 1000 deliveries", "{:.0f}"),
    "client_cpu_ms_per_k": ("client CPU ms / 1000 deliveries", "{:.0f}"),
    "redis_cpu_ms_per_k": ("redis CPU ms / 1000 deliveries", "{:.1f}"),
    "frames": ("frames received", "{:.0f}"),
    "rss_idle_mib": ("worker RSS before, MiB", "{:.1f}"),
    "rss_open_mib": ("worker RSS with sockets open, MiB", "{:.1f}"),
    "kib_per_socket": ("KiB per idle socket", "{:.1f}"),
    "sockets_per_s": ("sockets established/s", "{:.0f}"),
    "connect_s": ("seconds until all in", "{:.2f}"),
    "fill_frames": ("frames received during the fill", "{:.0f}"),
    "rss_growth_mib": ("worker RSS growth, MiB", "{:.1f}"),
    "stuck_closed_s": ("stuck socket closed after, s", "{:.2f}"),
}


def room_sockets(count: int, room: str, users: int, first_user: int = 0) -> list[dict]:
    return [{"room": room, "user": first_user + i % users} for i in range(count)]


def fanout_plan(args, sockets: int, duration: float) -> Plan:
    return Plan(
        sockets=room_sockets(sockets, "fan", USERS_PER_ROOM),
        senders={"s0": {"socket": 0, "room": "fan", "window": 16, "size": 100}},
        duration=duration,
        drain=10,
    )


def workload_rows(
    args, letter: str
) -> list[tuple[str, int, Callable[[], Plan], list[str]]]:
    """Returns the runs of one workload: (row title, workers, plan maker, figures)."""
    delivery = ["deliveries_per_s", "p50_ms", "p99_ms", "ratio"]
    cpu = ["worker_cpu_ms_per_k", "client_cpu_ms_per_k"]
    if letter == "a":
        count, duration = n(args, 1000), scaled(args, 15, 1)
        return [
            (
                f"(a) fan-out, {count} sockets, 1 worker",
                1,
                lambda: fanout_plan(args, count, duration),
                delivery + cpu,
            ),
            (
                f"(a) fan-out, {count} sockets, 2 workers + Redis",
                2,
                lambda: fanout_plan(args, count, duration),
                delivery + cpu + ["redis_cpu_ms_per_k"],
            ),
        ]
    if letter == "b":
        count, duration = n(args, 500), scaled(args, 8, 1)
        rows = []
        for rate in (20, 5):

            def plan(rate=rate) -> Plan:
                return Plan(
                    sockets=room_sockets(count, "lat", USERS_PER_ROOM),
                    senders={
                        "s0": {"socket": 0, "room": "lat", "rate": rate, "size": 100}
                    },
                    duration=duration,
                    behind_ok=True,
                )

            rows.append(
                (
                    f"(b) latency, {count} sockets, {rate} msg/s, 2 workers",
                    2,
                    plan,
                    delivery + cpu,
                )
            )
        return rows
    if letter == "c":
        rooms, per_room, duration = n(args, 100), n(args, 20), scaled(args, 8, 1)
        total_rate = 2.0 * rooms  # 200 messages/s over 100 rooms

        def plan() -> Plan:
            sockets, senders = [], {}
            for r in range(rooms):
                senders[f"s{r}"] = {
                    "socket": len(sockets),
                    "room": f"m{r}",
                    "rate": total_rate / rooms,
                    "phase": r / total_rate,
                    "size": 100,
                }
                sockets += room_sockets(per_room, f"m{r}", per_room)
            return Plan(sockets=sockets, senders=senders, duration=duration)

        return [
            (
                f"(c) {rooms} rooms x {per_room} sockets, {total_rate:.0f} msg/s,"
                " 2 workers",
                2,
                plan,
                delivery + cpu,
            )
        ]
    if letter == "d":
        count = n(args, 5000, 10)

        def plan() -> Plan:
            return Plan(
                sockets=[
                    {"room": f"i{i // 10}", "user": i % args.users}
                    for i in range(count)
                ],
                settle=2,
            )

        return [
            (
                f"(d) idle, {count} sockets in rooms of 10, 2 workers",
                2,
                plan,
                ["rss_idle_mib", "rss_open_mib", "kib_per_socket", "connect_s"],
            )
        ]
    if letter == "e":
        count = n(args, 1000)

        def plan() -> Plan:
            return Plan(
                sockets=[
                    {"room": f"e{i // 10}", "user": i % args.users}
                    for i in range(count)
                ],
                concurrency=max(1, 500 // args.client_procs),
            )

        return [
            (
                f"(e) connect storm, {count} sockets, 500 at once, 2 workers",
                2,
                plan,
                ["sockets_per_s"],
            )
        ]
    if letter == "f":
        count = min(n(args, 1000), args.users)

        def plan() -> Plan:
            return Plan(
                sockets=room_sockets(count, "fill", count),
                concurrency=max(1, 100 // args.client_procs),
                connect_timeout=120,
            )

        return [
            (
                f"(f) room fill, {count} distinct users, 2 workers",
                2,
                plan,
                ["connect_s", "fill_frames"],
            )
        ]
    if letter == "g":
        readers, messages = n(args, 20), n(args, 10000, 20)

        def plan() -> Plan:
            sockets = room_sockets(readers, "stuck", USERS_PER_ROOM)
            sockets.append(
                {"room": "stuck", "user": readers, "rcvbuf": 4096, "stuck": True}
            )
            return Plan(
                sockets=sockets,
                senders={
                    "s0": {
                        "socket": 0,
                        "room": "stuck",
                        "window": 16,
                        "size": 1024,
                        "count": messages,
                    }
                },
                duration=scaled(args, 45, 5),
                drain=30,
                poll=True,
            )

        return [
            (
                f"(g) stuck reader + {readers} readers, {messages} x 1 KiB, 1 worker",
                1,
                plan,
                [
                    "rss_growth_mib",
                    "stuck_closed_s",
                    "ratio",
                    "p99_ms",
                    "deliveries_per_s",
                ],
            )
        ]
    if letter == "sweep":
        rows = []
        for count in sorted({n(args, c) for c in (100, 250, 500, 1000)}):
            duration = scaled(args, 4, 1)
            rows.append(
                (
                    f"sweep: fan-out, {count} sockets, 2 workers",
                    2,
                    lambda count=count, duration=duration: fanout_plan(
                        args, count, duration
                    ),
                    ["deliveries_per_s", "p99_ms"],
                )
            )
        return rows
    raise ValueError(letter)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def fmt(figure: str, value) -> str:
    if value is None:
        return "no"
    if isinstance(value, float) and value != value:
        return "-"
    return FIGURES[figure][1].format(value)


def summarise(rows, results, servers) -> tuple[str, bool]:
    """Returns the Markdown table of medians, and whether any run failed."""
    failed = False
    header = ["workload", "figure"] + list(servers)
    both = "ours" in servers and "baseline" in servers
    if both:
        header.append("ours / baseline")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for title, figures in rows:
        for figure in figures:
            cells, medians = [], {}
            for server in servers:
                runs = results.get((title, server), [])
                errors = [r for r in runs if isinstance(r, str)]
                if not runs:
                    cells.append("not run")
                    continue
                if errors:
                    failed = True
                    cells.append(f"FAILED ({len(errors)} of {len(runs)} rounds)")
                    continue
                values = [r.get(figure) for r in runs]
                if figure == "stuck_closed_s" and any(v is None for v in values):
                    closed = sum(v is not None for v in values)
                    cells.append(
                        f"not closed in {len(values) - closed} of {len(values)}"
                    )
                    continue
                medians[server] = statistics.median(values)
                cells.append(fmt(figure, medians[server]))
            if both:
                a, b = medians.get("ours"), medians.get("baseline")
                cells.append(
                    f"{a / b:.2f}"
                    if a is not None and b not in (None, 0) and a == a and b == b
                    else "-"
                )
            lines.append(
                f"| {title} | {FIGURES[figure][0]} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines), failed


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0))
    return (
        f"{cores} cores ({model or 'unknown CPU'}), "
        f"Python {platform.python_version()}, "
        f"redis-server {procs.redis_version()}, SQLite"
    )


def plot(path: Path, results, servers, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for server in servers:
        points = []
        for title, _ in rows:
            match = re.match(r"sweep: fan-out, (\d+) sockets", title)
            runs = results.get((title, server), [])
            if not match or not runs or any(isinstance(r, str) for r in runs):
                continue
            points.append(
                (
                    int(match.group(1)),
                    statistics.median(r["deliveries_per_s"] for r in runs),
                    statistics.median(r["p99_ms"] for r in runs),
                )
            )
        points.sort()
        if points:
            xs = [p[0] for p in points]
            left.plot(xs, [p[1] for p in points], marker="o", label=server)
            right.plot(xs, [p[2] for p in points], marker="o", label=server)
    left.set(
        xlabel="sockets in the room", ylabel="deliveries/s", title="fan-out throughput"
    )
    right.set(
        xlabel="sockets in the room", ylabel="p99 latency, ms", title="fan-out p99"
    )
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle("one room, one sender (16 in flight), 2 workers + Redis")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_doc(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else "# Performance\n"
    section = f"{START_MARK}\n{block}\n{END_MARK}"
    if START_MARK in text and END_MARK in text:
        head, rest = text.split(START_MARK, 1)
        tail = rest.split(END_MARK, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n## Results\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of everything (medians)"
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated: {','.join(WORKLOADS)}",
    )
    parser.add_argument("--servers", default=",".join(SERVERS), help="ours,baseline")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="shrinks socket counts and durations (0.01 for a smoke run)",
    )
    parser.add_argument("--users", type=int, default=1000, help="accounts created")
    parser.add_argument(
        "--client-procs",
        type=int,
        default=max(2, min(4, len(os.sched_getaffinity(0)))),
        help="client processes the sockets are spread over",
    )
    parser.add_argument(
        "--output", type=Path, default=procs.REPO_ROOT / "docs/performance.md"
    )
    parser.add_argument(
        "--plot", type=Path, default=procs.REPO_ROOT / "docs/performance-fanout.png"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--all-rounds",
        action="store_true",
        help=f"repeat {', '.join(ONCE)} in every round too (default: first only)",
    )
    args = parser.parse_args(argv)
    args.workload_list = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    for name in args.workload_list:
        if name not in WORKLOADS:
            parser.error(
                f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}"
            )
    for name in args.server_list:
        if name not in SERVERS:
            parser.error(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")
    if args.rounds < 1 or args.scale <= 0 or args.users < 1 or args.client_procs < 1:
        parser.error("--rounds, --scale, --users and --client-procs must be positive")
    return args


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    signal.signal(signal.SIGTERM, _terminate)
    nofile = procs.raise_nofile_limit()
    rows = [
        (*row, letter in ONCE and not args.all_rounds)
        for letter in args.workload_list
        for row in workload_rows(args, letter)
    ]
    results: dict[tuple[str, str], list] = {}
    workdir = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    try:
        env = procs.worker_env(workdir / "db.sqlite3", secrets.token_urlsafe(50))
        log(
            f"bench: {len(rows)} runs x {len(args.server_list)} servers"
            f" x {args.rounds} round(s); open files limit {nofile};"
            f" migrating {workdir}/db.sqlite3"
        )
        procs.migrate(env)
        accounts.setup_django(env)
        sessions = accounts.create_users(args.users)
        if not accounts.check_session(sessions[0]):
            raise RuntimeError(
                "the sessions written by the bench do not resolve to a user"
            )
        ctx = Context(args, workdir, env, sessions)
        if any(row[1] > 1 for row in rows):
            ctx.redis, ctx.redis_url = procs.start_redis(workdir)
        for round_number in range(1, args.rounds + 1):
            for title, workers, make_plan, _, once in rows:
                if once and round_number > 1:
                    continue
                for server in args.server_list:
                    log(f"[round {round_number}/{args.rounds}] {title} / {server}")
                    try:
                        figures = run_plan(ctx, server, workers, make_plan(), title)
                    except (Failed, RuntimeError, TimeoutError) as error:
                        log(f"  FAILED: {error}")
                        results.setdefault((title, server), []).append(str(error))
                        continue
                    results.setdefault((title, server), []).append(figures)
                    shown = ", ".join(
                        f"{FIGURES[k][0]} {fmt(k, figures[k])}"
                        for k in next(r[3] for r in rows if r[0] == title)
                        if k in figures
                    )
                    log(f"  {server}: {shown}")
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    table, failed = summarise([(r[0], r[3]) for r in rows], results, args.server_list)
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    elapsed = time.monotonic() - began
    once = ", ".join(w for w in ONCE if w in args.workload_list)
    block = "\n".join(
        [
            f"Command: `{command.strip()}`  ",
            f"Machine: {machine()}  ",
            f"Medians of {args.rounds} round(s) at scale {args.scale:g}"
            + (
                ""
                if args.all_rounds
                or args.rounds == 1
                or not set(ONCE) & set(args.workload_list)
                else f" ({once}: first round only)"
            )
            + "; "
            f"{args.client_procs} client processes;"
            f" the whole run took {elapsed / 60:.1f} min.",
            "",
            table,
        ]
    )
    print(block)
    if not args.no_write:
        write_doc(args.output, block)
        if "sweep" in args.workload_list:
            plot(args.plot, results, args.server_list, [(r[0], r[3]) for r in rows])
        log(
            f"wrote {args.output}"
            + (f" and {args.plot}" if "sweep" in args.workload_list else "")
        )
    if failed:
        log(
            "SOME RUNS FAILED: deliveries lost, duplicated or out of order,"
            " or a start failed"
        )
        return 1
    return 0
