"""ASGI entry point: HTTP goes to Django, WebSockets through Origin and auth checks.

The Django ASGI app is built before chat.routing is imported, so that the app
registry is ready before any model is touched.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from chat import transport  # noqa: E402
from chat.auth import SocketAuthStack  # noqa: E402
from chat.origins import OriginValidator  # noqa: E402
from chat.routing import websocket_urlpatterns  # noqa: E402

# Under daphne (plain or the launcher), lets each socket see its transport's
# unsent bytes: daphne has no write backpressure of its own.
transport.install()

# In DEBUG a bare `daphne` serves the apps' /static/ folders itself; otherwise
# WhiteNoise (a middleware) serves the collected files, and nginx may too.
http_app = (
    ASGIStaticFilesHandler(django_asgi_app) if settings.DEBUG else django_asgi_app
)


application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": OriginValidator(SocketAuthStack(URLRouter(websocket_urlpatterns))),
    }
)
