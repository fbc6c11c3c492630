"""Loading a model repository into the registry: every version pushed, queues declared, ``<model>`` bound."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from inferq.broker.connection import BrokerConnection
from inferq.broker.topology import ROUTER, QueueLimits, Topology
from inferq.errors import Conflict, ConfigError, InvalidInput
from inferq.runtime.artifacts import open_store
from inferq.runtime.catalog import read_models
from inferq.runtime.coordination import open_etcd
from inferq.runtime.namespace import remove_namespace  # noqa: F401 (lives there; tests and benchmarks import it from here)
from inferq.runtime.records import ModelRecord
from inferq.runtime.registry import Registry, identity
from inferq.runtime.versions import stored_version
from inferq.runtime.repository import ModelConfig, ModelEntry, scan
from inferq.runtime.routing import STABLE, alias_version
from inferq.settings import Settings

log = logging.getLogger("inferq.loader")


def store_options(settings: Settings) -> dict[str, object]:
    """s3fs options from the registry settings (credentials come from the usual AWS variables)."""
    url = settings.registry.s3_endpoint_url
    return {"client_kwargs": {"endpoint_url": url}} if url else {}


def queue_limits(record: ModelRecord) -> QueueLimits:
    """A model's queue arguments, from the config the registry holds."""
    return ModelConfig.from_dict(dict(record.config)).queue if record.config else QueueLimits()


def unpinned_target(record: ModelRecord, ready: set[str] | None = None) -> str | None:
    """Where ``<model>`` should be bound: the router queue with a split or shadow, else the version stable serves.

    With ``ready`` (versions with a warmed-up worker), a held stable alias keeps it on the
    version it left, as the edges do for HTTP jobs; without, the alias's version.
    """
    if record.routed:
        return ROUTER
    if STABLE in record.aliases:
        return alias_version(record, STABLE, set(record.versions) if ready is None else ready)[0]
    return record.default_version or None


async def sync_repository(settings: Settings, prune: bool = False) -> list[str]:
    """Push every version of the repository (identical bytes are no-ops), declare queues; return the model names.

    The first version of a new model becomes its ``stable`` alias. A version whose files
    changed under the same number is refused (versions are immutable): the other
    models are still synced, then ConfigError lists what was refused. With ``prune``,
    models and versions the repository no longer has are removed from the registry.
    """
    entries = scan(settings.model_repository)
    store = open_store(settings.registry.store, settings.model_repository, store_options(settings))
    who = f"sync:{identity()}"
    errors: list[str] = []
    async with open_etcd(settings.etcd) as client:
        registry = Registry(client, settings.namespace, settings.etcd.timeout_s, store)
        for entry in entries.values():
            errors += await _push_entry(settings, registry, entry, who)
        if prune:
            errors += await _prune(registry, entries, await read_models(client, settings.namespace, settings.etcd.timeout_s), who)
        records = await read_models(client, settings.namespace, settings.etcd.timeout_s)
    await declare_records(settings, records.values())
    for record in records.values():
        log.info("model %s: versions %s, default %s", record.name, sorted(record.versions, key=int), record.default_version or "-")
    if errors:
        raise ConfigError("models sync refused:\n  " + "\n  ".join(errors))
    return sorted(entries)


async def _push_entry(settings: Settings, registry: Registry, entry: ModelEntry, who: str) -> list[str]:
    has_config = (settings.model_repository / entry.name / "config.toml").exists()
    current = await registry.get(entry.name)
    errors = []
    for version in sorted(entry.versions, key=int):
        if current is not None and version in current.removed:
            log.warning("model %s version %s was removed from the registry; its directory is not synced again", entry.name, version)
            continue
        try:
            pushed = await stored_version(registry.store, settings.model_repository / entry.name / version, entry.name, who,
                                          entry.config)
            await registry.register(entry.name, version, pushed, entry.config if has_config else None, who, "models sync")
        except (Conflict, InvalidInput) as exc:
            errors.append(f"{entry.name}:{version}: {exc}")
    return errors


async def _prune(registry: Registry, entries: dict[str, ModelEntry], records: dict[str, ModelRecord], who: str) -> list[str]:
    errors = []
    for name, record in records.items():
        if record.pipeline:  # a pipeline has no files in the repository (its stages do)
            continue
        try:
            if name not in entries:
                await registry.remove_model(name, who, "models sync --prune: gone from the repository")
                continue
            for version in set(record.versions) - set(entries[name].versions):
                await registry.remove_version(name, version, who, "models sync --prune: gone from the repository")
        except (Conflict, InvalidInput) as exc:
            errors.append(f"{name}: {exc}")
    return errors


async def declare_records(settings: Settings, records: Iterable[ModelRecord]) -> None:
    """Declare the queues of every record and bind ``<model>`` where its record says."""
    topology = Topology(settings.namespace, settings.broker.replicas)
    async with await BrokerConnection.open(settings.broker, "inferq-sync") as connection:
        await topology.declare_shared(connection.publisher, settings.jobs)
        for record in records:
            if record.pipeline:  # no version queues: AMQP jobs to it wait in its router queue for an edge's router
                await topology.declare_pipeline(connection.publisher, record.name, queue_limits(record))
                continue
            await topology.declare_model(connection.publisher, record.name, list(record.versions), queue_limits(record),
                                         unpinned_target(record))
