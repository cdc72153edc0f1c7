"""Deletes the presence rows of a previous run before a single worker starts."""

from django.core.management.base import BaseCommand

from chat.presence import connections_forget_all


class Command(BaseCommand):
    help = (
        "Forget every open-socket row. Run it before starting a single worker "
        "(make run): rows left by a run that was killed are stale."
    )

    def handle(self, *args, **options) -> None:
        count = connections_forget_all()
        self.stdout.write(f"forgot {count} connection(s)")
