"""The agents' work, service by service: queues, claims with a lease, reviews, training candidates."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from conversations import services
from conversations.models import Conversation, Message, QueueItem, Review, TrainingCandidate
from conversations.review import selectors
from conversations.review import services as review
from conversations.review.selectors import QueueFilters, queue_filters_parse
from finetune.selectors import training_examples_from_feedback
from finetune.serving.interface import GenerationDone
from supportbot.errors import ApplicationError
from tests.factories import ConversationFactory, MessageFactory, ModelVersionFactory, UserFactory, bot_reply

pytestmark = pytest.mark.django_db


def finished_reply(conversation, *, text="Your order ships today.", logprob=-0.3):
    """A reply produced the way the chat produces it: customer message, start, finish."""
    services.message_create_customer(conversation=conversation, client_id=f"c{Message.objects.count()}", text="Where?")
    reply, _ = services.bot_reply_start(conversation=conversation, model_label="v1", params={}, owner="test:1")
    done = GenerationDone(
        text=text,
        finish_reason="stop",
        token_count=5,
        mean_logprob=logprob,
        model_label="v1",
        first_token_ms=10,
        latency_ms=50,
    )
    return services.bot_reply_finish(message_id=reply.pk, done=done, seq=5)


def submit(agent, reply, item=None, **values):
    values = {"good": True, "rating": 4, **values}
    return review.review_submit(agent=agent, message_id=reply.pk, item_id=item.pk if item else None, **values)


def open_items(**filters):
    return list(selectors.queue_items_filtered(QueueFilters(**filters)))


# --- entering queues ---------------------------------------------------------------------------


def test_each_source_queues_a_reply_once(settings):
    ModelVersionFactory(number=1)
    settings.SUPPORTBOT_REVIEW_LOGPROB_THRESHOLD = -1.5
    settings.SUPPORTBOT_REVIEW_SAMPLE_SHARE = 1.0
    conversation = ConversationFactory(segment="pro")

    confident = finished_reply(conversation, logprob=-0.2)
    doubtful = finished_reply(conversation, logprob=-2.0)
    assert {(i.message_id, i.source) for i in open_items()} == {
        (confident.pk, "sample"),
        (doubtful.pk, "sample"),
        (doubtful.pk, "low_confidence"),
    }

    services.csat_record(conversation=conversation, message_id=confident.pk, helpful=False)
    services.csat_record(conversation=conversation, message_id=confident.pk, helpful=False)
    services.csat_record(conversation=conversation, message_id=doubtful.pk, helpful=True)
    flagger = UserFactory()
    first, created = review.reply_flag(message_id=doubtful.pk, agent=flagger, note="Wrong refund policy")
    again, created_again = review.reply_flag(message_id=doubtful.pk, agent=flagger)
    assert (created, created_again, again.pk) == (True, False, first.pk)
    assert first.note == "Wrong refund policy"

    services.conversation_request_human(conversation=conversation)
    services.conversation_request_human(conversation=conversation)

    sources = sorted((i.source, i.message_id) for i in open_items())
    assert sources == sorted(
        [
            ("sample", confident.pk),
            ("sample", doubtful.pk),
            ("low_confidence", doubtful.pk),
            ("not_helpful", confident.pk),
            ("flagged", doubtful.pk),
            ("handoff", None),
        ]
    )
    handoff = QueueItem.objects.get(source="handoff")
    assert (handoff.kind, handoff.conversation_id, handoff.note) == (
        "conversation",
        conversation.pk,
        "Customer asked for a human",
    )
    low = QueueItem.objects.get(source="low_confidence")
    assert (low.segment, low.model_version.label) == ("pro", "v1")


def test_only_finished_bot_replies_enter_a_reply_queue():
    question = MessageFactory(role=Message.Role.CUSTOMER)
    streaming = MessageFactory(role=Message.Role.BOT, status=Message.Status.STREAMING)
    for message in (question, streaming):
        with pytest.raises(ApplicationError) as caught:
            review.queue_item_add(message=message, source="flagged")
        assert caught.value.code == "not_bot_reply"
    assert QueueItem.objects.count() == 0


def test_sample_and_double_review_shares_are_reproducible(settings):
    settings.SUPPORTBOT_DOUBLE_REVIEW_SHARE = 0.5
    replies = [bot_reply() for _ in range(60)]
    for reply in replies:
        review.queue_item_add(message=reply, source="flagged")
    doubled = {i.message_id for i in QueueItem.objects.filter(slot=2)}
    assert 15 <= len(doubled) <= 45  # about half
    assert all(review._picked("double", pk, 0.5) for pk in doubled)
    # Queueing the same replies again (another queue) adds no second reviews.
    for reply in replies:
        review.queue_item_add(message=reply, source="not_helpful")
    assert QueueItem.objects.filter(slot=2).count() == len(doubled)


# --- listing -----------------------------------------------------------------------------------


def test_queues_are_first_in_first_out_with_filters_and_search():
    v1, v2 = ModelVersionFactory(number=1), ModelVersionFactory(number=2)
    base = timezone.now() - timedelta(days=3)
    rows = [
        ("Where is my parcel?", "It ships today.", v1, "pro", "track_order", 0),
        ("Refund please", "Refunds take five days.", v2, "free", "get_refund", 1),
        ("Change address", "Open Settings.", v2, "pro", "change_address", 2),
    ]
    items = []
    for question, body, version, segment, intent, day in rows:
        conversation = ConversationFactory(segment=segment)
        reply = bot_reply(
            conversation=conversation,
            question=question,
            body=body,
            model_version=version,
            generation={"intent": intent},
        )
        item, _ = review.queue_item_add(message=reply, source="flagged")
        QueueItem.objects.filter(pk=item.pk).update(created_at=base + timedelta(days=day))
        items.append(item)
    handoff_conversation = ConversationFactory()
    MessageFactory(conversation=handoff_conversation, body="I need a person about my invoice")
    services.conversation_request_human(conversation=handoff_conversation)

    def ids(**params):
        return [i.pk for i in selectors.queue_items_filtered(queue_filters_parse(params))]

    assert ids(source="flagged") == [i.pk for i in items]  # oldest first
    assert ids(model_version=str(v2.pk)) == [items[1].pk, items[2].pk]
    assert ids(segment="pro", source="flagged") == [items[0].pk, items[2].pk]
    assert ids(intent="get_refund") == [items[1].pk]
    assert ids(q="parcel") == [items[0].pk]  # the customer's question
    assert ids(q="five days") == [items[1].pk]  # the reply
    assert ids(q="invoice") == [QueueItem.objects.get(source="handoff").pk]  # a waiting conversation's messages
    day2 = (base + timedelta(days=1)).date().isoformat()
    assert ids(date_from=day2, date_to=day2) == [items[1].pk]
    review.queue_item_discard(item_id=items[0].pk, agent=UserFactory())
    assert ids(source="flagged") == [items[1].pk, items[2].pk]
    assert ids(source="flagged", state="discarded") == [items[0].pk]
    assert selectors.queue_counts()["flagged"] == 2
    for bad in ({"source": "nope"}, {"state": "gone"}, {"model_version": "x"}, {"date_from": "May 1"}):
        with pytest.raises(ApplicationError):
            queue_filters_parse(bad)


# --- claims ------------------------------------------------------------------------------------


def test_next_gives_each_agent_a_different_item_and_a_lease(agent, other_agent, settings):
    replies = [bot_reply() for _ in range(3)]
    for reply in replies:
        review.queue_item_add(message=reply, source="flagged")
    first = review.queue_item_claim_next(agent=agent)
    second = review.queue_item_claim_next(agent=other_agent)
    assert (first.message_id, second.message_id) == (replies[0].pk, replies[1].pk)
    assert first.lease_expires_at - first.claimed_at == timedelta(seconds=settings.SUPPORTBOT_REVIEW_LEASE_S)
    # Asking again keeps one's place; skipping releases it and moves on.
    assert review.queue_item_claim_next(agent=agent).pk == first.pk
    third = review.queue_item_claim_next(agent=agent, skip=[first.pk])
    assert third.message_id == replies[2].pk
    first.refresh_from_db()
    assert first.claimed_by is None
    # Nobody may act on an item someone else holds.
    with pytest.raises(ApplicationError) as caught:
        review.queue_item_claim(item_id=second.pk, agent=agent)
    assert caught.value.code == "claimed"
    assert "Alex is working on this item" in caught.value.message
    with pytest.raises(ApplicationError, match="Alex is working on this item"):
        submit(agent, replies[1], item=second)
    assert Review.objects.count() == 0


def test_an_abandoned_claim_returns_to_the_queue_after_its_lease(agent, other_agent):
    review.queue_item_add(message=bot_reply(), source="flagged")
    held = review.queue_item_claim_next(agent=agent)
    assert review.queue_item_claim_next(agent=other_agent) is None
    QueueItem.objects.filter(pk=held.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    taken = review.queue_item_claim_next(agent=other_agent)
    assert (taken.pk, taken.claimed_by) == (held.pk, other_agent)
    review.queue_item_release(item_id=taken.pk, agent=other_agent)
    assert review.queue_item_claim_next(agent=agent).pk == held.pk


@pytest.mark.django_db(transaction=True)
def test_concurrent_next_calls_on_postgres_get_different_items(postgres):
    from supportbot.roles import SUPPORT_AGENTS
    from tests.factories import staff_user

    agents = [staff_user(SUPPORT_AGENTS, f"agent{n}") for n in range(4)]
    for _ in range(6):
        review.queue_item_add(message=bot_reply(), source="flagged")

    # One agent's transaction holds its claim uncommitted while another asks: the second
    # must neither wait for the lock nor get the same row.
    holding, released = threading.Event(), threading.Event()
    got: dict[str, int] = {}

    def slow_claim():
        try:
            with transaction.atomic():
                got["first"] = review.queue_item_claim_next(agent=agents[0]).pk
                holding.set()
                released.wait(30)
        finally:
            connection.close()

    thread = threading.Thread(target=slow_claim)
    thread.start()
    try:
        assert holding.wait(30)
        finished = threading.Event()

        def fast_claim():
            try:
                got["second"] = review.queue_item_claim_next(agent=agents[1]).pk
                finished.set()
            finally:
                connection.close()

        other = threading.Thread(target=fast_claim)
        other.start()
        assert finished.wait(30), "the second 'next' waited for the first one's lock"
        other.join()
    finally:
        released.set()
        thread.join()
    assert got["first"] != got["second"]

    # Many at once: every agent gets its own item.
    barrier = threading.Barrier(4)
    claimed: list[int] = []

    def claim(user):
        try:
            barrier.wait(30)
            item = review.queue_item_claim_next(agent=user, skip=[got["first"], got["second"]])
            claimed.append(item.pk)
        finally:
            connection.close()

    threads = [threading.Thread(target=claim, args=(user,)) for user in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(claimed) == 4
    assert len(set(claimed)) == 4


# --- reviews -------------------------------------------------------------------------------------


def test_submissions_are_append_only_and_the_latest_counts(agent, other_agent):
    version = ModelVersionFactory(number=3)
    reply = bot_reply(
        model_version=version,
        mean_logprob=-0.7,
        latency_ms=420,
        generation={
            "model_label": "v3",
            "grounding": [{"question": "Parcel late?", "answer": "Track it.", "score": 0.8}],
        },
    )
    item, _ = review.queue_item_add(message=reply, source="flagged")
    review.queue_item_claim_next(agent=agent)

    draft = review.review_draft_save(item_id=item.pk, agent=agent, values={"rating": 2, "reasons": ["incomplete"]})
    assert (draft.state, draft.draft["rating"], draft.draft["good"]) == ("draft", 2, None)

    first = submit(agent, reply, item=item, good=False, rating=2, reasons=["incomplete", "incomplete"], note="Vague")
    item.refresh_from_db()
    assert (item.state, item.resolution, item.claimed_by, item.draft) == ("submitted", "reviewed", None, {})
    assert (first.good, first.rating, first.reasons, first.comment, first.verdict) == (
        False,
        2,
        ["incomplete"],
        "Vague",
        "rejected",
    )
    assert first.context["model_version"] == "v3"
    assert first.context["latency_ms"] == 420
    assert first.context["confidence"] == pytest.approx(0.4966, abs=1e-3)
    assert first.context["grounding"][0]["question"] == "Parcel late?"
    assert not TrainingCandidate.objects.exists()  # a bad reply with no correction trains nothing

    # A later submission (another agent changes the verdict) is a new row; the old one stays.
    second = submit(other_agent, reply, good=False, rating=1, correction="Your parcel left our warehouse today.")
    assert Review.objects.filter(message=reply).count() == 2
    assert Review.objects.get(pk=first.pk).rating == 2
    assert second.verdict == "corrected"
    candidate = TrainingCandidate.objects.get()
    assert (candidate.kind, candidate.text, candidate.status, candidate.reviewer) == (
        "correction",
        "Your parcel left our warehouse today.",
        "pending",
        other_agent,
    )
    assert candidate.model_version == version
    third = submit(agent, reply, good=True, rating=5)
    candidate.refresh_from_db()
    assert candidate.status == "superseded"
    latest = TrainingCandidate.objects.get(status="pending")
    assert (latest.review, latest.kind, latest.text) == (third, "approved_reply", reply.body)


def test_discarding_an_item_drops_its_draft(agent):
    item, _ = review.queue_item_add(message=bot_reply(), source="sample")
    review.review_draft_save(item_id=item.pk, agent=agent, values={"good": True})
    review.queue_item_discard(item_id=item.pk, agent=agent, note="Test message from our QA")
    item.refresh_from_db()
    assert (item.state, item.draft, item.note) == ("discarded", {}, "Test message from our QA")
    with pytest.raises(ApplicationError, match="already discarded"):
        review.review_draft_save(item_id=item.pk, agent=agent, values={})


def test_reviewing_a_reply_resolves_its_other_queue_entries(agent):
    reply = bot_reply()
    flagged, _ = review.queue_item_add(message=reply, source="flagged")
    sampled, _ = review.queue_item_add(message=reply, source="sample")
    submit(agent, reply, item=flagged)
    sampled.refresh_from_db()
    assert (sampled.state, sampled.resolution) == ("submitted", "reviewed_elsewhere")


@pytest.mark.parametrize(
    ("values", "code", "field"),
    [
        ({"rating": 0}, "bad_review", "score"),
        ({"rating": 6}, "bad_review", "score"),
        ({"rating": "5"}, "bad_review", "score"),
        ({"rating": True}, "bad_review", "score"),
        ({"good": None}, "bad_review", "good"),
        ({"reasons": ["rude"]}, "bad_review", "reasons"),
        ({"reasons": ["other"]}, "bad_review", "note"),
        ({"note": "x" * 2001}, "bad_review", "note"),
        # 2,049 two-byte characters: under 4,096 characters, over 4 KB.
        ({"correction": "é" * 2049}, "correction_too_long", "correction"),
    ],
)
def test_bad_review_values_are_refused_and_nothing_is_saved(agent, values, code, field):
    reply = bot_reply()
    item, _ = review.queue_item_add(message=reply, source="flagged")
    review.review_draft_save(item_id=item.pk, agent=agent, values={"rating": 3})
    with pytest.raises(ApplicationError) as caught:
        submit(agent, reply, item=item, **values)
    assert (caught.value.code, caught.value.extra.get("field")) == (code, field)
    item.refresh_from_db()
    assert (item.state, item.draft["rating"]) == ("draft", 3)
    assert not Review.objects.exists()
    assert not TrainingCandidate.objects.exists()


def test_a_correction_of_exactly_4_kb_is_accepted(agent):
    reply = bot_reply()
    saved = submit(agent, reply, good=False, rating=1, correction="é" * 2048)
    assert len(saved.corrected_body.encode()) == 4096


def test_only_finished_bot_replies_can_be_rated(agent):
    question = MessageFactory(role=Message.Role.CUSTOMER, body="Hi")
    agent_message = MessageFactory(role=Message.Role.AGENT, body="Hello")
    failed = MessageFactory(role=Message.Role.BOT, status=Message.Status.FAILED)
    for message in (question, agent_message, failed):
        with pytest.raises(ApplicationError) as caught:
            submit(agent, message)
        assert caught.value.code == "not_bot_reply"
    assert "only the bot's replies can be reviewed" in str(
        pytest.raises(ApplicationError, submit, agent, question).value
    )
    with pytest.raises(ApplicationError, match="no message 999999"):
        review.review_submit(agent=agent, message_id=999999, good=True, rating=4)
    assert not Review.objects.exists()


def test_a_double_reviewed_reply_needs_two_different_reviewers(agent, other_agent, settings):
    settings.SUPPORTBOT_DOUBLE_REVIEW_SHARE = 1.0
    reply = bot_reply()
    review.queue_item_add(message=reply, source="sample")
    first, second = QueueItem.objects.order_by("slot")
    assert (first.slot, second.slot) == (1, 2)
    assert review.queue_item_claim_next(agent=agent).pk == first.pk
    submit(agent, reply, item=first, good=True, rating=5)
    assert review.queue_item_claim_next(agent=agent) is None  # not their own reply's second review
    with pytest.raises(ApplicationError) as caught:
        submit(agent, reply, item=second, good=True, rating=5)
    assert caught.value.code == "second_reviewer"
    assert review.queue_item_claim_next(agent=other_agent).pk == second.pk
    submit(other_agent, reply, item=second, good=False, rating=2)
    second.refresh_from_db()
    assert second.state == "submitted"
    assert Review.objects.filter(message=reply).count() == 2


# --- the training set --------------------------------------------------------------------------


def test_only_approved_feedback_reaches_the_dataset(agent, model_admin):
    customer = UserFactory(first_name="Jane", last_name="Doe", email="jane@example.com")
    good = bot_reply(conversation=ConversationFactory(customer=customer, segment="pro"), body="It ships today.")
    wrong = bot_reply(question="Can I pay by PayPal?", body="No.")
    rejected_later = bot_reply(question="Hours?", body="9 to 5.")
    approved_review = submit(agent, good, good=True, rating=5)
    correction = submit(agent, wrong, good=False, rating=1, correction="Yes, PayPal works at checkout.")
    submit(agent, rejected_later, good=True, rating=4)
    assert list(training_examples_from_feedback()) == []  # nothing flows before approval

    pending = {c.message_id: c.pk for c in TrainingCandidate.objects.filter(status="pending")}
    with pytest.raises(ApplicationError) as caught:
        review.training_candidates_decide(ids=pending.values(), user=agent, approve=True)
    assert caught.value.code == "forbidden"
    result = review.training_candidates_decide(ids=pending.values(), user=model_admin, approve=True)
    assert result == {"changed": 3, "skipped": 0}
    # A later bad review of an approved reply takes it out again: the latest review counts.
    submit(agent, rejected_later, good=False, rating=1)
    assert review.training_candidates_decide(ids=pending.values(), user=model_admin, approve=False)["skipped"] == 3

    examples = {e.origin: e for e in training_examples_from_feedback()}
    assert set(examples) == {f"review:{approved_review.pk}", f"correction:{correction.pk}"}
    approved = examples[f"review:{approved_review.pk}"]
    assert approved.messages == [
        {"role": "customer", "content": "Where is my order?"},
        {"role": "agent", "content": "It ships today."},
    ]
    assert (approved.segment, approved.customer.name, approved.customer.email) == (
        "pro",
        "Jane Doe",
        "jane@example.com",
    )
    assert examples[f"correction:{correction.pk}"].messages[-1]["content"] == "Yes, PayPal works at checkout."
    decided = TrainingCandidate.objects.get(message=good)
    assert (decided.decided_by, decided.status) == (model_admin, "approved")


def test_a_conversation_handed_off_twice_gets_a_new_handoff_entry_each_time(agent):
    conversation = ConversationFactory()
    services.conversation_request_human(conversation=conversation)
    services.conversation_take_over(conversation_id=conversation.pk, agent=agent)
    services.conversation_hand_back(conversation_id=conversation.pk, agent=agent)
    conversation.refresh_from_db()
    services.conversation_request_human(conversation=conversation)
    entries = list(QueueItem.objects.filter(source="handoff").order_by("id"))
    assert [(e.state, e.resolution) for e in entries] == [("submitted", "taken_over"), ("pending", "")]
    assert selectors.waiting_count() == 1
    assert Conversation.objects.get().status == "waiting_for_agent"
