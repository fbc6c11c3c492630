"""Loading a model repository into the system: queues declared, metadata in etcd."""

from __future__ import annotations

import logging

from broker.connection import BrokerConnection
from broker.topology import Topology
from runtime.catalog import publish_models
from runtime.coordination import keys, open_etcd
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


async def remove_namespace(settings: Settings) -> None:
    """Delete a namespace's queues, streams, exchanges and etcd keys (tests and benchmarks clean up with it)."""
    topology = Topology(settings.namespace)
    async with await BrokerConnection.open(settings.broker, "inferq-cleanup") as connection:
        channel = await connection.channel()
        names = [topology.dead, topology.ledger, topology.cancels]
        for entry in scan(settings.model_repository).values():
            names += [topology.model_queue(entry.name, v) for v in entry.versions]
        for name in names:
            await channel.queue_delete(name)
        for name in (topology.requests, topology.control, topology.dead):
            await channel.exchange_delete(name)
    async with open_etcd(settings.etcd) as client:
        await client.delete_prefix(keys(settings.namespace).root.encode())
