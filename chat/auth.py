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
from django.utils.crypto import constant_time_compare, salted_hmac


def SocketAuthStack(inner):
    """Cookies and the session for `inner`; the user is read by the consumer."""
    return CookieMiddleware(SessionMiddleware(inner))


def session_user(session) -> AbstractBaseUser | AnonymousUser:
    """Returns the user signed in to `session` (AnonymousUser if none). Sync.

    Django's own check, as auth.get_user makes it for a request: the session's
    user must exist, use a configured backend and still match the password
    hash the session holds (or a hash under SECRET_KEY_FALLBACKS). Without its
    writes: a socket cannot hand a cycled session key back to its browser, so
    cycling it would sign the browser out.
    """
    try:
        user_id = auth._get_user_session_key(SimpleNamespace(session=session))
        backend_path = session[auth.BACKEND_SESSION_KEY]
    except KeyError:
        return AnonymousUser()
    if backend_path not in settings.AUTHENTICATION_BACKENDS:
        return AnonymousUser()
    user = auth.load_backend(backend_path).get_user(user_id)
    if user is None:
        return AnonymousUser()
    if hasattr(user, "get_session_auth_hash"):
        session_hash = session.get(auth.HASH_SESSION_KEY)
        hashes = [user.get_session_auth_hash(), *user.get_session_auth_fallback_hash()]
        if not session_hash or not any(
            constant_time_compare(session_hash, known) for known in hashes
        ):
            return AnonymousUser()
    return user


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


def session_digest(session_key: str) -> str:
    """Names a session in a channel-layer message without its key, which would
    sign anyone in who read it off Redis."""
    return salted_hmac("chat.access.session", session_key).hexdigest()
