"""Whether the running task is being cancelled: ``Task.cancelling()`` where Python has it (3.11+).

Python 3.10 (JetPack 6, for the agent and worker) keeps no count of cancel requests,
so there the answer is None, "unknown". Callers treat unknown as the safe side for
them: a CancelledError is taken as a real cancellation (never swallowed as a lost
connection's), and a cancellation already delivered is not raised a second time.
"""

from __future__ import annotations

import asyncio


def cancel_requested(task: asyncio.Task | None) -> bool | None:
    """True/False: ``task`` has a cancellation pending or being handled; None on Python 3.10 (no way to know)."""
    if task is None:
        return False
    counter = getattr(task, "cancelling", None)
    return bool(counter()) if counter is not None else None
