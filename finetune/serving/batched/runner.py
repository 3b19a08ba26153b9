"""The batched engine's forward passes: prefill admitted prompts, then advance every row a token per step.

``Runner`` owns the batches (one ``KVBatch`` per model being served, see ``kv.py``)
and runs on the generation thread only. For requests the scheduler admitted, it
builds each prompt (trimmed to the prompt budget), reuses cached prefix keys and
values, and prefills at most the scheduler's per-step budget of prompt tokens between
two decode steps (``prefill_some``: fewest tokens left first, long prompts in chunks),
in the groups the scheduler chose; a prompt's last chunk gives the reply's first
token. Each decode step then gives every row its next token, chosen after the
version's repetition controls have seen that row's generated tokens
(``finetune.ml.decoding.apply_to_row``, as ``NaiveEngine`` and the evaluation apply
them), so running replies keep streaming while a long prompt is prefilled. A row
leaves its batch when its reply stops, reaches its length, is cancelled or times
out; its request gets the held-back text and ``GenerationDone``.

A request waiting to be admitted makes a chunk pass or a decode step give way: it stops
between two decoder layers (``kv.Preempted``; a decode step's cache is rewound) or is put
off, and runs again once the newcomer's prompt is in. On a CPU a pass cannot be cut short
otherwise, and a new customer would wait for all of it. Never twice in a row for either
kind, so a stream of arrivals slows long prompts and running replies but never stops them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from finetune.ml.decoding import apply_to_row, repetition_processors
from finetune.ml.prompting import stop_sequences

from ..interface import GenerationDone, GenerationParams, TokenDelta
from ..kv import KVBatch, Preempted, cache_mark, cache_rewind, forward, prefill_forward
from ..loading import LoadedModel, context_window
from ..text import ReplyText, prompt_ids_for, token_budget
from .scheduler import Job, Scheduler

log = logging.getLogger(__name__)

# A prompt does not start a chunk smaller than this behind others in the same step: a
# handful of tokens costs a pass's fixed overhead for little progress.
MIN_CHUNK_TOKENS = 32
# While a reply that started within its first HOLD_TOKENS tokens shows no word yet, chunks of
# long prompts wait, for at most HOLD_STEPS decode steps in a row: its first word then comes
# at decode speed instead of one prefill chunk per token.
HOLD_TOKENS = 16
HOLD_STEPS = 8


@dataclass(eq=False)
class Row:
    """One reply being generated: its text so far and where its next token goes."""

    job: Job
    reply: ReplyText
    max_new: int
    cached: list[int] = field(default_factory=list)  # token ids whose keys/values are in the cache
    position: int = 0  # position id of ``next_token``
    next_token: int = 0  # the last chosen token, fed to the model at the next step
    count: int = 0  # tokens of reply text (the end-of-sequence token is not counted)
    logprob_sum: float = 0.0
    logprob_n: int = 0
    first_at: float | None = None
    processors: object = None  # repetition controls (a LogitsProcessorList over ``generated``), or None
    generated: list[int] = field(default_factory=list)  # reply token ids so far (what the controls see)


@dataclass(eq=False)
class Prefill:
    """An admitted prompt being prefilled, possibly in chunks over several steps."""

    row: Row
    reused: int  # leading prompt tokens whose keys/values are ready (prefix cache, earlier chunks)
    layers: list | None  # those keys/values
    batch: KVBatch | None = None  # the batch (model) the row joins once prefilled
    upto: int = 0  # end of the tokens this step's pass computes
    skipped: int = 0  # steps it waited without a chunk (ages its priority)
    chunked: bool = False  # a first chunk was computed: the rest comes in chunks too

    @property
    def new_tokens(self) -> int:
        """Tokens of this step's pass (the scheduler groups passes by it)."""
        return self.upto - self.reused

    @property
    def remaining(self) -> int:
        return len(self.row.cached) - self.reused


class Runner:
    def __init__(self, scheduler: Scheduler, *, prefix_cache_bytes: int):
        self.scheduler = scheduler
        self.prefix_cache_bytes = prefix_cache_bytes
        self.batches: list[KVBatch] = []
        self.pending: list[Prefill] = []  # admitted prompts not yet fully prefilled
        self.held = 0  # steps in a row without long-prompt chunks, for new replies' first words
        # Whether the next chunk pass / decode step may give way to a request waiting to be
        # admitted (see ``_someone_waits``): never twice in a row, so neither starves.
        self.chunk_may_yield = True
        self.step_may_yield = True
        self.preemptions = 0  # passes stopped or decode steps put off for a waiting request
        self.yielded = False  # the last pass gave way: the next prefill takes the newcomers first
        self.steps = 0  # decode steps taken (observability and tests)
        self.prefills = 0  # prefill forward passes
        self.prefilled_rows = 0  # prompts prefilled (over prefills: how many shared a pass)

    @property
    def running(self) -> int:
        """Rows in the running batches (replies being generated right now)."""
        return sum(len(batch.rows) for batch in self.batches)

    @property
    def in_flight(self) -> int:
        """Admitted requests: running rows and prompts still being prefilled."""
        return self.running + len(self.pending)

    def prefix_stats(self) -> dict[str, int]:
        caches = [batch.prefixes for batch in list(self.batches)]
        return {
            "hits": sum(c.hits for c in caches),
            "reused_tokens": sum(c.reused_tokens for c in caches),
            "entries": sum(len(c.entries) for c in caches),
            "bytes": sum(c.bytes for c in caches),
        }

    def _batch_for(self, loaded: LoadedModel) -> KVBatch:
        for batch in self.batches:
            if batch.loaded is loaded:
                return batch
        batch = KVBatch(loaded, self.prefix_cache_bytes)
        self.batches.append(batch)
        return batch

    def _someone_waits(self) -> bool:
        """A request waits to be admitted and the batch has room for it (read without the lock:
        a stale answer costs one pass's wait or one needless yield, nothing else)."""
        return bool(self.scheduler.waiting) and self.in_flight < self.scheduler.max_batch_size

    # --- admitting requests ----------------------------------------------------------------

    def admit(self, jobs: list[Job], loaded: LoadedModel) -> None:
        """Build the prompts of newly admitted requests; ``prefill_some`` then computes them.

        Tokens a prompt shares with a cached earlier prompt (the conversation's last turn,
        or any conversation's system prompt) are not computed again.
        """
        batch = self._batch_for(loaded)
        for job in jobs:
            if job.cancelled or time.monotonic() > job.deadline:
                self.finish_job(job, "cancelled" if job.cancelled else "timeout", reply=None, loaded=loaded)
                continue
            params = job.request.params
            stops = stop_sequences(loaded.tokenizer) + tuple(params.stop)
            reply = ReplyText(loaded.tokenizer, stops, job.request.prime)
            try:
                max_prompt, max_new = token_budget(
                    context_window(loaded), params.max_new_tokens, params.max_prompt_tokens
                )
                ids = prompt_ids_for(loaded, job.request.messages, max_prompt, job.request.prime)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                log.exception("Building the prompt failed for %s", job.request.key)
                self.finish_job(job, "error", reply=reply, loaded=loaded, error=f"{type(exc).__name__}: {exc}")
                continue
            reused, layers = batch.prefixes.lookup(job.request.key, ids)
            row = Row(job=job, reply=reply, max_new=max_new, cached=list(ids), position=len(ids))
            row.processors = repetition_processors(0, loaded.decoding) or None
            self.pending.append(Prefill(row=row, reused=reused, layers=layers, batch=batch))

    def prefill_some(self, budget: int, grouping: Callable[[Sequence[Prefill]], list[list[Prefill]]]) -> None:
        """Prefill at most ``budget`` prompt tokens (one step's share), in the groups ``grouping`` forms.

        The prompt with the fewest tokens left goes first, so a normal customer's prompt
        never waits behind a long one; when it has at most the scheduler's
        ``prefill_whole_tokens`` left (an ordinary grounded prompt), it is prefilled whole,
        alone. A prompt longer than what is left of the budget gets a chunk of it and
        continues at the next step (its keys and values so far are kept), unless a reply
        that has just started shows no word yet (see ``HOLD_STEPS``). A prompt passed over
        ages: each skipped step counts as ``budget`` tokens fewer, so a long prompt is never
        starved by a stream of short ones. A prompt whose last chunk is computed gets its
        first token and joins its batch.
        """
        now = time.monotonic()
        for item in [p for p in self.pending if p.row.job.cancelled or now > p.row.job.deadline]:
            self.pending.remove(item)
            reason = "cancelled" if item.row.job.cancelled else "timeout"
            self.finish_job(item.row.job, reason, reply=item.row.reply, loaded=item.batch.loaded)
        # A reply that has just started and shown no word yet gets decode steps of its own:
        # no chunk of a long prompt runs then (prompts that complete in this step still
        # do), for at most HOLD_STEPS steps in a row, so the long prompt is only delayed.
        hold = self.held < HOLD_STEPS and any(
            row.count < HOLD_TOKENS and not row.reply.text[: row.reply.emitted].strip()
            for batch in self.batches
            for row in batch.rows
        )
        # Ordinary prompts (never chunked, at most ``prefill_whole_tokens`` left) go whole and
        # share the pass, up to that many tokens in all; other prompts get ``budget`` tokens.
        whole_limit = self.scheduler.prefill_whole_tokens
        left, whole_left, complete, chunks = max(1, budget), max(budget, whole_limit), [], []
        # Right after a pass gave way, the ordinary prompts (the newcomers that made it do so)
        # go first whatever the others' age: otherwise an aged long prompt's chunk could run
        # first, and that one could not give way again.
        first = self.yielded
        self.yielded = False

        def ordinary(p: Prefill) -> bool:
            return not p.chunked and p.remaining <= whole_limit

        for item in sorted(self.pending, key=lambda p: (not (first and ordinary(p)), p.remaining - budget * p.skipped)):
            take = min(item.remaining, left)
            if ordinary(item) and not chunks and (not complete or item.remaining <= whole_left):
                take = item.remaining  # whole, in one pass (the first in line, and those that fit beside it)
            if take == item.remaining:
                complete.append(item)
            elif take <= 0 or hold or complete or (chunks and take < MIN_CHUNK_TOKENS):
                # A prompt that completes now goes alone: its first token waits for no chunk.
                item.skipped += 1
                continue
            else:
                chunks.append(item)
                item.chunked = True
            item.upto, item.skipped = item.reused + take, 0
            left -= take
            whole_left -= take
        for item in chunks if complete else ():
            item.skipped += 1  # chosen before a shorter prompt that completes was seen
        chosen = complete or chunks
        self.held = self.held + 1 if hold and not chosen else 0
        # A chunk pass (a long prompt's, its last included) gives way to a request that arrives
        # while it runs: it stops between two layers and is done again at the next step, so the
        # newcomer waits for one layer, not for the whole chunk. An ordinary prompt's whole pass
        # is never stopped: redone beside the newcomer's, it would only make both wait longer.
        chunk_pass = bool(chosen) and all(p.chunked for p in chosen)
        may_yield = chunk_pass and self.chunk_may_yield
        try:
            for batch in {id(p.batch): p.batch for p in chosen}.values():
                for group in grouping([p for p in chosen if p.batch is batch]):
                    self._prefill(group, batch, preempt=self._someone_waits if may_yield else None)
        except Preempted:
            self.preemptions += 1
            self.chunk_may_yield = False
            self.yielded = True
            return
        if chunk_pass:
            self.chunk_may_yield = True

    def _prefill(self, group: list[Prefill], batch: KVBatch, preempt: Callable[[], bool] | None = None) -> None:
        """One forward pass over several prompts' next tokens (left-padded); the ones whose prompt is
        now complete take their first token and join the batch, the others wait for their next chunk.

        A pass stopped by ``preempt`` raises ``Preempted`` and changes nothing."""
        loaded = batch.loaded
        try:
            logits, layers_per_row = prefill_forward(
                loaded,
                [item.row.cached[: item.upto] for item in group],
                [item.reused for item in group],
                [item.layers for item in group],
                preempt=preempt,
            )
        except Preempted:
            raise
        except Exception as exc:  # noqa: BLE001 - these requests fail, the running batch goes on
            log.exception("Prefill failed for %d requests", len(group))
            for item in group:
                self.pending.remove(item)
                self.finish_job(
                    item.row.job, "error", reply=item.row.reply, loaded=loaded, error=f"{type(exc).__name__}: {exc}"
                )
            return
        self.prefills += 1
        done = []
        for index, (item, layers) in enumerate(zip(group, layers_per_row, strict=True)):
            if item.upto < len(item.row.cached):
                item.reused, item.layers = item.upto, layers  # the next chunk continues from here
            else:
                self.pending.remove(item)
                done.append((index, item, layers))
        if not done:
            return
        self.prefilled_rows += len(done)
        tokens, logprobs = _choose(logits[[index for index, _, _ in done]], [item.row for _, item, _ in done])
        joining = []
        for (_, item, layers), token, logprob in zip(done, tokens, logprobs, strict=True):
            if not self._accept(item.row, token, logprob, loaded):
                joining.append((item.row, layers))
            elif batch.prefixes.budget_bytes:
                batch.prefixes.store(item.row.job.request.key, item.row.cached, layers)
        if joining:
            try:
                batch.add(joining)
            except Exception as exc:
                # Out of the pending list and not in the batch: end them here, or their
                # streams would wait for nothing; the engine then ends the batch's rows too.
                for row, _ in joining:
                    self._finish_row(row, "error", loaded, error=f"{type(exc).__name__}: {exc}")
                raise

    # --- decoding ----------------------------------------------------------------------------

    def step_all(self, serving: LoadedModel | None) -> None:
        """One decode step of every batch; then forget batches of a replaced model once they are empty.

        A request waiting to be admitted goes first: the step is put off (or stopped between
        two layers and its keys and values rewound) so that the newcomer's prompt is prefilled
        and its first word shown now, not after the running replies' step. Never twice in a
        row: running replies lose at most every other step, however many customers arrive.
        """
        if self.running and self.step_may_yield and self._someone_waits():
            self.preemptions += 1
            self.step_may_yield, self.yielded = False, True
            return
        preempt = self._someone_waits if self.step_may_yield else None
        try:
            for batch in list(self.batches):
                self._step(batch, preempt)
        except Preempted:
            self.preemptions += 1
            self.step_may_yield, self.yielded = False, True
        else:
            self.step_may_yield = True
        waiting = {id(p.batch) for p in self.pending}
        self.batches = [b for b in self.batches if b.rows or b.loaded is serving or id(b) in waiting]

    def _step(self, batch: KVBatch, preempt: Callable[[], bool] | None = None) -> None:
        """Drop rows that must stop, then advance every other row by one token.

        A step stopped by ``preempt`` raises ``Preempted`` with the batch as it was before the
        step (the cache rewound); only a cache that can be rewound is stopped."""
        import torch

        now = time.monotonic()
        keep = []
        for i, row in enumerate(batch.rows):
            if row.job.cancelled:
                self._finish_row(row, "cancelled", batch.loaded)
                self._remember(batch, i)
            elif now > row.job.deadline:
                self._finish_row(row, "timeout", batch.loaded)
                self._remember(batch, i)
            else:
                keep.append(i)
        batch.keep(keep)
        if not batch.rows:
            return
        device = batch.loaded.device
        input_ids = torch.tensor([[row.next_token] for row in batch.rows], device=device)
        positions = torch.tensor([[row.position] for row in batch.rows], device=device)
        mask = torch.cat([batch.mask, torch.ones((len(batch.rows), 1), dtype=batch.mask.dtype, device=device)], 1)
        mark = cache_mark(batch.cache) if preempt is not None else None
        try:
            logits, batch.cache = forward(
                batch.loaded.model,
                batch.cache,
                preempt=preempt if mark is not None else None,
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
            )
        except Preempted:
            cache_rewind(batch.cache, mark)
            raise
        batch.mask = mask
        self.steps += 1
        for row in batch.rows:
            row.cached.append(row.next_token)
            row.position += 1
        tokens, logprobs = _choose(logits[:, -1, :], batch.rows)
        keep = []
        for i, row in enumerate(batch.rows):
            if self._accept(row, tokens[i], logprobs[i], batch.loaded):
                self._remember(batch, i)
            else:
                keep.append(i)
        batch.keep(keep)

    def _remember(self, batch: KVBatch, index: int) -> None:
        """Keep a finished row's keys and values for the conversation's next turn."""
        if batch.prefixes.budget_bytes:
            row = batch.rows[index]
            batch.prefixes.store(row.job.request.key, row.cached, batch.row_layers(index))

    def _accept(self, row: Row, token: int, logprob: float, loaded: LoadedModel) -> bool:
        """Take the row's next token; True when the row is finished (and has been told so)."""
        if math.isfinite(logprob):
            row.logprob_sum += logprob
            row.logprob_n += 1
        if token == loaded.tokenizer.eos_token_id:
            self._finish_row(row, "stop", loaded)
            return True
        row.count += 1
        row.generated.append(token)
        if row.first_at is None:
            row.first_at = time.monotonic()
        delta = row.reply.push(token)
        if delta:
            row.job.emit(TokenDelta(delta, mean_logprob=_mean(row.logprob_sum, row.logprob_n)))
        if row.reply.stopped:
            self._finish_row(row, "stop", loaded)
            return True
        if row.count >= row.max_new:
            self._finish_row(row, "length", loaded)
            return True
        row.next_token = token
        return False

    # --- ending replies ------------------------------------------------------------------------

    def _finish_row(self, row: Row, reason: str, loaded: LoadedModel, error: str = "") -> None:
        self.finish_job(
            row.job,
            reason,
            reply=row.reply,
            loaded=loaded,
            error=error,
            count=row.count,
            mean_logprob=_mean(row.logprob_sum, row.logprob_n),
            first_at=row.first_at,
        )

    def finish_job(
        self,
        job: Job,
        reason: str,
        *,
        reply: ReplyText | None,
        loaded: LoadedModel | None,
        error: str = "",
        count: int = 0,
        mean_logprob: float | None = None,
        first_at: float | None = None,
    ) -> None:
        """Send the held-back tail and the final event; free the key first, so the next turn may start."""
        if reply is not None and not reply.stopped:
            tail = reply.flush()
            if tail:
                job.emit(TokenDelta(tail))
        with self.scheduler.cond:
            self.scheduler.release(job)
        end = time.monotonic()
        job.emit(
            GenerationDone(
                text=reply.text if reply is not None else "",
                finish_reason=reason,
                token_count=count,
                mean_logprob=mean_logprob,
                model_label=loaded.label if loaded is not None else "",
                first_token_ms=int((first_at - job.submitted) * 1000) if first_at else None,
                latency_ms=int((end - job.submitted) * 1000),
                error=error,
            )
        )

    def fail_all(self, error: str) -> None:
        """A batch step failed: every running row ends with an error; the engine starts afresh."""
        pending, self.pending = self.pending, []
        for item in pending:
            self.finish_job(item.row.job, "error", reply=item.row.reply, loaded=item.batch.loaded, error=error)
        for batch in self.batches:
            for row in batch.rows:
                self.finish_job(
                    row.job,
                    "error",
                    reply=row.reply,
                    loaded=batch.loaded,
                    error=error,
                    count=row.count,
                    mean_logprob=_mean(row.logprob_sum, row.logprob_n),
                    first_at=row.first_at,
                )
        self.batches = []


def _mean(total: float, count: int) -> float | None:
    return total / count if count else None


def _choose(logits, rows: list[Row]) -> tuple[list[int], list[float]]:
    """Each row's next token (greedy, or sampled with its temperature and top-p) and its log-probability.

    Each row's repetition controls act on its logits first (one small operation per row
    with controls). The log-probability is that of the distribution the token is chosen
    from before temperature, as ``NaiveEngine`` reports it: the confidence measure the
    reply policy and the low-confidence handoff read.
    """
    import torch

    logits = logits.float()
    for i, row in enumerate(rows):
        if row.processors is not None and row.generated:
            logits[i] = apply_to_row(row.processors, row.generated, logits[i])
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = torch.argmax(logits, dim=-1)
    for i, row in enumerate(rows):
        params = row.job.request.params
        if params.temperature > 0:
            chosen[i] = _sample(logits[i], params)
    picked = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    return chosen.tolist(), picked.tolist()


def _sample(logits, params: GenerationParams) -> int:
    """One token from ``softmax(logits / temperature)``, restricted to the top-p nucleus."""
    import torch

    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1))
