"""Users, sessions and rooms written straight into the bench's database.

Signing up a thousand users through the form would spend minutes hashing
passwords; the bench writes them with the ORM instead, in the same database and
with the same secret key as the workers, so their session middleware accepts
the cookies exactly as it accepts a browser's.
"""

from __future__ import annotations

import os

_ready = False


def setup_django(env: dict[str, str]) -> None:
    """Configures Django in this process with the workers' database and secret key."""
    global _ready
    if _ready:
        return
    for name in ("DATABASE_URL", "DJANGO_SECRET_KEY", "DJANGO_DEBUG"):
        os.environ[name] = env[name]
    os.environ["DJANGO_SETTINGS_MODULE"] = "chatproject.settings"
    os.environ.pop("REDIS_URL", None)
    import django

    django.setup()
    _ready = True


def create_users(count: int, prefix: str = "bench") -> list[str]:
    """Creates `count` users with unusable passwords; returns one sessionid each."""
    from datetime import timedelta

    from django.contrib.auth import (
        BACKEND_SESSION_KEY,
        HASH_SESSION_KEY,
        SESSION_KEY,
        get_user_model,
    )
    from django.contrib.auth.hashers import make_password
    from django.contrib.sessions.backends.db import SessionStore
    from django.contrib.sessions.models import Session
    from django.db import transaction
    from django.utils import timezone
    from django.utils.crypto import get_random_string

    User = get_user_model()
    names = [f"{prefix}{index}" for index in range(count)]
    with transaction.atomic():
        User.objects.bulk_create(
            [User(username=name, password=make_password(None)) for name in names],
            batch_size=500,
        )
    users = {user.username: user for user in User.objects.filter(username__in=names)}
    store = SessionStore()
    expire = timezone.now() + timedelta(days=1)
    rows, keys = [], []
    for name in names:
        user = users[name]
        key = get_random_string(32, "abcdefghijklmnopqrstuvwxyz0123456789")
        data = {
            SESSION_KEY: str(user.pk),
            BACKEND_SESSION_KEY: "django.contrib.auth.backends.ModelBackend",
            HASH_SESSION_KEY: user.get_session_auth_hash(),
        }
        rows.append(
            Session(
                session_key=key, session_data=store.encode(data), expire_date=expire
            )
        )
        keys.append(key)
    with transaction.atomic():
        Session.objects.bulk_create(rows, batch_size=500)
    return keys


def check_session(sessionid: str) -> bool:
    """Whether a session the bench wrote resolves to a user, as the workers see it."""
    from django.contrib.auth import SESSION_KEY
    from django.contrib.sessions.backends.db import SessionStore

    return SESSION_KEY in SessionStore(session_key=sessionid).load()


def create_rooms(slugs: list[str]) -> None:
    """Creates the chat's rooms (the baseline needs none: its groups are implicit)."""
    from chat.models import Room

    Room.objects.bulk_create([Room(slug=slug) for slug in slugs], ignore_conflicts=True)
