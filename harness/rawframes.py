"""WebSocket frames built by hand, over a plain TCP socket: what no well-behaved
client library will send (reserved bits, unmasked client frames, oversized or
fragmented control frames, unknown opcodes, invalid UTF-8), to test how the
server treats a broken or hostile peer (RFC 6455, section 5).

Standard library only, blocking, every read bounded by a timeout.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
from dataclasses import dataclass

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# RFC 6455, section 1.3: the server proves it read the key with this.
HANDSHAKE_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def encode_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """Returns one frame's bytes, as asked, valid or not.

    `rsv` is the three reserved bits (0-7); `mask` False sends the payload
    unmasked, which a client must never do; `length` overrides the length
    field (to lie about it).
    """
    first = (0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)
    size = len(payload) if length is None else length
    mask_bit = 0x80 if mask else 0
    if size < 126:
        header = struct.pack("!BB", first, mask_bit | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not mask:
        return header + payload
    key = os.urandom(4)
    masked = bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
    return header + key + masked


def close_payload(code: int, reason: bytes = b"") -> bytes:
    """Returns a close frame's payload: the code, then the reason."""
    return struct.pack("!H", code) + reason


@dataclass(frozen=True)
class Frame:
    """A frame the server sent."""

    fin: bool
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        """Returns the code of a close frame (None if it has none)."""
        if self.opcode != OP_CLOSE or len(self.payload) < 2:
            return None
        return struct.unpack("!H", self.payload[:2])[0]


class ConnectionDropped(Exception):
    """The server closed the TCP connection (no more frames will come)."""


class RawSocket:
    """One WebSocket spoken by hand over TCP: handshake, then raw frames."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buffer = b""

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        path: str,
        headers: dict[str, str],
        *,
        timeout: float = 5,
    ) -> RawSocket:
        """Connects and completes the opening handshake, or raises AssertionError
        with the server's answer."""
        sock = socket.create_connection((host, port), timeout=timeout)
        raw = cls(sock, timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = raw._read_until(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status_line + b" ":
            sock.close()
            raise AssertionError(f"handshake refused: {head!r}")
        accept = base64.b64encode(
            hashlib.sha1(key.encode() + HANDSHAKE_GUID).digest()
        ).decode()
        answered = {
            name.strip().lower(): value.strip()
            for name, _, value in (
                line.decode("latin-1").partition(":")
                for line in head.split(b"\r\n")[1:]
                if line
            )
        }
        assert answered.get("sec-websocket-accept") == accept, head
        return raw

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionDropped("the server closed the connection")
        self.buffer += chunk

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(marker, 1)
        return head + marker

    def _read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def send_raw(self, data: bytes) -> None:
        """Writes bytes as they are (one or more frames, or garbage)."""
        self.sock.sendall(data)

    def send_frame(self, opcode: int, payload: bytes = b"", **options) -> None:
        """Writes one frame (options as encode_frame's)."""
        self.send_raw(encode_frame(opcode, payload, **options))

    def receive_frame(self) -> Frame:
        """Returns the server's next frame; raises ConnectionDropped when the
        connection ends first, TimeoutError when nothing comes in time."""
        first, second = self._read_exactly(2)
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", self._read_exactly(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", self._read_exactly(8))
        # A server's frames are never masked (RFC 6455, section 5.1).
        assert not second & 0x80, "the server masked a frame"
        return Frame(bool(first & 0x80), first & 0xF, self._read_exactly(size))

    def receive_until_close(self) -> tuple[list[Frame], Frame | None]:
        """Reads until a close frame or the end of the connection.

        Returns the frames before it and the close frame (None: the connection
        dropped without one).
        """
        frames: list[Frame] = []
        while True:
            try:
                frame = self.receive_frame()
            except (ConnectionDropped, ConnectionResetError):
                return frames, None
            if frame.opcode == OP_CLOSE:
                return frames, frame
            frames.append(frame)

    def answer_close(self, close: Frame) -> None:
        """Echoes the server's close code, as RFC 6455 asks (section 5.5.1); a
        server that ended the connection already is fine too."""
        try:
            self.send_frame(OP_CLOSE, close.payload[:2])
        except (BrokenPipeError, ConnectionResetError):
            pass

    def connection_ends(self) -> bool:
        """True when the server ends the TCP connection (after a close, or not)
        within the timeout; the bytes it sends first are dropped."""
        try:
            while True:
                self._fill()
                self.buffer = b""
        except (ConnectionDropped, ConnectionResetError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def http_exchange(host: str, port: int, request: bytes, *, timeout: float = 5) -> bytes:
    """Sends raw HTTP request bytes; returns everything the server answers
    before it closes the connection or goes quiet for `timeout`."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            pass
        except ConnectionResetError:
            pass
    return answer
