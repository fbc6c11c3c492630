"""Listing a tenant's jobs (``GET /v1/jobs``) and counting them by status (``GET /v1/jobs/stats``).

Both answer from the edge's projection, so they cover the jobs of the ledger's
retention window (``jobs.ttl_s``) that this edge holds. Jobs are ordered
newest first by (created_at, job_id); the cursor is the position of the last
job of a page, so a page after it holds only older jobs: jobs submitted while
a client pages are newer than every cursor and neither shift nor repeat what
it has yet to read.
"""

from __future__ import annotations

import base64
import heapq
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from inferq.broker.messages import STATUSES
from inferq.edge.projection import JobState
from inferq.errors import CodecError

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


@dataclass(frozen=True)
class JobFilter:
    """What ``GET /v1/jobs`` was asked for."""

    tenant: str | None
    model: str | None = None
    version: str | None = None
    status: str | None = None

    @classmethod
    def from_query(cls, tenant: str | None, query: Mapping[str, str]) -> JobFilter:
        """The filter of a request's query; CodecError (400) on an unknown status."""
        status = query.get("status") or None
        if status is not None and status not in STATUSES:
            raise CodecError(f"status must be one of {[str(s) for s in STATUSES]}")
        return cls(tenant, query.get("model") or None, query.get("version") or None, status)

    def admits(self, state: JobState) -> bool:
        """Whether a job is the caller's and matches."""
        return (state.tenant == self.tenant and not state.shadow_of
                and (self.model is None or state.model == self.model)
                and (self.version is None or state.version == self.version)
                and (self.status is None or state.status == self.status))


def _key(state: JobState) -> tuple[float, str]:
    return (state.created_at or 0.0, state.job_id)


def encode_cursor(state: JobState) -> str:
    """The opaque cursor after ``state``."""
    return base64.urlsafe_b64encode(json.dumps(list(_key(state))).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The position a cursor names; CodecError if it is not one of ours."""
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return float(created), str(job_id)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise CodecError("'after' is not a cursor this API returned") from None


def parse_limit(raw: str | None) -> int:
    """``limit``: 1 to 1000, default 100."""
    if raw is None:
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        raise CodecError(f"limit must be an integer from 1 to {MAX_LIMIT}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise CodecError(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return limit


def page(states: Iterable[JobState], wanted: JobFilter, limit: int, after: str | None) -> tuple[list[JobState], str | None]:
    """Up to ``limit`` matching jobs older than the cursor, newest first, and the cursor of the next page."""
    bound = decode_cursor(after) if after else None
    matching = (s for s in states if wanted.admits(s) and (bound is None or _key(s) < bound))
    found = heapq.nlargest(limit + 1, matching, key=_key)
    if len(found) > limit:
        return found[:limit], encode_cursor(found[limit - 1])
    return found, None


def counts(states: Iterable[JobState], wanted: JobFilter) -> dict[str, int]:
    """Jobs by status, and their total (like the Batch API's ``request_counts``)."""
    result = {str(s): 0 for s in STATUSES}
    for state in states:
        if wanted.admits(state):
            result[str(state.status)] += 1
    result["total"] = sum(result.values())
    return result
