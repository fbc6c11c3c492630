"""A version's files: storing them, describing them, the repository's working copy, and what a worker loads.

``load_entry`` is how a worker gets its version: the repository's copy when its
bytes are the recorded ones, otherwise the files fetched by SHA-256 from the edge
(:class:`~inferq.runtime.artifacts.ArtifactCache`) and verified.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from inferq.errors import ConfigError, InvalidInput, UnknownModel
from inferq.runtime.artifacts import MODEL_FILE, ArtifactCache, ArtifactStore, FilesystemStore, hash_file
from inferq.runtime.catalog import read_model
from inferq.runtime.coordination import open_etcd
from inferq.runtime.records import FileRecord, VersionRecord
from inferq.runtime.repository import ModelConfig, ModelEntry, external_files, load_model, read_signature
from inferq.settings import Settings

log = logging.getLogger("inferq.versions")


async def stored_version(store: ArtifactStore, directory: Path, model: str, who: str = "") -> VersionRecord:
    """Store the files of a version directory (``model.onnx`` + external data) and describe them.

    The signature and opset come from the ONNX file; external data must stay inside the directory.
    """
    path = directory / MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"{directory} has no {MODEL_FILE}")
    signature = await asyncio.to_thread(read_signature, model, "0", path)
    extra = await asyncio.to_thread(external_files, path)
    blob = await store.put_file(path)
    files = []
    for name in extra:
        stored = await store.put_file(directory / name)
        files.append(FileRecord(name, stored.sha256, stored.size))
    return VersionRecord(signature.inputs, signature.outputs, blob.sha256, blob.size, signature.opset,
                         created_by=who, files=tuple(files))


async def materialize(store: ArtifactStore | None, repository: Path, model: str, version: str, files: Mapping[str, str],
                      config_text: str | None = None) -> None:
    """Put a pushed version where this host's workers load it: ``<repository>/<model>/<version>/`` (filesystem store).

    With ``config_text`` the model's ``config.toml`` is written too, so a later ``models sync``
    of the repository finds the config that was pushed. An S3 store keeps nothing locally:
    workers fetch from the edge.
    """
    if not isinstance(store, FilesystemStore):
        return
    await store.install(files, repository / model / version)
    if config_text is not None:
        await asyncio.to_thread((repository / model / "config.toml").write_text, config_text + "\n")


async def describe_blobs(store: ArtifactStore, model: str, blobs: Mapping[str, Any], who: str = "") -> VersionRecord:
    """Describe a version from stored blobs (``{file name: Blob}``, ``model.onnx`` among them).

    The files are installed side by side in a temporary directory to read the signature;
    external data that ``model.onnx`` refers to must be among them.
    """
    if MODEL_FILE not in blobs:
        raise InvalidInput(f"a version needs a file named {MODEL_FILE}")
    with tempfile.TemporaryDirectory(prefix="inferq-push-") as tmp:
        directory = Path(tmp)
        await store.install({name: blob.sha256 for name, blob in blobs.items()}, directory)
        try:
            signature = await asyncio.to_thread(read_signature, model, "0", directory / MODEL_FILE)
            missing = set(await asyncio.to_thread(external_files, directory / MODEL_FILE)) - set(blobs)
        except ConfigError as exc:
            raise InvalidInput(str(exc)) from exc
    if missing:
        raise InvalidInput(f"{MODEL_FILE} refers to external data files that were not given: {sorted(missing)}")
    extra = tuple(FileRecord(name, blob.sha256, blob.size) for name, blob in sorted(blobs.items()) if name != MODEL_FILE)
    main = blobs[MODEL_FILE]
    return VersionRecord(signature.inputs, signature.outputs, main.sha256, main.size, signature.opset,
                         created_by=who, files=extra)


async def dematerialize(store: ArtifactStore | None, repository: Path, model: str, version: str | None = None) -> None:
    """Delete a removed version's (or model's) directory from the repository, so a later sync does not bring it back.

    Only with the filesystem store, where the repository is the registry's working copy;
    the blobs stay (another version may share them).
    """
    if not isinstance(store, FilesystemStore):
        return
    target = repository / model / version if version else repository / model
    if target.is_dir():
        await asyncio.to_thread(shutil.rmtree, target, True)


def file_map(version: VersionRecord) -> dict[str, tuple[str, int]]:
    """Every file of a version: name -> (sha256, size)."""
    return {MODEL_FILE: (version.sha256, version.size), **{f.name: (f.sha256, f.size) for f in version.files}}


def matches(directory: Path, version: VersionRecord) -> bool:
    """Whether ``directory`` holds exactly the version's bytes (blocking: hashes every file)."""
    try:
        return all(hash_file(directory / name).sha256 == sha for name, (sha, _) in file_map(version).items())
    except OSError:
        return False


def edge_base_url(settings: Settings) -> str:
    """Where this host's processes find the edge: ``registry.artifacts_url``, else the edge settings."""
    if settings.registry.artifacts_url:
        return settings.registry.artifacts_url.rstrip("/")
    host = settings.edge.host if settings.edge.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{settings.edge.port}"


async def load_entry(settings: Settings, model: str, version: str | None) -> ModelEntry:
    """What a worker serves: its version from the registry, with the files local or fetched from the edge.

    The model repository's copy is used when its bytes are the recorded ones; otherwise the
    files are fetched by SHA-256 into ``<state_dir>/artifacts`` and verified. A model the
    registry does not know is read from the repository alone (as before the registry).
    """
    async with open_etcd(settings.etcd) as client:
        record, _ = await read_model(client, settings.namespace, model, settings.etcd.timeout_s)
    if record is None:
        log.warning("model %s is not in the registry; serving it from %s as found", model, settings.model_repository)
        return load_model(settings.model_repository, model)
    v = version or record.default_version
    if v not in record.versions:
        raise UnknownModel(f"model {model!r} has no version {v!r} in the registry (has {sorted(record.versions, key=int)})")
    directory = await _files_of(settings, model, v, record.versions[v])
    signature = await asyncio.to_thread(read_signature, model, v, directory / MODEL_FILE)
    config = ModelConfig.from_dict(dict(record.config), f"registry config of {model}") if record.config else \
        ModelConfig.load(settings.model_repository / model / "config.toml")
    return ModelEntry(model, {v: signature}, config)


async def _files_of(settings: Settings, model: str, version: str, record: VersionRecord) -> Path:
    local = settings.model_repository / model / version
    if (local / MODEL_FILE).is_file() and (not record.sha256 or await asyncio.to_thread(matches, local, record)):
        return local
    if not record.sha256:
        raise ConfigError(f"{model}:{version} is not in {local} and the registry has no hash to fetch it by")
    import aiohttp

    headers = {"Authorization": f"Bearer {settings.registry.api_key}"} if settings.registry.api_key else {}
    cache = ArtifactCache(settings.state_dir / "artifacts")
    async with aiohttp.ClientSession() as session:
        return await cache.ensure(session, edge_base_url(settings), model, version, file_map(record), headers,
                                  settings.registry.fetch_timeout_s)
