"""The vLLM engine's choices that need no vLLM server: server per conversation, served names, LoRA or merged.

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
