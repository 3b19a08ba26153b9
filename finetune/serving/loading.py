"""Load a model for serving: a merged model directory, or an adapter merged on load, optionally int8.

- ``load_for_inference``: the model and tokenizer ready to generate (``LoadedModel``).
- ``quantize_int8``: int8 dynamic quantisation of the linear layers on CPU, after
  ``conv1d_to_linear`` has turned GPT-2's ``Conv1D`` layers into ``nn.Linear``.
- ``context_window``: how many tokens prompt and reply may take together.
- What a version carries besides its weights (``finetune.ml.knowledge.load_knowledge``):
  the decoding controls, grounding and reply-policy settings of its ``train_config.json``
  (defaults when absent) and its ``retrieval/`` index (None when absent: a version trained
  before grounding is served ungrounded, as before).

Plain Python: no Django.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.ml.decoding import DecodingConfig
from finetune.ml.grounding import GroundingConfig
from finetune.ml.reply_policy import ReplyPolicyConfig

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model and tokenizer ready to generate, with the label replies are attributed to.

    ``decoding`` applies in both engines (and in the evaluation, from the same file);
    ``index`` (None for a version without one) grounds every reply (``finetune.serving.grounded``).
    """

    model: object
    tokenizer: object
    label: str
    device: str = "cpu"
    int8: bool = False
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    reply_policy: ReplyPolicyConfig = field(default_factory=ReplyPolicyConfig)
    index: Any = None  # finetune.ml.retrieval.RetrievalIndex; None: replies are not grounded


def load_for_inference(path: str, *, label: str, device: str | None = None, int8: bool = False) -> LoadedModel:
    """Load a model directory (or a LoRA adapter directory, merged here) for serving.

    ``int8`` quantises the linear layers (CPU only).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.ml.knowledge import load_knowledge

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if (Path(path) / "adapter_config.json").exists():
        # An adapter without a merged copy: load its base, apply it and merge once here,
        # as an unmerged adapter costs ~7% per token (NOTES-performance.md).
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    if int8 and device == "cpu":
        quantize_int8(model)
    elif int8:
        log.warning("SUPPORTBOT_INT8 applies to CPU inference only; serving %s unquantised on %s", label, device)
        int8 = False
    model.to(device)
    knowledge = load_knowledge(path)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        label=label,
        device=device,
        int8=int8,
        decoding=knowledge.decoding_or_default,
        grounding=knowledge.grounding_or_default,
        reply_policy=knowledge.policy_or_default,
        index=knowledge.index,
    )


def conv1d_to_linear(model) -> int:
    """Replace transformers' ``Conv1D`` (GPT-2) by equivalent ``nn.Linear`` layers; returns how many.

    ``Conv1D`` computes ``x @ W + b`` with ``W`` stored as (in, out); ``nn.Linear``
    stores (out, in), so the weight is transposed. The outputs are the same, and
    PyTorch's dynamic quantisation, which only knows ``nn.Linear``, can then reach them.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                linear = nn.Linear(n_in, n_out, bias=child.bias is not None)
                linear.weight = nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=False)
                if child.bias is not None:
                    linear.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
                setattr(module, name, linear)
                replaced += 1
    return replaced


def quantize_int8(model):
    """int8 dynamic quantisation of every linear layer, in place (CPU decoding reads 4x fewer bytes).

    GPT-2's ``Conv1D`` layers are turned into ``nn.Linear`` first; without that only
    ``lm_head`` would be quantised (NOTES-performance.md).
    """
    import torch
    from torch import nn

    conv1d_to_linear(model)
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not a dependency;
        # quantize_dynamic still works in torch 2.13, the version pinned here.
        warnings.simplefilter("ignore")
        # Per-channel weight scales: on SmolLM2 they keep reply perplexity closer to fp32 than
        # one scale per tensor (docs/benchmarks.md), at the same speed.
        torch.ao.quantization.quantize_dynamic(
            model, {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, inplace=True
        )
    return model


def context_window(loaded: LoadedModel) -> int:
    config = loaded.model.config
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024))
