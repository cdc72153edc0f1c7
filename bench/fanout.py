"""Fan-out benchmark: one room, N real WebSocket clients, one sender, real workers.

    python -m bench.fanout [--clients 50] [--messages 300] [--rounds 1]
                           [--setups memory-1,core-1,core-2,pubsub-1,pubsub-2]

For each setup (channel layer x worker processes) it starts the workers
(`python -m chatproject.server`, DEBUG off) on a temporary SQLite database and,
for the Redis layers, one redis-server, all on loopback; fills one room with
clients, has one of them post and measures what every client receives. It stops
everything it started. docs/performance.md explains the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import http.cookiejar
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

REPO_ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench-Secret-pass-42"
ROOM = "bench"
START_TIMEOUT = 30
STOP_TIMEOUT = 10
HTTP_TIMEOUT = 30
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Seconds the sender waits for its own copy of a post before giving up.
ACK_TIMEOUT = 20
# Handshakes in flight at once: each one writes presence under the room's lock.
CONNECT_CONCURRENCY = 10

# Setup name -> (channel layer, worker processes). The in-memory layer cannot
# span processes, so it only ever runs with one worker.
SETUPS: dict[str, tuple[str, int]] = {
    "memory-1": ("memory", 1),
    "core-1": ("core", 1),
    "core-2": ("core", 2),
    "pubsub-1": ("pubsub", 1),
    "pubsub-2": ("pubsub", 2),
}
LAYER_BACKENDS = {
    "memory": "channels.layers.InMemoryChannelLayer",
    "core": "channels_redis.core.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


def free_port() -> int:
    """Returns a TCP port that is free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """Returns the user + system CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name (field 2) may hold spaces: split after its ")".
        fields = stat.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15; fields[0] is field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    """Returns a process's resident memory in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Child:
    """A child process whose output goes to a file; stopped by its own pid."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        # A file, not a pipe: nobody reads a pipe during the run, and a full
        # one would block the child.
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        CHILDREN.append(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self in CHILDREN:
            CHILDREN.remove(self)


# Every child still running, so that any exit path stops them all.
CHILDREN: list[Child] = []


def start_redis(workdir: Path) -> tuple[Child, str]:
    """Starts a redis-server with no persistence; returns it and its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (make system-packages)")
    port = free_port()
    data = workdir / "redis"
    data.mkdir()
    child = Child(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        + ["--appendonly", "no", "--dir", str(data)],
        dict(os.environ),
        workdir / "redis.log",
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            try:
                client.ping()
                return child, url
            except redis.ConnectionError:
                if not child.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start:\n{child.output()}")
                time.sleep(0.05)
    finally:
        client.close()


def flush_redis(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushall()
    finally:
        client.close()


def base_env(db_path: Path, secret_key: str, clients: int) -> dict[str, str]:
    """Returns a worker's environment: production settings, generous rate limits."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("REDIS_URL", "DATABASE_URL", "CHAT_REDIS_LAYER")
    }
    env.update(
        {
            "DATABASE_URL": f"sqlite:///{db_path}",
            "DJANGO_DEBUG": "0",
            "DJANGO_SECRET_KEY": secret_key,
            "DJANGO_SETTINGS_MODULE": "chatproject.settings",
            "PYTHONUNBUFFERED": "1",
            # The sender posts far faster than a person may.
            "CHAT_RATE_MESSAGES": "1000000",
            "CHAT_RATE_WINDOW_SECONDS": "1",
            "CHAT_MAX_CONNECTIONS_PER_USER": str(clients + 10),
            "CHAT_DRAIN_SECONDS": "2",
        }
    )
    return env


def migrate(env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v0"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"migrate failed:\n{result.stdout}{result.stderr}")


def start_worker(env: dict[str, str], log_path: Path) -> tuple[Child, str]:
    """Starts one worker on a free port; returns it once /healthz answers."""
    port = free_port()
    child = Child(
        [sys.executable, "-m", "chatproject.server", "-b", "127.0.0.1"]
        + ["-p", str(port), "chatproject.asgi:application"],
        env,
        log_path,
    )
    base_url = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if not child.alive():
            raise RuntimeError(f"a worker exited at start:\n{child.output()}")
        try:
            opener.open(f"{base_url}/healthz", timeout=1).close()
            return child, base_url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"a worker did not answer:\n{child.output()}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# Accounts, over HTTP like a browser
# ---------------------------------------------------------------------------


def _cookie(jar: http.cookiejar.CookieJar, name: str) -> str | None:
    return next((c.value for c in jar if c.name == name), None)


def _post_form(opener, jar, url: str, data: dict[str, str]) -> None:
    opener.open(url, timeout=HTTP_TIMEOUT).read()
    form = {"csrfmiddlewaretoken": _cookie(jar, "csrftoken") or "", **data}
    request = urllib.request.Request(
        url, data=urllib.parse.urlencode(form).encode(), headers={"Referer": url}
    )
    opener.open(request, timeout=HTTP_TIMEOUT).read()


def sign_up_users(base_url: str, count: int) -> list[str]:
    """Signs up `count` users through the sign-up form; returns their sessionids.

    The first one also creates the room, through the lobby form.
    """
    sessions = []
    for index in range(count):
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor(jar)
        )
        username = f"bench-{index}"
        _post_form(
            opener,
            jar,
            f"{base_url}/accounts/signup/",
            {"username": username, "password1": PASSWORD, "password2": PASSWORD},
        )
        sessionid = _cookie(jar, "sessionid")
        if not sessionid:
            raise RuntimeError(f"signing up {username} set no session cookie")
        if index == 0:
            _post_form(opener, jar, f"{base_url}/chat/", {"name": ROOM})
        sessions.append(sessionid)
    return sessions


# ---------------------------------------------------------------------------
# Clients and traffic
# ---------------------------------------------------------------------------


class Phase:
    """One batch of posts, and when each client first received each of them."""

    def __init__(self, tag: str, count: int, clients: int, window: int) -> None:
        self.ids = [f"{tag}-{number}" for number in range(count)]
        self.sent_at: dict[str, float] = {}
        self.received: list[dict[str, float]] = [{} for _ in range(clients)]
        self.duplicates = 0
        self.stalled = False
        self.complete_clients = 0
        self.done = asyncio.Event()
        # Posts the sender may have in flight, unacknowledged, at once.
        self.window = asyncio.Semaphore(window)

    def record(self, client: int, client_id: str, now: float) -> None:
        got = self.received[client]
        if client_id in got:
            self.duplicates += 1
            return
        got[client_id] = now
        if client == 0:
            # The sender's own copy is its acknowledgement.
            self.window.release()
        if len(got) == len(self.ids):
            self.complete_clients += 1
            if self.complete_clients == len(self.received):
                self.done.set()


@dataclass
class Traffic:
    """What every client's reader records into, by the tag of the client_id."""

    phases: dict[str, Phase] = field(default_factory=dict)
    unexpected: int = 0
    errors: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)


async def open_client(url: str, origin: str, sessionid: str) -> ClientConnection:
    """Opens a socket as a signed-in user and reads its `welcome`."""
    connection = await connect(
        url,
        additional_headers={"Origin": origin, "Cookie": f"sessionid={sessionid}"},
        proxy=None,
        open_timeout=HTTP_TIMEOUT,
        # Only the chat's own frames: no keepalive pings during the run.
        ping_interval=None,
    )
    async with asyncio.timeout(HTTP_TIMEOUT):
        while json.loads(await connection.recv()).get("type") != "welcome":
            pass
    return connection


async def read_frames(
    index: int, connection: ClientConnection, traffic: Traffic
) -> None:
    """Records every `message` a client receives, with the time it arrived."""
    try:
        async for raw in connection:
            now = time.perf_counter()
            frame = json.loads(raw)
            kind = frame.get("type")
            if kind == "message":
                client_id = frame.get("client_id") or ""
                phase = traffic.phases.get(client_id.split("-", 1)[0])
                if phase is None:
                    traffic.unexpected += 1
                else:
                    phase.record(index, client_id, now)
            elif kind == "error":
                traffic.errors.append(str(frame.get("code")))
    except ConnectionClosed as closed:
        traffic.closed.append(f"client {index}: {closed}")


async def send_phase(
    sender: ClientConnection, phase: Phase, rate: float, text: str
) -> None:
    """Posts the phase's messages at `rate` per second, or as acks allow (0)."""
    start = time.perf_counter()
    for number, client_id in enumerate(phase.ids):
        if rate > 0:
            delay = start + number / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            try:
                async with asyncio.timeout(ACK_TIMEOUT):
                    await phase.window.acquire()
            except TimeoutError:
                # An acknowledgement never came: report it, do not hang.
                phase.stalled = True
                return
        frame = json.dumps({"type": "message", "message": text, "client_id": client_id})
        phase.sent_at[client_id] = time.perf_counter()
        await sender.send(frame)


def percentile(ordered: list[float], fraction: float) -> float:
    """Returns the nearest-rank percentile of an ascending list (nan if empty)."""
    if not ordered:
        return float("nan")
    rank = max(1, round(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# ---------------------------------------------------------------------------
# One setup
# ---------------------------------------------------------------------------


@dataclass
class Shared:
    """What the setups of one run share: the database, Redis, the accounts."""

    workdir: Path
    db_env: dict[str, str]
    redis_url: str | None
    redis: Child | None
    sessions: list[str] = field(default_factory=list)


async def run_setup(name: str, args: argparse.Namespace, shared: Shared) -> dict:
    """Runs one setup from start to stop; returns its figures."""
    layer, worker_count = SETUPS[name]
    env = dict(shared.db_env)
    if layer != "memory":
        flush_redis(shared.redis_url)
        env.update({"REDIS_URL": shared.redis_url, "CHAT_REDIS_LAYER": layer})
    workers: list[Child] = []
    connections: list[ClientConnection] = []
    readers: list[asyncio.Task] = []
    traffic = Traffic()
    try:
        async with asyncio.timeout(args.timeout):
            urls = []
            for number in range(worker_count):
                log_path = shared.workdir / f"{name}-worker{number}.log"
                worker, url = await asyncio.to_thread(start_worker, env, log_path)
                workers.append(worker)
                urls.append(url)
            rss_before = sum(rss_mib(worker.pid) for worker in workers)
            if not shared.sessions:
                shared.sessions = await asyncio.to_thread(
                    sign_up_users, urls[0], args.users
                )

            # Client i talks to worker i mod W; client 0, the sender, to the first.
            gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

            async def open_one(index: int) -> ClientConnection:
                base = urls[index % worker_count]
                ws_url = base.replace("http://", "ws://") + f"/ws/chat/{ROOM}/"
                sessionid = shared.sessions[index % len(shared.sessions)]
                async with gate:
                    return await open_client(ws_url, base, sessionid)

            connections.extend(
                await asyncio.gather(*(open_one(i) for i in range(args.clients)))
            )
            readers.extend(
                asyncio.create_task(read_frames(index, connection, traffic))
                for index, connection in enumerate(connections)
            )
            text = ("x" * args.text_bytes)[: args.text_bytes]

            async def run_phase(kind: str, count: int) -> Phase:
                # A client_id is new in every run: a reused one is a retry,
                # which only the sender gets back.
                tag = kind + secrets.token_hex(4)
                phase = Phase(tag, count, args.clients, args.window)
                traffic.phases[tag] = phase
                await send_phase(connections[0], phase, args.rate, text)
                try:
                    async with asyncio.timeout(args.drain_timeout):
                        await phase.done.wait()
                except TimeoutError:
                    pass  # counted as lost below
                return phase

            await run_phase("w", args.warmup)
            pids = {"workers": [w.pid for w in workers]}
            if layer != "memory":
                pids["redis"] = [shared.redis.pid]
            cpu_before = {k: sum(map(cpu_seconds, v)) for k, v in pids.items()}
            bench_before = sum(os.times()[:2])
            phase = await run_phase("m", args.messages)
            cpu_after = {k: sum(map(cpu_seconds, v)) for k, v in pids.items()}
            bench_cpu = sum(os.times()[:2]) - bench_before
            rss_after = sum(rss_mib(worker.pid) for worker in workers)
    except TimeoutError:
        return {"setup": name, "failed": f"did not finish within {args.timeout} s"}
    finally:
        for connection in connections:
            await connection.close()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        # Let the disconnect handlers clear presence before the workers stop.
        await asyncio.sleep(0.5)
        failed_logs = [w.output() for w in workers if not w.alive()]
        for worker in workers:
            worker.stop()
        for log in failed_logs:
            print(f"--- a {name} worker died:\n{log}", file=sys.stderr)

    delivered = sum(len(got) for got in phase.received)
    # Posts a stalled sender never sent count as lost too.
    expected = args.clients * args.messages
    latencies = sorted(
        (at - phase.sent_at[client_id]) * 1000
        for got in phase.received
        for client_id, at in got.items()
    )
    first_sent = min(phase.sent_at.values(), default=0.0)
    last_received = max((max(got.values()) for got in phase.received if got), default=0)
    wall = max(last_received - first_sent, 1e-9)
    per_k = 1000 / max(delivered, 1)
    return {
        "setup": name,
        "layer": LAYER_BACKENDS[layer],
        "workers": worker_count,
        "expected": expected,
        "delivered": delivered,
        "lost": expected - delivered,
        "duplicates": phase.duplicates,
        "sender_stalled": phase.stalled,
        "unexpected": traffic.unexpected,
        "errors": len(traffic.errors),
        "closed": len(traffic.closed),
        "wall_s": wall,
        "deliveries_per_s": delivered / wall,
        "p50_ms": percentile(latencies, 0.50),
        "p95_ms": percentile(latencies, 0.95),
        "p99_ms": percentile(latencies, 0.99),
        "worker_cpu_s_per_1000": (cpu_after["workers"] - cpu_before["workers"]) * per_k,
        "redis_cpu_s_per_1000": (
            (cpu_after["redis"] - cpu_before["redis"]) * per_k if "redis" in pids else 0
        ),
        "bench_cpu_s_per_1000": bench_cpu * per_k,
        "worker_rss_mib_before": rss_before,
        "worker_rss_mib_after": rss_after,
    }


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

COLUMNS = [
    ("setup", "setup", "{}"),
    ("delivered", "delivered", "{}"),
    ("expected", "of", "{}"),
    ("lost", "lost", "{}"),
    ("duplicates", "dup", "{}"),
    ("deliveries_per_s", "deliveries/s", "{:.0f}"),
    ("throughput_ratio", "× base", "{:.2f}"),
    ("p50_ms", "p50 ms", "{:.1f}"),
    ("p95_ms", "p95 ms", "{:.1f}"),
    ("p99_ms", "p99 ms", "{:.1f}"),
    ("worker_cpu_s_per_1000", "worker CPU s/1000", "{:.3f}"),
    ("cpu_ratio", "× base", "{:.2f}"),
    ("redis_cpu_s_per_1000", "redis CPU s/1000", "{:.3f}"),
    ("bench_cpu_s_per_1000", "client CPU s/1000", "{:.3f}"),
    ("worker_rss_mib_before", "RSS MiB before", "{:.0f}"),
    ("worker_rss_mib_after", "RSS MiB after", "{:.0f}"),
]
SUMMED = ("delivered", "expected", "lost", "duplicates")


def summarise(rounds: list[dict], setups: list[str]) -> list[dict]:
    """Returns one row per setup: medians over rounds, losses summed."""
    rows = []
    for name in dict.fromkeys(setups):
        runs = [r for r in rounds if r["setup"] == name and "failed" not in r]
        if not runs:
            rows.append({"setup": name, "failed": True})
            continue
        row: dict[str, Any] = {"setup": name}
        for key, _, _ in COLUMNS[1:]:
            if key in runs[0]:
                values = [run[key] for run in runs]
                row[key] = sum(values) if key in SUMMED else statistics.median(values)
        rows.append(row)
    base = next((row for row in rows if "failed" not in row), None)
    for row in rows:
        if "failed" not in row and base is not None:
            row["throughput_ratio"] = row["deliveries_per_s"] / base["deliveries_per_s"]
            row["cpu_ratio"] = (
                row["worker_cpu_s_per_1000"] / base["worker_cpu_s_per_1000"]
            )
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = [
            fmt.format(row[key]) if key in row else "failed" for key, _, fmt in COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        f"{cores} cores ({model or 'unknown CPU'}), Python {platform.python_version()}"
    )


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fanout",
        description="Room fan-out over real workers, per channel layer.",
    )
    parser.add_argument("--clients", type=int, default=50, help="sockets in the room")
    parser.add_argument("--messages", type=int, default=300, help="measured posts")
    parser.add_argument("--warmup", type=int, default=30, help="posts before measuring")
    parser.add_argument(
        "--rate",
        type=float,
        default=0,
        help="posts per second offered; 0: as fast as acks allow (see --window)",
    )
    parser.add_argument(
        "--window", type=int, default=8, help="unacknowledged posts in flight (rate 0)"
    )
    parser.add_argument("--text-bytes", type=int, default=100, help="message length")
    parser.add_argument(
        "--users", type=int, default=5, help="accounts the clients are spread over"
    )
    parser.add_argument(
        "--setups",
        default=",".join(SETUPS),
        help=f"comma-separated, first is the base of the ratios: {', '.join(SETUPS)}",
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of every setup")
    parser.add_argument(
        "--timeout", type=float, default=180, help="seconds one setup may take"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=20,
        help="seconds to wait for deliveries after the last post",
    )
    parser.add_argument("--json", type=Path, help="also write every round here")
    args = parser.parse_args(argv)
    args.setup_list = [name.strip() for name in args.setups.split(",") if name.strip()]
    unknown = [name for name in args.setup_list if name not in SETUPS]
    if unknown:
        parser.error(f"unknown setups {unknown}; choose from {', '.join(SETUPS)}")
    if args.clients < 1 or args.messages < 1 or args.users < 1 or args.window < 1:
        parser.error("--clients, --messages, --users and --window must be positive")
    return args


async def run_all(args: argparse.Namespace, shared: Shared) -> list[dict]:
    results = []
    for round_number in range(1, args.rounds + 1):
        # Interleaved, so that a noisy minute spreads over every setup.
        for name in args.setup_list:
            result = await run_setup(name, args, shared)
            result["round"] = round_number
            results.append(result)
            if "failed" in result:
                print(
                    f"round {round_number} {name}: {result['failed']}", file=sys.stderr
                )
            else:
                print(
                    f"round {round_number} {name}: "
                    f"{result['deliveries_per_s']:.0f} deliveries/s, "
                    f"p99 {result['p99_ms']:.1f} ms, lost {result['lost']}, "
                    f"duplicates {result['duplicates']}, "
                    f"error frames {result['errors']}, "
                    f"closed sockets {result['closed']}"
                    + (", SENDER STALLED" if result["sender_stalled"] else ""),
                    file=sys.stderr,
                )
    return results


async def main_async(args: argparse.Namespace, shared: Shared) -> list[dict]:
    # SIGTERM ends the run like Ctrl-C does: through every cleanup step.
    task = asyncio.current_task()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run_all(args, shared)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    try:
        db_env = base_env(
            workdir / "db.sqlite3", secrets.token_urlsafe(50), args.clients
        )
        migrate(db_env)
        redis_child, redis_url = None, None
        if any(SETUPS[name][0] != "memory" for name in args.setup_list):
            redis_child, redis_url = start_redis(workdir)
        shared = Shared(workdir, db_env, redis_url, redis_child)
        results = asyncio.run(main_async(args, shared))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for child in reversed(CHILDREN[:]):
            child.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    rows = summarise(results, args.setup_list)
    mode = f"{args.rate:g} posts/s offered" if args.rate else f"window {args.window}"
    command = shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"command: python -m bench.fanout {command}")
    print(f"machine: {machine()}")
    print(
        f"{args.clients} clients in one room, {args.messages} posts measured "
        f"({mode}), median of {args.rounds} round(s); "
        f"ratios against {args.setup_list[0]}"
    )
    print()
    print(markdown_table(rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    lost = sum(row.get("lost", 0) + row.get("duplicates", 0) for row in rows)
    failed = any("failed" in row for row in rows) or any(
        result.get("sender_stalled") for result in results
    )
    if lost or failed:
        print(
            "\nSOME DELIVERIES WERE LOST, DUPLICATED OR A SETUP FAILED", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
