"""Inference engines behind ``finetune.generation.Engine``, plus the pieces they share.

- ``load_for_inference``: load a merged model directory (or a base model) for serving,
  optionally with int8 dynamic quantisation (``quantize_int8``) on CPU.
- ``ReplyText``: incremental detokenising with stop strings, so streamed deltas never
  contain a stop string or half of one, and the concatenated deltas equal the reply.
- ``token_budget`` / ``trim_messages`` / ``prompt_ids_for``: fit a conversation into the
  model's context window, dropping whole turns oldest first and keeping the system prompt.
- ``NaiveEngine``: one ``model.generate`` per request, one request at a time, in a
  worker thread. Correct and simple; the baseline the batched engine is measured against.
- ``BatchedEngine``: one generation thread per process that steps every running reply
  together, one token per step, over a shared KV cache (dynamic batching), with a
  prefix cache so follow-up turns prefill only their new tokens.

Plain Python: no Django. Generation never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .generation import EngineBusy, GenerationDone, GenerationParams, GenerationRequest, TokenDelta
from .prompting import ROLE_AGENT, ROLE_SYSTEM, normalise_messages, render_prompt, stop_sequences

log = logging.getLogger(__name__)

# Fewest prompt tokens a reply is generated from, however large max_new_tokens is:
# a reply to (a part of) the customer's last message, never to nothing.
MIN_PROMPT_TOKENS = 16


@dataclass
class LoadedModel:
    """A model and tokenizer ready to generate, with the label replies are attributed to."""

    model: object
    tokenizer: object
    label: str
    device: str = "cpu"
    int8: bool = False


def load_for_inference(path: str, *, label: str, device: str | None = None, int8: bool = False) -> LoadedModel:
    """Load a model directory (or a LoRA adapter directory, merged here) for serving.

    ``int8`` quantises the linear layers (CPU only).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    return LoadedModel(model=model, tokenizer=tokenizer, label=label, device=device, int8=int8)


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


class ReplyText:
    """Turns generated token ids into reply text, honouring stop strings.

    ``push(token_id)`` returns the text that is now safe to show: text that cannot
    turn out to be the start of a stop string. ``stopped`` becomes True when a stop
    string appears; the stop string and anything after it are never emitted.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the reply already returned
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        decoded = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if decoded.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        cut = len(decoded)
        for stop in self.stops:
            at = decoded.find(stop)
            if at != -1 and at < cut:
                cut = at
                self.stopped = True
        if self.stopped:
            self.text = decoded[:cut]
        else:
            self.text = decoded
            # Hold back a tail that might be the beginning of a stop string.
            for stop in self.stops:
                for k in range(min(len(stop) - 1, len(decoded)), 0, -1):
                    if decoded.endswith(stop[:k]):
                        cut = min(cut, len(decoded) - k)
                        break
        delta = self.text[self.emitted : cut] if cut > self.emitted else ""
        self.emitted = max(self.emitted, cut)
        return delta

    def flush(self) -> str:
        """Text held back at the end of generation (it turned out not to be a stop string)."""
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

    @property
    def reply(self) -> str:
        return self.text.strip()


def context_window(loaded: LoadedModel) -> int:
    config = loaded.model.config
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024))


def token_budget(window: int, max_new_tokens: int) -> tuple[int, int]:
    """``(max prompt tokens, max new tokens)`` so that prompt and reply together fit ``window``."""
    max_new = max(1, min(max_new_tokens, window - MIN_PROMPT_TOKENS))
    return window - max_new, max_new


def _prompt_length(turns: list[dict[str, str]], tokenizer) -> int:
    return len(tokenizer(render_prompt(turns, tokenizer), add_special_tokens=False)["input_ids"])


def trim_messages(messages: Iterable[Mapping[str, str]], tokenizer, max_prompt_tokens: int) -> list[dict[str, str]]:
    """The conversation cut to fit ``max_prompt_tokens``: whole turns dropped oldest first.

    The system turn (company, policy) is always kept, and so is the last turn (what the
    reply answers). History restarts at a customer turn, since an agent reply whose
    question was dropped means nothing to the model. Only when the system turn and the
    last turn alone are too long is the last turn cut, keeping its end.
    """
    turns = normalise_messages(messages)
    system = turns[:1] if turns and turns[0]["role"] == ROLE_SYSTEM else []
    history = turns[len(system) :]
    if not history or _prompt_length(system + history, tokenizer) <= max_prompt_tokens:
        return system + history
    # Where the kept history may start, oldest first; fewer turns never render longer, so
    # the oldest start that fits is found by bisection (a long chat costs a few tokenizations).
    starts = [i for i, turn in enumerate(history) if i > 0 and turn["role"] != ROLE_AGENT]
    if not starts or starts[-1] != len(history) - 1:
        starts.append(len(history) - 1)
    lo, hi = 0, len(starts)  # the answer is starts[lo], or "none fits" when lo == len(starts)
    while lo < hi:
        mid = (lo + hi) // 2
        if _prompt_length(system + history[starts[mid] :], tokenizer) <= max_prompt_tokens:
            hi = mid
        else:
            lo = mid + 1
    if lo < len(starts):
        return system + history[starts[lo] :]
    last = dict(history[-1])
    ids = tokenizer(last["content"], add_special_tokens=False)["input_ids"]
    while len(ids) > 1:
        over = _prompt_length([*system, last], tokenizer) - max_prompt_tokens
        if over <= 0:
            break
        ids = ids[min(len(ids) - 1, over) :]
        last["content"] = tokenizer.decode(ids)
    return [*system, last]


def prompt_ids_for(loaded: LoadedModel, messages: list[dict[str, str]], max_prompt_tokens: int) -> list[int]:
    """Trim the conversation to fit (``trim_messages``), render and tokenize it.

    Keeping only the newest ``max_prompt_tokens`` tokens afterwards is the last guard,
    reached only when the system prompt alone does not fit.
    """
    turns = trim_messages(messages, loaded.tokenizer, max_prompt_tokens)
    text = render_prompt(turns, loaded.tokenizer)
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_prompt_tokens:]


def _mean(total: float, count: int) -> float | None:
    return total / count if count else None


class NaiveEngine:
    """``model.generate`` per request, strictly one at a time (the benchmark baseline)."""

    def __init__(self, loaded: LoadedModel | None):
        self._loaded = loaded
        self._lock = threading.Lock()
        self._keys: set[str] = set()
        self._cancelled: set[str] = set()

    @property
    def model_label(self) -> str | None:
        return self._loaded.label if self._loaded else None

    def swap(self, loaded: LoadedModel) -> None:
        """Serve ``loaded`` from the next request on; a running request keeps its model."""
        self._loaded = loaded

    def close(self, timeout: float | None = None) -> None:
        """Nothing to stop: each request runs in the default executor."""

    async def cancel(self, request_id: str) -> None:
        self._cancelled.add(request_id)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | GenerationDone]:
        if self._loaded is None:
            raise RuntimeError("No model is loaded.")
        if request.key in self._keys:
            raise EngineBusy(f"A reply for {request.key} is already being generated.")
        self._keys.add(request.key)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        try:
            # Timed from here, like BatchedEngine: waiting for the executor and the lock is
            # part of what the customer waits for.
            worker = loop.run_in_executor(None, self._generate, request, loop, queue, time.monotonic())
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, GenerationDone):
                    break
            await worker
        finally:
            self._keys.discard(request.key)
            self._cancelled.discard(request.request_id)

    def _generate(self, request: GenerationRequest, loop, queue: asyncio.Queue, start: float) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        loaded = self._loaded
        params = request.params
        deadline = start + params.timeout_s
        reply = ReplyText(loaded.tokenizer, stop_sequences(loaded.tokenizer) + tuple(params.stop))
        state = {"first": None, "count": 0, "reason": "stop"}
        engine = self

        def emit(event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        class Streamer(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate() first passes the prompt
                    self.prompt_seen = True
                    return
                for token_id in value.reshape(-1).tolist():
                    if token_id == loaded.tokenizer.eos_token_id:
                        continue
                    state["count"] += 1
                    if state["first"] is None:
                        state["first"] = time.monotonic()
                    delta = reply.push(token_id)
                    if delta:
                        emit(TokenDelta(delta))

            def end(self):
                pass

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                if request.request_id in engine._cancelled:
                    state["reason"] = "cancelled"
                    return True
                if time.monotonic() > deadline:
                    state["reason"] = "timeout"
                    return True
                return reply.stopped

        mean_logprob = None
        error = ""
        with self._lock:
            try:
                max_prompt, max_new = token_budget(context_window(loaded), params.max_new_tokens)
                ids = prompt_ids_for(loaded, request.messages, max_prompt)
                input_ids = torch.tensor([ids], device=loaded.device)
                sampling = params.temperature > 0
                with torch.inference_mode():
                    out = loaded.model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        max_new_tokens=max_new,
                        do_sample=sampling,
                        temperature=params.temperature if sampling else None,
                        top_p=params.top_p if sampling else None,
                        pad_token_id=loaded.tokenizer.pad_token_id,
                        eos_token_id=loaded.tokenizer.eos_token_id,
                        streamer=Streamer(),
                        stopping_criteria=StoppingCriteriaList([Stop()]),
                        output_scores=True,
                        return_dict_in_generate=True,
                    )
                scores = loaded.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
                finite = [float(s) for s in scores[0] if math.isfinite(float(s))]
                mean_logprob = sum(finite) / len(finite) if finite else None
                generated = out.sequences.shape[1] - input_ids.shape[1]
                if state["reason"] == "stop" and not reply.stopped and generated >= max_new:
                    state["reason"] = "length"
            except Exception as exc:  # noqa: BLE001 - reported to the caller as an "error" reply
                log.exception("Generation failed for %s", request.key)
                state["reason"] = "error"
                error = f"{type(exc).__name__}: {exc}"
        tail = reply.flush() if not reply.stopped else ""
        if tail:
            emit(TokenDelta(tail))
        end = time.monotonic()
        emit(
            GenerationDone(
                text=reply.text,
                finish_reason=state["reason"],
                token_count=state["count"],
                mean_logprob=mean_logprob,
                model_label=loaded.label,
                first_token_ms=int((state["first"] - start) * 1000) if state["first"] else None,
                latency_ms=int((end - start) * 1000),
                error=error,
            )
        )


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(eq=False)
class _Job:
    """A request between ``stream()`` (event loop) and the generation thread."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float
    # Written by the event loop, read by the generation thread between steps; a plain
    # attribute is enough, as the thread only needs to see it by the next step.
    cancelled: bool = False

    @property
    def deadline(self) -> float:
        return self.submitted + self.request.params.timeout_s

    def emit(self, event: TokenDelta | GenerationDone) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody reads this reply any more
            self.cancelled = True


@dataclass(eq=False)
class _Row:
    """One reply being generated: its text so far and where its next token goes."""

    job: _Job
    reply: ReplyText
    max_new: int
    cached: list[int] = field(default_factory=list)  # token ids whose keys/values are in the cache
    position: int = 0  # position id of ``next_token``
    next_token: int = 0  # the last chosen token, fed to the model at the next step
    count: int = 0  # tokens of reply text (the end-of-sequence token is not counted)
    logprob_sum: float = 0.0
    logprob_n: int = 0
    first_at: float | None = None


class _Batch:
    """The rows decoding together on one model, with their shared, left-padded KV cache.

    Every row's cached keys and values end at the same column; shorter rows are padded
    on the left and ``mask`` (1 = real token) hides the padding from attention. Position
    ids are passed per row, so padding does not shift a row's positions: a row computes
    what it would compute alone (GPT-2's absolute positions and Llama's rotary ones alike).
    """

    def __init__(self, loaded: LoadedModel, prefix_cache_bytes: int = 0):
        self.loaded = loaded
        self.rows: list[_Row] = []
        self.cache = None  # a transformers DynamicCache, batch dimension = rows
        self.mask = None  # LongTensor [rows, cached columns]
        self.prefixes = PrefixCache(prefix_cache_bytes)  # keys/values are only valid for this model

    def row_layers(self, index: int) -> list:
        """Copies of one row's cached keys and values, without its padding."""
        n = len(self.rows[index].cached)
        return [
            (layer.keys[index : index + 1, :, -n:, :].clone(), layer.values[index : index + 1, :, -n:, :].clone())
            for layer in self.cache.layers
        ]

    def add(self, items: list[tuple[_Row, list]]) -> None:
        """Append rows, each with its keys and values ``[(K, V), ...]`` (``[1, heads, tokens, dim]`` per layer)."""
        import torch
        import torch.nn.functional as F  # noqa: N812 - PyTorch's own convention

        device = self.loaded.device
        lengths = [len(row.cached) for row, _ in items]
        width = max([*lengths, self.mask.shape[1] if self.rows else 0])
        masks: list = []
        parts: list[list] = [[] for _ in items[0][1]]  # per layer: (K, V) blocks to stack
        if self.rows:
            grow = width - self.mask.shape[1]
            masks.append(F.pad(self.mask, (grow, 0)))
            for i, layer in enumerate(self.cache.layers):
                parts[i].append((F.pad(layer.keys, (0, 0, grow, 0)), F.pad(layer.values, (0, 0, grow, 0))))
        for (_, layers), length in zip(items, lengths, strict=True):
            masks.append(F.pad(torch.ones((1, length), dtype=torch.long, device=device), (width - length, 0)))
            for i, (keys, values) in enumerate(layers):
                parts[i].append((F.pad(keys, (0, 0, width - length, 0)), F.pad(values, (0, 0, width - length, 0))))
        stacked = [(torch.cat([k for k, _ in blocks]), torch.cat([v for _, v in blocks])) for blocks in parts]
        if self.rows:
            for layer, (keys, values) in zip(self.cache.layers, stacked, strict=True):
                layer.keys, layer.values = keys, values
        else:
            self.cache = _cache_from(self.loaded.model, stacked, width)
        self.mask = torch.cat(masks)
        self.rows.extend(row for row, _ in items)

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep``; drop cache columns that are padding in every row."""
        import torch

        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, device=self.loaded.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask.index_select(0, index)
        first = int(self.mask.any(dim=0).nonzero()[0])
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:, :]
            layer.values = layer.values.index_select(0, index)[:, :, first:, :]
        self.mask = self.mask[:, first:]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Keys and values of recently finished replies, reused by prompts that start the same way.

    A conversation's next prompt repeats its previous prompt and reply, and every prompt
    starts with the same system prompt; prefilling only the new tokens cuts the time to
    first token of a follow-up question from the whole history to the new message.
    One entry per conversation key (its latest prompt and reply), least recently used
    first out when ``budget_bytes`` is exceeded. Used by the generation thread only.
    """

    MIN_REUSE = 16  # fewer shared tokens are not worth a cache copy

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.entries: collections.OrderedDict[str, tuple[list[int], list, int]] = collections.OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.reused_tokens = 0

    def lookup(self, key: str, ids: list[int]) -> tuple[int, list | None]:
        """``(n, layers)``: the first ``n`` tokens of ``ids`` have cached keys/values (n < len(ids))."""
        best, layers = 0, None
        own = self.entries.get(key)
        candidates = ([own] if own else []) + [e for k, e in self.entries.items() if k != key]
        for cached_ids, entry_layers, _ in candidates:
            n = _common_prefix(cached_ids, ids)
            if n > best:
                best, layers = n, entry_layers
        best = min(best, len(ids) - 1)  # the last prompt token is always computed: it gives the logits
        if best < self.MIN_REUSE:
            return 0, None
        self.hits += 1
        self.reused_tokens += best
        return best, layers

    def store(self, key: str, ids: list[int], layers: list) -> None:
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        self.drop(key)
        if size > self.budget_bytes:
            return
        while self.entries and self.bytes + size > self.budget_bytes:
            _, (_, _, evicted) = self.entries.popitem(last=False)
            self.bytes -= evicted
        self.entries[key] = (list(ids), layers, size)
        self.bytes += size

    def drop(self, key: str) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[2]


def _forward(model, cache, **kwargs):
    """One forward pass with the KV cache; returns ``(logits, cache)``.

    transformers 5.x names the cache argument and output ``cache`` (``past_key_values``
    is deprecated); 4.x names both ``past_key_values``. Both are supported.
    """
    name = _cache_argument(type(model))
    out = model(**kwargs, **({name: cache} if cache is not None else {}), use_cache=True)
    return out.logits, getattr(out, name)


_cache_arguments: dict[type, str] = {}


def _cache_argument(model_class: type) -> str:
    if model_class not in _cache_arguments:
        import inspect

        parameters = inspect.signature(model_class.forward).parameters
        _cache_arguments[model_class] = "cache" if "cache" in parameters else "past_key_values"
    return _cache_arguments[model_class]


def _cache_from(model, layers: list, length: int):
    """A fresh cache holding the first ``length`` positions of cached ``layers`` (copies)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for index, (keys, values) in enumerate(layers):
        cache.update(keys[:, :, :length, :], values[:, :, :length, :], index)
    return cache


def _check_cache(cache) -> None:
    from transformers.cache_utils import DynamicLayer

    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise RuntimeError(
            "BatchedEngine supports full-attention models (GPT-2, Llama-style); this model's cache has "
            "sliding-window or other special layers. Set SUPPORTBOT_ENGINE=naive to serve it."
        )


@dataclass(eq=False)
class _Prefill:
    row: _Row
    reused: int  # leading prompt tokens whose keys/values come from the prefix cache
    layers: list | None  # the cached keys/values they come from


def _prefill_forward(loaded: LoadedModel, group: list[_Prefill]) -> tuple[object, list[list]]:
    """Run the uncached prompt tokens of ``group``; returns last-token logits and each row's keys/values.

    A single prompt runs alone, unpadded, exactly as ``model.generate`` would run it.
    Several are laid out as ``[pad | cached prefix | pad | new tokens]`` per row, with
    explicit position ids and a 4D attention mask: every real token sees its own prefix
    and earlier new tokens only, and each padding query sees itself, so no attention row
    is empty. Each row's keys/values are then cut out without the padding.
    """
    import torch

    device = loaded.device
    reused = [item.reused for item in group]
    ids = [item.row.cached for item in group]
    new = [len(row_ids) - r for row_ids, r in zip(ids, reused, strict=True)]
    prefix_width, new_width = max(reused), max(new)
    cache = None
    if prefix_width:
        cache = _cache_from(loaded.model, _stack_prefixes(loaded, group, prefix_width), prefix_width)
    pad_id = loaded.tokenizer.pad_token_id or 0
    input_ids = torch.tensor(
        [[pad_id] * (new_width - n) + row_ids[r:] for row_ids, r, n in zip(ids, reused, new, strict=True)],
        device=device,
    )
    positions = torch.tensor(
        [[r] * (new_width - n) + list(range(r, r + n)) for r, n in zip(reused, new, strict=True)], device=device
    )
    kwargs = {}
    if len(group) > 1:
        kwargs["attention_mask"] = _prefill_mask(loaded, reused, new, prefix_width, new_width)
    logits, cache = _forward(
        loaded.model, cache, input_ids=input_ids, position_ids=positions, logits_to_keep=1, **kwargs
    )
    total = prefix_width + new_width
    rows = []
    for j, (r, n) in enumerate(zip(reused, new, strict=True)):
        layers = []
        for layer in cache.layers:
            k, v = layer.keys[j : j + 1], layer.values[j : j + 1]
            if len(group) == 1 and r == prefix_width:
                layers.append((k, v))  # no padding to cut
                continue
            keep = list(range(prefix_width - r, prefix_width)) + list(range(total - n, total))
            index = torch.tensor(keep, device=device)
            layers.append((k.index_select(2, index), v.index_select(2, index)))
        rows.append(layers)
    return logits[:, -1, :], rows


def _stack_prefixes(loaded: LoadedModel, group: list[_Prefill], width: int) -> list:
    """The cached prefixes of ``group`` as one left-padded batch, per layer."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - PyTorch's own convention

    template = next(item.layers for item in group if item.layers)
    stacked = []
    for index, (k0, v0) in enumerate(template):
        keys, values = [], []
        for item in group:
            if item.layers:
                k, v = item.layers[index]
                k, v = k[:, :, : item.reused], v[:, :, : item.reused]
            else:
                k = k0.new_zeros((1, k0.shape[1], 0, k0.shape[3]))
                v = v0.new_zeros((1, v0.shape[1], 0, v0.shape[3]))
            keys.append(F.pad(k, (0, 0, width - item.reused, 0)))
            values.append(F.pad(v, (0, 0, width - item.reused, 0)))
        stacked.append((torch.cat(keys), torch.cat(values)))
    return stacked


def _prefill_mask(loaded: LoadedModel, reused, new, prefix_width: int, new_width: int):
    """Additive 4D mask ``[rows, 1, new_width, prefix_width + new_width]`` for a padded prefill."""
    import torch

    device = loaded.device
    total = prefix_width + new_width
    column = torch.arange(total, device=device)
    valid = torch.stack(
        [
            ((column >= prefix_width - r) & (column < prefix_width)) | (column >= total - n)
            for r, n in zip(reused, new, strict=True)
        ]
    )  # [rows, total]: real keys
    query = torch.arange(new_width, device=device) + prefix_width  # each query's own column
    causal = column.unsqueeze(0) <= query.unsqueeze(1)  # [new_width, total]
    allowed = valid.unsqueeze(1) & causal.unsqueeze(0)
    allowed |= column.unsqueeze(0).unsqueeze(0) == query.view(1, -1, 1)  # padding queries see themselves
    dtype = loaded.model.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


class BatchedEngine:
    """Dynamic batching: every running reply advances one token per step of one shared batch.

    One generation thread per engine (one engine per process) owns the model. Requests
    wait in a queue; between two decode steps the thread admits waiting requests (up to
    ``max_batch_size`` rows), prefills their prompts together in one padded pass (only
    the tokens the prefix cache does not already hold: a conversation's earlier turns,
    the shared system prompt), and appends them to the batch's KV cache; then one forward
    pass over the batch gives every row its next token. Finished, cancelled and
    timed-out rows leave between steps. Tokens reach each request's asyncio queue through
    ``loop.call_soon_threadsafe``.

    Greedy replies equal ``NaiveEngine``'s token for token (tests check it); batching
    changes only the floating-point summation order, which can flip a near-tie.

    ``swap(loaded)`` serves a new model to requests admitted from then on, while rows
    already running finish on the model they started with (their own batch).
    """

    def __init__(
        self,
        loaded: LoadedModel | None,
        *,
        max_batch_size: int = 16,
        num_threads: int | None = None,
        prefix_cache_mb: float = 512,
        prefill_tokens: int = 2048,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}.")
        self._loaded = loaded
        self.max_batch_size = max_batch_size
        self.num_threads = num_threads or _cpu_count()
        self.prefix_cache_bytes = int(prefix_cache_mb * 2**20)
        self.prefill_tokens = prefill_tokens
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._jobs: dict[str, _Job] = {}  # request_id -> job, from submission to its last event
        self._keys: set[str] = set()
        self._batches: list[_Batch] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        self.steps = 0  # decode steps taken (observability and tests)
        self.prefills = 0  # prefill forward passes
        self.prefilled_rows = 0  # prompts prefilled (over prefills: how many shared a pass)

    # --- the Engine interface (event loop side) ---------------------------------------

    @property
    def model_label(self) -> str | None:
        return self._loaded.label if self._loaded else None

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | GenerationDone]:
        loop = asyncio.get_running_loop()
        job = _Job(request=request, loop=loop, queue=asyncio.Queue(), submitted=time.monotonic())
        with self._cond:
            if self._closing:
                raise RuntimeError("The engine is shut down; get a new one from finetune.inference.get_engine().")
            if self._loaded is None:
                raise RuntimeError("No model is loaded.")
            if request.key in self._keys:
                raise EngineBusy(f"A reply for {request.key} is already being generated.")
            self._keys.add(request.key)
            self._jobs[request.request_id] = job
            self._waiting.append(job)
            self._ensure_thread()
            self._cond.notify()
        finished = False
        try:
            while True:
                event = await job.queue.get()
                yield event
                if isinstance(event, GenerationDone):
                    finished = True
                    return
        finally:
            if not finished:
                # The reader went away (customer left, task cancelled): stop generating. The
                # key stays busy until the thread drops the row, at most one step later.
                job.cancelled = True
                with self._cond:
                    self._cond.notify()

    async def cancel(self, request_id: str) -> None:
        with self._cond:
            job = self._jobs.get(request_id)
            if job is not None:
                job.cancelled = True
                self._cond.notify()

    # --- management ---------------------------------------------------------------------

    def swap(self, loaded: LoadedModel) -> None:
        """Serve ``loaded`` to requests admitted from now on; running replies finish on their model."""
        with self._cond:
            self._loaded = loaded
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, let admitted and waiting ones finish, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def prefix_stats(self) -> dict[str, int]:
        """How much prefill the prefix cache saved: hits, tokens not recomputed, entries, bytes held."""
        caches = [batch.prefixes for batch in list(self._batches)]
        return {
            "hits": sum(c.hits for c in caches),
            "reused_tokens": sum(c.reused_tokens for c in caches),
            "entries": sum(len(c.entries) for c in caches),
            "bytes": sum(c.bytes for c in caches),
        }

    def is_busy(self, key: str) -> bool:
        """Whether a reply for ``key`` is queued or being generated."""
        with self._cond:
            return key in self._keys

    @property
    def running(self) -> int:
        """Rows in the running batches (replies being generated right now)."""
        return sum(len(batch.rows) for batch in self._batches)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="supportbot-generation", daemon=True)
            self._thread.start()

    # --- the generation thread --------------------------------------------------------------

    def _run(self) -> None:
        import torch

        torch.set_num_threads(self.num_threads)
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._waiting and not self.running and not self._closing:
                        self._cond.wait()
                    if self._closing and not self._waiting and not self.running:
                        self._thread = None
                        return
                    expired = self._take_expired()
                    room = self.max_batch_size - self.running
                    admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                    loaded = self._loaded
                for job, reason in expired:
                    self._finish_job(job, reason, reply=None, loaded=loaded)
                try:
                    if admitted:
                        self._admit(admitted, loaded)
                    for batch in list(self._batches):
                        self._step(batch)
                    self._batches = [b for b in self._batches if b.rows or b.loaded is self._loaded]
                except Exception as exc:  # noqa: BLE001 - the thread must survive to serve the next requests
                    log.exception("Generation step failed")
                    self._fail_all(f"{type(exc).__name__}: {exc}")

    def _take_expired(self) -> list[tuple[_Job, str]]:
        """Waiting jobs that were cancelled or ran out of time before a row was free (lock held)."""
        now = time.monotonic()
        expired, still = [], collections.deque()
        for job in self._waiting:
            if job.cancelled:
                expired.append((job, "cancelled"))
            elif now > job.deadline:
                expired.append((job, "timeout"))
            else:
                still.append(job)
        self._waiting = still
        return expired

    def _batch_for(self, loaded: LoadedModel) -> _Batch:
        for batch in self._batches:
            if batch.loaded is loaded:
                return batch
        batch = _Batch(loaded, self.prefix_cache_bytes)
        self._batches.append(batch)
        return batch

    def _admit(self, jobs: list[_Job], loaded: LoadedModel) -> None:
        """Prefill the prompts of newly admitted requests, together, and add them to the batch.

        Tokens a prompt shares with a cached earlier prompt (the conversation's last turn,
        or any conversation's system prompt) are not computed again. Each new reply's
        first token comes out of this prefill.
        """
        batch = self._batch_for(loaded)
        ready: list[_Prefill] = []
        for job in jobs:
            if job.cancelled or time.monotonic() > job.deadline:
                self._finish_job(job, "cancelled" if job.cancelled else "timeout", reply=None, loaded=loaded)
                continue
            reply = ReplyText(loaded.tokenizer, stop_sequences(loaded.tokenizer) + tuple(job.request.params.stop))
            try:
                max_prompt, max_new = token_budget(context_window(loaded), job.request.params.max_new_tokens)
                ids = prompt_ids_for(loaded, job.request.messages, max_prompt)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                log.exception("Building the prompt failed for %s", job.request.key)
                self._finish_job(job, "error", reply=reply, loaded=loaded, error=f"{type(exc).__name__}: {exc}")
                continue
            reused, layers = batch.prefixes.lookup(job.request.key, ids)
            row = _Row(job=job, reply=reply, max_new=max_new, cached=list(ids), position=len(ids))
            ready.append(_Prefill(row=row, reused=reused, layers=layers))
        # Prompts of similar length share a pass: prefill is compute-bound, so padding costs
        # as much as real tokens; a cap on padded tokens bounds one forward pass.
        ready.sort(key=lambda p: len(p.row.cached) - p.reused)
        group: list[_Prefill] = []
        real = 0
        for item in ready:
            new_tokens = len(item.row.cached) - item.reused
            padded = (len(group) + 1) * new_tokens  # sorted: the newcomer is the longest
            if group and (padded > self.prefill_tokens or padded > 1.25 * (real + new_tokens) + 64):
                self._prefill(group, batch)
                group, real = [], 0
            group.append(item)
            real += new_tokens
        if group:
            self._prefill(group, batch)

    def _prefill(self, group: list[_Prefill], batch: _Batch) -> None:
        """One forward pass over several prompts' uncached tokens (left-padded), then their first tokens."""
        loaded = batch.loaded
        try:
            logits, layers_per_row = _prefill_forward(loaded, group)
        except Exception as exc:  # noqa: BLE001 - these requests fail, the running batch goes on
            log.exception("Prefill failed for %d requests", len(group))
            for item in group:
                self._finish_job(
                    item.row.job, "error", reply=item.row.reply, loaded=loaded, error=f"{type(exc).__name__}: {exc}"
                )
            return
        self.prefills += 1
        self.prefilled_rows += len(group)
        tokens, logprobs = self._choose(logits, [item.row for item in group])
        joining = []
        for item, token, logprob, layers in zip(group, tokens, logprobs, layers_per_row, strict=True):
            if not self._accept(item.row, token, logprob, loaded):
                joining.append((item.row, layers))
            elif batch.prefixes.budget_bytes:
                batch.prefixes.store(item.row.job.request.key, item.row.cached, layers)
        if joining:
            batch.add(joining)

    def _step(self, batch: _Batch) -> None:
        """Drop rows that must stop, then advance every other row by one token."""
        import torch

        now = time.monotonic()
        keep = []
        for i, row in enumerate(batch.rows):
            if row.job.cancelled:
                self._finish_row(row, "cancelled", batch.loaded)
                self._remember(batch, i)
            elif now > row.job.deadline:
                self._finish_row(row, "timeout", batch.loaded)
                self._remember(batch, i)
            else:
                keep.append(i)
        batch.keep(keep)
        if not batch.rows:
            return
        device = batch.loaded.device
        input_ids = torch.tensor([[row.next_token] for row in batch.rows], device=device)
        positions = torch.tensor([[row.position] for row in batch.rows], device=device)
        mask = torch.cat([batch.mask, torch.ones((len(batch.rows), 1), dtype=batch.mask.dtype, device=device)], 1)
        logits, batch.cache = _forward(
            batch.loaded.model, batch.cache, input_ids=input_ids, attention_mask=mask, position_ids=positions
        )
        batch.mask = mask
        self.steps += 1
        for row in batch.rows:
            row.cached.append(row.next_token)
            row.position += 1
        tokens, logprobs = self._choose(logits[:, -1, :], batch.rows)
        keep = []
        for i, row in enumerate(batch.rows):
            if self._accept(row, tokens[i], logprobs[i], batch.loaded):
                self._remember(batch, i)
            else:
                keep.append(i)
        batch.keep(keep)

    def _remember(self, batch: _Batch, index: int) -> None:
        """Keep a finished row's keys and values for the conversation's next turn."""
        if batch.prefixes.budget_bytes:
            row = batch.rows[index]
            batch.prefixes.store(row.job.request.key, row.cached, batch.row_layers(index))

    @staticmethod
    def _choose(logits, rows: list[_Row]) -> tuple[list[int], list[float]]:
        """Each row's next token (greedy, or sampled with its temperature and top-p) and its log-probability.

        The log-probability is that of the model's own distribution (before temperature),
        the confidence measure the low-confidence handoff reads.
        """
        import torch

        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = torch.argmax(logits, dim=-1)
        for i, row in enumerate(rows):
            params = row.job.request.params
            if params.temperature > 0:
                chosen[i] = _sample(logits[i], params)
        picked = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
        return chosen.tolist(), picked.tolist()

    def _accept(self, row: _Row, token: int, logprob: float, loaded: LoadedModel) -> bool:
        """Take the row's next token; True when the row is finished (and has been told so)."""
        if math.isfinite(logprob):
            row.logprob_sum += logprob
            row.logprob_n += 1
        if token == loaded.tokenizer.eos_token_id:
            self._finish_row(row, "stop", loaded)
            return True
        row.count += 1
        if row.first_at is None:
            row.first_at = time.monotonic()
        delta = row.reply.push(token)
        if delta:
            row.job.emit(TokenDelta(delta))
        if row.reply.stopped:
            self._finish_row(row, "stop", loaded)
            return True
        if row.count >= row.max_new:
            self._finish_row(row, "length", loaded)
            return True
        row.next_token = token
        return False

    def _finish_row(self, row: _Row, reason: str, loaded: LoadedModel) -> None:
        self._finish_job(
            row.job,
            reason,
            reply=row.reply,
            loaded=loaded,
            count=row.count,
            mean_logprob=_mean(row.logprob_sum, row.logprob_n),
            first_at=row.first_at,
        )

    def _finish_job(
        self,
        job: _Job,
        reason: str,
        *,
        reply: ReplyText | None,
        loaded: LoadedModel | None,
        error: str = "",
        count: int = 0,
        mean_logprob: float | None = None,
        first_at: float | None = None,
    ) -> None:
        """Send the held-back tail and the final event; free the key first, so the next turn may start."""
        if reply is not None and not reply.stopped:
            tail = reply.flush()
            if tail:
                job.emit(TokenDelta(tail))
        with self._cond:
            self._keys.discard(job.request.key)
            self._jobs.pop(job.request.request_id, None)
        end = time.monotonic()
        job.emit(
            GenerationDone(
                text=reply.text if reply is not None else "",
                finish_reason=reason,
                token_count=count,
                mean_logprob=mean_logprob,
                model_label=loaded.label if loaded is not None else "",
                first_token_ms=int((first_at - job.submitted) * 1000) if first_at else None,
                latency_ms=int((end - job.submitted) * 1000),
                error=error,
            )
        )

    def _fail_all(self, error: str) -> None:
        """A batch step failed: every running row ends with an error; the engine starts afresh."""
        for batch in self._batches:
            for row in batch.rows:
                self._finish_job(
                    row.job,
                    "error",
                    reply=row.reply,
                    loaded=batch.loaded,
                    error=error,
                    count=row.count,
                    mean_logprob=_mean(row.logprob_sum, row.logprob_n),
                    first_at=row.first_at,
                )
        self._batches = []


def _sample(logits, params: GenerationParams) -> int:
    """One token from ``softmax(logits / temperature)``, restricted to the top-p nucleus."""
    import torch

    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1))
