"""The batched engine's KV cache layers (``finetune.serving.kv.GrowingLayer``): a decode step
writes its column in place, a tensor handed to the cache is never written to, and a model
run on the growing cache computes what it computes on transformers' own."""

from __future__ import annotations

import torch

from finetune.serving.kv import forward, new_cache
from tests.finetune.serving.engine_models import load, tiny_gpt2_dir


def test_decode_steps_write_in_place_until_the_spare_columns_run_out():
    loaded = load(tiny_gpt2_dir(), label="v1")
    cache = new_cache(loaded.model)
    layer = cache.layers[0]
    _, cache = forward(loaded.model, cache, input_ids=torch.tensor([[5, 6, 7, 8]]))
    buffer = layer._k.data_ptr()  # noqa: SLF001 - the property under test
    for step in range(layer.SPARE):
        _, cache = forward(loaded.model, cache, input_ids=torch.tensor([[9 + step % 50]]))
        assert layer._k.data_ptr() == buffer  # noqa: SLF001 - no copy of the cache per step
    assert layer.keys.shape[-2] == 4 + layer.SPARE
    _, cache = forward(loaded.model, cache, input_ids=torch.tensor([[3]]))
    assert layer._k.data_ptr() != buffer  # noqa: SLF001 - full: reallocated with spare columns again
    assert layer.keys.shape[-2] == layer.values.shape[-2] == 5 + layer.SPARE


def test_an_assigned_tensor_is_adopted_but_never_written_to():
    loaded = load(tiny_gpt2_dir(), label="v1")
    cache = new_cache(loaded.model)
    _, cache = forward(loaded.model, cache, input_ids=torch.tensor([[5, 6, 7]]))
    layer = cache.layers[0]
    kept_keys, kept_values = layer.keys.clone(), layer.values.clone()
    given_keys, given_values = kept_keys.clone(), kept_values.clone()
    layer.keys, layer.values = given_keys, given_values  # as KVBatch.add/keep assign rows
    _, cache = forward(loaded.model, cache, input_ids=torch.tensor([[8]]))
    assert torch.equal(given_keys, kept_keys)
    assert torch.equal(given_values, kept_values)
    assert layer.keys.shape[-2] == layer.values.shape[-2] == 4


def test_logits_on_the_growing_cache_equal_those_on_transformers_own():
    from transformers import DynamicCache

    loaded = load(tiny_gpt2_dir(), label="v1")
    ids = [5, 6, 7, 8, 9]
    results = []
    for cache in (new_cache(loaded.model), DynamicCache(config=loaded.model.config)):
        logits, cache = forward(loaded.model, cache, input_ids=torch.tensor([ids[:3]]))
        steps = [logits[:, -1]]
        for token in ids[3:]:
            logits, cache = forward(loaded.model, cache, input_ids=torch.tensor([[token]]))
            steps.append(logits[:, -1])
        results.append(torch.cat(steps))
    torch.testing.assert_close(results[0], results[1])
