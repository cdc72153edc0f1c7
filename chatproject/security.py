"""The Content-Security-Policy of every answer.

The pages load their scripts and styles from /static/ only (no inline script,
no inline style attribute), and talk to their own origin (the WebSocket
included), so the policy allows exactly that. Django's admin keeps some inline
styles of its own; under /admin/ styles may be inline, scripts still may not.
"""

from __future__ import annotations

from collections.abc import Callable

from asgiref.sync import iscoroutinefunction
from django.http import HttpRequest, HttpResponse
from django.utils.decorators import sync_and_async_middleware

POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'none'"
)
ADMIN_POLICY = POLICY.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")


def policy_for(path: str) -> str:
    return ADMIN_POLICY if path.startswith("/admin/") else POLICY


def with_policy(request: HttpRequest, response: HttpResponse) -> HttpResponse:
    response.headers.setdefault("Content-Security-Policy", policy_for(request.path))
    return response


@sync_and_async_middleware
def content_security_policy_middleware(get_response: Callable):
    if iscoroutinefunction(get_response):

        async def middleware(request: HttpRequest):
            return with_policy(request, await get_response(request))

    else:

        def middleware(request: HttpRequest):
            return with_policy(request, get_response(request))

    return middleware
