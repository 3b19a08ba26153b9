"""The two staff roles, kept as Django groups with exactly these permissions.

- Support agents: work in the agents' workspace (``review_conversations``: queues,
  reviews, corrections, taking conversations over); in the admin they only read
  conversations, messages, reviews, queue entries and model versions.
- Model admins: everything about tickets, datasets, training runs and model versions
  (retrain, promote, roll back), the bot profile, approving corrections for training,
  plus what agents see and do.
Superusers can do everything regardless. README's roles table says the same.
"""

from __future__ import annotations

from django.contrib.auth.models import Group, Permission

SUPPORT_AGENTS = "Support agents"
MODEL_ADMINS = "Model admins"

ROLE_PERMISSIONS: dict[str, list[str]] = {
    SUPPORT_AGENTS: [
        "conversations.review_conversations",
        "conversations.view_conversation",
        "conversations.view_message",
        "conversations.view_review",
        "conversations.view_queueitem",
        "finetune.view_modelversion",
    ],
    MODEL_ADMINS: [
        "conversations.review_conversations",
        "conversations.view_conversation",
        "conversations.view_message",
        "conversations.view_review",
        "conversations.view_queueitem",
        "conversations.view_trainingcandidate",
        "conversations.approve_trainingcandidate",
        "conversations.view_botprofile",
        "conversations.add_botprofile",
        "conversations.change_botprofile",
        "finetune.view_ticket",
        "finetune.add_ticket",
        "finetune.change_ticket",
        "finetune.view_ticketmessage",
        "finetune.view_datasetversion",
        "finetune.view_trainingrun",
        "finetune.add_trainingrun",
        "finetune.change_trainingrun",
        "finetune.view_modelversion",
        "finetune.change_modelversion",
        "finetune.retrain_model",
        "finetune.promote_modelversion",
        "finetune.view_modelversionevent",
    ],
}


def roles_sync(**kwargs) -> None:
    """Create the groups and set their permissions (a ``post_migrate`` receiver).

    Permissions that do not exist yet (an app not migrated) are skipped; the next
    migrate adds them.
    """
    for group_name, perm_names in ROLE_PERMISSIONS.items():
        group, _ = Group.objects.get_or_create(name=group_name)
        perms = []
        for name in perm_names:
            app_label, codename = name.split(".")
            perm = Permission.objects.filter(content_type__app_label=app_label, codename=codename).first()
            if perm is not None:
                perms.append(perm)
        group.permissions.set(perms)
