from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        from chat import access, checks, metrics  # noqa: F401 (checks registers)

        access.connect_receivers()
