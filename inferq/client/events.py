"""Reading a job's event stream (``GET /v1/jobs/{id}/events``, Server-Sent Events)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True)
class ServerEvent:
    """One SSE event: its name (the job's status), its id (a position to resume from) and its data."""

    event: str
    id: str | None
    data: str

    def json(self) -> object:
        """The data as JSON (the job document)."""
        return json.loads(self.data)


async def read_events(response: aiohttp.ClientResponse) -> AsyncIterator[ServerEvent]:
    """The events of an SSE response, until the server closes it; comment lines (heartbeats) are skipped."""
    name, event_id, data = "message", None, []
    async for raw in response.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield ServerEvent(name, event_id, "\n".join(data))
            name, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            name = value
        elif field == "id":
            event_id = value
        elif field == "data":
            data.append(value)
