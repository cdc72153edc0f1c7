"""A quiet socket through nginx (deploy/nginx.conf) lives on daphne's pings.

nginx ends a proxied WebSocket when the upstream sends nothing for
proxy_read_timeout. A room can be quiet for longer than that; the worker's
keepalive pings (daphne's --ping-interval, 20 s by default, under the hour the
configuration allows) are what keep such a socket open. Here the timeout is
3 s and the pings come every second: a socket quiet for 8 s still chats.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest

from deploy.cluster import nginx_config
from harness.client import ChatSocket
from harness.processes import LOOPBACK, Nginx, free_port
from tests.conftest import assert_event
from tests.integration.conftest import (
    WORKER_COMMAND,
    create_room,
    new_account,
    unique_name,
)

pytestmark = pytest.mark.integration

NGINX_IDLE_TIMEOUT_SECONDS = 3
QUIET_SECONDS = 8


@pytest.fixture
def nginx_in_front(daphne_factory):
    """Starts a worker that pings every second and nginx with a 3 s idle timeout."""
    server = daphne_factory(command=[*WORKER_COMMAND, "--ping-interval", "1"])
    prefix = Path(tempfile.mkdtemp(prefix="chat-nginx-"))
    listen = f"{LOOPBACK}:{free_port()}"
    nginx = Nginx(
        prefix,
        config=nginx_config(
            prefix,
            listen=listen,
            upstreams=[server.port],
            static_root=prefix / "static",
            idle_timeout=f"{NGINX_IDLE_TIMEOUT_SECONDS}s",
        ),
        listen=listen,
    )
    nginx.start()
    try:
        yield server, f"http://{listen}"
    finally:
        nginx.stop()
        shutil.rmtree(prefix, ignore_errors=True)


async def test_a_socket_quiet_past_nginxs_read_timeout_still_chats(nginx_in_front):
    server, proxied = nginx_in_front
    account = new_account(server.base_url, "idle")
    room = unique_name("quiet")
    create_room(server.base_url, account.sessionid, room)
    socket = await ChatSocket.open(proxied, room, sessionid=account.sessionid)
    try:
        await socket.receive_type("welcome")
        await asyncio.sleep(QUIET_SECONDS)
        assert socket.connection.close_code is None, (
            f"nginx closed the quiet socket ({socket.connection.close_code}):\n"
            + server.output(2000)
        )
        echo = await socket.post("still here")
        assert_event(echo, "message", message="still here")
    finally:
        await socket.close()
