"""Serving-side helpers in plain Python (no Django): what happens to a reply's text on its way out.

- ``repetition``: find where a reply starts repeating itself and cut it there, also while streaming.
- ``placeholders``: fill template slots (``{{Order Number}}``, ``[address]``) from the company's
  facts and the customer's own values, incrementally, so no customer ever sees a slot.
"""
