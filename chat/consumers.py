"""ChatConsumer: one WebSocket in one room. Frames in through protocol, out through
services and the broadcast seam; no ORM and no JSON building here.

Broadcasts reach the socket through the channel layer's hub (chat/hub.py): the
hub hands their ready text to `hub_deliver`, which queues it in the socket's
bounded outbox (chat/outbox.py); one writer task sends it.
"""

from __future__ import annotations

import asyncio
import logging

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.db import DatabaseError
from django.utils.crypto import constant_time_compare

from chat import (
    auth,
    metrics,
    presence,
    protocol,
    reading,
    services,
    transport,
    worker,
)
from chat.batching import DatabaseBatch, each
from chat.broadcast import (
    CHAT_EVENT,
    LAYER_ERRORS,
    broadcast_room_async,
    event_texts,
)
from chat.limits import (
    SharedRateLimit,
    Throttle,
    TokenBucket,
    frame_limits,
    shared_counts,
)
from chat.models import Room
from chat.origins import scope_header
from chat.outbox import Outbox, OutboxLimits
from chat.sender import sender

logger = logging.getLogger(__name__)
# Refusals and forced closes, each with who, from where and why; never a
# message's text, a token or a session id.
security_log = logging.getLogger("chat.security")


def redis_deadline() -> asyncio.Timeout:
    """Bounds a socket's wait for Redis (a join, a post's count) by
    CHAT_REDIS_OPERATION_SECONDS: a Redis that hangs gets the client
    `unavailable` and 1013 in seconds, not after the connection's own timeout
    (CHAT_REDIS_SOCKET_TIMEOUT, long for the layer's blocking reads)."""
    return asyncio.timeout(settings.CHAT_REDIS_OPERATION_SECONDS)


def outbox_limits() -> OutboxLimits:
    """Returns the outgoing-queue bounds of a socket (from settings, now)."""
    return OutboxLimits(
        max_frames=settings.CHAT_SEND_QUEUE_FRAMES,
        max_bytes=settings.CHAT_SEND_QUEUE_BYTES,
        stall_seconds=settings.CHAT_SEND_STALL_SECONDS,
        transport_high_water=settings.CHAT_SEND_TRANSPORT_BYTES,
        linger=settings.CHAT_SEND_LINGER_MS / 1000,
    )


metrics.SEND_QUEUE_FRAMES.set_function(worker.queued_events)


def _count_sent(frames: int, events: int) -> None:
    metrics.FRAMES_SENT.inc(frames)
    metrics.EVENTS_SENT.inc(events)
    metrics.SEND_BATCH_EVENTS.observe(events)


# Handshakes that arrive together share their trips to the database thread:
# one to read the sessions' users, one to check and record the sockets. Posts
# that arrive together share one trip and one transaction; history requests
# one trip, and one query for the same page.
session_users = DatabaseBatch(each(auth.session_user))
sockets_open = DatabaseBatch(services.sockets_open)
posts_stored = DatabaseBatch(services.messages_post)
histories_read = DatabaseBatch(services.room_histories)


def _log_read_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("storing a read position failed", exc_info=task.exception())


# Why a handshake was refused, by its close code (services.SocketRefused).
REFUSALS = {
    protocol.CLOSE_NO_SUCH_ROOM: "no such room",
    protocol.CLOSE_FORBIDDEN: "banned from the room",
    protocol.CLOSE_TOO_MANY_CONNECTIONS: "too many sockets of the user or address",
}


class ChatConsumer(AsyncWebsocketConsumer):
    room: Room | None = None
    # The room's group and the user's own group (pushes), once joined.
    groups_joined: tuple[str, ...] = ()
    registered = False
    outbox: Outbox | None = None
    user = None  # set once the handshake has read it
    # Set by close(): frames the client sent before it are not answered.
    closing = False
    # The read position the client asked for, the one last stored, and the
    # task storing it (see mark_read).
    read_asked = 0
    read_stored = 0
    read_writer: asyncio.Task | None = None

    # ------------------------------------------------------------------
    # Connection lifecycle
    # ------------------------------------------------------------------

    async def dispatch(self, message: dict) -> None:
        # Channels hops to the database thread before every handler to close
        # stale connections. Every database call here is a
        # database_sync_to_async, which does that itself on either side; the
        # extra hop would make each handshake wait for the thread (one per
        # worker) before it is even accepted, and each broadcast and frame
        # queue behind every other socket's database work.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except LAYER_ERRORS:
            # The channel layer's receive loop lost Redis: without this the
            # socket would end with a bare 1011, or hang on a dead group.
            logger.warning("closing a socket: the channel layer connection dropped")
            await self.close_unavailable()

    async def close_unavailable(self) -> None:
        """Sends `unavailable`, closes with 1013 and forgets the socket's presence."""
        if self.outbox is not None:
            self.outbox.stop()
        try:
            await self.send_direct(self.error_event(protocol.unavailable_error()))
            await self.close(code=protocol.CLOSE_TRY_AGAIN_LATER)
        except Exception:
            logger.debug("the socket was already gone", exc_info=True)
        # Redis is away: leave the groups in this worker only, not upstream.
        hub = getattr(self.channel_layer, "hub", None)
        if hub is not None:
            hub.drop(self.channel_name, self.groups_joined)
        self.groups_joined = ()
        await self.disconnect(protocol.CLOSE_TRY_AGAIN_LATER)

    async def connect(self) -> None:
        """Called on the handshake: check who and where, join, send `welcome`."""
        batch = protocol.SUBPROTOCOL_BATCH in (self.scope.get("subprotocols") or ())
        # Accept first: a close before accept is an HTTP 403 and the client
        # never sees the close code that says why.
        await self.accept(subprotocol=protocol.SUBPROTOCOL_BATCH if batch else None)
        probe = transport.scope_probe(self.scope)
        self.outbox = Outbox(
            self.send_text,
            limits=outbox_limits(),
            batch=batch,
            on_overflow=self.close_too_slow,
            backlog=probe.buffered if probe is not None else None,
            on_sent=_count_sent,
            write_frame=probe.write_frame if probe is not None else None,
        )
        try:
            user = self.scope.get("user")
            if user is None and "session" in self.scope:
                # Read after accept (chat.auth says why), in one trip to the
                # database thread with the handshakes that arrive with it.
                user = await session_users(self.scope["session"])
                self.scope["user"] = user
            if user is None or not user.is_authenticated:
                await self.close_refused(protocol.CLOSE_NOT_SIGNED_IN, "not signed in")
                return
            await self.open_session(user)
        except LAYER_ERRORS:
            # Redis is unreachable: say so and let the client retry later,
            # rather than leaving it on a socket that receives nothing.
            logger.warning("refusing a socket: the channel layer is unreachable")
            await self.close_unavailable()
        except DatabaseError:
            # Locked or down: the same answer; the groups are left as usual.
            logger.warning("refusing a socket: the database does not answer")
            await self.send_direct(self.error_event(protocol.unavailable_error()))
            await self.close(code=protocol.CLOSE_TRY_AGAIN_LATER)

    async def open_session(self, user) -> None:
        slug = self.scope["url_route"]["kwargs"]["room"]
        self.user = user
        if not protocol.is_valid_room_name(slug):
            await self.close_refused(protocol.CLOSE_NO_SUCH_ROOM, "invalid room name")
            return
        self.limits = frame_limits()
        # Posts count per user, across all their sockets and workers;
        # requests (history, members) per socket.
        self.user_posts = SharedRateLimit(
            "posts", settings.CHAT_RATE_MESSAGES, settings.CHAT_RATE_WINDOW_SECONDS
        )
        self.request_rate = TokenBucket(
            settings.CHAT_RATE_MESSAGES, settings.CHAT_RATE_WINDOW_SECONDS
        )
        self.typing_throttle = Throttle(settings.CHAT_TYPING_INTERVAL_SECONDS)
        self.bad_frames = TokenBucket(settings.CHAT_BAD_FRAMES_PER_MINUTE, 60)
        # Posts refused for the rate limit, for a client that will not stop.
        self.rate_refusals = TokenBucket(settings.CHAT_BAD_FRAMES_PER_MINUTE, 60)

        since = deletions = backlog = None
        query = self.scope.get("query_string", b"")
        try:
            since = protocol.parse_since(query)
            deletions = protocol.parse_since(query, "deletions")
        except protocol.ProtocolError as error:
            await self.send_direct(self.error_event(error))
        try:
            backlog = protocol.parse_backlog(query, settings.CHAT_HISTORY_PAGE)
        except protocol.ProtocolError as error:
            await self.send_direct(self.error_event(error))

        # Join the groups before reading the backlog, so that nothing posted in
        # between is missed (the client drops seqs it has already shown), and
        # before the ban check, so that a ban from then on arrives as a kick.
        hub = getattr(self.channel_layer, "hub", None)
        if hub is not None:
            hub.attach(self.channel_name, self)
        presence.diffs.bind(asyncio.get_running_loop())
        sender.bind(asyncio.get_running_loop())
        await self.join_groups(
            protocol.room_group_name(slug), protocol.user_group_name(user.pk)
        )
        try:
            self.room, welcome = await sockets_open(
                services.SocketRequest(
                    slug=slug,
                    user=user,
                    channel_name=self.channel_name,
                    address=self.client_address(),
                    since=since,
                    deletions=deletions,
                    backlog=backlog,
                )
            )
        except services.SocketRefused as refused:
            await self.leave_groups()
            await self.close_refused(
                refused.code, REFUSALS.get(refused.code, "refused")
            )
            return
        self.registered = True
        worker.socket_opened(self)
        metrics.OPEN_SOCKETS.inc()
        # `welcome` goes first; broadcasts that arrived meanwhile wait behind it.
        await self.send_direct(welcome)
        self.outbox.start()

    async def disconnect(self, code: int) -> None:
        """Called when the socket closes: leave the group and the presence store."""
        if self.outbox is not None:
            self.outbox.stop()
        try:
            await self.leave_groups()
        except LAYER_ERRORS:
            logger.warning("could not leave groups: the channel layer is unreachable")
        hub = getattr(self.channel_layer, "hub", None)
        if hub is not None:
            hub.detach(self.channel_name)
        if not self.registered:
            return
        self.registered = False
        worker.socket_closed(self)
        metrics.OPEN_SOCKETS.dec()
        # While the worker drains, the user is reconnecting elsewhere: keep the
        # row, so no leave/join pair flickers; the lease sweep settles it.
        if not worker.is_draining():
            try:
                await database_sync_to_async(presence.connection_close)(
                    channel_name=self.channel_name
                )
            except DatabaseError:
                # The worker loop deletes the row once the database answers.
                logger.warning("could not forget a closed socket: database error")
                worker.socket_close_failed(self.channel_name)

    async def join_groups(self, *groups: str) -> None:
        self.groups_joined = groups
        async with redis_deadline():
            for group in groups:
                await self.channel_layer.group_add(group, self.channel_name)

    async def leave_groups(self) -> None:
        groups, self.groups_joined = self.groups_joined, ()
        for group in groups:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def close(self, code=None, reason=None) -> None:
        self.closing = True
        await super().close(code=code, reason=reason)

    def client_address(self) -> str:
        client = self.scope.get("client")
        return client[0] if client else ""

    # ------------------------------------------------------------------
    # Client frames
    # ------------------------------------------------------------------

    async def receive(self, text_data=None, bytes_data=None) -> None:
        """Called with each client frame; any bad frame gets one `error` frame."""
        if not self.registered or self.closing:
            return
        try:
            command = protocol.parse_client_frame(text_data, bytes_data, self.limits)
        except protocol.ProtocolError as error:
            await self.refuse_frame(error)
            return
        try:
            if isinstance(command, protocol.PostMessage):
                await self.post_message(command)
            elif isinstance(command, protocol.Typing):
                await self.send_typing()
            elif isinstance(command, protocol.HistoryRequest):
                await self.send_history(command)
            elif isinstance(command, protocol.MembersRequest):
                await self.send_members(command)
            elif isinstance(command, protocol.MarkRead):
                self.mark_read(command.seq)
        except protocol.ProtocolError as error:
            await self.send_error(error)
        except DatabaseError:
            # Locked past its busy timeout, or down: nothing was stored, so
            # nothing was broadcast; the client resends with the same
            # client_id, which is stored once.
            logger.warning("a frame of user %s failed: database error", self.user.pk)
            ref = (
                command.client_id if isinstance(command, protocol.PostMessage) else None
            )
            await self.send_error(protocol.unavailable_error(ref))
        except LAYER_ERRORS:
            # What was stored stays stored; the client reconnects later,
            # resumes with ?since and resends with the same client_id.
            logger.warning("closing a socket: the channel layer is unreachable")
            await self.close_unavailable()

    async def refuse_frame(self, error: protocol.ProtocolError) -> None:
        """A frame that does not parse: its error, and a 1008 close past the limit."""
        if self.bad_frames.allow():
            await self.send_error(error)
            return
        await self.close_for_abuse(
            error, f"over {settings.CHAT_BAD_FRAMES_PER_MINUTE} bad frames in a minute"
        )

    async def close_for_abuse(self, error: protocol.ProtocolError, reason: str) -> None:
        """Sends the last error after what was queued, then closes with 1008."""
        event = self.error_event(error)
        if self.outbox is not None and self.registered:
            # What was queued, then this error, then the close.
            await self.outbox.finish(protocol.encode(event))
        else:
            await self.send_direct(event)
        await self.close_refused(protocol.CLOSE_POLICY_VIOLATION, reason)

    async def post_message(self, command: protocol.PostMessage) -> None:
        async with redis_deadline():
            wait = await self.user_posts.acquire(
                shared_counts(self.channel_layer), str(self.user.pk)
            )
        if wait is not None:
            error = protocol.ProtocolError(
                protocol.ERROR_RATE_LIMITED,
                f"too many messages; retry in {wait:.1f} s",
                command.client_id,
            )
            if self.rate_refusals.allow():
                raise error
            await self.close_for_abuse(
                error,
                f"over {settings.CHAT_BAD_FRAMES_PER_MINUTE} posts refused "
                "for the rate limit in a minute",
            )
            return
        _, created = await posts_stored(
            services.Post(
                room=self.room,
                user=self.user,
                text=command.text,
                client_id=command.client_id,
            )
        )
        # A retried send is broadcast again too (services.messages_post): the
        # sender's acknowledgement is its copy of the broadcast, as for a new one.
        if created:
            metrics.MESSAGES_RECEIVED.inc()

    async def send_typing(self) -> None:
        if self.typing_throttle.allow():
            await broadcast_room_async(
                self.room.slug,
                protocol.event_typing(user=self.user.get_username()),
                exclude_channel=self.channel_name,
            )

    def check_request_rate(self) -> None:
        """Requests (history, members) have a per-socket budget of their own."""
        if not self.request_rate.allow():
            raise protocol.ProtocolError(
                protocol.ERROR_RATE_LIMITED,
                f"too many requests; retry in {self.request_rate.retry_after():.1f} s",
            )

    async def send_history(self, command: protocol.HistoryRequest) -> None:
        self.check_request_rate()
        page = await histories_read(
            services.HistoryRead(
                room=self.room, before=command.before, limit=command.limit
            )
        )
        await self.send_event(
            protocol.event_history(
                before=command.before, messages=page.events, has_more=page.has_more
            )
        )

    async def send_members(self, command: protocol.MembersRequest) -> None:
        self.check_request_rate()
        page = await database_sync_to_async(services.room_members_page)(
            room=self.room, after=command.after
        )
        await self.send_event(page)

    def mark_read(self, seq: int) -> None:
        """Stores the read position the client reached, at most once per
        CHAT_READ_INTERVAL_MS: a page that reads a busy room sends many, and
        only the latest matters. Never moves it back."""
        if seq <= self.read_asked:
            return
        self.read_asked = seq
        if self.read_writer is None or self.read_writer.done():
            self.read_writer = asyncio.ensure_future(self.store_read_positions())
            self.read_writer.add_done_callback(_log_read_failure)

    async def store_read_positions(self) -> None:
        # Also after the socket closed: the last position the page sent counts.
        while self.read_stored < self.read_asked:
            seq = self.read_asked
            try:
                await database_sync_to_async(reading.read_advance)(
                    room=self.room, user=self.user, seq=seq
                )
            except DatabaseError:
                # The page sends its position again as it reads on.
                logger.warning("could not store a read position: database error")
                return
            self.read_stored = seq
            await asyncio.sleep(settings.CHAT_READ_INTERVAL_MS / 1000)

    # ------------------------------------------------------------------
    # Server events
    # ------------------------------------------------------------------

    async def send_event(self, event: protocol.ServerEvent) -> None:
        """Queues an event behind the broadcasts already queued for this socket."""
        self.outbox.push(protocol.encode(event))

    async def send_direct(self, event: protocol.ServerEvent) -> None:
        """Sends an event at once, ahead of the outbox (before it starts)."""
        await self.send_text(
            protocol.encode_frame(
                event, batch=self.outbox is not None and self.outbox.batch
            )
        )
        _count_sent(1, 1)

    async def send_text(self, text: str) -> None:
        await self.send(text_data=text)

    def error_event(self, error: protocol.ProtocolError) -> protocol.ErrorEvent:
        metrics.error_sent(error.code)
        return protocol.event_error(error.code, error.detail, error.ref)

    async def send_error(self, error: protocol.ProtocolError) -> None:
        event = self.error_event(error)
        if self.outbox is not None and self.registered:
            await self.send_event(event)
        else:
            await self.send_direct(event)

    def hub_deliver(self, message: dict) -> bool:
        """Called by the hub for each broadcast to this socket's groups."""
        if message["type"] != CHAT_EVENT:
            return False
        if message.get("exclude") != self.channel_name:
            for text in event_texts(message):
                self.outbox.push(text)
        return True

    async def chat_event(self, message: dict) -> None:
        """Called for a room broadcast that came the stock way (no hub)."""
        self.hub_deliver(message)

    async def close_too_slow(self, reason: str, dropped: int) -> None:
        """Called by the outbox when this socket fell too far behind."""
        metrics.slow_close(reason, dropped)
        worker.socket_closed_too_slow()
        logger.info(
            "closing socket of user %s in %s with %d: too slow (%s)",
            self.user.pk,
            self.room.slug if self.room else "-",
            protocol.CLOSE_TOO_SLOW,
            reason,
        )
        await self.close(code=protocol.CLOSE_TOO_SLOW)

    async def chat_revoke(self, message: dict) -> None:
        """Called when this socket's user logged out or changed (chat.access)."""
        if self.user is None:
            return
        session = self.scope.get("session")
        session_key = session.session_key if session is not None else None
        if "session" in message:
            ended = session_key is not None and constant_time_compare(
                message["session"], auth.session_digest(session_key)
            )
        else:
            try:
                ended = not await database_sync_to_async(auth.still_signed_in)(
                    session_key, self.user.pk
                )
            except Exception:
                # Unsure: reconnecting checks the session at the handshake.
                logger.exception("could not check the session of user %s", self.user.pk)
                await self.close_refused(
                    protocol.CLOSE_TRY_AGAIN_LATER, "session check failed"
                )
                return
        if ended:
            await self.close_refused(
                protocol.CLOSE_NOT_SIGNED_IN, "signed out", level=logging.INFO
            )

    async def chat_kick(self, message: dict) -> None:
        """Called when a moderator kicks or bans this socket's user from a room."""
        if self.room is not None and message.get("room") == self.room.slug:
            await self.close_refused(
                protocol.CLOSE_FORBIDDEN, "kicked", level=logging.INFO
            )

    async def close_refused(
        self, code: int, reason: str, *, level: int = logging.WARNING
    ) -> None:
        """Closes with `code`, logging who, from where and why."""
        security_log.log(
            level,
            "socket closed with %d (%s): user %s, address %s, origin %r, room %r",
            code,
            reason,
            self.user.pk if self.user is not None else "-",
            self.client_address() or "-",
            scope_header(self.scope, b"origin") or "",
            self.scope.get("url_route", {}).get("kwargs", {}).get("room", ""),
        )
        await self.close(code=code)
