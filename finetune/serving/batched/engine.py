"""``BatchedEngine``: the event-loop side of dynamic batching and the generation thread's loop.

The thread alternates between the two halves of the work, kept apart so each reads
on its own: the scheduler (``scheduler.py``) decides which requests end, wait or
join the batch; the runner (``runner.py``) runs the forward passes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator

from ..interface import GenerationDone, GenerationRequest, TokenDelta
from ..loading import LoadedModel
from .runner import Runner
from .scheduler import Job, Scheduler

log = logging.getLogger(__name__)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class BatchedEngine:
    """Dynamic batching: every running reply advances one token per step of one shared batch.

    One generation thread per engine (one engine per process) owns the model. Requests
    wait in a queue; between two decode steps the thread admits waiting requests (up to
    ``max_batch_size`` rows) and prefills at most ``prefill_tokens`` prompt tokens (only
    the tokens the prefix cache does not already hold: a conversation's earlier turns,
    the shared system prompt), the prompt with the fewest tokens left first (whole when it
    has at most ``prefill_whole_tokens`` left) and a longer one in chunks over several
    steps, so one expensive prompt neither holds up a short one nor stops running
    replies; a prompt whose last chunk is done joins the batch's KV cache. A request
    that arrives while a chunk or a decode step runs makes it give way between two
    layers (never twice in a row), so a new customer waits for one layer, not a pass. Then one
    forward pass over the batch gives every row its next token. One reply per
    conversation at a time (``EngineBusy``), so no conversation takes more than its row.
    Finished, cancelled and timed-out rows leave between steps. Tokens reach each request's asyncio queue through
    ``loop.call_soon_threadsafe``.

    Greedy replies equal ``NaiveEngine``'s token for token (tests check it); batching
    changes only the floating-point summation order, which can flip a near-tie.

    ``swap(loaded)`` serves a new model to requests admitted from then on, while rows
    already running finish on the model they started with (their own batch).
    """

    def __init__(
        self,
        loaded: LoadedModel | None,
        *,
        max_batch_size: int = 16,
        num_threads: int | None = None,
        prefix_cache_mb: float = 512,
        prefill_tokens: int = 32,
        prefill_whole_tokens: int = 768,
    ):
        self._scheduler = Scheduler(
            loaded,
            max_batch_size=max_batch_size,
            prefill_tokens=prefill_tokens,
            prefill_whole_tokens=prefill_whole_tokens,
        )
        self._runner = Runner(self._scheduler, prefix_cache_bytes=int(prefix_cache_mb * 2**20))
        self.num_threads = num_threads or _cpu_count()
        self._thread: threading.Thread | None = None

    # --- the Engine interface (event loop side) ---------------------------------------

    @property
    def model_label(self) -> str | None:
        loaded = self._scheduler.loaded
        return loaded.label if loaded else None

    @property
    def loaded(self) -> LoadedModel | None:
        return self._scheduler.loaded

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | GenerationDone]:
        loop = asyncio.get_running_loop()
        job = Job(request=request, loop=loop, queue=asyncio.Queue(), submitted=time.monotonic())
        with self._scheduler.cond:
            self._scheduler.submit(job)
            self._ensure_thread()
        finished = False
        try:
            while True:
                event = await job.queue.get()
                yield event
                if isinstance(event, GenerationDone):
                    finished = True
                    return
        finally:
            if not finished:
                # The reader went away (customer left, task cancelled): stop generating. The
                # key stays busy until the thread drops the row, at most one step later.
                job.cancelled = True
                with self._scheduler.cond:
                    self._scheduler.cond.notify()

    async def cancel(self, request_id: str) -> None:
        with self._scheduler.cond:
            self._scheduler.cancel(request_id)

    # --- management ---------------------------------------------------------------------

    def swap(self, loaded: LoadedModel) -> None:
        """Serve ``loaded`` to requests admitted from now on; running replies finish on their model."""
        with self._scheduler.cond:
            self._scheduler.loaded = loaded
            self._scheduler.cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, let admitted and waiting ones finish, then stop the thread."""
        with self._scheduler.cond:
            self._scheduler.closing = True
            self._scheduler.cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def prefix_stats(self) -> dict[str, int]:
        """How much prefill the prefix cache saved: hits, tokens not recomputed, entries, bytes held."""
        return self._runner.prefix_stats()

    def is_busy(self, key: str) -> bool:
        """Whether a reply for ``key`` is queued or being generated."""
        with self._scheduler.cond:
            return key in self._scheduler.keys

    @property
    def running(self) -> int:
        """Rows in the running batches (replies being generated right now)."""
        return self._runner.running

    @property
    def max_batch_size(self) -> int:
        return self._scheduler.max_batch_size

    @property
    def steps(self) -> int:
        """Decode steps taken (observability and tests)."""
        return self._runner.steps

    @property
    def prefills(self) -> int:
        """Prefill forward passes."""
        return self._runner.prefills

    @property
    def preemptions(self) -> int:
        """Passes that gave way to a newly arrived request (a chunk or decode step stopped or put off)."""
        return self._runner.preemptions

    @property
    def prefilled_rows(self) -> int:
        """Prompts prefilled (over ``prefills``: how many shared a pass)."""
        return self._runner.prefilled_rows

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="supportbot-generation", daemon=True)
            self._thread.start()

    # --- the generation thread --------------------------------------------------------------

    def _run(self) -> None:
        import torch

        torch.set_num_threads(self.num_threads)
        scheduler, runner = self._scheduler, self._runner
        with torch.inference_mode():
            while True:
                with scheduler.cond:
                    work = scheduler.next_work(runner.in_flight)
                    if work is None:
                        self._thread = None
                        return
                for job, reason in work.expired:
                    runner.finish_job(job, reason, reply=None, loaded=work.loaded)
                try:
                    if work.admitted:
                        runner.admit(work.admitted, work.loaded)
                    if runner.pending:
                        runner.prefill_some(scheduler.prefill_tokens, scheduler.prefill_groups)
                    runner.step_all(serving=scheduler.loaded)
                except Exception as exc:  # noqa: BLE001 - the thread must survive to serve the next requests
                    log.exception("Generation step failed")
                    runner.fail_all(f"{type(exc).__name__}: {exc}")
