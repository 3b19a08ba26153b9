"""Fixtures for fine-tuning tests: tiny local base models, ticket files, small datasets, a worker.

The tiny models are built once per session with ``finetune.ml.tiny.build_tiny_causal_lm``
(no download); one gets a chat template so the chat-template rendering path is
tested too. Plain helpers and data the tests share are in ``tests/finetune/fixtures.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, celery_worker_command, child_process_env, stop_process
from tests.finetune.fixtures import EXCHANGES, SAMPLE_TICKETS, conversation, write_dataset

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
    from finetune.ml.tiny import build_tiny_causal_lm

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


@pytest.fixture
def quality_gate_advisory(settings):
    """The reply-quality gate is shown but does not block: for tests of other gates and of the
    promotion flow, whose tiny models cannot beat retrieval (tests/finetune/services/test_quality_gate.py
    tests that gate itself). Workers started by ``training_worker`` inherit it."""
    settings.SUPPORTBOT_GATES_ADVISORY = [*settings.SUPPORTBOT_GATES_ADVISORY, "reply_quality"]
    return settings


@pytest.fixture
def model_gates_advisory(settings):
    """The gates that need a model's replies (reply quality, bias probe) are shown but do not block:
    for tests of promotion and rollback on version rows without a trained model behind them."""
    settings.SUPPORTBOT_GATES_ADVISORY = ["reply_quality", "bias_probe"]
    return settings


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with a tokenizer trained on the exchanges above (built once per session)."""
    from finetune.ml.tiny import build_tiny_causal_lm

    corpus = [f"Customer: {q}\nAgent: {a}" for q, a in EXCHANGES] * 4
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-gpt2"), corpus=corpus, vocab_size=384)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base):
    from finetune.ml.training import load_tokenizer

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
            "SUPPORTBOT_GATES_ADVISORY": ",".join(settings.SUPPORTBOT_GATES_ADVISORY),
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
        deadline = time.monotonic() + 180  # a loaded machine starts a worker slowly
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"Celery worker exited with {process.returncode}:\n{worker.text()[-3000:]}")
            if "ready." in worker.text():
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"Celery worker not ready after 180 s:\n{worker.text()[-3000:]}")
        settings.SUPPORTBOT_TRAINING_QUEUE = queue
        return worker

    try:
        yield start
    finally:
        for worker in started:
            stop_process(worker.process)
