"""The chat's system checks (chat/checks.py)."""

from __future__ import annotations

from django.core import checks

from chatproject.settings import channel_layers_from_env


def chat_errors() -> list[str]:
    return [e.id for e in checks.run_checks() if e.id.startswith("chat.")]


def test_a_group_expiry_shorter_than_the_lease_is_refused(settings, monkeypatch):
    settings.CHAT_WORKER_LEASE_SECONDS = 30
    monkeypatch.setenv("CHAT_LAYER_GROUP_EXPIRY", "20")
    settings.CHANNEL_LAYERS = channel_layers_from_env("redis://127.0.0.1:6379")
    assert chat_errors() == ["chat.E001"]


def test_the_default_group_expiry_passes(settings, monkeypatch):
    monkeypatch.delenv("CHAT_LAYER_GROUP_EXPIRY", raising=False)
    settings.CHANNEL_LAYERS = channel_layers_from_env("redis://127.0.0.1:6379")
    assert settings.CHANNEL_LAYERS["default"]["CONFIG"]["group_expiry"] == 86400
    assert chat_errors() == []
