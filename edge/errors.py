"""HTTP error bodies: always ``{"error": {"code", "message"}}`` with the right status."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from runtime import errors as e

log = logging.getLogger("inferq.edge")

# Most specific first: the first matching class decides the status.
STATUS: list[tuple[type[e.InferqError], int]] = [
    (e.MessageTooLarge, 413),
    (e.UnsupportedMedia, 415),
    (e.CodecError, 400),
    (e.UnknownModel, 404),
    (e.NotFound, 404),
    (e.InvalidInput, 422),
    (e.Conflict, 409),
    (e.BrokerRejected, 429),
    (e.BrokerError, 503),
    (e.CoordinationError, 503),
]

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
              413: "too_large", 415: "unsupported_media_type", 429: "too_many_requests"}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON error response."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


def status_of(exc: e.InferqError) -> int:
    """The HTTP status for an inferq error."""
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Turn every error into the JSON error body; a 500 only for our own bugs."""
    try:
        return await handler(request)
    except e.InferqError as exc:
        status = status_of(exc)
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return error_response(status, exc.code, str(exc), headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.text or exc.reason, headers={k: v for k, v in exc.headers.items() if k == "Allow"})
    except ConnectionResetError:
        raise
    except Exception:  # a bug of ours: log it, answer 500 and keep serving
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error; see the edge's log")
