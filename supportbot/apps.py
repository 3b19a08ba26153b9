from django.apps import AppConfig


class SupportbotConfig(AppConfig):
    """Project-wide pieces: health checks, roles (groups) and the ping task."""

    name = "supportbot"
    verbose_name = "SupportBot"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from .roles import roles_sync

        # After every migrate, so the groups always carry the current permissions.
        post_migrate.connect(roles_sync, dispatch_uid="supportbot.roles_sync")
