"""Large results, read back from the ledger stream when a client asks for them.

The projection keeps outputs up to ``jobs.inline_result_bytes`` in memory;
for a larger one it keeps the stream offset of the ledger message that
carries it (:attr:`JobState.result_offset`). :class:`ResultReader` reads that
message again, takes the job's final event from it and hands out its
outputs, with a small cache bounded by bytes (``edge.result_cache_bytes``)
for a result many clients poll at once. Every edge can answer for every
job: the stream is shared (and replicated in a cluster), nothing is stored
on the edge's host. A result the stream's retention has dropped answers
410 (``result_expired``), never 404: the job itself is still known.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from inferq.broker.messages import unpack_events
from inferq.broker.recall import StreamRecall
from inferq.edge.projection import JobState, output_bytes
from inferq.errors import ResultExpired

log = logging.getLogger("inferq.edge")

Outputs = dict[str, Any]
MAX_READS = 8  # reads from the stream at once: at 4 MB a result, 32 MB in flight however many polls wait


class ResultReader:
    """The outputs of a job, from the projection or read back from the ledger, cached by bytes."""

    def __init__(self, recall: StreamRecall, cache_bytes: int) -> None:
        self._recall = recall
        self.cache_bytes = cache_bytes
        self.cached_bytes = 0
        self._cache: OrderedDict[str, Outputs] = OrderedDict()  # least recently used first
        self._reading: dict[str, asyncio.Future[Outputs]] = {}  # one read per job, shared by its pollers
        self._slots = asyncio.Semaphore(MAX_READS)
        self.reads = 0

    async def aclose(self) -> None:
        """Cancel the reads in flight (their pollers get CancelledError, as on any shutdown)."""
        reading = list(self._reading.values())
        for future in reading:
            future.cancel()
        await asyncio.gather(*reading, return_exceptions=True)

    async def outputs(self, state: JobState) -> Outputs | None:
        """``state``'s outputs as wire tensors; raises ResultExpired if they left the ledger, BrokerUnavailable."""
        if not state.held_out:
            return state.outputs
        if state.result_expired:
            raise _expired(state)
        cached = self._cache.get(state.job_id)
        if cached is not None:
            self._cache.move_to_end(state.job_id)
            return cached
        reading = self._reading.get(state.job_id)
        if reading is None:
            reading = asyncio.ensure_future(self._read(state))
            self._reading[state.job_id] = reading
            reading.add_done_callback(lambda done: self._done(state.job_id, done))
        return await asyncio.shield(reading)

    def _done(self, job_id: str, reading: asyncio.Future[Outputs]) -> None:
        self._reading.pop(job_id, None)
        if not reading.cancelled():
            reading.exception()  # retrieved here too: every poller may have given up meanwhile

    async def _read(self, state: JobState) -> Outputs:
        assert state.result_offset is not None
        try:
            async with self._slots:
                body = await self._recall.read(state.result_offset)
        except ResultExpired:
            state.result_expired = True
            raise
        self.reads += 1
        events, _ = unpack_events(body)
        del body  # the events hold their own copy
        for event in events:
            if event.job_id == state.job_id and event.status == state.status and event.outputs:
                outputs = dict(event.outputs)
                self.keep(state.job_id, outputs)
                return outputs
        # The offset came from the same stream: a mismatch means the stream was recreated meanwhile.
        log.warning("ledger offset %s holds no result of job %s (the stream was recreated?)", state.result_offset, state.job_id)
        state.result_expired = True
        raise _expired(state)

    def keep(self, job_id: str, outputs: Outputs) -> None:
        """Cache ``outputs`` within the byte budget: a result read back, or the projection's hand-over of one a client here waits on."""
        size = output_bytes(outputs)
        if size > self.cache_bytes:
            return
        known = self._cache.pop(job_id, None)
        if known is not None:
            self.cached_bytes -= output_bytes(known)
        self._cache[job_id] = outputs
        self.cached_bytes += size
        while self.cached_bytes > self.cache_bytes:
            _, dropped = self._cache.popitem(last=False)
            self.cached_bytes -= output_bytes(dropped)


def _expired(state: JobState) -> ResultExpired:
    return ResultExpired(f"the result of job {state.job_id} ({state.result_bytes} bytes) is past the ledger's "
                         "retention (jobs.ledger_max_bytes, jobs.ttl_s); the job's status is still known")
