"""Ends access on open sockets when a user's sign-in ends.

The handshake checks the session once; these receivers make logout, a
password change, deactivation and deletion reach the sockets already open,
on every worker, through the user's group (chat.broadcast.send_revoke):

- logout ends one session: its sockets close with 4401;
- any other change to the user (a new password, is_active off, deletion)
  makes each of their sockets check its session again, as Django checks a
  request's; a socket whose session no longer signs that user in closes.
"""

from __future__ import annotations

import logging

from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from chat.auth import session_digest
from chat.broadcast import LAYER_ERRORS, send_revoke

logger = logging.getLogger(__name__)

# A sign-in writes last_login; that changes nothing a socket holds.
_SIGN_IN_FIELDS = frozenset({"last_login"})


def _revoke(user_id: int, session: str | None = None) -> None:
    # The logout or the change stands whether or not Redis takes the news:
    # the sockets' next handshake checks the session anyway.
    try:
        send_revoke(user_id, session=session)
    except LAYER_ERRORS:
        logger.warning(
            "could not tell the sockets of user %s that their sign-in changed",
            user_id,
            exc_info=True,
        )


@receiver(user_logged_out, dispatch_uid="chat.access.logged_out")
def session_ended(sender, request, user, **kwargs) -> None:
    """Called on logout, before Django flushes the session."""
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if user is not None and session_key:
        _revoke(user.pk, session_digest(session_key))


def user_changed(sender, instance, created=False, update_fields=None, **kwargs) -> None:
    """Called when a user is saved or deleted: their sockets check again."""
    if created or (update_fields is not None and set(update_fields) <= _SIGN_IN_FIELDS):
        return
    user_id = instance.pk
    # The sockets check their sessions against what was committed.
    transaction.on_commit(lambda: _revoke(user_id), robust=True)


def connect_receivers() -> None:
    """Connects the user-model receivers (AppConfig.ready: the model is custom-able)."""
    User = get_user_model()
    post_save.connect(user_changed, sender=User, dispatch_uid="chat.access.saved")
    post_delete.connect(user_changed, sender=User, dispatch_uid="chat.access.deleted")
