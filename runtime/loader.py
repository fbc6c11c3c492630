"""Loading a model repository into the system: queues declared, metadata in etcd."""

from __future__ import annotations

import logging

from broker.connection import BrokerConnection
from broker.topology import Topology
from runtime.catalog import publish_models
from runtime.coordination import open_etcd
from runtime.repository import scan
from runtime.settings import Settings

log = logging.getLogger("inferq.loader")


async def sync_repository(settings: Settings) -> list[str]:
    """Declare every model version's queue and publish model metadata; return the model names."""
    entries = scan(settings.model_repository)
    topology = Topology(settings.namespace)
    async with await BrokerConnection.open(settings.broker, "inferq-sync") as connection:
        await topology.declare_shared(connection.publisher, settings.jobs.ttl_s)
        for entry in entries.values():
            await topology.declare_model(
                connection.publisher, entry.name, list(entry.versions), entry.default_version, entry.config.queue
            )
    async with open_etcd(settings.etcd) as client:
        await publish_models(client, settings.namespace, entries, settings.etcd.timeout_s)
    for entry in entries.values():
        log.info("model %s: versions %s, default %s", entry.name, sorted(entry.versions, key=int), entry.default_version)
    return list(entries)
