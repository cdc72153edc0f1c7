"""WebSocket URL patterns."""

from django.urls import re_path

from chat.consumers import ChatConsumer
from chat.protocol import CLOSE_NO_SUCH_ROOM


async def refuse_unrouted_socket(scope, receive, send) -> None:
    """Called for a socket path no route matches (`/ws/chat//`, a 201-character
    name, `..%2Fx`): accepted, then closed with 4404 like an invalid room name.

    Without it channels' URLRouter raises, which logs a traceback and answers
    the handshake with a 500.
    """
    message = await receive()
    if message["type"] == "websocket.connect":
        # Accept first: a close before accept is an HTTP 403 with no code.
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": CLOSE_NO_SUCH_ROOM})


# Any name up to the slash reaches the consumer, which closes an invalid or
# unknown one with 4404 rather than failing the handshake without a reason;
# any other path gets the same 4404.
websocket_urlpatterns = [
    re_path(r"^ws/chat/(?P<room>[^/]{1,200})/$", ChatConsumer.as_asgi()),
    re_path(r"", refuse_unrouted_socket),
]
