"""System checks: settings the chat cannot run right with (`manage.py check`,
and `migrate`, which runs them before a deploy's workers start)."""

from __future__ import annotations

from django.conf import settings
from django.core import checks


@checks.register(checks.Tags.compatibility)
def group_expiry_outlives_the_refresh(app_configs=None, **kwargs) -> list:
    """Redis expires a channel-layer group its worker does not join again; the
    worker loop joins each again once it is half that old, checking every third
    of CHAT_WORKER_LEASE_SECONDS. A shorter expiry would let a long-lived
    socket's room group lapse between two checks, and the socket hear nothing.
    """
    errors = []
    lease = settings.CHAT_WORKER_LEASE_SECONDS
    for alias, layer in settings.CHANNEL_LAYERS.items():
        expiry = (layer.get("CONFIG") or {}).get("group_expiry")
        if expiry is not None and expiry < lease:
            errors.append(
                checks.Error(
                    f"CHANNEL_LAYERS[{alias!r}] group_expiry is {expiry} s, shorter "
                    f"than CHAT_WORKER_LEASE_SECONDS ({lease} s): a socket's groups "
                    "could expire before its worker joins them again.",
                    hint="Raise CHAT_LAYER_GROUP_EXPIRY (default 86400).",
                    id="chat.E001",
                )
            )
    return errors
