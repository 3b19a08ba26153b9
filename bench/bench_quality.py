"""Reply quality on a validation split: a model's served path beside the retrieval baseline and the base model.

For each system it prints ROUGE-L (against the agent's reply), intent accuracy (a
classifier trained on the training split's replies labels each reply), replies
showing a template slot, replies repeating a sentence, and for models the share of
replies cut at a repetition or replaced by the retrieved answer (fallback).

Every reply goes the served way: a grounded prompt (``finetune.ml.grounding``),
batched greedy generation with left padding and the repetition controls
(``finetune.ml.decoding``), the repetition cut, the confidence fallback, then the
placeholder filler with demo company facts and the values the customer wrote. The
reference and the retrieval answer pass the same filler, so ROUGE-L compares like
with like.

Systems:
- ``retrieval``: the answer of the nearest training exchange (character n-gram
  TF-IDF, ``finetune.ml.retrieval``): the baseline to beat.
- ``retrieval-words``: the old baseline (``finetune.ml.evaluation.RetrievalBaseline``,
  word TF-IDF), for reference.
- ``base``: the base model, grounded the same way (``--base``).
- a model directory (``--model``, repeatable): a merged model, an adapter directory
  or a run directory (its ``merged/`` or ``adapter/`` is used).
- ``quick``: with ``--train-quick``, the quick adapter is trained first (timed) and evaluated.

The dataset defaults to the Bitext tickets (``../shared/data/bitext``), imported and
built with the project's own importer and dataset builder (redaction, seeded split)
into ``var/bench/quality/``, with the base model's tokenizer.

    python bench/bench_quality.py --limit 96                         # retrieval + base model, 96 seeded examples
    python bench/bench_quality.py --train-quick --limit 96           # + train and evaluate the quick adapter
    python bench/bench_quality.py --model var/models/runs/7 --json var/bench/quality.json   # full split
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a machine shared with other processes
# spinning threads steal the cores the busy ones need (3x slower here; docs/quality-research.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402 - after the OpenMP setting, which must precede torch's import
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BITEXT = ROOT.parent / "shared" / "data" / "bitext" / "customer_support_tickets.csv"
SYSTEM_PROMPT = (
    "You are the customer support assistant of {company}. Answer briefly and politely. "
    "If you are not sure, offer to connect the customer with a human agent."
)
# The demo company's facts: what the bot profile holds in the admin.
DEMO_FACTS = {
    "company_name": "Acme",
    "support_phone": "0800 555 0199",
    "support_email": "support@acme.example",
    "website_url": "acme.example",
    "support_hours": "Monday to Friday, 8:00 to 18:00",
    "returns_address": "Acme Returns, 1 Dock Road, Bristol",
}
SLOT_RE = re.compile(r"\{\{|\}\}|\[[A-Za-z][A-Za-z0-9 _/.'&-]{0,40}\](?!\()")


# --- data -------------------------------------------------------------------------------------


def build_bitext_dataset(csv_path: Path, out_dir: Path, tokenizer, tokenizer_name: str) -> Path:
    """The Bitext tickets through the project's importer and dataset builder (seed 0, 10% validation)."""
    from finetune.ml.dataset_builder import BuildOptions, SourceConversation, build_dataset
    from finetune.ml.importers import ParsedTicket, read_tickets
    from finetune.ml.prompting import system_prompt_text
    from finetune.ml.redaction import CustomerFields

    def conversations():
        for item in read_tickets(csv_path, "bitext"):
            if isinstance(item, ParsedTicket):
                yield SourceConversation(
                    origin=f"ticket:bitext:{item.external_id}",
                    messages=[{"role": m.role, "content": m.body} for m in item.messages],
                    intent=item.intent,
                    category=item.category,
                    tags=item.tags,
                    segment=item.customer_segment,
                    customer=CustomerFields.from_values(
                        name=item.customer_name,
                        email=item.customer_email,
                        phone=item.customer_phone,
                        address=item.customer_address,
                        identifiers=item.customer_identifiers,
                    ),
                )

    system = system_prompt_text(template=SYSTEM_PROMPT, company=DEMO_FACTS["company_name"])
    options = BuildOptions(out_dir=out_dir, tokenizer_name=tokenizer_name, system_prompt=system, max_length=1024)
    build_dataset(conversations(), tokenizer, options)
    return out_dir


@dataclass
class Split:
    messages: list
    intents: list[str]
    origins: list[str]


def load_split(dataset: Path, name: str) -> Split:
    from datasets import load_from_disk

    data = load_from_disk(str(dataset / name))
    return Split(list(data["messages"]), list(data["intent"]), list(data["origin"]))


# --- models ------------------------------------------------------------------------------------


def load_model(path: str, base: str):
    """A merged model, an adapter directory or a run directory, ready for generation."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.ml.training import load_tokenizer

    p = Path(path)
    if (p / "merged" / "config.json").exists():
        p = p / "merged"
    elif (p / "adapter" / "adapter_config.json").exists():
        p = p / "adapter"
    if (p / "adapter_config.json").exists():
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(p)).merge_and_unload()
        tokenizer = load_tokenizer(base)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
        tokenizer = load_tokenizer(str(p))
    model.eval()
    return model, tokenizer


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int, decoding) -> list[dict]:
    """Greedy replies, batched with left padding (prompts sorted by length), with mean token log-probability."""
    import torch

    from finetune.ml.decoding import repetition_processors
    from finetune.ml.evaluation import cut_at_stop
    from finetune.ml.prompting import stop_sequences

    stops = tuple(dict.fromkeys((*stop_sequences(tokenizer), tokenizer.eos_token or "")))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[dict | None] = [None] * len(prompts)
    tokenizer.padding_side = "left"
    for start in range(0, len(order), batch_size):
        ids = order[start : start + batch_size]
        encoded = tokenizer([prompts[i] for i in ids], return_tensors="pt", padding=True, add_special_tokens=False)
        width = encoded["input_ids"].shape[1]
        with torch.inference_mode():
            out = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                logits_processor=repetition_processors(width, decoding),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                return_dict_in_generate=True,
                output_scores=True,
            )
        scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        for row, i in enumerate(ids):
            new = out.sequences[row, width:]
            keep = new != tokenizer.pad_token_id
            # The EOS that ended the reply is a real choice; the padding after it is not.
            n_real = int(keep.sum()) + (1 if bool((~keep).any()) else 0)
            logprob = float(scores[row, :n_real].float().mean()) if n_real else float("-inf")
            text = cut_at_stop(tokenizer.decode(new, skip_special_tokens=False), stops)
            results[i] = {"raw": text, "mean_logprob": logprob, "tokens": int(keep.sum())}
    return results  # type: ignore[return-value]


# --- evaluation -------------------------------------------------------------------------------------


@dataclass
class SystemResult:
    name: str
    rouge_l: float
    intent_accuracy: float
    slot_leaks: int
    repeated: int
    cut: int = 0
    fallback: int = 0
    n: int = 0
    seconds: float = 0.0
    tokens_per_second: float | None = None
    extra: dict = field(default_factory=dict)


def score(name, replies, references, intents, classifier, **kw) -> SystemResult:
    from finetune.ml.evaluation import rouge_l
    from finetune.serving.repetition import has_repetition

    return SystemResult(
        name=name,
        rouge_l=round(sum(rouge_l(r, ref) for r, ref in zip(replies, references, strict=True)) / len(replies), 4),
        intent_accuracy=round(classifier.accuracy(replies, intents), 4),
        slot_leaks=sum(bool(SLOT_RE.search(r)) for r in replies),
        repeated=sum(has_repetition(r) for r in replies),
        n=len(replies),
        **kw,
    )


def served_replies(generated, grounded, facts_values, *, fallback_logprob: float | None, fallback_score: float):
    """Repetition cut, confidence fallback and placeholder filling, as serving does."""
    from finetune.serving.placeholders import fill_placeholders
    from finetune.serving.repetition import cut_repetition

    replies, cut, fell_back = [], 0, 0
    for gen, prompt, (facts, values) in zip(generated, grounded, facts_values, strict=True):
        result = cut_repetition(gen["raw"])
        text = result.text
        cut += result.cut
        top = prompt.used[0] if prompt.used else None
        low = fallback_logprob is not None and gen["mean_logprob"] < fallback_logprob
        if top is not None and (not text.strip() or (low and top.score >= fallback_score)):
            text = top.exchange.reply
            fell_back += 1
        replies.append(fill_placeholders(text, facts, values))
    return replies, cut, fell_back


def consensus(candidates: list[str]) -> int:
    """Index of the candidate most like the others (mean ROUGE-L): minimum-Bayes-risk selection."""
    from finetune.ml.evaluation import rouge_l

    if len(candidates) < 3:
        return 0
    totals = [sum(rouge_l(c, o) for j, o in enumerate(candidates) if j != i) for i, c in enumerate(candidates)]
    return max(range(len(candidates)), key=lambda i: (totals[i], -i))


def same_intent_answers(prompt, hits, k: int) -> list[str]:
    """The replies of the ``k`` nearest exchanges of the voted intent."""
    return [h.exchange.reply for h in hits if not prompt.intent or h.exchange.intent == prompt.intent][:k]


def evaluate_model(name, model, tokenizer, val_msgs, hits, refs, intents, classifier, facts_values, args):
    from finetune.ml.decoding import DecodingConfig
    from finetune.ml.grounding import GroundingConfig, ground, reply_prime
    from finetune.serving.repetition import has_repetition

    config = GroundingConfig(neighbours=args.neighbours, same_intent=not args.any_intent)
    budget = args.max_prompt_tokens
    grounded = []
    for turns, found in zip(val_msgs, hits, strict=True):
        grounded.append(
            ground(turns, found if args.neighbours > 0 else [], tokenizer, config=config, max_prompt_tokens=budget)
        )
    decoding = DecodingConfig(no_repeat_ngram_size=args.no_repeat_ngram, repetition_penalty=args.repetition_penalty)
    # Priming: the reply starts with the first sentence of the closest answer, so the model
    # continues on that answer's track (and its intent) instead of starting a ramble.
    primes = [reply_prime(g) if args.prime else "" for g in grounded]
    started = time.perf_counter()
    generated = generate(
        model,
        tokenizer,
        [g.text + p for g, p in zip(grounded, primes, strict=True)],
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        decoding=decoding,
    )
    seconds = time.perf_counter() - started
    tokens = sum(g["tokens"] for g in generated)
    for g, p in zip(generated, primes, strict=True):
        g["raw"] = (p + g["raw"]).strip() if p else g["raw"]
    results = []
    grid = [None] + list(args.fallback_grid)
    for threshold in grid:
        replies, cut, fell_back = served_replies(
            generated, grounded, facts_values, fallback_logprob=threshold, fallback_score=args.fallback_score
        )
        label = name if threshold is None else f"{name}+fallback<{threshold}"
        results.append(
            score(
                label,
                replies,
                refs,
                intents,
                classifier,
                cut=cut,
                fallback=fell_back,
                seconds=round(seconds, 1),
                tokens_per_second=round(tokens / seconds, 1),
                extra={"samples": replies[:3]} if threshold is None else {},
            )
        )
    # Consensus: the model's reply among the 3 nearest same-intent answers, the one most like the rest.
    from finetune.serving.placeholders import fill_placeholders
    from finetune.serving.repetition import cut_repetition

    chosen, picked_model = [], 0
    for gen, prompt, found, (facts, values) in zip(generated, grounded, hits, facts_values, strict=True):
        candidates = [cut_repetition(gen["raw"]).text, *same_intent_answers(prompt, found, 3)]
        best = consensus(candidates)
        picked_model += best == 0
        chosen.append(fill_placeholders(candidates[best], facts, values))
    results.append(
        score(f"{name}+consensus", chosen, refs, intents, classifier, extra={"model_reply_chosen": picked_model})
    )
    raw_replies = [g["raw"] for g in generated]
    results[0].extra["raw_repeated"] = sum(has_repetition(r) for r in raw_replies)
    results[0].extra["raw_slots"] = sum(bool(SLOT_RE.search(r)) for r in raw_replies)
    results[0].extra["generated"] = [
        {
            "raw": g["raw"],
            "mean_logprob": round(g["mean_logprob"], 4),
            "top_score": round(p.used[0].score, 4) if p.used else None,
        }
        for g, p in zip(generated, grounded, strict=True)
    ]
    results[0].extra["mean_logprob"] = round(sum(g["mean_logprob"] for g in generated) / len(generated), 4)
    return results


# --- quick adapter -------------------------------------------------------------------------------


def train_quick(args, dataset: Path, train: Split, index, out_dir: Path) -> tuple[Path, dict]:
    """Train the quick adapter on grounded prompts within ``--quick-seconds`` and save it; returns its stats."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.ml.grounded_data import grounded_examples
    from finetune.ml.grounding import GroundingConfig
    from finetune.ml.training import TrainConfig, fit, load_tokenizer

    tokenizer = load_tokenizer(args.base)
    prepared = time.perf_counter()
    examples = grounded_examples(
        train.messages,
        index,
        tokenizer,
        max_length=args.quick_max_length,
        config=GroundingConfig(neighbours=args.neighbours, same_intent=not args.any_intent),
        limit=args.quick_examples,
        seed=args.seed,
    )
    prepare_seconds = time.perf_counter() - prepared
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model.config.use_cache = False
    layers = model.config.num_hidden_layers
    first = layers - args.quick_layers if args.quick_layers else 0
    lora = LoraConfig(
        r=args.quick_r,
        lora_alpha=2 * args.quick_r,
        lora_dropout=0.0,
        target_modules=list(args.quick_targets.split(",")),
        layers_to_transform=list(range(first, layers)),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    config = TrainConfig(
        base_model=args.base,
        epochs=args.quick_epochs,
        batch_size=args.quick_batch,
        grad_accum_steps=1,
        learning_rate=args.quick_lr,
        max_length=args.quick_max_length,
        warmup_ratio=0.05,
        gradient_checkpointing=False,
        seed=args.seed,
    )
    deadline = time.monotonic() + args.quick_seconds
    steps_started = [0]

    def check_stop():  # called before every optimizer step
        if time.monotonic() > deadline:
            raise TimeoutError
        steps_started[0] += 1

    started = time.perf_counter()
    stats = None
    try:
        stats = fit(
            model, examples, config, device="cpu", autocast=None, pad_id=tokenizer.pad_token_id, check_stop=check_stop
        )
        stopped_early = False
    except TimeoutError:
        stopped_early = True
    seconds = time.perf_counter() - started
    adapter_dir = out_dir / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    info = {
        "examples": len(examples),
        "mean_tokens": round(sum(len(e.input_ids) for e in examples) / max(1, len(examples)), 1),
        "prepare_seconds": round(prepare_seconds, 1),
        "train_seconds": round(seconds, 1),
        "stopped_at_time_limit": stopped_early,
        "steps_done": steps_started[0],
        "approx_tokens_per_second": round(
            min(steps_started[0] * args.quick_batch, len(examples))
            * sum(len(e.input_ids) for e in examples)
            / max(1, len(examples))
            / max(seconds, 1e-9),
            1,
        ),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if stats is not None:
        info.update(
            {
                "optimizer_steps": stats.total_steps,
                "tokens_per_second": round(stats.tokens / max(stats.seconds, 1e-9), 1),
                "loss_first": round(stats.first_loss or 0, 4),
                "loss_last": round(stats.last_loss or 0, 4),
            }
        )
    (out_dir / "quick.json").write_text(json.dumps({**info, "args": vars(args)}, indent=2, default=str))
    return adapter_dir, info


# --- main --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", help="a dataset directory (build_dataset); default: the Bitext split")
    parser.add_argument(
        "--base", default=str(ROOT / "var/models/base/smollm2-135m-instruct"), help="base model directory"
    )
    parser.add_argument("--model", action="append", default=[], help="model, adapter or run directory (repeatable)")
    parser.add_argument("--no-base", action="store_true", help="skip the base model")
    parser.add_argument("--limit", type=int, default=None, help="seeded sample of validation examples (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--neighbours", type=int, default=2, help="retrieved exchanges in the prompt (0: none)")
    parser.add_argument("--any-intent", action="store_true", help="show neighbours of any intent")
    parser.add_argument("--max-prompt-tokens", type=int, default=768)
    parser.add_argument("--max-new-tokens", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-repeat-ngram", type=int, default=6)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--prime", action="store_true", help="start the reply with the closest answer's first sentence")
    parser.add_argument("--fallback-grid", type=float, nargs="*", default=[], help="mean log-prob thresholds to try")
    parser.add_argument("--fallback-score", type=float, default=0.3, help="min similarity of the retrieved answer")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--train-quick", action="store_true", help="train the quick adapter (timed), then evaluate it")
    parser.add_argument("--quick-seconds", type=float, default=170.0, help="training time limit (< 3 min)")
    parser.add_argument("--quick-examples", type=int, default=160)
    parser.add_argument("--quick-epochs", type=float, default=1.0)
    parser.add_argument("--quick-lr", type=float, default=1e-3)
    parser.add_argument("--quick-r", type=int, default=16)
    parser.add_argument("--quick-layers", type=int, default=0, help="LoRA on the top N layers only (0: all)")
    parser.add_argument("--quick-targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--quick-batch", type=int, default=4)
    parser.add_argument("--quick-max-length", type=int, default=768)
    parser.add_argument("--out", default=str(ROOT / "var/bench/quality"), help="work directory")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)

    import torch

    from finetune.ml.evaluation import RetrievalBaseline
    from finetune.ml.intent import IntentClassifier
    from finetune.ml.retrieval import RetrievalIndex, exchanges_from_conversations, retrieval_query
    from finetune.ml.training import load_tokenizer
    from finetune.serving.placeholders import customer_values, fill_placeholders

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.base)
    dataset = Path(args.dataset) if args.dataset else out / f"bitext-{Path(args.base).name}"
    if not (dataset / "dataset_dict.json").exists():
        print(f"Building the Bitext dataset in {dataset}", file=sys.stderr)  # noqa: T201
        build_bitext_dataset(BITEXT, dataset, tokenizer, args.base)
    train, val = load_split(dataset, "train"), load_split(dataset, "validation")
    if args.limit and args.limit < len(val.messages):
        pick = sorted(random.Random(args.seed).sample(range(len(val.messages)), args.limit))  # noqa: S311
        val = Split([val.messages[i] for i in pick], [val.intents[i] for i in pick], [val.origins[i] for i in pick])

    index_dir = dataset / "retrieval"
    exchanges = exchanges_from_conversations(train.messages, train.intents, train.origins)
    if (index_dir / "index.json").exists():
        index = RetrievalIndex.load(index_dir)
    else:
        index = RetrievalIndex.build(exchanges)
        index.save(index_dir)
    facts = DEMO_FACTS
    classifier = IntentClassifier.train(
        [fill_placeholders(e.reply, facts) for e in exchanges], [e.intent for e in exchanges]
    )

    val_prompts = [m[:-1] for m in val.messages]
    facts_values = [(facts, customer_values(turns)) for turns in val_prompts]
    refs = [fill_placeholders(m[-1]["content"], f, v) for m, (f, v) in zip(val.messages, facts_values, strict=True)]
    queries = [retrieval_query(turns) for turns in val_prompts]
    hits = index.search_many(queries, 8)

    results: list[SystemResult] = []
    top1 = [fill_placeholders(h[0].exchange.reply, f, v) for h, (f, v) in zip(hits, facts_values, strict=True)]
    results.append(score("retrieval", top1, refs, val.intents, classifier))
    words = RetrievalBaseline([e.question for e in exchanges], [e.reply for e in exchanges]).predict(queries)
    words = [fill_placeholders(r, f, v) for r, (f, v) in zip(words, facts_values, strict=True)]
    results.append(score("retrieval-words", words, refs, val.intents, classifier))
    results.append(score("reference", refs, refs, val.intents, classifier))
    # The same consensus over retrieval alone (3 nearest same-intent answers): what a model must add to.
    from finetune.ml.grounding import GroundingConfig, select_neighbours

    consensus_replies = []
    for found, (f, v) in zip(hits, facts_values, strict=True):
        _, intent, _ = select_neighbours(found, GroundingConfig())
        answers = [h.exchange.reply for h in found if not intent or h.exchange.intent == intent][:3]
        consensus_replies.append(fill_placeholders(answers[consensus(answers)], f, v))
    results.append(score("retrieval-consensus3", consensus_replies, refs, val.intents, classifier))
    print(json.dumps([asdict(r) for r in results]), file=sys.stderr)  # noqa: T201

    quick_info = None
    systems: list[tuple[str, str]] = [] if args.no_base else [("base", args.base)]
    if args.train_quick:
        run_dir = out / f"quick-{time.strftime('%Y%m%d-%H%M%S')}"
        adapter, quick_info = train_quick(args, dataset, train, index, run_dir)
        print(json.dumps({"quick": quick_info}), file=sys.stderr)  # noqa: T201
        systems.append(("quick", str(adapter)))
    systems += [(Path(m).name, m) for m in args.model]
    for name, path in systems:
        model, model_tokenizer = load_model(path, args.base)
        for result in evaluate_model(
            name, model, model_tokenizer, val_prompts, hits, refs, val.intents, classifier, facts_values, args
        ):
            results.append(result)
            print(json.dumps(asdict(result)), file=sys.stderr)  # noqa: T201
        del model

    report = {
        "dataset": str(dataset),
        "validation_examples": len(val.messages),
        "quick": quick_info,
        "args": vars(args),
        "results": [asdict(r) for r in results],
    }
    header = (
        f"{'system':32} {'ROUGE-L':>8} {'intent':>7} {'slots':>6} {'repeats':>8} {'cut':>4} {'fallbk':>7} {'tok/s':>6}"
    )
    print(header)  # noqa: T201
    for r in results:
        tps = "" if r.tokens_per_second is None else f"{r.tokens_per_second:.0f}"
        print(  # noqa: T201
            f"{r.name:32} {r.rouge_l:8.4f} {r.intent_accuracy:7.4f} {r.slot_leaks:6d} {r.repeated:8d} {r.cut:4d} "
            f"{r.fallback:7d} {tps:>6}"
        )
    if quick_info:
        print(f"quick adapter: {json.dumps(quick_info)}")  # noqa: T201
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0 if all(math.isfinite(r.rouge_l) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
