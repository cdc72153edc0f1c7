"""Processes the bench starts: redis-server and workers on free loopback ports
(harness.processes), and what it reads of them: CPU time, memory, metrics.

Every child is stopped by its own pid, on every exit path (see stop_all).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from pathlib import Path

import redis

# LOOPBACK, REPO_ROOT and Child: the suite uses them through this module.
from harness.processes import (  # noqa: F401
    APPLICATION,
    LAUNCHER,
    LOOPBACK,
    PLAIN_DAPHNE,
    REPO_ROOT,
    Child,
    Children,
    Daphne,
    HarnessError,
    RedisServer,
    http_get,
    manage,
    start_all,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# server name -> (the program in front of daphne's arguments, ASGI application)
SERVER_COMMANDS = {
    "ours": (LAUNCHER, APPLICATION),
    "baseline": (PLAIN_DAPHNE, "bench.baseline.asgi:application"),
}

# Every child still running, so that any exit path stops them all.
CHILDREN = Children()


def raise_nofile_limit() -> int:
    """Raises RLIMIT_NOFILE to the hard limit (root: higher); returns the soft limit.

    Children (workers, client processes) inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(hard, 65536) if hard != resource.RLIM_INFINITY else hard
    for limit in (want, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return limit
        except (ValueError, OSError):
            continue
    return soft


def cpu_seconds(pid: int) -> float:
    """Returns the user + system CPU seconds a process has used so far (0 if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name (field 2) may hold spaces: split after its ")".
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15; fields[0] is field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    """Returns a process's resident memory in KiB (0 if gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def stop_all() -> None:
    CHILDREN.stop_all()


def redis_version() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        return "not installed"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip()


def start_redis(workdir: Path) -> tuple[Child, str]:
    """Starts a redis-server with no persistence; returns it and its URL."""
    try:
        server = RedisServer(
            workdir / "redis", options=["--maxclients", "10000"], registry=CHILDREN
        )
    except HarnessError as error:  # not installed
        raise SystemExit(str(error)) from None
    server.start()
    return server, server.url


def flush_redis(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushall()
    finally:
        client.close()


def worker_env(db_path: Path, secret_key: str) -> dict[str, str]:
    """Returns a worker's environment: production settings, limits lifted."""
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
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            "DJANGO_LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
            # The senders post far faster than a person may.
            "CHAT_RATE_MESSAGES": "100000000",
            "CHAT_RATE_WINDOW_SECONDS": "1",
            "CHAT_MAX_CONNECTIONS_PER_USER": "1000000",
            # Every bench client connects from loopback.
            "CHAT_MAX_CONNECTIONS_PER_ADDRESS": "0",
            "CHAT_DRAIN_SECONDS": "1",
        }
    )
    return env


def migrate(env: dict[str, str]) -> None:
    manage("migrate", "--noinput", "-v0", env=env, timeout=300)


def start_workers(
    server: str, count: int, env: dict[str, str], workdir: Path, tag: str
) -> list[tuple[Child, int]]:
    """Starts `count` workers of `server` at once; returns (child, port) for each
    once all answer.

    Any HTTP answer on /healthz counts: the baseline has no such page.
    """
    command, application = SERVER_COMMANDS[server]
    workers = [
        Daphne(
            workdir / f"{tag}-worker{number}.log",
            env=env,
            command=command,
            application=application,
            name=f"{server} worker {number}",
            registry=CHILDREN,
        )
        for number in range(count)
    ]
    start_all(workers)
    return [(worker, worker.port) for worker in workers]


def metric_sum(port: int, name: str) -> float | None:
    """Returns the sum of a Prometheus metric's samples on a worker, None if absent."""
    try:
        status, body = http_get(f"http://{LOOPBACK}:{port}/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    total, found = 0.0, False
    for line in body.decode("utf-8", "replace").splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            try:
                total += float(line.rsplit(" ", 1)[1])
                found = True
            except ValueError:
                pass
    return total if found else None
