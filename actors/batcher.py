"""Dynamic batching: gather items until the batch is full or the first item has waited long enough."""

from __future__ import annotations

import asyncio
from typing import Any

from inferq.actors.mailbox import Mailbox


class Batcher:
    """Pulls from ``mailbox`` in batches of at most ``max_size``.

    A batch closes when it is full or ``max_delay_s`` after its first item
    arrived, whichever comes first; with an idle queue a lone job waits at most
    ``max_delay_s``.
    """

    def __init__(self, mailbox: Mailbox[Any], max_size: int, max_delay_s: float) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.mailbox = mailbox
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self._collecting: list[Any] = []

    async def next_batch(self, wait: bool = True) -> list[Any]:
        """Wait for the next batch (never empty); with ``wait=False`` take only what is already here."""
        batch = self._collecting = [await self.mailbox.get()]
        if not wait:
            self._take_ready(batch)
            self._collecting = []
            return batch
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay_s
        while len(batch) < self.max_size:
            self._take_ready(batch)
            remaining = deadline - loop.time()
            if len(batch) >= self.max_size or remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.mailbox.get(), remaining))
            except TimeoutError:
                break
        self._collecting = []
        return batch

    def _take_ready(self, batch: list[Any]) -> None:
        while len(batch) < self.max_size and not self.mailbox.empty():
            batch.append(self.mailbox.get_nowait())

    def take_all(self) -> list[Any]:
        """Remove and return everything not yet batched, including a batch cut off while collecting (to hand back on drain)."""
        items, self._collecting = self._collecting, []
        while not self.mailbox.empty():
            items.append(self.mailbox.get_nowait())
        return items
