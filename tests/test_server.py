"""The worker process: the close codes daphne lets through, and the drain."""

from __future__ import annotations

import pytest
from daphne.ws_protocol import WebSocketProtocol

from chat import protocol, transport
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
    assert set(server_side_close_codes()) <= transport.SERVER_CLOSE_CODES


def test_the_asgi_app_lets_them_through_under_any_daphne_command():
    import chatproject.asgi  # noqa: F401  (plain `daphne` loads only this)

    assert WebSocketProtocol.serverClose is transport.server_close


@pytest.mark.parametrize("code", server_side_close_codes())
def test_a_server_side_code_is_sent_as_it_is(code):
    ws = RecordingProtocol()
    transport.server_close(ws, code)
    assert ws.sent == [("frame", code)]


@pytest.mark.parametrize("code", [None, 1000, protocol.CLOSE_FORBIDDEN])
def test_application_codes_go_through_autobahn_as_before(code):
    ws = RecordingProtocol()
    transport.server_close(ws, code)
    assert ws.sent == [("close", 1000 if code is None else code)]


# ---------------------------------------------------------------------------
# Drain (SIGTERM)
# ---------------------------------------------------------------------------


class OpenSocket(WebSocketProtocol):
    """An open socket as DrainingServer finds it in daphne's connections."""

    def __init__(self) -> None:
        self.state = self.STATE_OPEN
        self.sent: list[int] = []

    def sendCloseFrame(self, code=None, reasonUtf8=None, isReply=False) -> None:
        self.sent.append(code)


@pytest.fixture
def draining_server(monkeypatch):
    """A DrainingServer with one open socket, whose wait for it is recorded."""
    from chat import worker

    # drain() marks this process as draining; the tests after this one must not be.
    monkeypatch.setattr(worker, "_draining", False)
    instance = server.DrainingServer.__new__(server.DrainingServer)
    instance.ports = []
    instance.draining = False
    instance.socket = OpenSocket()
    instance.connections = {instance.socket: {}}
    instance.deadlines = []
    monkeypatch.setattr(instance, "_stop_when_drained", instance.deadlines.append)
    return instance


def test_drain_closes_every_socket_with_1001(draining_server):
    draining_server.drain()
    assert draining_server.socket.sent == [protocol.CLOSE_GOING_AWAY]


def test_drain_waits_at_most_chat_drain_seconds(draining_server, settings, monkeypatch):
    settings.CHAT_DRAIN_SECONDS = 2.5
    monkeypatch.setattr(server.time, "monotonic", lambda: 100.0)
    draining_server.drain()
    assert draining_server.deadlines == [102.5]
