"""Agreement figures and progress equal the ones computed by hand."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from conversations.models import Message
from conversations.review import agreement, selectors
from conversations.review import services as review
from supportbot.roles import SUPPORT_AGENTS
from tests.factories import bot_reply, staff_user

pytestmark = pytest.mark.django_db

# Two reviewers' good (G) / bad (B) calls on the same ten replies.
A = "GGGGGBBBGB"
B = "GGGBGBBGGB"
# By hand: they agree on 8 of 10 (raw 0.8). Each says "good" 6 times, so chance
# agreement is 0.6*0.6 + 0.4*0.4 = 0.52, and kappa = (0.8 - 0.52) / (1 - 0.52) = 7/12.
RAW, KAPPA = 0.8, 7 / 12


def test_compare_matches_the_hand_computation():
    result = agreement.compare([c == "G" for c in A], [c == "G" for c in B])
    assert (result.n, result.raw) == (10, RAW)
    assert result.kappa == pytest.approx(KAPPA)
    # Perfect agreement is 1; agreement no better than chance is 0; one label everywhere is undefined.
    assert agreement.compare([1, 2, 1], [1, 2, 1]).kappa == pytest.approx(1.0)
    assert agreement.compare([True, True, False, False], [True, False, True, False]).kappa == pytest.approx(0.0)
    same = agreement.compare([True, True], [True, True])
    assert (same.raw, same.kappa, same.note) == (1.0, None, "undefined: every item got the same label")
    assert agreement.compare([], []).n == 0
    # Weighted kappa on scores: 1 vs 2 is a smaller disagreement than 1 vs 5.
    near = agreement.compare([1, 3, 5, 5], [2, 3, 5, 4], weights="quadratic")
    far = agreement.compare([1, 3, 5, 5], [5, 3, 1, 4], weights="quadratic")
    assert near.kappa > far.kappa


def test_agreement_report_per_pair_overall_and_against_customers():
    ann = staff_user(SUPPORT_AGENTS, "ann")
    ben = staff_user(SUPPORT_AGENTS, "ben")
    cat = staff_user(SUPPORT_AGENTS, "cat")
    replies = [bot_reply(body=f"Reply {n}") for n in range(10)]
    for reply, a, b in zip(replies, A, B, strict=True):
        review.review_submit(agent=ann, message_id=reply.pk, good=a == "G", rating=4 if a == "G" else 2)
        review.review_submit(agent=ben, message_id=reply.pk, good=b == "G", rating=4 if b == "G" else 2)
    # ann changes her mind on reply 9 (B -> G): her latest review counts, so the pair now
    # disagrees there: 7 of 10 agree; ann says good 7 times, ben 6 times:
    # chance 0.7*0.6 + 0.3*0.4 = 0.54, kappa = (0.7 - 0.54) / 0.46 = 0.16 / 0.46.
    review.review_submit(agent=ann, message_id=replies[9].pk, good=True, rating=5)
    # cat and ann both review two more replies and agree on both (one good, one bad).
    extra = [bot_reply(body="Extra 1"), bot_reply(body="Extra 2")]
    for reply, good in zip(extra, (True, False), strict=True):
        review.review_submit(agent=ann, message_id=reply.pk, good=good, rating=3)
        review.review_submit(agent=cat, message_id=reply.pk, good=good, rating=3)

    report = selectors.agreement_report()
    pairs = {(p["a"], p["b"]): p for p in report["pairs"]}
    ab = pairs[("ann", "ben")]
    assert (ab["n"], ab["raw"]) == (10, 0.7)
    assert ab["kappa"] == pytest.approx(0.16 / 0.46)
    ac = pairs[("ann", "cat")]
    assert (ac["n"], ac["raw"], ac["kappa"]) == (2, 1.0, pytest.approx(1.0))
    # Overall pools both pairs: 12 items, 9 agree (raw 0.75). First rater (ann) says good
    # 7+1 = 8 times, second 6+1 = 7 times: chance (8*7 + 4*5) / 144 = 76/144, kappa =
    # (0.75 - 76/144) / (1 - 76/144) = (108 - 76) / (144 - 76) = 32/68.
    overall = report["overall"]
    assert (overall["n"], overall["raw"]) == (12, 0.75)
    assert overall["kappa"] == pytest.approx(32 / 68)
    assert report["double_reviewed"] == 12

    # Agents against customers: replies 0-3 have a customer answer. The latest reviews
    # there are ben's (good, good, good, bad); customers said yes, no, yes, no: 3 of 4.
    for reply, helpful in zip(replies[:4], (True, False, True, False), strict=True):
        Message.objects.filter(pk=reply.pk).update(helpful=helpful)
    customer = selectors.agreement_report()["customer"]
    assert (customer.n, customer.raw) == (4, 0.75)
    # By hand: agents good 3/4, customers yes 2/4: chance 0.75*0.5 + 0.25*0.5 = 0.5; kappa 0.5.
    assert customer.kappa == pytest.approx(0.5)


def test_progress_counts_today_and_this_week_per_agent_and_queue():
    ann = staff_user(SUPPORT_AGENTS, "ann", first_name="Ann")
    ben = staff_user(SUPPORT_AGENTS, "ben")
    now = timezone.now()
    flagged = bot_reply()
    item, _ = review.queue_item_add(message=flagged, source="flagged")
    review.review_submit(agent=ann, message_id=flagged.pk, item_id=item.pk, good=False, rating=1, correction="Better.")
    review.review_submit(agent=ann, message_id=bot_reply().pk, good=True, rating=5)
    old = review.review_submit(agent=ben, message_id=bot_reply().pk, good=True, rating=5)
    last_week = selectors._day_start(selectors._week_start(timezone.localdate(now))) - timedelta(days=1)
    review.review_submit(agent=ben, message_id=bot_reply().pk, good=True, rating=5)
    type(old).objects.filter(pk=old.pk).update(created_at=last_week)
    progress = selectors.review_progress(now=now)
    agents = {a["username"]: a for a in progress["agents"]}
    assert (agents["ann"]["name"], agents["ann"]["today"], agents["ann"]["week"]) == ("Ann", 2, 2)
    assert agents["ann"]["corrections"] == 1
    assert (agents["ben"]["today"], agents["ben"]["week"]) == (1, 1)
    queues = {q["source"]: q for q in progress["queues"]}
    assert (queues["flagged"]["today"], queues["flagged"]["week"]) == (1, 1)
    assert queues[""]["week"] == 2  # reviewed straight from a conversation, outside any queue; one is last week's
