"""The worker process: daphne, plus a graceful drain on SIGTERM and the close codes
a server needs. Run it exactly like daphne:

    python -m chatproject.server -b 127.0.0.1 -p 8001 chatproject.asgi:application

* The close codes a server needs (1001, 1011, 1012, 1013), which daphne's
  autobahn refuses, go through under any daphne command: chat/transport.py
  lets them through, from chatproject.asgi.
* On SIGTERM daphne stops the reactor and cancels every consumer, so sockets
  drop without a close frame and no disconnect handler runs. Here SIGTERM stops
  accepting connections, closes each socket with 1001 so the client reconnects
  to another worker at once, waits for them (at most CHAT_DRAIN_SECONDS), then
  stops. A second SIGTERM or SIGINT stops at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

from daphne.cli import CommandLineInterface
from daphne.server import Server
from daphne.ws_protocol import WebSocketProtocol
from django.conf import settings
from twisted.internet import reactor

from chat.protocol import CLOSE_GOING_AWAY

logger = logging.getLogger("chatproject.server")


# The most a drain waits for its lease to be marked `stopping` before it
# closes the sockets all the same.
STOPPING_WAIT_SECONDS = 1.0


def drain_seconds() -> float:
    """Returns how long a drain may wait for the sockets (CHAT_DRAIN_SECONDS)."""
    return settings.CHAT_DRAIN_SECONDS


class DrainingServer(Server):
    """daphne's Server with a drain step in front of its shutdown."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["signal_handlers"] = False
        super().__init__(*args, **kwargs)
        self.ports: list = []
        self.draining = False

    def listen_success(self, port) -> None:
        self.ports.append(port)
        super().listen_success(port)

    def run(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        super().run()

    def _on_signal(self, signum, frame) -> None:
        reactor.callFromThread(self.drain if not self.draining else self.stop)

    def open_websockets(self) -> list[WebSocketProtocol]:
        return [
            protocol
            for protocol, details in self.connections.items()
            if isinstance(protocol, WebSocketProtocol) and "disconnected" not in details
        ]

    def drain(self) -> None:
        """Stops listening, closes every socket with 1001, stops once they are gone."""
        from chat.worker import begin_drain

        self.draining = True
        deadline = time.monotonic() + drain_seconds()
        # Sockets closed from here on keep their presence rows: their users are
        # reconnecting elsewhere, and the lease sweep settles who really left.
        # Their rows must no longer count toward the caps by the time those
        # reconnects arrive: the sockets close once the lease says `stopping`
        # (or after STOPPING_WAIT_SECONDS, should the database be slow).
        marked = begin_drain()
        for port in self.ports:
            port.stopListening()
        closing = [False]

        def close_sockets(*_: object) -> None:
            if closing[0]:
                return
            closing[0] = True
            self._close_sockets(deadline)

        if marked is None:
            close_sockets()
            return
        marked.add_done_callback(close_sockets)
        reactor.callLater(STOPPING_WAIT_SECONDS, close_sockets)

    def _close_sockets(self, deadline: float) -> None:
        sockets = self.open_websockets()
        logger.info(
            "draining: closing %d socket(s) with %d", len(sockets), CLOSE_GOING_AWAY
        )
        for protocol in sockets:
            if protocol.state == protocol.STATE_OPEN:
                protocol.sendCloseFrame(
                    code=CLOSE_GOING_AWAY,
                    reasonUtf8=b"server going away",
                    isReply=False,
                )
        self._stop_when_drained(deadline)

    def busy_applications(self) -> int:
        """Returns how many application instances still run (e.g. a disconnect)."""
        instances = [
            details.get("application_instance") for details in self.connections.values()
        ]
        return sum(1 for instance in instances if instance and not instance.done())

    def _stop_when_drained(self, deadline: float) -> None:
        left = self.open_websockets()
        # A closed socket's disconnect handler may still be writing presence and
        # broadcasting `leave`: let it finish while the event loop still runs.
        busy = self.busy_applications()
        if not (left or busy) or time.monotonic() >= deadline:
            if left or busy:
                logger.warning(
                    "drain timed out with %d socket(s) open, %d handler(s) running",
                    len(left),
                    busy,
                )
            self.stop()
            return
        reactor.callLater(0.1, self._stop_when_drained, deadline)


class WorkerCommandLine(CommandLineInterface):
    server_class = DrainingServer


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
    WorkerCommandLine().run(sys.argv[1:])
    # The event loop is gone, but a thread of sync code cut off by the shutdown
    # (an on_commit broadcast, async_to_sync) waits for it forever, and a normal
    # exit joins that thread: the worker would hang until SIGKILL.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
