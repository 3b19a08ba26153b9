"""Template filters of the agent workspace: what a bot reply leaned on, read as the review page reads it."""

from __future__ import annotations

from django import template

from conversations.review.selectors import reply_grounding

register = template.Library()


@register.filter
def leaned_on(message) -> list[dict]:
    """The past exchanges a bot reply was grounded on (``reply_grounding``): question, answer, score, origin."""
    return reply_grounding(message) if getattr(message, "role", "") == "bot" else []
