"""API tokens (chat/tokens.py): what is stored of a secret, and revocation."""

from __future__ import annotations

import hashlib

import pytest

from chat import tokens
from chat.models import ApiToken

pytestmark = pytest.mark.django_db


def test_only_the_hash_and_a_prefix_of_a_token_are_stored(alice):
    token, raw = tokens.api_token_create(owner=alice, name="ci", can_publish=True)
    assert raw.startswith(tokens.TOKEN_MARK) and len(raw) > 40
    token.refresh_from_db()
    assert token.token_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert token.prefix == raw[:12]
    stored_values = [str(getattr(token, f.attname)) for f in ApiToken._meta.fields]
    assert raw not in stored_values


def test_two_tokens_never_share_a_secret(alice):
    _, first = tokens.api_token_create(owner=alice, name="a")
    _, second = tokens.api_token_create(owner=alice, name="b")
    assert first != second


def test_revoke_is_once_and_for_good(alice):
    token, raw = tokens.api_token_create(owner=alice, name="ci")
    assert tokens.api_token_revoke(token=token) is True
    assert tokens.api_token_revoke(token=token) is False
    with pytest.raises(tokens.InvalidToken):
        tokens.api_token_authenticate(raw=raw)
