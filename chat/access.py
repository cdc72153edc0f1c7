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

from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from chat.broadcast import send_revoke

# A sign-in writes last_login; that changes nothing a socket holds.
_SIGN_IN_FIELDS = frozenset({"last_login"})


@receiver(user_logged_out, dispatch_uid="chat.access.logged_out")
def session_ended(sender, request, user, **kwargs) -> None:
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if user is not None and session_key:
        send_revoke(user.pk, session_key=session_key)


def user_changed(sender, instance, created=False, update_fields=None, **kwargs) -> None:
    if created or (update_fields is not None and set(update_fields) <= _SIGN_IN_FIELDS):
        return
    user_id = instance.pk
    # The sockets check their sessions against what was committed.
    transaction.on_commit(lambda: send_revoke(user_id))


def connect_receivers() -> None:
    """Connects the user-model receivers (AppConfig.ready: the model is custom-able)."""
    User = get_user_model()
    post_save.connect(user_changed, sender=User, dispatch_uid="chat.access.saved")
    post_delete.connect(user_changed, sender=User, dispatch_uid="chat.access.deleted")
