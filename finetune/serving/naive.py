"""``NaiveEngine``: one ``model.generate`` per request, one request at a time, in a worker thread.

Correct and simple; the baseline the batched engine is measured against (tests check
that both give the same greedy replies). The version's repetition controls
(``finetune.ml.decoding.repetition_processors``, blind to the prompt) go to ``generate``
as its ``logits_processor``, as in the evaluation. Plain Python: no Django.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import AsyncIterator

from finetune.ml.decoding import repetition_processors
from finetune.ml.prompting import stop_sequences

from .interface import EngineBusy, GenerationDone, GenerationRequest, TokenDelta
from .loading import LoadedModel, context_window
from .text import ReplyText, prompt_ids_for, token_budget

log = logging.getLogger(__name__)


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

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    def swap(self, loaded: LoadedModel) -> None:
        """Serve ``loaded`` from the next request on; a running request keeps its model."""
        self._loaded = loaded

    def close(self, timeout: float | None = None) -> None:
        """Nothing to stop: each request runs in the default executor."""

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
            # Timed from here, like BatchedEngine: waiting for the executor and the lock is
            # part of what the customer waits for.
            worker = loop.run_in_executor(None, self._generate, request, loop, queue, time.monotonic())
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, GenerationDone):
                    break
            await worker
        finally:
            self._keys.discard(request.key)
            self._cancelled.discard(request.request_id)

    def _generate(self, request: GenerationRequest, loop, queue: asyncio.Queue, start: float) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        loaded = self._loaded
        params = request.params
        deadline = start + params.timeout_s
        reply = ReplyText(loaded.tokenizer, stop_sequences(loaded.tokenizer) + tuple(params.stop), request.prime)
        state = {"first": None, "count": 0, "reason": "stop", "logprobs": None, "sum": 0.0, "n": 0}
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
                    if state["logprobs"] is not None:
                        logprob = float(state["logprobs"][token_id])
                        if math.isfinite(logprob):
                            state["sum"] += logprob
                            state["n"] += 1
                    delta = reply.push(token_id)
                    if delta:
                        emit(TokenDelta(delta, mean_logprob=state["sum"] / state["n"] if state["n"] else None))

            def end(self):
                pass

        def record(input_ids, scores):
            # Last in the processor list: the distribution the token is chosen from (after the
            # repetition controls, before temperature), read by Streamer.put for that token.
            state["logprobs"] = torch.log_softmax(scores[0].float(), dim=-1)
            return scores

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
                max_prompt, max_new = token_budget(
                    context_window(loaded), params.max_new_tokens, params.max_prompt_tokens
                )
                ids = prompt_ids_for(loaded, request.messages, max_prompt, request.prime)
                input_ids = torch.tensor([ids], device=loaded.device)
                processors = repetition_processors(input_ids.shape[1], loaded.decoding)
                processors.append(record)
                sampling = params.temperature > 0
                with torch.inference_mode():
                    out = loaded.model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        max_new_tokens=max_new,
                        do_sample=sampling,
                        temperature=params.temperature if sampling else None,
                        top_p=params.top_p if sampling else None,
                        pad_token_id=loaded.tokenizer.pad_token_id,
                        eos_token_id=loaded.tokenizer.eos_token_id,
                        streamer=Streamer(),
                        stopping_criteria=StoppingCriteriaList([Stop()]),
                        logits_processor=processors,
                        output_scores=True,
                        return_dict_in_generate=True,
                    )
                scores = loaded.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
                finite = [float(s) for s in scores[0] if math.isfinite(float(s))]
                mean_logprob = sum(finite) / len(finite) if finite else None
                generated = out.sequences.shape[1] - input_ids.shape[1]
                if state["reason"] == "stop" and not reply.stopped and generated >= max_new:
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
