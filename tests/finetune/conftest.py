"""Fixtures for the ticket import and dataset tests: a tiny local base model and ticket files.

The tiny models are built once per session with ``finetune.tiny.build_tiny_causal_lm``
(no download); one gets a chat template so the chat-template rendering path is
tested too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT

SAMPLE_TICKETS = ROOT / "finetune" / "fixtures" / "sample_tickets.jsonl"

# A ChatML template like SmolLM2's, small enough to read.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    """Text the tiny tokenizer learns from: the sample tickets, so it splits them into real tokens."""
    texts = []
    with SAMPLE_TICKETS.open(encoding="utf-8") as handle:
        for line in handle:
            texts.extend(m["body"] for m in json.loads(line)["messages"])
    return texts


@pytest.fixture(scope="session")
def ticket_lm_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 and its tokenizer (plain ``Customer:/Agent:`` template, EOS)."""
    from finetune.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"), corpus=_corpus(), vocab_size=512)


@pytest.fixture(scope="session")
def ticket_chat_lm_dir(tmp_path_factory, ticket_lm_dir) -> Path:
    """The same tiny model with a ChatML chat template and <|im_start|>/<|im_end|> tokens."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-chat-lm")
    tokenizer = AutoTokenizer.from_pretrained(ticket_lm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out)
    for item in ticket_lm_dir.iterdir():
        if item.name in {"config.json", "model.safetensors", "generation_config.json"}:
            (out / item.name).write_bytes(item.read_bytes())
    return out


@pytest.fixture(scope="session")
def ticket_tokenizer(ticket_lm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ticket_lm_dir)


@pytest.fixture(scope="session")
def ticket_chat_tokenizer(ticket_chat_lm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ticket_chat_lm_dir)


@pytest.fixture
def sample_tickets() -> Path:
    return SAMPLE_TICKETS


@pytest.fixture
def dataset_settings(settings, tmp_path, ticket_lm_dir):
    """Datasets go to a temporary folder, built with the tiny model's tokenizer."""
    settings.SUPPORTBOT_DATASET_DIR = tmp_path / "datasets"
    settings.SUPPORTBOT_MODEL_STORE = tmp_path / "models"
    settings.SUPPORTBOT_BASE_MODEL = str(ticket_lm_dir)
    return settings
