"""The demo's sample tickets answer the demo's questions: a delivery-address change, in French
or English, finds the shipping-address exchanges, not the e-mail-address ones.

Built as the demo builds it: both fixture files through the project's importer format and
dataset builder (redaction, split), then the dataset's own retrieval index (train split).
"""

from __future__ import annotations

import importlib.util
import itertools
import json

import pytest

from finetune.ml.dataset_builder import BuildOptions, build_dataset, conversations_from_jsonl
from finetune.ml.knowledge import load_knowledge
from finetune.ml.training import load_tokenizer
from tests.conftest import ROOT
from tests.finetune.fixtures import SAMPLE_TICKETS, SHIPPING_TICKETS

QUESTIONS = ["je voudrais changer mon adresse de livraison", "I want to change my delivery address"]


def _index(tmp_path, ticket_lm_dir, files):
    options = BuildOptions(out_dir=tmp_path, tokenizer_name=str(ticket_lm_dir), system_prompt="Acme", max_length=512)
    conversations = itertools.chain.from_iterable(conversations_from_jsonl(f) for f in files)
    build_dataset(conversations, load_tokenizer(str(ticket_lm_dir)), options)
    return load_knowledge(tmp_path, strict=True).index


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory, ticket_lm_dir):
    return _index(tmp_path_factory.mktemp("demo-tickets"), ticket_lm_dir, [SAMPLE_TICKETS, SHIPPING_TICKETS])


@pytest.mark.parametrize("question", QUESTIONS)
def test_a_delivery_address_change_finds_the_shipping_address_answers(demo_index, question):
    hits = demo_index.search(question, k=5)

    assert [h.exchange.intent for h in hits[:3]] == ["change_shipping_address"] * 3
    assert "e-mail" not in hits[0].exchange.reply


def test_without_the_shipping_tickets_the_nearest_answer_was_the_e_mail_one(tmp_path, ticket_lm_dir):
    # What the demo retrieved before: its tickets changed only an account's postal or e-mail address.
    index = _index(tmp_path, ticket_lm_dir, [SAMPLE_TICKETS])

    assert "e-mail address" in index.search(QUESTIONS[1], k=1)[0].exchange.reply


def test_the_shipping_tickets_are_the_generators_english_and_french_and_leave_the_others_alone():
    spec = importlib.util.spec_from_file_location("make_sample_tickets", ROOT / "scripts" / "make_sample_tickets.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    rows = [json.loads(line) for line in SHIPPING_TICKETS.read_text(encoding="utf-8").splitlines()]
    sample = [json.loads(line) for line in SAMPLE_TICKETS.read_text(encoding="utf-8").splitlines()]

    assert rows == generator.make_shipping_tickets(24, 3)  # the shipped file is the script's output
    assert sample == generator.make_tickets(330, 3)  # and the 330 tickets did not change with it
    assert {r["language"] for r in rows} == {"en", "fr"}
    assert {r["intent"] for r in rows} == {"change_shipping_address"}
    assert not {t["external_id"] for t in sample} & {r["external_id"] for r in rows}  # one import source
