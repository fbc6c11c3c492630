"""W3C Trace Context (``traceparent``) as it travels with a job: HTTP header, AMQP header, ledger events.

The edge accepts a caller's ``traceparent`` (or starts a trace when there is none or it
is malformed), and sends its own span as the job's parent in the request message's
``traceparent`` header. The worker copies it into the job's ledger events, so the job
document, the workers' log lines and any tracing backend share one trace id.
Spec: https://www.w3.org/TR/trace-context/ (version 00; later versions are read by their
first four fields, as the spec asks).
"""

from __future__ import annotations

import re
import secrets
from typing import Any

TRACEPARENT_HEADER = "traceparent"
_TRACEPARENT_RE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def parse_traceparent(value: Any) -> str | None:
    """The version-00 form of a valid ``traceparent``, or None (absent, malformed, all-zero ids, version ff)."""
    if not isinstance(value, str) or len(value) > 512:
        return None
    match = _TRACEPARENT_RE.match(value.strip())
    if match is None:
        return None
    version, trace, span, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace == _ZERO_TRACE or span == _ZERO_SPAN:
        return None
    return f"00-{trace}-{span}-{flags}"


def new_traceparent(parent: str | None = None) -> str:
    """A new span: a child of ``parent`` (same trace id and flags), or the root of a new sampled trace."""
    if parent is None:
        return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    _, trace, _, flags = parent.split("-")[:4]
    return f"00-{trace}-{secrets.token_hex(8)}-{flags}"


def trace_id(traceparent: str | None) -> str:
    """The 32-hex trace id of a ``traceparent`` ("" without one)."""
    if not traceparent:
        return ""
    parts = traceparent.split("-")
    return parts[1] if len(parts) >= 4 else ""
