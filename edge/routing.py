"""Routing at the edge: the registry's rules (:mod:`inferq.runtime.routing`) over this edge's view.

The view is the cached model records (refreshed on every etcd change) and the
workers' health (refreshed each second). Two edges with the same view send the
same route key to the same version, for HTTP jobs and for the AMQP router alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from inferq.edge.health import VersionHealth
from inferq.edge.models import ModelDirectory
from inferq.runtime.records import ModelRecord
from inferq.runtime.repository import ModelVersion
from inferq.runtime.routing import Route, choose, mirror


@dataclass(frozen=True)
class Routed:
    """A job's route, the signature it must fit, and the shadow version it is mirrored to (if any)."""

    route: Route
    signature: ModelVersion
    shadow: str | None = None


class Routing:
    """Chooses a version for each job."""

    def __init__(self, directory: ModelDirectory, health: VersionHealth) -> None:
        self.directory = directory
        self.health = health

    def choose(self, record: ModelRecord, version: str | None, alias: str | None, key: str) -> Routed:
        """Route one job of ``record``: pinned by version or alias, else by the split; unpinned jobs may be mirrored."""
        route = choose(record, self.health.ready(record.name), key, version, alias)
        pinned = version is not None or alias is not None
        return Routed(route, record.signature(route.version), None if pinned else mirror(record, key, route))

    async def route(self, model: str, version: str | None, alias: str | None, key: str) -> Routed:
        """As :meth:`choose`, looking the model up first (UnknownModel if there is none)."""
        return self.choose(await self.directory.record(model, version, alias), version, alias, key)
