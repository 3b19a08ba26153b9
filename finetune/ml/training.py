"""LoRA fine-tuning of a causal LM on a support dataset. Plain Python: no Django, no database.

Reads the ``messages`` column of the ``train`` and ``validation`` splits of a dataset
saved in the format of ``docs/dataset-format.md``, re-renders every conversation with
the base model's tokenizer (``finetune.ml.prompting``), and trains a peft LoRA adapter
with the loss on the agent's reply only. Batches are padded dynamically and grouped
by length, so almost every token computed is a real one. Before and after training
it evaluates on the validation split (loss, perplexity, ROUGE-L of generated replies
beside a TF-IDF retrieval baseline), then writes::

    OUTPUT_DIR/train_config.json  written first, so a run's directory exists while it trains
    OUTPUT_DIR/adapter/   adapter_model.safetensors, adapter_config.json, tokenizer, metrics.json
    OUTPUT_DIR/merged/    the base with the adapter merged in (merge_and_unload), tokenizer,
                          metrics.json: loads with AutoModelForCausalLM.from_pretrained
    OUTPUT_DIR/metrics.json

A failed or cancelled run removes OUTPUT_DIR.

Run it from a shell (the Django service ``training_run_execute`` calls ``train_lora``)::

    python -m finetune.ml.training var/datasets/ds-1 /tmp/run --base /tmp/tiny-gpt2 --epochs 1

Why one module of ~900 lines: it is one run, read top to bottom in its sections
(config, data, model, the run); the data preparation, the loop and the evaluation
calls change together whenever a setting is added. Its plain-Python neighbours
(``evaluation``, ``prompting``) hold what other modules also use.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .evaluation import evaluate_loss, reply_token_loss_sum
from .knowledge import RETRIEVAL_DIR, config_to_json, copy_knowledge, load_knowledge
from .prompting import (
    IGNORE_INDEX,
    ROLE_AGENT,
    ROLE_SYSTEM,
    normalise_messages,
    render_example,
    tokenize_example,
)
from .quality import QualityEvaluation, cached_rows, settings_key

log = logging.getLogger(__name__)

# LoRA targets by architecture. GPT-2 keeps its projections in transformers' Conv1D,
# whose weight is stored transposed, hence fan_in_fan_out.
GPT2_TARGETS = ("c_attn", "c_proj")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_STYLE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2", "granite"}
_FAN_IN_FAN_OUT = {"gpt2"}


class DatasetError(ValueError):
    """The dataset cannot be trained on; the message says what is wrong and what to do."""


class TrainingCancelled(RuntimeError):
    """``should_stop`` asked the run to stop; nothing was saved."""


@dataclass
class TrainConfig:
    """Everything a run needs besides its data. Each default carries its reason."""

    base_model: str = "gpt2"  # a local directory or Hub id, resolved by finetune.ml.base_model
    base_model_name: str = ""  # what to record (the resolved name); defaults to base_model
    lora_r: int = 16  # enough for a 576-768-wide model to learn a support register; 8 underfits the placeholders
    lora_alpha: int = 32  # alpha = 2r: the usual LoRA scale, so changing r does not change the step size
    lora_dropout: float = 0.05  # light regularisation: ticket datasets are small and repetitive
    target_modules: tuple[str, ...] | None = None  # None: by architecture (GPT2_TARGETS, LLAMA_TARGETS)
    # LoRA on the top N layers only; None: every layer. Backward then stops at the lowest adapted
    # layer, so a step costs ~(1 + 2N/L) forwards instead of 3 (docs/quality-research.md).
    lora_layers: int | None = None
    learning_rate: float = 2e-4  # LoRA's usual 1e-4..3e-4 (full fine-tuning would need ~5e-5)
    epochs: float = 2.0  # support replies are formulaic: 1-3 epochs learn them, more memorises the tickets
    batch_size: int = 8  # sequences per micro-batch: fits 2 cores and a few GB at max_length 256
    grad_accum_steps: int = 2  # effective batch 16 without the memory of 16 sequences
    max_length: int = 256  # tokens per example; Bitext exchanges are ~60-250 tokens, the reply is always kept
    max_examples: int | None = None  # cap on training examples (a seeded sample); None: all of them
    warmup_ratio: float = 0.05  # a few warm-up steps keep Adam's first updates from overshooting
    weight_decay: float = 0.0  # decay would only pull LoRA's B back towards zero
    max_grad_norm: float = 1.0  # clip the rare spike from a long, odd ticket
    seed: int = 0  # same data, config and seed: same adapter (on CPU)
    mixed_precision: str = "auto"  # auto: bf16 autocast on CUDA with bf16 and on CPUs with AMX; "bf16" or "no"
    num_threads: int | None = None  # CPU threads; None: every core the process may use
    max_eval_examples: int = 256  # validation examples for the loss: a stable mean in bounded time
    eval_generate_samples: int = 16  # generated replies scored with ROUGE-L (generation is the slow part)
    eval_max_new_tokens: int = 160  # as serving (GenerationParams.max_new_tokens): replies are scored whole
    eval_before: bool = True  # also evaluate the base model, to show what fine-tuning changed
    merge: bool = True  # write the merged model for fast inference (an unmerged adapter costs ~7%/token)
    # Recompute activations in backward: SmolLM2 at batch 4 x ~190 tokens peaks at 2.2 GB with it,
    # 3.8 GB without, for ~26% more CPU time. Off for LoRA on a few top layers (lora_layers), whose
    # lower layers keep no activations anyway (docs/quality-research.md, training throughput).
    gradient_checkpointing: bool = True
    log_every_steps: int | None = None  # None: about 200 loss points per run, whatever its length
    # Grounding (issue 10): when the dataset has a retrieval index, every example's prompt holds the
    # nearest other exchanges (grounded_data.grounded_examples). 0 trains and serves ungrounded.
    grounding_neighbours: int = 2
    # Tokens per grounded example: the conversation, up to grounding_neighbours answers of 200 tokens
    # and the reply; the prompt itself stays within prompt_budget (as in serving).
    grounded_max_length: int = 1024
    prompt_budget: int = 768  # grounded prompt tokens in training, evaluation and serving
    prime_reply: bool = True  # the reply starts with the closest answer's first sentence (research E4)
    reply_policy: str = "consensus"  # finetune.ml.reply_policy mode: consensus, fallback or model

    LIMITS = {
        "lora_r": (1, 512),
        "lora_alpha": (1, 4096),
        "lora_dropout": (0.0, 0.9),
        "learning_rate": (1e-7, 1e-1),
        "epochs": (0.01, 100.0),
        "batch_size": (1, 512),
        "grad_accum_steps": (1, 1024),
        "max_length": (16, 32768),
        "max_examples": (1, 10_000_000),
        "warmup_ratio": (0.0, 0.5),
        "weight_decay": (0.0, 1.0),
        "max_grad_norm": (0.0, 1000.0),
        "max_eval_examples": (0, 1_000_000),
        "eval_generate_samples": (0, 10_000),
        "eval_max_new_tokens": (1, 4096),
        "num_threads": (1, 1024),
        "lora_layers": (1, 1024),
        "grounding_neighbours": (0, 8),
        "grounded_max_length": (64, 32768),
        "prompt_budget": (32, 32768),
    }

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any], **fixed: Any) -> TrainConfig:
        """A config from user-supplied values, type-checked and range-checked (ValueError says which)."""
        unknown = sorted(set(overrides) - cls.field_names())
        if unknown:
            raise ValueError(f"Unknown training settings: {', '.join(unknown)}.")
        config = cls(**fixed)
        types = {f.name: f.type for f in fields(cls)}
        for name, value in overrides.items():
            kind = types[name]
            if value is None or value == "":
                if "None" not in kind:
                    raise ValueError(f"Training setting {name} needs a value.")
                setattr(config, name, None)
                continue
            try:
                if "bool" in kind:
                    if not isinstance(value, bool):
                        raise TypeError
                elif kind.startswith("int"):
                    if isinstance(value, bool) or float(value) != int(float(value)):
                        raise TypeError
                    value = int(float(value))
                elif kind.startswith("float"):
                    value = float(value)
                elif "tuple" in kind:
                    value = tuple(str(v) for v in value)
                else:
                    value = str(value)
            except (TypeError, ValueError):
                raise ValueError(f"Training setting {name}={value!r} has the wrong type ({kind}).") from None
            setattr(config, name, value)
        config.validate()
        return config

    def validate(self) -> None:
        problems = []
        for name, (low, high) in self.LIMITS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not (low <= value <= high):
                problems.append(f"{name}={value} is outside {low}..{high}")
        if self.mixed_precision not in {"auto", "bf16", "no"}:
            problems.append(f"mixed_precision={self.mixed_precision!r} must be auto, bf16 or no")
        if self.reply_policy not in {"consensus", "fallback", "model"}:
            problems.append(f"reply_policy={self.reply_policy!r} must be consensus, fallback or model")
        if problems:
            raise ValueError("Invalid training settings: " + "; ".join(problems) + ".")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules) if self.target_modules else None
        return data

    def grounding_config(self):
        """The GroundingConfig this run trains with and its version serves with."""
        from .grounding import GroundingConfig

        return GroundingConfig(
            neighbours=self.grounding_neighbours, max_prompt_tokens=self.prompt_budget, prime=self.prime_reply
        )

    def policy_config(self):
        from .reply_policy import ReplyPolicyConfig

        return ReplyPolicyConfig(mode=self.reply_policy)


@dataclass(frozen=True)
class ProgressEvent:
    """What ``on_progress`` receives: at every optimizer step, and at each phase change."""

    phase: str  # loading, evaluating_before, training, evaluating_after, evaluating_active, saving, done
    progress: float  # 0..1 over the whole run, evaluation and saving included
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None  # mean reply-token loss since the last loss point; None between points
    learning_rate: float | None = None
    message: str = ""  # a log line for people, when there is something to say
    # Evaluation progress: replies generated so far out of ``total`` in this phase, and what is
    # being evaluated: f"{activity}: {done}/{total} replies" reads "Evaluating the base model: 12/32
    # replies". 0/0 and "" outside evaluation.
    done: int = 0
    total: int = 0
    activity: str = ""


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    merged_dir: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)


# --- data -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt: str  # rendered prompt, for generation
    question: str  # the customer's side of the conversation, for the retrieval baseline
    reference: str  # the agent's reply, for ROUGE-L and the retrieval baseline


def load_conversations(dataset_path: str | Path) -> tuple[list[list[dict]], list[list[dict]]]:
    """The ``messages`` of the train and validation splits of a saved DatasetDict."""
    path = Path(dataset_path)
    hint = "Rebuild it with `python manage.py build_dataset` or choose another dataset version."
    if not path.is_dir():
        raise DatasetError(f"The dataset directory {path} does not exist. {hint}")
    import pyarrow as pa
    from datasets import Dataset

    try:
        listing = path / "dataset_dict.json"
        if not listing.exists():
            raise DatasetError(
                f"{path} is not a saved DatasetDict (no dataset_dict.json); the trainer needs train and "
                f"validation splits. {hint}"
            )
        names = json.loads(listing.read_text(encoding="utf-8")).get("splits", [])
        if "train" not in names:
            raise DatasetError(f"{path} has no 'train' split (splits: {', '.join(names) or 'none'}). {hint}")
        splits: dict[str, list] = {}
        for name in ("train", "validation"):
            split_dir = path / name
            if name not in names:
                splits[name] = []
                continue
            # datasets cannot load a split saved with no rows (no data files); it is simply empty.
            state = json.loads((split_dir / "state.json").read_text(encoding="utf-8"))
            if not state.get("_data_files"):
                splits[name] = []
                continue
            split = Dataset.load_from_disk(str(split_dir))
            if "messages" not in split.column_names:
                raise DatasetError(
                    f"The {name} split of {path} has no 'messages' column "
                    f"(columns: {', '.join(split.column_names)}). {hint}"
                )
            splits[name] = list(split["messages"])
    except DatasetError:
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError, pa.ArrowException) as exc:
        raise DatasetError(f"The dataset at {path} cannot be read ({type(exc).__name__}: {exc}). {hint}") from exc
    if not splits["train"]:
        raise DatasetError(f"The train split of {path} is empty: nothing to learn from. {hint}")
    return splits["train"], splits["validation"]


# The demo's quick adapter (scripts/demo.d/20-finetune.sh passes the same as options; bench_quality.py
# --train-quick trains it): LoRA on the top 8 of SmolLM2's 30 layers (backward stops there, no
# activations kept below), no gradient checkpointing (nothing below to recompute), no dropout,
# a high learning rate for few steps, one epoch over 40 grounded examples: what fits ~3 minutes
# of two loaded cores (docs/quality-research.md: recipe, E3-E5).
QUICK_RECIPE: dict[str, Any] = {
    "lora_layers": 8,
    "lora_dropout": 0.0,
    "learning_rate": 1e-3,
    "batch_size": 4,
    "grad_accum_steps": 1,
    "epochs": 1.0,
    "max_examples": 40,
    "gradient_checkpointing": False,
}


def _question_text(turns: Sequence[Mapping[str, str]]) -> str:
    return "\n".join(t["content"] for t in turns if t["role"] != ROLE_SYSTEM)


def prepare_examples(
    conversations: Sequence[Any],
    tokenizer,
    *,
    max_length: int,
    limit: int | None = None,
    seed: int = 0,
    index=None,
    grounding=None,
    exclude_self: bool = False,
) -> tuple[list[Example], Counter]:
    """Render and tokenize conversations; malformed ones are skipped and counted by reason.

    With ``index`` (a ``RetrievalIndex``) every prompt is grounded on the nearest exchanges
    (``grounding``: a ``GroundingConfig``), built by ``grounding.ground`` as in serving;
    ``exclude_self`` (the training split, whose rows are in the index) never shows an
    example its own exchange.
    """
    if index is not None:
        return _prepare_grounded(
            conversations,
            tokenizer,
            max_length=max_length,
            limit=limit,
            seed=seed,
            index=index,
            grounding=grounding,
            exclude_self=exclude_self,
        )
    indices = list(range(len(conversations)))
    if limit is not None and limit < len(indices):
        indices = sorted(random.Random(seed).sample(indices, limit))  # noqa: S311 - reproducible sampling, not security
    examples: list[Example] = []
    dropped: Counter = Counter()
    for i in indices:
        raw = conversations[i]
        try:
            if not isinstance(raw, list) or not all(isinstance(m, Mapping) for m in raw):
                raise ValueError("messages is not a list of {role, content} objects")
            turns = normalise_messages(raw)
            rendered = render_example(turns, tokenizer)
            tokens = tokenize_example(rendered, tokenizer, max_length=max_length)
        except (ValueError, KeyError, TypeError) as exc:
            dropped[str(exc).split(";")[0][:120]] += 1
            continue
        if not any(label != IGNORE_INDEX for label in tokens["labels"][1:]):
            dropped["no reply token left after truncation"] += 1
            continue
        examples.append(
            Example(
                input_ids=tokens["input_ids"],
                labels=tokens["labels"],
                prompt=rendered.prompt,
                question=_question_text(turns[:-1]),
                reference=turns[-1]["content"] if turns[-1]["role"] == ROLE_AGENT else "",
            )
        )
    return examples, dropped


def _prepare_grounded(
    conversations, tokenizer, *, max_length, limit, seed, index, grounding, exclude_self
) -> tuple[list[Example], Counter]:
    from .grounded_data import grounded_examples, own_positions

    usable = [c for c in conversations if isinstance(c, list) and c and all(isinstance(m, Mapping) for m in c)]
    dropped: Counter = Counter()
    if len(usable) < len(conversations):
        dropped["messages is not a list of {role, content} objects"] += len(conversations) - len(usable)
    positions = own_positions(usable, index) if exclude_self else [None] * len(usable)
    examples = grounded_examples(
        usable, index, tokenizer, max_length=max_length, config=grounding, positions=positions, limit=limit, seed=seed
    )
    expected = min(len(usable), limit) if limit is not None else len(usable)
    if len(examples) < expected:
        dropped["not a customer turn followed by an agent reply, or no reply token left"] += expected - len(examples)
    return examples, dropped


def validation_fingerprint(conversations: Sequence[Any], max_length: int, max_eval_examples: int) -> str:
    """Identifies a validation set, so losses are compared only on the same one."""
    digest = hashlib.sha256(f"{max_length}:{max_eval_examples}\n".encode())
    for raw in conversations[:max_eval_examples]:
        digest.update(json.dumps(raw, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def length_grouped_batches(lengths: Sequence[int], batch_size: int, *, seed: int, mega: int = 64) -> list[list[int]]:
    """Batches of similar length in random order.

    Indices are shuffled, cut into mega-batches of ``mega * batch_size``, each sorted
    by length and cut into batches; the batch order is then shuffled. Padding nearly
    vanishes while batches still mix the data (the scheme of transformers'
    ``LengthGroupedSampler``).
    """
    rng = random.Random(seed)  # noqa: S311 - reproducible shuffling, not security
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = max(batch_size * mega, batch_size)
    batches: list[list[int]] = []
    for start in range(0, len(order), size):
        group = sorted(order[start : start + size], key=lambda i: lengths[i], reverse=True)
        batches.extend(group[k : k + batch_size] for k in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Example], pad_token_id: int, *, multiple_of: int = 1) -> dict:
    """Right-pad a batch to its longest example; padding is masked and never learned."""
    import torch

    longest = max(len(e.input_ids) for e in examples)
    longest = int(math.ceil(longest / multiple_of) * multiple_of)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(examples), longest), dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _eval_batches(examples: Sequence[Example], batch_size: int, pad_token_id: int) -> Iterator[dict]:
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    for start in range(0, len(ordered), batch_size):
        yield collate(ordered[start : start + batch_size], pad_token_id)


# --- model --------------------------------------------------------------------------------


def lora_targets(model_type: str, configured: Sequence[str] | None) -> tuple[list[str] | None, bool]:
    """Target module names and fan_in_fan_out for an architecture."""
    fan_in_fan_out = model_type in _FAN_IN_FAN_OUT
    if configured:
        return list(configured), fan_in_fan_out
    if model_type == "gpt2":
        return list(GPT2_TARGETS), True
    if model_type in _LLAMA_STYLE:
        return list(LLAMA_TARGETS), False
    return None, fan_in_fan_out  # peft's own table for the architecture, or its error


def device_and_precision(config: TrainConfig) -> tuple[str, Any]:
    """CUDA when present, else CPU; bf16 autocast where the hardware does it fast."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.mixed_precision == "no":
        return device, None
    if config.mixed_precision == "bf16":
        return device, torch.bfloat16
    if device == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    # On CPUs with AMX, bf16 matmuls run several times faster than fp32; elsewhere they can be slower.
    return device, torch.bfloat16 if _cpu_has_amx() else None


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        return False
    return False


def _autocast_factory(device: str, dtype) -> Callable | None:
    if dtype is None:
        return None
    import torch

    return lambda: torch.autocast(device_type=device, dtype=dtype)


def load_tokenizer(base: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        # Padding is masked out everywhere, so reusing EOS is safe and needs no new embedding.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_LIBC = None


def _release_freed_memory() -> None:
    """Hand memory freed by the last step back to the OS (glibc only).

    Batches of varying length leave glibc's heap fragmented, and the process keeps
    growing although PyTorch freed the tensors; trimming after each step keeps the
    peak near what one step needs (about -10% peak RSS on GPT-2-small here).
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - musl and macOS lack it
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _peak_rss_mb() -> float:
    import resource

    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Emitter:
    """Maps phase-local progress onto the whole run and forwards events."""

    WEIGHTS = (
        ("loading", 0.03),
        ("evaluating_before", 0.05),
        ("training", 0.76),
        ("evaluating_after", 0.08),
        ("evaluating_active", 0.04),
        ("saving", 0.04),
    )

    def __init__(self, callback: Callable[[ProgressEvent], None] | None):
        self.callback = callback
        self.starts: dict[str, float] = {}
        position = 0.0
        for name, weight in self.WEIGHTS:
            self.starts[name] = position
            position += weight
        self.weights = dict(self.WEIGHTS)

    def __call__(self, phase: str, fraction: float = 0.0, **kwargs: Any) -> None:
        if phase == "done":
            progress = 1.0
        else:
            progress = self.starts[phase] + self.weights[phase] * min(max(fraction, 0.0), 1.0)
        if kwargs.get("message"):
            log.info("%s", kwargs["message"])
        if self.callback is not None:
            self.callback(ProgressEvent(phase=phase, progress=round(progress, 4), **kwargs))


def attach_lora(model, config: TrainConfig):
    """Wrap a causal LM with peft LoRA adapters; only the adapters are trainable."""
    from peft import LoraConfig, get_peft_model

    # With LoRA on the top layers only nothing below them keeps activations for backward, so
    # recomputing them (checkpointing) would only cost time (docs/quality-research.md).
    if config.gradient_checkpointing and not config.lora_layers:
        # Non-reentrant checkpointing lets gradients reach the adapters although the inputs are frozen.
        # Newer transformers renamed it; the old name still works there but warns.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets, fan_in_fan_out = lora_targets(model.config.model_type, config.target_modules)
    layers = {}
    if config.lora_layers:
        total = model.config.num_hidden_layers
        layers = {"layers_to_transform": list(range(max(0, total - config.lora_layers), total))}
    lora = LoraConfig(
        **layers,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ValueError(
            f"peft cannot place LoRA on {model.config.model_type!r} by itself ({exc}); "
            "set target_modules to the names of its attention projections."
        ) from exc
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable or any("lora_" not in n for n, _ in trainable):
        raise RuntimeError("Only LoRA weights may be trainable; the base model must stay frozen.")
    return model, targets, trainable


@dataclass
class FitStats:
    total_steps: int
    first_loss: float | None
    last_loss: float | None
    loss_points: list[dict[str, float]]
    tokens: int  # real (non-pad) tokens processed
    padded_tokens: int  # tokens computed, padding included
    reply_tokens: int  # tokens the loss was computed on
    seconds: float
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step
    step_tokens: list[int] = field(default_factory=list)  # real tokens of each optimizer step


def fit(
    model,
    train: Sequence[Example],
    config: TrainConfig,
    *,
    device: str,
    autocast: Callable | None,
    pad_id: int,
    emit: Callable[..., None] | None = None,
    check_stop: Callable[[], None] | None = None,
) -> FitStats:
    """The optimisation loop: length-grouped batches, reply-only loss, accumulation, clipping, warm-up + decay.

    ``model`` has its trainable parameters set (``attach_lora``). Used by ``train_lora``
    and, on random data, by ``bench/bench_training.py``.
    """
    import torch

    emit = emit or (lambda *args, **kwargs: None)
    check_stop = check_stop or (lambda: None)
    lengths = [len(e.input_ids) for e in train]
    batches_per_epoch = math.ceil(len(train) / config.batch_size)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / config.grad_accum_steps))
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup = int(total_steps * config.warmup_ratio)
    log_every = config.log_every_steps or max(1, total_steps // 200)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    emit("training", 0.0, step=0, total_steps=total_steps, message=f"Training: {total_steps} optimizer steps")
    model.train()
    step, epoch_index = 0, 0
    seen_tokens = seen_reply_tokens = padded_tokens = 0
    window_loss, window_tokens, first_loss, last_loss = 0.0, 0, None, None
    loss_points: list[dict[str, float]] = []
    train_started = time.monotonic()
    step_seconds: list[float] = []
    step_tokens: list[int] = []
    multiple = 8 if device == "cuda" else 1
    while step < total_steps:
        order = length_grouped_batches(lengths, config.batch_size, seed=config.seed + epoch_index)
        for group_start in range(0, len(order), config.grad_accum_steps):
            if step >= total_steps:
                break
            check_stop()
            step_started = time.perf_counter()
            tokens_before = seen_tokens
            group = [
                collate([train[i] for i in ids], pad_id, multiple_of=multiple)
                for ids in order[group_start:][: config.grad_accum_steps]
            ]
            group_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group)
            step_loss = 0.0
            for batch in group:
                seen_tokens += int(batch["attention_mask"].sum())
                padded_tokens += batch["input_ids"].numel()
                batch = {k: v.to(device) for k, v in batch.items()}
                loss_sum, n = reply_token_loss_sum(model, batch, autocast=autocast)
                if n == 0:
                    continue
                # Normalised by the window's reply tokens, so accumulation equals one big batch.
                (loss_sum / group_tokens).backward()
                step_loss += float(loss_sum.detach())
            seen_reply_tokens += group_tokens
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()  # so the step's time is the GPU's, not the launch's
            if device == "cpu":
                _release_freed_memory()
            step_seconds.append(time.perf_counter() - step_started)
            step_tokens.append(seen_tokens - tokens_before)
            step += 1
            mean = step_loss / max(1, group_tokens)
            if not math.isfinite(mean):
                raise FloatingPointError(
                    f"The training loss became {mean} at step {step}; lower the learning rate "
                    f"(now {config.learning_rate})."
                )
            first_loss = mean if first_loss is None else first_loss
            last_loss = mean
            window_loss += step_loss
            window_tokens += group_tokens
            epoch = (epoch_index + min(1.0, (group_start + len(group)) / max(1, len(order)))) if order else 0.0
            point = None
            if step % log_every == 0 or step == total_steps:
                point = window_loss / max(1, window_tokens)
                loss_points.append({"step": step, "epoch": round(epoch, 3), "loss": round(point, 5)})
                window_loss, window_tokens = 0.0, 0
            elapsed = time.monotonic() - train_started
            emit(
                "training",
                step / total_steps,
                step=step,
                total_steps=total_steps,
                epoch=round(epoch, 3),
                loss=point,
                learning_rate=scheduler.get_last_lr()[0],
                message=(
                    f"step {step}/{total_steps} epoch {epoch:.2f} loss {point:.4f} "
                    f"({seen_tokens / max(elapsed, 1e-9):.0f} tok/s)"
                    if point is not None
                    else ""
                ),
            )
        epoch_index += 1
    train_seconds = time.monotonic() - train_started
    return FitStats(
        total_steps=total_steps,
        first_loss=first_loss,
        last_loss=last_loss,
        loss_points=loss_points,
        tokens=seen_tokens,
        padded_tokens=padded_tokens,
        reply_tokens=seen_reply_tokens,
        seconds=train_seconds,
        step_seconds=step_seconds,
        step_tokens=step_tokens,
    )


# --- the run --------------------------------------------------------------------------------


def train_lora(
    config: TrainConfig,
    dataset_path: str | Path,
    output_dir: str | Path,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    *,
    should_stop: Callable[[], bool] | None = None,
    compare_with: Sequence[tuple[str, str, str | Path]] = (),
) -> TrainResult:
    """Fine-tune ``config.base_model`` with LoRA on the dataset and save adapter, merged model and metrics.

    ``compare_with``: ``(name, label, merged model dir)`` of versions to evaluate on the same
    validation sample (the active version, for the quality gate); their rows join
    ``metrics["quality"]["rows"]`` and are cached in their own directories.

    ``should_stop`` is called before every optimizer step and between phases; when it
    returns True the run raises TrainingCancelled. On any failure ``output_dir`` is
    removed, so a directory that exists after a run holds a complete result (or the
    run's first files while it trains). Raises DatasetError for a dataset it cannot use.
    """
    config.validate()
    output = Path(output_dir)
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"The output directory {output} is not empty; give a new one.")
    output.mkdir(parents=True, exist_ok=True)
    _write_json(output / "train_config.json", _run_config_json(config, Path(dataset_path)))
    try:
        return _train(
            config, Path(dataset_path), output, _Emitter(on_progress), should_stop or (lambda: False), compare_with
        )
    except BaseException:
        shutil.rmtree(output, ignore_errors=True)
        raise


def _train(
    config: TrainConfig,
    dataset_path: Path,
    output: Path,
    emit: _Emitter,
    stop: Callable[[], bool],
    compare_with: Sequence[tuple[str, str, str | Path]] = (),
) -> TrainResult:
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    started = time.monotonic()

    def check_stop() -> None:
        if stop():
            raise TrainingCancelled("Training was stopped on request.")

    set_seed(config.seed)
    device, amp_dtype = device_and_precision(config)
    if device == "cpu":
        torch.set_num_threads(config.num_threads or len(os.sched_getaffinity(0)))
    autocast = _autocast_factory(device, amp_dtype)
    name = config.base_model_name or config.base_model

    emit("loading", 0.0, message=f"Loading dataset {dataset_path} and base model {name} on {device}")
    train_rows, val_rows = load_conversations(dataset_path)
    tokenizer = load_tokenizer(config.base_model)
    knowledge = load_knowledge(dataset_path, strict=True)
    grounding = config.grounding_config()
    index = knowledge.index if config.grounding_neighbours > 0 else None
    length = config.grounded_max_length if index is not None else config.max_length
    train, dropped_train = prepare_examples(
        train_rows,
        tokenizer,
        max_length=length,
        limit=config.max_examples,
        seed=config.seed,
        index=index,
        grounding=grounding,
        exclude_self=True,
    )
    all_val_rows = val_rows
    val_rows = val_rows[: config.max_eval_examples]
    validation, dropped_val = prepare_examples(val_rows, tokenizer, max_length=length, index=index, grounding=grounding)
    if not train:
        reasons = "; ".join(f"{count} x {reason}" for reason, count in dropped_train.most_common(5))
        raise DatasetError(
            f"None of the {len(train_rows)} training conversations in {dataset_path} is usable ({reasons}). "
            "Each needs a customer turn followed by a non-empty agent reply; rebuild the dataset."
        )
    if dropped_train or dropped_val:
        emit(
            "loading",
            0.5,
            message=f"Skipped {sum(dropped_train.values())} training and {sum(dropped_val.values())} validation "
            f"conversations: {dict((dropped_train + dropped_val).most_common(3))}",
        )
    check_stop()

    model = AutoModelForCausalLM.from_pretrained(config.base_model, dtype=torch.float32)
    model.config.use_cache = False  # no KV cache while training; generation turns it back on per call
    model.to(device)
    model, targets, trainable = attach_lora(model, config)
    n_trainable = sum(p.numel() for _, p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    emit(
        "loading",
        1.0,
        message=f"{len(train)} training / {len(validation)} validation examples; LoRA r={config.lora_r} on "
        f"{', '.join(targets or ['peft defaults'])}: {n_trainable:,} trainable of {n_total:,} parameters",
    )

    pad_id = tokenizer.pad_token_id
    eval_batch = max(config.batch_size, 8)
    quality = QualityEvaluation.for_dataset(dataset_path, all_val_rows, train_rows, tokenizer, config, knowledge)

    def evaluate(phase: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        result = evaluate_loss(model, _eval_batches(validation, eval_batch, pad_id), device=device, autocast=autocast)
        emit(phase, 0.1)
        who = "the base model" if phase == "evaluating_before" else "the fine-tuned model"
        progress = _evaluation_progress(emit, phase, f"Evaluating {who}", 0.1)

        row = None
        if quality.examples:
            before = phase == "evaluating_before"

            def score() -> list:
                return [
                    quality.model_row(
                        "base" if before else "candidate",
                        "Base model" if before else "Candidate",
                        model,
                        tokenizer,
                        device=device,
                        autocast=autocast,
                        progress=progress,
                    )
                ]

            if before:
                # The base model answers a dataset's sample the same way every run: scored once per dataset.
                key = settings_key(
                    sample=quality.key,
                    base=name,
                    config={k: v for k, v in config.to_json().items() if k.startswith(("eval_", "prompt", "prime"))},
                    grounding=(quality.grounded, config.grounding_neighbours),
                )
                row = cached_rows(dataset_path, f"{key}-base", score)[0]
            else:
                row = score()[0].to_json()
        values = {
            "eval_loss": result.loss,
            "perplexity": result.perplexity,
            "rouge_l": row["rouge_l"] if row else None,
            "intent_accuracy": row["intent_accuracy"] if row else None,
        }
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if v is not None) or "no validation data"
        emit(phase, 1.0, message=f"{'Before' if phase == 'evaluating_before' else 'After'} training: {shown}")
        return values, row

    before: dict[str, Any] = {}
    base_row = None
    if config.eval_before:
        emit("evaluating_before", 0.0, message="Evaluating the base model on the validation split")
        before, base_row = evaluate("evaluating_before")
        check_stop()

    stats = fit(model, train, config, device=device, autocast=autocast, pad_id=pad_id, emit=emit, check_stop=check_stop)
    total_steps = stats.total_steps
    check_stop()

    emit("evaluating_after", 0.0, message="Evaluating the fine-tuned model on the validation split")
    after, candidate_row = evaluate("evaluating_after")
    check_stop()

    compared = {}
    for name_, label, model_dir in compare_with:
        emit("evaluating_active", 0.0, message=f"Evaluating {label} on the same validation replies")
        compared[name_] = compare_version(
            model_dir,
            dataset_path,
            config,
            name=name_,
            label=label,
            progress=_evaluation_progress(emit, "evaluating_active", f"Evaluating {label}", 0.0),
        )
        check_stop()

    emit("saving", 0.0, message=f"Saving the adapter to {output}")
    adapter_dir = output / "adapter"
    merged_dir = output / "merged" if config.merge else None
    metrics: dict[str, Any] = {
        "base_model": name,
        "dataset_path": str(dataset_path),
        "num_train": len(train),
        "num_validation": len(validation),
        "dropped": {"train": dict(dropped_train), "validation": dict(dropped_val)},
        "validation_fingerprint": validation_fingerprint(val_rows, config.max_length, config.max_eval_examples),
        "eval_loss": after.get("eval_loss"),
        "perplexity": after.get("perplexity"),
        "rouge_l": after.get("rouge_l"),
        "intent_accuracy": after.get("intent_accuracy"),
        "rouge_l_retrieval": quality.retrieval[0]["rouge_l"] if quality.retrieval else None,
        "quality": quality.summary(candidate=candidate_row, base=base_row, **compared),
        "before": before,
        "after": after,
        "train_loss_first": stats.first_loss,
        "train_loss_last": stats.last_loss,
        "loss_history": stats.loss_points,
        "optimizer_steps": total_steps,
        "epochs": config.epochs,
        "train_seconds": round(stats.seconds, 2),
        "tokens_per_second": round(stats.tokens / max(stats.seconds, 1e-9), 1),
        "padding_fraction": round(1 - stats.tokens / max(1, stats.padded_tokens), 4),
        "reply_tokens": stats.reply_tokens,
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "device": device,
        "mixed_precision": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "no",
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "samples": quality.samples(candidate_row),
        "config": config.to_json(),
        "grounded": index is not None,
    }
    adapter_dir.mkdir(parents=True)
    model.save_pretrained(adapter_dir)  # peft writes adapter_model.safetensors + adapter_config.json
    tokenizer.save_pretrained(adapter_dir)
    _write_json(adapter_dir / "metrics.json", metrics)
    shutil.copy(output / "train_config.json", adapter_dir / "train_config.json")
    # The version serves with what it was trained with: the index (only when trained grounded)
    # and the intent classifier travel with the weights (finetune.ml.knowledge).
    copy_knowledge(dataset_path, output, retrieval=index is not None)
    emit("saving", 0.4)
    if merged_dir is not None:
        emit("saving", 0.5, message="Merging the adapter into the base model (merge_and_unload)")
        merged = model.merge_and_unload()
        merged.config.use_cache = True
        merged.save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
        _write_json(merged_dir / "metrics.json", metrics)
    metrics["seconds"] = round(time.monotonic() - started, 2)
    _write_json(output / "metrics.json", metrics)
    emit("done", 1.0, step=total_steps, total_steps=total_steps, message=f"Done in {metrics['seconds']:.0f} s")
    return TrainResult(output_dir=output, adapter_dir=adapter_dir, merged_dir=merged_dir, metrics=metrics)


def _evaluation_progress(emit: _Emitter, phase: str, activity: str, start: float) -> Callable[[int, int], None]:
    """A (done, total) callback for quality.generate_scored: progress events, one log line at the end."""

    def progress(done: int, total: int) -> None:
        emit(
            phase,
            start + (1 - start) * done / max(total, 1),
            done=done,
            total=total,
            activity=activity,
            message=f"{activity}: {done}/{total} replies" if done == total else "",
        )

    return progress


def compare_version(
    model_dir: str | Path,
    dataset_path: str | Path,
    config: TrainConfig,
    *,
    name: str = "active",
    label: str = "Active version",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any] | None:
    """Another version's quality row on this run's validation sample (cached in its directory).

    It is evaluated the way it serves: grounded (on this dataset's index, so none of the
    validation questions is in it) only when it carries an index, with its own grounding
    settings, and this run's decoding and reply policy. None when its model is missing.
    """
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    from .quality import cached_rows

    if not model_dir or not Path(model_dir).is_dir():
        return None
    theirs = load_knowledge(model_dir)
    grounding = theirs.grounding
    reference = dataclasses.replace(
        config,
        grounding_neighbours=grounding.neighbours if theirs.grounded and grounding else 0,
        prompt_budget=grounding.max_prompt_tokens if grounding else config.prompt_budget,
        prime_reply=grounding.prime if grounding else False,
    )
    train_rows, val_rows = load_conversations(dataset_path)
    tokenizer = load_tokenizer(str(model_dir))
    quality = QualityEvaluation.for_dataset(
        dataset_path, val_rows, train_rows, tokenizer, reference, load_knowledge(dataset_path)
    )
    if not quality.examples:
        return None

    def compute():
        device, amp_dtype = device_and_precision(config)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
        row = quality.model_row(
            name,
            label,
            model,
            tokenizer,
            device=device,
            autocast=_autocast_factory(device, amp_dtype),
            progress=progress,
        )
        return [row]

    root = theirs.root or Path(model_dir)
    if (root / "train_config.json").exists():  # a trained version's directory: cache the row there
        row = cached_rows(root, f"{quality.key}-{name}", compute)[0]
    else:  # a plain model directory is not ours to write into
        row = compute()[0].to_json()
    return {**row, "name": name, "label": label}


def _run_config_json(config: TrainConfig, dataset_path: Path) -> dict[str, Any]:
    """train_config.json: the TrainConfig, and what serving reads back (``knowledge.load_knowledge``)."""
    from .decoding import DecodingConfig

    grounded = config.grounding_neighbours > 0 and (dataset_path / RETRIEVAL_DIR / "index.json").exists()
    return {
        **config.to_json(),
        "dataset_path": str(dataset_path),
        "grounding": config_to_json(config.grounding_config()) if grounded else None,
        "decoding": config_to_json(DecodingConfig()),
        "reply_policy": config.policy_config().to_json(),
    }


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")


def validation_loss(model_dir: str | Path, dataset_path: str | Path, config: TrainConfig) -> dict[str, Any]:
    """Loss of a saved (merged) model on a dataset's validation split, prepared as ``config`` would.

    The promotion gate uses it to score the active version on a candidate's validation set.
    """
    import torch
    from transformers import AutoModelForCausalLM

    _, val_rows = load_conversations(dataset_path)
    val_rows = val_rows[: config.max_eval_examples]
    tokenizer = load_tokenizer(str(model_dir))
    validation, _ = prepare_examples(val_rows, tokenizer, max_length=config.max_length)
    device, amp_dtype = device_and_precision(config)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
    result = evaluate_loss(
        model,
        _eval_batches(validation, max(config.batch_size, 8), tokenizer.pad_token_id),
        device=device,
        autocast=_autocast_factory(device, amp_dtype),
    )
    return {
        "eval_loss": result.loss,
        "perplexity": result.perplexity,
        "tokens": result.tokens,
        "validation_fingerprint": validation_fingerprint(val_rows, config.max_length, config.max_eval_examples),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="directory written by build_dataset (DatasetDict.save_to_disk)")
    parser.add_argument("output", help="run directory to write")
    parser.add_argument("--base", required=True, help="base model directory or Hub id")
    for name in ("epochs", "learning_rate", "lora_r", "max_examples", "max_length", "batch_size"):
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in {"dataset", "output", "base"} and v is not None}
    config = TrainConfig.from_overrides(overrides, base_model=args.base)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = train_lora(config, args.dataset, args.output)
    print(json.dumps({k: result.metrics[k] for k in ("eval_loss", "rouge_l", "rouge_l_retrieval")}))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
