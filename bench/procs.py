"""Processes the bench starts: redis-server and workers, on free loopback ports.

Every child is stopped by its own pid, on every exit path (see stop_all).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import redis

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30
STOP_TIMEOUT = 10
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LOOPBACK = "127.0.0.1"

# server name -> (argv after the interpreter, ASGI application)
SERVER_COMMANDS = {
    "ours": (["-m", "chatproject.server"], "chatproject.asgi:application"),
    "baseline": (["-m", "daphne"], "bench.baseline.asgi:application"),
}


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


def free_port() -> int:
    """Returns a TCP port that is free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


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


class Child:
    """A child process whose output goes to a file; stopped by its own pid."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path):
        self.name = name
        self.log_path = log
        # A file, not a pipe: nobody reads a pipe during the run, and a full
        # one would block the child.
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
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


def stop_all() -> None:
    for child in reversed(CHILDREN[:]):
        child.stop()


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
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (make system-packages)")
    port = free_port()
    data = workdir / "redis"
    data.mkdir(exist_ok=True)
    child = Child(
        "redis",
        [binary, "--port", str(port), "--bind", LOOPBACK, "--save", ""]
        + ["--appendonly", "no", "--dir", str(data), "--maxclients", "10000"],
        dict(os.environ),
        workdir / "redis.log",
    )
    url = f"redis://{LOOPBACK}:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            try:
                client.ping()
                return child, url
            except redis.ConnectionError:
                if not child.alive() or time.monotonic() > deadline:
                    child.stop()
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
            "CHAT_DRAIN_SECONDS": "1",
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
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"migrate failed:\n{result.stdout}{result.stderr}")


def start_workers(
    server: str, count: int, env: dict[str, str], workdir: Path, tag: str
) -> list[tuple[Child, int]]:
    """Starts `count` workers of `server` at once; returns (child, port) when all answer."""
    module_argv, app = SERVER_COMMANDS[server]
    started: list[tuple[Child, int]] = []
    for number in range(count):
        port = free_port()
        child = Child(
            f"{server} worker {number}",
            [sys.executable, *module_argv, "-b", LOOPBACK, "-p", str(port), app],
            env,
            workdir / f"{tag}-worker{number}.log",
        )
        started.append((child, port))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + START_TIMEOUT
    for child, port in started:
        while True:
            if not child.alive():
                for other, _ in started:
                    other.stop()
                raise RuntimeError(f"{child.name} exited at start:\n{child.output()}")
            try:
                opener.open(f"http://{LOOPBACK}:{port}/healthz", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # any HTTP answer: the server is up (the baseline has no /healthz)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                output = child.output()
                for other, _ in started:
                    other.stop()
                raise RuntimeError(f"{child.name} did not answer:\n{output}")
            time.sleep(0.05)
    return started


def metric_sum(port: int, name: str) -> float | None:
    """Returns the sum of a Prometheus metric's samples on a worker, None if absent."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{LOOPBACK}:{port}/metrics", timeout=2) as response:
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            try:
                total += float(line.rsplit(" ", 1)[1])
                found = True
            except ValueError:
                pass
    return total if found else None
