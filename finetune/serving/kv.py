"""The key/value caches of batched decoding: one left-padded cache per batch, and a prefix cache.

- ``KVBatch``: the rows decoding together on one model, with their shared KV cache.
- ``PrefixCache``: keys and values of recently finished replies, so a follow-up turn
  (or any prompt starting with the shared system prompt) prefills only its new tokens.
- ``prefill_forward``: one padded forward pass over several prompts' uncached tokens.
- ``forward``: one forward pass with a cache, under either transformers naming, that
  stops between two layers when asked (``Preempted``; ``cache_mark``/``cache_rewind``).
- ``GrowingLayer``: a cache layer with spare columns, so a decode step writes its token's
  keys and values in place instead of copying the whole cache (transformers' own
  ``DynamicLayer`` concatenates: at 4 rows of 1,536 tokens that copy was half a step).

Used by the batched engine's runner only (``finetune.serving.batched``). Plain Python:
no Django.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

from .loading import LoadedModel


class KVBatch:
    """The rows decoding together on one model, with their shared, left-padded KV cache.

    Every row's cached keys and values end at the same column; shorter rows are padded
    on the left and ``mask`` (1 = real token) hides the padding from attention. Position
    ids are passed per row, so padding does not shift a row's positions: a row computes
    what it would compute alone (GPT-2's absolute positions and Llama's rotary ones alike).
    """

    def __init__(self, loaded: LoadedModel, prefix_cache_bytes: int = 0):
        self.loaded = loaded
        self.rows: list = []  # the runner's rows; each one's ``cached`` lists the token ids held here
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

    def add(self, items: list[tuple[Any, list]]) -> None:
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


class Preempted(Exception):  # noqa: N818 - an outcome, not an error
    """A forward pass stopped between two decoder layers because ``preempt()`` said so."""


def forward(model, cache, *, preempt: Callable[[], bool] | None = None, **kwargs):
    """One forward pass with the KV cache; returns ``(logits, cache)``.

    transformers 5.x names the cache argument and output ``cache`` (``past_key_values``
    is deprecated); 4.x names both ``past_key_values``. Both are supported.

    With ``preempt``, the pass asks it before each decoder layer and raises ``Preempted``
    when it returns True: on a CPU a pass cannot be interrupted otherwise, and a new
    customer would wait for all of it. The layers before the stop have written their
    keys and values into ``cache``: throw the cache away, or rewind it (``cache_mark``).
    """
    name = _cache_argument(type(model))
    hooks = []
    if preempt is not None:
        owner = threading.get_ident()

        def check(_module, _args):
            # Only this pass: another thread running the same model meanwhile is not stopped.
            if threading.get_ident() == owner and preempt():
                raise Preempted

        hooks = [layer.register_forward_pre_hook(check) for layer in decoder_layers(model)]
    try:
        out = model(**kwargs, **({name: cache} if cache is not None else {}), use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    return out.logits, getattr(out, name)


def decoder_layers(model) -> list:
    """The model's stack of decoder layers (Llama's ``model.layers``, GPT-2's ``transformer.h``):
    the first module list with as many modules as the config has hidden layers; [] if none."""
    import torch

    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return list(module)
    return []


def cache_mark(cache) -> list[int] | None:
    """Each layer's cached length, to rewind ``cache`` to after a preempted pass; None when a
    layer cannot be rewound (only ``GrowingLayer`` can: its buffers keep the earlier columns)."""
    growing = _GrowingLayer
    if cache is None or growing is None or not all(type(layer) is growing for layer in cache.layers):
        return None
    return [layer._kn for layer in cache.layers]  # noqa: SLF001 - GrowingLayer is ours


def cache_rewind(cache, mark: list[int]) -> None:
    """Forget what a preempted pass wrote into ``cache`` after ``cache_mark`` gave ``mark``."""
    for layer, length in zip(cache.layers, mark, strict=True):
        layer._kn = layer._vn = length  # noqa: SLF001 - GrowingLayer is ours


_cache_arguments: dict[type, str] = {}


def _cache_argument(model_class: type) -> str:
    if model_class not in _cache_arguments:
        import inspect

        parameters = inspect.signature(model_class.forward).parameters
        _cache_arguments[model_class] = "cache" if "cache" in parameters else "past_key_values"
    return _cache_arguments[model_class]


def _growing_layer_class():
    """``GrowingLayer``, defined on first use (transformers is imported lazily here)."""
    global _GrowingLayer
    if _GrowingLayer is None:
        from transformers.cache_utils import DynamicLayer

        class GrowingLayer(DynamicLayer):
            """A ``DynamicLayer`` whose keys and values live in buffers with ``SPARE`` free columns.

            ``update`` writes the new columns in place and returns views of the filled part;
            only when the spare columns run out are the buffers reallocated (with ``SPARE``
            free again), so a decode step no longer copies the whole cache. Assigning
            ``keys`` / ``values`` (as ``KVBatch`` does when rows join or leave) adopts the
            tensor as a full buffer: the next update reallocates before writing, so a tensor
            someone else holds (a prefix cache entry, a row's copy) is never written to.
            """

            SPARE = 128

            def __init__(self, *args, **kwargs):
                self._k = self._v = None
                self._kn = self._vn = 0  # filled columns of each buffer (set separately: see the setters)
                super().__init__(*args, **kwargs)

            @staticmethod
            def _filled(buffer, n: int):
                return buffer if buffer is None or buffer.dim() != 4 else buffer[:, :, :n]

            @staticmethod
            def _length(value) -> int:
                return value.shape[-2] if value is not None and value.dim() == 4 else 0

            @property
            def keys(self):
                return self._filled(self._k, self._kn)

            @keys.setter
            def keys(self, value):
                self._k, self._kn = value, self._length(value)

            @property
            def values(self):
                return self._filled(self._v, self._vn)

            @values.setter
            def values(self, value):
                self._v, self._vn = value, self._length(value)

            def update(self, key_states, value_states, *args, **kwargs):
                import torch

                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                n, new = self._kn, key_states.shape[-2]
                if self._k is None or self._k.dim() != 4 or n + new > min(self._k.shape[-2], self._v.shape[-2]):
                    batch, heads, _, dim = key_states.shape
                    shape = (batch, heads, n + new + self.SPARE, dim)
                    k = torch.empty(shape, dtype=key_states.dtype, device=key_states.device)
                    v = torch.empty(shape, dtype=value_states.dtype, device=value_states.device)
                    if n:
                        k[:, :, :n] = self._k[:, :, :n]
                        v[:, :, :n] = self._v[:, :, :n]
                    self._k, self._v = k, v
                self._k[:, :, n : n + new] = key_states
                self._v[:, :, n : n + new] = value_states
                self._kn = self._vn = n + new
                return self.keys, self.values

        _GrowingLayer = GrowingLayer
    return _GrowingLayer


_GrowingLayer = None


def new_cache(model):
    """An empty cache for ``model`` whose full-attention layers grow in place (``GrowingLayer``)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        growing = _growing_layer_class()
        cache.layers = [growing() for _ in cache.layers]
    return cache


def _cache_from(model, layers: list, length: int):
    """A fresh cache holding the first ``length`` positions of cached ``layers`` (copies)."""
    cache = new_cache(model)
    for index, (keys, values) in enumerate(layers):
        cache.update(keys[:, :, :length, :], values[:, :, :length, :], index)
    return cache


def prefill_forward(
    loaded: LoadedModel,
    ids: list[list[int]],
    reused: list[int],
    prefixes: list[list | None],
    *,
    preempt: Callable[[], bool] | None = None,
) -> tuple[object, list[list]]:
    """Run the uncached tokens of several prompts; returns last-token logits and each prompt's keys/values.

    ``ids`` are the prompts' token ids; the first ``reused[i]`` of prompt ``i`` have their
    keys/values in ``prefixes[i]`` (from the prefix cache), the rest are computed here.

    A single prompt runs alone, unpadded, exactly as ``model.generate`` would run it.
    Several are laid out as ``[pad | cached prefix | pad | new tokens]`` per row, with
    explicit position ids and a 4D attention mask: every real token sees its own prefix
    and earlier new tokens only, and each padding query sees itself, so no attention row
    is empty. Each row's keys/values are then cut out without the padding.

    ``preempt`` may stop the pass (``Preempted``, see ``forward``): nothing is kept, the
    prefixes are untouched (the pass works on copies), so the same call can be made again.
    """
    import torch

    device = loaded.device
    new = [len(row_ids) - r for row_ids, r in zip(ids, reused, strict=True)]
    prefix_width, new_width = max(reused), max(new)
    cache = None
    if prefix_width:
        cache = _cache_from(loaded.model, _stack_prefixes(reused, prefixes, prefix_width), prefix_width)
    pad_id = loaded.tokenizer.pad_token_id or 0
    input_ids = torch.tensor(
        [[pad_id] * (new_width - n) + row_ids[r:] for row_ids, r, n in zip(ids, reused, new, strict=True)],
        device=device,
    )
    positions = torch.tensor(
        [[r] * (new_width - n) + list(range(r, r + n)) for r, n in zip(reused, new, strict=True)], device=device
    )
    kwargs = {}
    if len(ids) > 1:
        kwargs["attention_mask"] = _prefill_mask(loaded, reused, new, prefix_width, new_width)
    logits, cache = forward(
        loaded.model, cache, preempt=preempt, input_ids=input_ids, position_ids=positions, logits_to_keep=1, **kwargs
    )
    total = prefix_width + new_width
    rows = []
    for j, (r, n) in enumerate(zip(reused, new, strict=True)):
        layers = []
        for layer in cache.layers:
            k, v = layer.keys[j : j + 1], layer.values[j : j + 1]
            if len(ids) == 1 and r == prefix_width:
                layers.append((k, v))  # no padding to cut
                continue
            keep = list(range(prefix_width - r, prefix_width)) + list(range(total - n, total))
            index = torch.tensor(keep, device=device)
            layers.append((k.index_select(2, index), v.index_select(2, index)))
        rows.append(layers)
    return logits[:, -1, :], rows


def _stack_prefixes(reused: list[int], prefixes: list[list | None], width: int) -> list:
    """The first ``reused[i]`` positions of each ``prefixes[i]``, as one left-padded batch per layer."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - PyTorch's own convention

    template = next(layers for layers in prefixes if layers)
    stacked = []
    for index, (k0, v0) in enumerate(template):
        keys, values = [], []
        for layers, r in zip(prefixes, reused, strict=True):
            if layers:
                k, v = layers[index]
                k, v = k[:, :, :r], v[:, :, :r]
            else:
                k = k0.new_zeros((1, k0.shape[1], 0, k0.shape[3]))
                v = v0.new_zeros((1, v0.shape[1], 0, v0.shape[3]))
            keys.append(F.pad(k, (0, 0, width - r, 0)))
            values.append(F.pad(v, (0, 0, width - r, 0)))
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
