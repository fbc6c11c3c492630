"""An edge node's model cache: versions fetched by SHA-256 from the edge, verified, kept under a size bound.

The cache is the :class:`~inferq.runtime.artifacts.ArtifactCache` directory that workers
load from (``<state_dir>/artifacts/<sha256 of model.onnx>/``), so a worker the agent
starts finds its files there without a download of its own. A fetch that fails (edge
away, bytes that do not match the registry's hash) is retried with backoff; a partial
file is resumed. :meth:`ModelCache.evict` removes the least recently used versions
until the cache fits ``max_bytes``, never one in use.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Collection, Mapping
from pathlib import Path

import aiohttp

from inferq.errors import IntegrityError, NotFound, Unavailable
from inferq.runtime.artifacts import MODEL_FILE, ArtifactCache

log = logging.getLogger("inferq.modelcache")

USED = ".used"  # its mtime is the version's last use


class ModelCache:
    """The node's cache of versions, one directory per ``model.onnx`` hash."""

    def __init__(self, root: Path, max_bytes: int, attempts: int = 5, backoff_s: float = 0.5) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._cache = ArtifactCache(root)

    async def ensure(self, base_url: str, model: str, version: str, files: Mapping[str, tuple[str, int]],
                     headers: Mapping[str, str], timeout_s: float, variant: str = "") -> Path:
        """The verified directory of a version (or variant), downloading what is missing (retried up to ``attempts`` times)."""
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                async with aiohttp.ClientSession() as session:
                    directory = await self._cache.ensure(session, base_url, model, version, files, headers, timeout_s, variant)
                break
            except NotFound:
                raise
            except (IntegrityError, Unavailable) as exc:
                if attempt == self.attempts:
                    raise
                log.warning("fetch of %s:%s failed (attempt %d of %d): %s; retrying in %.1fs",
                            model, version, attempt, self.attempts, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        await asyncio.to_thread(self.touch, files[MODEL_FILE][0])
        return directory

    def touch(self, sha256: str) -> None:
        """Mark a cached version as used now."""
        marker = self._cache.directory(sha256) / USED
        marker.touch()
        os.utime(marker, (time.time(), time.time()))

    def cached(self) -> dict[str, tuple[float, int]]:
        """Verified versions: sha256 -> (last use, bytes); blocking."""
        out: dict[str, tuple[float, int]] = {}
        if not self.root.is_dir():
            return out
        for directory in self.root.iterdir():
            if not (directory / ".verified").exists():
                continue
            used = (directory / USED).stat().st_mtime if (directory / USED).exists() else 0.0
            size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
            out[directory.name] = (used, size)
        return out

    def evict(self, in_use: Collection[str]) -> list[str]:
        """Remove least recently used versions not in ``in_use`` until the cache fits; what went (blocking)."""
        entries = self.cached()
        total = sum(size for _, size in entries.values())
        gone = []
        for sha256, (_, size) in sorted(entries.items(), key=lambda e: e[1][0]):
            if total <= self.max_bytes:
                break
            if sha256 in in_use:
                continue
            shutil.rmtree(self.root / sha256, ignore_errors=True)
            total -= size
            gone.append(sha256)
            log.info("evicted %s from the model cache (%d bytes)", sha256[:12], size)
        return gone
