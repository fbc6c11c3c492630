"""The registry duties of the acting autoscaler, done each round after scaling, every act fenced.

* **Bindings.** ``<model>`` is bound to the default version's queue, or to the
  router queue while the model has a split or a shadow (see broker/topology.py);
  rebound when that changes (bound first, unbound after).
* **Holds.** An alias moved to a version that was not ready kept its traffic on
  the version it left; once a worker of the new version is ready and warmed up,
  the hold ends (recorded as ``release`` in the history).
* **Removals.** A removed version's workers are told to drain; once none is left,
  its queued jobs fail with ``version_removed`` and its queues are deleted
  (:mod:`inferq.runtime.removal`), then the removal is marked done in the history.
* **Auto-rollback.** An alias with a rule and traffic whose version fails or slows
  down beyond the rule against stable's (:mod:`inferq.actors.rollback`) gets its
  share moved back to stable; the decision and its inputs go to the history.

Why here: the autoscaler is leader-elected, so exactly one process decides, and its
fencing token is checked right before each act, as for spawning and draining.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from inferq.actors.launcher import drain
from inferq.actors.rollback import RollbackWatch, armed, decide
from inferq.broker.connection import BrokerConnection, close_channel
from inferq.broker.ledger import LedgerWriter
from inferq.broker.topology import Topology
from inferq.errors import InferqError
from inferq.runtime.election import LeaderElection
from inferq.runtime.loader import queue_limits, unpinned_target
from inferq.runtime.records import ModelRecord, RemovalRecord, WorkerRecord, WorkerState
from inferq.runtime.plans import plan_auto_rollback, plan_release
from inferq.runtime.registry import Registry
from inferq.runtime.removal import retire
from inferq.settings import Settings

log = logging.getLogger("inferq.keeper")

CONSUMER_GRACE_S = 60.0  # a removed version's queue with consumers but no worker records: wait this long, then go on
REBIND_S = 30.0  # an unchanged binding is applied again this often (someone else, e.g. a sync, may have moved it)


class RegistryKeeper:
    """Build with :meth:`open`; :meth:`tick` once per leader round; :meth:`aclose` stops its ledger use."""

    def __init__(self, settings: Settings, connection: BrokerConnection, etcd: Any, election: LeaderElection,
                 identity: str, ledger: LedgerWriter) -> None:
        self.topology = Topology(settings.namespace, settings.broker.replicas)
        self.registry = Registry(etcd, settings.namespace, settings.etcd.timeout_s)
        self._connection = connection
        self._election = election
        self._who = f"autoscaler {identity}"
        self._ledger = ledger
        self.rollbacks = RollbackWatch(connection, self.topology.ledger)
        self._bound: dict[str, tuple[str, float]] = {}  # model -> (where <model> was bound, when)
        self._waiting: dict[str, float] = {}

    @classmethod
    async def open(cls, settings: Settings, connection: BrokerConnection, etcd: Any, election: LeaderElection,
                   identity: str) -> RegistryKeeper:
        ledger = await LedgerWriter.open(connection, Topology(settings.namespace, settings.broker.replicas).ledger)
        return cls(settings, connection, etcd, election, identity, ledger)

    async def tick(self, models: dict[str, ModelRecord], workers: list[WorkerRecord], only: set[str]) -> None:
        """One round of registry duties over the models this autoscaler looks after (``only``; empty: all)."""
        mine = {name: r for name, r in models.items() if not only or name in only}
        ready = {(w.model, w.version) for w in workers if w.healthy}
        for step in (self._bind(mine, ready), self._release(mine, ready), self._retire(workers, only), self._auto_rollback(mine)):
            try:
                await step
            except InferqError as exc:
                log.warning("registry duty skipped this round: %s", exc)

    async def _bind(self, models: dict[str, ModelRecord], ready: set[tuple[str, str]]) -> None:
        now = time.monotonic()
        self._bound = {m: bound for m, bound in self._bound.items() if m in models}
        for name, record in models.items():
            target = unpinned_target(record, {v for m, v in ready if m == name})
            previous, at = self._bound.get(name, ("", 0.0))
            if target is None or (previous == target and now - at < REBIND_S) or not await self._election.confirm():
                continue
            channel = await self._connection.channel()
            try:
                await self.topology.declare_model(channel, name, list(record.versions), queue_limits(record), target)
            finally:
                await close_channel(channel, "binding")
            if previous != target:
                log.info("model %s: unpinned jobs now go to %s", name, "the router" if record.routed else f"version {target}")
            self._bound[name] = (target, now)

    async def _release(self, models: dict[str, ModelRecord], healthy: set[tuple[str, str]]) -> None:
        for name, record in models.items():
            for alias_name, alias in record.aliases.items():
                if alias.held_at and (name, alias.version) in healthy and await self._election.confirm():
                    await self.registry.change(name, plan_release(name, alias_name, alias.version, self._who))

    async def _retire(self, workers: list[WorkerRecord], only: set[str]) -> None:
        for key, removal in (await self.registry.removals()).items():
            if only and removal.model not in only:
                continue
            members = [w for w in workers if w.model == removal.model and (not removal.version or w.version == removal.version)]
            for worker in members:
                if worker.state is not WorkerState.DRAINING and await self._election.confirm():
                    await drain(self._connection, self.topology, worker.worker_id)
                    log.info("draining %s: its version was removed", worker.worker_id)
            if members or not await self._quiet(key, removal) or not await self._election.confirm():
                continue
            failed = await retire(self._connection, self.topology, self._ledger, removal)
            await self.registry.retired(removal, failed, self._who)
            self._waiting.pop(key, None)

    async def _quiet(self, key: str, removal: RemovalRecord) -> bool:
        """No consumer on the version's queue any more (or none left for long: a consumer without a worker record)."""
        if not removal.version:
            return True
        counts = await self._connection.queue_counts(self.topology.model_queue(removal.model, removal.version))
        if counts is None or counts[1] == 0:
            return True
        since = self._waiting.setdefault(key, time.monotonic())
        return time.monotonic() - since > CONSUMER_GRACE_S

    async def _auto_rollback(self, models: dict[str, ModelRecord]) -> None:
        await self.rollbacks.follow(any(armed(r) for r in models.values()))
        for decision in decide(self.rollbacks.window, models, time.time()):
            if not await self._election.confirm():
                return
            plan = plan_auto_rollback(decision.model, decision.alias, decision.version, decision.why, decision.inputs, self._who)
            change = await self.registry.change(decision.model, plan)
            if not change.noop:
                log.warning("model %s: %s's traffic moved back to stable: %s", decision.model, decision.alias, decision.why)

    async def aclose(self) -> None:
        await self.rollbacks.aclose()
        await self._ledger.aclose()
