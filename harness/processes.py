"""Real processes on loopback: free ports, a log file per child, a bounded wait
until a child is ready (which shows its log when it is not), stop by pid.

Standard library only: bin/with-postgres runs it under the system python3, and
it drives the project's processes without importing the project.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

START_TIMEOUT = 30
# SIGTERM, then this long before SIGKILL.
STOP_TIMEOUT = 10
# How much of a child's log an error or a failure report shows: the end, where
# the traceback is.
LOG_TAIL = 8000
POLL_SECONDS = 0.05

# The worker launcher: daphne plus the drain on SIGTERM and the server close codes.
LAUNCHER = (sys.executable, "-m", "chatproject.server")
# daphne as it comes, without the launcher: what the application must survive too.
PLAIN_DAPHNE = (sys.executable, "-m", "daphne")
APPLICATION = "chatproject.asgi:application"


class HarnessError(RuntimeError):
    """A program is missing or a child did not start; the message says why,
    with the end of the child's log."""


# ---------------------------------------------------------------------------
# Ports, programs, probes
# ---------------------------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """Returns a TCP port that is free on `host` right now.

    Another process may take it before the child binds it: a race that
    loopback test machines accept.
    """
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


def accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Returns (status, body), errors included; raises OSError when nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def http_answers(url: str, timeout: float = 2.0) -> bool:
    """True when an HTTP server answers `url`, with any status: it is up."""
    try:
        http_get(url, timeout)
    except (OSError, http.client.HTTPException):
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
    raise HarnessError(f"{name} is not installed (`make system-packages` installs it)")


def log_tail(path: Path | None, limit: int | None = LOG_TAIL) -> str:
    """Returns the end of a log file ("" when there is none yet)."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text if limit is None else text[-limit:]


def manage(
    *args: str,
    env: Mapping[str, str],
    input: str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Runs `manage.py ARGS` with `env`; raises HarnessError with its output
    when it fails."""
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO_ROOT,
        env=dict(env),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise HarnessError(
            f"manage.py {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )
    return result


# ---------------------------------------------------------------------------
# A child process
# ---------------------------------------------------------------------------


class Children:
    """Children started and not stopped yet: every exit path can stop them all,
    and a failure report can show their logs."""

    def __init__(self) -> None:
        self._children: list[Child] = []

    def add(self, child: Child) -> None:
        if child not in self._children:
            self._children.append(child)

    def discard(self, child: Child) -> None:
        if child in self._children:
            self._children.remove(child)

    def __iter__(self) -> Iterator[Child]:
        return iter(list(self._children))

    def __len__(self) -> int:
        return len(self._children)

    def stop_all(self) -> None:
        """Stops every child, the last started first."""
        for child in reversed(list(self._children)):
            child.stop()


class Child:
    """A child process writing to a log file, stopped by its own pid.

    A kind of child says how it starts (`launch`) and when it is ready
    (`ready`); `start` does both. With `group` the child leads a process group
    of its own (a new session): a Ctrl-C in the terminal then reaches the
    parent alone, which stops its children in its own order, and SIGKILL takes
    the child's own children (nginx's workers) with it. `registry` keeps track
    of it while it runs.
    """

    def __init__(
        self,
        name: str,
        log_path: Path | None,
        *,
        group: bool = False,
        registry: Children | None = None,
    ) -> None:
        self.name = name
        self.log_path = Path(log_path) if log_path is not None else None
        self.group = group
        self.registry = registry
        self.process: subprocess.Popen | None = None

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> None:
        """Starts `argv` with its stdout and stderr appended to the log file."""
        assert self.log_path is not None, f"{self.name} has no log file"
        # A file, not a pipe: nobody reads a pipe while the child runs, and a
        # full one would block it.
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                list(argv),
                env=None if env is None else dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.group,
            )
        if self.registry is not None:
            self.registry.add(self)

    # -- what a kind of child defines ---------------------------------------

    def launch(self) -> None:
        """Called to start the process, without waiting for it."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Returns True once the child serves."""
        return True

    # -- start and wait -------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Launches the child and waits until it is ready (see wait_ready)."""
        self.launch()
        self.wait_ready(timeout)

    def wait_ready(
        self,
        timeout: float = START_TIMEOUT,
        *,
        check: Callable[[], bool] | None = None,
        since: float | None = None,
    ) -> None:
        """Polls `check` (default: ready) until it is true, for `timeout`
        seconds from `since` (default: now).

        When the child exits first, or the time runs out, stops it and raises
        HarnessError with the end of its log.
        """
        check = check or self.ready
        deadline = (time.monotonic() if since is None else since) + timeout
        while not check():
            if not self.alive():
                what = f"exited with {self.returncode} before it was ready"
            elif time.monotonic() > deadline:
                what = f"was not ready within {timeout:g} s"
            else:
                time.sleep(POLL_SECONDS)
                continue
            output = self.output()
            self.stop()
            raise HarnessError(f"{self.name} {what}:\n{output}")

    def __enter__(self) -> Child:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- state ----------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self, limit: int | None = LOG_TAIL) -> str:
        """Returns the end of what the child wrote (stdout and stderr together)."""
        return log_tail(self.log_path, limit)

    # -- signals and stop -----------------------------------------------------

    def send_signal(self, signum: int) -> None:
        """Sends `signum` to the child itself (not to its group)."""
        if self.alive():
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Waits for the child to exit; returns its status (-N: killed by N)."""
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL now, to the child's whole group when it leads one."""
        if not self.alive():
            return
        if self.group:
            # Alive, so its pid (and so its group id) is still ours.
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            self.process.kill()
        self.process.wait()

    def wait_or_kill(self, timeout: float) -> None:
        """Waits up to `timeout` seconds for the child to exit, then kills it."""
        if not self.alive():
            return
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
        """Sends `signum`, waits up to `timeout` seconds, then kills."""
        self.send_signal(signum)
        self.wait_or_kill(timeout)
        if self.registry is not None:
            self.registry.discard(self)


def start_all(children: Sequence[Child], timeout: float = START_TIMEOUT) -> None:
    """Launches every child, then waits until each is ready; on any failure
    stops them all.

    Workers take a second or two each to import: launched together they are
    ready about as soon as one would be.
    """
    since = time.monotonic()
    try:
        for child in children:
            child.launch()
        for child in children:
            child.wait_ready(timeout, since=since)
    except BaseException:
        for child in children:
            child.stop()
        raise


# ---------------------------------------------------------------------------
# The kinds of children
# ---------------------------------------------------------------------------


class RedisServer(Child):
    """A redis-server on a loopback port (a free one unless given), without
    persistence; `options` are added to its command line.

    Without a `folder`, each start gets a temporary one that stop() removes.
    start() after stop() is a restart on the same port.
    """

    def __init__(
        self,
        folder: Path | None = None,
        *,
        port: int | None = None,
        options: Sequence[str] = (),
        group: bool = False,
        registry: Children | None = None,
    ) -> None:
        self.folder = Path(folder) if folder is not None else None
        log_path = self.folder / "redis.log" if self.folder else None
        super().__init__("redis-server", log_path, group=group, registry=registry)
        self.binary = find_binary("redis-server")
        self.port = port or free_port()
        self.options = list(options)
        self._temporary: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def launch(self) -> None:
        folder = self.folder
        if folder is None:
            folder = self._temporary = Path(tempfile.mkdtemp(prefix="chat-redis-"))
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "redis.log"
        self.spawn(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", LOOPBACK,
                "--save", "",
                "--appendonly", "no",
                "--dir", str(folder),
                *self.options,
            ]
        )  # fmt: skip

    def ready(self) -> bool:
        return self.ping()

    def ping(self) -> bool:
        """True when the server answers PING."""
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
        super().stop(signum, timeout)
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None


class RedisSentinel(Child):
    """A redis-sentinel (Debian's redis-sentinel) on a loopback port, watching
    the primary at `primary_port` under the name `master_name`.

    Quick to judge, for tests and `make cluster --sentinel`: a primary that
    does not answer for `down_after_ms` is down once `quorum` sentinels agree,
    and they promote a replica. Sentinel rewrites its config file as it learns
    the replicas and the other sentinels, so a restart keeps what it knew.
    """

    def __init__(
        self,
        folder: Path,
        primary_port: int,
        *,
        master_name: str,
        port: int | None = None,
        quorum: int = 2,
        down_after_ms: int = 2000,
        group: bool = False,
        registry: Children | None = None,
    ) -> None:
        self.folder = Path(folder)
        super().__init__(
            "redis-sentinel",
            self.folder / "sentinel.log",
            group=group,
            registry=registry,
        )
        self.binary = find_binary("redis-sentinel")
        self.port = port or free_port()
        self.primary_port = primary_port
        self.master_name = master_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def launch(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "sentinel.conf"
        if not config.exists():
            name, primary = self.master_name, f"{LOOPBACK} {self.primary_port}"
            config.write_text(
                f"port {self.port}\n"
                f"bind {LOOPBACK}\n"
                f"dir {self.folder}\n"
                f"sentinel monitor {name} {primary} {self.quorum}\n"
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
                # A failover that stalls is tried again after twice this.
                f"sentinel failover-timeout {name} 10000\n"
                f"sentinel parallel-syncs {name} 1\n"
            )
        self.spawn([self.binary, str(config)])

    def ready(self) -> bool:
        return self.primary() is not None

    def primary(self) -> tuple[str, int] | None:
        """Returns the address this sentinel gives for the primary, or None."""
        reply = self.ask("get-master-addr-by-name", self.master_name)
        if not isinstance(reply, list) or len(reply) != 2:
            return None
        return reply[0], int(reply[1])

    def knows_everyone(self, replicas: int, sentinels: int) -> bool:
        """True once it has found `replicas` replicas and `sentinels` other
        sentinels: before that, a primary killed would not be failed over."""
        reply = self.ask("master", self.master_name)
        if not isinstance(reply, list):
            return False
        fields = dict(zip(reply[::2], reply[1::2], strict=False))
        return (fields.get("num-slaves"), fields.get("num-other-sentinels")) == (
            str(replicas),
            str(sentinels),
        )

    def ask(self, *args: str) -> Any:
        """Sends `SENTINEL args` and returns the reply (lists and strings), or
        None when it does not answer."""
        words = [b"SENTINEL", *(arg.encode() for arg in args)]
        command = b"*%d\r\n" % len(words)
        command += b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1) as conn:
                conn.sendall(command)
                return _read_reply(conn.makefile("rb"))
        except (OSError, ValueError):
            return None


def _read_reply(stream: Any) -> Any:
    """Reads one RESP2 reply: arrays and bulk strings as lists and str."""
    line = stream.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(stream) for _ in range(count)]
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else stream.read(size + 2)[:size].decode()
    if kind in (b"+", b":"):
        return rest.decode()
    raise ValueError(f"unexpected reply {line!r}")


class Daphne(Child):
    """A worker of the project: daphne on a loopback port (a free one unless given).

    `command` is the program in front of daphne's own arguments: LAUNCHER (the
    project's `python -m chatproject.server`) or PLAIN_DAPHNE; `options` go
    before the address (e.g. --proxy-headers). It is ready once `ready_path`
    answers HTTP, with any status.
    """

    def __init__(
        self,
        log_path: Path,
        *,
        env: Mapping[str, str],
        port: int | None = None,
        command: Sequence[str] = LAUNCHER,
        options: Sequence[str] = (),
        application: str = APPLICATION,
        ready_path: str = "/healthz",
        name: str | None = None,
        group: bool = False,
        registry: Children | None = None,
    ) -> None:
        self.port = port or free_port()
        super().__init__(
            name or f"worker :{self.port}", log_path, group=group, registry=registry
        )
        self.env = dict(env)
        self.command = list(command)
        self.options = list(options)
        self.application = application
        self.ready_path = ready_path

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    def argv(self) -> list[str]:
        return [
            *self.command, *self.options,
            "-b", LOOPBACK, "-p", str(self.port), self.application,
        ]  # fmt: skip

    def launch(self) -> None:
        self.spawn(self.argv(), env=self.env, cwd=REPO_ROOT)

    def ready(self) -> bool:
        return http_answers(self.base_url + self.ready_path)


class Nginx(Child):
    """nginx with the configuration `config`, unprivileged, everything under
    `prefix` (its logs/ and temp/ folders are made); ready once `listen`
    ("host:port") accepts connections.

    The master leads a process group of its own, so that a kill takes its
    workers too; SIGTERM is its fast shutdown (SIGQUIT would wait for every
    socket).
    """

    def __init__(
        self,
        prefix: Path,
        *,
        config: str,
        listen: str,
        registry: Children | None = None,
    ) -> None:
        prefix.mkdir(parents=True, exist_ok=True)
        (prefix / "logs").mkdir(exist_ok=True)
        (prefix / "temp").mkdir(exist_ok=True)
        super().__init__(
            "nginx", prefix / "logs" / "error.log", group=True, registry=registry
        )
        self.prefix = prefix
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(config)
        self.binary = find_binary("nginx")
        self.listen = listen

    def command(self, *extra: str) -> list[str]:
        # -e: the log of startup errors, before the configuration names its own.
        return [
            self.binary, "-p", str(self.prefix), "-e", str(self.log_path),
            "-c", str(self.conf), *extra,
        ]  # fmt: skip

    def launch(self) -> None:
        check = subprocess.run(
            self.command("-t", "-q"), capture_output=True, text=True, timeout=30
        )
        if check.returncode != 0:
            raise HarnessError(
                f"nginx rejected {self.conf}:\n{check.stderr}{self.output()}"
            )
        self.spawn(self.command())

    def ready(self) -> bool:
        host, port = self.listen.rsplit(":", 1)
        return accepts(LOOPBACK if host in ("0.0.0.0", "*", "") else host, int(port))


class PostgresServer:
    """A throwaway PostgreSQL server in `folder`, on a free loopback port, with
    a database `chat` (initdb, then pg_ctl, which waits until it accepts).

    PostgreSQL refuses to run as root, so as root every step runs as the
    `postgres` user (runuser). A server on 5432 is neither used nor touched.
    """

    name = "postgres"

    def __init__(self, folder: Path, *, port: int | None = None) -> None:
        self.folder = Path(folder)
        self.data = self.folder / "data"
        self.log_path = self.folder / "server.log"
        self.port = port or free_port()
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
        raise HarnessError(
            "PostgreSQL server not installed (no initdb); "
            "install it with: apt-get install -y postgresql"
        )

    @property
    def url(self) -> str:
        return f"postgres://postgres@{LOOPBACK}:{self.port}/chat"

    def output(self, limit: int | None = LOG_TAIL) -> str:
        return log_tail(self.log_path, limit)

    def run(self, program: str, *args: str) -> None:
        """Runs one of the server's programs; raises HarnessError when it fails."""
        command = [str(self.bindir / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        # From / : the caller's folder may be closed to the postgres user. A
        # session of its own: a Ctrl-C meant for the caller does not stop it.
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
            raise HarnessError(
                f"{program} failed ({result.returncode}):\n{result.stdout}"
                f"{result.stderr}{self.output()}"
            )

    def start(self) -> None:
        """Creates the server and its database, or starts it again after stop()."""
        again = self.data.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        if not again:
            # Explicit UTF8: with no locale in the environment initdb picks
            # SQL_ASCII.
            self.run(
                "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                "--no-sync", "-E", "UTF8", "--locale=C.UTF-8",
            )  # fmt: skip
        # Durability is pointless here; -k keeps the socket out of /run/postgresql.
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses={LOOPBACK} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self.started = True
        self.run(
            "pg_ctl", "start", "-w", "-s", "-D", str(self.data),
            "-l", str(self.log_path), "-o", options,
        )  # fmt: skip
        if not again:
            self.run(
                "createdb", "-h", LOOPBACK, "-p", str(self.port), "-U", "postgres",
                "chat",
            )  # fmt: skip

    def stop(self) -> None:
        """Stops the server (fast: open sessions are cut); the folder stays."""
        if self.started:
            self.started = False
            try:
                self.run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-s")
            except (HarnessError, subprocess.TimeoutExpired):
                pass

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
