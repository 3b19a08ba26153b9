"""The vLLM server plugin that gives it ``no_repeat_ngram_size`` (a logits processor).

vLLM has no n-gram ban of its own; the in-process engines ban every 6-token run a reply
already holds (``finetune.ml.decoding``). A vLLM server started with

    PYTHONPATH=<this checkout> python -m vllm.entrypoints.openai.api_server ... \\
        --logits-processors finetune.serving.vllm_logits:NoRepeatNGramLogitsProcessor

(scripts/vllm-serve.sh does) applies the same ban, ``finetune.ml.decoding.NoRepeatNGram``,
to each request whose ``vllm_xargs`` carry ``no_repeat_ngram_size``, over its generated
tokens only (the prompt, with the answers grounding put there, may be copied). Requests
without it cost nothing. ``VLLMEngine`` sends the version's setting with every request; a
server without the plugin ignores it (the reply pipeline's repetition cut still applies).

This module runs inside the vLLM server's own venv, which has torch and vllm but not
this project's dependencies: it imports nothing of the project but ``finetune.ml.decoding``
(plain Python), and the project's venv never imports it.
"""

from __future__ import annotations

from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from finetune.ml.decoding import NoRepeatNGram

XARG = "no_repeat_ngram_size"


def _size(params: SamplingParams) -> int:
    value = (params.extra_args or {}).get(XARG, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"vllm_xargs.{XARG} must be a whole number of tokens, 0 or more, not {value!r}.")
    return value


class NoRepeatNGramLogitsProcessor(AdapterLogitsProcessor):
    """Per request: ``NoRepeatNGram(vllm_xargs.no_repeat_ngram_size)`` over its generated tokens."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        _size(sampling_params)  # a bad value is an HTTP 400 before the request runs

    def is_argmax_invariant(self) -> bool:
        return False  # it bans tokens, greedy ones included

    def new_req_logits_processor(self, params: SamplingParams):
        size = _size(params)
        return NoRepeatNGram(size) if size else None
