"""The handshake's Origin check (chat.origins), on scopes as daphne builds them."""

from __future__ import annotations

import pytest

from chat.origins import origin_allowed


def scope(origin: str | None, host: str | None = "chat.example:8000", **extra):
    headers = [(b"host", host.encode())] if host is not None else []
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return {"type": "websocket", "scheme": "ws", "headers": headers, **extra}


@pytest.fixture(autouse=True)
def hosts(settings):
    settings.ALLOWED_HOSTS = ["chat.example"]
    settings.CSRF_TRUSTED_ORIGINS = []
    settings.SECURE_PROXY_SSL_HEADER = None


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://chat.example:8000", True),
        ("http://chat.example:8001", False),  # another port: another app
        ("https://chat.example:8000", False),  # another scheme
        ("http://chat.example", False),
        ("http://evil.example", False),
        ("null", False),
        (None, False),
    ],
)
def test_only_the_sockets_own_origin_passes(origin, allowed):
    assert origin_allowed(scope(origin)) is allowed


def test_a_default_port_is_the_same_origin_written_or_not():
    assert origin_allowed(scope("http://chat.example", host="chat.example:80"))
    assert origin_allowed(scope("http://chat.example:80", host="chat.example"))
    assert not origin_allowed(scope("http://chat.example:80", host="chat.example:81"))


def test_an_ipv6_host_is_its_own_origin(settings):
    settings.ALLOWED_HOSTS = ["[::1]"]
    assert origin_allowed(scope("http://[::1]:8000", host="[::1]:8000"))
    assert not origin_allowed(scope("http://[::1]:8001", host="[::1]:8000"))


def test_a_host_that_is_not_allowed_is_refused_even_with_its_own_origin():
    assert not origin_allowed(scope("http://evil.example", host="evil.example"))


def test_over_tls_the_origin_is_https():
    tls = scope("https://chat.example:8000", scheme="wss")
    assert origin_allowed(tls)
    assert not origin_allowed(scope("http://chat.example:8000", scheme="wss"))


def test_behind_a_tls_proxy_its_header_says_https(settings):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    proxied = scope("https://chat.example", host="chat.example")
    assert not origin_allowed(proxied)
    proxied["headers"].append((b"x-forwarded-proto", b"https"))
    assert origin_allowed(proxied)


def test_a_trusted_origin_passes(settings):
    settings.CSRF_TRUSTED_ORIGINS = ["https://app.example"]
    assert origin_allowed(scope("https://app.example"))


def test_without_a_host_header_the_host_name_is_checked():
    # Only an in-process test client sends no Host.
    assert origin_allowed(scope("http://chat.example", host=None))
    assert not origin_allowed(scope("http://evil.example", host=None))
