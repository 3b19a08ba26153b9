"""Fixtures of the serving tests: a loaded tiny GPT-2 and a batched engine on it."""

from __future__ import annotations

import pytest

from finetune.serving.batched import BatchedEngine
from tests.finetune.serving.engine_models import load, tiny_gpt2_dir


@pytest.fixture(scope="module")
def gpt2():
    return load(tiny_gpt2_dir(), label="v1")


@pytest.fixture
def engine(gpt2):
    eng = BatchedEngine(gpt2, max_batch_size=8)
    yield eng
    eng.close(timeout=10)
