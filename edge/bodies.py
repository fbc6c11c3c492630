"""Request bodies parsed off the event loop once they are large.

A 36 MB JSON submit takes most of a second of ``json.loads`` and list-to-array
work, and both hold the GIL the whole time: on the loop, or in a thread, that
stalls every other request, long poll and health check of the edge. So a body
of ``off_loop_bytes`` or more is parsed in a helper process (spawned, not
forked, on the first such body; it dies with the edge). Small bodies, the hot
path, stay on the loop, where parsing costs less than the trip. At most
``slots`` large bodies wait for the helper at once; the rest wait here.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from inferq.runtime.lifeline import die_with_parent

T = TypeVar("T")

log = logging.getLogger("inferq.edge.bodies")

OFF_LOOP_BYTES = 1 << 20  # about 20 ms of json.loads here: a larger body is worth the trip to the helper
PARSE_PROCESSES = 1
PARSE_SLOTS = 4


class BodyParser:
    """Runs a parse function on a body: inline when small, in the helper process when large.

    ``parse`` must be a module-level function and its arguments and result
    picklable (the tensors come back as numpy arrays). :meth:`aclose` stops the helper.
    """

    def __init__(self, off_loop_bytes: int = OFF_LOOP_BYTES, processes: int = PARSE_PROCESSES,
                 slots: int = PARSE_SLOTS) -> None:
        self.off_loop_bytes = off_loop_bytes
        self._processes = processes
        self._slots = asyncio.Semaphore(slots)
        self._pool: ProcessPoolExecutor | None = None
        self.off_loop = 0  # bodies parsed in the helper so far

    async def parse(self, parse: Callable[..., T], body: bytes, *args: Any) -> T:
        """``parse(body, *args)``, in the helper process if ``body`` is at least ``off_loop_bytes``."""
        if len(body) < self.off_loop_bytes:
            return parse(body, *args)
        async with self._slots:
            pool = self._pool or self._start()
            try:
                result = await asyncio.get_running_loop().run_in_executor(pool, parse, bytes(body), *args)
            except BrokenProcessPool:  # the helper died (OOM killer?): the next large body starts another
                log.warning("the body parser process died; parsing this body on the loop")
                self._pool = None
                return parse(body, *args)
            self.off_loop += 1
            return result

    def _start(self) -> ProcessPoolExecutor:
        # Spawned: a fork of an edge with gRPC and etcd threads running could hang.
        self._pool = ProcessPoolExecutor(self._processes, multiprocessing.get_context("spawn"), initializer=die_with_parent)
        return self._pool

    async def aclose(self) -> None:
        """Stop the helper process, if one was started; parses still waiting fail."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)
