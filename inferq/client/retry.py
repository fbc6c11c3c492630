"""When the client tries again: 429 and 503 answers (honouring ``Retry-After``), within bounds."""

from __future__ import annotations

import email.utils
import math
import time
from dataclasses import dataclass

from inferq import errors as e

# Error codes the edge sends, and the client-side error each becomes.
BY_CODE: dict[str, type[e.InferqError]] = {
    "unknown_model": e.UnknownModel,
    "invalid_input": e.InvalidInput,
    "not_found": e.NotFound,
    "bad_message": e.CodecError,
    "bad_request": e.CodecError,
    "too_large": e.MessageTooLarge,
    "unsupported_media_type": e.UnsupportedMedia,
    "conflict": e.Conflict,
    "unauthorized": e.Unauthorized,
}
# When the code is not one we know, the HTTP status decides.
BY_STATUS: dict[int, type[e.InferqError]] = {
    400: e.CodecError, 401: e.Unauthorized, 403: e.Unauthorized, 404: e.NotFound, 409: e.Conflict,
    413: e.MessageTooLarge, 415: e.UnsupportedMedia, 422: e.InvalidInput, 429: e.RateLimited,
    502: e.Unavailable, 503: e.Unavailable, 504: e.Timeout,
}
RETRYABLE = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """At most ``max_retries`` more tries, all within ``deadline_s`` of the first.

    Only 429 and 503 answers are retried, and connections that could not be
    made (or, for requests safe to repeat, were lost), up to
    ``max_connection_retries``. A ``Retry-After`` from the server sets the pause; without one the pause
    doubles from ``backoff_s`` up to ``max_backoff_s``. A pause that would end
    past the deadline is not taken: the error is raised at once.
    """

    max_retries: int = 8
    deadline_s: float = 60.0
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    # A refused or lost connection is retried less: a wrong URL should fail fast.
    max_connection_retries: int = 2

    def pause(self, attempt: int, retry_after: float | None, started: float, connection: bool = False) -> float | None:
        """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 0), or None to give up."""
        if attempt >= (min(self.max_retries, self.max_connection_retries) if connection else self.max_retries):
            return None
        delay = retry_after if retry_after is not None else min(self.backoff_s * 2**attempt, self.max_backoff_s)
        if time.monotonic() + delay > started + self.deadline_s:
            return None
        return delay


NO_RETRIES = RetryPolicy(max_retries=0, max_connection_retries=0)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def error_for(status: int, body: object, retry_after: float | None) -> e.InferqError:
    """The typed error for an HTTP error answer ``{"error": {"code", "message"}}``."""
    error = body.get("error") if isinstance(body, dict) else None
    code = str(error.get("code", "")) if isinstance(error, dict) else ""
    message = str(error.get("message", "")) if isinstance(error, dict) else ""
    message = message or f"HTTP {status}"
    if status == 429:
        return e.RateLimited(f"{message} ({code or 'too_many_requests'})", retry_after)
    cls = BY_CODE.get(code) or BY_STATUS.get(status)
    if cls is None:
        return e.InferqError(f"HTTP {status} {code or 'error'}: {message}")
    return cls(message)
