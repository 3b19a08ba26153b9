"""The machine-learning core of fine-tuning, in plain Python: no Django, no database.

Each module takes paths, configs and iterables, so it runs from a script or a test
with nothing else set up; the services in ``finetune.services`` wrap them and record
what they did. An import-linter contract (pyproject.toml) keeps Django and the
project's apps out of this package.

- ``importers``: stream tickets out of Bitext CSV, mapped CSV and JSONL files.
- ``redaction``: replace personal data with typed placeholders (``{{EMAIL}}``).
- ``prompting``: the one template that turns a conversation into model text.
- ``dataset_builder``: redact, render, deduplicate, split and save a dataset.
- ``training``: LoRA fine-tuning of a causal LM on such a dataset.
- ``evaluation``: validation loss, ROUGE-L and the retrieval baseline.
- ``base_model``: find the base model to fine-tune and serve, offline if need be.
- ``tiny``: build a small GPT-2 with its own tokenizer, for tests and benchmarks.
- ``segments``: a customer message's register and language labels, at write time.
- ``lexicons``: the word lists bias monitoring keeps (registers, politeness, refusals).
- ``fairness``: intervals, segment-against-rest tests, the alert rule, intent as a control.
- ``probe_set``, ``probes``: counterfactual bias probes of a model (registers, names, pronouns).
- ``retrieval``: a lexical index of past exchanges (customer message, reply, intent),
  saved beside a dataset; the nearest exchanges ground every reply.
- ``intent``: the classifier that tells which intent a reply answers (the quality gate's
  intent accuracy).
- ``grounding``: the one prompt builder that puts retrieved exchanges into the prompt,
  used alike by training, evaluation and serving.
- ``grounded_data``: grounded training examples (neighbours of each example, never itself).
- ``decoding``: repetition controls for generation (transformers' logits processors,
  applied to the generated tokens only).
"""
