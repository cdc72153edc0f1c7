"""manage.py create_api_token: issue an HTTP API token and print it, once."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat import services, tokens
from chat.models import ApiToken


def _push_reach(token: ApiToken, users: list) -> str:
    """Whom the token may push to, in words; "" for a token without push."""
    if not token.can_push:
        return ""
    if token.push_to == ApiToken.PUSH_TO_ANYONE:
        return "anyone"
    if token.push_to == ApiToken.PUSH_TO_LISTED:
        return ", ".join(user.get_username() for user in users)
    return "its owner only"


class Command(BaseCommand):
    help = (
        "Creates an API token and prints it on stdout. Only its hash is stored: "
        "copy it now, it cannot be shown again."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--owner", required=True, help="username of the owner")
        parser.add_argument("--name", required=True, help="what the token is for")
        parser.add_argument("--publish", action="store_true", help="may post to rooms")
        parser.add_argument("--push", action="store_true", help="may push to users")
        parser.add_argument(
            "--push-to",
            metavar="USERNAME",
            action="append",
            default=[],
            help=(
                "with --push: a user it may push to (repeat for more); "
                "without, it pushes to its owner only"
            ),
        )
        parser.add_argument(
            "--push-to-anyone",
            action="store_true",
            help="with --push: it may push to every user",
        )
        parser.add_argument("--room", metavar="SLUG", help="restrict it to this room")
        parser.add_argument(
            "--author",
            default="",
            metavar="NAME",
            help="name shown on published messages (default: the owner's)",
        )

    def handle(self, *args, **options) -> None:
        User = get_user_model()
        owner = User._default_manager.filter(
            **{User.USERNAME_FIELD: options["owner"]}
        ).first()
        if owner is None:
            raise CommandError(f"no user named {options['owner']!r}")
        room = None
        if options["room"] is not None:
            room = services.room_get(slug=options["room"])
            if room is None:
                raise CommandError(f"no room named {options['room']!r}")
        if (options["push_to"] or options["push_to_anyone"]) and not options["push"]:
            raise CommandError("--push-to and --push-to-anyone need --push")
        if options["push_to"] and options["push_to_anyone"]:
            raise CommandError("give --push-to or --push-to-anyone, not both")
        push_users = []
        for username in options["push_to"]:
            user = User._default_manager.filter(
                **{User.USERNAME_FIELD: username}
            ).first()
            if user is None:
                raise CommandError(f"no user named {username!r}")
            push_users.append(user)
        push_to = (
            ApiToken.PUSH_TO_ANYONE
            if options["push_to_anyone"]
            else ApiToken.PUSH_TO_LISTED
            if push_users
            else ApiToken.PUSH_TO_OWNER
        )
        try:
            token, raw = tokens.api_token_create(
                owner=owner,
                name=options["name"],
                can_publish=options["publish"],
                can_push=options["push"],
                push_to=push_to,
                push_users=push_users,
                room=room,
                author_name=options["author"],
            )
        except ValidationError as error:
            raise CommandError("; ".join(error.messages)) from None
        scopes = [
            scope
            for scope, allowed in (
                ("publish", token.can_publish),
                ("push", token.can_push),
            )
            if allowed
        ]
        reach = _push_reach(token, push_users)
        # The raw token alone on stdout, so that scripts can capture it;
        # what it is goes to stderr.
        self.stderr.write(
            f"Created token {token.name!r} ({token.prefix}…) for "
            f"{owner.get_username()}: scopes {', '.join(scopes) or 'read only'}"
            + (f", room {room.slug}" if room else "")
            + (f", pushes to {reach}" if reach else "")
            + ". Copy it now: it is not stored and cannot be shown again."
        )
        self.stdout.write(raw)
