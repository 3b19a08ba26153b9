"""The agents' work on conversations: review queues, claims, reviews, agreement, training candidates.

A package inside ``conversations`` (not an app of its own): these rules are about the
chat's own rows, and ``conversations/services.py`` calls them when a reply finishes,
a customer answers "not helpful" or a conversation is handed to a human.

- ``services.py``: every write (enqueue, claim/renew/release, draft, submit, discard,
  flag, approve candidates). Each is atomic; broadcasts leave after commit.
- ``selectors.py``: queue listings and filters, a reply's context, progress, the
  agreement report, training examples for the dataset build, export rows.
- ``agreement.py``, ``export.py``: plain Python (no Django), called by the selectors
  and the ``export_feedback`` command.

The workspace pages and the agents' socket that use them live in the ``workspace`` app.
"""
