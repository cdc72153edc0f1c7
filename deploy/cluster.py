"""A whole chat cluster on loopback, from the files in deploy/: redis-server, a
throwaway PostgreSQL, N workers (`python -m chatproject.server --proxy-headers`)
and nginx in front of them. `bin/cluster` runs one until Ctrl-C; the cluster
tests start one with `Cluster(...).start()`.

Standard library only: it drives processes, it does not import the project.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NGINX_TEMPLATE = REPO_ROOT / "deploy" / "nginx.conf"

START_TIMEOUT = 30
STOP_TIMEOUT = 10
# CHAT_DRAIN_SECONDS unless set: workers get a few seconds more before SIGKILL.
DRAIN_SECONDS = 10
# How long nginx leaves a worker alone after a refused connection. Short: a
# refused connect costs nothing, and a restarted worker is back in use at once.
UPSTREAM_OPTIONS = "max_fails=1 fail_timeout=2s"
# Django settings of the cluster that the caller's environment must not change.
CLUSTER_VARIABLES = ("DATABASE_URL", "REDIS_URL", "DJANGO_TEST_SQLITE")


class ClusterError(RuntimeError):
    """A part of the cluster did not start; the message carries its log."""


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """Returns a TCP port that is free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """True when a server could listen on host:port (as they do, with SO_REUSEADDR)."""
    with socket.socket() as sock:
        # Without it, connections of a server that just stopped (TIME_WAIT) count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def find_binary(name: str) -> str:
    """Returns the path of a system program; sbin is often not in a user's PATH."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        candidate = Path(folder) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise ClusterError(f"{name} is not installed (`make system-packages` installs it)")


def log_tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except FileNotFoundError:
        return ""


def wait_until(
    check: Callable[[], bool],
    *,
    what: str,
    timeout: float = START_TIMEOUT,
    alive: Callable[[], bool] | None = None,
    log: Path | None = None,
) -> None:
    """Polls `check` until it is true; fails with the log when the process dies."""
    deadline = time.monotonic() + timeout
    while not check():
        if alive is not None and not alive():
            raise ClusterError(f"{what} exited before it answered:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise ClusterError(
                f"{what} did not answer within {timeout} s:\n{log_tail(log)}"
            )
        time.sleep(0.05)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Returns (status, body), errors included; raises OSError when nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def render_template(template: str, values: Mapping[str, str]) -> str:
    """Fills in the @NAME@ placeholders; every one of them must be given."""
    text = template
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    left = sorted(set(re.findall(r"@[A-Z_]+@", code)))
    if left:
        raise ClusterError(f"placeholders left unfilled: {', '.join(left)}")
    return text


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


class Process:
    """A child process writing to a log file, stopped by its own pid."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def spawn(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                list(args),
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Ctrl-C in the terminal reaches bin/cluster alone, which then
                # stops everything in order (workers first, so they can drain).
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        """Returns the end of what the process wrote."""
        return log_tail(self.log_path)

    def send_signal(self, signum: int) -> None:
        if self.alive():
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Waits for the process to exit; returns its status (-N: killed by N)."""
        return self.process.wait(timeout=timeout)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
        """Sends `signum`, waits up to `timeout` seconds, then kills."""
        self.send_signal(signum)
        self.wait_or_kill(timeout)

    def wait_or_kill(self, timeout: float) -> None:
        if not self.alive():
            return
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class RedisServer(Process):
    """A redis-server on a free loopback port, without persistence."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__("redis-server", folder / "redis.log")
        self.folder = folder
        self.binary = find_binary("redis-server")
        self.port = port or free_port()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Starts the server (again on the same port after stop(): a restart)."""
        self.spawn(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.folder),
            ]
        )  # fmt: skip
        wait_until(self.ping, what=self.name, alive=self.alive, log=self.log_path)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class PostgresServer:
    """A throwaway PostgreSQL server in `folder`, on a free loopback port.

    PostgreSQL refuses to run as root, so as root every step runs as the
    `postgres` user (runuser). A server on 5432 is neither used nor touched.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.log_path = folder / "server.log"
        self.port = free_port()
        self.bindir = self.find_bindir()
        self.started = False

    @staticmethod
    def find_bindir() -> Path:
        """Returns the bin folder of the newest installed PostgreSQL server."""
        versions = sorted(
            Path("/usr/lib/postgresql").glob("*/bin/initdb"),
            key=lambda path: (
                int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0
            ),
        )
        if versions:
            return versions[-1].parent
        found = shutil.which("initdb")
        if found:
            return Path(found).parent
        raise ClusterError(
            "PostgreSQL server not installed (no initdb); "
            "install it with: apt-get install -y postgresql"
        )

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/chat"

    def run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        # From / : the caller's folder may be closed to the postgres user.
        result = subprocess.run(
            command,
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            start_new_session=True,
        )
        if result.returncode != 0:
            raise ClusterError(
                f"{program} failed ({result.returncode}):\n{result.stdout}"
                f"{result.stderr}{log_tail(self.log_path)}"
            )

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        # Explicit UTF8: with no locale in the environment initdb picks SQL_ASCII.
        self.run(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8", "--locale=C.UTF-8",
        )  # fmt: skip
        # Durability is pointless here; -k keeps the socket out of /run/postgresql.
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self.started = True
        self.run(
            "pg_ctl", "start", "-w", "-s", "-D", str(self.data),
            "-l", str(self.log_path), "-o", options,
        )  # fmt: skip
        self.run(
            "createdb",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "chat",
        )

    def stop(self) -> None:
        if self.started:
            self.started = False
            try:
                self.run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-s")
            except (ClusterError, subprocess.TimeoutExpired):
                pass


class Worker(Process):
    """One worker: `python -m chatproject.server --proxy-headers` on its own port."""

    def __init__(self, port: int, env: Mapping[str, str], log_dir: Path) -> None:
        super().__init__(f"worker :{port}", log_dir / f"worker-{port}.log")
        self.port = port
        self.env = dict(env)
        # chat.presence.WORKER_ID of the running process, read from /healthz.
        self.id: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # --proxy-headers: the client address and scheme come from nginx's
        # X-Forwarded-For / X-Forwarded-Proto (nginx overwrites them).
        return [
            sys.executable, "-m", "chatproject.server", "--proxy-headers",
            "-b", "127.0.0.1", "-p", str(self.port), "chatproject.asgi:application",
        ]  # fmt: skip

    def spawn_worker(self) -> None:
        self.id = None
        self.spawn(self.command(), env=self.env, cwd=REPO_ROOT)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        wait_until(
            self.answers,
            what=self.name,
            timeout=timeout,
            alive=self.alive,
            log=self.log_path,
        )

    def start(self) -> None:
        self.spawn_worker()
        self.wait_ready()

    def answers(self) -> bool:
        """True once /healthz answers (it needs neither the database nor Redis)."""
        try:
            status, body = http_get(f"{self.base_url}/healthz", timeout=1)
        except OSError:
            return False
        if status != 200:
            return False
        self.id = json.loads(body)["worker"]
        return True


class Nginx(Process):
    """nginx from deploy/nginx.conf, unprivileged, everything under `prefix`."""

    def __init__(
        self, prefix: Path, *, listen: str, upstreams: Iterable[int], static_root: Path
    ) -> None:
        prefix.mkdir(parents=True, exist_ok=True)
        (prefix / "logs").mkdir(exist_ok=True)
        (prefix / "temp").mkdir(exist_ok=True)
        super().__init__("nginx", prefix / "logs" / "error.log")
        self.prefix = prefix
        self.conf = prefix / "nginx.conf"
        self.binary = find_binary("nginx")
        self.listen = listen
        servers = [f"server 127.0.0.1:{port} {UPSTREAM_OPTIONS};" for port in upstreams]
        self.conf.write_text(
            render_template(
                NGINX_TEMPLATE.read_text(),
                {
                    "PREFIX": str(prefix),
                    "LISTEN": listen,
                    "UPSTREAM_SERVERS": "\n        ".join(servers),
                    "STATIC_ROOT": str(static_root),
                },
            )
        )

    def command(self, *extra: str) -> list[str]:
        # -e: the log of startup errors, before the config names its own.
        return [
            self.binary, "-p", str(self.prefix), "-e", str(self.log_path),
            "-c", str(self.conf), *extra,
        ]  # fmt: skip

    def start(self) -> None:
        check = subprocess.run(
            self.command("-t", "-q"), capture_output=True, text=True, timeout=30
        )
        if check.returncode != 0:
            raise ClusterError(
                f"nginx rejected {self.conf}:\n{check.stderr}{log_tail(self.log_path)}"
            )
        self.spawn(self.command())
        host, port = self.listen.rsplit(":", 1)
        host = "127.0.0.1" if host in ("0.0.0.0", "*") else host
        wait_until(
            lambda: not port_is_free_to_connect(host, int(port)),
            what=self.name,
            alive=self.alive,
            log=self.log_path,
        )


def port_is_free_to_connect(host: str, port: int) -> bool:
    """True while nothing accepts connections on host:port."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return True
    return False


# ---------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------


class Cluster:
    """Redis, PostgreSQL, N workers and nginx on loopback; stop() removes it all.

    `port` is nginx's (0: a free one); `worker_ports` default to free ports.
    `env` is added to the workers' environment (e.g. CHAT_WORKER_LEASE_SECONDS).
    """

    def __init__(
        self,
        *,
        workers: int = 3,
        host: str = "127.0.0.1",
        port: int = 0,
        worker_ports: Sequence[int] | None = None,
        redis_servers: int = 1,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="chat-cluster-"))
        # nginx's worker processes run as `nobody` when started by root; they
        # read the static files and write their temp files under here.
        self.workdir.chmod(0o755)
        self.log_dir = self.workdir / "logs"
        self.log_dir.mkdir()
        self.static_root = self.workdir / "static"
        self.host = host
        self.port = port or free_port(host)
        self.worker_ports = list(worker_ports or [free_port() for _ in range(workers)])
        self.extra_env = dict(env or {})
        self.redis = [
            RedisServer(self.workdir / f"redis-{index}")
            for index in range(redis_servers)
        ]
        self.postgres = PostgresServer(self.workdir / "postgres")
        self.workers: list[Worker] = []
        # Workers started by start_worker(): not behind nginx.
        self.extra_workers: list[Worker] = []
        self.nginx: Nginx | None = None
        self.env: dict[str, str] = {}

    # -- addresses ----------------------------------------------------------

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[len("http") :]

    @property
    def redis_url(self) -> str:
        # Several servers: the channel layer shards its groups across them.
        return ",".join(server.url for server in self.redis)

    @property
    def database_url(self) -> str:
        return self.postgres.url

    # -- start and stop ----------------------------------------------------

    def worker_env(self) -> dict[str, str]:
        """Returns the environment of every worker and management command."""
        env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARIABLES}
        hosts = ["127.0.0.1", "localhost", "[::1]"]
        hosts += [h for h in env.get("DJANGO_ALLOWED_HOSTS", "").split(",") if h]
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "chatproject.settings",
                "DJANGO_DEBUG": "0",
                "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
                "DJANGO_ALLOWED_HOSTS": ",".join(dict.fromkeys(hosts)),
                "DJANGO_STATIC_ROOT": str(self.static_root),
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.setdefault("CHAT_DRAIN_SECONDS", str(DRAIN_SECONDS))
        env.update(self.extra_env)
        return env

    def drain_seconds(self) -> float:
        return float((self.env or self.worker_env())["CHAT_DRAIN_SECONDS"])

    def start(self) -> Cluster:
        """Starts everything and waits until nginx answers; on failure stops it all."""
        try:
            wanted = [(self.host, self.port)]
            wanted += [("127.0.0.1", port) for port in self.worker_ports]
            busy = [str(port) for host, port in wanted if not port_is_free(host, port)]
            if busy:
                raise ClusterError(f"port(s) already in use: {', '.join(busy)}")
            for server in self.redis:
                server.start()
            self.postgres.start()
            self.env = self.worker_env()
            self.manage("migrate", "--noinput", "-v0")
            self.manage("collectstatic", "--noinput", "-v0")
            self.workers = [
                Worker(port, self.env, self.log_dir) for port in self.worker_ports
            ]
            # Started together, then awaited: each takes a second or two to import.
            for worker in self.workers:
                worker.spawn_worker()
            for worker in self.workers:
                worker.wait_ready()
            self.nginx = Nginx(
                self.workdir / "nginx",
                listen=f"{self.host}:{self.port}",
                upstreams=self.worker_ports,
                static_root=self.static_root,
            )
            self.nginx.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stops what was started: the workers first (they drain), then the rest."""
        workers = [*self.workers, *self.extra_workers]
        # Once each: a second SIGTERM tells a worker to stop without draining.
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait_or_kill(self.drain_seconds() + 5)
        if self.nginx is not None:
            # SIGTERM is nginx's fast shutdown; SIGQUIT would wait for every socket.
            self.nginx.stop(signal.SIGTERM)
        for server in self.redis:
            server.stop()
        self.postgres.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- operations ----------------------------------------------------------

    def manage(
        self, *args: str, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        """Runs `manage.py ARGS` against the cluster's database; fails loudly."""
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=REPO_ROOT,
            env=self.env or self.worker_env(),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise ClusterError(
                f"manage.py {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def kill_worker(self, index: int, signum: int = signal.SIGKILL) -> int:
        """Signals worker `index` and waits for it to exit; returns its status."""
        worker = self.workers[index]
        worker.send_signal(signum)
        return worker.wait(self.drain_seconds() + 5)

    def restart_worker(self, index: int) -> Worker:
        """Starts worker `index` again on its port, once the old process is gone."""
        old = self.workers[index]
        if old.alive():
            raise ClusterError(f"{old.name} is still running")
        worker = Worker(old.port, self.env, self.log_dir)
        self.workers[index] = worker
        worker.start()
        return worker

    def start_worker(self, env: Mapping[str, str] | None = None) -> Worker:
        """Starts one more worker on a free port, outside nginx; waits for /healthz."""
        worker = Worker(free_port(), {**self.env, **(env or {})}, self.log_dir)
        self.extra_workers.append(worker)
        worker.start()
        return worker

    def logs(self) -> dict[str, str]:
        """Returns the end of each process's log, for a failure report."""
        processes: list[Process] = [*self.workers, *self.extra_workers, *self.redis]
        if self.nginx is not None:
            processes.append(self.nginx)
        logs = {f"{p.name} ({p.log_path.name})": p.output() for p in processes}
        logs["postgres"] = log_tail(self.postgres.log_path)
        return logs


# ---------------------------------------------------------------------------
# bin/cluster
# ---------------------------------------------------------------------------


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="Run the chat as a local cluster: nginx in front of N workers, "
        "Redis and a throwaway PostgreSQL. Ctrl-C stops everything."
    )
    parser.add_argument("--workers", type=int, default=3, help="worker processes (3)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="nginx's address (127.0.0.1)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=8000,
        help="nginx's port (8000); workers use the next ones",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")

    # Also when started in the background, where SIGINT comes in ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    cluster = Cluster(
        workers=args.workers,
        host=args.host,
        port=args.port,
        worker_ports=range(args.port + 1, args.port + 1 + args.workers),
    )
    try:
        print(
            f"starting Redis, PostgreSQL, {args.workers} worker(s) and nginx ...",
            flush=True,
        )
        cluster.start()
        print(banner(cluster), flush=True)
        watch(cluster)
    except KeyboardInterrupt:
        pass
    except ClusterError as error:
        print(f"cluster: {error}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not leave half the cluster running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(
            "\nstopping: workers first (they close their sockets with 1001) ...",
            flush=True,
        )
        cluster.stop()
        print("stopped.", flush=True)
    return 0


def banner(cluster: Cluster) -> str:
    workers = "\n".join(
        f"    {w.base_url}  (/healthz /readyz /metrics)  log {w.log_path}"
        for w in cluster.workers
    )
    python = os.path.relpath(sys.executable, REPO_ROOT)
    return f"""
The chat: {cluster.url}/  (nginx -> {len(cluster.workers)} worker(s), Redis, PostgreSQL)

  workers:
{workers}
  redis:    {cluster.redis_url}
  database: {cluster.database_url}
  nginx:    {cluster.nginx.conf}
  logs:     {cluster.log_dir}, {cluster.nginx.prefix / "logs"}

Make an admin user, then see in {cluster.url}/admin/ which worker holds each socket:
  DATABASE_URL={cluster.database_url} {python} manage.py createsuperuser

Ctrl-C stops everything (and throws the database away).
"""


def watch(cluster: Cluster) -> None:
    """Waits for Ctrl-C, saying once when a process of the cluster dies."""
    reported: set[int] = set()
    while True:
        time.sleep(1)
        processes: list[Process] = [*cluster.workers, *cluster.redis]
        if cluster.nginx is not None:
            processes.append(cluster.nginx)
        for process in processes:
            if not process.alive() and id(process) not in reported:
                reported.add(id(process))
                print(
                    f"{process.name} exited ({process.process.returncode}); "
                    f"see {process.log_path}",
                    file=sys.stderr,
                    flush=True,
                )


if __name__ == "__main__":
    sys.exit(main())
