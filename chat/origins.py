"""Which pages may open a chat socket: the Origin check of the handshake.

channels' AllowedHostsOriginValidator compares the host name only, so a page
of the same host on another port or scheme (another app on that machine, or
plain http beside https) could open sockets with the user's cookie. Here, as
Django's CSRF check does for forms, the Origin must be the handshake's own
`scheme://host[:port]`, with an allowed host, or one of CSRF_TRUSTED_ORIGINS.
The scheme is https when the handshake came over TLS, or through a proxy that
says so in SECURE_PROXY_SSL_HEADER (DJANGO_HTTPS). Each refusal is logged.
"""

from __future__ import annotations

import logging
from urllib.parse import urlparse

from channels.security.websocket import AllowedHostsOriginValidator, WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host

security_log = logging.getLogger("chat.security")


def scope_header(scope, name: bytes) -> str | None:
    """Returns header `name` (lower case) of an ASGI scope, or None."""
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _secure(scope) -> bool:
    if scope.get("scheme") in ("wss", "https"):
        return True
    proxy = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy:
        name, value = proxy
        header = name.removeprefix("HTTP_").replace("_", "-").lower().encode()
        return scope_header(scope, header) == value
    return False


DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_parts(url: str) -> tuple[str, str, int] | None:
    """Returns (scheme, host, port) of an origin, the port filled in; None if
    it is not one (`null`, a path, user info, another scheme)."""
    try:
        parsed = urlparse(url)
        port = parsed.port
    except ValueError:
        return None
    if (
        parsed.scheme not in DEFAULT_PORTS
        or not parsed.hostname
        or parsed.username is not None
        or parsed.path not in ("", "/")
        or parsed.query
    ):
        return None
    return parsed.scheme, parsed.hostname, port or DEFAULT_PORTS[parsed.scheme]


def origin_allowed(scope) -> bool:
    """Returns whether the handshake's Origin may open a socket."""
    origin = scope_header(scope, b"origin")
    if origin is None:
        return False
    if origin in settings.CSRF_TRUSTED_ORIGINS:
        return True
    host = scope_header(scope, b"host")
    if host is None:
        # HTTP/1.1 requires Host, so only an in-process test client lacks it:
        # then the host name alone, as channels checks it.
        return AllowedHostsOriginValidator(None).valid_origin(urlparse(origin))
    domain, _ = split_domain_port(host)
    if not domain or not validate_host(domain, settings.ALLOWED_HOSTS):
        return False
    own = _origin_parts(("https://" if _secure(scope) else "http://") + host)
    return own is not None and _origin_parts(origin) == own


class OriginValidator:
    """Lets a handshake through to `application` only from an allowed Origin;
    any other gets a 403 (no socket), and a line in the security log."""

    def __init__(self, application) -> None:
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket" or origin_allowed(scope):
            return await self.application(scope, receive, send)
        client = scope.get("client")
        security_log.warning(
            "socket refused with 403 (origin not allowed): user -, address %s, "
            "origin %r, host %r, path %r",
            client[0] if client else "-",
            scope_header(scope, b"origin") or "",
            scope_header(scope, b"host") or "",
            scope.get("path", ""),
        )
        return await WebsocketDenier()(scope, receive, send)
