"""The batched engine: its output equals the naive reference, and every limit holds.

Real tiny models (GPT-2 and Llama-style), real threads, real asyncio streams.
"""

from __future__ import annotations

import asyncio

import pytest

from finetune.serving.batched import BatchedEngine
from finetune.serving.interface import EngineBusy, GenerationDone, TokenDelta
from finetune.serving.naive import NaiveEngine
from finetune.serving.text import prompt_ids_for, token_budget
from tests.finetune.serving.engine_models import (
    QUESTIONS,
    assert_same_reply,
    collect,
    conversation,
    load,
    naive_replies,
    request,
    tiny_gpt2_dir,
    tiny_llama_dir,
    wait_for,
)

# --- batched == naive ---------------------------------------------------------------------


@pytest.mark.parametrize("model_dir", [tiny_gpt2_dir, tiny_llama_dir], ids=["gpt2", "llama"])
async def test_concurrent_batched_replies_equal_naive_greedy_replies(model_dir):
    loaded = load(model_dir())
    conversations = [conversation(q) for q in QUESTIONS]
    conversations.append(conversation("And when will it arrive?", "Where is my order?", "It has shipped."))
    want = await naive_replies(loaded, conversations, max_new_tokens=24)
    engine = BatchedEngine(loaded, max_batch_size=8)
    try:
        # Prompts of different lengths in one batch: left padding, per-row positions.
        got = await asyncio.gather(
            *(collect(engine, request(f"c{i}", m, max_new_tokens=24)) for i, m in enumerate(conversations))
        )
    finally:
        engine.close(timeout=10)
    for (_, g), w in zip(got, want, strict=True):
        assert_same_reply(g, w)
        assert g.model_label == "v1"
        assert g.first_token_ms is not None
        assert g.first_token_ms <= g.latency_ms
    assert engine.steps < sum(g.token_count for _, g in got)  # rows really shared steps


async def test_requests_join_a_running_batch_between_steps(engine, gpt2):
    conversations = [conversation(q) for q in QUESTIONS[:3]]
    want = await naive_replies(gpt2, conversations, max_new_tokens=60)
    first = asyncio.create_task(collect(engine, request("a", conversations[0], max_new_tokens=60)))
    await wait_for(lambda: engine.steps >= 5)  # the first reply is mid-way
    later = [
        asyncio.create_task(collect(engine, request(k, m, max_new_tokens=60)))
        for k, m in zip("bc", conversations[1:], strict=True)
    ]
    await wait_for(lambda: engine.running == 3)  # all three decode in one batch
    results = [await task for task in (first, *later)]
    for (_, got), w in zip(results, want, strict=True):
        assert_same_reply(got, w)
    await wait_for(lambda: engine.running == 0)  # rows leave the batch right after their last event


async def test_a_full_batch_queues_requests_until_a_row_is_free(gpt2):
    engine = BatchedEngine(gpt2, max_batch_size=2)
    conversations = [conversation(q) for q in QUESTIONS[:4]]
    want = await naive_replies(gpt2, conversations, max_new_tokens=20)
    try:
        tasks = [
            asyncio.create_task(collect(engine, request(f"q{i}", m, max_new_tokens=20)))
            for i, m in enumerate(conversations)
        ]
        peak = 0
        while not all(t.done() for t in tasks):
            peak = max(peak, engine.running)
            await asyncio.sleep(0.001)
        results = [t.result()[1] for t in tasks]
    finally:
        engine.close(timeout=10)
    assert peak <= 2
    for got, w in zip(results, want, strict=True):
        assert_same_reply(got, w)


async def test_follow_up_turns_reuse_the_cached_prefix_and_still_equal_naive(gpt2):
    engine = BatchedEngine(gpt2, max_batch_size=8)
    naive = NaiveEngine(gpt2)
    try:
        history: list[str] = []
        for question in QUESTIONS[:3]:
            messages = conversation(question, *history)
            _, want = await collect(naive, request("n", messages, max_new_tokens=30))
            _, got = await collect(engine, request("conv", messages, max_new_tokens=30))
            assert_same_reply(got, want)
            history += [question, got.text.strip() or "OK."]
        stats = engine.prefix_stats()
        # Turns 2 and 3 recomputed only their new tokens: the system prompt, the earlier
        # turns and most of the reply came from the cache.
        assert stats["hits"] == 2
        assert stats["reused_tokens"] > 60
        assert stats["entries"] == 1
    finally:
        engine.close(timeout=10)


@pytest.mark.parametrize("model_dir", [tiny_gpt2_dir, tiny_llama_dir], ids=["gpt2", "llama"])
async def test_prompts_prefilled_together_with_and_without_cached_prefixes_equal_naive(model_dir):
    loaded = load(model_dir())
    engine = BatchedEngine(loaded, max_batch_size=8)
    naive = NaiveEngine(loaded)
    try:
        # Earlier turns leave two conversations and the system prompt in the prefix cache.
        first = {}
        for key, question in (("a", QUESTIONS[0]), ("b", QUESTIONS[1])):
            _, done = await collect(engine, request(key, conversation(question), max_new_tokens=12))
            first[key] = done.text.strip() or "OK."
        hits_before, passes_before = engine.prefix_stats()["hits"], engine.prefills
        prompts = {
            "a": conversation("And the refund?", QUESTIONS[0], first["a"]),  # long cached prefix
            "b": conversation(QUESTIONS[2], QUESTIONS[1], first["b"]),
            "c": conversation(QUESTIONS[3]),  # only the system prompt is cached
            "d": [{"role": "system", "content": "Be terse."}, {"role": "customer", "content": "Hi"}],  # nothing
        }
        want = {k: (await collect(naive, request(f"n{k}", m, max_new_tokens=20)))[1] for k, m in prompts.items()}
        # Submitted together, so one padded prefill pass mixes cached and uncached prefixes.
        got = await asyncio.gather(*(collect(engine, request(k, m, max_new_tokens=20)) for k, m in prompts.items()))
        assert engine.prefix_stats()["hits"] - hits_before == 3
        assert engine.prefills - passes_before < len(prompts)  # prompts shared a prefill pass
    finally:
        engine.close(timeout=10)
    for key, (_, done) in zip(prompts, got, strict=True):
        assert_same_reply(done, want[key])


async def test_without_a_prefix_cache_nothing_is_reused(gpt2):
    engine = BatchedEngine(gpt2, prefix_cache_mb=0)
    try:
        for key in ("a", "b"):
            await collect(engine, request(key, conversation(QUESTIONS[0]), max_new_tokens=5))
        assert engine.prefix_stats()["hits"] == 0
    finally:
        engine.close(timeout=10)


# --- limits -------------------------------------------------------------------------------


async def test_stop_string_ends_the_reply_before_it(engine, gpt2):
    messages = conversation(QUESTIONS[0])
    (reference,) = await naive_replies(gpt2, [messages], max_new_tokens=40)
    stop = reference.text[12:16]  # a string the greedy reply is known to contain
    assert stop in reference.text
    deltas, done = await collect(engine, request("s", messages, max_new_tokens=40, stop=(stop,)))
    assert done.finish_reason == "stop"
    assert done.text == reference.text[: reference.text.index(stop)]
    assert stop not in "".join(deltas)


async def test_max_new_tokens_ends_the_reply_with_length(engine):
    _, done = await collect(engine, request("l", conversation(QUESTIONS[1]), max_new_tokens=7))
    assert (done.finish_reason, done.token_count) == ("length", 7)


async def test_cancel_stops_a_running_reply(engine):
    req = request("x", conversation(QUESTIONS[0]), max_new_tokens=400)
    events = []

    async def read():
        async for event in engine.stream(req):
            events.append(event)

    reader = asyncio.create_task(read())
    await wait_for(lambda: any(isinstance(e, TokenDelta) for e in events))
    await engine.cancel(req.request_id)
    await asyncio.wait_for(reader, 10)
    done = events[-1]
    assert isinstance(done, GenerationDone)
    assert done.finish_reason == "cancelled"
    assert 0 < done.token_count < 400
    await wait_for(lambda: engine.running == 0)


async def test_a_reader_that_goes_away_stops_generation_and_frees_the_key(engine):
    req = request("gone", conversation(QUESTIONS[0]), max_new_tokens=400)
    stream = engine.stream(req)
    first = await anext(stream)
    assert isinstance(first, TokenDelta)
    await stream.aclose()  # the consumer's task was cancelled: the customer left
    await wait_for(lambda: not engine.is_busy("gone"))
    await wait_for(lambda: engine.running == 0)
    _, done = await collect(engine, request("gone", conversation(QUESTIONS[1]), max_new_tokens=3))
    assert done.finish_reason == "length"


async def test_timeout_ends_a_reply_that_runs_too_long(engine):
    _, done = await collect(engine, request("t", conversation(QUESTIONS[0]), max_new_tokens=480, timeout_s=0.05))
    assert done.finish_reason == "timeout"
    assert done.token_count < 480
    assert done.text  # what was generated before the limit is kept


async def test_a_queued_request_times_out_without_a_free_row(gpt2):
    engine = BatchedEngine(gpt2, max_batch_size=1)
    busy_request = request("busy", conversation(QUESTIONS[0]), max_new_tokens=480)
    try:
        busy = asyncio.create_task(collect(engine, busy_request))
        await wait_for(lambda: engine.running == 1)
        _, done = await collect(engine, request("late", conversation(QUESTIONS[1]), timeout_s=0.05))
        assert (done.finish_reason, done.token_count, done.text) == ("timeout", 0, "")
        assert engine.running == 1  # the running reply was not disturbed
        await engine.cancel(busy_request.request_id)
        assert (await busy)[1].finish_reason == "cancelled"
    finally:
        engine.close(timeout=10)


async def test_one_generation_at_a_time_per_conversation(engine):
    # Long enough to be still running when the second request comes (a step of the tiny model
    # takes about a millisecond: 50 tokens could be done before the next line runs).
    first = engine.stream(request("conv-1", conversation(QUESTIONS[0]), max_new_tokens=400))
    await anext(first)
    with pytest.raises(EngineBusy):
        await anext(engine.stream(request("conv-1", conversation(QUESTIONS[1]))))
    _, other = await collect(engine, request("conv-2", conversation(QUESTIONS[1]), max_new_tokens=5))
    assert other.finish_reason == "length"  # other conversations are not held up
    rest = [event async for event in first]
    assert isinstance(rest[-1], GenerationDone)
    _, again = await collect(engine, request("conv-1", conversation(QUESTIONS[2]), max_new_tokens=5))
    assert again.finish_reason == "length"


async def test_a_failing_request_ends_with_error_and_the_batch_goes_on(engine):
    good = asyncio.create_task(collect(engine, request("ok", conversation(QUESTIONS[0]), max_new_tokens=30)))
    _, bad = await collect(engine, request("bad", [{"role": "robot", "content": "hi"}]))
    assert bad.finish_reason == "error"
    assert "Unknown role 'robot'" in bad.error
    _, done = await good
    assert (done.finish_reason, done.token_count) == ("length", 30)


async def test_a_prompt_that_cannot_join_the_batch_ends_with_error_instead_of_waiting_forever(gpt2, monkeypatch):
    """Fault injection: adding prefilled rows to the batch fails (a broken cache). The rows are
    out of the pending list and not in the batch; they must still get their final event, and
    the rows already running end with the error too (the engine starts afresh)."""
    from finetune.serving.kv import KVBatch

    engine = BatchedEngine(gpt2, max_batch_size=8)
    try:
        running = asyncio.ensure_future(collect(engine, request("a", conversation(QUESTIONS[0]), max_new_tokens=60)))
        await wait_for(lambda: engine.steps >= 2, timeout=60)

        def broken(self, items):
            raise RuntimeError("Sizes of tensors must match")

        monkeypatch.setattr(KVBatch, "add", broken)
        _, late = await asyncio.wait_for(collect(engine, request("b", conversation(QUESTIONS[1]))), 30)
        _, first = await asyncio.wait_for(running, 30)
        assert (late.finish_reason, first.finish_reason) == ("error", "error")
        assert "Sizes of tensors must match" in late.error
        monkeypatch.undo()
        _, again = await asyncio.wait_for(collect(engine, request("c", conversation(QUESTIONS[2]))), 30)
        assert again.finish_reason in {"length", "stop"}  # the engine serves the next request
    finally:
        engine.close(timeout=10)


async def test_sampling_uses_temperature_and_top_p(engine):
    _, done = await collect(
        engine, request("sample", conversation(QUESTIONS[0]), max_new_tokens=10, temperature=0.8, top_p=0.9)
    )
    assert (done.finish_reason, done.token_count) == ("length", 10)
    assert done.mean_logprob < 0


# --- reload -------------------------------------------------------------------------------


async def test_swap_serves_new_requests_on_the_new_model_and_finishes_running_ones_on_the_old(engine, gpt2):
    new = load(tiny_gpt2_dir(seed=1), label="v2")
    messages = conversation(QUESTIONS[0])
    (old_ref,) = await naive_replies(gpt2, [messages], max_new_tokens=80)
    (new_ref,) = await naive_replies(new, [messages], max_new_tokens=20)
    running = asyncio.create_task(collect(engine, request("old", messages, max_new_tokens=80)))
    await wait_for(lambda: engine.steps >= 3)
    engine.swap(new)
    assert engine.model_label == "v2"
    _, after = await collect(engine, request("new", messages, max_new_tokens=20))
    _, before = await running
    assert before.model_label == "v1"
    assert_same_reply(before, old_ref)  # not cut short, not switched mid-reply
    assert after.model_label == "v2"
    assert_same_reply(after, new_ref)


async def test_a_short_prompt_is_prefilled_before_a_long_one_that_came_first(gpt2):
    """One step prefills at most ``prefill_tokens`` prompt tokens, fewest tokens left first: a
    long prompt goes in chunks, and a normal customer's prompt arriving after it gets its first
    token first instead of waiting for the whole long prefill."""
    engine = BatchedEngine(gpt2, max_batch_size=8, prefill_tokens=8, prefill_whole_tokens=16, prefix_cache_mb=0)
    try:
        long = conversation(" ".join(f"parcel{i} is late" for i in range(120)))
        short = conversation("Where is my order?")
        order: list[str] = []

        async def first_token(key: str, messages) -> GenerationDone:
            done = None
            async for event in engine.stream(request(key, messages, max_new_tokens=4)):
                if isinstance(event, TokenDelta) and key not in order:
                    order.append(key)
                elif isinstance(event, GenerationDone):
                    done = event
            return done

        started = asyncio.ensure_future(first_token("long", long))
        await wait_for(lambda: engine.prefills >= 1, timeout=60)  # the long prompt's first chunk is done
        long_done, short_done = await asyncio.gather(started, first_token("short", short))
        assert order[0] == "short"
        assert (long_done.finish_reason, short_done.finish_reason) in {("length", "length"), ("length", "stop")}
        long_tokens = len(prompt_ids_for(gpt2, long, token_budget(512, 4)[0]))
        assert long_tokens > 400
        assert engine.prefills >= long_tokens // 8  # the long prompt went in chunks of at most 8 tokens
        # Chunked, the long prompt's reply is the one the naive engine gives from one pass.
        (want,) = await naive_replies(gpt2, [long], max_new_tokens=4)
        assert long_done.text == want.text
    finally:
        engine.close(timeout=10)


async def test_an_ordinary_prompt_first_in_line_is_prefilled_whole_and_a_longer_one_in_chunks(gpt2):
    """A prompt with at most ``prefill_whole_tokens`` to prefill goes in one pass however small
    the per-step chunk (chunking it would cost a pass's overhead per chunk); a longer one is
    chunked to the end, even once what is left of it would fit the whole-prompt limit."""
    ordinary = conversation(" ".join(f"parcel{i} is late" for i in range(10)))
    longer = conversation(" ".join(f"parcel{i} is late" for i in range(40)))
    ordinary_tokens = len(prompt_ids_for(gpt2, ordinary, token_budget(512, 4)[0]))
    longer_tokens = len(prompt_ids_for(gpt2, longer, token_budget(512, 4)[0]))
    assert 100 < ordinary_tokens < 200 < 400 < longer_tokens
    for messages, passes in ((ordinary, lambda n: n == 1), (longer, lambda n: n >= (longer_tokens - 200) // 8)):
        engine = BatchedEngine(gpt2, max_batch_size=8, prefill_tokens=8, prefill_whole_tokens=200, prefix_cache_mb=0)
        try:
            _, done = await collect(engine, request("c", messages, max_new_tokens=4))
            assert done.finish_reason in {"length", "stop"}
            assert passes(engine.prefills), engine.prefills
            (want,) = await naive_replies(gpt2, [messages], max_new_tokens=4)
            assert done.text == want.text
        finally:
            engine.close(timeout=10)


class _Gate:
    """A forward pre-hook on the model's last decoder layer that, once armed, holds the next
    pass of the wanted kind until a request waits to be admitted: a customer arriving in the
    middle of that pass, whatever the machine's speed."""

    def __init__(self, engine, kind: str):
        import threading

        self.engine, self.kind = engine, kind  # "chunk": a prompt chunk; "decode": a decode step
        self.armed, self.holding, self.released = threading.Event(), threading.Event(), threading.Event()

    def __call__(self, _module, args, kwargs):
        import time

        hidden = args[0] if args else kwargs["hidden_states"]
        decode = hidden.shape[1] == 1
        if not self.armed.is_set() or decode != (self.kind == "decode"):
            return None
        self.armed.clear()
        self.holding.set()
        deadline = time.monotonic() + 30
        while not self.engine._scheduler.waiting and time.monotonic() < deadline:  # noqa: SLF001 - the test's view
            time.sleep(0.001)
        self.released.set()
        return None


@pytest.mark.parametrize("model_dir", [tiny_gpt2_dir, tiny_llama_dir], ids=["gpt2", "llama"])
async def test_a_chunk_pass_gives_way_to_a_customer_who_arrives_while_it_runs(model_dir):
    """A long prompt's chunk pass in progress stops between two layers when a request arrives
    (it is computed again at the next step), so the newcomer waits for one layer, not a chunk;
    both replies are still the naive engine's."""
    from finetune.serving.kv import decoder_layers

    loaded = load(model_dir())
    engine = BatchedEngine(loaded, max_batch_size=8, prefill_tokens=8, prefill_whole_tokens=16, prefix_cache_mb=0)
    gate = _Gate(engine, "chunk")
    hook = decoder_layers(loaded.model)[-1].register_forward_pre_hook(gate, with_kwargs=True)
    try:
        long = conversation(" ".join(f"parcel{i} is late" for i in range(60)))
        short = conversation("Where is my order?")
        started = asyncio.ensure_future(collect(engine, request("long", long, max_new_tokens=4)))
        await wait_for(lambda: engine.prefills >= 2, timeout=60)  # chunking has begun
        gate.armed.set()
        await wait_for(gate.holding.is_set, timeout=30)  # a chunk pass is under way
        assert engine.preemptions == 0
        prefills_before = engine.prefills
        (_, short_done), (_, long_done) = await asyncio.gather(
            collect(engine, request("short", short, max_new_tokens=4)), started
        )
        assert gate.released.is_set()
        assert engine.preemptions >= 1  # the chunk gave way
        assert engine.prefills > prefills_before
        want_long, want_short = await naive_replies(loaded, [long, short], max_new_tokens=4)
        assert_same_reply(long_done, want_long)  # the stopped chunk was computed again, correctly
        assert_same_reply(short_done, want_short)
    finally:
        hook.remove()
        engine.close(timeout=10)


@pytest.mark.parametrize("model_dir", [tiny_gpt2_dir, tiny_llama_dir], ids=["gpt2", "llama"])
async def test_a_decode_step_gives_way_to_a_newcomer_and_its_cache_is_rewound(model_dir):
    """A decode step of running replies stops between two layers when a request arrives; the
    layers already run had written their keys and values in place, which are rewound: every
    reply, the running ones and the newcomer's, is still the naive engine's token for token."""
    from finetune.serving.kv import decoder_layers

    loaded = load(model_dir())
    engine = BatchedEngine(loaded, max_batch_size=8)
    gate = _Gate(engine, "decode")
    hook = decoder_layers(loaded.model)[-1].register_forward_pre_hook(gate, with_kwargs=True)
    try:
        running = [conversation(q) for q in QUESTIONS[:2]]
        newcomer = conversation(QUESTIONS[2])
        tasks = [
            asyncio.ensure_future(collect(engine, request(f"r{i}", m, max_new_tokens=30)))
            for i, m in enumerate(running)
        ]
        await wait_for(lambda: engine.steps >= 3, timeout=60)
        gate.armed.set()
        await wait_for(gate.holding.is_set, timeout=30)  # a decode step is under way
        steps_before = engine.steps
        late = await collect(engine, request("new", newcomer, max_new_tokens=30))
        results = [await task for task in tasks]
        assert engine.preemptions >= 1  # the step gave way
        want = await naive_replies(loaded, [*running, newcomer], max_new_tokens=30)
        for (_, got), w in zip([*results, late], want, strict=True):
            assert_same_reply(got, w)
        assert engine.steps > steps_before
    finally:
        hook.remove()
        engine.close(timeout=10)


@pytest.mark.parametrize("after_a_yield", [True, False], ids=["after-a-yield", "otherwise"])
def test_after_a_pass_gave_way_the_newcomer_goes_before_aged_long_prompts(gpt2, after_a_yield):
    """Long prompts age while they wait (so a stream of short ones cannot starve them), and an
    aged one goes before a short prompt. Right after a pass gave way to a newcomer, though, the
    newcomer goes first: an aged long prompt's chunk in its place could not give way again,
    and the newcomer would wait for all of it (0.66 s with chunks of 256 in the fairness bench)."""
    import time

    from finetune.serving.batched.runner import Runner
    from finetune.serving.batched.scheduler import Job, Scheduler

    loop = asyncio.new_event_loop()
    try:
        scheduler = Scheduler(gpt2, max_batch_size=8, prefill_tokens=8, prefill_whole_tokens=200)
        runner = Runner(scheduler, prefix_cache_bytes=0)

        def job(key: str, messages) -> Job:
            return Job(request(key, messages, max_new_tokens=4), loop, asyncio.Queue(), time.monotonic())

        runner.admit([job("long", conversation(" ".join(f"parcel{i} is late" for i in range(40))))], gpt2)
        (aged,) = runner.pending
        aged.skipped = 1000  # it has waited many steps
        runner.admit([job("short", conversation("Where is my order?"))], gpt2)
        runner.yielded = after_a_yield
        runner.prefill_some(8, scheduler.prefill_groups)
        short_done = [row.job.request.key for batch in runner.batches for row in batch.rows] == ["short"]
        assert short_done is after_a_yield
        assert (aged.reused > 0) is not after_a_yield  # the aged prompt's chunk ran instead
        assert runner.yielded is False  # the priority lasts one step
    finally:
        loop.close()
