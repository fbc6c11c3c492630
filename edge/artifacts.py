"""Serving stored artifacts over HTTP: ``ETag`` = SHA-256, conditional requests, one byte range.

The file is streamed from the store in chunks (never read whole into memory), so a
node can fetch a multi-gigabyte model and resume a broken download with ``Range``
and ``If-Range`` (see :func:`inferq.runtime.artifacts.fetch`).
"""

from __future__ import annotations

import re

from aiohttp import web

from inferq.runtime.artifacts import ArtifactStore

RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, end)`` of a single ``Range: bytes=a-b`` (or ``a-``, ``-n``); None for none or several ranges.

    Raises ``HTTPRequestRangeNotSatisfiable`` for a range outside the file.
    """
    if not header:
        return None
    match = RANGE_RE.match(header.strip())
    if match is None:
        return None  # several ranges, or another unit: the whole file, as RFC 9110 allows
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        start, end = max(0, size - int(last)), size
    else:
        start, end = int(first), min(size, int(last) + 1) if last else size
    if start >= size or start >= end:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, end


async def serve_blob(request: web.Request, store: ArtifactStore, sha256: str, size: int, filename: str) -> web.StreamResponse:
    """Answer a GET (or HEAD) for one stored blob."""
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
               "Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "public, max-age=31536000, immutable"}
    if etag in {t.strip() for t in request.headers.get("If-None-Match", "").split(",")}:
        return web.Response(status=304, headers=headers)
    if_range = request.headers.get("If-Range")
    span = parse_range(request.headers.get("Range"), size) if if_range in (None, etag) else None
    start, end = span or (0, size)
    response = web.StreamResponse(status=206 if span else 200, headers=headers)
    if span:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    response.content_length = end - start
    await response.prepare(request)
    if request.method != "HEAD":
        async for chunk in store.read(sha256, start, end):
            await response.write(chunk)
    await response.write_eof()
    return response
