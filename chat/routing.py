"""WebSocket URL patterns."""

from django.urls import re_path

from chat.consumers import ChatConsumer

# Any name up to the slash reaches the consumer, which closes an invalid or
# unknown one with 4404 rather than failing the handshake without a reason.
websocket_urlpatterns = [
    re_path(r"^ws/chat/(?P<room>[^/]{1,200})/$", ChatConsumer.as_asgi()),
]
