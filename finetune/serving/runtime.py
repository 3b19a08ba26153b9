"""The process's inference engine, serving the active model version (Django glue).

The only module of ``finetune.serving`` that reads settings and the database; the
engines it runs are plain Python.

- ``get_engine()`` returns this process's engine, loading the active ``ModelVersion``
  on first use, or None when no version is active (the chat then says so and offers
  a human). What it returns is wrapped in the safety filter (``finetune.serving.safety``):
  every delta a consumer streams is already masked and its template slots filled; the
  blocked terms and the company's facts come from the chat app through ``finetune.providers``.
- Grounding: when the served version has a retrieval index, each reply's request is
  grounded on it before it reaches the engine (``finetune.serving.grounded``), and the
  reply policy decides, on the model's first sentence, whether its words or a retrieved
  answer go out (``_reply_plan``).
- ``SUPPORTBOT_ENGINE`` picks the engine: ``batched`` (default, ``BatchedEngine``),
  ``naive`` (``NaiveEngine``, one ``generate()`` at a time) or ``vllm`` (``VLLMEngine``:
  the vLLM servers of ``SUPPORTBOT_VLLM_URLS`` generate; this process loads only the
  version's tokenizer, and a version change is a change of served name).
  ``vllm_servers()`` is the process's view of those servers, shared with the promotion
  service (which makes a version's name live on every server first) and ``/healthz``.
- Reloads: after a promotion or rollback commits, the fine-tuning side sends
  ``{"type": "model.changed", "version_id": ..., "label": ...}`` to the channel-layer
  group ``models``. Each process listens with a task of its own (started by the first
  ``get_engine()`` on an event loop), loads the now active version in a worker thread,
  and swaps it in: replies already running finish on the old model, new ones use the
  new model. ``inference_reload()`` does the same when called directly.
- The event alone does not reach every process: the in-memory channel layer (the
  embedded default) is per process, so a promotion made by the Celery worker never
  reaches daphne that way, and any layer drops messages. Beside the listener, a watcher
  reads the active version's id every ``SUPPORTBOT_MODEL_CHECK_S`` seconds (one
  indexed query) and reloads when it differs from what this process serves. Both start
  with the server (``supportbot/asgi.py``) and with the first ``get_engine()``.
- Preload: ``preload_start()`` (called by ``supportbot/asgi.py`` when the server starts)
  loads the active version in a background thread, so the first customer after a
  restart does not wait for the load. ``engine_status()`` says what this process
  serves, is loading, or failed to load (shown by ``/healthz``).
- ``generation_params()``: the reply limits from settings. The chat builds the prompt
  (``conversations.selectors.prompt_messages``); the engine trims it to the context window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from asgiref.sync import sync_to_async
from django.conf import settings

from finetune.providers import chat_data
from finetune.services.model_versions import MODEL_CHANGED_EVENT, MODEL_EVENTS_GROUP

from .batched import BatchedEngine
from .grounded import ground_request, reply_decider
from .interface import Engine, GenerationParams, GenerationRequest
from .loading import LoadedModel, load_for_inference
from .naive import NaiveEngine
from .safety import ReplyPlan, SafeEngine, reply_maskers
from .vllm import VLLMEngine, VLLMServers, served_version

log = logging.getLogger(__name__)

# The promotion services send this event to this group after a promotion or rollback commits.
MODELS_GROUP = MODEL_EVENTS_GROUP
MODEL_CHANGED = MODEL_CHANGED_EVENT
# channels-redis forgets group members after a day (group_expiry); re-joining hourly keeps
# a long-running process subscribed.
_GROUP_REFRESH_S = 3600

_engine = None  # BatchedEngine, NaiveEngine or VLLMEngine, the model's owner
_vllm_servers: VLLMServers | None = None
_safe_engine: SafeEngine | None = None  # what get_engine() hands out
_engine_version_id: int | None = None
_engine_label: str | None = None
_state_lock = threading.Lock()  # guards the four above
_loading_label: str | None = None  # the version being loaded now, if any
_load_error: str | None = None  # why the last load failed (cleared by the next success)
_failed_version_id: int | None = None  # the version whose load failed; the watcher does not retry it
_preloading = threading.Event()  # set while preload_start()'s thread runs (before it knows the label too)
_load_lock = threading.Lock()  # one model load at a time, so the last promotion wins

_listener: asyncio.Task | None = None
_listener_ready: asyncio.Future | None = None
_watcher: asyncio.Task | None = None


# --- the engine ------------------------------------------------------------------------


def vllm_servers() -> VLLMServers:
    """The vLLM servers of ``SUPPORTBOT_VLLM_URLS`` (one object per process, so all replies share who is down)."""
    global _vllm_servers
    urls = tuple(url.rstrip("/") for url in settings.SUPPORTBOT_VLLM_URLS)
    with _state_lock:
        if _vllm_servers is None or _vllm_servers.urls != urls:
            _vllm_servers = VLLMServers(
                urls,
                read_timeout_s=settings.SUPPORTBOT_VLLM_READ_TIMEOUT_S,
                load_timeout_s=settings.SUPPORTBOT_VLLM_LOAD_TIMEOUT_S,
            )
        return _vllm_servers


def _vllm_load(version):
    """What a web process needs to serve ``version`` on vLLM: its served name, and its tokenizer and
    knowledge (retrieval index, grounding, reply policy) in a ``LoadedModel`` without weights."""
    from transformers import AutoTokenizer

    from finetune.ml.knowledge import load_knowledge

    served = served_version(label=version.label, adapter_path=version.adapter_path, merged_path=version.merged_path)
    tokenizer = AutoTokenizer.from_pretrained(served.files)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    knowledge = load_knowledge(version.merged_path or version.adapter_path)
    loaded = LoadedModel(
        model=None,
        tokenizer=tokenizer,
        label=version.label,
        decoding=knowledge.decoding_or_default,
        grounding=knowledge.grounding_or_default,
        reply_policy=knowledge.policy_or_default,
        index=knowledge.index,
    )
    return served, loaded, vllm_servers().max_model_len(served.name)


def _make_engine(loaded):
    if settings.SUPPORTBOT_ENGINE == "naive":
        return NaiveEngine(loaded)
    return BatchedEngine(
        loaded,
        max_batch_size=settings.SUPPORTBOT_MAX_BATCH_SIZE,
        prefix_cache_mb=settings.SUPPORTBOT_PREFIX_CACHE_MB,
        prefill_tokens=settings.SUPPORTBOT_PREFILL_TOKENS_PER_STEP,
        prefill_whole_tokens=settings.SUPPORTBOT_PREFILL_WHOLE_TOKENS,
    )


def inference_reload() -> str | None:
    """Serve the active model version: load it if it is not the one served, and swap it in.

    Blocking (loading takes seconds): call it from a thread, never on the event loop
    (``areload()`` does). Returns the label served, or None when no version is active;
    then new requests get no engine while replies already running finish. A failed load
    raises, leaves whatever was served in place, and is reported by ``engine_status()``.
    """
    global _engine, _safe_engine, _engine_version_id, _engine_label, _loading_label, _load_error, _failed_version_id
    from finetune.selectors import model_version_active

    with _load_lock:
        # Read inside the lock: when two promotions race, the load that runs last reads
        # the version that is active last.
        version = model_version_active()
        if version is None:
            with _state_lock:
                old, _engine, _safe_engine = _engine, None, None
                _engine_version_id = _engine_label = _load_error = None
            if old is not None:
                old.close(timeout=0)  # finishes what runs, then its thread ends
            return None
        with _state_lock:
            if _engine is not None and _engine_version_id == version.pk:
                return version.label
        path = version.merged_path or version.adapter_path
        log.info("Loading model %s from %s", version.label, path)
        _loading_label = version.label
        vllm = settings.SUPPORTBOT_ENGINE == "vllm"
        try:
            if vllm:
                served, knowledge_only, max_len = _vllm_load(version)
            else:
                loaded = load_for_inference(path, label=version.label, int8=settings.SUPPORTBOT_INT8)
        except Exception as exc:
            _load_error = f"{version.label}: {type(exc).__name__}: {exc}"
            _failed_version_id = version.pk
            raise
        finally:
            _loading_label = None
        with _state_lock:
            if vllm and isinstance(_engine, VLLMEngine):
                _engine.swap(served, knowledge_only, max_model_len=max_len)
            elif vllm:
                old, _engine = _engine, VLLMEngine(_vllm_servers, served, knowledge_only, max_model_len=max_len)
                _safe_engine = SafeEngine(_engine, plan_for=_reply_plan)
                if old is not None:
                    old.close(timeout=0)
            elif _engine is None or isinstance(_engine, VLLMEngine):
                _engine = _make_engine(loaded)
                _safe_engine = SafeEngine(_engine, plan_for=_reply_plan)
            else:
                _engine.swap(loaded)
            _engine_version_id, _engine_label, _load_error = version.pk, version.label, None
            _failed_version_id = None
        log.info("Serving model %s", version.label)
        return version.label


def _reload_in_worker() -> str | None:
    from django.db import connections

    try:
        return inference_reload()
    finally:
        connections.close_all()  # this worker thread's own connections only


def preload_start() -> threading.Thread:
    """Load the active version in a daemon thread now (server start), not on the first reply.

    A failure is logged and left in ``engine_status()``; the first reply then tries again.
    """

    def preload() -> None:
        try:
            label = _reload_in_worker()
        except Exception:
            log.exception("Preloading the active model version failed; the first reply will try again")
            return
        finally:
            _preloading.clear()
        if label is None:
            log.info("No model version is active; nothing to preload")

    _preloading.set()

    thread = threading.Thread(target=preload, name="supportbot-model-preload", daemon=True)
    thread.start()
    return thread


def engine_status() -> dict:
    """What this process serves: ``{"serving": label|None, "loading": label|None, "error": str|None}``.

    With the vLLM engine, also the name replies are requested under (``"vllm_model"``).
    """
    with _state_lock:
        serving = _engine_label if _engine is not None else None
        status = {"serving": serving, "loading": _loading_label, "error": _load_error}
        if isinstance(_engine, VLLMEngine):
            status["vllm_model"] = _engine.version.name
    return status


def vllm_health(*, timeout_s: float = 3.0) -> list[dict] | None:
    """Each configured vLLM server and the names it lists (None with an in-process engine); all are
    asked at once, and one that has not answered within ``timeout_s`` is reported as down."""
    if settings.SUPPORTBOT_ENGINE != "vllm":
        return None
    return vllm_servers().health(timeout_s=timeout_s)


def engine_converged(active_label: str | None) -> tuple[bool, str]:
    """Whether this process serves the active version (``active_label``) or says it is loading it; and why not.

    A process that loads on the first reply (``SUPPORTBOT_PRELOAD_MODEL`` off) and has
    served nothing yet counts as converged: its first reply loads the active version.
    """
    status = engine_status()
    if status["serving"] == active_label or (active_label is not None and status["loading"] == active_label):
        return True, ""
    if status["serving"] is None and status["error"] is None and _preloading.is_set():
        return True, "Loading the active version (the server is starting)."
    if status["error"]:
        return False, "The active version could not be loaded here (see error); the next reply tries again."
    if active_label is None:
        return False, f"No version is active but this process still serves {status['serving']}."
    if status["serving"] is None and status["loading"] is None and not settings.SUPPORTBOT_PRELOAD_MODEL:
        return True, "Loads the active version on the first reply (SUPPORTBOT_PRELOAD_MODEL is off)."
    served = status["serving"] or "nothing"
    return False, f"This process serves {served}, not the active {active_label}; it switches within seconds."


async def areload() -> str | None:
    """``inference_reload()`` in a worker thread (loading a model must not block the event loop)."""
    return await sync_to_async(_reload_in_worker, thread_sensitive=False)()


async def get_engine() -> Engine | None:
    """This process's engine (safety-filtered), or None when no model version is active."""
    try:
        started = await model_listener_start()
    except Exception:  # the chat still works; only promotions wait for a restart (or the next try)
        log.exception("Could not listen for model changes on the channel layer")
        started = False
    if _safe_engine is None:
        await areload()
    elif started:
        # Just started listening: a promotion made before (after the preload, say) sent
        # its event to nobody here, so check the active version once now. If that version
        # cannot be loaded, the one already loaded goes on serving (engine_status says why).
        try:
            await areload()
        except Exception:
            log.exception("Loading the newly active model version failed; still serving %s", _engine_label)
    return _safe_engine


def engine_reset() -> None:
    """Forget the engine, so the next ``get_engine()`` loads the active version afresh.

    Replies already running on the old engine still finish; its thread then ends.
    """
    global _engine, _safe_engine, _engine_version_id, _engine_label, _load_error, _failed_version_id
    with _state_lock:
        old, _engine, _safe_engine, _engine_version_id, _engine_label = _engine, None, None, None, None
        _load_error = _failed_version_id = None
    if old is not None:
        old.close(timeout=0)


def served_engine():
    """The unwrapped engine (``BatchedEngine`` or ``NaiveEngine``) or None; for tests and admin pages."""
    return _engine


# --- listening for promotions and rollbacks -------------------------------------------


async def model_listener_start() -> bool:
    """Start, once per event loop, the task that reloads on ``model.changed`` and the watcher
    of the active version; returns once the listener listens.

    True when this call started it (so events sent before were missed).
    """
    global _listener, _listener_ready, _watcher
    loop = asyncio.get_running_loop()
    started = False
    if _watcher is None or _watcher.done() or _watcher.get_loop() is not loop:
        _watcher = loop.create_task(_watch_active_version(), name="supportbot-model-watcher")
    if _listener is None or _listener.done() or _listener.get_loop() is not loop:
        _listener_ready = loop.create_future()
        _listener = loop.create_task(_listen(_listener_ready), name="supportbot-model-listener")
        started = True
    await asyncio.shield(_listener_ready)
    return started


async def model_listener_stop() -> None:
    """Stop this loop's listener (tests; a server simply exits)."""
    global _listener, _watcher
    watcher, _watcher = _watcher, None
    if watcher is not None and not watcher.done() and watcher.get_loop() is asyncio.get_running_loop():
        watcher.cancel()
        await asyncio.wait({watcher}, timeout=10)
    task, _listener = _listener, None
    if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
        # The flag as well as the cancel: redis-py may turn a cancellation inside a read
        # into an error of its own, which the listener would otherwise retry.
        task.stop_requested = True
        task.cancel()
        await asyncio.wait({task}, timeout=10)


async def _listen(ready: asyncio.Future) -> None:
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        log.warning("No channel layer: model promotions will not reach this process until it restarts.")
        ready.set_result(None)
        return
    try:
        channel = await layer.new_channel()
        await layer.group_add(MODELS_GROUP, channel)
    except Exception as exc:
        if not ready.done():
            ready.set_exception(exc)
        raise
    ready.set_result(None)
    refresher = asyncio.get_running_loop().create_task(_keep_membership(layer, channel))
    try:
        while True:
            try:
                message = await layer.receive(channel)
            except Exception:
                # redis-py can turn a cancellation into its own TimeoutError: stop when asked to.
                current = asyncio.current_task()
                if current.cancelling() or getattr(current, "stop_requested", False):
                    raise asyncio.CancelledError from None
                log.exception("Receiving model changes failed; listening again in 1 s")
                await asyncio.sleep(1)
                continue
            if message.get("type") != MODEL_CHANGED:
                continue
            log.info("Model changed to %s: reloading", message.get("label") or message.get("version_id"))
            try:
                await areload()
            except Exception:  # a failed load keeps the old model serving; the next event retries
                log.exception("Reloading the model after %s failed", message)
    finally:
        refresher.cancel()
        with contextlib.suppress(Exception):
            await layer.group_discard(MODELS_GROUP, channel)


def _active_version_id() -> int | None:
    from finetune.models import ModelVersion

    return ModelVersion.objects.filter(status=ModelVersion.Status.ACTIVE).values_list("pk", flat=True).first()


def _needs_reload(active_id: int | None) -> bool:
    """Whether the watcher should load ``active_id`` now (called without the locks: a hint, rechecked on load)."""
    if _loading_label is not None:
        return False  # a load runs; it reads the active version itself
    if _engine is None:
        # Nothing served yet: load only where the server preloads (otherwise the first
        # reply does), and not a version whose load failed (the next reply retries it).
        return active_id is not None and active_id != _failed_version_id and settings.SUPPORTBOT_PRELOAD_MODEL
    return active_id != _engine_version_id and (active_id is None or active_id != _failed_version_id)


async def _watch_active_version() -> None:
    """Every ``SUPPORTBOT_MODEL_CHECK_S`` seconds: read the active version's id, reload when it changed."""
    from channels.db import database_sync_to_async

    while True:
        await asyncio.sleep(settings.SUPPORTBOT_MODEL_CHECK_S)
        try:
            active_id = await database_sync_to_async(_active_version_id)()
        except Exception:  # the database briefly away: the next check tries again
            log.warning("Checking the active model version failed; checking again shortly", exc_info=True)
            continue
        if not _needs_reload(active_id):
            continue
        log.info("The active model version changed (id %s): reloading", active_id)
        try:
            await areload()
        except Exception:  # the old model goes on serving; engine_status() says why
            log.exception("Loading the newly active model version failed; still serving %s", _engine_label)


async def _keep_membership(layer, channel: str) -> None:
    while True:
        await asyncio.sleep(_GROUP_REFRESH_S)
        try:
            await layer.group_add(MODELS_GROUP, channel)
        except Exception:  # Redis briefly away: try again at the next refresh
            log.exception("Could not renew the %s group membership", MODELS_GROUP)


# --- safety filter inputs ------------------------------------------------------------------


def _profile_inputs() -> tuple[list[str], dict[str, str]]:
    data = chat_data()
    return data.blocked_terms(), data.company_facts()


async def _reply_plan(request: GenerationRequest) -> ReplyPlan:
    """One reply's plan: the maskers (personal data, the chat's blocked terms), the company's facts
    (both read fresh for each reply), and, for a version with a retrieval index, the grounded
    conversation, the prime and the reply policy bound to the neighbours found."""
    from channels.db import database_sync_to_async

    terms, facts = await database_sync_to_async(_profile_inputs)()
    plan = ReplyPlan(maskers=reply_maskers(terms), facts=facts)
    engine = _engine
    loaded = getattr(engine, "loaded", None) if engine is not None else None
    if loaded is None or loaded.index is None:
        return plan
    grounding = await asyncio.to_thread(ground_request, loaded, request.messages, request.params.max_new_tokens)
    if grounding is not None:
        plan.messages, plan.prime, plan.grounding = grounding.messages, grounding.prime, grounding.log()
        plan.decide = reply_decider(
            loaded.reply_policy, grounding.hits, handoff_logprob=settings.SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD
        )
    return plan


# --- building a reply request --------------------------------------------------------------


def generation_params() -> GenerationParams:
    """Generation limits from settings (read at call time, so tests can override them)."""
    return GenerationParams(
        max_new_tokens=settings.SUPPORTBOT_MAX_NEW_TOKENS,
        stop=tuple(settings.SUPPORTBOT_STOP_SEQUENCES),
        timeout_s=settings.SUPPORTBOT_GENERATION_TIMEOUT_S,
        max_prompt_tokens=settings.SUPPORTBOT_PROMPT_MAX_TOKENS,
    )
