"""Reply quality on the validation split: what customers would get from a model, beside plain retrieval.

The quality gate's numbers (``finetune.services.gates``), the run page's evaluation
progress and ``bench/bench_quality.py`` all come from here. Plain Python, no Django.

A model's row is its *served path*, built from the same parts as serving:

1. the conversation is grounded on the nearest training exchanges
   (``grounding.ground_conversation``: the one prompt builder of training, evaluation and serving),
2. the reply starts with the closest answer's first sentence (``reply_prime``, when
   ``GroundingConfig.prime``), joined to the prompt as training joins a reply,
3. batched greedy generation with left padding and the repetition processors of serving
   (``decoding.repetition_processors``), recording each reply's mean token log-probability,
4. the repetition cut (``finetune.serving.repetition.cut_repetition``),
5. the reply policy (``reply_policy.choose_reply``): the model's words, a retrieved
   answer or a handoff, decided where serving decides (on the first sentence the model
   wrote after the prime, ``reply_policy.first_model_sentence``; ``served_row``),
6. placeholders filled with neutral words in the reply's language (the conversation's
   unless the reply's own text tells another, as served) and the customer's own values
   (``knowledge.fill_neutral``); the reference and retrieved answers are filled the same way.

Metrics per row: ROUGE-L F1 against the agent's reply, intent accuracy (the dataset's
``IntentClassifier`` labels each reply; compared with the example's intent; None
without a classifier), replies showing a template slot, replies repeating themselves,
and how many replies the model, retrieval and handoffs supplied.

The retrieval rows need no model: ``retrieval`` is the answer of the nearest training
exchange ("looking up the nearest old ticket", the baseline the gate requires the
candidate to beat); ``retrieval-consensus`` is the nearest same-intent answer most like
the others, shown so that a model whose replies are never chosen is visible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .decoding import DecodingConfig
from .grounding import SEARCH_K, GroundedPrompt, GroundingConfig, ground, ground_conversation, reply_prime
from .knowledge import fill_neutral
from .reply_policy import (
    SOURCE_HANDOFF,
    SOURCE_MODEL,
    ReplyPolicyConfig,
    choose_reply,
    consensus,
    first_model_sentence,
    usable_answers,
)
from .retrieval import Neighbour, retrieval_query

# A template slot a customer must never see: "{{", "}}" or "[Slot Name]" (not a Markdown link "[text](url)").
SLOT_RE = re.compile(r"\{\{|\}\}|\[[A-Za-z][A-Za-z0-9 _/.'&-]{0,40}\](?!\()")
EXAMPLES_KEPT = 5  # example replies stored with each row (the admin shows them side by side)

Progress = Callable[[int, int], None]  # (replies done, replies in all)


@dataclass
class QualityExample:
    """One validation conversation, grounded and ready to be answered."""

    messages: list[dict[str, str]]  # the conversation before the agent's reply
    reference: str  # the agent's reply, filled
    intent: str
    values: dict[str, str]  # what the customer gave (order number...), for the filler
    language: str  # the conversation's (ISO 639-1): the filler's neutral words are in it, as served
    prompt: GroundedPrompt
    hits: list[Neighbour]  # the index's neighbours (the retrieval baseline; the policy's when grounded)
    grounded: bool

    @property
    def question(self) -> str:
        return retrieval_query(self.messages)


@dataclass
class QualityRow:
    name: str  # candidate, active, base, retrieval, retrieval-consensus
    label: str  # what people read: "v3 (candidate)", "retrieval: nearest past answer"
    n: int
    rouge_l: float | None
    intent_accuracy: float | None
    slot_leaks: int
    repeats: int
    model_replies: int = 0  # replies that are the model's words
    retrieved: int = 0  # replies that are a past answer (reply policy)
    handoffs: int = 0
    cut: int = 0  # model replies cut at a repetition
    seconds: float = 0.0
    tokens_per_second: float | None = None
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sample_indices(count: int, limit: int | None, seed: int = 0) -> list[int]:
    """A seeded, sorted sample of ``limit`` row numbers out of ``count`` (all when limit is None or larger)."""
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), limit))  # noqa: S311 - reproducible sampling


def prime_join(prime: str, tokenizer) -> str:
    """The text put after the rendered prompt for ``prime``: joined as training joins a reply.

    The plain (GPT-2) template trains ``"Agent:" + " " + reply``; chat templates put the
    reply right after the assistant header. (Serving's engines join it the same way.)
    """
    from .prompting import uses_chat_template

    prime = (prime or "").strip()
    if not prime:
        return ""
    return prime if uses_chat_template(tokenizer) else " " + prime


def join_prime(prime: str, continuation: str) -> str:
    """The whole reply: the prime, then what the model generated after it.

    The prime is a whole sentence (or line), and the generated text comes back stripped,
    so a space (a line break after a line) keeps them apart: "…order 123. I'm here…",
    not "…order 123.I'm here…".
    """
    head, tail = prime.rstrip(), continuation.strip()
    if not tail:
        return head.strip()
    if tail[0] in ".,;:!?)":
        return (head + tail).strip()
    return (head + ("\n" if prime.endswith("\n") else " ") + tail).strip()


def quality_examples(
    conversations: Sequence[Sequence[dict[str, str]]],
    intents: Sequence[str],
    index,
    tokenizer,
    *,
    grounding: GroundingConfig | None = None,
    grounded: bool = True,
    exclude: Sequence[int | None] | None = None,
) -> list[QualityExample]:
    """Ground every usable validation conversation (last turn: the agent's reply).

    ``index`` is the training split's ``RetrievalIndex`` (the retrieval baseline needs it
    even for an ungrounded model); ``grounded`` False (a version trained without grounding)
    keeps the plain prompt and gives the reply policy no neighbours, as its serving does.
    ``exclude`` gives each conversation's own row in ``index`` (``grounded_data.own_positions``)
    for a development sample drawn from the training split: as in grounded training, an
    example never sees its own exchange, neither in its prompt nor among the policy's answers.
    """
    if exclude is not None and len(exclude) != len(conversations):
        raise ValueError("exclude must give one index row (or None) per conversation")
    from finetune.serving.placeholders import customer_values, reply_language

    from .prompting import normalise_messages

    grounding = grounding or GroundingConfig()
    examples = []
    for number, (raw, intent) in enumerate(zip(conversations, intents, strict=True)):
        own = exclude[number] if exclude is not None else None
        try:
            turns = normalise_messages(raw)
        except (ValueError, KeyError, TypeError):
            continue
        if len(turns) < 2 or turns[-1]["role"] != "agent" or not turns[-1]["content"].strip():
            continue
        before = turns[:-1]
        values = customer_values(before)
        language = reply_language(before)
        if grounded and index is not None:
            prompt, hits = ground_conversation(
                before, index, tokenizer, config=grounding, max_prompt_tokens=grounding.max_prompt_tokens, exclude=own
            )
        else:
            hits = index.search(retrieval_query(before), SEARCH_K, exclude=own) if index is not None else []
            prompt = ground(before, [], tokenizer, config=grounding, max_prompt_tokens=grounding.max_prompt_tokens)
        examples.append(
            QualityExample(
                messages=before,
                reference=fill_neutral(turns[-1]["content"], values, language),
                intent=intent or "",
                values=values,
                language=language,
                prompt=prompt,
                hits=hits,
                grounded=grounded and index is not None,
            )
        )
    return examples


def score_row(
    name: str,
    label: str,
    examples: Sequence[QualityExample],
    replies: Sequence[str],
    classifier,
    *,
    sources: Sequence[str] | None = None,
    origins: Sequence[str] | None = None,
    **extra: Any,
) -> QualityRow:
    """Score filled ``replies`` (one per example; "" for a handoff) against the references."""
    from finetune.serving.repetition import has_repetition

    from .evaluation import rouge_l

    n = len(examples)
    accuracy = None
    if classifier is not None and any(e.intent for e in examples):
        accuracy = classifier.accuracy(list(replies), [e.intent for e in examples])
    kept = []
    for i, (example, reply) in enumerate(zip(examples[:EXAMPLES_KEPT], replies, strict=False)):
        kept.append(
            {
                "question": example.question,
                "reference": example.reference,
                "reply": reply,
                "source": sources[i] if sources else "retrieved",
                "origin": origins[i] if origins else "",
            }
        )
    return QualityRow(
        name=name,
        label=label,
        n=n,
        rouge_l=None if not n else round(sum(map(rouge_l, replies, [e.reference for e in examples])) / n, 4),
        intent_accuracy=None if accuracy is None else round(accuracy, 4),
        slot_leaks=sum(bool(SLOT_RE.search(r)) for r in replies),
        repeats=sum(has_repetition(r) for r in replies if r),
        examples=kept,
        **extra,
    )


def retrieval_rows(
    examples: Sequence[QualityExample], classifier, policy: ReplyPolicyConfig | None = None
) -> list[QualityRow]:
    """The nearest training answer (the baseline), and the consensus of the nearest same-intent answers."""
    policy = policy or ReplyPolicyConfig()
    top, top_origins, agreed, agreed_origins = [], [], [], []
    for example in examples:
        nearest = example.hits[0] if example.hits else None
        top.append(fill_neutral(nearest.exchange.reply, example.values, example.language) if nearest else "")
        top_origins.append(nearest.exchange.origin if nearest else "")
        answers, _ = usable_answers(example.hits, policy)
        if answers:
            best = answers[consensus([a.exchange.reply for a in answers])]
            agreed.append(fill_neutral(best.exchange.reply, example.values, example.language))
            agreed_origins.append(best.exchange.origin)
        else:
            agreed.append(top[-1])
            agreed_origins.append(top_origins[-1])
    n = len(examples)
    return [
        score_row(
            "retrieval",
            "Retrieval: the nearest past answer",
            examples,
            top,
            classifier,
            origins=top_origins,
            retrieved=sum(bool(t) for t in top),
            handoffs=sum(not t for t in top),
        ),
        score_row(
            "retrieval-consensus",
            f"Retrieval: the nearest same-intent answer most like the others (of {policy.consensus_answers})",
            examples,
            agreed,
            classifier,
            origins=agreed_origins,
            retrieved=sum(bool(t) for t in agreed),
            handoffs=n - sum(bool(t) for t in agreed),
        ),
    ]


class _LogprobRecorder:
    """A logits processor, last in the list, that records each row's log-probability of its greedy choice."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        import torch

        logprobs = scores.float().max(dim=-1).values - torch.logsumexp(scores.float(), dim=-1)
        self.steps.append(logprobs)
        return scores


def generate_scored(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    decoding=None,
    device: str = "cpu",
    autocast: Callable | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Greedy replies, batched with left padding (prompts grouped by length), with the repetition
    processors of serving and each reply's mean token log-probability.

    Returns, per prompt in order: ``{"text", "mean_logprob", "tokens"}``; ``text`` is cut at
    the first stop sequence (a new turn label or an end marker).
    """
    import torch

    from .decoding import repetition_processors
    from .evaluation import cut_at_stop
    from .prompting import stop_sequences

    stops = tuple(dict.fromkeys((*stop_sequences(tokenizer), tokenizer.eos_token or "", tokenizer.pad_token or "")))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues at the right edge of every row
    done = 0
    if progress is not None:
        progress(0, len(prompts))
    try:
        for start in range(0, len(order), batch_size):
            ids = order[start : start + batch_size]
            encoded = tokenizer([prompts[i] for i in ids], return_tensors="pt", padding=True, add_special_tokens=False)
            encoded = encoded.to(device)
            width = encoded["input_ids"].shape[1]
            processors = repetition_processors(width, decoding)
            recorder = _LogprobRecorder()
            processors.append(recorder)
            context = autocast() if autocast is not None else nullcontext()
            with torch.inference_mode(), context:
                output = model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    logits_processor=processors,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            logprobs = torch.stack(recorder.steps, dim=1) if recorder.steps else None
            for row, i in enumerate(ids):
                new = output[row, width:]
                ended = (new == tokenizer.eos_token_id).nonzero()
                # Tokens up to and including the EOS that ended the reply; the padding after it is no choice.
                n_real = int(ended[0]) + 1 if len(ended) else int(new.shape[0])
                mean = float(logprobs[row, :n_real].mean()) if logprobs is not None and n_real else None
                text = cut_at_stop(tokenizer.decode(new[:n_real], skip_special_tokens=False), stops)
                results[i] = {"text": text, "mean_logprob": mean, "tokens": n_real}
            done += len(ids)
            if progress is not None:
                progress(done, len(prompts))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return results  # type: ignore[return-value]


class GenerationCache:
    """A model's generated replies by prompt, in a JSON-lines file: re-scoring a sample under
    another reply policy, or a sample that shares prompts with an earlier one, generates nothing.

    Greedy decoding gives one reply per prompt, so a reply is keyed by its prompt text (the
    prime included) within a file named by ``identity``: what else the reply depends on
    (the weights, the decoding, ``max_new_tokens``; see ``settings_key``). Batching may move a
    reply by a rounding error (left padding changes the float sums), which a cache freezes.
    A line that cannot be read is skipped: that reply is generated again.
    """

    def __init__(self, directory: str | Path, identity: str):
        self.path = Path(directory) / f"generated-{identity}.jsonl"
        self._items: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    item = json.loads(line)
                    self._items[item["key"]] = {k: item[k] for k in ("text", "mean_logprob", "tokens")}
                except (ValueError, KeyError, TypeError):
                    continue

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def key(prompt: str) -> str:
        return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]

    def get(self, prompt: str) -> dict[str, Any] | None:
        item = self._items.get(self.key(prompt))
        return dict(item) if item is not None else None

    def put_many(self, prompts: Sequence[str], results: Sequence[dict[str, Any]]) -> None:
        lines = []
        for prompt, result in zip(prompts, results, strict=True):
            item = {"text": result["text"], "mean_logprob": result["mean_logprob"], "tokens": result["tokens"]}
            self._items[self.key(prompt)] = item
            lines.append(json.dumps({"key": self.key(prompt), **item}, ensure_ascii=False))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))


def generate_for(
    model,
    tokenizer,
    examples: Sequence[QualityExample],
    *,
    grounding: GroundingConfig | None = None,
    decoding=None,
    max_new_tokens: int = 160,
    batch_size: int = 8,
    device: str = "cpu",
    autocast: Callable | None = None,
    progress: Progress | None = None,
    cache: GenerationCache | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """The model's raw replies to ``examples`` (primed, cut at a repetition) and the seconds it took.

    Each item: ``{"text", "mean_logprob", "tokens", "cut", "raw", "cached"}``; ``text`` starts
    with the prime. With ``cache``, only prompts it lacks are generated (and added to it); the
    seconds are those of the generation that ran.
    """
    from finetune.serving.repetition import cut_repetition

    grounding = grounding or GroundingConfig()
    primes = [reply_prime(e.prompt) if (grounding.prime and e.grounded) else "" for e in examples]
    prompts = [e.prompt.text + prime_join(p, tokenizer) for e, p in zip(examples, primes, strict=True)]
    found = [cache.get(p) if cache is not None else None for p in prompts]
    missing = [i for i, item in enumerate(found) if item is None]
    started = time.perf_counter()
    fresh = []
    if missing:  # all cached: the model is not needed (None will do)
        fresh = generate_scored(
            model,
            tokenizer,
            [prompts[i] for i in missing],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            decoding=decoding,
            device=device,
            autocast=autocast,
            progress=progress,
        )
    elif progress is not None:
        progress(0, 0)
    seconds = time.perf_counter() - started
    if cache is not None and missing:
        cache.put_many([prompts[i] for i in missing], fresh)
    generated: list[dict[str, Any]] = [{**item, "cached": True} if item is not None else {} for item in found]
    for i, result in zip(missing, fresh, strict=True):
        generated[i] = {**result, "cached": False}
    for prime, result in zip(primes, generated, strict=True):
        raw = join_prime(prime, result["text"]) if prime else result["text"]
        trimmed = cut_repetition(raw)
        result.update(text=trimmed.text, cut=bool(trimmed.cut), raw=raw, prime=prime.strip())
    return generated, seconds


def served_row(
    name: str,
    label: str,
    examples: Sequence[QualityExample],
    generated: Sequence[dict[str, Any]],
    classifier,
    *,
    policy: ReplyPolicyConfig | None = None,
    seconds: float = 0.0,
) -> QualityRow:
    """What customers get from ``generated`` under ``policy`` (``reply_policy.choose_reply``), filled and scored.

    Decided where serving decides (``finetune.serving.safety.ReplyPipeline``): on the reply up
    to the first sentence the model wrote after the prime (``first_model_sentence``,
    ``partial=True``), and on the whole reply when it has no complete sentence there. A model
    reply kept at that point goes out whole. (Serving passes the mean log-probability of the
    tokens so far; here the whole reply's: it matters only to the fallback and handoff rules.)
    """
    policy = policy or ReplyPolicyConfig()
    replies, sources, origins = [], [], []
    for example, result in zip(examples, generated, strict=True):
        text, mean_logprob = result["text"], result["mean_logprob"]
        first = first_model_sentence(text, result.get("prime", "")) if example.grounded else None
        if first is not None:
            choice = choose_reply(first, mean_logprob, example.hits, policy, partial=True)
            if choice.source == SOURCE_MODEL:
                choice = dataclasses.replace(choice, text=text)  # the rest of the reply streams on
        else:
            choice = choose_reply(text, mean_logprob, example.hits if example.grounded else [], policy)
        replies.append(
            fill_neutral(choice.text, example.values, example.language) if choice.source != SOURCE_HANDOFF else ""
        )
        sources.append(choice.source)
        origins.append(choice.origin)
    tokens = sum(r["tokens"] for r in generated if not r.get("cached"))  # the rate of what was generated now
    return score_row(
        name,
        label,
        examples,
        replies,
        classifier,
        sources=sources,
        origins=origins,
        model_replies=sources.count(SOURCE_MODEL),
        retrieved=sum(s not in (SOURCE_MODEL, SOURCE_HANDOFF) for s in sources),
        handoffs=sources.count(SOURCE_HANDOFF),
        cut=sum(bool(r.get("cut")) for r in generated),
        seconds=round(seconds, 1),
        tokens_per_second=round(tokens / seconds, 1) if seconds > 0 and tokens else None,
    )


def model_row(
    name: str,
    label: str,
    model,
    tokenizer,
    examples: Sequence[QualityExample],
    classifier,
    *,
    grounding: GroundingConfig | None = None,
    decoding=None,
    policy: ReplyPolicyConfig | None = None,
    max_new_tokens: int = 160,
    batch_size: int = 8,
    device: str = "cpu",
    autocast: Callable | None = None,
    progress: Progress | None = None,
) -> QualityRow:
    """A model's served path on ``examples`` (see the module docstring), scored."""
    generated, seconds = generate_for(
        model,
        tokenizer,
        examples,
        grounding=grounding,
        decoding=decoding,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
        autocast=autocast,
        progress=progress,
    )
    return served_row(name, label, examples, generated, classifier, policy=policy, seconds=seconds)


def settings_key(**settings: Any) -> str:
    """A short stable key for what a cached row depends on."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_rows(directory: str | Path, key: str, compute: Callable[[], list[QualityRow]]) -> list[dict[str, Any]]:
    """Rows from ``directory/quality-<key>.json`` when present, else computed and written there.

    The retrieval rows depend only on the dataset and the evaluation settings, so a
    dataset computes them once; a directory that cannot be written just goes uncached.
    """
    path = Path(directory) / f"quality-{key}.json"
    if path.exists():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    rows = [row.to_json() for row in compute()]
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass
    return rows


def split_column(dataset_path: str | Path, split: str, column: str) -> list[Any] | None:
    """A column of a saved split (None when the split or the column is absent)."""
    from datasets import Dataset

    split_dir = Path(dataset_path) / split
    try:
        state = json.loads((split_dir / "state.json").read_text(encoding="utf-8"))
        if not state.get("_data_files"):
            return []
        data = Dataset.load_from_disk(str(split_dir))
    except (OSError, ValueError):
        return None
    return list(data[column]) if column in data.column_names else None


class QualityEvaluation:
    """A run's quality evaluation: the validation sample, its retrieval rows, and model rows on demand.

    ``config`` is the run's ``TrainConfig`` (``eval_generate_samples``, ``seed``,
    ``eval_max_new_tokens``, ``grounding_config()``, ``policy_config()``, ``batch_size``).
    Every model evaluated with one instance sees the same examples, prompts and policy.
    """

    VERSION = 1  # bump when what a cached retrieval row means changes

    def __init__(self, examples, classifier, config, *, indices, grounded, retrieval, key):
        self.examples: list[QualityExample] = examples
        self.classifier = classifier
        self.config = config
        self.indices = indices
        self.grounded = grounded
        self.retrieval: list[dict[str, Any]] = retrieval
        self.key = key
        # The decoding every version is evaluated and served with (train_config.json's "decoding").
        self.decoding = DecodingConfig()

    @classmethod
    def for_dataset(cls, dataset_path, val_rows, train_rows, tokenizer, config, knowledge) -> QualityEvaluation:
        from .retrieval import RetrievalIndex, exchanges_from_conversations

        intents = split_column(dataset_path, "validation", "intent") or [""] * len(val_rows)
        if len(intents) != len(val_rows):
            intents = [""] * len(val_rows)
        indices = sample_indices(len(val_rows), config.eval_generate_samples, config.seed)
        grounded = knowledge.index is not None and config.grounding_neighbours > 0
        index = knowledge.index
        if index is None and indices:
            # An old dataset without an index still gets its retrieval baseline (built here, not saved).
            exchanges = exchanges_from_conversations(train_rows)
            index = RetrievalIndex.build(exchanges) if exchanges else None
        grounding = config.grounding_config()
        policy = config.policy_config()
        examples = quality_examples(
            [val_rows[i] for i in indices],
            [intents[i] for i in indices],
            index,
            tokenizer,
            grounding=grounding,
            grounded=grounded,
        )
        key = settings_key(
            version=cls.VERSION,
            indices=indices,
            policy=policy.to_json(),
            classifier=knowledge.classifier is not None,
            dataset=str(Path(dataset_path).resolve()),
        )
        retrieval: list[dict[str, Any]] = []
        if examples and index is not None:
            retrieval = cached_rows(dataset_path, key, lambda: retrieval_rows(examples, knowledge.classifier, policy))
        return cls(
            examples, knowledge.classifier, config, indices=indices, grounded=grounded, retrieval=retrieval, key=key
        )

    def model_row(self, name, label, model, tokenizer, *, device="cpu", autocast=None, progress=None) -> QualityRow:
        return model_row(
            name,
            label,
            model,
            tokenizer,
            self.examples,
            self.classifier,
            grounding=self.config.grounding_config(),
            decoding=self.decoding,
            policy=self.config.policy_config(),
            max_new_tokens=self.config.eval_max_new_tokens,
            batch_size=max(self.config.batch_size, 8),
            device=device,
            autocast=autocast,
            progress=progress,
        )

    def summary(self, **rows: dict[str, Any] | None) -> dict[str, Any]:
        """What the version's metrics keep: every row by name, and what they were measured on."""
        table = {r["name"]: r for r in self.retrieval}
        table.update({name: row for name, row in rows.items() if row is not None})
        return {
            "key": self.key,
            "examples": len(self.examples),
            "validation_rows": self.indices,
            "grounded": self.grounded,
            "intent_classifier": self.classifier is not None,
            "policy": self.config.policy_config().to_json(),
            "max_new_tokens": self.config.eval_max_new_tokens,
            "rows": table,
        }

    def samples(self, candidate: dict[str, Any] | None) -> list[dict[str, Any]]:
        """The first replies of the candidate beside the retrieval baseline's (the run page's samples)."""
        if not candidate:
            return []
        retrieval = self.retrieval[0]["examples"] if self.retrieval else []
        out = []
        for i, item in enumerate(candidate["examples"]):
            out.append(
                {
                    "question": item["question"],
                    "reference": item["reference"],
                    "model": item["reply"],
                    "source": item["source"],
                    "retrieval": retrieval[i]["reply"] if i < len(retrieval) else "",
                }
            )
        return out
