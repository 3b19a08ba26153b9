"""Read side of the agents' work: queue listings, a reply's context, progress, agreement, exports.

Queue listings filter on columns copied onto ``QueueItem`` (source, state, model
version, intent, segment, time), so a queue page is one indexed query however many
reviewed replies the database holds (bench/bench_workspace.py).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from itertools import combinations
from typing import Any

from django.db.models import Count, Exists, F, OuterRef, Q, QuerySet, Subquery
from django.utils import timezone

from finetune.ml.dataset_builder import SourceConversation
from finetune.ml.redaction import CustomerFields
from finetune.models import DatasetVersion, ModelVersion
from supportbot.errors import ApplicationError

from ..models import Conversation, Message, QueueItem, Review, TrainingCandidate
from . import agreement
from .textdiff import word_diff

# Turns of a live conversation kept before a reviewed reply in a training example:
# older ones would be cut by the token limit anyway.
FEEDBACK_HISTORY_TURNS = 20
# Messages of a conversation shown around a reviewed reply.
CONTEXT_MAX_MESSAGES = 200
PREVIEW_CHARS = 140
STATE_FILTERS = ("open", "pending", "draft", "submitted", "discarded", "all")


def display_name(user) -> str:
    """What customers and colleagues see for an agent: their first name, else their login."""
    if user is None:
        return ""
    return (getattr(user, "first_name", "") or "").strip() or user.get_username()


# --- queues -------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueFilters:
    """What a queue page or "next" is limited to. Empty values mean "any"."""

    source: str = ""
    state: str = "open"
    model_version: int | None = None
    intent: str = ""
    segment: str = ""
    date_from: date | None = None
    date_to: date | None = None
    search: str = ""

    @property
    def narrowed(self) -> bool:
        """Whether anything beyond the source and the default state limits the list."""
        return bool(
            self.state != "open"
            or self.model_version
            or self.intent
            or self.segment
            or self.date_from
            or self.date_to
            or self.search
        )

    def as_query(self) -> dict[str, str]:
        values = {
            "source": self.source,
            "state": "" if self.state == "open" else self.state,
            "model_version": str(self.model_version or ""),
            "intent": self.intent,
            "segment": self.segment,
            "date_from": self.date_from.isoformat() if self.date_from else "",
            "date_to": self.date_to.isoformat() if self.date_to else "",
            "q": self.search,
        }
        return {k: v for k, v in values.items() if v}


def _parse_date(name: str, value: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise ApplicationError(
            f"{name} must be a date like 2025-01-31, not {value[:20]!r}.", code="bad_filter"
        ) from exc


def queue_filters_parse(params: Mapping[str, Any]) -> QueueFilters:
    """Filters from a query string (``source``, ``state``, ``model_version``, ``intent``, ``segment``,
    ``date_from``, ``date_to``, ``q``); a value that cannot be used raises ``ApplicationError``."""

    def text(name: str, limit: int = 64) -> str:
        value = params.get(name) or ""
        return value.strip()[:limit] if isinstance(value, str) else ""

    source = text("source")
    if source and source not in QueueItem.Source.values:
        raise ApplicationError(
            f"Unknown queue {source!r}; use one of {', '.join(QueueItem.Source.values)}.", code="bad_filter"
        )
    state = text("state") or "open"
    if state not in STATE_FILTERS:
        raise ApplicationError(f"Unknown state {state!r}; use one of {', '.join(STATE_FILTERS)}.", code="bad_filter")
    version_raw = text("model_version")
    version = None
    if version_raw:
        if not version_raw.isdigit():
            raise ApplicationError("model_version must be a model version's id.", code="bad_filter")
        version = int(version_raw)
    date_from, date_to = _parse_date("date_from", text("date_from")), _parse_date("date_to", text("date_to"))
    if date_from and date_to and date_from > date_to:
        raise ApplicationError("date_from is after date_to; swap them.", code="bad_filter")
    return QueueFilters(
        source=source,
        state=state,
        model_version=version,
        intent=text("intent"),
        segment=text("segment"),
        date_from=date_from,
        date_to=date_to,
        search=text("q", 200),
    )


def _day_start(day: date) -> datetime:
    return timezone.make_aware(datetime.combine(day, time.min), timezone.get_current_timezone())


def queue_items_filtered(filters: QueueFilters) -> QuerySet[QueueItem]:
    """Queue entries matching ``filters``, first in first out."""
    items = QueueItem.objects.all()
    if filters.state == "open":
        items = items.filter(state__in=QueueItem.OPEN_STATES)
    elif filters.state != "all":
        items = items.filter(state=filters.state)
    if filters.source:
        items = items.filter(source=filters.source)
    if filters.model_version:
        items = items.filter(model_version_id=filters.model_version)
    if filters.intent:
        items = items.filter(intent=filters.intent)
    if filters.segment:
        items = items.filter(segment=filters.segment)
    if filters.date_from:
        items = items.filter(created_at__gte=_day_start(filters.date_from))
    if filters.date_to:
        items = items.filter(created_at__lt=_day_start(filters.date_to + timedelta(days=1)))
    if filters.search:
        q = filters.search
        in_conversation = Message.objects.filter(conversation=OuterRef("conversation"), body__icontains=q)
        items = items.filter(
            Q(message__body__icontains=q)
            | Q(message__in_reply_to__body__icontains=q)
            | Q(kind=QueueItem.Kind.CONVERSATION, conversation__in=Subquery(in_conversation.values("conversation")))
        )
    return items.order_by("created_at", "id")


def queue_page(filters: QueueFilters, *, page: int = 1, per_page: int = 50) -> tuple[list[QueueItem], bool]:
    """One page of a queue and whether there is a next one.

    Two steps: the page's ids straight from the FIFO index, then those rows with
    what they show. Joining first would make the database join every matching
    entry (10,000 reviewed ones) before keeping 50.
    """
    offset = max(0, page - 1) * per_page
    ids = list(queue_items_filtered(filters).values_list("id", flat=True)[offset : offset + per_page + 1])
    rows = (
        QueueItem.objects.filter(pk__in=ids[:per_page])
        .select_related("message", "message__in_reply_to", "model_version", "claimed_by")
        .only(*_ROW_FIELDS)
    )
    position = {pk: i for i, pk in enumerate(ids)}
    return sorted(rows, key=lambda item: position[item.pk]), len(ids) > per_page


# What ``queue_item_row`` reads: the page loads nothing else (no JSON columns, no conversation).
_ROW_FIELDS = (
    *("id", "kind", "source", "state", "slot", "created_at", "conversation_id", "message_id", "note"),
    *("intent", "segment", "claimed_by_id", "lease_expires_at", "model_version_id"),
    *("message__id", "message__body", "message__in_reply_to_id", "message__in_reply_to__id"),
    *("message__in_reply_to__body", "model_version__id", "model_version__number"),
    *("claimed_by__id", "claimed_by__username", "claimed_by__first_name"),
)


def queue_counts() -> dict[str, int]:
    """Open entries per queue (source), plus ``all``."""
    counts = {source: 0 for source in QueueItem.Source.values}
    rows = QueueItem.objects.filter(state__in=QueueItem.OPEN_STATES).values("source").annotate(n=Count("id")).order_by()
    for row in rows:
        counts[row["source"]] = row["n"]
    counts["all"] = sum(counts.values())
    return counts


def queue_filter_choices(filters: QueueFilters | None = None) -> dict[str, list]:
    """Values offered by the filter form: model versions, and the intents and segments of the entries in view
    (the chosen queue and state), read in one pass."""
    filters = filters or QueueFilters()
    in_view = queue_items_filtered(QueueFilters(source=filters.source, state=filters.state))
    pairs = set(in_view.order_by().values_list("intent", "segment").distinct()[:2000])
    return {
        "model_versions": list(ModelVersion.objects.order_by("-number").values_list("id", "number")[:50]),
        "intents": sorted({intent for intent, _ in pairs if intent} | ({filters.intent} - {""})),
        "segments": sorted({segment for _, segment in pairs if segment} | ({filters.segment} - {""})),
    }


def waiting_count() -> int:
    """Customers waiting for a human right now (the workspace header)."""
    return Conversation.objects.filter(status=Conversation.Status.WAITING_FOR_AGENT).count()


def _preview(text: str | None) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def queue_item_row(item: QueueItem, *, now: datetime | None = None) -> dict[str, Any]:
    """One queue entry as the queue page shows it, and as the agents' socket sends it (``queue_item`` frame)."""
    now = now or timezone.now()
    message = item.message
    claimed = item.claim_active(now)
    if message is not None:
        reply, question = message.body, (message.in_reply_to.body if message.in_reply_to_id else "")
    else:
        reply, question = "", item.note
    return {
        "id": item.pk,
        "kind": item.kind,
        "source": item.source,
        "source_label": item.get_source_display(),
        "state": item.state,
        "state_label": item.get_state_display(),
        "slot": item.slot,
        "created_at": item.created_at.isoformat(),
        "created_label": timezone.localtime(item.created_at).strftime("%d %b %H:%M"),
        "conversation": str(item.conversation_id),
        "message": item.message_id,
        "question": _preview(question),
        "reply": _preview(reply),
        "model_version": item.model_version.label if item.model_version_id else "",
        "intent": item.intent,
        "segment": item.segment,
        "claimed_by": display_name(item.claimed_by) if claimed else "",
        "claimed_by_id": item.claimed_by_id if claimed else None,
        "lease_expires_at": item.lease_expires_at.isoformat() if claimed else None,
        "url": f"/agent/items/{item.pk}/",
    }


def queue_item_get(item_id: int) -> QueueItem:
    item = (
        QueueItem.objects.select_related(
            "message", "message__in_reply_to", "message__model_version", "conversation", "claimed_by", "draft_by"
        )
        .filter(pk=item_id)
        .first()
    )
    if item is None:
        raise ApplicationError(f"There is no queue item {item_id}.", code="not_found")
    return item


def queue_item_previous(*, agent, before: QueueItem) -> QueueItem | None:
    """The entry this agent worked on before ``before`` (claimed or reviewed), for "previous"."""
    reviewed = Review.objects.filter(reviewer=agent, item__isnull=False, item_id__lt=before.pk)
    mine = QueueItem.objects.filter(Q(claimed_by=agent) | Q(pk__in=reviewed.values("item_id"))).exclude(pk=before.pk)
    return mine.filter(created_at__lte=before.created_at).order_by("-created_at", "-id").first()


def conversation_open_items(conversation: Conversation) -> list[QueueItem]:
    return list(conversation.queue_items.filter(state__in=QueueItem.OPEN_STATES).select_related("claimed_by"))


# --- a reply's context --------------------------------------------------------------------


def reply_grounding(message: Message) -> list[dict[str, Any]]:
    """The exchanges a reply was grounded on, as the reply recorded them, for the reviewer.

    Read from the message's ``grounding`` field when the model has one (the reply-quality
    work adds it), else from ``generation["grounding"]``. Accepts a list of exchanges or
    ``{"exchanges": [...]}``; each exchange may name its ``question``/``customer``,
    ``answer``/``agent``, ``score`` and ``origin``; other keys are kept as ``extra``.
    """
    raw = getattr(message, "grounding", None)
    if not raw:
        raw = (message.generation or {}).get("grounding")
    if not raw:
        return []
    if isinstance(raw, dict):
        raw = raw.get("exchanges") or raw.get("items") or [raw]
    if not isinstance(raw, list):
        raw = [raw]
    keys_question = ("question", "customer", "query", "prompt")
    keys_answer = ("answer", "agent", "reply", "response", "completion")
    exchanges = []
    for entry in raw[:20]:
        if not isinstance(entry, dict):
            exchanges.append({"question": "", "answer": str(entry), "score": None, "origin": "", "extra": {}})
            continue
        question = next((str(entry[k]) for k in keys_question if entry.get(k)), "")
        answer = next((str(entry[k]) for k in keys_answer if entry.get(k)), "")
        score = entry.get("score")
        origin = str(entry.get("origin") or entry.get("source") or entry.get("id") or "")
        used = {*keys_question, *keys_answer, "score", "origin", "source", "id"}
        exchanges.append(
            {
                "question": question,
                "answer": answer,
                "score": score if isinstance(score, int | float) else None,
                "origin": origin,
                "extra": {k: v for k, v in entry.items() if k not in used},
            }
        )
    return exchanges


def reply_intent(message: Message) -> str:
    """The reply's intent when the reply recorded one (or its best grounding exchange did)."""
    intent = (message.generation or {}).get("intent")
    if not intent:
        grounding = reply_grounding(message)
        intent = grounding[0]["extra"].get("intent") if grounding else ""
    return str(intent or "")[:64]


def reply_confidence(message: Message) -> float | None:
    """exp(mean token log-probability): the model's average probability for the words it chose."""
    if message.mean_logprob is None:
        return None
    return math.exp(message.mean_logprob)


def reply_facts(message: Message) -> dict[str, Any]:
    """What a reviewer needs to judge a reply besides its text; also kept with each review."""
    generation = message.generation or {}
    return {
        "model_version": generation.get("model_label")
        or (message.model_version.label if message.model_version else ""),
        "mean_logprob": message.mean_logprob,
        "confidence": reply_confidence(message),
        "latency_ms": message.latency_ms,
        "first_token_ms": message.first_token_ms,
        "token_count": message.token_count,
        "finish_reason": generation.get("finish_reason", ""),
        "source": generation.get("source", "model"),
        "source_origin": generation.get("source_origin", ""),
        "policy_reason": (generation.get("policy") or {}).get("reason", ""),
        "cut_reason": generation.get("cut_reason", ""),
        "helpful": message.helpful,
        "grounding": reply_grounding(message),
    }


@dataclass
class ReplyContext:
    conversation: Conversation
    reply: Message
    transcript: list[Message]
    facts: dict[str, Any]
    reviews: list[Review]
    candidate: TrainingCandidate | None
    items: list[QueueItem] = field(default_factory=list)


def reply_context(message: Message) -> ReplyContext:
    """The conversation around a bot reply, its facts, and every review it had (newest first)."""
    conversation = message.conversation
    before = list(
        conversation.messages.filter(pk__lte=message.pk).select_related("author").order_by("-pk")[:CONTEXT_MAX_MESSAGES]
    )
    after = list(conversation.messages.filter(pk__gt=message.pk).select_related("author").order_by("pk")[:20])
    return ReplyContext(
        conversation=conversation,
        reply=message,
        transcript=[*reversed(before), *after],
        facts=reply_facts(message),
        reviews=list(message.reviews.select_related("reviewer").order_by("-created_at", "-id")[:50]),
        candidate=message.training_candidates.exclude(status=TrainingCandidate.Status.SUPERSEDED)
        .order_by("-created_at")
        .first(),
        items=list(message.queue_items.select_related("claimed_by").order_by("created_at")),
    )


def conversation_transcript(conversation: Conversation, *, limit: int = CONTEXT_MAX_MESSAGES) -> list[Message]:
    newest = conversation.messages.select_related("author").order_by("-pk")[:limit]
    return list(reversed(list(newest)))


def conversations_for_agents(*, status: str = "", search: str = "", limit: int = 100) -> list[Conversation]:
    """Conversations for the workspace's list: waiting first (oldest first), then the others by recency."""
    conversations = Conversation.objects.select_related("assigned_agent")
    if status:
        conversations = conversations.filter(status=status)
    else:
        conversations = conversations.exclude(status=Conversation.Status.CLOSED)
    if search:
        hits = Message.objects.filter(conversation=OuterRef("pk"), body__icontains=search[:200])
        conversations = conversations.filter(Exists(hits))
    first_question = Message.objects.filter(conversation=OuterRef("pk"), role=Message.Role.CUSTOMER).order_by("pk")
    conversations = conversations.annotate(
        preview=Subquery(first_question.values("body")[:1]),
        message_count=Count("messages"),
    ).filter(message_count__gt=0)
    return list(conversations.order_by(F("last_message_at").desc(nulls_last=True))[:limit])


# --- progress -----------------------------------------------------------------------------


def _week_start(today: date) -> date:
    return today - timedelta(days=today.weekday())


def review_progress(*, now: datetime | None = None) -> dict[str, Any]:
    """Reviews submitted today and this week (Monday on), per agent and per queue, plus open counts."""
    now = now or timezone.now()
    today = timezone.localdate(now)
    day, week = _day_start(today), _day_start(_week_start(today))
    recent = Review.objects.filter(created_at__gte=min(day, week))
    per_agent = (
        recent.values("reviewer_id", "reviewer__username", "reviewer__first_name")
        .annotate(
            today=Count("id", filter=Q(created_at__gte=day)),
            week=Count("id", filter=Q(created_at__gte=week)),
            corrections=Count("id", filter=Q(created_at__gte=week) & ~Q(corrected_body="")),
        )
        .order_by("-week", "reviewer__username")
    )
    per_queue_rows = (
        recent.values("item__source")
        .annotate(today=Count("id", filter=Q(created_at__gte=day)), week=Count("id", filter=Q(created_at__gte=week)))
        .order_by()
    )
    labels = dict(QueueItem.Source.choices)
    counts = queue_counts()
    per_queue = {
        source: {"source": source, "label": label, "today": 0, "week": 0, "open": counts.get(source, 0)}
        for source, label in labels.items()
    }
    direct = {"source": "", "label": "Reviewed outside a queue", "today": 0, "week": 0, "open": 0}
    for row in per_queue_rows:
        target = per_queue.get(row["item__source"], direct)
        target["today"] += row["today"]
        target["week"] += row["week"]
    return {
        "today": today,
        "week_start": _week_start(today),
        "agents": [
            {
                "name": row["reviewer__first_name"] or row["reviewer__username"],
                "username": row["reviewer__username"],
                "today": row["today"],
                "week": row["week"],
                "corrections": row["corrections"],
            }
            for row in per_agent
        ],
        "queues": [*per_queue.values(), *([direct] if direct["week"] else [])],
    }


# --- agreement ----------------------------------------------------------------------------


def _latest_per_message_and_reviewer() -> dict[int, dict[int, tuple[bool, int]]]:
    """{message id: {reviewer id: (good, rating)}} from each reviewer's latest review of each reply."""
    rows = Review.objects.order_by("message_id", "reviewer_id", "created_at", "id").values_list(
        "message_id", "reviewer_id", "good", "rating"
    )
    latest: dict[int, dict[int, tuple[bool, int]]] = defaultdict(dict)
    for message_id, reviewer_id, good, rating in rows.iterator(chunk_size=5000):
        latest[message_id][reviewer_id] = (good, rating)  # later rows overwrite earlier ones
    return latest


def agreement_report() -> dict[str, Any]:
    """Inter-reviewer agreement on replies two or more agents reviewed, and agents against customers.

    Each reviewer's latest review of a reply counts. For every pair of reviewers, the
    replies both reviewed give raw agreement and Cohen's kappa on good/bad, and
    quadratic-weighted kappa on the 1-5 score (scikit-learn). "Overall" pools every
    pair's ratings (raters ordered by login, so pooled kappa treats "first" and
    "second" rater consistently). Agents against customers compares each reply's
    latest review (good) with the customer's "Was this helpful?" answer.
    """
    from django.contrib.auth import get_user_model

    latest = _latest_per_message_and_reviewer()
    names = dict(get_user_model().objects.filter(reviews__isnull=False).distinct().values_list("id", "username"))
    pairs: dict[tuple[int, int], list[tuple[tuple[bool, int], tuple[bool, int]]]] = defaultdict(list)
    for by_reviewer in latest.values():
        if len(by_reviewer) < 2:
            continue
        ordered = sorted(by_reviewer, key=lambda rid: (names.get(rid, ""), rid))
        for a, b in combinations(ordered, 2):
            pairs[(a, b)].append((by_reviewer[a], by_reviewer[b]))

    def figures(ratings: list[tuple[tuple[bool, int], tuple[bool, int]]]) -> dict[str, Any]:
        labels = agreement.compare([x[0] for x, _ in ratings], [y[0] for _, y in ratings])
        scores = agreement.compare([x[1] for x, _ in ratings], [y[1] for _, y in ratings], weights="quadratic")
        return {"n": labels.n, "raw": labels.raw, "kappa": labels.kappa, "note": labels.note, "score": scores}

    pair_rows = [
        {"a": names.get(a, str(a)), "b": names.get(b, str(b)), **figures(ratings)}
        for (a, b), ratings in sorted(pairs.items(), key=lambda kv: (names.get(kv[0][0], ""), names.get(kv[0][1], "")))
    ]
    pooled = [r for ratings in pairs.values() for r in ratings]

    # Agents against customers: a reply's latest review (by anyone) vs "Was this helpful?".
    latest_review = Review.objects.filter(message=OuterRef("pk")).order_by("-created_at", "-id")
    rated = (
        Message.objects.filter(role=Message.Role.BOT, helpful__isnull=False)
        .annotate(agent_good=Subquery(latest_review.values("good")[:1]))
        .annotate(agent_id=Subquery(latest_review.values("reviewer_id")[:1]))
        .filter(agent_good__isnull=False)
        .values_list("agent_good", "helpful", "agent_id")
    )
    agent_vs = list(rated.iterator(chunk_size=5000))
    by_agent: dict[int, list[tuple[bool, bool]]] = defaultdict(list)
    for good, helpful, agent_id in agent_vs:
        by_agent[agent_id].append((good, helpful))
    customer = agreement.compare([g for g, _, _ in agent_vs], [h for _, h, _ in agent_vs])
    return {
        "pairs": pair_rows,
        "overall": figures(pooled) if pooled else None,
        "double_reviewed": sum(1 for r in latest.values() if len(r) >= 2),
        "customer": customer,
        "customer_by_agent": [
            {
                "agent": names.get(agent_id, str(agent_id)),
                **vars(agreement.compare(*map(list, zip(*rows, strict=True)))),
            }
            for agent_id, rows in sorted(by_agent.items(), key=lambda kv: names.get(kv[0], ""))
        ],
    }


# --- training candidates --------------------------------------------------------------------


def training_candidates(*, status: str = TrainingCandidate.Status.PENDING, limit: int = 200) -> list[dict[str, Any]]:
    """Candidates with what a model admin needs to decide: question, bot reply, text to learn, diff."""
    rows = (
        TrainingCandidate.objects.filter(status=status)
        .select_related("message", "message__in_reply_to", "model_version", "reviewer", "decided_by", "review")
        .order_by("created_at", "id")[:limit]
    )
    out = []
    for candidate in rows:
        reply = candidate.message
        out.append(
            {
                "candidate": candidate,
                "question": reply.in_reply_to.body if reply.in_reply_to_id else "",
                "reply": reply.body,
                "diff": word_diff(reply.body, candidate.text)
                if candidate.kind == TrainingCandidate.Kind.CORRECTION
                else [],
                "dataset": None,
            }
        )
    if status == TrainingCandidate.Status.APPROVED:
        _attach_dataset_versions(out)
    return out


def _attach_dataset_versions(rows: list[dict[str, Any]]) -> None:
    """The first dataset built with feedback after each approval: where the example went."""
    versions = [
        v for v in DatasetVersion.objects.order_by("created_at", "id") if (v.params or {}).get("include_feedback")
    ]
    for row in rows:
        decided = row["candidate"].decided_at
        row["dataset"] = next((v for v in versions if decided and v.created_at >= decided), None)


def training_candidate_counts() -> dict[str, int]:
    rows = TrainingCandidate.objects.values("status").annotate(n=Count("id")).order_by()
    counts = {status: 0 for status in TrainingCandidate.Status.values}
    counts.update({row["status"]: row["n"] for row in rows})
    return counts


def training_examples_approved(*, since: datetime | None = None) -> Iterator[SourceConversation]:
    """Approved corrections and replies as training conversations: what a dataset build may learn from.

    The one place that decides which feedback becomes training data:

    - only candidates a model admin **approved** (``TrainingCandidate.Status.APPROVED``);
      a later review of the reply supersedes its candidate, so only the latest review
      of a reply can train a model;
    - a correction's text, or the approved reply as the bot wrote it, is the target;
      origin ``correction:<review id>`` or ``review:<review id>`` (the review names the
      reply, the model version that wrote it and the reviewer);
    - ``since`` keeps reviews submitted at or after it;
    - the conversation before the reply (customer, bot and agent turns; system notices
      left out) is the context; the signed-in customer's name and e-mail are redacted.
    """
    candidates = (
        TrainingCandidate.objects.filter(status=TrainingCandidate.Status.APPROVED)
        .filter(message__role=Message.Role.BOT, message__status=Message.Status.COMPLETE)
        .select_related("message", "message__conversation", "message__conversation__customer", "review")
        .order_by("review_id")
    )
    if since is not None:
        candidates = candidates.filter(review__created_at__gte=since)
    roles = {Message.Role.CUSTOMER: "customer", Message.Role.BOT: "agent", Message.Role.AGENT: "agent"}
    for candidate in candidates.iterator(chunk_size=200):
        reply = candidate.message
        conversation = reply.conversation
        earlier = (
            Message.objects.filter(conversation=conversation, status=Message.Status.COMPLETE)
            .exclude(role=Message.Role.SYSTEM)
            .filter(created_at__lte=reply.created_at)
            .exclude(id=reply.id)
            .exclude(created_at=reply.created_at, id__gt=reply.id)
            .order_by("-created_at", "-id")
            .values_list("role", "body")[:FEEDBACK_HISTORY_TURNS]
        )
        history = [{"role": roles[role], "content": body} for role, body in reversed(earlier)]
        corrected = candidate.kind == TrainingCandidate.Kind.CORRECTION
        customer = conversation.customer
        yield SourceConversation(
            origin=f"{'correction' if corrected else 'review'}:{candidate.review_id}",
            messages=[*history, {"role": "agent", "content": candidate.text}],
            segment=candidate.review.segment or conversation.segment,
            customer=CustomerFields.from_values(
                name=customer.get_full_name() if customer else "",
                email=customer.email if customer else "",
            ),
        )


# --- export ---------------------------------------------------------------------------------


EXPORT_COLUMNS = (
    "review_id",
    "submitted_at",
    "reviewer",
    "latest",
    "message_id",
    "conversation_id",
    "question",
    "reply",
    "good",
    "score",
    "reasons",
    "note",
    "correction",
    "verdict",
    "model_version",
    "segment",
    "confidence",
    "latency_ms",
    "customer_helpful",
    "queue",
    "training_status",
)


def feedback_export_rows(*, since: datetime | None = None, latest_only: bool = False) -> Iterator[dict[str, Any]]:
    """Every submitted review (or only each reply's latest) as a flat row, oldest first (``EXPORT_COLUMNS``)."""
    latest_id = Review.objects.filter(message=OuterRef("message")).order_by("-created_at", "-id").values("id")[:1]
    reviews = Review.objects.annotate(latest_id=Subquery(latest_id)).select_related(
        "reviewer", "message", "message__in_reply_to", "model_version", "item"
    )
    if since is not None:
        reviews = reviews.filter(created_at__gte=since)
    if latest_only:
        reviews = reviews.filter(id=F("latest_id"))
    statuses = dict(TrainingCandidate.objects.values_list("review_id", "status"))
    for review in reviews.order_by("created_at", "id").iterator(chunk_size=1000):
        reply = review.message
        context = review.context or {}
        yield {
            "review_id": review.pk,
            "submitted_at": review.created_at.isoformat(),
            "reviewer": review.reviewer.get_username(),
            "latest": review.pk == review.latest_id,
            "message_id": reply.pk,
            "conversation_id": str(reply.conversation_id),
            "question": reply.in_reply_to.body if reply.in_reply_to_id else "",
            "reply": reply.body,
            "good": review.good,
            "score": review.rating,
            "reasons": list(review.reasons or []),
            "note": review.comment,
            "correction": review.corrected_body,
            "verdict": review.verdict,
            "model_version": review.model_version.label
            if review.model_version_id
            else context.get("model_version", ""),
            "segment": review.segment,
            "confidence": context.get("confidence"),
            "latency_ms": context.get("latency_ms"),
            "customer_helpful": reply.helpful,
            "queue": review.item.source if review.item_id else "",
            "training_status": statuses.get(review.pk, ""),
        }
