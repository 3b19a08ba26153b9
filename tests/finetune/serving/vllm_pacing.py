"""A vLLM logits-processor plugin for the tests: it paces the test server's decoding.

The tests' tiny Llama generates ~450 tokens/s on vLLM CPU, so a whole 380-token reply
takes under a second, less than a closed stream or a killed server can reliably take to
land on a loaded two-core machine: a test that cancels or kills "mid-reply" then raced
the reply's end, and sometimes lost. This plugin sleeps ``SUPPORTBOT_TEST_VLLM_STEP_MS``
(default 10) milliseconds at every decoding step, so the test server writes ~100
tokens/s, the pace of a real small model on a CPU core: the reply lasts seconds and a
cancel or a kill lands inside it. The server stays the real vLLM; nothing else changes.

Loaded by tests/finetune/serving/test_vllm.py's server only:
``--logits-processors tests.finetune.serving.vllm_pacing:PacedDecoding`` (with
``PYTHONPATH`` at the checkout). It runs in the vLLM venv: it imports only vLLM.
"""

from __future__ import annotations

import os
import time

from vllm.v1.sample.logits_processor import LogitsProcessor


class PacedDecoding(LogitsProcessor):
    """Sleeps a fixed time at each sampling step, for every request; changes no logit."""

    def __init__(self, vllm_config, device, is_pin_memory):
        self.step_s = float(os.environ.get("SUPPORTBOT_TEST_VLLM_STEP_MS", "10")) / 1000

    def is_argmax_invariant(self) -> bool:
        return False  # vLLM applies these at every step, greedy ones included (the others only when sampling)

    def update_state(self, batch_update) -> None:
        pass

    def apply(self, logits):
        time.sleep(self.step_s)
        return logits
