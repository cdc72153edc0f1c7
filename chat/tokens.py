"""API tokens: issue, authenticate, authorise, revoke, and the per-token rate limit.

Only the SHA-256 of a token is stored; the raw token exists once, when it is
created. Sync functions with keyword-only arguments, like chat.services; the
HTTP side (headers, status codes) is chat.api's business.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.cache import caches
from django.db import transaction
from django.utils import timezone

from chat.models import ApiToken, Room

logger = logging.getLogger(__name__)

# Marks a chat token, so that secret scanners and people can recognise one.
TOKEN_MARK = "chat_"
# last_used_at is written at most this often per token: one UPDATE per request
# would make every API call a write.
LAST_USED_RESOLUTION = timedelta(seconds=60)
# The cache the rate-limit counters live in (see docs/api.md, "Rate limit").
RATE_CACHE_ALIAS = "default"

# The rate limit's clock; a module attribute so tests can move time on.
clock: Callable[[], float] = time.time


class InvalidToken(Exception):
    """No such token, or it was revoked, or its owner's account is disabled."""


class TokenForbidden(Exception):
    """The token is valid but may not do this; `code` says why."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class RateLimited(Exception):
    """The token used up its requests for the current window."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"retry in {retry_after:.1f} s")
        self.retry_after = retry_after


FORBIDDEN_SCOPE = "missing_scope"
FORBIDDEN_ROOM = "room_not_allowed"
FORBIDDEN_USER = "user_not_allowed"


# ---------------------------------------------------------------------------
# Issue, authenticate, revoke
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSecret:
    raw: str
    hash: str
    prefix: str


def token_hash(raw: str) -> str:
    """Returns the SHA-256 hex digest stored for a raw token."""
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def token_secret_new() -> TokenSecret:
    """Returns a fresh random token with its hash and display prefix."""
    raw = TOKEN_MARK + secrets.token_urlsafe(32)
    prefix_length = ApiToken._meta.get_field("prefix").max_length
    return TokenSecret(raw=raw, hash=token_hash(raw), prefix=raw[:prefix_length])


def api_token_set_secret(token: ApiToken) -> str:
    """Gives an unsaved token a fresh secret; returns the raw token (shown once)."""
    secret = token_secret_new()
    token.token_hash = secret.hash
    token.prefix = secret.prefix
    return secret.raw


def api_token_create(
    *,
    owner: AbstractBaseUser,
    name: str,
    can_publish: bool = False,
    can_push: bool = False,
    push_to: str = ApiToken.PUSH_TO_OWNER,
    push_users: Iterable[AbstractBaseUser] = (),
    room: Room | None = None,
    author_name: str = "",
) -> tuple[ApiToken, str]:
    """Stores a new token; returns it and the raw token, which is not stored.

    A push-scoped token reaches its owner's own sockets unless `push_to` says
    `listed` (the `push_users`) or `anyone`.
    """
    token = ApiToken(
        owner=owner,
        name=name,
        can_publish=can_publish,
        can_push=can_push,
        push_to=push_to,
        room=room,
        author_name=author_name,
    )
    raw = api_token_set_secret(token)
    token.full_clean()
    with transaction.atomic():
        token.save()
        token.push_users.set(push_users)
    logger.info("api token %s (%s) created for %s", token.pk, token.prefix, owner.pk)
    return token, raw


def api_token_authenticate(*, raw: str) -> ApiToken:
    """Returns the live token whose raw value is `raw`, or raises InvalidToken.

    Looking up the hash (not comparing raw values) leaves no timing signal
    about the secret: the index sees only a digest of it.
    """
    token = (
        ApiToken.objects.select_related("owner", "room")
        .filter(token_hash=token_hash(raw))
        .first()
    )
    if token is None:
        raise InvalidToken("unknown token")
    if token.revoked_at is not None:
        raise InvalidToken("the token has been revoked")
    if not token.owner.is_active:
        raise InvalidToken("the token's owner account is disabled")
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        token.last_used_at = now
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token


def api_token_revoke(*, token: ApiToken) -> bool:
    """Revokes a token for good; returns False if it was revoked already."""
    now = timezone.now()
    updated = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
        revoked_at=now
    )
    if updated:
        token.revoked_at = now
        logger.info("api token %s (%s) revoked", token.pk, token.prefix)
    return bool(updated)


# ---------------------------------------------------------------------------
# What a token may do
# ---------------------------------------------------------------------------


def _check_room(token: ApiToken, slug: str) -> None:
    if token.room_id is not None and token.room.slug != slug:
        raise TokenForbidden(
            FORBIDDEN_ROOM, f"this token is restricted to room {token.room.slug!r}"
        )


def api_token_check_publish(*, token: ApiToken, slug: str) -> None:
    """Raises TokenForbidden unless the token may post into room `slug`."""
    if not token.can_publish:
        raise TokenForbidden(FORBIDDEN_SCOPE, "this token has no publish scope")
    _check_room(token, slug)


def api_token_check_read(*, token: ApiToken, slug: str) -> None:
    """Raises TokenForbidden unless the token may read room `slug`.

    Any live token may read, except that a room-restricted token sees only
    its own room: it was handed out for that room and no other.
    """
    _check_room(token, slug)


def api_token_readable_slug(*, token: ApiToken) -> str | None:
    """Returns the only room slug the token may read, or None for all rooms."""
    return token.room.slug if token.room_id is not None else None


def api_token_check_push(*, token: ApiToken, username: str) -> None:
    """Raises TokenForbidden unless the token may push events to user `username`.

    Decided on the name alone, before the user is looked up: a restricted
    token learns nothing about which other names exist.
    """
    if not token.can_push:
        raise TokenForbidden(FORBIDDEN_SCOPE, "this token has no push scope")
    if token.push_to == ApiToken.PUSH_TO_ANYONE:
        return
    if token.push_to == ApiToken.PUSH_TO_OWNER:
        if username == token.owner.get_username():
            return
        detail = "this token may push to its owner only"
    else:
        User = get_user_model()
        if token.push_users.filter(**{User.USERNAME_FIELD: username}).exists():
            return
        detail = "this token may push to the users it lists only"
    raise TokenForbidden(FORBIDDEN_USER, detail)


# ---------------------------------------------------------------------------
# Rate limit
# ---------------------------------------------------------------------------


def api_token_rate_check(*, token: ApiToken) -> None:
    """Counts one request for the token; raises RateLimited when over the limit.

    A fixed window of CHAT_API_RATE_WINDOW_SECONDS per token, counted in
    Django's cache with add + incr (atomic on Redis and LocMem), so every
    worker sharing the cache shares the count. CHAT_API_RATE_REQUESTS = 0
    turns the limit off.
    """
    limit = settings.CHAT_API_RATE_REQUESTS
    window = settings.CHAT_API_RATE_WINDOW_SECONDS
    if limit <= 0 or window <= 0:
        return
    now = clock()
    index = math.floor(now / window)
    key = f"chat:api-rate:{token.pk}:{window}:{index}"
    cache = caches[RATE_CACHE_ALIAS]
    try:
        # The key outlives its window a little, then expires by itself.
        cache.add(key, 0, timeout=window + 1)
        try:
            count = cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.set(key, 1, timeout=window + 1)
            count = 1
    except Exception:
        # A cache outage must not take the API down with it: fail open.
        logger.exception("rate-limit cache unavailable; request allowed")
        return
    if count > limit:
        raise RateLimited(retry_after=(index + 1) * window - now)
