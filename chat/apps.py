from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        from chat import access, checks  # noqa: F401 (checks registers itself)

        access.connect_receivers()
