"""Run a coroutine over many items with bounded concurrency, yielding results in the items' order."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


async def ordered_map(fn: Callable[[T], Awaitable[R]], items: Iterable[T] | AsyncIterable[T], concurrency: int,
                      return_exceptions: bool = False) -> AsyncIterator[R | Exception]:
    """``fn(item)`` for every item, at most ``concurrency`` at once, results in input order.

    Items are read only as room frees up, so an endless iterable is fine. With
    ``return_exceptions`` an item's exception is yielded in its place;
    otherwise the first error raises at once and the calls still in flight are cancelled.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    window: deque[asyncio.Task[R]] = deque()
    try:
        async with contextlib.aclosing(_aiter(items)) as source:
            async for item in source:
                window.append(asyncio.ensure_future(fn(item)))
                if len(window) >= concurrency:
                    yield await _head(window, return_exceptions)
        while window:
            yield await _head(window, return_exceptions)
    finally:
        for task in window:
            task.cancel()
        await asyncio.gather(*window, return_exceptions=True)


async def _head(window: deque[asyncio.Task[R]], return_exceptions: bool) -> R | Exception:
    # The head stays in the window until it is done, so a cancelled consumer cancels it too.
    head = window[0]
    while not head.done():
        done, _ = await asyncio.wait([t for t in window if not t.done()], return_when=asyncio.FIRST_COMPLETED)
        if not return_exceptions:
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # fail fast, not when the failure reaches the head
    window.popleft()
    if return_exceptions and not head.cancelled() and head.exception() is not None:
        return head.exception()  # type: ignore[return-value]
    return head.result()


async def _aiter(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
