"""Who is on a socket: the Django session's user, read after the handshake.

Channels' AuthMiddlewareStack reads the user before the consumer runs, so a
handshake waits for the database thread (one per worker) before it is even
accepted, and under a storm of handshakes daphne drops the ones that wait
longer than its accept timeout (5 s) without a close code. Here the stack
only attaches the session; the consumer accepts first and then reads the user
(`session_user`) on the database thread, so each socket gets a welcome or a
close code that says why, however many arrive at once.
"""

from __future__ import annotations

from importlib import import_module
from types import SimpleNamespace

from channels.sessions import CookieMiddleware, SessionMiddleware
from django.conf import settings
from django.contrib import auth
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser


def SocketAuthStack(inner):
    """Cookies and the session for `inner`; the user is read by the consumer."""
    return CookieMiddleware(SessionMiddleware(inner))


def session_user(session) -> AbstractBaseUser | AnonymousUser:
    """Returns the user signed in to `session` (AnonymousUser if none). Sync.

    Django's own check, as for a request: the session's user must exist, use a
    configured backend and still match the password hash the session holds.
    """
    return auth.get_user(SimpleNamespace(session=session))


def still_signed_in(session_key: str | None, user_id: int) -> bool:
    """Returns whether session `session_key` still signs in user `user_id`. Sync.

    Reads the session afresh, as the next request would: a logout, a new
    password (the session's hash no longer matches), deactivation or deletion
    make it False. A socket given its user without a session (an embedding
    app's own auth) is checked against the user row only.
    """
    if session_key is None:
        User = auth.get_user_model()
        return User._default_manager.filter(pk=user_id, is_active=True).exists()
    session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    user = session_user(session)
    return user.is_authenticated and user.pk == user_id
