"""The load generator: asyncio + picows WebSocket clients in several OS processes.

The bench process starts `ClientPool(n)`: n processes (multiprocessing, spawn),
each owning a slice of the sockets and talking to the bench over a pipe, so that
the clients are not what limits the figures. One run goes through four steps,
the same in every process:

1. `job`: open the slice's sockets at `connect_at` (a time.monotonic() instant,
   the same clock in every process on Linux) with at most `concurrency`
   handshakes in flight; a socket of "ours" counts as open when its `welcome`
   arrived, a baseline socket when the handshake finished. Reply: `connected`.
2. `go`: every sender owned by this process posts from `start` for `duration`
   seconds, at a fixed `rate` or with at most `window` posts unacknowledged (the
   sender's own copy is its acknowledgement). Reply: `sent`, per sender.
3. `expect`: how many posts each sender made, from all processes; the process
   waits until its sockets have them all, or until `deadline`. Reply: `results`.
4. `close`: close every socket. Reply: `closed`.

Every message text is `<sender>:<counter>:<monotonic_ns>:<padding>`, which both
servers carry unchanged, so each receiver checks exactly-once and per-sender
order by counter and measures latency from the sender's send to its own read.
For "ours" the receiver also checks that the room's `seq` goes up by one.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import multiprocessing.connection
import socket
import time
from array import array
from typing import Any

from picows import WSListener, WSMsgType, ws_connect

from harness.wire import SUBPROTOCOL_BATCH, handshake_headers, message_frame


class Sock(WSListener):
    """One client socket: counts frames and events, records deliveries."""

    def __init__(self, client: Client, spec: dict[str, Any]) -> None:
        self.client = client
        self.id = spec["id"]
        self.room = spec["room"]
        self.stuck = bool(spec.get("stuck"))
        self.transport = None
        self.welcomed = client.loop.create_future()
        self.welcomed_at = 0.0
        self.frames = 0
        self.events = 0
        self.fragments: list[bytes] | None = None
        # sender key -> [seen bytearray, unique count, highest counter, dups,
        # out of order]
        self.by_key: dict[str, list] = {}
        self.last_seq: int | None = None
        self.seq_breaks = 0
        self.close_code: int | None = None
        self.closed_at: float | None = None
        self.batch = False

    def on_ws_connected(self, transport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport, frame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT or kind is WSMsgType.CONTINUATION:
            if not frame.fin or self.fragments is not None:
                if self.fragments is None:
                    self.fragments = []
                self.fragments.append(frame.get_payload_as_bytes())
                if not frame.fin:
                    return
                payload, self.fragments = b"".join(self.fragments), None
            else:
                payload = frame.get_payload_as_bytes()
            self.frames += 1
            self.client.handle(self, payload, time.monotonic_ns())
        elif kind is WSMsgType.CLOSE:
            code = frame.get_close_code()
            self.close_code = getattr(code, "value", code)
            self.closed_at = time.monotonic()
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport) -> None:
        if self.closed_at is None:
            self.closed_at = time.monotonic()
        if not self.welcomed.done():
            self.welcomed.set_exception(
                ConnectionError(f"closed before welcome (code {self.close_code})")
            )


class Sender:
    def __init__(self, key: str, spec: dict[str, Any]) -> None:
        self.key = key
        self.socket = spec["socket"]
        self.rate = float(spec.get("rate") or 0)
        self.window = int(spec.get("window") or 16)
        self.phase = float(spec.get("phase") or 0)
        self.count = spec.get("count")
        self.size = int(spec.get("size") or 100)
        self.sent = 0
        self.inflight = 0
        self.acked = asyncio.Event()


class Client:
    """The sockets of one process and the four steps of a run."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.loop = asyncio.get_running_loop()
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.loop.add_reader(conn.fileno(), self._on_pipe)
        self.socks: dict[int, Sock] = {}
        self.senders: dict[str, Sender] = {}
        self.room_senders: dict[str, list[str]] = {}
        self.ours = True
        self.latencies = array("f")
        self.unique = 0
        self.measuring = False
        self.types: dict[str, int] = {}

    def _on_pipe(self) -> None:
        try:
            self.inbox.put_nowait(self.conn.recv())
        except EOFError:
            self.loop.remove_reader(self.conn.fileno())
            self.inbox.put_nowait({"step": "close", "exit": True})

    async def recv(self, step: str) -> dict:
        message = await self.inbox.get()
        if message.get("step") not in (step, "close"):
            raise RuntimeError(f"expected step {step}, got {message.get('step')}")
        return message

    # -- receiving ---------------------------------------------------------

    def handle(self, sock: Sock, payload: bytes, now_ns: int) -> None:
        # harness.wire.decode_events, inlined: this runs for every frame received.
        data = json.loads(payload)
        events = data if isinstance(data, list) else (data,)
        sock.events += len(events)
        for event in events:
            if self.ours:
                kind = event.get("type")
                if kind == "message":
                    self.delivery(sock, event.get("message"), now_ns, event.get("seq"))
                elif kind == "welcome":
                    if not sock.welcomed.done():
                        sock.welcomed_at = now_ns / 1e9
                        sock.welcomed.set_result(True)
                else:
                    self.types[kind] = self.types.get(kind, 0) + 1
            elif "message" in event:
                self.delivery(sock, event["message"], now_ns, None)
            else:
                self.types["other"] = self.types.get("other", 0) + 1

    def delivery(self, sock: Sock, text, now_ns: int, seq) -> None:
        try:
            key, counter, sent_ns, _ = text.split(":", 3)
            counter = int(counter)
            sent_ns = int(sent_ns)
        except (AttributeError, ValueError):
            self.types["foreign"] = self.types.get("foreign", 0) + 1
            return
        if isinstance(seq, int):
            if sock.last_seq is not None and seq != sock.last_seq + 1:
                sock.seq_breaks += 1
            sock.last_seq = seq
        record = sock.by_key.get(key)
        if record is None:
            record = sock.by_key[key] = [bytearray(), 0, -1, 0, 0]
        seen = record[0]
        if counter < len(seen) and seen[counter]:
            record[3] += 1
            return
        if counter >= len(seen):
            seen.extend(bytes(counter - len(seen) + 1024))
        seen[counter] = 1
        record[1] += 1
        if counter < record[2]:
            record[4] += 1
        else:
            record[2] = counter
        sender = self.senders.get(key)
        if sender is not None and sender.socket == sock.id:
            sender.inflight -= 1
            sender.acked.set()
        if self.measuring and not sock.stuck:
            self.unique += 1
            self.latencies.append((now_ns - sent_ns) / 1e6)

    # -- the steps -----------------------------------------------------------

    async def connect(self, job: dict) -> dict:
        self.ours = job["server"] == "ours"
        for key, spec in job["senders"].items():
            self.room_senders.setdefault(spec["room"], []).append(key)
        gate = asyncio.Semaphore(job.get("concurrency", 50))
        timeout = job.get("timeout", 30)
        failures: list[str] = []
        started: list[float] = []

        async def open_one(spec: dict) -> None:
            sock = Sock(self, spec)
            self.socks[sock.id] = sock
            headers = handshake_headers(spec["origin"], spec["cookie"])
            if job.get("subprotocol"):
                headers["Sec-WebSocket-Protocol"] = SUBPROTOCOL_BATCH
            factory = None
            if spec.get("rcvbuf"):

                def factory(_parsed, size=spec["rcvbuf"]):
                    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
                    raw.setblocking(False)
                    return raw

            async with gate:
                started.append(time.monotonic())
                try:
                    async with asyncio.timeout(timeout):
                        transport, _ = await ws_connect(
                            lambda: sock,
                            spec["url"],
                            extra_headers=headers,
                            websocket_handshake_timeout=timeout,
                            socket_factory=factory,
                        )
                        response = transport.response
                        sock.batch = response is not None and (
                            response.headers.get("Sec-WebSocket-Protocol")
                            == SUBPROTOCOL_BATCH
                        )
                        if self.ours:
                            await sock.welcomed
                        else:
                            sock.welcomed_at = time.monotonic()
                            sock.welcomed.set_result(True)
                except Exception as error:  # noqa: BLE001 - reported, not raised
                    failures.append(
                        f"socket {sock.id}: {type(error).__name__}: {error}"
                    )

        delay = job["connect_at"] - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await asyncio.gather(*(open_one(spec) for spec in job["sockets"]))
        for key, spec in job["senders"].items():
            if spec["socket"] in self.socks:
                self.senders[key] = Sender(key, spec)
        ok = [
            s
            for s in self.socks.values()
            if s.welcomed.done()
            and not s.welcomed.cancelled()
            and s.welcomed.exception() is None
        ]
        return {
            "step": "connected",
            "opened": len(ok),
            "failures": failures,
            "t_start": min(started, default=0.0),
            "t_end": max((s.welcomed_at for s in ok), default=0.0),
            "batch": sum(s.batch for s in ok),
            **self.counts(),
        }

    def counts(self) -> dict:
        return {
            "frames": sum(s.frames for s in self.socks.values()),
            "events": sum(s.events for s in self.socks.values()),
        }

    async def warm_up(self, attempt: int, timeout: float) -> dict:
        """Each sender posts once, unmeasured; waits until every socket here has them.

        Only then is every socket surely in its group: the baseline joins its
        group after the handshake, so "open" does not mean "in the room" yet.
        The bench repeats the step (a new post each time) until all are in.
        """
        for key, sender in self.senders.items():
            sock = self.socks[sender.socket]
            if sock.transport is None or sock.closed_at is not None:
                continue
            text = f"w{key}:{attempt}:{time.monotonic_ns()}:warm-up"
            if self.ours:
                frame = message_frame(text, f"w{key}-{attempt}")
            else:
                frame = {"message": text}
            sock.transport.send(WSMsgType.TEXT, json.dumps(frame).encode())

        def cold() -> list[Sock]:
            return [
                sock
                for sock in self.socks.values()
                if not sock.stuck
                and any(
                    f"w{key}" not in sock.by_key
                    for key in self.room_senders.get(sock.room, ())
                )
            ]

        deadline = time.monotonic() + timeout
        while cold() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return {"step": "warmed", "cold": len(cold())}

    async def send_all(self, go: dict) -> dict:
        for sock in self.socks.values():
            if sock.stuck and sock.transport is not None:
                sock.transport.underlying_transport.pause_reading()
        self.measuring = True
        base = self.counts()
        start, end = go["start"], go["start"] + go["duration"]
        await asyncio.gather(
            *(self.run_sender(s, start, end) for s in self.senders.values())
        )
        return {
            "step": "sent",
            "sent": {k: s.sent for k, s in self.senders.items()},
            "base": base,
        }

    async def run_sender(self, sender: Sender, start: float, end: float) -> None:
        sock = self.socks[sender.socket]
        if sock.transport is None or sock.closed_at is not None:
            return
        pad_to = sender.size
        limit = sender.count if sender.count is not None else float("inf")

        def post(counter: int) -> None:
            prefix = f"{sender.key}:{counter}:{time.monotonic_ns()}:"
            text = prefix + "x" * max(0, pad_to - len(prefix))
            if self.ours:
                frame = message_frame(text, f"{sender.key}-{counter}")
            else:
                frame = {"message": text}
            sock.transport.send(WSMsgType.TEXT, json.dumps(frame).encode())
            sender.sent += 1

        delay = start + sender.phase - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        counter = 0
        while counter < limit and sock.closed_at is None:
            if sender.rate > 0:
                due = start + sender.phase + counter / sender.rate
                if due >= end:
                    break
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                left = end - time.monotonic()
                if left <= 0:
                    break
                if sender.inflight >= sender.window:
                    sender.acked.clear()
                    try:
                        async with asyncio.timeout(left):
                            await sender.acked.wait()
                    except TimeoutError:
                        break
                    continue
            sender.inflight += 1
            post(counter)
            counter += 1

    async def wait_results(self, expect: dict) -> dict:
        want = 0
        for sock in self.socks.values():
            if not sock.stuck:
                want += sum(
                    expect["sent"].get(k, 0)
                    for k in self.room_senders.get(sock.room, ())
                )
        while self.unique < want and time.monotonic() < expect["deadline"]:
            await asyncio.sleep(0.02)
        in_time = self.unique
        # Late is not lost: wait a while longer to tell them apart.
        while (
            self.unique < want
            and time.monotonic() < expect["deadline"] + expect["grace"]
        ):
            await asyncio.sleep(0.02)
        done_at = time.monotonic()
        dups = ooo = seq_breaks = 0
        closed = []
        stuck = []
        for sock in self.socks.values():
            if sock.stuck:
                stuck.append(sock)
                continue
            for record in sock.by_key.values():
                dups += record[3]
                ooo += record[4]
            seq_breaks += sock.seq_breaks
            if sock.closed_at is not None:
                closed.append(
                    f"socket {sock.id}: closed by the server, code {sock.close_code}"
                )
        return {
            "step": "results",
            "expected": want,
            "delivered": min(in_time, want),
            "late": min(self.unique, want) - min(in_time, want),
            "extra": max(0, self.unique - want),
            "duplicates": dups,
            "out_of_order": ooo,
            "seq_breaks": seq_breaks,
            "closed": closed,
            "latencies": self.latencies.tobytes(),
            "done_at": done_at,
            "types": dict(self.types),
            "stuck_closed_at": [s.closed_at for s in stuck],
            **self.counts(),
        }

    async def close(self) -> dict:
        stuck = [s for s in self.socks.values() if s.stuck and s.transport is not None]
        for sock in stuck:
            sock.transport.underlying_transport.resume_reading()
        # A stuck socket reads what is left in its buffers, up to a close frame.
        deadline = time.monotonic() + 5
        while any(s.closed_at is None for s in stuck) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stuck_codes = [s.close_code for s in stuck]
        for sock in self.socks.values():
            if sock.transport is not None and sock.closed_at is None:
                try:
                    sock.transport.send_close()
                    sock.transport.disconnect()
                except Exception:  # noqa: BLE001 - already gone
                    pass
        waits = [
            s.transport.wait_disconnected()
            for s in self.socks.values()
            if s.transport is not None
        ]
        try:
            async with asyncio.timeout(5):
                await asyncio.gather(*waits, return_exceptions=True)
        except TimeoutError:
            pass
        return {"step": "closed", "stuck_codes": stuck_codes}

    async def run(self) -> None:
        self.conn.send({"step": "ready"})
        job = await self.recv("job")
        if job.get("step") == "close":
            return
        self.conn.send(await self.connect(job))
        go = await self.recv("warm")
        while go["step"] == "warm":
            self.conn.send(await self.warm_up(go["attempt"], go["timeout"]))
            go = await self.inbox.get()
        if go["step"] == "go":
            self.conn.send(await self.send_all(go))
            expect = await self.recv("expect")
            if expect["step"] == "expect":
                self.conn.send(await self.wait_results(expect))
                await self.recv("close")
        reply = await self.close()
        try:
            self.conn.send(reply)
        except (BrokenPipeError, OSError):
            pass


def child_main(conn) -> None:
    async def main() -> None:
        await Client(conn).run()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


class ClientPool:
    """The client processes of one run, seen from the bench process."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.conns = []
        self.procs = []
        for _ in range(processes):
            mine, theirs = context.Pipe()
            process = context.Process(target=child_main, args=(theirs,), daemon=True)
            process.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(process)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def send(self, messages: list[dict]) -> None:
        for conn, message in zip(self.conns, messages, strict=True):
            conn.send(message)

    def broadcast(self, message: dict) -> None:
        self.send([message] * len(self.conns))

    def gather(self, step: str, timeout: float, tick=None) -> list[dict]:
        """Returns every process's reply to a step; `tick()` runs while waiting."""
        replies: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < len(self.conns):
            pending = [c for i, c in enumerate(self.conns) if i not in replies]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"client processes gave no {step!r} within {timeout:.0f} s"
                )
            for conn in multiprocessing.connection.wait(
                pending, timeout=min(left, 0.25)
            ):
                index = self.conns.index(conn)
                try:
                    reply = conn.recv()
                except EOFError:
                    raise RuntimeError(
                        f"client process {index} died during {step!r}"
                    ) from None
                if reply.get("step") != step:
                    raise RuntimeError(
                        f"client process {index}: {reply!r} instead of {step}"
                    )
                replies[index] = reply
            if tick is not None:
                tick()
        return [replies[i] for i in range(len(self.conns))]

    def stop(self) -> None:
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass
        for process in self.procs:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=2)
            if process.is_alive():
                process.kill()
                process.join()
