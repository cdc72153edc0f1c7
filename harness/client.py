"""A client of the chat's WebSocket protocol on the `websockets` asyncio client:
`ChatSocket`, one socket read frame by frame with every wait bounded,
`ChatPage`, which behaves like the page (reconnects, resumes, resends), and
`SocketThread`, which runs them for callers that block (the browser tests).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from harness.wire import (
    CLOSE_ABNORMAL,
    decode_events,
    handshake_headers,
    message_frame,
    reconnect_wait,
    reconnects_after,
    socket_url,
    view_after,
)

T = TypeVar("T")

# Generous: a real process and maybe a real Redis sit between send and receive.
RECEIVE_TIMEOUT = 5


async def open_connection(
    base_url: str,
    room: str,
    *,
    sessionid: str | None = None,
    query: str = "",
    origin: str | None = None,
    headers: dict[str, str] | None = None,
    subprotocols: Sequence[str] | None = None,
    local_addr: str | None = None,
    open_timeout: float = RECEIVE_TIMEOUT,
) -> ClientConnection:
    """Opens a room's socket as a page of `base_url` would.

    The Origin is `base_url` unless `origin` says otherwise; `headers` are
    added; `subprotocols` is what the client asks for (e.g. ["chat.batch"]);
    `local_addr` is the address to connect from.
    """
    extra: dict[str, Any] = {}
    if local_addr:
        extra["local_addr"] = (local_addr, 0)
    return await connect(
        socket_url(base_url, room, query),
        additional_headers={
            **handshake_headers(origin or base_url, sessionid),
            **(headers or {}),
        },
        proxy=None,
        open_timeout=open_timeout,
        subprotocols=list(subprotocols) if subprotocols else None,
        **extra,
    )


class _deadline:
    """asyncio.timeout that fails with an AssertionError (what was awaited)."""

    def __init__(self, timeout: float, what: str = "a frame") -> None:
        self.timeout = timeout
        self.what = what
        self._inner = asyncio.timeout(timeout)

    async def __aenter__(self) -> None:
        await self._inner.__aenter__()

    async def __aexit__(self, kind, error, traceback) -> bool | None:
        try:
            return await self._inner.__aexit__(kind, error, traceback)
        except TimeoutError:
            raise AssertionError(
                f"no {self.what} from the server within {self.timeout} s"
            ) from None


# ---------------------------------------------------------------------------
# One socket, read frame by frame
# ---------------------------------------------------------------------------


class EventReader:
    """The frames of one socket, read one by one; every wait is bounded.

    Presence diffs come on their own schedule, so `receive` passes over them
    (they are kept for `receive_presence`), and a `chat.batch` frame (a JSON
    array) is taken apart into its events. `raw` keeps the text of every
    frame, to check the framing; `view` is the member list as this client
    sees it (welcome, then diffs). A subclass says how a frame is read
    (`_recv`): over the network (ChatSocket) or from an ASGI test
    communicator (the unit tests' Client).
    """

    def __init__(self) -> None:
        self.frames: deque[dict[str, Any]] = deque()
        self.presence: deque[dict[str, Any]] = deque()
        self.raw: list[str] = []
        self.view: set[str] | None = None

    async def _recv(self, timeout: float) -> str:
        """Returns the next frame's text; raises TimeoutError after `timeout`."""
        raise NotImplementedError

    def take(self, text: str) -> None:
        """Keeps the events of one frame: diffs in `presence`, others in `frames`."""
        self.raw.append(text)
        for event in decode_events(text):
            self.view = view_after(self.view, event)
            if event.get("type") == "presence":
                self.presence.append(event)
            else:
                self.frames.append(event)

    async def _read(self, timeout: float) -> None:
        try:
            text = await self._recv(timeout)
        except TimeoutError:
            raise AssertionError(
                f"no frame from the server within {timeout} s"
            ) from None
        self.take(text)

    async def receive(self, timeout: float = RECEIVE_TIMEOUT) -> dict[str, Any]:
        """Returns the next frame that is not a presence diff.

        Fails (not hangs) when none comes in time.
        """
        async with _deadline(timeout):
            while not self.frames:
                await self._read(timeout)
        return self.frames.popleft()

    async def receive_type(self, kind: str, timeout: float = RECEIVE_TIMEOUT) -> dict:
        """Returns the next frame (presence diffs aside), of type `kind`."""
        frame = await self.receive(timeout)
        assert frame["type"] == kind, frame
        return frame

    async def receive_presence(self, timeout: float = RECEIVE_TIMEOUT) -> dict:
        """Returns the next presence diff (other frames are kept for `receive`)."""
        async with _deadline(timeout):
            while not self.presence:
                await self._read(timeout)
        return self.presence.popleft()

    async def wait_presence(
        self,
        *,
        joins: Sequence[str] = (),
        leaves: Sequence[str] = (),
        timeout: float = RECEIVE_TIMEOUT,
    ) -> dict[str, Any]:
        """Reads diffs until every user of `joins` joined and of `leaves` left.

        Returns the diff that completed it. Each name in a diff is its state
        when the diff was sent, so a later diff overrides an earlier one: a
        user wanted in `joins` who shows up in `leaves` again is wanted again.
        """
        want_joins, want_leaves = set(joins), set(leaves)
        wanted = f"joins {sorted(joins)}, leaves {sorted(leaves)}"
        async with _deadline(timeout, wanted):
            while True:
                diff = await self.receive_presence(timeout)
                want_joins -= set(diff["joins"])
                want_joins |= set(joins) & set(diff["leaves"])
                want_leaves -= set(diff["leaves"])
                want_leaves |= set(leaves) & set(diff["joins"])
                if not want_joins and not want_leaves:
                    return diff


class ChatSocket(EventReader):
    """A websockets client connection with JSON helpers (EventReader's reads)."""

    def __init__(self, connection: ClientConnection) -> None:
        super().__init__()
        self.connection = connection

    @classmethod
    async def open(cls, base_url: str, room: str, **options: Any) -> ChatSocket:
        """Returns a socket of `room` (options as open_connection's)."""
        return cls(await open_connection(base_url, room, **options))

    @property
    def subprotocol(self) -> str | None:
        return self.connection.subprotocol

    async def send(self, frame: dict[str, Any]) -> None:
        await self.connection.send(json.dumps(frame))

    async def send_text(self, text: str) -> None:
        await self.connection.send(text)

    async def post(
        self,
        text: str,
        *,
        client_id: str | None = None,
        timeout: float = RECEIVE_TIMEOUT,
    ) -> dict[str, Any]:
        """Posts a message; returns the next frame but presence diffs and typing
        indicators: the room's copy of the post, unless something came first."""
        await self.send(message_frame(text, client_id))
        frame = await self.receive(timeout)
        while frame["type"] == "typing":
            frame = await self.receive(timeout)
        return frame

    async def post_burst(
        self, texts: Sequence[str], timeout: float = RECEIVE_TIMEOUT
    ) -> list[dict[str, Any]]:
        """Sends every post before reading any answer; returns the room's copies
        in the order sent. An error frame in between fails the call."""
        client_ids = [str(uuid.uuid4()) for _ in texts]
        for text, client_id in zip(texts, client_ids, strict=True):
            await self.send(message_frame(text, client_id))
        stored: dict[str, dict[str, Any]] = {}
        while len(stored) < len(client_ids):
            frame = await self.receive(timeout)
            assert frame["type"] != "error", frame
            if frame["type"] == "message" and frame.get("client_id") in client_ids:
                stored[frame["client_id"]] = frame
        return [stored[client_id] for client_id in client_ids]

    async def _recv(self, timeout: float) -> str:
        async with asyncio.timeout(timeout):
            return await self.connection.recv()

    async def wait_view(
        self, members: set[str], timeout: float = RECEIVE_TIMEOUT
    ) -> None:
        """Reads frames until `view` (welcome members plus diffs) is `members`."""
        try:
            async with asyncio.timeout(timeout):
                while self.view != members:
                    self.take(await self._recv(timeout))
        except TimeoutError:
            raise AssertionError(
                f"the member list seen is {sorted(self.view or ())}, not "
                f"{sorted(members)}, after {timeout} s"
            ) from None

    async def _read_for(self, timeout: float) -> None:
        """Reads (and keeps) every frame that comes within `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self.take(await self._recv(timeout))
        except TimeoutError:
            pass

    async def receive_nothing(self, timeout: float = 0.5) -> bool:
        """True when no frame but presence diffs arrives within `timeout`."""
        await self._read_for(timeout)
        return not self.frames

    async def presence_nothing(self, timeout: float = 0.5) -> bool:
        """True when no presence diff arrives within `timeout` (others are kept)."""
        await self._read_for(timeout)
        return not self.presence

    async def receive_close(
        self, timeout: float = RECEIVE_TIMEOUT
    ) -> tuple[int | None, list[dict]]:
        """Returns the server's close code and the frames that came before it.

        Presence diffs are not among them: they are kept in `presence`.
        """
        async with asyncio.timeout(timeout):
            try:
                while True:
                    self.take(await self._recv(timeout))
            except ConnectionClosed as closed:
                frames, self.frames = list(self.frames), deque()
                return (closed.rcvd.code if closed.rcvd else None), frames

    async def close(self) -> None:
        await self.connection.close()


# ---------------------------------------------------------------------------
# A page: reconnects, resumes, resends
# ---------------------------------------------------------------------------


# The most messages one `history` request may ask for (CHAT_HISTORY_MAX).
HISTORY_MAX = 200
# How long a hole may stay before it is asked for (HOLE_GRACE_MS in backlog.js).
HOLE_GRACE_SECONDS = 0.5


class ChatPage:
    """One user's page in one room, reading every frame as it comes.

    On any close but a policy one (harness.wire.reconnects_after), as the
    page does, it reconnects (harness.wire.reconnect_wait: from
    0.1 s up to 1 s, afresh after 1001, 1012 or a stable socket) with
    ?since=<last seq> and resends what the room has not echoed yet, with the
    same client_id. A hole in the seqs it holds (a broadcast the layer dropped,
    or one its worker died before sending) that is still there after
    HOLE_GRACE_SECONDS it fills with `history`, as the page does. Records
    every message (by seq), every other frame and every close code.
    `diagnose()` adds to a failure message (e.g. the servers' logs).
    """

    def __init__(
        self,
        base_url: str,
        room: str,
        username: str,
        sessionid: str,
        *,
        reconnect: bool = True,
        headers: dict[str, str] | None = None,
        local_addr: str | None = None,
        welcome_timeout: float = 20,
        diagnose: Callable[[], str] | None = None,
    ) -> None:
        self.base_url = base_url
        self.room = room
        self.username = username
        self.sessionid = sessionid
        self.reconnect = reconnect
        self.headers = headers or {}
        self.local_addr = local_addr
        self.welcome_timeout = welcome_timeout
        self.diagnose = diagnose
        # Seqs of live `message` frames in arrival order (welcome backlogs not).
        self.live_seqs: list[int] = []
        self.messages: dict[int, dict] = {}
        self.frames: list[dict] = []
        self.welcomes: list[dict] = []
        self.closes: list[int] = []
        self.refused: list[str] = []
        self.unacked: dict[str, dict] = {}
        # The `before` of each hole asked for with `history` (once each: a
        # deleted message leaves a hole that history never fills).
        self.holes_asked: set[int] = set()
        self.floor: int | None = None  # the lowest seq it holds
        # Seqs that came with a hole below them, checked again after the grace.
        self.gap_tops: set[int] = set()
        self.hole_check: asyncio.Task | None = None
        # The member list as this page shows it: welcome, then presence diffs.
        self.view: set[str] = set()
        self.connection: ClientConnection | None = None
        self.ready = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.stopped = False
        self.opened_at: float | None = None  # when the current socket opened

    @property
    def last_seq(self) -> int:
        """The seq to resume after: the end of the run with no hole in it.

        Broadcasts from two workers may arrive out of order, so a socket can
        close having seen n+2 but not n+1; resuming after the hole gets it (the
        page fills such a hole with `history` instead; both drop repeats).
        """
        seq = 0
        while seq + 1 in self.messages:
            seq += 1
        return seq

    def seen(self, kind: str) -> list[str]:
        """Returns the users in the `kind` list ("joins", "leaves") of the
        presence diffs received, in order."""
        return [
            user
            for frame in self.frames
            if frame["type"] == "presence"
            for user in frame[kind]
        ]

    def errors(self) -> list[dict]:
        return [frame for frame in self.frames if frame["type"] == "error"]

    async def start(self) -> ChatPage:
        """Connects in the background; returns once the first welcome came."""
        self.task = asyncio.create_task(self.run())
        try:
            async with asyncio.timeout(self.welcome_timeout):
                await self.ready.wait()
        except TimeoutError:
            raise AssertionError(
                f"{self.username}: no welcome; closes {self.closes}, refused "
                f"{self.refused[-3:]}{self.diagnose() if self.diagnose else ''}"
            ) from None
        return self

    async def run(self) -> None:
        wait = None
        while not self.stopped:
            self.opened_at = None
            code = await self.session()
            if self.stopped or not self.reconnect or not reconnects_after(code):
                return
            opened = self.opened_at
            wait = reconnect_wait(
                wait, code, 0 if opened is None else time.monotonic() - opened
            )
            await asyncio.sleep(wait)

    async def session(self) -> int:
        """One socket from connect to close; returns the close code."""
        # After the first welcome, resume: exactly what was missed, on any worker.
        query = f"since={self.last_seq}" if self.welcomes else ""
        try:
            self.connection = await open_connection(
                self.base_url,
                self.room,
                sessionid=self.sessionid,
                query=query,
                headers=self.headers,
                local_addr=self.local_addr,
            )
        except (OSError, InvalidHandshake, TimeoutError) as error:
            # nginx answers 502 while no worker takes the socket: retry, as
            # the page does.
            self.refused.append(repr(error))
            return CLOSE_ABNORMAL
        self.opened_at = time.monotonic()
        try:
            while True:
                for frame in decode_events(await self.connection.recv()):
                    await self.handle(frame)
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else CLOSE_ABNORMAL
            self.closes.append(code)
            return code
        finally:
            self.ready.clear()

    async def handle(self, frame: dict) -> None:
        self.view = view_after(self.view, frame)
        if frame["type"] == "welcome":
            self.welcomes.append(frame)
            for message in frame["messages"]:
                self.remember(message)
            self.ready.set()
            # Posts the room has not echoed: same client_id, stored once.
            for pending in list(self.unacked.values()):
                await self.send(pending)
        elif frame["type"] == "message":
            seq = frame["seq"]
            self.live_seqs.append(seq)
            self.remember(frame)
            if seq - 1 > self.floor and seq - 1 not in self.messages:
                self.gap_tops.add(seq)
                if self.hole_check is None or self.hole_check.done():
                    self.hole_check = asyncio.create_task(self.fill_holes_later())
        elif frame["type"] == "history":
            for message in frame["messages"]:
                self.remember(message)
            if frame["messages"]:
                await self.fill_hole_below(frame["messages"][0]["seq"])
        else:
            self.frames.append(frame)

    async def fill_holes_later(self) -> None:
        """Asks for the holes seen that are still there after the grace: a
        broadcast overtaken by the next one comes within it."""
        await asyncio.sleep(HOLE_GRACE_SECONDS)
        tops, self.gap_tops = self.gap_tops, set()
        for top in sorted(tops, reverse=True):
            await self.fill_hole_below(top)

    async def fill_hole_below(self, seq: int) -> None:
        """Asks with `history` for the messages missing just below `seq`, as
        the page does: down to the next one it holds, at most HISTORY_MAX at a
        time (what is left is asked for when that answer comes)."""
        if self.floor is None or seq - 1 <= self.floor or seq in self.holes_asked:
            return
        missing = 0
        while missing < HISTORY_MAX and seq - missing - 1 not in self.messages:
            missing += 1
        if missing:
            self.holes_asked.add(seq)
            await self.send({"type": "history", "before": seq, "limit": missing})

    def remember(self, message: dict) -> None:
        seq = message["seq"]
        self.messages[seq] = message
        self.floor = seq if self.floor is None else min(self.floor, seq)
        if message["user"] == self.username:
            self.unacked.pop(message.get("client_id"), None)

    async def send(self, frame: dict) -> None:
        if self.connection is not None and self.ready.is_set():
            try:
                await self.connection.send(json.dumps(frame))
            except ConnectionClosed:
                pass  # sent again after the next welcome

    async def post(self, text: str) -> str:
        """Posts (now, or after the reconnect); returns the client_id."""
        client_id = uuid.uuid4().hex
        frame = message_frame(text, client_id)
        self.unacked[client_id] = frame
        await self.send(frame)
        return client_id

    def acked(self, client_id: str) -> bool:
        return client_id not in self.unacked

    async def stop(self) -> None:
        self.stopped = True
        if self.hole_check is not None:
            self.hole_check.cancel()
        if self.connection is not None:
            await self.connection.close()
        if self.task is not None:
            try:
                async with asyncio.timeout(5):
                    await self.task
            except TimeoutError:
                self.task.cancel()


# ---------------------------------------------------------------------------
# For callers that block
# ---------------------------------------------------------------------------


class SocketThread:
    """An event loop on a thread of its own that runs this module's clients for
    code that cannot await (Playwright's sync API owns the browser tests' loop).

    Sockets opened here stay served (pings answered, frames read) between
    calls, while the caller blocks on something else.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="chat-sockets", daemon=True
        )
        self._thread.start()

    def run(
        self, coroutine: Coroutine[Any, Any, T], timeout: float = 4 * RECEIVE_TIMEOUT
    ) -> T:
        """Runs `coroutine` on the thread's loop; returns its result or raises
        its error (AssertionError as such), waiting at most `timeout`."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=RECEIVE_TIMEOUT)
        self._loop.close()
