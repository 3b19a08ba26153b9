"""Read-side queries of the chat: history for ``resume``, the model's prompt, the bot profile.

Also what fine-tuning reads from the chat (the system prompt, the blocked terms; the
approved feedback comes from ``review.selectors``): ``ConversationsConfig.ready()`` registers those
readers with ``finetune.providers``, since ``finetune`` does not import this app.
"""

from __future__ import annotations

from django.db.models import OuterRef, QuerySet, Subquery
from django.db.models.functions import Substr

from finetune.ml.prompting import CHAT_SPEAKER_ROLES, ROLE_SYSTEM, system_prompt_text
from finetune.ml.segments import UNDETERMINED_LANGUAGE
from finetune.models import ModelVersion
from finetune.serving.safety import parse_blocked_terms

from .models import BotProfile, Conversation, Message

# Characters of the first customer message shown in the agents' list of conversations.
PREVIEW_CHARS = 100

# Turns of history sent to the model. A small model's context (1-2k tokens) holds
# about this many support-sized turns; the engine trims further by tokens.
PROMPT_MAX_TURNS = 20


def conversations_with_preview(queryset: QuerySet[Conversation]) -> QuerySet[Conversation]:
    """``queryset`` annotated with ``preview``: the start of its first customer message (None if none)."""
    first = (
        Message.objects.filter(conversation=OuterRef("pk"), role=Message.Role.CUSTOMER)
        .order_by("pk")
        .values("body")[:1]
    )
    return queryset.annotate(preview=Substr(Subquery(first), 1, PREVIEW_CHARS))


def messages_after(*, conversation: Conversation, after_id: int) -> QuerySet[Message]:
    """Every message of the conversation with a server id above ``after_id``, oldest first."""
    return conversation.messages.filter(pk__gt=after_id).order_by("pk")


def bot_profile_get() -> BotProfile:
    """The bot profile edited in the admin, or its defaults while none is saved."""
    return BotProfile.objects.filter(key="default").first() or BotProfile()


def system_prompt_for(profile: BotProfile) -> str:
    return system_prompt_text(template=profile.system_prompt, company=profile.company_name, policy=profile.policy_text)


def system_prompt_current() -> str:
    """The system prompt every chat starts with now (the saved bot profile, or its defaults)."""
    return system_prompt_for(bot_profile_get())


# The bot profile's fields that fill template slots (finetune.serving.placeholders.FACT_KEYS).
COMPANY_FACT_FIELDS = (
    "company_name",
    "support_phone",
    "support_email",
    "website_url",
    "support_hours",
    "returns_address",
)


def company_facts_current() -> dict[str, str]:
    """The company's facts from the bot profile (empty ones left out), for filling reply slots."""
    profile = bot_profile_get()
    return {name: value.strip() for name in COMPANY_FACT_FIELDS if (value := getattr(profile, name) or "").strip()}


def blocked_terms_current() -> list[str]:
    """The bot profile's blocked terms, masked in every reply."""
    text = BotProfile.objects.filter(key="default").values_list("blocked_terms", flat=True).first()
    return parse_blocked_terms(text or "")


def prompt_messages(
    *, conversation: Conversation, upto: Message, max_turns: int = PROMPT_MAX_TURNS
) -> list[dict[str, str]]:
    """The model's input for a reply to ``upto``: system prompt, then the newest turns.

    Customer turns become ``customer``; bot and agent turns become ``agent`` (what the
    model was trained to continue). Replies that failed or are still streaming and
    system notices are left out: the model never said them.
    """
    history = (
        conversation.messages.filter(
            pk__lte=upto.pk,
            role__in=list(CHAT_SPEAKER_ROLES),
            status=Message.Status.COMPLETE,
        )
        .order_by("-pk")
        .values_list("role", "body")[:max_turns]
    )
    turns = [{"role": CHAT_SPEAKER_ROLES[role], "content": body} for role, body in reversed(history)]
    return [{"role": ROLE_SYSTEM, "content": system_prompt_current()}, *turns]


# finish_reason of a reply cut off because its server shut down (conversations.replies).
SHUTDOWN_FINISH_REASON = "shutdown"
# A reply stopped because an agent took the conversation over while it streamed.
TAKEN_OVER_FINISH_REASON = "taken_over"


def replies_to(message: Message) -> QuerySet[Message]:
    """The bot's replies to ``message`` that answer it: all but those a server shutdown cut off.

    A cut-off reply stays in the conversation (failed, with its text so far), but the
    question counts as unanswered, so the next server answers it.
    """
    return Message.objects.filter(role=Message.Role.BOT, in_reply_to=message).exclude(
        status=Message.Status.FAILED, generation__finish_reason=SHUTDOWN_FINISH_REASON
    )


def reply_target(*, conversation: Conversation) -> Message | None:
    """The newest customer message: what the bot answers next, if nothing answered it yet."""
    return conversation.messages.filter(role=Message.Role.CUSTOMER).order_by("-pk").first()


def conversation_language(*, conversation: Conversation, upto: Message) -> str:
    """The conversation's language for a reply to ``upto`` (ISO 639-1), from the labels stored
    with the customer's messages when they were saved, so nothing is detected again.

    The newest customer message with a determined label wins: "1234" (``und``) after a
    French message leaves the conversation French. "" when none has one (messages saved
    before labelling): the reply pipeline then detects it from the prompt's text.
    """
    return (
        conversation.messages.filter(role=Message.Role.CUSTOMER, pk__lte=upto.pk)
        .exclude(language__in=("", UNDETERMINED_LANGUAGE))
        .order_by("-pk")
        .values_list("language", flat=True)
        .first()
        or ""
    )


def model_version_for_label(label: str | None) -> ModelVersion | None:
    """The ModelVersion an engine's label ("v3") names."""
    if not label or not label.startswith("v") or not label[1:].isdigit():
        return None
    return ModelVersion.objects.filter(number=int(label[1:])).first()
