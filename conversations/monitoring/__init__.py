"""Bias monitoring of the live chat: segment labels written with the messages, and the dashboard's figures.

- ``services.py``: segment labels of a customer message when it is saved, and the
  ``ReplyOutcome`` row of each finished bot reply, kept current when the reply, its
  review, the customer's answer or a handoff is written; the backfill for old rows.
- ``selectors.py``: the dashboard's figures, aggregated in the database from the stored
  labels (never from message text), with the statistics of ``finetune.ml.fairness``.

docs/bias-monitoring.md describes what is measured and why.
"""
