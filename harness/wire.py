"""What a client of the chat's WebSocket protocol (docs/protocol.md) must know:
a room socket's URL, the handshake's headers, the frames it sends, how the
server's frames decode and which closes deserve a reconnect.

Pure, like chat/protocol.py, whose names it uses: the test clients and the
bench's load generator share it.
"""

from __future__ import annotations

import json
from typing import Any

from chat.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY_VIOLATION,
    CLOSE_SERVICE_RESTART,
    SUBPROTOCOL_BATCH,
)

__all__ = [
    "CLOSE_ABNORMAL",
    "SUBPROTOCOL_BATCH",
    "decode_events",
    "handshake_headers",
    "message_frame",
    "reconnect_wait",
    "reconnects_after",
    "socket_url",
    "view_after",
]

# What a client sees when the connection ends without a close frame.
CLOSE_ABNORMAL = 1006


def reconnects_after(code: int) -> bool:
    """Whether the page reconnects after a close with `code` (connection.js,
    docs/protocol.md): after any close but the policy ones, 1008 and the 44xx
    refusals (4008, too slow, is a 40xx: it reconnects). So also after 1011
    (the server failed) or 1009: a client that stopped there would leave its
    user offline for good, and its unacknowledged posts unsent. (After a
    4401 that follows a welcome the page checks its sign-in once more; a
    test page stops, as its session does not change.)"""
    return code != CLOSE_POLICY_VIOLATION and not 4400 <= code < 4500


# The page's backoff starts afresh after a socket that stayed open this long
# (STABLE_AFTER_MS in connection.js): a drop now and then is no sign of trouble.
STABLE_AFTER_SECONDS = 10
# A test client's backoff: shorter than the page's (BACKOFF_BASE_MS 500, full
# jitter), so that tests do not wait, and doubling up to a second.
RECONNECT_FIRST_SECONDS = 0.1
RECONNECT_CAP_SECONDS = 1.0


def reconnect_wait(previous: float | None, code: int, open_seconds: float) -> float:
    """Returns how long to wait before reconnecting after a close with `code`
    of a socket that had been open `open_seconds`, the last wait having been
    `previous` (None: none yet).

    The wait doubles while sockets keep failing, and starts again from the
    first, as the page's does, after a server's close on purpose (1001, 1012)
    and after a socket that was stable.
    """
    if (
        previous is None
        or code in (CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART)
        or open_seconds >= STABLE_AFTER_SECONDS
    ):
        return RECONNECT_FIRST_SECONDS
    return min(previous * 2, RECONNECT_CAP_SECONDS)


def socket_url(base_url: str, room: str, query: str = "") -> str:
    """Returns the URL of a room's socket on the server at `base_url` (http or
    https), with `query` (e.g. "since=12") when given."""
    scheme, rest = base_url.split("://", 1)
    ws = "wss" if scheme == "https" else "ws"
    return f"{ws}://{rest.rstrip('/')}/ws/chat/{room}/" + (f"?{query}" if query else "")


def handshake_headers(origin: str, sessionid: str | None = None) -> dict[str, str]:
    """Returns the headers a page's socket sends: its Origin (the server refuses
    a foreign one) and the session cookie that signs it in."""
    headers = {"Origin": origin}
    if sessionid is not None:
        headers["Cookie"] = f"sessionid={sessionid}"
    return headers


def message_frame(text: str, client_id: str | None = None) -> dict[str, Any]:
    """Returns a post; the room's copy of it carries the same `client_id`."""
    frame: dict[str, Any] = {"type": "message", "message": text}
    if client_id is not None:
        frame["client_id"] = client_id
    return frame


def decode_events(text: str | bytes) -> list[dict[str, Any]]:
    """Returns the events of one server frame: a `chat.batch` frame is a JSON
    array of events, in order; any other frame is one event."""
    decoded = json.loads(text)
    return decoded if isinstance(decoded, list) else [decoded]


def view_after(view: set[str] | None, event: dict[str, Any]) -> set[str] | None:
    """Returns the member list as the page shows it after `event`: a welcome's
    members, then each presence diff's joins added and leaves removed (a diff
    before any welcome changes nothing when `view` is None)."""
    kind = event.get("type")
    if kind == "welcome":
        return set(event["members"])
    if kind == "presence" and view is not None:
        return (view | set(event["joins"])) - set(event["leaves"])
    return view
