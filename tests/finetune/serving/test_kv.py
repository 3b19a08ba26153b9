"""The batched engine's KV cache layers (``finetune.serving.kv.GrowingLayer``): a decode step
writes its column in place, a tensor handed to the cache is never written to, a model
run on the growing cache computes what it computes on transformers' own, and a pass
stopped between two layers (``Preempted``) can be rewound and run again."""

from __future__ import annotations

import pytest
import torch

from finetune.serving.kv import Preempted, cache_mark, cache_rewind, decoder_layers, forward, new_cache
from tests.finetune.serving.engine_models import load, tiny_gpt2_dir, tiny_llama_dir


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


@pytest.mark.parametrize("model_dir", [tiny_gpt2_dir, tiny_llama_dir], ids=["gpt2", "llama"])
def test_a_pass_stopped_between_layers_rewinds_and_runs_again_to_the_same_logits(model_dir):
    loaded = load(model_dir(), label="v1")
    model = loaded.model
    assert len(decoder_layers(model)) == model.config.num_hidden_layers >= 2
    cache = new_cache(model)
    _, cache = forward(model, cache, input_ids=torch.tensor([[5, 6, 7, 8]]))
    reference = new_cache(model)
    _, reference = forward(model, reference, input_ids=torch.tensor([[5, 6, 7, 8]]))
    want, _ = forward(model, reference, input_ids=torch.tensor([[9]]))

    asked = []

    def preempt() -> bool:  # stop before the second layer: the first has written its column
        asked.append(1)
        return len(asked) == 2

    mark = cache_mark(cache)
    assert mark == [4] * len(cache.layers)
    with pytest.raises(Preempted):
        forward(model, cache, preempt=preempt, input_ids=torch.tensor([[9]]))
    assert cache.layers[0].keys.shape[-2] == 5  # the stopped pass wrote into the first layer
    cache_rewind(cache, mark)
    assert [layer.keys.shape[-2] for layer in cache.layers] == mark
    got, cache = forward(model, cache, preempt=lambda: False, input_ids=torch.tensor([[9]]))
    assert torch.equal(got, want)
    assert all(not layer._forward_pre_hooks for layer in decoder_layers(model))  # noqa: SLF001 - hooks removed


def test_a_cache_of_transformers_own_layers_cannot_be_rewound():
    from transformers import DynamicCache

    loaded = load(tiny_gpt2_dir(), label="v1")
    _, cache = forward(loaded.model, DynamicCache(config=loaded.model.config), input_ids=torch.tensor([[5, 6]]))
    assert cache_mark(cache) is None
    assert cache_mark(None) is None


def test_a_pass_is_stopped_only_in_its_own_thread():
    """The stop hooks sit on the model's layers while a pass runs; another thread running the
    same model meanwhile (an evaluation, a second engine) must not be stopped by them."""
    import threading

    model = load(tiny_gpt2_dir(), label="v1").model
    own = threading.get_ident()
    other_failed: list[Exception] = []

    def other_pass() -> None:
        try:
            forward(model, None, input_ids=torch.tensor([[5, 6, 7]]))
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            other_failed.append(exc)

    def preempt() -> bool:
        if threading.get_ident() == own and not hasattr(preempt, "ran"):
            preempt.ran = True
            thread = threading.Thread(target=other_pass)
            thread.start()  # runs a whole pass while this one's hooks are on the layers
            thread.join(30)
        return threading.get_ident() != own  # "someone waits", as seen from the other thread

    forward(model, None, preempt=preempt, input_ids=torch.tensor([[5, 6, 7]]))
    assert preempt.ran
    assert other_failed == []
