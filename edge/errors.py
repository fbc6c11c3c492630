"""HTTP error bodies with the right status, in the style of the API a request addressed.

``/v1`` answers ``{"error": {"code", "message"}}``; an API mounted under another prefix can
register its own body with :func:`add_error_style` (``/v2`` does: the v2 protocol's
``{"error": "<message>"}``). Middlewares answer errors through :func:`respond_error`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from inferq import errors as e
from inferq.edge.responses import json_response

log = logging.getLogger("inferq.edge")

# Most specific first: the first matching class decides the status.
STATUS: list[tuple[type[e.InferqError], int]] = [
    (e.MessageTooLarge, 413),
    (e.UnsupportedMedia, 415),
    (e.CodecError, 400),
    (e.ResultExpired, 410),
    (e.UnknownModel, 404),
    (e.NotFound, 404),
    (e.InvalidInput, 422),
    (e.Conflict, 409),
    (e.Unauthorized, 401),
    (e.Forbidden, 403),
    (e.RateLimited, 429),
    (e.DeadlineExceeded, 504),
    (e.ModelUnavailable, 503),
    (e.BrokerRejected, 429),
    (e.BrokerError, 503),
    (e.CoordinationError, 503),
]

# Final job errors as a synchronous call answers them.
JOB_STATUS = {"invalid_input": 422, "bad_message": 400, "expired": 504, "cancelled": 409}

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 410: "gone",
              413: "too_large", 415: "unsupported_media_type", 429: "too_many_requests"}

ErrorResponder = Callable[[int, str, str, Mapping[str, str] | None], web.Response]
_STYLES = web.AppKey("inferq_error_styles", list)


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON error response in the /v1 style."""
    return json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


def add_error_style(app: web.Application, prefix: str, responder: ErrorResponder) -> None:
    """Answer errors on ``prefix`` and the paths below it with ``responder`` instead of the /v1 body."""
    app.setdefault(_STYLES, []).append((prefix, responder))


def respond_error(request: web.Request, status: int, code: str, message: str,
                  headers: Mapping[str, str] | None = None) -> web.Response:
    """The error response for ``request``, in the style of the API its path belongs to."""
    path = request.path
    for prefix, responder in request.app.get(_STYLES, ()):
        if path == prefix or path.startswith(prefix + "/"):
            return responder(status, code, message, headers)
    return error_response(status, code, message, headers)


def status_of(exc: e.InferqError) -> int:
    """The HTTP status for an inferq error."""
    if isinstance(exc, e.JobFailed):
        return JOB_STATUS.get(exc.code, 500)
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
        return respond_error(request, status, exc.code, str(exc), headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "http_error")
        return respond_error(request, exc.status, code, exc.text or exc.reason,
                             headers={k: v for k, v in exc.headers.items() if k == "Allow"})
    except ConnectionResetError:
        raise
    except Exception:  # a bug of ours: log it, answer 500 and keep serving
        log.exception("unhandled error on %s %s", request.method, request.path)
        return respond_error(request, 500, "internal", "internal error; see the edge's log")
