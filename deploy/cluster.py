"""A whole chat cluster on loopback, from the files in deploy/: redis-server, a
throwaway PostgreSQL, N workers (`python -m chatproject.server --proxy-headers`)
and nginx in front of them. `bin/cluster` runs one until Ctrl-C; the cluster
tests start one with `Cluster(...).start()`.

Standard library only (the processes are harness.processes'): it drives
processes, it does not import the project.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from harness.processes import (
    LAUNCHER,
    REPO_ROOT,
    Child,
    Daphne,
    HarnessError,
    Nginx,
    PostgresServer,
    RedisSentinel,
    RedisServer,
    free_port,
    http_get,
    manage,
    port_is_free,
    start_all,
)

NGINX_TEMPLATE = REPO_ROOT / "deploy" / "nginx.conf"

# CHAT_DRAIN_SECONDS unless set: workers get a few seconds more before SIGKILL.
DRAIN_SECONDS = 10
# How long nginx leaves a worker alone after a refused connection. Short: a
# refused connect costs nothing, and a restarted worker is back in use at once.
UPSTREAM_OPTIONS = "max_fails=1 fail_timeout=2s"
# Django settings of the cluster that the caller's environment must not change.
CLUSTER_VARIABLES = (
    "DATABASE_URL",
    "REDIS_URL",
    "REDIS_SENTINELS",
    "REDIS_SENTINEL_MASTER",
    "DJANGO_TEST_SQLITE",
)
# The name the sentinels know the primary by (REDIS_SENTINEL_MASTER).
SENTINEL_MASTER = "chat"
SENTINELS = 3


class ClusterError(HarnessError):
    """A part of the cluster did not start; the message carries its log."""


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
# Workers and nginx as deployed
# ---------------------------------------------------------------------------


class Worker(Daphne):
    """One worker: `python -m chatproject.server --proxy-headers` on its own port.

    --proxy-headers: the client address and scheme come from nginx's
    X-Forwarded-For / X-Forwarded-Proto (nginx overwrites them). In a process
    group of its own: Ctrl-C in the terminal reaches bin/cluster alone, which
    then stops everything in order (workers first, so they can drain).
    """

    def __init__(
        self,
        port: int,
        env: Mapping[str, str],
        log_dir: Path,
        command: Sequence[str] = LAUNCHER,
    ) -> None:
        super().__init__(
            log_dir / f"worker-{port}.log",
            env=env,
            port=port,
            command=command,
            options=["--proxy-headers"],
            group=True,
        )
        # chat.presence.WORKER_ID of the running process, read from /healthz.
        self.id: str | None = None

    def launch(self) -> None:
        self.id = None
        super().launch()

    def ready(self) -> bool:
        """True once /healthz answers (it needs neither the database nor Redis)."""
        try:
            status, body = http_get(f"{self.base_url}/healthz", timeout=1)
        except OSError:
            return False
        if status != 200:
            return False
        self.id = json.loads(body)["worker"]
        return True


def nginx_config(
    prefix: Path,
    *,
    listen: str,
    upstreams: Iterable[int],
    static_root: Path,
    idle_timeout: str | None = None,
) -> str:
    """Returns deploy/nginx.conf filled in for nginx under `prefix`.

    `idle_timeout` (an nginx time, e.g. "3s") replaces the hour a proxied
    socket may be quiet (proxy_read_timeout and proxy_send_timeout).
    """
    servers = [f"server 127.0.0.1:{port} {UPSTREAM_OPTIONS};" for port in upstreams]
    config = render_template(
        NGINX_TEMPLATE.read_text(),
        {
            "PREFIX": str(prefix),
            "LISTEN": listen,
            "UPSTREAM_SERVERS": "\n        ".join(servers),
            "STATIC_ROOT": str(static_root),
        },
    )
    if idle_timeout is None:
        return config
    config, replaced = re.subn(
        r"^(\s*proxy_(?:read|send)_timeout) 1h;$",
        rf"\1 {idle_timeout};",
        config,
        flags=re.MULTILINE,
    )
    if replaced != 2:
        raise ClusterError("deploy/nginx.conf no longer sets the two proxy timeouts")
    return config


# ---------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------


class Cluster:
    """Redis, PostgreSQL, N workers and nginx on loopback; stop() removes it all.

    `port` is nginx's (0: a free one); `worker_ports` default to free ports.
    `env` is added to the workers' environment (e.g. CHAT_WORKER_LEASE_SECONDS).
    `worker_command` runs the workers: the launcher, or harness.processes'
    PLAIN_DAPHNE (`daphne chatproject.asgi:application` as the Channels guides
    show it). With `sentinel`, Redis is a primary (redis[0]) and a replica
    (redis[1]) watched by three sentinels, and the workers find the primary
    through them (REDIS_SENTINELS) instead of REDIS_URL.
    """

    def __init__(
        self,
        *,
        workers: int = 3,
        host: str = "127.0.0.1",
        port: int = 0,
        worker_ports: Sequence[int] | None = None,
        redis_servers: int = 1,
        sentinel: bool = False,
        env: Mapping[str, str] | None = None,
        worker_command: Sequence[str] = LAUNCHER,
    ) -> None:
        if sentinel and redis_servers != 1:
            raise ClusterError("a Sentinel cluster has one primary (and its replica)")
        self.worker_command = list(worker_command)
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
            RedisServer(self.workdir / f"redis-{index}", group=True)
            for index in range(redis_servers)
        ]
        self.sentinels: list[RedisSentinel] = []
        if sentinel:
            primary = self.redis[0]
            self.redis.append(
                RedisServer(
                    self.workdir / "redis-replica",
                    options=["--replicaof", "127.0.0.1", str(primary.port)],
                    group=True,
                )
            )
            self.sentinels = [
                RedisSentinel(
                    self.workdir / f"sentinel-{index}",
                    primary.port,
                    master_name=SENTINEL_MASTER,
                    group=True,
                )
                for index in range(SENTINELS)
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
        """The layer's Redis: the primary as Sentinel now names it, or every
        server (the channel layer shards its groups across several)."""
        if self.sentinels:
            primary = self.redis_primary()
            if primary is None:
                raise ClusterError("the sentinels do not agree on a primary")
            return f"redis://{primary}/0"
        return ",".join(server.url for server in self.redis)

    @property
    def sentinel_addresses(self) -> str:
        return ",".join(sentinel.address for sentinel in self.sentinels)

    def redis_primary(self) -> str | None:
        """Returns "host:port" of the primary every sentinel names, else None
        (during a failover they may disagree, or not answer)."""
        answers = {sentinel.primary() for sentinel in self.sentinels}
        if len(answers) != 1 or None in answers:
            return None
        host, port = answers.pop()
        return f"{host}:{port}"

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
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.sentinels:
            env["REDIS_SENTINELS"] = self.sentinel_addresses
            env["REDIS_SENTINEL_MASTER"] = SENTINEL_MASTER
        else:
            env["REDIS_URL"] = self.redis_url
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
            start_all(self.sentinels)
            for sentinel in self.sentinels:
                sentinel.wait_ready(
                    check=lambda s=sentinel: s.knows_everyone(1, SENTINELS - 1)
                )
            self.postgres.start()
            self.env = self.worker_env()
            self.manage("migrate", "--noinput", "-v0")
            self.manage("collectstatic", "--noinput", "-v0")
            self.workers = [
                Worker(port, self.env, self.log_dir, self.worker_command)
                for port in self.worker_ports
            ]
            start_all(self.workers)
            prefix = self.workdir / "nginx"
            listen = f"{self.host}:{self.port}"
            self.nginx = Nginx(
                prefix,
                config=nginx_config(
                    prefix,
                    listen=listen,
                    upstreams=self.worker_ports,
                    static_root=self.static_root,
                ),
                listen=listen,
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
        for sentinel in self.sentinels:
            sentinel.stop()
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
        env = self.env or self.worker_env()
        return manage(*args, env=env, input=input, timeout=timeout)

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
        worker = Worker(old.port, self.env, self.log_dir, self.worker_command)
        self.workers[index] = worker
        worker.start()
        return worker

    def start_worker(self, env: Mapping[str, str] | None = None) -> Worker:
        """Starts one more worker on a free port, outside nginx; waits for /healthz."""
        worker = Worker(
            free_port(),
            {**self.env, **(env or {})},
            self.log_dir,
            self.worker_command,
        )
        self.extra_workers.append(worker)
        worker.start()
        return worker

    def logs(self) -> dict[str, str]:
        """Returns the end of each process's log, for a failure report."""
        processes: list[Child] = [
            *self.workers,
            *self.extra_workers,
            *self.redis,
            *self.sentinels,
        ]
        if self.nginx is not None:
            processes.append(self.nginx)
        logs = {
            f"{p.name} ({p.log_path.parent.name}/{p.log_path.name})": p.output(4000)
            for p in processes
        }
        logs["postgres"] = self.postgres.output(4000)
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
    parser.add_argument(
        "--sentinel",
        action="store_true",
        help="Redis as a primary, a replica and three sentinels (redis-sentinel)",
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
        sentinel=args.sentinel,
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
    except HarnessError as error:
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
  redis:    {redis_line(cluster)}
  database: {cluster.database_url}
  nginx:    {cluster.nginx.conf}
  logs:     {cluster.log_dir}, {cluster.nginx.prefix / "logs"}

Make an admin user, then see in {cluster.url}/admin/ which worker holds each socket:
  DATABASE_URL={cluster.database_url} {python} manage.py createsuperuser

Ctrl-C stops everything (and throws the database away).
"""


def redis_line(cluster: Cluster) -> str:
    if not cluster.sentinels:
        return cluster.redis_url
    return (
        f"primary {cluster.redis_url}, replica {cluster.redis[1].url}, "
        f"sentinels {cluster.sentinel_addresses} "
        f"(REDIS_SENTINEL_MASTER={SENTINEL_MASTER})"
    )


def watch(cluster: Cluster) -> None:
    """Waits for Ctrl-C, saying once when a process of the cluster dies."""
    reported: set[int] = set()
    while True:
        time.sleep(1)
        processes: list[Child] = [*cluster.workers, *cluster.redis, *cluster.sentinels]
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
