"""Create the demo logins: an admin (superuser) and a support agent.

    python manage.py demo_setup

Idempotent; existing users keep their passwords. Refuses to run in production.
Passwords come from DEMO_ADMIN_PASSWORD / DEMO_AGENT_PASSWORD or fixed demo values.
"""

from __future__ import annotations

import os

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError

from supportbot.roles import MODEL_ADMINS, SUPPORT_AGENTS, roles_sync


class Command(BaseCommand):
    help = "Create demo admin and agent users and print their logins."

    def handle(self, *args, **options):
        if settings.IS_PRODUCTION:
            raise CommandError("demo_setup creates well-known passwords and refuses to run with DJANGO_ENV=production.")
        roles_sync()
        User = get_user_model()  # noqa: N806
        logins = [
            ("admin", os.environ.get("DEMO_ADMIN_PASSWORD", "supportbot-admin"), True, MODEL_ADMINS),
            ("agent", os.environ.get("DEMO_AGENT_PASSWORD", "supportbot-agent"), False, SUPPORT_AGENTS),
        ]
        for username, password, superuser, group_name in logins:
            user, created = User.objects.get_or_create(
                username=username, defaults={"is_staff": True, "is_superuser": superuser}
            )
            if created:
                user.set_password(password)
                user.save(update_fields=["password"])
            user.groups.add(Group.objects.get(name=group_name))
            state = "created" if created else "exists, password unchanged"
            self.stdout.write(f"  {username:<6} password: {password}  ({group_name}; {state})")
