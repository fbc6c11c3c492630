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
from inferq.runtime.records import FileRecord, VariantRecord, VersionRecord
from inferq.runtime.repository import ModelConfig, ModelEntry, ModelVersion, external_files, load_model, read_signature
from inferq.settings import Settings

log = logging.getLogger("inferq.versions")


async def stored_version(store: ArtifactStore, directory: Path, model: str, who: str = "",
                         config: ModelConfig | None = None) -> VersionRecord:
    """Store the files of a version directory (``model.onnx`` + external data) and describe them.

    The signature and opset come from the ONNX file; external data must stay inside the directory.
    Each ``[variants]`` file of ``config`` found in the directory is stored as a variant (one
    the directory lacks is not part of this version); its signature must be the default's.
    """
    path = directory / MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"{directory} has no {MODEL_FILE}")
    signature = await asyncio.to_thread(read_signature, model, "0", path)
    blob, files = await _store_with_data(store, path)
    variants = []
    for name, variant in (config.variants if config is not None else {}).items():
        if not (directory / variant.file).is_file():
            log.info("%s has no %s: this version has no variant %s", directory, variant.file, name)
            continue
        await _check_variant_signature(model, name, directory / variant.file, signature)
        stored, data = await _store_with_data(store, directory / variant.file)
        variants.append(VariantRecord(name, dict(variant.selector), stored.sha256, stored.size, variant.file, data))
    return VersionRecord(signature.inputs, signature.outputs, blob.sha256, blob.size, signature.opset,
                         created_by=who, files=files, variants=tuple(variants))


async def _store_with_data(store: ArtifactStore, path: Path) -> tuple[Any, tuple[FileRecord, ...]]:
    """Store an ONNX file and the external data files it names (beside it); its blob and theirs."""
    blob = await store.put_file(path)
    files = []
    for name in await asyncio.to_thread(external_files, path):
        stored = await store.put_file(path.parent / name)
        files.append(FileRecord(name, stored.sha256, stored.size))
    return blob, tuple(files)


async def _check_variant_signature(model: str, name: str, path: Path, default: ModelVersion) -> ModelVersion:
    """The variant file's signature, if it is the default's; else InvalidInput saying how they differ."""
    try:
        found = await asyncio.to_thread(read_signature, model, "0", path)
    except ConfigError as exc:
        raise InvalidInput(f"variant {name!r}: {exc}") from exc
    if (found.inputs, found.outputs) != (default.inputs, default.outputs):
        raise InvalidInput(f"variant {name!r} ({path.name}) has inputs {_specs(found.inputs)} and outputs "
                           f"{_specs(found.outputs)}, but {MODEL_FILE} has {_specs(default.inputs)} and "
                           f"{_specs(default.outputs)}: a variant must take and give the same tensors as the default")
    return found


def _specs(specs: Any) -> str:
    return "[" + ", ".join(f"{s.name}:{s.dtype}{list(s.shape) if s.shape is not None else '[?]'}" for s in specs) + "]"


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


async def describe_blobs(store: ArtifactStore, model: str, blobs: Mapping[str, Any], who: str = "",
                         config: ModelConfig | None = None) -> VersionRecord:
    """Describe a version from stored blobs (``{file name: Blob}``, ``model.onnx`` among them).

    The files are installed side by side in a temporary directory to read the signature;
    external data that ``model.onnx`` refers to must be among them. A blob named as a
    ``[variants]`` file of ``config`` is that variant (its signature must be the default's);
    every other blob is external data of ``model.onnx``.
    """
    if MODEL_FILE not in blobs:
        raise InvalidInput(f"a version needs a file named {MODEL_FILE}")
    present = {n: v for n, v in (config.variants if config is not None else {}).items() if v.file in blobs}
    with tempfile.TemporaryDirectory(prefix="inferq-push-") as tmp:
        directory = Path(tmp)
        await store.install({name: blob.sha256 for name, blob in blobs.items()}, directory)
        try:
            signature = await asyncio.to_thread(read_signature, model, "0", directory / MODEL_FILE)
            data = {MODEL_FILE: await asyncio.to_thread(external_files, directory / MODEL_FILE)}
            for name, variant in present.items():
                await _check_variant_signature(model, name, directory / variant.file, signature)
                data[variant.file] = await asyncio.to_thread(external_files, directory / variant.file)
        except ConfigError as exc:
            raise InvalidInput(str(exc)) from exc
    for main, names in data.items():
        if set(names) - set(blobs):
            raise InvalidInput(f"{main} refers to external data files that were not given: {sorted(set(names) - set(blobs))}")
    only_variants = {n for v in present.values() for n in data[v.file]} - set(data[MODEL_FILE])
    taken = {v.file for v in present.values()} | only_variants | {MODEL_FILE}
    extra = tuple(FileRecord(name, blob.sha256, blob.size) for name, blob in sorted(blobs.items()) if name not in taken)
    variants = tuple(VariantRecord(name, dict(v.selector), blobs[v.file].sha256, blobs[v.file].size, v.file,
                                   tuple(FileRecord(d, blobs[d].sha256, blobs[d].size) for d in data[v.file]))
                     for name, v in present.items())
    main = blobs[MODEL_FILE]
    return VersionRecord(signature.inputs, signature.outputs, main.sha256, main.size, signature.opset,
                         created_by=who, files=extra, variants=variants)


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


def file_map(version: VersionRecord, variant: str = "") -> dict[str, tuple[str, int]]:
    """Every file of a version (or of one of its variants, whose ONNX file is its ``model.onnx``): name -> (sha256, size).

    NotFound when the version has no such variant.
    """
    if variant:
        chosen = version.variant(variant)
        return {MODEL_FILE: (chosen.sha256, chosen.size), **{f.name: (f.sha256, f.size) for f in chosen.files}}
    return {MODEL_FILE: (version.sha256, version.size), **{f.name: (f.sha256, f.size) for f in version.files}}


def matches(directory: Path, version: VersionRecord) -> bool:
    """Whether ``directory`` holds exactly the version's bytes (blocking: hashes every file)."""
    return _holds(directory, file_map(version))


def edge_base_url(settings: Settings) -> str:
    """Where this host's processes find the edge: ``registry.artifacts_url``, else the edge settings."""
    if settings.registry.artifacts_url:
        return settings.registry.artifacts_url.rstrip("/")
    host = settings.edge.host if settings.edge.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{settings.edge.port}"


async def load_entry(settings: Settings, model: str, version: str | None, variant: str = "") -> ModelEntry:
    """What a worker serves: its version (or a device variant of it) from the registry, local or fetched from the edge.

    The model repository's copy is used when its bytes are the recorded ones; otherwise the
    files are fetched by SHA-256 into ``<state_dir>/artifacts`` and verified. A model the
    registry does not know is read from the repository alone (as before the registry).
    """
    async with open_etcd(settings.etcd) as client:
        record, _ = await read_model(client, settings.namespace, model, settings.etcd.timeout_s)
    if record is None:
        if variant:
            raise UnknownModel(f"model {model!r} is not in the registry, so it has no variant {variant!r}")
        log.warning("model %s is not in the registry; serving it from %s as found", model, settings.model_repository)
        return load_model(settings.model_repository, model)
    v = version or record.default_version
    if v not in record.versions:
        raise UnknownModel(f"model {model!r} has no version {v!r} in the registry (has {sorted(record.versions, key=int)})")
    path = await _model_file(settings, model, v, record.versions[v], variant)
    signature = await asyncio.to_thread(read_signature, model, v, path)
    config = ModelConfig.from_dict(dict(record.config), f"registry config of {model}") if record.config else \
        ModelConfig.load(settings.model_repository / model / "config.toml")
    return ModelEntry(model, {v: signature}, config)


def local_file(repository: Path, model: str, version: str, record: VersionRecord, variant: str = "") -> Path | None:
    """The repository's copy of the version's (or variant's) ONNX file, if it holds the recorded bytes (blocking: hashes)."""
    local = repository / model / version
    name = record.variant(variant).file if variant else MODEL_FILE
    files = file_map(record, variant)
    wanted = {name: files[MODEL_FILE], **{n: f for n, f in files.items() if n != MODEL_FILE}}
    if (local / name).is_file() and (not record.sha256 or _holds(local, wanted)):
        return local / name
    return None


async def _model_file(settings: Settings, model: str, version: str, record: VersionRecord, variant: str) -> Path:
    """The ONNX file to load: the repository's when its bytes are the recorded ones, else the verified cache's."""
    local = await asyncio.to_thread(local_file, settings.model_repository, model, version, record, variant)
    if local is not None:
        return local
    if not record.sha256:
        raise ConfigError(f"{model}:{version} is not in {settings.model_repository / model / version} and the registry "
                          "has no hash to fetch it by")
    import aiohttp

    headers = {"Authorization": f"Bearer {settings.registry.api_key}"} if settings.registry.api_key else {}
    cache = ArtifactCache(settings.state_dir / "artifacts")
    async with aiohttp.ClientSession() as session:
        directory = await cache.ensure(session, edge_base_url(settings), model, version, file_map(record, variant),
                                       headers, settings.registry.fetch_timeout_s, variant)
    return directory / MODEL_FILE


def _holds(directory: Path, files: Mapping[str, tuple[str, int]]) -> bool:
    try:
        return all(hash_file(directory / name).sha256 == sha for name, (sha, _) in files.items())
    except OSError:
        return False
