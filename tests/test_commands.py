"""manage.py create_api_token: prints a working token once, refuses bad arguments."""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command

from chat import tokens
from chat.models import ApiToken

pytestmark = pytest.mark.django_db


def run_command(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("create_api_token", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_command_prints_a_working_token_once(alice, room):
    out, err = run_command(
        "--owner", "alice", "--name", "ci", "--publish", "--push",
        "--room", "lobby", "--author", "CI bot",
    )  # fmt: skip
    raw = out.strip()
    token = tokens.api_token_authenticate(raw=raw)
    assert (token.name, token.owner, token.room, token.author_name) == (
        "ci", alice, room, "CI bot",
    )  # fmt: skip
    assert token.can_publish and token.can_push
    assert raw not in err and token.prefix in err


def test_command_defaults_to_a_read_only_token(alice):
    out, err = run_command("--owner", "alice", "--name", "dashboard")
    token = tokens.api_token_authenticate(raw=out.strip())
    assert not token.can_publish and not token.can_push and token.room is None
    assert "read only" in err


@pytest.mark.parametrize(
    "args",
    [
        ("--owner", "nobody", "--name", "x"),
        ("--owner", "alice", "--name", "x", "--room", "nowhere"),
        ("--owner", "alice", "--name", "x" * 101),
    ],
)
def test_command_refuses_bad_arguments(alice, args):
    with pytest.raises(CommandError):
        run_command(*args)
    assert not ApiToken.objects.exists()
