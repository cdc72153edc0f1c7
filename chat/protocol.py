"""The wire format: room names, close codes, client frame parsing, server events.

Pure: no ORM, no I/O. Every rule about what a frame may contain lives here, and
every server event is built here and encoded once.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypedDict, get_args, get_type_hints
from urllib.parse import parse_qs

# ---------------------------------------------------------------------------
# Room names and groups
# ---------------------------------------------------------------------------

# re.fullmatch, and [0-9] rather than \d: "$" would let "room\n" through and \d
# matches non-ASCII digits; both pass Channels' own group-name check.
ROOM_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def is_valid_room_name(name: str) -> bool:
    """Returns True when `name` is a lower-case slug of 1-64 characters."""
    return isinstance(name, str) and ROOM_NAME_PATTERN.fullmatch(name) is not None


def room_group_name(slug: str) -> str:
    """Returns the channel-layer group of a room (the only place it is formatted)."""
    if not is_valid_room_name(slug):
        raise ValueError(f"invalid room name: {slug!r}")
    return f"room.{slug}"


def user_group_name(user_id: int) -> str:
    """Returns the group holding every socket of one user, in any room."""
    return f"user.{int(user_id)}"


# ---------------------------------------------------------------------------
# Close codes and error codes
# ---------------------------------------------------------------------------

CLOSE_NOT_SIGNED_IN = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NO_SUCH_ROOM = 4404
CLOSE_TOO_MANY_CONNECTIONS = 4429
# The socket fell too far behind (its outgoing queue is full, or its transport
# did not drain in time): reconnect and resume with ?since.
CLOSE_TOO_SLOW = 4008
# Too many bad frames (CHAT_BAD_FRAMES_PER_MINUTE): a client that keeps sending
# what the server refuses is broken or hostile; retrying the same cannot help.
CLOSE_POLICY_VIOLATION = 1008
# Server-side codes of RFC 6455 (sent through chatproject.server).
CLOSE_GOING_AWAY = 1001
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013

# The WebSocket subprotocol a client asks for to get batches: every server frame
# is then a JSON array of one or more events, in order.
SUBPROTOCOL_BATCH = "chat.batch"

ERROR_BAD_JSON = "bad_json"
ERROR_NOT_AN_OBJECT = "not_an_object"
ERROR_UNKNOWN_TYPE = "unknown_type"
ERROR_EMPTY_FRAME = "empty_frame"
ERROR_BINARY_FRAME = "binary_frame"
ERROR_FRAME_TOO_LARGE = "frame_too_large"
ERROR_EMPTY_MESSAGE = "empty_message"
ERROR_MESSAGE_TOO_LONG = "message_too_long"
ERROR_INVALID_MESSAGE = "invalid_message"
ERROR_INVALID_CLIENT_ID = "invalid_client_id"
ERROR_INVALID_FIELD = "invalid_field"
ERROR_INVALID_SINCE = "invalid_since"
ERROR_INVALID_BACKLOG = "invalid_backlog"
ERROR_RATE_LIMITED = "rate_limited"
ERROR_ROOM_CLOSED = "room_closed"
ERROR_UNAVAILABLE = "unavailable"

CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

# Newline and tab are text; every other control character (NUL above all, which
# PostgreSQL refuses in text columns) is rejected.
ALLOWED_CONTROL_CHARACTERS = {"\n", "\t"}


class ProtocolError(Exception):
    """A client frame that cannot be accepted; becomes one `error` frame."""

    def __init__(self, code: str, detail: str, ref: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.ref = ref


# ---------------------------------------------------------------------------
# Client frames
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PostMessage:
    text: str
    client_id: str | None = None


@dataclass(frozen=True)
class Typing:
    pass


@dataclass(frozen=True)
class HistoryRequest:
    before: int | None
    limit: int


@dataclass(frozen=True)
class MembersRequest:
    # The page starts after this username (None: from the first).
    after: str | None


@dataclass(frozen=True)
class MarkRead:
    # Everything up to this seq has been seen.
    seq: int


ClientCommand = PostMessage | Typing | HistoryRequest | MembersRequest | MarkRead


@dataclass(frozen=True)
class Limits:
    """The limits a frame is checked against (from settings, at call time)."""

    max_frame_bytes: int
    max_message_length: int
    history_page: int
    history_max: int


def unavailable_error(ref: str | None = None) -> ProtocolError:
    """Returns the error sent before closing with 1013 while Redis is down."""
    return ProtocolError(
        ERROR_UNAVAILABLE,
        "the chat is briefly unavailable; reconnect in a moment (anything "
        "already sent is kept: resend it with the same client_id)",
        ref,
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def loads_strict(text: str) -> Any:
    """Returns the JSON value of `text`; rejects NaN, Infinity and duplicate keys."""
    return json.loads(
        text,
        parse_constant=_reject_constant,
        object_pairs_hook=_reject_duplicate_keys,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _clean_text(raw: Any, limits: Limits, ref: str | None) -> str:
    if not isinstance(raw, str):
        raise ProtocolError(ERROR_INVALID_MESSAGE, "message must be a string", ref)
    text = raw.strip()
    if not text:
        raise ProtocolError(ERROR_EMPTY_MESSAGE, "message is empty", ref)
    if len(text) > limits.max_message_length:
        raise ProtocolError(
            ERROR_MESSAGE_TOO_LONG,
            f"message is {len(text)} characters; the limit is "
            f"{limits.max_message_length}",
            ref,
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(
            ERROR_INVALID_MESSAGE, "message contains a lone surrogate", ref
        ) from None
    for char in text:
        if (
            unicodedata.category(char) == "Cc"
            and char not in ALLOWED_CONTROL_CHARACTERS
        ):
            raise ProtocolError(
                ERROR_INVALID_MESSAGE,
                f"message contains control character U+{ord(char):04X}",
                ref,
            )
    return text


def _clean_client_id(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or CLIENT_ID_PATTERN.fullmatch(raw) is None:
        raise ProtocolError(
            ERROR_INVALID_CLIENT_ID,
            "client_id must be 1-64 characters of letters, digits and _ . : -",
        )
    return raw


def _clean_history(frame: dict[str, Any], limits: Limits) -> HistoryRequest:
    before = frame.get("before")
    if before is not None and (not _is_int(before) or before < 1):
        raise ProtocolError(ERROR_INVALID_FIELD, "before must be a positive integer")
    limit = frame.get("limit", limits.history_page)
    if not _is_int(limit) or not 1 <= limit <= limits.history_max:
        raise ProtocolError(
            ERROR_INVALID_FIELD,
            f"limit must be an integer from 1 to {limits.history_max}",
        )
    return HistoryRequest(before=before, limit=limit)


def parse_post(fields: dict[str, Any], limits: Limits) -> PostMessage:
    """Returns the post in a `message` frame or an API body, or raises ProtocolError.

    One rule for the socket and the HTTP API: same text and client_id limits.
    """
    client_id = _clean_client_id(fields.get("client_id"))
    return PostMessage(
        text=_clean_text(fields.get("message"), limits, client_id),
        client_id=client_id,
    )


def parse_read(fields: dict[str, Any]) -> MarkRead:
    """Returns the read position in a `read` frame or an API body, or raises."""
    seq = fields.get("seq")
    if not _is_int(seq) or not 1 <= seq <= MAX_SEQ:
        raise ProtocolError(ERROR_INVALID_FIELD, "seq must be a positive integer")
    return MarkRead(seq=seq)


# The largest seq a client may name (a PositiveBigIntegerField holds it).
MAX_SEQ = 2**63 - 1

# `@name`, not inside a word or an e-mail address: Django's username
# characters but `@`.
MENTION_PATTERN = re.compile(r"(?<![\w@.+-])@([\w.+-]{1,150})")
# The most names one message can mention: more is a mass ping, not a message.
MAX_MENTIONS = 20


def mention_candidates(text: str) -> list[tuple[str, ...]]:
    """Returns the names `text` may mention, in order, each with what it may be.

    "@bob." at the end of a sentence may name "bob." or "bob": each candidate
    is the token, then the token without its trailing punctuation; the
    caller keeps the first that is a user. At most MAX_MENTIONS tokens.
    """
    if "@" not in text:
        return []
    found: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for match in MENTION_PATTERN.finditer(text):
        token = match.group(1)
        if token in seen:
            continue
        seen.add(token)
        trimmed = token.rstrip(".+-")
        found.append((token, trimmed) if trimmed and trimmed != token else (token,))
        if len(found) == MAX_MENTIONS:
            break
    return found


def parse_client_frame(
    text: str | None, binary: bytes | None, limits: Limits
) -> ClientCommand:
    """Returns the command a client frame asks for, or raises ProtocolError."""
    if text is None:
        if binary:
            raise ProtocolError(ERROR_BINARY_FRAME, "binary frames are not supported")
        raise ProtocolError(ERROR_EMPTY_FRAME, "the frame is empty")
    if len(text.encode("utf-8", "surrogatepass")) > limits.max_frame_bytes:
        raise ProtocolError(
            ERROR_FRAME_TOO_LARGE,
            f"frames are limited to {limits.max_frame_bytes} bytes",
        )
    if not text.strip():
        raise ProtocolError(ERROR_EMPTY_FRAME, "the frame is empty")
    try:
        frame = loads_strict(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(ERROR_BAD_JSON, f"invalid JSON: {exc}") from None
    if not isinstance(frame, dict):
        raise ProtocolError(ERROR_NOT_AN_OBJECT, "a frame must be a JSON object")

    kind = frame.get("type")
    # The Channels tutorial's frame has no type: {"message": "hi"} is a post.
    if kind is None and "message" in frame:
        kind = "message"
    parse = CLIENT_FRAMES.get(kind) if isinstance(kind, str) else None
    if parse is not None:
        return parse(frame, limits)
    if kind is None:
        raise ProtocolError(ERROR_UNKNOWN_TYPE, "the frame has no type")
    shown = kind if isinstance(kind, str) else json.dumps(kind)
    raise ProtocolError(ERROR_UNKNOWN_TYPE, f"unknown frame type {shown[:64]!r}")


def _parse_members(frame: dict[str, Any], limits: Limits) -> MembersRequest:
    after = frame.get("after")
    if after is not None and (not isinstance(after, str) or len(after) > 150):
        raise ProtocolError(ERROR_INVALID_FIELD, "after must be a username")
    return MembersRequest(after=after)


# Each client frame type, with what reads it (docs/protocol.md lists them all;
# tests/test_docs.py checks it).
CLIENT_FRAMES: dict[str, Callable[[dict[str, Any], Limits], ClientCommand]] = {
    "message": parse_post,
    "typing": lambda frame, limits: Typing(),
    "history": _clean_history,
    "members": _parse_members,
    "read": lambda frame, limits: parse_read(frame),
}


def _query_count(query_string: bytes | str, name: str) -> int | None:
    """Returns a query parameter's non-negative integer: None if absent, -1 if
    it is not one."""
    if isinstance(query_string, bytes):
        query_string = query_string.decode("latin-1")
    values = parse_qs(query_string).get(name)
    if not values:
        return None
    value = values[-1]
    # str.isdigit accepts non-ASCII digits; the seq is plain ASCII.
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        return -1
    return int(value)


def parse_since(query_string: bytes | str, name: str = "since") -> int | None:
    """Returns the `since` seq of a connect URL's query string (None if absent).

    `name="deletions"` reads the last deletion number a resuming page saw.
    """
    value = _query_count(query_string, name)
    if value == -1:
        raise ProtocolError(
            ERROR_INVALID_SINCE, f"{name} must be a non-negative integer"
        )
    return value


def parse_backlog(query_string: bytes | str, maximum: int) -> int | None:
    """Returns how many of the latest messages a connect URL asks `welcome` to
    carry (`?backlog=0`: none, for a client that wants only what comes next),
    or None if it does not say."""
    value = _query_count(query_string, "backlog")
    if value is not None and not 0 <= value <= maximum:
        raise ProtocolError(
            ERROR_INVALID_BACKLOG, f"backlog must be an integer from 0 to {maximum}"
        )
    return value


# ---------------------------------------------------------------------------
# Server events
# ---------------------------------------------------------------------------


# One TypedDict per event type: the wire format of each, as docs/protocol.md
# lists it (tests/test_docs.py checks that every type here is documented).


class MessageEvent(TypedDict):
    type: Literal["message"]
    id: int
    seq: int
    room: str
    user: str
    message: str
    ts: str
    client_id: str | None
    mentions: list[str]


class WelcomeEvent(TypedDict):
    type: Literal["welcome"]
    room: str
    user: str
    members: list[str]
    member_count: int
    members_more: bool
    messages: list[MessageEvent]
    has_more: bool
    closed: bool
    deletions: int
    deleted: list[DeletedRef]
    last_seq: int
    read_seq: int | None


class MembersEvent(TypedDict):
    type: Literal["members"]
    after: str | None
    members: list[str]
    has_more: bool


class HistoryEvent(TypedDict):
    type: Literal["history"]
    before: int | None
    messages: list[MessageEvent]
    has_more: bool


class PresenceEvent(TypedDict):
    type: Literal["presence"]
    joins: list[str]
    leaves: list[str]
    members: int


class TypingEvent(TypedDict):
    type: Literal["typing"]
    user: str


class DeletedEvent(TypedDict):
    type: Literal["deleted"]
    id: int
    seq: int
    deletion: int


class DeletedRef(TypedDict):
    id: int
    seq: int


class RoomStateEvent(TypedDict):
    type: Literal["room"]
    closed: bool


class PushEvent(TypedDict):
    type: Literal["push"]
    event: str
    data: Any


class ReadEvent(TypedDict):
    type: Literal["read"]
    room: str
    seq: int


class MentionEvent(TypedDict):
    type: Literal["mention"]
    room: str
    id: int
    seq: int
    user: str
    message: str


class ErrorEvent(TypedDict):
    type: Literal["error"]
    code: str
    detail: str
    ref: str | None


ServerEvent = (
    MessageEvent
    | WelcomeEvent
    | MembersEvent
    | HistoryEvent
    | PresenceEvent
    | TypingEvent
    | DeletedEvent
    | RoomStateEvent
    | PushEvent
    | ReadEvent
    | MentionEvent
    | ErrorEvent
)


def server_event_types() -> dict[str, type]:
    """Returns every server event type ("message", ...) with its TypedDict."""
    return {
        get_args(get_type_hints(event)["type"])[0]: event
        for event in get_args(ServerEvent)
    }


def format_timestamp(moment: datetime) -> str:
    """Returns an ISO 8601 UTC timestamp with milliseconds and a Z."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def event_message(
    *,
    id: int,
    seq: int,
    room: str,
    user: str,
    message: str,
    ts: datetime,
    client_id: str | None,
    mentions: list[str] | None = None,
) -> MessageEvent:
    """Returns a `message` event: one stored post, with the users it mentions."""
    return {
        "type": "message",
        "id": id,
        "seq": seq,
        "room": room,
        "user": user,
        "message": message,
        "ts": format_timestamp(ts),
        "client_id": client_id,
        "mentions": mentions or [],
    }


def event_welcome(
    *,
    room: str,
    user: str,
    members: list[str],
    member_count: int,
    messages: list[MessageEvent],
    has_more: bool,
    closed: bool = False,
    deletions: int = 0,
    deleted: list[DeletedRef] | None = None,
    last_seq: int = 0,
    read_seq: int | None = None,
) -> WelcomeEvent:
    """Returns the `welcome` event sent right after a socket is accepted.

    `members` is the first page of the sorted member list; `member_count`
    counts them all, and `members_more` says a `members` request gets more.
    `deletions` is the room's last deletion number; `deleted`, on a resume
    that gave the last one it saw, the messages deleted since. `last_seq` is
    the room's newest seq, for a client that took no backlog to resume from.
    `read_seq` is how far the user has read here (None: never).
    """
    return {
        "type": "welcome",
        "room": room,
        "user": user,
        "members": members,
        "member_count": member_count,
        "members_more": member_count > len(members),
        "messages": messages,
        "has_more": has_more,
        "closed": closed,
        "deletions": deletions,
        "deleted": deleted or [],
        "last_seq": last_seq,
        "read_seq": read_seq,
    }


def event_members(
    *, after: str | None, members: list[str], has_more: bool
) -> MembersEvent:
    """Returns the answer to a `members` request: the next page of usernames."""
    return {"type": "members", "after": after, "members": members, "has_more": has_more}


def event_history(
    *, before: int | None, messages: list[MessageEvent], has_more: bool
) -> HistoryEvent:
    """Returns the answer to a `history` request: older messages, oldest first."""
    return {
        "type": "history",
        "before": before,
        "messages": messages,
        "has_more": has_more,
    }


def event_presence(
    *, joins: list[str], leaves: list[str], members: int
) -> PresenceEvent:
    """Returns a `presence` diff: who came and who went in the last interval.

    `members` counts the users in the room once the diff is applied.
    """
    return {"type": "presence", "joins": joins, "leaves": leaves, "members": members}


def event_typing(*, user: str) -> TypingEvent:
    """Returns a `typing` event."""
    return {"type": "typing", "user": user}


def event_deleted(*, id: int, seq: int, deletion: int) -> DeletedEvent:
    """Returns a `deleted` event: a moderator removed a message.

    `deletion` is its number among the room's deletions (Room.deletions).
    """
    return {"type": "deleted", "id": id, "seq": seq, "deletion": deletion}


def event_room_state(*, closed: bool) -> RoomStateEvent:
    """Returns a `room` event: the room was closed (read-only) or reopened."""
    return {"type": "room", "closed": closed}


def event_push(*, event: str, data: Any) -> PushEvent:
    """Returns a `push` event: sent through the API to every socket of one user."""
    return {"type": "push", "event": event, "data": data}


def event_read(*, room: str, seq: int) -> ReadEvent:
    """Returns a `read` event: the user has read room `room` up to `seq`."""
    return {"type": "read", "room": room, "seq": seq}


def event_mention(
    *, room: str, id: int, seq: int, user: str, message: str
) -> MentionEvent:
    """Returns a `mention` event: message `id` in `room` mentions the recipient."""
    return {
        "type": "mention",
        "room": room,
        "id": id,
        "seq": seq,
        "user": user,
        "message": message,
    }


def event_error(code: str, detail: str, ref: str | None = None) -> ErrorEvent:
    """Returns an `error` event; `ref` echoes the client_id of the frame at fault."""
    return {"type": "error", "code": code, "detail": detail, "ref": ref}


def encode(event: ServerEvent) -> str:
    """Returns the JSON text of a server event (done once per event, not per socket)."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def encode_frame(event: ServerEvent, *, batch: bool) -> str:
    """Returns one event as a frame: an array of one for a `chat.batch` socket."""
    text = encode(event)
    return f"[{text}]" if batch else text
