"""The process's engine: serving the active version, reloading on promotion, building requests.

Real database rows (committed: the engine loads in worker threads), real channel
layers (in-memory, and Redis from another process), real tiny models.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer

from conversations.models import BotProfile
from finetune.models import ModelVersion
from finetune.serving.batched import BatchedEngine
from finetune.serving.loading import load_for_inference
from finetune.serving.naive import NaiveEngine
from finetune.serving.runtime import (
    MODELS_GROUP,
    areload,
    engine_reset,
    engine_status,
    get_engine,
    inference_reload,
    model_listener_stop,
    preload_start,
    served_engine,
)
from finetune.serving.safety import BLOCKED_MASK, SafeEngine
from tests.factories import ModelVersionFactory
from tests.finetune.serving.engine_models import (
    collect,
    conversation,
    load,
    request,
    tiny_gpt2_dir,
    tiny_llama_dir,
    wait_for,
)

pytestmark = pytest.mark.django_db(transaction=True)

IN_MEMORY = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


@pytest.fixture(autouse=True)
def fresh_engine():
    engine_reset()
    yield
    engine_reset()


@pytest.fixture
async def listening():
    """Stops this test's model listener, which lives on the test's own event loop."""
    yield
    await model_listener_stop()


def version(number: int, path, status=ModelVersion.Status.ACTIVE, **fields) -> ModelVersion:
    return ModelVersionFactory(number=number, status=status, merged_path=str(path), **fields)


def promote_now(new: ModelVersion, old: ModelVersion | None) -> None:
    """What a promotion leaves in the database (the fine-tuning issue's service does more)."""
    if old is not None:
        old.status = ModelVersion.Status.RETIRED
        old.save(update_fields=["status"])
    new.status = ModelVersion.Status.ACTIVE
    new.save(update_fields=["status"])


promote = sync_to_async(promote_now)


async def test_no_active_version_means_no_engine(listening):
    assert await get_engine() is None
    assert served_engine() is None


async def test_the_active_version_is_served_through_the_safety_filter(listening):
    await sync_to_async(version)(1, tiny_llama_dir())
    engine = await get_engine()
    assert isinstance(engine, SafeEngine)
    assert isinstance(served_engine(), BatchedEngine)
    assert engine.model_label == "v1"
    assert await get_engine() is engine  # one engine per process
    messages = conversation("Where is my order?")
    _, plain = await collect(served_engine(), request("raw", messages, max_new_tokens=40))
    word = max(plain.text.split(), key=lambda w: sum(c.isalpha() for c in w)).strip(".,!?")
    await sync_to_async(BotProfile.objects.create)(blocked_terms=f"{word}\n")

    deltas, done = await collect(engine, request("chat", messages, max_new_tokens=40))
    assert done.model_label == "v1"
    assert BLOCKED_MASK in done.text
    assert word not in "".join(deltas).split()


async def test_the_naive_engine_is_one_setting_away(settings, listening):
    settings.SUPPORTBOT_ENGINE = "naive"
    await sync_to_async(version)(1, tiny_gpt2_dir())
    engine = await get_engine()
    assert isinstance(served_engine(), NaiveEngine)
    _, done = await collect(engine, request("n", conversation("Hi"), max_new_tokens=5))
    assert (done.finish_reason, done.model_label) == ("length", "v1")


def test_inference_reload_swaps_to_the_newly_active_version():
    v1 = version(1, tiny_gpt2_dir())
    assert inference_reload() == "v1"
    engine = served_engine()
    v2 = version(2, tiny_gpt2_dir(seed=1), status=ModelVersion.Status.CANDIDATE)
    assert inference_reload() == "v1"  # nothing changed: nothing loaded
    promote_now(v2, v1)
    assert inference_reload() == "v2"
    assert served_engine() is engine  # the same engine, now serving the new model
    assert engine.model_label == "v2"


def test_a_failed_load_is_reported_and_the_old_version_kept(tmp_path):
    v1 = version(1, tiny_gpt2_dir())
    assert inference_reload() == "v1"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    v2 = version(2, broken, status=ModelVersion.Status.CANDIDATE)
    promote_now(v2, v1)
    with pytest.raises(OSError, match="not a valid JSON"):
        inference_reload()
    status = engine_status()
    assert (status["serving"], status["loading"]) == ("v1", None)
    assert status["error"].startswith("v2: ")
    assert served_engine().model_label == "v1"  # customers keep the old model


def test_preload_serves_the_active_version_before_any_request():
    assert engine_status() == {"serving": None, "loading": None, "error": None}
    version(1, tiny_gpt2_dir())
    preload_start().join(60)
    assert engine_status() == {"serving": "v1", "loading": None, "error": None}
    assert isinstance(served_engine(), BatchedEngine)


async def test_a_promotion_between_preload_and_the_first_chat_is_not_missed(listening):
    """Nobody listened for the event yet: the first chat checks the active version itself."""
    v1 = await sync_to_async(version)(1, tiny_gpt2_dir())
    await asyncio.to_thread(lambda: preload_start().join(60))
    v2 = await sync_to_async(version)(2, tiny_gpt2_dir(seed=1), status=ModelVersion.Status.CANDIDATE)
    await promote(v2, v1)
    engine = await get_engine()
    assert engine.model_label == "v2"
    assert engine_status()["serving"] == "v2"


async def test_a_broken_version_promoted_after_preload_leaves_the_old_one_serving(listening, tmp_path):
    v1 = await sync_to_async(version)(1, tiny_gpt2_dir())
    await asyncio.to_thread(lambda: preload_start().join(60))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    v2 = await sync_to_async(version)(2, broken, status=ModelVersion.Status.CANDIDATE)
    await promote(v2, v1)
    engine = await get_engine()  # the chat still gets an answer, from v1
    assert engine.model_label == "v1"
    assert engine_status()["error"].startswith("v2: ")


def test_preload_with_no_active_version_serves_nothing():
    preload_start().join(60)
    assert engine_status() == {"serving": None, "loading": None, "error": None}
    assert served_engine() is None


async def test_reload_keeps_running_replies_on_the_old_model(listening):
    v1 = await sync_to_async(version)(1, tiny_gpt2_dir())
    v2 = await sync_to_async(version)(2, tiny_gpt2_dir(seed=1), status=ModelVersion.Status.CANDIDATE)
    engine = await get_engine()
    messages = conversation("Where is my order?")
    old_model = load(tiny_gpt2_dir(), label="v1")
    new_model = load(tiny_gpt2_dir(seed=1), label="v2")
    # References through the same reply pipeline (a looping tiny model's reply is cut there).
    _, old_ref = await collect(SafeEngine(NaiveEngine(old_model)), request("r1", messages, max_new_tokens=120))
    _, new_ref = await collect(SafeEngine(NaiveEngine(new_model)), request("r2", messages, max_new_tokens=20))

    running = asyncio.create_task(collect(engine, request("in-flight", messages, max_new_tokens=120)))
    await wait_for(lambda: served_engine().steps >= 3)
    await promote(v2, v1)
    assert await areload() == "v2"
    _, after = await collect(engine, request("new-chat", messages, max_new_tokens=20))
    _, before = await running

    assert (before.model_label, before.finish_reason, before.text) == ("v1", old_ref.finish_reason, old_ref.text)
    assert (after.model_label, after.text) == ("v2", new_ref.text)


async def test_without_an_active_version_new_chats_get_none_and_running_ones_finish(listening):
    v1 = await sync_to_async(version)(1, tiny_gpt2_dir())
    engine = await get_engine()
    ref_engine = SafeEngine(NaiveEngine(load(tiny_gpt2_dir(), label="v1")))
    _, ref = await collect(ref_engine, request("ref", conversation("Hi"), max_new_tokens=60))
    running = asyncio.create_task(collect(engine, request("in-flight", conversation("Hi"), max_new_tokens=60)))
    await wait_for(lambda: served_engine().steps >= 3)
    v1.status = ModelVersion.Status.RETIRED
    await sync_to_async(v1.save)(update_fields=["status"])
    assert await areload() is None
    assert await get_engine() is None
    _, done = await running
    assert (done.model_label, done.finish_reason, done.text) == ("v1", ref.finish_reason, ref.text)


async def test_a_model_changed_event_reloads_the_engine(settings, listening):
    settings.CHANNEL_LAYERS = IN_MEMORY
    v1 = await sync_to_async(version)(1, tiny_gpt2_dir())
    v2 = await sync_to_async(version)(2, tiny_gpt2_dir(seed=1), status=ModelVersion.Status.CANDIDATE)
    await get_engine()
    await get_engine()
    layer = get_channel_layer()
    assert len(layer.groups[MODELS_GROUP]) == 1  # one listener per process, however often asked
    await promote(v2, v1)
    await layer.group_send(MODELS_GROUP, {"type": "model.changed", "version_id": v2.pk, "label": "v2"})
    await wait_for(lambda: served_engine().model_label == "v2", timeout=30)
    _, done = await collect(await get_engine(), request("c", conversation("Hi"), max_new_tokens=3))
    assert done.model_label == "v2"


async def test_a_model_changed_event_from_another_process_reloads_over_redis(redis_url, settings, listening):
    # A socket timeout above channels-redis's 5 s blocking read, as in settings on main.
    hosts = [{"address": redis_url, "socket_timeout": 30}]
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": hosts}}
    }
    v1 = await sync_to_async(version)(1, tiny_gpt2_dir())
    v2 = await sync_to_async(version)(2, tiny_gpt2_dir(seed=1), status=ModelVersion.Status.CANDIDATE)
    await get_engine()
    await promote(v2, v1)
    # What the fine-tuning side does after a promotion commits, from its own process.
    sender = (
        "import asyncio, sys\n"
        "from channels_redis.core import RedisChannelLayer\n"
        "layer = RedisChannelLayer(hosts=[sys.argv[1]])\n"
        "asyncio.run(layer.group_send('models', {'type': 'model.changed', 'version_id': int(sys.argv[2]),"
        " 'label': 'v2'}))\n"
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", sender, redis_url, str(v2.pk)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    await wait_for(lambda: served_engine().model_label == "v2", timeout=30)


async def test_an_adapter_without_a_merged_copy_is_merged_on_load(tmp_path, listening):
    import torch
    from peft import LoraConfig, get_peft_model

    base = load(tiny_gpt2_dir()).model
    torch.manual_seed(3)
    # init_lora_weights=False: random B as well as A, so the adapter changes the outputs.
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    load(tiny_gpt2_dir()).tokenizer.save_pretrained(adapter_dir)
    await sync_to_async(ModelVersionFactory)(number=1, status="active", adapter_path=str(adapter_dir), merged_path="")

    messages = conversation("Where is my order?")
    engine = await get_engine()
    _, served = await collect(engine, request("a", messages, max_new_tokens=20))
    _, base_reply = await collect(NaiveEngine(load(tiny_gpt2_dir())), request("b", messages, max_new_tokens=20))
    merged = peft_model.merge_and_unload()
    merged_loaded = load_for_inference(str(tiny_gpt2_dir()), label="m", device="cpu")
    merged_loaded.model = merged.eval()
    _, want = await collect(NaiveEngine(merged_loaded), request("c", messages, max_new_tokens=20))
    assert served.text == want.text
    assert served.mean_logprob == pytest.approx(want.mean_logprob, abs=1e-4)
    # The adapter was applied, not ignored: the base model is surer of the same tokens.
    assert abs(served.mean_logprob - base_reply.mean_logprob) > 0.01


# --- the prompt ---------------------------------------------------------------------------------


def test_system_prompt_carries_company_name_and_policy_in_chat_and_training():
    from conversations.selectors import system_prompt_for
    from finetune.selectors import training_system_prompt

    profile = BotProfile.objects.create(company_name="Globex", policy_text="Refunds within 30 days.\n")
    text = system_prompt_for(profile)
    assert text.startswith("You are the customer support assistant of Globex.")
    assert text.endswith("\n\nPolicies:\nRefunds within 30 days.")
    assert "{company}" not in text
    assert training_system_prompt() == text  # the model learns the prompt it is later given
    assert system_prompt_for(BotProfile(company_name="Globex")).endswith("with a human agent.")


def test_reply_params_take_their_limits_from_settings(settings):
    from conversations.replies import generation_params

    settings.SUPPORTBOT_MAX_NEW_TOKENS = 42
    settings.SUPPORTBOT_STOP_SEQUENCES = ["\nBest regards"]
    settings.SUPPORTBOT_GENERATION_TIMEOUT_S = 7.5
    params = generation_params()
    assert (params.max_new_tokens, params.stop, params.timeout_s) == (42, ("\nBest regards",), 7.5)
    assert params.temperature == 0.0
