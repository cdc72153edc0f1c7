"""What daphne's transport still holds for a socket, visible to the application.

daphne has no write backpressure (daphne#170): a send never waits, and a client
that stops reading makes Twisted buffer for it without limit. `install` (run by
chatproject.asgi, so it holds under plain `daphne` too) puts a probe into each
WebSocket scope; the socket's writer looks at it and waits while it is full.
Under a server with backpressure (uvicorn) there is no probe: its send waits.

`install` also lets through the close codes a server has to say: daphne's
WebSocket library (autobahn) lets an application close only with 1000 or
3000-4999, but RFC 6455 reserves 1001 (going away), 1011, 1012 (restart) and
1013 (try again later) for exactly that, and a page that never hears them
stays on a socket that no longer gets its room's messages.

The probe can also write a prepared frame (`prepare_text_frame`) straight to
the transport: a room's broadcast is the same frame for every socket that has
the same events queued, and a server's frames are not masked, so a write round
builds it once and hands the same bytes to each socket, where autobahn would
build and encode it once per socket (gorilla's PreparedMessage does the same).

And it makes autobahn fail a connection the way RFC 6455 (section 7.1.7) says
it should: a close frame with the reason's code (1002 protocol error, 1007
invalid UTF-8, 1009 too big) before the TCP connection ends, where daphne's
factory would drop it without a word and the client sees only 1006.
"""

from __future__ import annotations

import struct
import weakref
from dataclasses import dataclass
from typing import Any

from chat import protocol

# The scope extension that carries the probe.
EXTENSION = "chat.transport"

# Codes a server may send that autobahn's sendClose refuses (1008: policy
# violation; 1009: message too big; 1011: internal error).
SERVER_CLOSE_CODES = frozenset(
    {
        protocol.CLOSE_GOING_AWAY,
        protocol.CLOSE_POLICY_VIOLATION,
        1009,
        1011,
        protocol.CLOSE_SERVICE_RESTART,
        protocol.CLOSE_TRY_AGAIN_LATER,
    }
)


def server_close(protocol: Any, code: int | None = None) -> None:
    """daphne's WebSocketProtocol.serverClose, letting SERVER_CLOSE_CODES through."""
    code = 1000 if code is None else code
    if code in SERVER_CLOSE_CODES:
        protocol.sendCloseFrame(code=code, isReply=False)
    else:
        protocol.sendClose(code=code)


# RFC 6455 section 5.2: FIN and the text opcode; a server's frames carry no mask.
_FIN_TEXT = 0x81


@dataclass(frozen=True, slots=True)
class PreparedFrame:
    """One text message, and its whole unmasked WebSocket frame."""

    text: str
    data: bytes
    payload_size: int


def prepare_text_frame(text: str) -> PreparedFrame:
    """Builds the frame a server sends for `text` (unfragmented, uncompressed)."""
    payload = text.encode()
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", _FIN_TEXT, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", _FIN_TEXT, 126, size)
    else:
        header = struct.pack("!BBQ", _FIN_TEXT, 127, size)
    return PreparedFrame(text, header + payload, size)


class TransportProbe:
    """Reads the unsent bytes of one daphne WebSocket's Twisted transport, and
    writes prepared frames to it."""

    def __init__(self, protocol: Any) -> None:
        self._protocol = weakref.ref(protocol)

    def buffered(self) -> int:
        """Returns the bytes written but not yet taken by the kernel (0 if gone)."""
        protocol = self._protocol()
        transport = getattr(protocol, "transport", None)
        if transport is None:
            return 0
        # twisted.internet.abstract.FileDescriptor keeps unsent data in
        # dataBuffer (from offset on) and in _tempDataBuffer (_tempDataLen).
        data = getattr(transport, "dataBuffer", b"")
        offset = getattr(transport, "offset", 0)
        return len(data) - offset + getattr(transport, "_tempDataLen", 0)

    def write_frame(self, frame: PreparedFrame) -> bool:
        """Writes a prepared frame as autobahn's sendMessage would; False if it cannot.

        Only where sendMessage would write that same frame at once: the socket
        is open, nothing of autobahn's is queued or half sent, no compression
        was negotiated and the message is within its fragment and size limits.
        Otherwise the caller sends the text the usual way.
        """
        protocol = self._protocol()
        if (
            protocol is None
            or protocol.state != protocol.STATE_OPEN
            or protocol.send_state != protocol.SEND_STATE_GROUND
            or protocol.send_queue
            or protocol._perMessageCompress is not None
            or 0 < protocol.autoFragmentSize < frame.payload_size
            or 0 < protocol.maxMessagePayloadSize < frame.payload_size
        ):
            return False
        protocol.transport.write(frame.data)
        return True


def scope_probe(scope: dict[str, Any]) -> TransportProbe | None:
    """Returns the probe of a socket's scope, or None (no daphne, or unknown)."""
    return (scope.get("extensions") or {}).get(EXTENSION)


def _install_eager_writes() -> None:
    """Makes Twisted's TCP transports write at once when nothing is waiting.

    Twisted buffers every write and sends it on the reactor's next turn, which
    costs two epoll registrations and a callback per frame: with the event
    loop's own transports (asyncio, uvicorn) a write first tries the socket.
    This does the same; anything the kernel does not take is buffered as
    before, so the probe above still sees a socket that does not drain.
    """
    from twisted.internet import tcp

    if getattr(tcp.Connection.write, "chat_eager", False):
        return
    buffered_write = tcp.Connection.write

    def write(self, data: bytes) -> None:
        if (
            data
            and self.connected
            and not self._writeDisconnected
            and not getattr(self, "TLS", False)
            and not self._tempDataLen
            and self.offset == len(self.dataBuffer)
        ):
            sent = self.writeSomeData(data)
            if isinstance(sent, int):
                if sent == len(data):
                    return
                data = data[sent:]
        buffered_write(self, data)

    write.chat_eager = True
    tcp.Connection.write = write


def _install_close_on_failure() -> None:
    """Makes every daphne WebSocket factory fail connections with a close frame.

    autobahn's servers default to failByDrop: a frame over the size limit or a
    broken one ends the TCP connection at once. daphne sets its options when it
    builds the factory, after the application (this module) is imported.
    """
    from daphne.ws_protocol import WebSocketFactory

    if getattr(WebSocketFactory.setProtocolOptions, "chat_close_on_failure", False):
        return
    set_options = WebSocketFactory.setProtocolOptions

    def setProtocolOptions(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("failByDrop", False)
        set_options(self, *args, **kwargs)

    setProtocolOptions.chat_close_on_failure = True
    WebSocketFactory.setProtocolOptions = setProtocolOptions


def install() -> bool:
    """Adds the probe to every WebSocket scope daphne builds; True if daphne is here."""
    try:
        from daphne.server import Server
    except ImportError:
        return False
    from daphne.ws_protocol import WebSocketProtocol
    from twisted.internet.interfaces import ISSLTransport

    WebSocketProtocol.serverClose = server_close
    _install_eager_writes()
    _install_close_on_failure()
    if getattr(Server.create_application, "chat_probe", False):
        return True
    create_application = Server.create_application

    def create_application_with_probe(self, protocol, scope):
        if scope.get("type") == "websocket":
            extensions = dict(scope.get("extensions") or {})
            extensions[EXTENSION] = TransportProbe(protocol)
            scope["extensions"] = extensions
            # daphne leaves out the optional `scheme`, which the Origin check
            # needs: TLS terminated by daphne itself (`-e ssl:`), or a proxy's
            # X-Forwarded-Proto under --proxy-headers.
            forwarded = getattr(protocol, "client_scheme", None)
            secure = forwarded in ("https", "wss") or ISSLTransport.providedBy(
                getattr(protocol, "transport", None)
            )
            scope.setdefault("scheme", "wss" if secure else "ws")
        return create_application(self, protocol, scope)

    create_application_with_probe.chat_probe = True
    Server.create_application = create_application_with_probe
    return True
