"""Helpers and data shared by the fine-tuning tests (the fixtures themselves are in conftest.py).

Plain functions and constants: support exchanges, datasets written in the format of
docs/dataset-format.md (so training tests do not depend on the dataset builder),
rows with files on disk, a broken CSV export, fast training settings, and a wait on
a condition.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from finetune.ml.importers import MAX_BODY_CHARS
from finetune.models import DatasetVersion
from finetune.services.model_versions import MODEL_EVENTS_GROUP
from tests.conftest import ROOT

SAMPLE_TICKETS = ROOT / "finetune" / "fixtures" / "sample_tickets.jsonl"
SHIPPING_TICKETS = ROOT / "finetune" / "fixtures" / "sample_tickets_shipping.jsonl"  # the demo imports both

# Short, varied support exchanges: enough for a tokenizer and for overfitting tests.
EXCHANGES = [
    ("Where is my order?", "Your order has shipped and arrives in two days."),
    ("How do I reset my password?", "Use the Forgot password link on the login page."),
    ("I want a refund.", "I am sorry to hear that. Refunds take five business days."),
    ("Can I talk to a human?", "Of course, an agent will join this chat shortly."),
    ("My card was charged twice.", "I have refunded the duplicate charge; it shows in three days."),
    ("How can I change my address?", "Open Settings, then Addresses, and edit the delivery address."),
    ("Do you ship to Canada?", "Yes, we ship to Canada; delivery takes about a week."),
    ("The app crashes when I log in.", "Please update the app; version 2.3 fixes the login crash."),
    ("Cancel my subscription please.", "Your subscription is cancelled and will not renew."),
    ("What are your opening hours?", "Our support team answers from 8 am to 8 pm, Monday to Saturday."),
    ("I never got the confirmation email.", "I have sent it again; please check your spam folder too."),
    ("Can I pay with PayPal?", "Yes, PayPal is accepted at checkout."),
]


def conversation(question: str, reply: str) -> list[dict[str, str]]:
    return [{"role": "customer", "content": question}, {"role": "agent", "content": reply}]


def write_dataset(
    path: Path,
    train: Sequence[list[dict]],
    validation: Sequence[list[dict]],
    tokenizer=None,
    max_length: int = 128,
) -> Path:
    """Save a DatasetDict with every column of the contract (docs/dataset-format.md)."""
    from datasets import Dataset, DatasetDict

    from finetune.ml.prompting import render_example, tokenize_example

    def rows(conversations, split):
        columns = {k: [] for k in ("messages", "prompt", "completion", "input_ids", "attention_mask", "labels")}
        for key in ("intent", "category", "tags", "segment", "origin"):
            columns[key] = []
        for i, messages in enumerate(conversations):
            columns["messages"].append(messages)
            if tokenizer is not None:
                rendered = render_example(messages, tokenizer)
                tokens = tokenize_example(rendered, tokenizer, max_length=max_length)
                columns["prompt"].append(rendered.prompt)
                columns["completion"].append(rendered.completion)
                for key in ("input_ids", "attention_mask", "labels"):
                    columns[key].append(tokens[key])
            else:
                columns["prompt"].append("")
                columns["completion"].append("")
                for key in ("input_ids", "attention_mask", "labels"):
                    columns[key].append([])
            columns["intent"].append("")
            columns["category"].append("")
            columns["tags"].append(["B"])
            columns["segment"].append("")
            columns["origin"].append(f"ticket:test:{split}-{i}")
        return Dataset.from_dict(columns)

    train_split = rows(train, "train")
    # An empty split takes the train split's schema (columns of empty lists have no type).
    validation_split = rows(validation, "validation") if validation else train_split.select([])
    DatasetDict({"train": train_split, "validation": validation_split}).save_to_disk(str(path))
    return path


def dataset_version_create(path: Path, name: str | None = None) -> DatasetVersion:
    """A DatasetVersion row for ``path``, as build_dataset would write (the files are not read)."""
    return DatasetVersion.objects.create(
        name=name or f"test-{uuid.uuid4().hex[:6]}",
        path=str(path),
        content_hash=hashlib.sha256(str(path).encode()).hexdigest(),
    )


def version_with_files(tmp_path: Path, **kwargs):
    """A ModelVersion row whose adapter and merged directories exist (empty)."""
    from tests.factories import ModelVersionFactory

    version = ModelVersionFactory(**kwargs)
    for attr in ("adapter_path", "merged_path"):
        path = tmp_path / f"v{version.number}" / attr
        path.mkdir(parents=True)
        setattr(version, attr, str(path))
    version.save()
    return version


# Fast settings for runs through the services: a few seconds on two cores.
FAST = {
    "epochs": 3,
    "learning_rate": 1e-2,
    "max_length": 64,
    "batch_size": 4,
    "grad_accum_steps": 1,
    "eval_generate_samples": 2,
    "eval_max_new_tokens": 8,
}


CSV_MAP = {
    "external_id": "id",
    "customer_message": "question",
    "agent_reply": "answer",
    "intent": "topic",
    "tags": "register",
    "customer_email": "email",
    "created_at": "opened",
}


def write_broken_csv(path: Path) -> Path:
    """Good rows around one broken row of each kind; a multi-line field shifts the line numbers."""
    lines = [
        b"id,question,answer,topic,register,email,opened\n",
        b"A1,Where is my order?,It ships today.,track_order,B,a@example.com,2024-05-01T09:30:00Z\n",  # line 2
        b'A2,"My parcel\nnever came, twice",We will resend it.,delivery_problem,"B,Q",,2024-05-02\n',  # lines 3-4
        b"A3,Can I get a refund?,,get_refund,B,,\n",  # line 5: missing reply
        b"A4,Caf\xe9 order?,Yes.,track_order,B,,\n",  # line 6: Latin-1, not UTF-8
        b"A5,Hello," + b"x" * (MAX_BODY_CHARS + 1) + b",complaint,B,,\n",  # line 7: over-long reply
        b"A6,Only three,columns\n",  # line 8: wrong column count
        b"A7,When?,Tomorrow.,track_order,B,,not-a-date\n",  # line 9: bad date
        b"A8,Thanks for the help!,You're welcome.,complaint,P,,\n",  # line 10
    ]
    path.write_bytes(b"".join(lines))
    return path


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"Timed out after {timeout:.0f} s waiting for {message}")


class ModelEvents:
    """A channel in the ``models`` group, as a chat server has."""

    def __init__(self):
        from asgiref.sync import async_to_sync
        from channels.layers import get_channel_layer

        self.layer = get_channel_layer()
        self.channel = async_to_sync(self.layer.new_channel)()
        async_to_sync(self.layer.group_add)(MODEL_EVENTS_GROUP, self.channel)

    def receive(self) -> dict:
        import asyncio

        from asgiref.sync import async_to_sync

        async def get():
            return await asyncio.wait_for(self.layer.receive(self.channel), timeout=5)

        return async_to_sync(get)()

    def close(self):
        from asgiref.sync import async_to_sync

        async_to_sync(self.layer.group_discard)(MODEL_EVENTS_GROUP, self.channel)
