"""Reply quality of any version on the seeded Bitext validation split: its served path beside
the retrieval baseline and the base model.

Everything is scored by the project's own evaluation (``finetune.ml.quality``), the code
the quality gate uses: grounded prompts (``grounding.ground_conversation``), the reply
primed with the closest answer's first sentence, batched greedy generation with the
repetition processors of serving, the repetition cut, the reply policy
(``reply_policy.choose_reply``) and the placeholder filler. Per system it prints ROUGE-L
(against the agent's reply), intent accuracy (the dataset's intent classifier, trained
on the training split's replies), replies showing a template slot, replies repeating
themselves, and where the replies came from (model / past answer / handoff).

Rows:
- ``retrieval``: the nearest training exchange's answer (the baseline the gate requires
  a candidate to beat); ``retrieval-consensus``: the nearest same-intent answer most like
  the others (what a model adding nothing would get under the consensus policy).
- ``base``: the base model on the served path (grounded, primed, consensus policy).
- each ``--model`` (a version, run, merged or adapter directory): its served path with its
  own grounding and policy settings (``train_config.json``), or the recipe's for a plain model.
- ``quick``: with ``--train-quick``, the demo's quick adapter is trained first
  (``finetune.ml.training.QUICK_RECIPE`` through ``train_lora``, timed) and evaluated.
- for every model also ``<name>:fallback`` (the confidence fallback policy) and
  ``<name>:own-words`` (the model's replies whatever their quality), from the same generation.

``--split train`` scores a development sample of the training split instead (each
example's own exchange left out of its neighbours, as grounded training does; the quick
adapter's training rows left out of the sample): tune reply-policy thresholds there
(``--sweep`` prints the consensus settings' grid), never on the validation split.
Generated replies are cached by prompt under ``OUT/generated/`` (``quality.GenerationCache``):
another policy (``--policy-defaults``: today's ``ReplyPolicyConfig`` defaults rather than
those a version saved) or an overlapping sample generates nothing again.

The dataset defaults to the Bitext tickets (``../shared/data/bitext``), imported and
built with the project's own importer and dataset builder (redaction, seed 0, 10%
validation, with its retrieval index and intent classifier) into ``var/bench/quality/``.

    python bench/bench_quality.py --limit 64                          # retrieval + base model
    python bench/bench_quality.py --limit 64 --train-quick            # + the demo's quick adapter
    python bench/bench_quality.py --model var/models/versions/v3 --no-base --json var/bench/v3.json
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a machine shared with other processes
# spinning threads steal the cores the busy ones need (3x slower here; docs/quality-research.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402 - after the OpenMP setting, which must precede torch's import
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The shared Bitext sample: beside the checkout (../shared), or where SUPPORTBOT_BITEXT_CSV says.
BITEXT_CANDIDATES = [
    Path(os.environ.get("SUPPORTBOT_BITEXT_CSV", "/nonexistent")),
    ROOT.parent / "shared" / "data" / "bitext" / "customer_support_tickets.csv",
    Path("/work/shared/data/bitext/customer_support_tickets.csv"),
]
SYSTEM_PROMPT = (
    "You are the customer support assistant of {company}. Answer briefly and politely. "
    "If you are not sure, offer to connect the customer with a human agent."
)
COMPANY = "Acme"


# --- data -------------------------------------------------------------------------------------


def build_bitext_dataset(csv_path: Path, out_dir: Path, tokenizer, tokenizer_name: str) -> Path:
    """The Bitext tickets through the project's importer and dataset builder (seed 0, 10% validation)."""
    from finetune.ml.dataset_builder import BuildOptions, build_dataset, conversations_from_file
    from finetune.ml.prompting import system_prompt_text

    system = system_prompt_text(template=SYSTEM_PROMPT, company=COMPANY)
    options = BuildOptions(out_dir=out_dir, tokenizer_name=tokenizer_name, system_prompt=system, max_length=1024)
    build_dataset(conversations_from_file(csv_path, "bitext", source="bitext"), tokenizer, options)
    return out_dir


# --- models ------------------------------------------------------------------------------------


def load_model(path: str, base: str):
    """A version, run, merged or adapter directory (or a plain model directory), ready for generation."""
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
    return model, tokenizer, p


def evaluate_model(name, path, args, val, classifier, dataset_knowledge, recipe) -> list[dict]:
    """The served path of one model, plus its fallback and own-words rows from the same generation."""
    import dataclasses

    from finetune.ml.decoding import DecodingConfig
    from finetune.ml.knowledge import load_knowledge
    from finetune.ml.quality import GenerationCache, generate_for, quality_examples, served_row, settings_key
    from finetune.ml.reply_policy import ReplyPolicyConfig

    model, tokenizer, model_dir = load_model(path, args.base)
    own = load_knowledge(model_dir) if name != "base" else None
    grounding = own.grounding if own is not None and own.grounding is not None else recipe.grounding_config()
    policy = own.policy if own is not None and own.policy is not None else recipe.policy_config()
    if args.policy_defaults:  # what the version would serve with if trained today (its mode kept)
        policy = dataclasses.replace(ReplyPolicyConfig(), mode=policy.mode)
    grounded = grounding.neighbours > 0 and (own is None or own.grounding is not None or own.index is None)
    examples = quality_examples(
        val["messages"],
        val["intents"],
        dataset_knowledge.index,
        tokenizer,
        grounding=grounding,
        grounded=grounded,
        exclude=val["exclude"],
    )
    cache = None
    if not args.no_cache:
        identity = settings_key(
            weights=weights_fingerprint(model_dir),
            base=str(Path(args.base).resolve()) if (model_dir / "adapter_config.json").exists() else None,
            max_new_tokens=args.max_new_tokens,
            decoding=DecodingConfig().__dict__,
        )
        cache = GenerationCache(Path(args.out) / "generated", identity)

    def progress(done, total):
        print(f"  {name}: {done}/{total} replies", file=sys.stderr, flush=True)  # noqa: T201

    generated, seconds = generate_for(
        model,
        tokenizer,
        examples,
        grounding=grounding,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=progress,
        cache=cache,
    )
    from finetune.ml.quality import SLOT_RE
    from finetune.serving.repetition import has_repetition

    rows = []
    for suffix, mode in (("", policy.mode), (":fallback", "fallback"), (":own-words", "model")):
        row = served_row(
            name + suffix,
            f"{name} ({mode})",
            examples,
            generated,
            classifier,
            policy=dataclasses.replace(policy, mode=mode),
            seconds=seconds,
        ).to_json()
        rows.append(row)
    rows[0]["extra"] = {
        "grounded": grounded,
        "prime": grounding.prime,
        "policy": policy.to_json(),
        "raw_replies_with_slots": sum(bool(SLOT_RE.search(g["raw"])) for g in generated),
        "raw_replies_repeating": sum(has_repetition(g["raw"]) for g in generated),
        "mean_logprob": round(sum(g["mean_logprob"] or 0 for g in generated) / max(1, len(generated)), 4),
        "cached_replies": sum(bool(g.get("cached")) for g in generated),
        "generated": [{"raw": g["raw"], "mean_logprob": g["mean_logprob"]} for g in generated],
    }
    if args.sweep:
        rows[0]["extra"]["sweep"] = sweep(name, examples, generated, classifier, policy)
    del model
    return rows


def weights_fingerprint(model_dir: Path) -> str:
    """A hash of a model's weight files (what its replies depend on besides the prompt)."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise SystemExit(f"No weight files in {model_dir}.")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


SWEEP_ANSWERS = (3, 4, 5, 6, 8)
SWEEP_MARGINS = (-0.05, -0.02, 0.0, 0.02, 0.05, 0.1, 0.2, 1.0)


def sweep(name, examples, generated, classifier, policy) -> list[dict]:
    """The consensus policy's settings over one generation (no new generation): answers in the
    consensus, whether the model's reply votes, and the model's margin, each beside the retrieval
    consensus of as many answers. For tuning on a development sample (``--split train``)."""
    import dataclasses

    from finetune.ml.quality import retrieval_rows, served_row

    out = []
    for answers in SWEEP_ANSWERS:
        for votes in (False, True):
            base = dataclasses.replace(policy, mode="consensus", consensus_answers=answers, model_votes=votes)
            agreed = retrieval_rows(examples, classifier, base)[1]
            for margin in SWEEP_MARGINS if not votes else (0.0, 1.0):
                variant = dataclasses.replace(base, model_margin=margin)
                row = served_row(name, "sweep", examples, generated, classifier, policy=variant)
                out.append(
                    {
                        "consensus_answers": answers,
                        "model_votes": votes,
                        "model_margin": margin,
                        "rouge_l": row.rouge_l,
                        "intent_accuracy": row.intent_accuracy,
                        "model_replies": row.model_replies,
                        "retrieval_consensus_rouge_l": agreed.rouge_l,
                    }
                )
    out.sort(key=lambda r: -(r["rouge_l"] or 0))
    print(f"{name}: policy sweep on {len(examples)} examples (best first)")  # noqa: T201
    print(f"{'answers':>8} {'votes':>6} {'margin':>7} {'ROUGE-L':>8} {'intent':>7} {'model':>6} {'ret.cons.':>9}")  # noqa: T201
    for r in out:
        print(  # noqa: T201
            f"{r['consensus_answers']:8d} {r['model_votes']!s:>6} {r['model_margin']:7.2f} {r['rouge_l']:8.4f} "
            f"{r['intent_accuracy'] or 0:7.4f} {r['model_replies']:6d} {r['retrieval_consensus_rouge_l']:9.4f}"
        )
    return out


def train_quick(args, dataset: Path, out_dir: Path) -> tuple[Path, dict]:
    """The demo's quick adapter (QUICK_RECIPE through train_lora), timed; returns its run directory and stats."""
    from finetune.ml.training import QUICK_RECIPE, TrainConfig, train_lora

    overrides = {**QUICK_RECIPE, "max_examples": args.quick_examples}
    config = TrainConfig.from_overrides(
        overrides,
        base_model=args.base,
        eval_before=False,
        eval_generate_samples=0,  # evaluated here, on the bench's sample
        max_eval_examples=16,
        seed=args.seed,
    )
    started = time.perf_counter()
    result = train_lora(config, dataset, out_dir)
    metrics = result.metrics
    info = {
        "recipe": overrides,
        "examples": metrics["num_train"],
        "optimizer_steps": metrics["optimizer_steps"],
        "train_seconds": metrics["train_seconds"],
        "tokens_per_second": metrics["tokens_per_second"],
        "reply_tokens": metrics["reply_tokens"],
        "train_loss_first": metrics["train_loss_first"],
        "train_loss_last": metrics["train_loss_last"],
        "eval_loss": metrics["eval_loss"],
        "run_seconds": round(time.perf_counter() - started, 1),
        "load_average": os.getloadavg(),
    }
    return out_dir, info


def development_indices(count: int, limit: int | None, seed: int, leave_out: set[int]) -> list[int]:
    """A seeded sample of training rows for tuning, other than ``leave_out`` (drawn apart from the
    validation sample's and the training sample's streams: a string seed)."""
    import random

    rows = [i for i in range(count) if i not in leave_out]
    if limit is None or limit >= len(rows):
        return rows
    return sorted(random.Random(f"development:{seed}").sample(rows, limit))  # noqa: S311 - reproducible sampling


# --- main --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", help="a dataset directory (build_dataset); default: the Bitext split")
    parser.add_argument(
        "--base", default=str(ROOT / "var/models/base/smollm2-135m-instruct"), help="base model directory"
    )
    parser.add_argument("--model", action="append", default=[], help="version, run, merged or adapter directory")
    parser.add_argument("--no-base", action="store_true", help="skip the base model")
    parser.add_argument("--limit", type=int, default=None, help="seeded sample of validation examples (default: all)")
    parser.add_argument(
        "--split",
        choices=("validation", "train"),
        default="validation",
        help="train: a development sample of the training split (for tuning the reply policy; each example's own "
        "exchange left out of its neighbours, the quick adapter's training rows left out of the sample)",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="also score the consensus policy's settings (no new generation)"
    )
    parser.add_argument(
        "--policy-defaults",
        action="store_true",
        help="score every model with today's ReplyPolicyConfig defaults, not the settings its train_config.json saved",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="generate every reply (default: reuse OUT/generated/ by prompt)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--train-quick", action="store_true", help="train the quick adapter (timed), then evaluate it")
    parser.add_argument("--quick-examples", type=int, default=None, help="override QUICK_RECIPE's max_examples")
    parser.add_argument("--out", default=str(ROOT / "var/bench/quality"), help="work directory")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)

    import torch

    from finetune.ml.grounded_data import own_positions
    from finetune.ml.knowledge import load_knowledge
    from finetune.ml.quality import quality_examples, retrieval_rows, sample_indices, score_row, split_column
    from finetune.ml.training import QUICK_RECIPE, TrainConfig, load_conversations, load_tokenizer

    torch.set_num_threads(args.threads)
    if args.quick_examples is None:
        args.quick_examples = QUICK_RECIPE["max_examples"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.base)
    dataset = Path(args.dataset) if args.dataset else out / f"bitext-{Path(args.base).name}"
    if not (dataset / "dataset_dict.json").exists():
        print(f"Building the Bitext dataset in {dataset}", file=sys.stderr)  # noqa: T201
        csv = next((p for p in BITEXT_CANDIDATES if p.is_file()), None)
        if csv is None:
            raise SystemExit("The Bitext CSV was not found; set SUPPORTBOT_BITEXT_CSV.")
        build_bitext_dataset(csv, dataset, tokenizer, args.base)
    knowledge = load_knowledge(dataset, strict=True)
    if knowledge.index is None or knowledge.classifier is None:
        raise SystemExit(f"{dataset} has no retrieval/ or intent/: rebuild it with this version's dataset builder.")
    train_rows, val_rows = load_conversations(dataset)
    if args.split == "train":
        rows = train_rows
        intents = split_column(dataset, "train", "intent")
        # The quick adapter's training rows (train_lora samples them as sample_indices does) are not for tuning.
        trained = set(sample_indices(len(train_rows), args.quick_examples, args.seed))
        pick = development_indices(len(train_rows), args.limit, args.seed, trained)
        exclude = own_positions([rows[i] for i in pick], knowledge.index)
    else:
        rows = val_rows
        intents = split_column(dataset, "validation", "intent")
        pick = sample_indices(len(val_rows), args.limit, args.seed)
        exclude = None
    val = {"messages": [rows[i] for i in pick], "intents": [intents[i] for i in pick], "exclude": exclude}
    recipe = TrainConfig(base_model=args.base)

    examples = quality_examples(val["messages"], val["intents"], knowledge.index, tokenizer, exclude=exclude)
    results = [r.to_json() for r in retrieval_rows(examples, knowledge.classifier, recipe.policy_config())]
    reference = retrieval_rows(examples, knowledge.classifier)[0]

    agents = score_row(
        "reference", "the agents' replies", examples, [e.reference for e in examples], knowledge.classifier
    )
    results.append(agents.to_json())
    del reference
    for row in results:
        print(json.dumps({k: row[k] for k in ("name", "rouge_l", "intent_accuracy", "slot_leaks", "repeats")}))  # noqa: T201

    quick = None
    systems: list[tuple[str, str]] = [] if args.no_base else [("base", args.base)]
    if args.train_quick:
        run_dir = out / f"quick-{time.strftime('%Y%m%d-%H%M%S')}"
        path, quick = train_quick(args, dataset, run_dir)
        print(json.dumps({"quick": quick}), file=sys.stderr)  # noqa: T201
        systems.append(("quick", str(path)))
    systems += [(Path(m).name, m) for m in args.model]
    for name, path in systems:
        rows = evaluate_model(name, path, args, val, knowledge.classifier, knowledge, recipe)
        for row in rows:
            print(json.dumps({k: row[k] for k in ("name", "rouge_l", "intent_accuracy", "slot_leaks", "repeats")}))  # noqa: T201
        results.extend(rows)

    report = {
        "dataset": str(dataset),
        "split": args.split,
        "validation_examples": len(examples),
        "validation_rows": pick if args.limit else "all",
        "quick": quick,
        "load_average_end": os.getloadavg(),
        "args": vars(args),
        "results": results,
    }
    header = (
        f"{'system':24} {'ROUGE-L':>8} {'intent':>7} {'slots':>6} {'repeats':>8} {'model/past/hand':>16} {'tok/s':>6}"
    )
    print(header)  # noqa: T201
    for r in results:
        tps = "" if r.get("tokens_per_second") is None else f"{r['tokens_per_second']:.0f}"
        intent = "" if r["intent_accuracy"] is None else f"{r['intent_accuracy']:.4f}"
        source = f"{r['model_replies']}/{r['retrieved']}/{r['handoffs']}"
        print(  # noqa: T201
            f"{r['name']:24} {r['rouge_l']:8.4f} {intent:>7} {r['slot_leaks']:6d} {r['repeats']:8d} "
            f"{source:>16} {tps:>6}"
        )
    if quick:
        print(f"quick adapter: {json.dumps(quick)}")  # noqa: T201
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
