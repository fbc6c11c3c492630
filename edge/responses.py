"""JSON answers of the edge: every body ends with a newline.

A ``curl`` in a terminal then leaves the shell prompt on a line of its own,
and line-oriented tools (``jq -c``, ``read``) see one complete line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web


def dumps(obj: Any) -> str:
    """``json.dumps`` with a trailing newline (aiohttp's ``dumps`` hook)."""
    return json.dumps(obj) + "\n"


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """``web.json_response`` whose body ends with a newline."""
    return web.json_response(data, status=status, headers=headers, dumps=dumps)
