"""Serving the fine-tuned model: the engines that stream replies, and the glue that picks the model.

Plain Python, no Django (an import-linter contract in pyproject.toml holds it), except
``runtime``, the one module that reads settings and the database:

- ``interface``: what the chat depends on: ``GenerationRequest`` in, an async stream
  of ``TokenDelta`` and a final ``GenerationDone`` out (the ``Engine`` protocol).
- ``loading``: load a model directory for serving, optionally int8 on CPU.
- ``text``: fit a conversation into the context window; turn tokens into reply text.
- ``naive``: ``NaiveEngine``, one ``generate()`` at a time (the reference).
- ``kv``: the KV caches of batched decoding (per batch, and the prefix cache).
- ``batched``: ``BatchedEngine``, dynamic batching (scheduler and runner).
- ``safety``: the filter every reply passes (personal data, blocked terms).
- ``runtime``: this process's engine, serving the active ``ModelVersion`` (Django glue).
- ``repetition``: find where a reply starts repeating itself and cut it there, also while streaming.
- ``placeholders``: fill template slots (``{{Order Number}}``, ``[address]``) from the company's
  facts and the customer's own values, incrementally, so no customer ever sees a slot.
"""
