"""The bounded outgoing queue of one socket, and what writes it.

Broadcasts are appended without waiting and written in rounds (as one frame
for a client that asked for batches), so a slow reader never slows the room.
On daphne a send never waits (daphne#170), so one round writes every due
socket in turn, in one task: an idle socket holds no task of its own. A socket
whose transport holds too much unsent, or a server whose send can wait
(uvicorn), gets a writer task of its own until its queue is empty. A socket
that falls too far behind (too many frames or bytes queued) or whose
transport has not drained for a set time is closed with 4008: it reconnects
and resumes with ?since, so it loses nothing it cannot get back. The gorilla
chat hub's writePump and its `send` channel are the model.

Where the server lets it (daphne, through chat.transport's probe), a round
builds each distinct frame once and writes those bytes to every socket that
has the same events queued: in a room's fan-out that is one frame for all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from chat.transport import PreparedFrame, prepare_text_frame

logger = logging.getLogger(__name__)

# Seconds between looks at a transport that is not draining.
BACKLOG_POLL_SECONDS = 0.05

# The most characters one batched frame carries. daphne refuses to send a
# message over its websocket_max_message_size (1 MiB by default), and an
# event's text is UTF-8 of up to 4 bytes a character, so a batch stays under
# a quarter of that; the rest of the queue follows in the next frame.
MAX_BATCH_FRAME_CHARS = 256 * 1024

REASON_FRAMES = "frames"
REASON_BYTES = "bytes"
REASON_STALLED = "stalled"


@dataclass(frozen=True)
class OutboxLimits:
    """How far behind a socket may fall (from settings, at connect)."""

    max_frames: int
    max_bytes: int
    stall_seconds: float
    # Bytes the server's transport may hold unsent before the writer waits.
    transport_high_water: int
    # Seconds a writer waits for more events before it sends (0: at once).
    linger: float = 0.0


class Flusher:
    """Writes the due outboxes of a loop together, `linger` after the first push.

    One timer for all the sockets of a process rather than one each: every
    event pushed in the meantime, to any socket, leaves with the same write.
    A quiet worker (its last write round ended a few lingers ago) writes at
    once, so lingering costs latency only while the writes keep it busy.
    """

    # A push this many lingers after the last round of writes ended is quiet.
    QUIET_LINGERS = 4

    def __init__(self) -> None:
        self._due: list[Outbox] = []
        self._handle: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_round_end = float("-inf")

    def add(self, outbox: Outbox, linger: float) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A new event loop (tests run one each): what was due on the old
            # one is gone with it.
            for stale in self._due:
                stale._due = False
            self._due, self._handle, self._loop = [], None, loop
        self._due.append(outbox)
        if self._handle is None:
            if loop.time() - self._last_round_end > linger * self.QUIET_LINGERS:
                self._handle = loop.call_soon(self._flush)
            else:
                self._handle = loop.call_later(linger, self._flush)

    def _flush(self) -> None:
        due, self._due, self._handle = self._due, [], None
        for outbox in due:
            outbox._due = False
        task = self._loop.create_task(self._write_round(due), name="chat-write-round")
        task.add_done_callback(_log_failure)

    async def _write_round(self, due: list[Outbox]) -> None:
        frames: FrameCache = {}
        for outbox in due:
            await outbox._write_due(frames)
        # On daphne the round ran in one go: that is when the writes ended.
        self._last_round_end = self._loop.time()


_flusher = Flusher()

# The frames built in one write round, by (batched, the events' texts).
FrameCache = dict[tuple[bool, tuple[str, ...]], PreparedFrame]


class Outbox:
    """Frames queued for one socket; `start` begins writing them."""

    def __init__(
        self,
        send_text: Callable[[str], Awaitable[None]],
        *,
        limits: OutboxLimits,
        batch: bool,
        on_overflow: Callable[[str, int], Awaitable[None]],
        backlog: Callable[[], int] | None = None,
        on_sent: Callable[[int, int], None] | None = None,
        write_frame: Callable[[PreparedFrame], bool] | None = None,
    ) -> None:
        self._send_text = send_text
        # Writes a prepared frame to the transport, if the server allows it.
        self._write_frame = write_frame
        self.limits = limits
        self.batch = batch
        self._on_overflow = on_overflow
        self._backlog = backlog
        self._on_sent = on_sent
        self.queue: deque[str] = deque()
        self.queued_bytes = 0
        self.peak_frames = 0
        self.closed = False
        self.started = False
        # In the flusher's next round.
        self._due = False
        # In a round's write now (a push then needs no round of its own).
        self._writing = False
        # The task of its own while it has one (see _write_due).
        self._writer: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self.queue)

    def push(self, text: str) -> None:
        """Queues one event's JSON text; closes the socket when over the bound."""
        if self.closed:
            return
        size = len(text)
        if len(self.queue) >= self.limits.max_frames:
            self._overflow(REASON_FRAMES)
            return
        if self.queued_bytes + size > self.limits.max_bytes:
            self._overflow(REASON_BYTES)
            return
        self.queue.append(text)
        self.queued_bytes += size
        if len(self.queue) > self.peak_frames:
            self.peak_frames = len(self.queue)
        self._schedule()

    def start(self) -> None:
        """Begins writing (after `welcome`, which must go first)."""
        if not self.started and not self.closed:
            self.started = True
            if self.queue:
                self._schedule()

    def stop(self) -> None:
        """Drops what is queued and ends the writer."""
        self.closed = True
        self.queue.clear()
        self.queued_bytes = 0
        if self._writer is not None and self._writer is not asyncio.current_task():
            self._writer.cancel()

    async def finish(self, last: str) -> None:
        """Ends the outbox with `last` (one event's JSON), ahead of a close.

        What it still holds and then `last` are written at once (batched, in
        as few frames as the batch bound allows), so that the client reads
        them before the close frame.
        """
        self.queue.append(last)
        events = len(self.queue)
        frames = []
        while self.queue:
            frames.append(self._frame_text(self._take()))
        self.stop()
        if self._on_sent is not None:
            self._on_sent(len(frames), events)
        for frame in frames:
            await self._send_text(frame)

    def _schedule(self) -> None:
        if (
            self.started
            and not self._due
            and not self._writing
            and self._writer is None
        ):
            self._due = True
            _flusher.add(self, self.limits.linger)

    def _overflow(self, reason: str) -> None:
        dropped = len(self.queue)
        self.stop()
        logger.info("closing a slow socket (%s): %d frame(s) dropped", reason, dropped)
        task = asyncio.ensure_future(self._on_overflow(reason, dropped))
        task.add_done_callback(_log_failure)

    async def _write_due(self, frames: FrameCache | None = None) -> None:
        """Writes what is queued, in the flusher's round when that cannot wait."""
        if self._writing or self._writer is not None:
            return
        self._writing = True
        try:
            while self.queue and not self.closed:
                if (
                    self._backlog is None
                    or self._backlog() > self.limits.transport_high_water
                ):
                    # Its send may wait, or its transport is full: it must not
                    # hold up the round, so it writes on its own until its
                    # queue is empty.
                    self._writer = asyncio.get_running_loop().create_task(self._write())
                    return
                await self._send_queued(frames)
        except Exception:
            # The socket went away under the round: it ends on its own (its
            # disconnect); the round goes on with the others.
            logger.debug("a write failed", exc_info=True)
        finally:
            self._writing = False

    async def _write(self) -> None:
        try:
            while self.queue and not self.closed:
                if not await self._transport_ready():
                    return
                await self._send_queued()
        finally:
            self._writer = None

    async def _transport_ready(self) -> bool:
        # daphne has no write backpressure (daphne#170): its send never waits,
        # so look at what its transport still holds, and wait while it is full.
        if self._backlog is None or self._backlog() <= self.limits.transport_high_water:
            return True
        blocked_since = time.monotonic()
        while self._backlog() > self.limits.transport_high_water:
            if time.monotonic() - blocked_since > self.limits.stall_seconds:
                self._overflow(REASON_STALLED)
                return False
            await asyncio.sleep(BACKLOG_POLL_SECONDS)
            if self.closed:
                return False
        return True

    async def _send_queued(self, frames: FrameCache | None = None) -> None:
        texts = self._take()
        # Counted as it is handed to the server, before the send may wait.
        if self._on_sent is not None:
            self._on_sent(1, len(texts))
        if self._write_frame is None:
            await self._send_with_deadline(self._frame_text(texts))
            return
        key = (self.batch, texts)
        frame = frames.get(key) if frames is not None else None
        if frame is None:
            frame = prepare_text_frame(self._frame_text(texts))
            if frames is not None:
                frames[key] = frame
        if not self._write_frame(frame):
            await self._send_with_deadline(frame.text)

    def _take(self) -> tuple[str, ...]:
        """Takes the events of the next frame: one, or as many as fit in a batch."""
        queue = self.queue
        if not self.batch:
            text = queue.popleft()
            self.queued_bytes -= len(text)
            return (text,)
        if self.queued_bytes + len(queue) < MAX_BATCH_FRAME_CHARS:
            texts = tuple(queue)
            queue.clear()
            self.queued_bytes = 0
            return texts
        taken: list[str] = []
        size = 2
        while queue and (
            not taken or size + len(queue[0]) + 1 <= MAX_BATCH_FRAME_CHARS
        ):
            text = queue.popleft()
            taken.append(text)
            size += len(text) + 1
            self.queued_bytes -= len(text)
        return tuple(taken)

    def _frame_text(self, texts: tuple[str, ...]) -> str:
        return "[" + ",".join(texts) + "]" if self.batch else texts[0]

    async def _send_with_deadline(self, text: str) -> None:
        if self._backlog is not None:
            # The transport is watched (daphne): its send does not wait.
            await self._send_text(text)
            return
        # A server with backpressure (uvicorn) makes send wait while the client
        # does not read: the same stall bound applies.
        try:
            await asyncio.wait_for(self._send_text(text), self.limits.stall_seconds)
        except TimeoutError:
            self._overflow(REASON_STALLED)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("closing a slow socket failed: %r", task.exception())
