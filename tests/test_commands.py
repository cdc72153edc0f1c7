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
    assert token.push_to == ApiToken.PUSH_TO_OWNER  # the safe default
    assert raw not in err and token.prefix in err
    assert "pushes to its owner only" in err


def test_command_restricts_or_opens_a_push_token(alice, bob):
    out, err = run_command(
        "--owner", "alice", "--name", "bridge", "--push", "--push-to", "bob",
    )  # fmt: skip
    token = tokens.api_token_authenticate(raw=out.strip())
    assert token.push_to == ApiToken.PUSH_TO_LISTED
    assert list(token.push_users.all()) == [bob]
    assert "pushes to bob" in err
    out, _ = run_command(
        "--owner", "alice", "--name", "all", "--push", "--push-to-anyone"
    )
    token = tokens.api_token_authenticate(raw=out.strip())
    assert token.push_to == ApiToken.PUSH_TO_ANYONE


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
        ("--owner", "alice", "--name", "x", "--push-to", "alice"),  # no --push
        ("--owner", "alice", "--name", "x", "--push", "--push-to", "nobody"),
        (
            "--owner",
            "alice",
            "--name",
            "x",
            "--push",
            "--push-to",
            "alice",
            "--push-to-anyone",
        ),
    ],
)
def test_command_refuses_bad_arguments(alice, args):
    with pytest.raises(CommandError):
        run_command(*args)
    assert not ApiToken.objects.exists()
