"""Inference engines behind ``finetune.generation.Engine``, plus the pieces they share.

- ``load_for_inference``: load a merged model directory (or a base model) for serving.
- ``ReplyText``: incremental detokenising with stop strings, so streamed deltas never
  contain a stop string or half of one, and the concatenated deltas equal the reply.
- ``NaiveEngine``: one ``model.generate`` per request, one request at a time, in a
  worker thread. Correct and simple; the baseline the batched engine is measured against.

Plain Python: no Django. Generation never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .generation import EngineBusy, GenerationDone, GenerationRequest, TokenDelta
from .prompting import render_prompt, stop_sequences

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model and tokenizer ready to generate, with the label replies are attributed to."""

    model: object
    tokenizer: object
    label: str
    device: str = "cpu"


def load_for_inference(path: str, *, label: str, device: str | None = None) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path)
    model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, label=label, device=device)


class ReplyText:
    """Turns generated token ids into reply text, honouring stop strings.

    ``push(token_id)`` returns the text that is now safe to show: text that cannot
    turn out to be the start of a stop string. ``stopped`` becomes True when a stop
    string appears; the stop string and anything after it are never emitted.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the reply already returned
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        decoded = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if decoded.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        cut = len(decoded)
        for stop in self.stops:
            at = decoded.find(stop)
            if at != -1 and at < cut:
                cut = at
                self.stopped = True
        if self.stopped:
            self.text = decoded[:cut]
        else:
            self.text = decoded
            # Hold back a tail that might be the beginning of a stop string.
            for stop in self.stops:
                for k in range(min(len(stop) - 1, len(decoded)), 0, -1):
                    if decoded.endswith(stop[:k]):
                        cut = min(cut, len(decoded) - k)
                        break
        delta = self.text[self.emitted : cut] if cut > self.emitted else ""
        self.emitted = max(self.emitted, cut)
        return delta

    def flush(self) -> str:
        """Text held back at the end of generation (it turned out not to be a stop string)."""
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

    @property
    def reply(self) -> str:
        return self.text.strip()


def prompt_ids_for(loaded: LoadedModel, messages: list[dict[str, str]], max_prompt_tokens: int) -> list[int]:
    """Render and tokenize the conversation, keeping the newest tokens when it is too long.

    Callers trim history by whole turns first (oldest first, system kept); this is the
    last guard against a single turn longer than the context window.
    """
    text = render_prompt(messages, loaded.tokenizer)
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_prompt_tokens:]


def context_window(loaded: LoadedModel) -> int:
    config = loaded.model.config
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024))


class NaiveEngine:
    """``model.generate`` per request, strictly one at a time (the benchmark baseline)."""

    def __init__(self, loaded: LoadedModel | None):
        self._loaded = loaded
        self._lock = threading.Lock()
        self._keys: set[str] = set()
        self._cancelled: set[str] = set()

    @property
    def model_label(self) -> str | None:
        return self._loaded.label if self._loaded else None

    async def cancel(self, request_id: str) -> None:
        self._cancelled.add(request_id)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | GenerationDone]:
        if self._loaded is None:
            raise RuntimeError("No model is loaded.")
        if request.key in self._keys:
            raise EngineBusy(f"A reply for {request.key} is already being generated.")
        self._keys.add(request.key)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        try:
            worker = loop.run_in_executor(None, self._generate, request, loop, queue)
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, GenerationDone):
                    break
            await worker
        finally:
            self._keys.discard(request.key)
            self._cancelled.discard(request.request_id)

    def _generate(self, request: GenerationRequest, loop, queue: asyncio.Queue) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        loaded = self._loaded
        params = request.params
        start = time.monotonic()
        deadline = start + params.timeout_s
        reply = ReplyText(loaded.tokenizer, stop_sequences(loaded.tokenizer) + tuple(params.stop))
        state = {"first": None, "count": 0, "reason": "stop"}
        engine = self

        def emit(event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        class Streamer(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate() first passes the prompt
                    self.prompt_seen = True
                    return
                for token_id in value.reshape(-1).tolist():
                    if token_id == loaded.tokenizer.eos_token_id:
                        continue
                    state["count"] += 1
                    if state["first"] is None:
                        state["first"] = time.monotonic()
                    delta = reply.push(token_id)
                    if delta:
                        emit(TokenDelta(delta))

            def end(self):
                pass

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                if request.request_id in engine._cancelled:
                    state["reason"] = "cancelled"
                    return True
                if time.monotonic() > deadline:
                    state["reason"] = "timeout"
                    return True
                return reply.stopped

        mean_logprob = None
        error = ""
        with self._lock:
            try:
                window = context_window(loaded)
                ids = prompt_ids_for(loaded, request.messages, max(16, window - params.max_new_tokens))
                input_ids = torch.tensor([ids], device=loaded.device)
                sampling = params.temperature > 0
                with torch.inference_mode():
                    out = loaded.model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        max_new_tokens=params.max_new_tokens,
                        do_sample=sampling,
                        temperature=params.temperature if sampling else None,
                        top_p=params.top_p if sampling else None,
                        pad_token_id=loaded.tokenizer.pad_token_id,
                        eos_token_id=loaded.tokenizer.eos_token_id,
                        streamer=Streamer(),
                        stopping_criteria=StoppingCriteriaList([Stop()]),
                        output_scores=True,
                        return_dict_in_generate=True,
                    )
                scores = loaded.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
                finite = [float(s) for s in scores[0] if math.isfinite(float(s))]
                mean_logprob = sum(finite) / len(finite) if finite else None
                generated = out.sequences.shape[1] - input_ids.shape[1]
                if state["reason"] == "stop" and not reply.stopped and generated >= params.max_new_tokens:
                    state["reason"] = "length"
            except Exception as exc:  # noqa: BLE001 - reported to the caller as an "error" reply
                log.exception("Generation failed for %s", request.key)
                state["reason"] = "error"
                error = f"{type(exc).__name__}: {exc}"
        tail = reply.flush() if not reply.stopped else ""
        if tail:
            emit(TokenDelta(tail))
        end = time.monotonic()
        emit(
            GenerationDone(
                text=reply.text,
                finish_reason=state["reason"],
                token_count=state["count"],
                mean_logprob=mean_logprob,
                model_label=loaded.label,
                first_token_ms=int((state["first"] - start) * 1000) if state["first"] else None,
                latency_ms=int((end - start) * 1000),
                error=error,
            )
        )
