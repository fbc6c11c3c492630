"""Stopping tasks for sure: cancel, wait a little, and cancel again what a cancel missed.

A cancel can be lost: on Python 3.11, ``asyncio.wait_for`` returns the inner
result and drops the cancellation when both happen at once (CPython gh-86296),
and a loop around it then sleeps on as if nothing happened. A plain
``task.cancel(); await task`` then waits for ever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("inferq.tasks")

RECANCEL_S = 0.5  # how long a cancelled task gets to finish before it is cancelled again


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], owner: str = "") -> None:
    """Cancel ``tasks`` and return once every one is done, cancelling again those that ignored a cancel."""
    tasks = list(tasks)
    pending, rounds = {t for t in tasks if not t.done()}, 0
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
        rounds += 1
        if pending and rounds == 1:
            log.warning("%s: %s ignored a cancel; cancelling again", owner or "tasks", sorted(t.get_name() for t in pending))
    await asyncio.gather(*tasks, return_exceptions=True)  # collects every outcome: none is "never retrieved"
