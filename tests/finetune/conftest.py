"""Fixtures for fine-tuning tests: tiny local base models, ticket files, small datasets, a worker.

The tiny models are built once per session with ``finetune.tiny.build_tiny_causal_lm``
(no download); one gets a chat template so the chat-template rendering path is
tested too. Training tests write their datasets here, in the format of
docs/dataset-format.md, so they do not depend on the dataset builder.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from finetune.models import DatasetVersion
from tests.conftest import ROOT, celery_worker_command, child_process_env, stop_process

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

    from finetune.prompting import render_example, tokenize_example

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


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with a tokenizer trained on the exchanges above (built once per session)."""
    from finetune.tiny import build_tiny_causal_lm

    corpus = [f"Customer: {q}\nAgent: {a}" for q, a in EXCHANGES] * 4
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-gpt2"), corpus=corpus, vocab_size=384)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base):
    from finetune.training import load_tokenizer

    return load_tokenizer(str(tiny_base))


@pytest.fixture
def dataset_dir(tmp_path, tiny_tokenizer) -> Path:
    """8 training and 4 validation conversations in the contract format."""
    conversations = [conversation(q, a) for q, a in EXCHANGES]
    return write_dataset(tmp_path / "dataset", conversations[:8], conversations[8:], tiny_tokenizer)


@pytest.fixture
def model_store(settings, tmp_path, tiny_base) -> Path:
    """Point the model store and the base model at temporary, local ones."""
    store = tmp_path / "models"
    store.mkdir()
    settings.SUPPORTBOT_MODEL_STORE = store
    settings.SUPPORTBOT_BASE_MODEL = str(tiny_base)
    return store


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


@dataclass
class Worker:
    queue: str
    process: subprocess.Popen
    log: Path

    def kill(self) -> None:
        """SIGKILL: no shutdown, no ack, as when the machine runs out of memory."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def training_worker(transactional_db, tmp_path, settings) -> Iterator:
    """Start real Celery workers (solo pool) on the test database; returns a starter.

    ``start(**env)`` starts one on a queue of its own (or ``queue=``) and sends the
    service's retrain tasks there. Unlike ``celery_worker_process`` it hands back the
    process, so a test can kill it.
    """
    started: list[Worker] = []

    def start(queue: str | None = None, **env: str) -> Worker:
        queue = queue or f"test-{uuid.uuid4().hex[:8]}"
        log = tmp_path / f"worker-{len(started)}.log"
        defaults = {
            "SUPPORTBOT_MODEL_STORE": str(settings.SUPPORTBOT_MODEL_STORE),
            "SUPPORTBOT_BASE_MODEL": str(settings.SUPPORTBOT_BASE_MODEL),
            "SUPPORTBOT_TRAINING_HEARTBEAT_INTERVAL": "0.5",
            "SUPPORTBOT_TRAINING_STALE_AFTER": "2",
            "SUPPORTBOT_CELERY_QUEUE": queue,
            "HF_HUB_OFFLINE": "1",
        }
        process = subprocess.Popen(
            celery_worker_command(queue, f"{queue}-{len(started)}@%h"),
            cwd=ROOT,
            env=child_process_env(**{**defaults, **env}),
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        worker = Worker(queue=queue, process=process, log=log)
        started.append(worker)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"Celery worker exited with {process.returncode}:\n{worker.text()[-3000:]}")
            if "ready." in worker.text():
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"Celery worker not ready after 60 s:\n{worker.text()[-3000:]}")
        settings.SUPPORTBOT_TRAINING_QUEUE = queue
        return worker

    try:
        yield start
    finally:
        for worker in started:
            stop_process(worker.process)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"Timed out after {timeout:.0f} s waiting for {message}")
