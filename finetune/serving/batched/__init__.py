"""The batched inference engine: dynamic batching over a shared KV cache, with a prefix cache.

- ``engine.py``: ``BatchedEngine``, the ``Engine`` the chat uses, and the generation thread's loop;
- ``scheduler.py``: the admission policy (who waits, who joins the batch, who prefills together);
- ``runner.py``: the forward passes (prefill, decode steps, choosing tokens, ending replies).

Plain Python: no Django. Generation never runs on the event loop.
"""

from .engine import BatchedEngine

__all__ = ["BatchedEngine"]
