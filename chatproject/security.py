"""The Content-Security-Policy of every answer.

The pages load their scripts and styles from /static/ only (no inline script,
no inline style attribute), and talk to their own origin (the WebSocket
included), so the policy allows exactly that. Django's admin keeps some inline
styles of its own; under /admin/ styles may be inline, scripts still may not.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse

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
