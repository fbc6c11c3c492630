"""A worker's prefetched deliveries, in two lanes: high-priority jobs are always taken first."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    """The subset of ``asyncio.Queue`` the batcher uses, with a high lane that is emptied before the normal one."""

    def __init__(self) -> None:
        self._high: deque[T] = deque()
        self._normal: deque[T] = deque()
        self._nonempty = asyncio.Event()

    def put_nowait(self, item: T, high: bool = False) -> None:
        (self._high if high else self._normal).append(item)
        self._nonempty.set()

    def get_nowait(self) -> T:
        """The oldest high item, else the oldest normal one; ``asyncio.QueueEmpty`` if there is none."""
        lane = self._high or self._normal
        if not lane:
            raise asyncio.QueueEmpty
        item = lane.popleft()
        if not self._high and not self._normal:
            self._nonempty.clear()
        return item

    async def get(self) -> T:
        while self.empty():
            await self._nonempty.wait()
        return self.get_nowait()

    def empty(self) -> bool:
        return not self._high and not self._normal

    def qsize(self) -> int:
        return len(self._high) + len(self._normal)
