"""The vLLM engine's choices that need no vLLM server: server per conversation, served names, LoRA or merged,
publishing a version to every server (against local stand-ins that answer vLLM's adapter endpoints).

The engine against real vLLM servers: test_vllm.py (marked ``vllm``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from finetune.serving.interface import GenerationParams, GenerationRequest, TokenDelta
from finetune.serving.loading import LoadedModel
from finetune.serving.text import prompt_ids_for
from finetune.serving.vllm import VLLMEngine, VLLMError, VLLMServers, _Reply, served_name, served_version
from tests.finetune.serving.engine_models import tiny_gpt2_dir

URLS = ["http://vllm-a:8000", "http://vllm-b:8000", "http://vllm-c:8000"]


def test_each_conversation_sticks_to_one_server_and_they_spread():
    servers = VLLMServers(URLS)
    keys = [str(uuid.uuid4()) for _ in range(300)]
    first = {key: servers.ranked(key)[0] for key in keys}
    assert first == {key: VLLMServers(URLS).ranked(key)[0] for key in keys}  # stable across processes
    counts = {url: list(first.values()).count(url) for url in URLS}
    assert all(60 < count < 140 for count in counts.values()), counts


def test_a_dead_servers_conversations_move_and_only_theirs():
    servers = VLLMServers(URLS, retry_after_s=60)
    keys = [str(uuid.uuid4()) for _ in range(300)]
    before = {key: servers.ranked(key)[0] for key in keys}
    servers.mark_down("http://vllm-b:8000")
    after = {key: servers.ranked(key)[0] for key in keys}
    for key in keys:
        if before[key] == "http://vllm-b:8000":
            assert after[key] != "http://vllm-b:8000"
            assert servers.ranked(key)[-1] == "http://vllm-b:8000"  # still tried, last
        else:
            assert after[key] == before[key]
    moved = [after[key] for key in keys if before[key] == "http://vllm-b:8000"]
    assert set(moved) == {"http://vllm-a:8000", "http://vllm-c:8000"}
    servers.mark_up("http://vllm-b:8000")
    assert {key: servers.ranked(key)[0] for key in keys} == before


def test_no_server_configured_is_a_clear_error():
    with pytest.raises(VLLMError, match="SUPPORTBOT_VLLM_URLS"):
        VLLMServers([])


def _adapter(tmp_path, model_type: str):
    base = tmp_path / f"base-{model_type}"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": model_type}))
    adapter = tmp_path / f"adapter-{model_type}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    return adapter


def test_llama_versions_are_adapters_and_gpt2_versions_merged_exports(tmp_path):
    llama = served_version(label="v3", adapter_path=str(_adapter(tmp_path, "llama")))
    assert (llama.name, llama.lora_path) == ("supportbot-v3", llama.files)
    merged = tmp_path / "merged"
    merged.mkdir()
    gpt2 = served_version(label="v4", adapter_path=str(_adapter(tmp_path, "gpt2")), merged_path=str(merged))
    assert (gpt2.name, gpt2.lora_path, gpt2.files) == ("supportbot-v4", None, str(merged))
    assert served_name("v17") == "supportbot-v17"


def test_a_merged_version_no_server_lists_blocks_with_what_to_start(tmp_path):
    """Nothing answers here: the message names the server and says it did not answer."""
    servers = VLLMServers(["http://127.0.0.1:9"], connect_timeout_s=1)
    version = served_version(label="v4", adapter_path=str(_adapter(tmp_path, "gpt2")), merged_path="/models/v4")
    with pytest.raises(VLLMError, match=r"v4 cannot go live.*127\.0\.0\.1:9 did not answer"):
        servers.publish(version)


class _ModelsHandler(BaseHTTPRequestHandler):
    """``GET /v1/models`` as a vLLM server answers it, listing one adapter."""

    def do_GET(self):  # noqa: N802 - the http.server name
        body = json.dumps({"object": "list", "data": [{"id": "tiny"}, {"id": "supportbot-v3", "parent": "tiny"}]})
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _servers_answering_hanging_and_refusing(hanging: int):
    """A server that answers, ``hanging`` that accept connections and never reply, and a closed port."""
    answering = ThreadingHTTPServer(("127.0.0.1", 0), _ModelsHandler)
    threading.Thread(target=answering.serve_forever, daemon=True).start()
    hung = []
    for _ in range(hanging):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)  # the kernel completes connections; nobody reads the request
        hung.append(sock)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = closed.getsockname()[1]
    try:
        yield (
            f"http://127.0.0.1:{answering.server_port}",
            [f"http://127.0.0.1:{sock.getsockname()[1]}" for sock in hung],
            f"http://127.0.0.1:{refused}",
        )
    finally:
        answering.shutdown()
        answering.server_close()
        for sock in hung:
            sock.close()


def test_health_asks_every_server_at_once_and_reports_each():
    with _servers_answering_hanging_and_refusing(hanging=4) as (up, hanging, refused):
        servers = VLLMServers([*hanging, refused, up])  # asked in turn, "up" would wait 4 s
        started = time.monotonic()
        report = servers.health(timeout_s=1.0)
        took = time.monotonic() - started

    # Asked one after another, the four hanging servers alone would take 4 s.
    assert took < 3.5, f"health() took {took:.1f} s: the servers were not asked concurrently"
    assert tuple(server["url"] for server in report) == servers.urls  # configured order
    by_url = {server["url"]: server for server in report}
    assert by_url[up]["ok"] is True
    assert by_url[up]["models"] == ["supportbot-v3", "tiny"]
    assert by_url[refused]["ok"] is False
    assert "ConnectError" in by_url[refused]["error"]
    for url in hanging:
        assert by_url[url]["ok"] is False
        assert "Timeout" in by_url[url]["error"] or "No answer within 1 s" in by_url[url]["error"]


class _AdapterHandler(BaseHTTPRequestHandler):
    """``GET /v1/models`` and ``POST /v1/load_lora_adapter`` as a vLLM server answers them (``_StandIn``)."""

    server: _StandIn

    def do_GET(self):  # noqa: N802 - the http.server name
        with self.server.lock:
            cards = [{"id": name} for name in sorted(self.server.names)]
        self._answer(200 if self.path == "/v1/models" else 404, {"object": "list", "data": cards})

    def do_POST(self):  # noqa: N802 - the http.server name
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        stand_in = self.server
        if stand_in.hold_load_s:  # a load that hangs (until the test ends)
            stand_in.released.wait(stand_in.hold_load_s)
        if stand_in.meet is not None:
            try:  # every server that meets here loads at the same time, or none does
                stand_in.meet.wait()
            except threading.BrokenBarrierError:
                self._answer(500, {"error": "the other servers' loads did not overlap with this one"})
                return
        if stand_in.refuse:
            self._answer(400, {"error": {"message": "Invalid LoRA adapter: rank 64 exceeds max_lora_rank 16"}})
            return
        with stand_in.lock:
            stand_in.names.add(request["lora_name"])
        self._answer(200, {"message": f"Success: LoRA adapter '{request['lora_name']}' added successfully."})

    def _answer(self, status: int, body: dict) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args):
        pass


class _StandIn(ThreadingHTTPServer):
    """A local HTTP server that lists and loads adapters as vLLM does; a load can meet the other servers'
    loads at ``meet`` (a barrier), be refused, or hang for ``hold_load_s``."""

    def __init__(self, *, meet=None, refuse=False, hold_load_s=0.0):
        super().__init__(("127.0.0.1", 0), _AdapterHandler)
        self.names = {"tiny"}
        self.lock = threading.Lock()
        self.meet, self.refuse, self.hold_load_s = meet, refuse, hold_load_s
        self.released = threading.Event()
        self.url = f"http://127.0.0.1:{self.server_port}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.released.set()
        if self.meet is not None:
            self.meet.abort()
        self.shutdown()
        self.server_close()


@contextlib.contextmanager
def _stand_ins(*configs: dict):
    servers = [_StandIn(**config) for config in configs]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def test_publish_loads_the_adapter_on_every_server_at_once(tmp_path):
    """Each server's load waits at a barrier for the other two (for at most 10 s): loads made one after
    another never meet there, and each would be refused."""
    version = served_version(label="v5", adapter_path=str(_adapter(tmp_path, "llama")))
    meet = threading.Barrier(3, timeout=10)
    with _stand_ins({"meet": meet}, {"meet": meet}, {"meet": meet}) as stand_ins:
        servers = VLLMServers([server.url for server in stand_ins])
        servers.publish(version)
        assert all("supportbot-v5" in server.names for server in stand_ins)
        assert all("supportbot-v5" in servers.models(url) for url in servers.urls)
        # Listed everywhere now: publishing again (a rollback to it) loads nothing, so never meets.
        meet.reset()
        servers.publish(version)


def test_publish_reports_every_server_that_fails_within_a_bounded_time(tmp_path):
    """One server loads, one refuses, three hang past the load timeout, one is down: the version cannot go
    live, the message names all five failures, and publish returns within its budget (the three hung loads,
    waited for one after another, would take longer)."""
    version = served_version(label="v6", adapter_path=str(_adapter(tmp_path, "llama")))
    hung = {"hold_load_s": 60}
    with _stand_ins({}, {"refuse": True}, hung, hung, hung) as (good, refusing, *hanging):
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            down = f"http://127.0.0.1:{closed.getsockname()[1]}"
        urls = [good.url, refusing.url, *(server.url for server in hanging), down]
        servers = VLLMServers(urls, connect_timeout_s=1, load_timeout_s=2)
        started = time.monotonic()
        with pytest.raises(VLLMError) as refused:
            servers.publish(version)
        took = time.monotonic() - started

    message = str(refused.value)
    assert message.startswith("v6 cannot go live: not every vLLM server serves supportbot-v6.")
    assert good.url not in message
    assert f"{refusing.url} refused to load supportbot-v6" in message
    assert "rank 64 exceeds max_lora_rank 16" in message  # the server's own reason
    for server in hanging:
        assert f"{server.url} did not answer (ReadTimeout" in message
    assert f"{down} did not answer (ConnectError" in message
    positions = [message.index(url) for url in urls[1:]]
    assert positions == sorted(positions)  # in configured order
    assert took < servers.publish_budget_s() < 3 * servers.load_timeout_s
    assert "supportbot-v6" in good.names  # loaded there, but live nowhere: the promotion is refused


@pytest.mark.django_db
def test_a_promotion_is_refused_while_one_server_fails_the_load_and_goes_through_once_all_load(settings, tmp_path):
    from finetune.models import ModelVersion
    from finetune.services.model_versions import model_version_promote
    from supportbot.errors import ApplicationError
    from tests.factories import ModelVersionFactory

    with _stand_ins({}, {"refuse": True}) as (good, refusing):
        settings.SUPPORTBOT_ENGINE = "vllm"
        settings.SUPPORTBOT_VLLM_URLS = [good.url, refusing.url]
        version = ModelVersionFactory(
            status=ModelVersion.Status.CANDIDATE, adapter_path=str(_adapter(tmp_path, "llama")), merged_path=""
        )
        with pytest.raises(ApplicationError) as refused:
            model_version_promote(version=version, reason="vLLM stand-ins")
        assert refused.value.code == "vllm_not_serving"
        assert f"{refusing.url} refused to load {served_name(version.label)}" in str(refused.value)
        version.refresh_from_db()
        assert version.status == ModelVersion.Status.CANDIDATE

        refusing.refuse = False  # the operator fixed that server
        model_version_promote(version=version, reason="vLLM stand-ins")
        version.refresh_from_db()
        assert version.status == ModelVersion.Status.ACTIVE
        assert served_name(version.label) in good.names & refusing.names


def test_a_request_carries_the_prompt_the_other_engines_build_with_its_prime():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir())
    loaded = LoadedModel(model=None, tokenizer=tokenizer, label="v3")
    engine = VLLMEngine(VLLMServers(URLS), served_version(label="v3", adapter_path="/nowhere"), loaded)
    messages = [{"role": "system", "content": "You help."}, {"role": "customer", "content": "Where is my order?"}]
    request = GenerationRequest(
        key="c", messages=messages, params=GenerationParams(max_new_tokens=20), prime="Your order has shipped."
    )
    body = engine._body(request, engine.version, loaded)
    assert body["model"] == "supportbot-v3"
    assert body["prompt"] == prompt_ids_for(loaded, messages, 1024 - 20, prime="Your order has shipped.")
    assert tokenizer.decode(body["prompt"]).endswith("Agent: Your order has shipped.")
    assert (body["max_tokens"], body["stream"]) == (20, True)
    assert "\nCustomer:" in body["stop"]
    # The version's n-gram ban, for the servers' plugin (finetune.serving.vllm_logits); no penalty by default.
    assert (
        body["vllm_xargs"]
        == {"no_repeat_ngram_size": loaded.decoding.no_repeat_ngram_size}
        == {"no_repeat_ngram_size": 6}
    )
    assert "repetition_penalty" not in body


def test_streamed_text_after_a_prime_starts_with_it():
    import asyncio

    queue: asyncio.Queue = asyncio.Queue()
    reply = _Reply(prime="Your order has shipped.")
    for text in ("It", " arrives", " Monday."):
        chunk = {"choices": [{"text": text, "logprobs": {"token_logprobs": [-0.5]}, "finish_reason": None}]}
        VLLMEngine._take(chunk, reply, queue)
    deltas = [queue.get_nowait() for _ in range(queue.qsize())]
    assert all(isinstance(delta, TokenDelta) for delta in deltas)
    assert "".join(delta.text for delta in deltas) == "Your order has shipped. It arrives Monday."
    assert deltas[-1].mean_logprob == -0.5
