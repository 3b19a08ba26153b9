"""The batched engine's admission policy: which requests wait, which join the batch, and with whom.

``Scheduler`` holds the waiting queue and the requests in flight (one per key), and
decides between two decode steps what the generation thread does next:

- requests that were cancelled or ran out of time while waiting leave without running;
- waiting requests are admitted, oldest first, while the batch has room
  (``max_batch_size`` rows);
- ``prefill_tokens`` is the most prompt tokens prefilled between two decode steps
  (the runner's ``prefill_some`` spends it, fewest tokens left first, long prompts in
  chunks; a prompt first in line with at most ``prefill_whole_tokens`` left, an ordinary
  customer's, in one pass); the chunks of one step with similar lengths are grouped into shared prefill
  passes (``prefill_groups``): prefill is compute-bound, so padding costs as much as
  real tokens.

It computes nothing on the model: the runner (``runner.py``) does the forward passes.
Its state is shared by the event loop (``stream``, ``cancel``) and the generation
thread, so every method runs with ``cond`` held unless its docstring says otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..interface import EngineBusy, GenerationDone, GenerationRequest, TokenDelta
from ..loading import LoadedModel

if TYPE_CHECKING:
    from .runner import Prefill


@dataclass(eq=False)
class Job:
    """A request between ``stream()`` (event loop) and the generation thread."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float
    # Written by the event loop, read by the generation thread between steps; a plain
    # attribute is enough, as the thread only needs to see it by the next step.
    cancelled: bool = False

    @property
    def deadline(self) -> float:
        return self.submitted + self.request.params.timeout_s

    def emit(self, event: TokenDelta | GenerationDone) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody reads this reply any more
            self.cancelled = True


@dataclass(frozen=True)
class Work:
    """What the generation thread does before its next decode step."""

    expired: list[tuple[Job, str]]  # waiting requests to end now, with their finish reason
    admitted: list[Job]  # requests that join the batch
    loaded: LoadedModel | None  # the model the admitted requests run on


class Scheduler:
    def __init__(
        self, loaded: LoadedModel | None, *, max_batch_size: int, prefill_tokens: int, prefill_whole_tokens: int
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}.")
        self.loaded = loaded  # served to requests admitted from now on
        self.max_batch_size = max_batch_size
        self.prefill_tokens = prefill_tokens
        self.prefill_whole_tokens = prefill_whole_tokens
        self.cond = threading.Condition()
        self.waiting: collections.deque[Job] = collections.deque()
        self.jobs: dict[str, Job] = {}  # request_id -> job, from submission to its last event
        self.keys: set[str] = set()
        self.closing = False

    def submit(self, job: Job) -> None:
        """Queue ``job``; refused while shutting down, without a model, or with its key busy."""
        if self.closing:
            raise RuntimeError("The engine is shut down; get a new one from finetune.serving.runtime.get_engine().")
        if self.loaded is None:
            raise RuntimeError("No model is loaded.")
        key = job.request.key
        if key in self.keys:
            raise EngineBusy(f"A reply for {key} is already being generated.")
        self.keys.add(key)
        self.jobs[job.request.request_id] = job
        self.waiting.append(job)
        self.cond.notify()

    def cancel(self, request_id: str) -> None:
        job = self.jobs.get(request_id)
        if job is not None:
            job.cancelled = True
            self.cond.notify()

    def release(self, job: Job) -> None:
        """``job`` has had its last event: its key may start the next turn."""
        self.keys.discard(job.request.key)
        self.jobs.pop(job.request.request_id, None)

    def next_work(self, running: int) -> Work | None:
        """Wait until there is something to do; None when shutting down with nothing left.

        ``running`` is the number of requests admitted and not finished (rows in the
        batches and prompts still being prefilled).
        """
        while not self.waiting and not running and not self.closing:
            self.cond.wait()
        if self.closing and not self.waiting and not running:
            return None
        expired = self._take_expired()
        room = self.max_batch_size - running
        admitted = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        return Work(expired=expired, admitted=admitted, loaded=self.loaded)

    def _take_expired(self) -> list[tuple[Job, str]]:
        """Waiting jobs that were cancelled or ran out of time before a row was free."""
        now = time.monotonic()
        expired, still = [], collections.deque()
        for job in self.waiting:
            if job.cancelled:
                expired.append((job, "cancelled"))
            elif now > job.deadline:
                expired.append((job, "timeout"))
            else:
                still.append(job)
        self.waiting = still
        return expired

    def prefill_groups(self, ready: Sequence[Prefill]) -> list[list[Prefill]]:
        """Admitted prompts grouped into prefill passes, shortest uncached part first (no lock needed).

        A prompt joins the current pass unless that would pad it past the larger of
        ``prefill_tokens`` and ``prefill_whole_tokens`` tokens in all (ordinary prompts taken
        whole share a pass up to the latter), or to more than a quarter (plus 64 tokens)
        over its real tokens.
        """
        limit = max(self.prefill_tokens, self.prefill_whole_tokens)
        groups: list[list[Prefill]] = []
        group: list[Prefill] = []
        real = 0
        for item in sorted(ready, key=lambda p: p.new_tokens):
            padded = (len(group) + 1) * item.new_tokens  # sorted: the newcomer is the longest
            if group and (padded > limit or padded > 1.25 * (real + item.new_tokens) + 64):
                groups.append(group)
                group, real = [], 0
            group.append(item)
            real += item.new_tokens
        if group:
            groups.append(group)
        return groups
