"""A namespace's footprint on RabbitMQ and etcd: what it holds, and removing all of it.

``inferq namespace reset NAME`` and the test and benchmark clean-ups use this.
RabbitMQ's AMQP protocol cannot list queues, so the model queues are found
from everything that names a model version:

* the model records in etcd (``/<ns>/models/``), their ``versions`` and ``removed``;
* the membership records of live workers (``/<ns>/workers/``);
* the autoscaler's decisions (``/<ns>/autoscaler/decisions/<model>.<version>``);
* the model repository on this host (``models/<name>/<version>/``).

For each such model its router queue ``<ns>.model.<m>`` (traffic splits and
shadows), and for each version, removed ones included, its queues ``<ns>.model.<m>.<v>``, ``.high`` and ``.retry``
and its priority exchanges ``<ns>.route.<m>.<v>`` and ``.normal`` go, besides the
shared ``<ns>.dead``, ``<ns>.jobs``, ``<ns>.cancels`` and the webhook queues and the exchanges
``<ns>.requests``, ``<ns>.control`` and ``<ns>.dead``.

Where RabbitMQ's management API answers (``tenancy.management_url``; ``inferq
services`` enables the plugin locally), every durable queue and every exchange whose
name starts with ``<ns>.`` goes too, so a version that none of those sources names any
more (removed from the repository, synced away from the model record, with no worker
and no decision left) and queues someone declared by hand under the prefix are found.
Without it they are left, and so, always, are the exclusive reply and control queues of
running clients and workers (the broker deletes those when their owner disconnects).
``rabbitmqctl list_queues name | grep '^<ns>\\.'`` on the broker host shows anything left.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from inferq.broker.admin import BrokerAdmin
from inferq.broker.connection import BrokerConnection
from inferq.broker.identity import broker_vhost
from inferq.broker.topology import WEBHOOK_DELAYS_S, Topology
from inferq.runtime.coordination import get_json_prefix, keys, open_etcd, translated
from inferq.errors import BrokerError, ConfigError
from inferq.settings import Settings

log = logging.getLogger("inferq.namespace")

_VERSION = re.compile(r"^[0-9]+$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_namespace(name: str) -> str:
    """Return ``name`` if it can be a namespace: no dots, so that ``<ns>.`` prefixes never overlap."""
    if not _NAMESPACE.match(name):
        raise ConfigError(f"namespace {name!r} must match [A-Za-z0-9_-]{{1,64}}")
    return name


@dataclass(frozen=True)
class Footprint:
    """What a namespace holds: queues that exist (with their ready messages), exchanges, etcd keys."""

    namespace: str
    queues: tuple[tuple[str, int], ...]
    exchanges: tuple[str, ...]
    etcd_keys: int

    @property
    def empty(self) -> bool:
        return not self.queues and not self.etcd_keys

    def describe(self) -> str:
        """Lines for the confirmation prompt."""
        lines = [f"namespace {self.namespace!r}:"]
        lines += [f"  queue {name} ({ready} ready messages)" for name, ready in self.queues]
        lines.append(f"  exchanges {', '.join(self.exchanges)} (if they exist)")
        lines.append(f"  {self.etcd_keys} etcd keys under /{self.namespace}/")
        return "\n".join(lines)


def repository_versions(root: Path) -> set[tuple[str, str]]:
    """(model, version) of every ``<root>/<model>/<integer>/`` folder, model file or not."""
    if not root.is_dir():
        return set()
    return {(m.name, v.name) for m in root.iterdir() if m.is_dir() and not m.name.startswith(".")
            for v in m.iterdir() if v.is_dir() and _VERSION.match(v.name)}


async def etcd_versions(settings: Settings) -> tuple[set[tuple[str, str]], int]:
    """(model, version) pairs that etcd names, and how many keys the namespace has there."""
    k, timeout = keys(settings.namespace), settings.etcd.timeout_s
    found: set[tuple[str, str]] = set()
    async with open_etcd(settings.etcd) as client:
        for name, record in (await get_json_prefix(client, k.models, timeout)).items():
            if isinstance(record, dict):  # removed versions too: the keeper may not have deleted their queues yet
                found |= {(name, str(v)) for v in [*(record.get("versions") or ()), *(record.get("removed") or ())]}
        for record in (await get_json_prefix(client, k.workers, timeout)).values():
            if isinstance(record, dict) and record.get("model") and record.get("version"):
                found.add((str(record["model"]), str(record["version"])))
        for key in await get_json_prefix(client, k.decisions, timeout):
            model, _, version = key.rpartition(".")
            if model and version:
                found.add((model, version))
        async with translated(f"counting the keys of {k.root}"):
            count = len(await asyncio.wait_for(client.get_prefix(f"{k.root}/".encode()), timeout))
    return found, count


def queue_names(topology: Topology, versions: set[tuple[str, str]]) -> list[str]:
    """Every queue name of the namespace: the shared ones, each model's router queue, then its versions' queues."""
    names = [topology.dead, topology.ledger, topology.cancels, topology.webhooks]
    names += [topology.webhook_retry(d) for d in WEBHOOK_DELAYS_S]
    names += [topology.router_queue(model) for model in sorted({model for model, _ in versions})]
    for model, version in sorted(versions):
        names += list(topology.queues_of(model, version))
    return names


def exchange_names(topology: Topology, versions: set[tuple[str, str]]) -> list[str]:
    """Every exchange of the namespace: the shared ones, then each version's priority routing pair."""
    names = [topology.requests, topology.control, topology.dead]
    for model, version in sorted(versions):
        names += [topology.route_exchange(model, version), f"{topology.route_exchange(model, version)}.normal"]
    return names


async def survey(settings: Settings) -> Footprint:
    """What the namespace holds now (queues that do not exist are left out)."""
    topology = Topology(settings.namespace, settings.broker.replicas)
    versions, count = await etcd_versions(settings)
    versions |= repository_versions(settings.model_repository)
    queues = []
    async with await BrokerConnection.open(settings.broker, "inferq-namespace") as connection:
        for name in queue_names(topology, versions):
            counts = await connection.queue_counts(name)
            if counts is not None:
                queues.append((name, counts[0]))
    exchanges = exchange_names(topology, versions)
    listed = await listed_by_the_broker(settings)
    if listed is not None:  # what nothing names any more: a retired version's leftovers, a queue made by hand
        named = {name for name, _ in queues}
        queues += [q for q in listed[0] if q[0] not in named]
        exchanges += [e for e in listed[1] if e not in exchanges]
    return Footprint(settings.namespace, tuple(queues), tuple(exchanges), count)


async def listed_by_the_broker(settings: Settings) -> tuple[list[tuple[str, int]], list[str]] | None:
    """The namespace's queues and exchanges as the management API lists them; None where it cannot answer."""
    prefix = f"{settings.namespace}."
    try:
        async with await BrokerAdmin.open(settings.tenancy.management_url, broker_vhost(settings.broker.url),
                                          settings.etcd.timeout_s) as admin:
            return await admin.queues(prefix), await admin.exchanges(prefix)
    except (BrokerError, ConfigError) as exc:
        log.info("the broker's management API did not list namespace %s (%s): only the queues named "
                 "by etcd and the repository are removed", settings.namespace, exc)
        return None


async def remove_namespace(settings: Settings, footprint: Footprint | None = None) -> Footprint:
    """Delete the namespace's queues, streams, exchanges and etcd keys; return what was there.

    Queues are found as the module docstring says; deleting one that does not exist is harmless.
    """
    footprint = footprint or await survey(settings)
    async with await BrokerConnection.open(settings.broker, "inferq-cleanup") as connection:
        channel = await connection.channel()
        for name, _ in footprint.queues:
            await channel.queue_delete(name)
        for name in footprint.exchanges:
            await channel.exchange_delete(name)
    async with open_etcd(settings.etcd) as client:
        async with translated(f"deleting /{settings.namespace}/"):
            await asyncio.wait_for(client.delete_prefix(f"{keys(settings.namespace).root}/".encode()), settings.etcd.timeout_s)
    log.info("namespace %s removed: %d queues, %d etcd keys", settings.namespace, len(footprint.queues), footprint.etcd_keys)
    return footprint
