"""The workspace pages through the HTTP client: who may open them, CSRF, queues, reviews, takeover, export."""

from __future__ import annotations

import io
import json
import re
import zipfile

import pytest
from django.test import Client

from conversations import services
from conversations.models import Conversation, Message, QueueItem, Review, TrainingCandidate
from conversations.review import services as review
from tests.factories import ConversationFactory, UserFactory, bot_reply

pytestmark = pytest.mark.django_db

PAGES = ["/agent/", "/agent/conversations/", "/agent/stats/"]


def test_anonymous_visitors_are_sent_to_log_in_and_customers_are_refused(client, queued_reply):
    urls = [*PAGES, f"/agent/items/{queued_reply.pk}/", f"/agent/conversations/{queued_reply.conversation_id}/"]
    for url in urls:
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/admin/login/?next=/agent/")
    client.force_login(UserFactory(username="shopper"))
    for url in [*urls, "/agent/training/", "/agent/export/?format=csv"]:
        assert client.get(url).status_code == 403, url
    for url in (
        "/agent/next/",
        f"/agent/items/{queued_reply.pk}/review/",
        f"/agent/conversations/{queued_reply.conversation_id}/take-over/",
    ):
        assert client.post(url, {"verdict": "good", "score": "5"}).status_code == 403, url
    assert not Review.objects.exists()
    assert Conversation.objects.get().status == "bot"


def test_every_form_is_protected_by_csrf(agent, model_admin, queued_reply):
    conversation = queued_reply.conversation
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(agent)
    posts = {
        "/agent/next/": {},
        f"/agent/items/{queued_reply.pk}/claim/": {},
        f"/agent/items/{queued_reply.pk}/release/": {},
        f"/agent/items/{queued_reply.pk}/review/": {"verdict": "good", "score": "5", "action": "submit"},
        f"/agent/messages/{queued_reply.message_id}/flag/": {},
        f"/agent/conversations/{conversation.pk}/take-over/": {},
        f"/agent/conversations/{conversation.pk}/hand-back/": {},
        f"/agent/conversations/{conversation.pk}/close/": {},
        f"/agent/conversations/{conversation.pk}/send/": {"client_id": "x", "text": "Hi"},
    }
    for url, data in posts.items():
        assert strict.post(url, data).status_code == 403, url
    admin = Client(enforce_csrf_checks=True)
    admin.force_login(model_admin)
    assert admin.post("/agent/training/decide/", {"decision": "approve"}).status_code == 403
    queued_reply.refresh_from_db()
    assert (queued_reply.state, queued_reply.claimed_by) == ("pending", None)
    assert not Review.objects.exists()
    assert Conversation.objects.get().status == "bot"

    # With the token the page carries, the same form works.
    page = strict.get(f"/agent/items/{queued_reply.pk}/").content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    response = strict.post(
        f"/agent/items/{queued_reply.pk}/review/",
        {"csrfmiddlewaretoken": token, "verdict": "good", "score": "5", "action": "submit"},
    )
    assert response.status_code == 302
    assert Review.objects.get().rating == 5


def test_the_queue_page_lists_oldest_first_with_tabs_filters_and_search(agent_client, queued_reply):
    later = bot_reply(question="How do refunds work?", body="Refunds take five days.")
    review.queue_item_add(message=later, source="flagged")
    services.conversation_request_human(conversation=ConversationFactory())
    page = agent_client.get("/agent/?source=flagged").content.decode()
    assert page.index("Where is my parcel?") < page.index("How do refunds work?")
    assert 'data-count-for="flagged">2<' in page
    assert 'data-count-for="handoff">1<' in page
    assert 'data-count-for="all">3<' in page
    assert 'Waiting for a human: <strong id="ws-waiting-count" aria-live="polite">1</strong>' in page
    searched = agent_client.get("/agent/?q=refunds").content.decode()
    assert "How do refunds work?" in searched
    assert "Where is my parcel?" not in searched
    version = queued_reply.model_version_id
    by_version = agent_client.get(f"/agent/?model_version={version}").content.decode()
    assert "Where is my parcel?" in by_version
    assert "How do refunds work?" not in by_version
    bad = agent_client.get("/agent/?date_from=yesterday")
    assert bad.status_code == 400
    assert "date_from must be a date like 2025-01-31" in bad.content.decode()


def test_next_claims_the_oldest_item_and_skips_past_the_current_one(agent_client, agent, queued_reply):
    second, _ = review.queue_item_add(message=bot_reply(body="Second reply"), source="flagged")
    response = agent_client.post("/agent/next/", {"source": "flagged"})
    assert response["Location"] == f"/agent/items/{queued_reply.pk}/?source=flagged"
    queued_reply.refresh_from_db()
    assert queued_reply.claimed_by == agent
    response = agent_client.post("/agent/next/", {"source": "flagged", "skip": str(queued_reply.pk)})
    assert response["Location"] == f"/agent/items/{second.pk}/?source=flagged"
    queued_reply.refresh_from_db()
    assert queued_reply.claimed_by is None  # skipped: back in the queue for others
    response = agent_client.post("/agent/next/", {"source": "low_confidence"}, follow=True)
    assert "Nothing left to review in this queue." in response.content.decode()


def test_the_review_page_shows_the_replys_context_and_grounding(agent_client, queued_reply):
    page = agent_client.get(f"/agent/items/{queued_reply.pk}/").content.decode()
    assert "Where is my parcel?" in page  # the conversation
    assert 'id="ws-fact-model">v7<' in page
    assert "0.61" in page  # confidence: exp(-0.5)
    assert "321 ms, first word after 45 ms" in page
    assert "Parcel late?" in page
    assert "Track it in your account." in page
    assert "ticket:bitext:42" in page
    assert "intent: track_order" in page
    assert "Looks off" in page  # why it was queued
    for reason in ("Incorrect information", "Leaked personal data", "Biased or unfair", "Outdated"):
        assert reason in page


def test_agents_see_what_a_bot_reply_leaned_on_and_where_it_came_from(agent_client):
    grounding = [
        {"origin": "ticket:bitext:7", "score": 0.8123, "intent": "track_order", "question": "Parcel late?",
         "answer": "Your order is on its way."},
        {"origin": "correction:12", "score": 0.64, "intent": "track_order", "question": "Where is it?",
         "answer": "It ships today."},
    ]  # fmt: skip
    reply = bot_reply(
        body="Your order is on its way.",
        grounding=grounding,
        generation={
            "source": "retrieved",
            "source_origin": "ticket:bitext:7",
            "policy": {"reason": "The model is unsure"},
        },
    )
    plain = bot_reply(conversation=reply.conversation, question="Thanks", body="You are welcome.")
    page = agent_client.get(f"/agent/conversations/{reply.conversation_id}/").content.decode()
    assert page.count("What the bot leaned on (2)") == 1  # only the grounded reply has it
    assert "ticket:bitext:7 · score 0.81 · intent: track_order" in page
    assert "correction:12" in page
    assert "a past answer (ticket:bitext:7), sent instead of the model's words" in page
    assert plain.body in page

    item, _ = review.queue_item_add(message=reply, source="flagged")
    page = agent_client.get(f"/agent/items/{item.pk}/").content.decode()
    source = re.search(r'id="ws-fact-source">(.*?)</dd>', page, re.S).group(1)
    assert "a past answer (ticket:bitext:7)" in source
    assert "The model is unsure" in source
    assert "What the bot leaned on" in page


def test_submit_and_next_saves_the_review_and_opens_the_next_item(agent_client, agent, queued_reply):
    second, _ = review.queue_item_add(message=bot_reply(body="Second reply"), source="flagged")
    response = agent_client.post(
        f"/agent/items/{queued_reply.pk}/review/?source=flagged",
        {
            "source": "flagged",
            "verdict": "bad",
            "score": "2",
            "reasons": ["incomplete", "outdated"],
            "note": "Says nothing about the delay.",
            "correction": "Your parcel is delayed by a day; here is the tracking link in your account.",
            "action": "submit_next",
        },
    )
    assert response["Location"] == f"/agent/items/{second.pk}/?source=flagged"
    saved = Review.objects.get()
    assert (saved.reviewer, saved.good, saved.rating, saved.reasons) == (agent, False, 2, ["incomplete", "outdated"])
    assert saved.comment == "Says nothing about the delay."
    assert saved.corrected_body.startswith("Your parcel is delayed")
    assert TrainingCandidate.objects.get().status == "pending"
    page = agent_client.get(f"/agent/items/{queued_reply.pk}/").content.decode()
    # The correction is shown as a word diff against the bot's reply.
    assert "Your parcel <del>ships</del><ins>is</ins> <del>today.</del><ins>delayed by a day;" in page


def test_a_draft_keeps_the_values_and_a_refused_review_keeps_what_was_typed(agent_client, queued_reply):
    url = f"/agent/items/{queued_reply.pk}/review/"
    agent_client.post(url, {"verdict": "bad", "score": "3", "note": "half done", "action": "draft"})
    queued_reply.refresh_from_db()
    assert (queued_reply.state, queued_reply.draft["rating"], queued_reply.draft["good"]) == ("draft", 3, False)
    page = agent_client.get(f"/agent/items/{queued_reply.pk}/").content.decode()
    assert 'value="3" id="ws-score-3" checked' in page
    assert ">half done</textarea>" in page

    long_correction = "é" * 2049
    response = agent_client.post(
        url, {"verdict": "bad", "score": "2", "note": "kept", "correction": long_correction, "action": "submit"}
    )
    assert response.status_code == 400
    body = response.content.decode()
    assert "The correction is 4,098 bytes; the limit is 4,096 (4 KB). Shorten it." in body
    assert long_correction in body  # nothing the agent typed is lost
    assert ">kept</textarea>" in body
    assert not Review.objects.exists()

    response = agent_client.post(url, {"verdict": "bad", "score": "9", "action": "submit"})
    assert response.status_code == 400
    assert "The score must be a whole number from 1 to 5, not 9." in response.content.decode()
    json_response = agent_client.post(
        url, {"verdict": "good", "score": "0", "action": "submit"}, HTTP_ACCEPT="application/json"
    )
    assert json_response.status_code == 400
    assert json_response.json()["field"] == "score"
    assert not Review.objects.exists()


def test_an_item_someone_else_holds_cannot_be_reviewed(client, agent, other_agent, queued_reply):
    review.queue_item_claim(item_id=queued_reply.pk, agent=other_agent)
    client.force_login(agent)
    page = client.get(f"/agent/items/{queued_reply.pk}/").content.decode()
    assert "Alex is working on this item" in page
    response = client.post(
        f"/agent/items/{queued_reply.pk}/review/", {"verdict": "good", "score": "5", "action": "submit"}
    )
    assert response.status_code == 409
    assert "Alex is working on this item" in response.content.decode()
    claim = client.post(f"/agent/items/{queued_reply.pk}/claim/", HTTP_ACCEPT="application/json")
    assert (claim.status_code, claim.json()["error"]) == (409, "claimed")
    assert not Review.objects.exists()


def test_rating_a_message_that_is_not_a_bot_reply_is_refused(agent_client):
    question = Message.objects.create(conversation=ConversationFactory(), role="customer", body="Hi")
    response = agent_client.post(f"/agent/messages/{question.pk}/flag/", HTTP_ACCEPT="application/json")
    assert response.status_code == 400
    assert response.json()["error"] == "not_bot_reply"
    assert not QueueItem.objects.exists()


def test_flag_a_reply_and_review_it_now(agent_client):
    reply = bot_reply()
    response = agent_client.post(f"/agent/messages/{reply.pk}/flag/", {"review": "1", "note": "Odd tone"})
    item = QueueItem.objects.get()
    assert (item.source, item.note, response["Location"]) == ("flagged", "Odd tone", f"/agent/items/{item.pk}/")
    # "back" only ever leads to a workspace page.
    for back, expected in (
        ("/agent/stats/", "/agent/stats/"),
        ("https://evil.example/", f"/agent/conversations/{item.conversation_id}/"),
        ("//evil.example/agent/", f"/agent/conversations/{item.conversation_id}/"),
    ):
        response = agent_client.post(f"/agent/messages/{reply.pk}/flag/", {"back": back})
        assert response["Location"] == expected


def test_take_over_write_hand_back_and_close_through_the_pages(agent_client, agent, other_agent):
    conversation = ConversationFactory()
    services.message_create_customer(conversation=conversation, client_id="c1", text="I need a person")
    base = f"/agent/conversations/{conversation.pk}/"
    page = agent_client.get(base).content.decode()
    assert "I need a person" in page
    assert 'id="ws-compose"' in page
    response = agent_client.post(base + "take-over/", HTTP_ACCEPT="application/json")
    assert response.json()["status"] == "with_agent"
    response = agent_client.post(base + "send/", {"client_id": "a1", "text": "Hello, Sam here."})
    assert response.status_code == 302
    message = conversation.messages.get(role="agent")
    assert (message.body, message.author) == ("Hello, Sam here.", agent)
    assert agent_client.post(base + "hand-back/").status_code == 302
    conversation.refresh_from_db()
    assert conversation.status == "bot"
    assert agent_client.post(base + "close/").status_code == 302
    conversation.refresh_from_db()
    assert conversation.status == "closed"
    # A closed conversation cannot be taken over: a clear error, nothing changed.
    refused = agent_client.post(base + "take-over/")
    assert refused.status_code == 409
    assert "This conversation is closed; it cannot be taken over." in refused.content.decode()
    assert (
        agent_client.post(base + "take-over/", HTTP_ACCEPT="application/json").json()["error"] == "conversation_closed"
    )


def test_the_training_set_page_approves_in_bulk_for_model_admins_only(client, agent, model_admin):
    replies = [bot_reply(body=f"Reply {n}") for n in range(3)]
    for reply in replies:
        review.review_submit(agent=agent, message_id=reply.pk, good=False, rating=2, correction=f"Better {reply.pk}")
    client.force_login(agent)
    assert client.get("/agent/training/").status_code == 403
    assert client.post("/agent/training/decide/", {"decision": "approve"}).status_code == 403
    client.force_login(model_admin)
    page = client.get("/agent/training/").content.decode()
    assert page.count('name="candidate"') == 3
    chosen = list(TrainingCandidate.objects.order_by("pk").values_list("pk", flat=True)[:2])
    response = client.post(
        "/agent/training/decide/", {"decision": "approve", "candidate": [str(pk) for pk in chosen]}, follow=True
    )
    assert "2 approved for the next dataset build." in response.content.decode()
    assert sorted(TrainingCandidate.objects.filter(status="approved").values_list("pk", flat=True)) == chosen
    approved = client.get("/agent/training/?status=approved").content.decode()
    assert "in the next build" in approved
    assert f"reviewed by {agent.username}" in approved


def test_the_stats_page_shows_progress_and_agreement(agent_client, agent, other_agent):
    replies = [bot_reply() for _ in range(4)]
    for reply, (a, b) in zip(replies, [(True, True), (True, False), (False, False), (True, True)], strict=True):
        review.review_submit(agent=agent, message_id=reply.pk, good=a, rating=4)
        review.review_submit(agent=other_agent, message_id=reply.pk, good=b, rating=4)
    page = agent_client.get("/agent/stats/").content.decode()
    assert "alex · sam" in page
    assert "0.750" in page  # 3 of 4 agree
    assert "0.500" in page  # kappa: (0.75 - 0.5) / 0.5


def test_export_downloads_csv_jsonl_and_a_datasets_zip(agent_client, agent):
    reply = bot_reply(body="=HYPERLINK(1)")
    review.review_submit(
        agent=agent, message_id=reply.pk, good=False, rating=1, reasons=["incorrect"], note="n", correction="Fixed."
    )
    csv_text = b"".join(agent_client.get("/agent/export/?format=csv").streaming_content).decode()
    header, row = csv_text.splitlines()[:2]
    assert header.startswith("review_id,submitted_at,reviewer,latest,message_id")
    assert ",sam,true," in row
    assert "'=HYPERLINK(1)" in row  # not run as a formula by a spreadsheet
    lines = b"".join(agent_client.get("/agent/export/?format=jsonl").streaming_content).decode().splitlines()
    record = json.loads(lines[0])
    assert (record["score"], record["reasons"], record["correction"], record["good"]) == (
        1,
        ["incorrect"],
        "Fixed.",
        False,
    )
    response = agent_client.get("/agent/export/?format=hf")
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    assert "dataset_info.json" in archive.namelist()
    assert agent_client.get("/agent/export/?format=xml").status_code == 400
