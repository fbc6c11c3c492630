"""A job's event stream (``GET /v1/jobs/{id}/events``): Server-Sent Events from the projection.

First the job's current state, then one event per change, each named after
the status with the job document as ``data:``; the stream closes after the
final state. An event's ``id:`` is the job's position (status rank and
attempts, ``<rank>.<attempts>``), which only grows: a client that reconnects
with ``Last-Event-ID`` gets only what came after it. Any edge serves it: all
of them hold the same projection of the ledger.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from inferq.edge.jobs import JobService, wait_slice
from inferq.edge.projection import JobState

log = logging.getLogger("inferq.edge.events")

Render = Callable[[JobState], dict[str, Any]]


def parse_position(raw: str | None) -> tuple[int, int]:
    """The position a ``Last-Event-ID`` names; anything unreadable means "from the start"."""
    try:
        rank, attempts = (raw or "").split(".")
        return int(rank), int(attempts)
    except ValueError:
        return (0, -1)


def frame(state: JobState, render: Render) -> bytes:
    """One SSE event: the status as its name, the position as its id, the document as data."""
    rank, attempts = state.position
    data = json.dumps(render(state), separators=(",", ":"))
    return f"event: {state.status}\nid: {rank}.{attempts}\ndata: {data}\n\n".encode()


async def stream(request: web.Request, service: JobService, tenant: str | None, render: Render,
                 heartbeat_s: float) -> web.StreamResponse:
    """Answer ``GET /v1/jobs/{id}/events``: 404 for an unknown job, else the stream until its final state."""
    job_id = request.match_info["job_id"]
    state = await service.get(job_id, tenant)  # raises NotFound before the stream starts
    seen = parse_position(request.headers.get("Last-Event-ID"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    try:
        await _follow(response, service, state, tenant, render, heartbeat_s, seen)
        await response.write_eof()
    except ConnectionResetError:  # the client went away: nothing left to do
        log.debug("event stream of job %s: the client disconnected", job_id)
    return response


async def _follow(response: web.StreamResponse, service: JobService, state: JobState, tenant: str | None,
                  render: Render, heartbeat_s: float, seen: tuple[int, int]) -> None:
    while True:
        if state.position > seen:
            seen = state.position
            await response.write(frame(state, render))
        if state.terminal:
            return
        if not await service.projection.wait_change(state.job_id, wait_slice(state, heartbeat_s)):
            await response.write(b": heartbeat\n\n")
        state = await service.get(state.job_id, tenant)  # expires a job past its TTL, as a poll would
