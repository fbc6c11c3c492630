"""Model artifacts by content: stores that keep files under their SHA-256, and fetching with verification.

A version's artifact is ``model.onnx`` plus its external data files, each kept
once under its SHA-256 (two versions with the same bytes share them)::

    FilesystemStore(<model repository>)     <repo>/.blobs/sha256/<hex>     (the default: the edge host's disk)
    S3Store("s3://bucket/prefix")           s3://bucket/prefix/sha256/<hex>  (pip install 'inferq[s3]')

:func:`fetch` downloads one file over HTTP (the edge's
``GET /v1/models/{m}/versions/{v}/artifact``), resuming a partial download with
``Range`` + ``If-Range``, and keeps it only if its SHA-256 is the one the
registry recorded. :class:`ArtifactCache` puts a version's files side by side
(ONNX finds external data by relative name) in a cache directory keyed by the
model file's hash. Only aiohttp and the standard library are needed here, so a
client-only install can ``inferq models pull`` and an edge-node agent can reuse it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from inferq.errors import ConfigError, IntegrityError, MessageTooLarge, NotFound, Unavailable

log = logging.getLogger("inferq.artifacts")

CHUNK = 1 << 20
MODEL_FILE = "model.onnx"
SHA256_HEX = frozenset("0123456789abcdef")


def check_sha256(value: str) -> str:
    """``value`` if it is a lowercase hex SHA-256 (what names a blob), else NotFound (nothing else is stored)."""
    if len(value) != 64 or not set(value) <= SHA256_HEX:
        raise NotFound(f"{value[:80]!r} is not a SHA-256")
    return value


@dataclass(frozen=True)
class Blob:
    """A stored file: its SHA-256 (hex) and size in bytes."""

    sha256: str
    size: int


def hash_file(path: Path) -> Blob:
    """SHA-256 and size of a file, read in chunks (blocking: call it off the event loop)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return Blob(digest.hexdigest(), size)


class ArtifactStore(Protocol):
    """Where artifacts live, by content. Every method is safe to call from the event loop."""

    async def put_file(self, path: Path) -> Blob:
        """Store a local file; return its hash and size (storing the same bytes twice is a no-op)."""
        ...

    async def put_stream(self, chunks: AsyncIterator[bytes], limit: int) -> Blob:
        """Store what ``chunks`` yields (an upload), refusing more than ``limit`` bytes."""
        ...

    async def size(self, sha256: str) -> int | None:
        """The stored size of a blob, None if it is not stored."""
        ...

    def read(self, sha256: str, start: int, end: int) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)`` of a blob, in chunks."""
        ...

    async def install(self, files: Mapping[str, str], directory: Path) -> Path:
        """Copy blobs (``{file name: sha256}``) into ``directory`` so ONNX Runtime can load them; returns it."""
        ...


class FilesystemStore:
    """Blobs under ``<root>/.blobs/sha256/<hex>``, written atomically (a temporary file, then a rename).

    ``root`` is the model repository, so the embedded default needs nothing new; the
    dot-directory is skipped by repository scans. Blobs are copies, never links: an
    edit of a repository file cannot change a stored version.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / ".blobs" / "sha256"

    def path(self, sha256: str) -> Path:
        return self.blobs / check_sha256(sha256)

    async def put_file(self, path: Path) -> Blob:
        return await asyncio.to_thread(self._put_file, path)

    def _put_file(self, path: Path) -> Blob:
        # Hashed first: a version stored before (every sync of an unchanged repository) costs one read, no write.
        known = hash_file(path)
        stored = self.blobs / known.sha256
        if stored.exists() and stored.stat().st_size == known.size:
            return known
        self.blobs.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, temp = tempfile.mkstemp(dir=self.blobs, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            return self._keep(Path(temp), Blob(digest.hexdigest(), size))  # what was copied, even if it changed meanwhile
        finally:
            Path(temp).unlink(missing_ok=True)

    async def put_stream(self, chunks: AsyncIterator[bytes], limit: int) -> Blob:
        self.blobs.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, temp = tempfile.mkstemp(dir=self.blobs, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise MessageTooLarge(f"upload is larger than {limit} bytes (registry.max_artifact_bytes)")
                    digest.update(chunk)
                    await asyncio.to_thread(out.write, chunk)
            return await asyncio.to_thread(self._keep, Path(temp), Blob(digest.hexdigest(), size))
        finally:
            Path(temp).unlink(missing_ok=True)

    def _keep(self, temp: Path, blob: Blob) -> Blob:
        final = self.path(blob.sha256)
        if not final.exists():
            temp.chmod(0o444)
            os.replace(temp, final)
        return blob

    async def size(self, sha256: str) -> int | None:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    async def read(self, sha256: str, start: int, end: int) -> AsyncIterator[bytes]:
        with open(self.path(sha256), "rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                chunk = await asyncio.to_thread(f.read, min(CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

    async def install(self, files: Mapping[str, str], directory: Path) -> Path:
        await asyncio.to_thread(self._install, files, directory)
        return directory

    def _install(self, files: Mapping[str, str], directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name, sha256 in files.items():
            target = directory / name
            if target.exists() and hash_file(target).sha256 == sha256:
                continue
            temp = directory / f".{name}.{uuid.uuid4().hex[:6]}"
            shutil.copyfile(self.path(sha256), temp)
            os.replace(temp, target)


class S3Store:
    """Blobs in an S3-compatible object store, ``<url>/sha256/<hex>``, through fsspec/s3fs (``pip install 'inferq[s3]'``).

    ``options`` go to ``s3fs.S3FileSystem`` (``key``, ``secret``, ``endpoint_url`` for
    MinIO and the like, ``client_kwargs``). s3fs is imported on first use, so nothing
    else needs it. Its calls are blocking and run in a thread.
    """

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        if not url.startswith("s3://"):
            raise ConfigError(f"an S3 store URL starts with s3://, got {url!r}")
        self.prefix = url[len("s3://"):].rstrip("/")
        self.options = dict(options or {})
        self._fs: Any = None

    @property
    def fs(self) -> Any:
        if self._fs is None:
            try:
                import fsspec
            except ImportError as exc:
                raise ConfigError("the S3 artifact store needs s3fs: pip install 'inferq[s3]'") from exc
            self._fs = fsspec.filesystem("s3", **self.options)
        return self._fs

    def key(self, sha256: str) -> str:
        return f"{self.prefix}/sha256/{check_sha256(sha256)}"

    async def put_file(self, path: Path) -> Blob:
        blob = await asyncio.to_thread(hash_file, path)
        if await self.size(blob.sha256) != blob.size:
            await asyncio.to_thread(self.fs.put_file, str(path), self.key(blob.sha256))
        return blob

    async def put_stream(self, chunks: AsyncIterator[bytes], limit: int) -> Blob:
        # Spooled to a local temporary file first: the hash names the object, and it is known only at the end.
        with tempfile.TemporaryDirectory(prefix="inferq-upload-") as tmp:
            local = FilesystemStore(Path(tmp))
            blob = await local.put_stream(chunks, limit)
            await asyncio.to_thread(self.fs.put_file, str(local.path(blob.sha256)), self.key(blob.sha256))
            return blob

    async def size(self, sha256: str) -> int | None:
        try:
            info = await asyncio.to_thread(self.fs.info, self.key(sha256))
        except FileNotFoundError:
            return None
        return int(info["size"])

    async def read(self, sha256: str, start: int, end: int) -> AsyncIterator[bytes]:
        position = start
        while position < end:
            stop = min(end, position + CHUNK)
            chunk = await asyncio.to_thread(self.fs.cat_file, self.key(sha256), position, stop)
            if not chunk:
                return
            position += len(chunk)
            yield chunk

    async def install(self, files: Mapping[str, str], directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        for name, sha256 in files.items():
            await asyncio.to_thread(self.fs.get_file, self.key(sha256), str(directory / name))
        return directory


def open_store(url: str, repository: Path, options: Mapping[str, Any] | None = None) -> ArtifactStore:
    """The store a ``registry.store`` setting names: "" (the repository directory) or ``s3://bucket/prefix``."""
    if not url:
        return FilesystemStore(repository)
    if url.startswith("s3://"):
        return S3Store(url, options)
    raise ConfigError(f"registry.store must be empty (the model repository) or s3://bucket/prefix, not {url!r}")


# --- fetching -------------------------------------------------------------------------------------------------


async def fetch(session: aiohttp.ClientSession, url: str, target: Path, sha256: str, size: int | None = None,
                headers: Mapping[str, str] | None = None, timeout_s: float = 60.0) -> Path:
    """Download ``url`` to ``target``, keeping it only if its SHA-256 is ``sha256``.

    A ``target.part`` left by an interrupted download is resumed (``Range`` with
    ``If-Range`` on the ETag, which is the SHA-256: a changed file restarts). A
    mismatch deletes what was downloaded and raises IntegrityError. ``timeout_s``
    bounds the connect and each read, not the whole (possibly large) transfer.
    """
    check_sha256(sha256)
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    request_headers = dict(headers or {})
    if have:
        request_headers.update({"Range": f"bytes={have}-", "If-Range": f'"{sha256}"'})
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
    try:
        async with session.get(url, headers=request_headers, timeout=timeout) as resp:
            await _check_status(resp, url)
            resumed = resp.status == 206
            digest = await asyncio.to_thread(_hash_prefix, part) if resumed else hashlib.sha256()
            with open(part, "ab" if resumed else "wb") as out:
                async for chunk in resp.content.iter_chunked(CHUNK):
                    digest.update(chunk)
                    await asyncio.to_thread(out.write, chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise Unavailable(f"downloading {url} failed ({exc!r}); run it again to resume") from exc
    if digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise IntegrityError(f"{url}: downloaded bytes have SHA-256 {digest.hexdigest()}, the registry says {sha256}; "
                             "the download was discarded")
    os.replace(part, target)
    return target


async def _check_status(resp: aiohttp.ClientResponse, url: str) -> None:
    if resp.status in (200, 206):
        return
    text = (await resp.text())[:300]
    if resp.status == 404:
        raise NotFound(f"{url}: {text}")
    raise Unavailable(f"{url} answered {resp.status}: {text}")


def _hash_prefix(path: Path) -> Any:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest


def artifact_url(base: str, model: str, version: str, name: str = MODEL_FILE, variant: str = "") -> str:
    """Where the edge serves one file of a version (of one of its device variants with ``variant``)."""
    url = f"{base.rstrip('/')}/v1/models/{model}/versions/{version}/artifact"
    query = [f"variant={variant}"] * bool(variant) + [f"file={name}"] * (name != MODEL_FILE)
    return f"{url}?{'&'.join(query)}" if query else url


class ArtifactCache:
    """Versions fetched from an edge, one directory per ``model.onnx`` hash: ``<root>/<sha256>/<files>``.

    A directory is complete once every file was verified (marked by ``.verified``);
    an incomplete one is resumed on the next :meth:`ensure`.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def directory(self, sha256: str) -> Path:
        return self.root / check_sha256(sha256)

    async def ensure(self, session: aiohttp.ClientSession, base_url: str, model: str, version: str,
                     files: Mapping[str, tuple[str, int]], headers: Mapping[str, str] | None = None,
                     timeout_s: float = 60.0, variant: str = "") -> Path:
        """The local directory of a version (or variant), fetched and verified if not already cached; ``files``: name -> (sha, size)."""
        directory = self.directory(files[MODEL_FILE][0])
        if (directory / ".verified").exists():
            return directory
        for name, (sha256, size) in files.items():
            target = directory / name
            if target.exists() and (await asyncio.to_thread(hash_file, target)).sha256 == sha256:
                continue
            log.info("fetching %s:%s %s (%d bytes)", model, version, name, size)
            await fetch(session, artifact_url(base_url, model, version, name, variant), target, sha256, size, headers, timeout_s)
        (directory / ".verified").touch()
        return directory
