"""The retrieval index: nearest exchanges, typo tolerance, exclusion of an example's own row, save/load."""

from __future__ import annotations

import json

import pytest

from finetune.ml.retrieval import (
    Exchange,
    RetrievalIndex,
    RetrievalIndexError,
    exchanges_from_conversations,
    intent_vote,
    normalise_query,
    retrieval_query,
)

EXCHANGES = [
    Exchange("How do I cancel my order {{ORDER_ID}}?", "Open Orders and press Cancel.", "cancel_order", "t:1"),
    Exchange("I want to cancel a purchase", "Orders > Cancel stops it before shipping.", "cancel_order", "t:2"),
    Exchange("Where is my parcel? It has not arrived", "Track it under Orders > Tracking.", "track_order", "t:3"),
    Exchange("my package hasnt arrived yet", "Your parcel's tracking link is in your e-mail.", "track_order", "t:4"),
    Exchange("I need a refund for a broken item", "Refunds: Orders > Return, choose Damaged.", "get_refund", "t:5"),
    Exchange("How can I reset my password?", "Use Forgot password on the sign-in page.", "recover_password", "t:6"),
]


@pytest.fixture(scope="module")
def index() -> RetrievalIndex:
    return RetrievalIndex.build(EXCHANGES)


def test_nearest_exchange_answers_the_same_question_best_first(index):
    hits = index.search("my package has not arrived yet, order 12345", k=3)

    assert [h.exchange.intent for h in hits[:2]] == ["track_order", "track_order"]
    assert hits[0].score >= hits[1].score >= hits[2].score
    assert 0 < hits[0].score <= 1.0


def test_typos_and_numbers_still_find_the_exchange(index):
    # "cancle" and a live order number instead of the dataset's {{ORDER_ID}} placeholder.
    hits = index.search("how do i cancle my ordr 88812345", k=1)

    assert hits[0].exchange.origin == "t:1"
    assert normalise_query("Order {{ORDER_ID}}") == normalise_query("order 88812345")


def test_exclude_leaves_out_the_examples_own_row(index):
    own = index.search("How can I reset my password?", k=1)[0]
    assert own.position == 5

    others = index.search("How can I reset my password?", k=6, exclude=5)

    assert 5 not in [h.position for h in others]


def test_search_many_matches_search_one_by_one(index):
    queries = ["refund for a broken thing", "reset password", "where is my parcel"]

    together = index.search_many(queries, k=2)

    assert [[h.position for h in hits] for hits in together] == [
        [h.position for h in index.search(q, k=2)] for q in queries
    ]


def test_intent_vote_weighs_by_similarity(index):
    hits = index.search("parcel not arrived", k=5)

    intent, share = intent_vote(hits)

    assert intent == "track_order"
    assert 0.5 < share <= 1.0


def test_saved_index_loads_and_answers_identically(index, tmp_path):
    index.save(tmp_path / "retrieval")

    loaded = RetrievalIndex.load(tmp_path / "retrieval")

    query = "i want my money back, the item is broken"
    assert [(h.position, round(h.score, 5)) for h in loaded.search(query, k=3)] == [
        (h.position, round(h.score, 5)) for h in index.search(query, k=3)
    ]
    assert loaded.exchanges == index.exchanges


def test_loading_a_missing_or_foreign_index_says_what_to_do(index, tmp_path):
    with pytest.raises(RetrievalIndexError, match="build_dataset"):
        RetrievalIndex.load(tmp_path / "nothing")

    index.save(tmp_path / "retrieval")
    meta = json.loads((tmp_path / "retrieval" / "index.json").read_text())
    (tmp_path / "retrieval" / "index.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(RetrievalIndexError, match="format 99"):
        RetrievalIndex.load(tmp_path / "retrieval")


def test_an_index_needs_an_exchange():
    with pytest.raises(ValueError, match="at least one exchange"):
        RetrievalIndex.build([Exchange("", "reply")])


def test_exchanges_come_from_dataset_conversations():
    conversations = [
        [
            {"role": "system", "content": "You are Acme's assistant."},
            {"role": "customer", "content": "I ordered the wrong size, can I exchange it?"},
            {"role": "agent", "content": "Which size would you like?"},
            {"role": "customer", "content": "M please"},
            {"role": "agent", "content": "Done: a size M is on its way."},
        ],
        [{"role": "customer", "content": "hello?"}],  # no reply: not an exchange
    ]

    exchanges = exchanges_from_conversations(conversations, ["change_order", "x"], ["t:9", "t:10"])

    # A short last turn is searched with the customer's turn before it.
    assert exchanges == [
        Exchange(
            "I ordered the wrong size, can I exchange it?\nM please",
            "Done: a size M is on its way.",
            "change_order",
            "t:9",
        )
    ]
    assert retrieval_query(conversations[0][:-1]) == exchanges[0].question
