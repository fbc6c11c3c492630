"""A client of the edge's registry API: push (a streamed multipart upload), aliases, traffic, shadow, removal.

Used by ``inferq models push|alias|rollback|traffic|shadow|remove|show``. Errors
come back as the typed errors of :mod:`inferq.errors`, as with :class:`~inferq.client.http.AsyncClient`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from inferq.client.retry import error_for, parse_retry_after
from inferq.errors import CodecError, Unavailable

TIMEOUT_S = 30.0


def _path(*parts: str) -> str:
    return "/" + "/".join(quote(p, safe="") for p in parts)


class RegistryClient:
    """One session against one edge; use as ``async with RegistryClient(url, api_key) as registry``."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> RegistryClient:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = aiohttp.ClientSession(headers=headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP session (its Authorization header included), e.g. for downloading artifacts."""
        assert self._http is not None, "use RegistryClient as an async context manager"
        return self._http

    async def call(self, method: str, path: str, body: Mapping[str, Any] | None = None,
                   params: Mapping[str, str] | None = None, data: Any = None, timeout: float | None = None) -> dict[str, Any]:
        """One API call; a JSON object back, or the typed error of the edge's error body."""
        client_timeout = aiohttp.ClientTimeout(total=timeout or self.timeout)
        try:
            async with self.session.request(method, self.url + path, json=body, params=params, data=data,
                                            timeout=client_timeout) as resp:
                raw = await resp.read()
                answer = _decode(raw)
                if resp.status >= 400:
                    raise error_for(resp.status, answer, parse_retry_after(resp.headers.get("Retry-After")))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"{method} {path}: cannot reach the edge at {self.url}: {exc!r}") from exc
        if not isinstance(answer, dict):
            raise CodecError(f"unexpected answer to {method} {path}: {str(answer)[:200]}")
        return answer

    async def model(self, model: str) -> dict[str, Any]:
        """The model document: versions, aliases, traffic, health, shadow, history."""
        return await self.call("GET", _path("v1", "models", model))

    async def push(self, model: str, files: list[tuple[Path, str]], version: str | None = None,
                   config: str | None = None, reason: str = "") -> dict[str, Any]:
        """Upload ``files`` (local path, name in the version: ``model.onnx`` and external data), streamed from disk."""
        with contextlib.ExitStack() as stack:
            form = aiohttp.FormData()
            for path, name in files:
                form.add_field("file", stack.enter_context(open(path, "rb")), filename=name,
                               content_type="application/octet-stream")
            for key, value in (("version", version), ("config", config), ("reason", reason)):
                if value:
                    form.add_field(key, value)
            size = sum(os.path.getsize(path) for path, _ in files)
            # Generous for large files on slow links: a minute plus a second per 10 MB.
            return await self.call("POST", _path("v1", "models", model, "versions"), data=form,
                                   timeout=max(self.timeout, 60 + size / 10_000_000))

    async def set_alias(self, model: str, alias: str, version: str, reason: str = "",
                        auto_rollback: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"version": version, "reason": reason}
        if auto_rollback is not None:
            body["auto_rollback"] = auto_rollback
        return await self.call("PUT", _path("v1", "models", model, "aliases", alias), body)

    async def unalias(self, model: str, alias: str, reason: str = "") -> dict[str, Any]:
        return await self.call("DELETE", _path("v1", "models", model, "aliases", alias), params={"reason": reason})

    async def rollback(self, model: str, alias: str, reason: str = "") -> dict[str, Any]:
        return await self.call("POST", _path("v1", "models", model, "aliases", alias, "rollback"), {"reason": reason})

    async def set_traffic(self, model: str, weights: Mapping[str, int], reason: str = "") -> dict[str, Any]:
        return await self.call("PUT", _path("v1", "models", model, "traffic"), {"weights": dict(weights), "reason": reason})

    async def set_shadow(self, model: str, version: str | None, percent: float = 0.0, reason: str = "") -> dict[str, Any]:
        if version is None:
            return await self.call("DELETE", _path("v1", "models", model, "shadow"), params={"reason": reason})
        return await self.call("PUT", _path("v1", "models", model, "shadow"),
                               {"version": version, "percent": percent, "reason": reason})

    async def shadow(self, model: str) -> dict[str, Any]:
        return await self.call("GET", _path("v1", "models", model, "shadow"))

    async def split(self, model: str, version: str | None = None, stages: int | None = None, cut: list[str] | None = None,
                    new_name: str | None = None, reason: str = "") -> dict[str, Any]:
        """Split a version into pipeline stages (``stages`` or ``cut`` tensors); the pipeline and its stages."""
        body: dict[str, Any] = {"reason": reason}
        for key, value in (("version", version), ("stages", stages), ("cut", cut), ("as", new_name)):
            if value:
                body[key] = value
        return await self.call("POST", _path("v1", "models", model, "split"), body, timeout=max(self.timeout, 120))

    async def remove(self, model: str, version: str | None = None, reason: str = "") -> dict[str, Any]:
        path = _path("v1", "models", model, "versions", version) if version else _path("v1", "models", model)
        return await self.call("DELETE", path, params={"reason": reason})

    def artifact_url(self, model: str, version: str) -> str:
        """The base the artifact files of a version are served from (``?file=NAME`` for external data)."""
        return self.url + _path("v1", "models", model, "versions", version, "artifact")


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
