"""The worker launcher: the close codes it lets through (no daphne process)."""

from __future__ import annotations

import pytest

from chat import protocol
from chatproject import server


class RecordingProtocol:
    """Stands in for daphne's WebSocketProtocol: records how a close was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def sendCloseFrame(self, code: int, isReply: bool = False) -> None:
        self.sent.append(("frame", code))

    def sendClose(self, code: int) -> None:
        self.sent.append(("close", code))


def server_side_close_codes() -> list[int]:
    """The protocol's close codes from RFC 6455's range (below 3000)."""
    return sorted(
        value
        for name, value in vars(protocol).items()
        if name.startswith("CLOSE_") and value < 3000
    )


def test_every_server_side_close_code_of_the_protocol_gets_through():
    assert set(server_side_close_codes()) <= server.SERVER_CLOSE_CODES


def test_1008_is_not_let_through_since_nothing_sends_it():
    assert 1008 not in server.SERVER_CLOSE_CODES


@pytest.mark.parametrize("code", server_side_close_codes())
def test_a_server_side_code_is_sent_as_it_is(code):
    ws = RecordingProtocol()
    server._server_close(ws, code)
    assert ws.sent == [("frame", code)]


@pytest.mark.parametrize("code", [None, 1000, protocol.CLOSE_FORBIDDEN])
def test_application_codes_go_through_autobahn_as_before(code):
    ws = RecordingProtocol()
    server._server_close(ws, code)
    assert ws.sent == [("close", 1000 if code is None else code)]
