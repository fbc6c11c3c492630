"""The autoscaler actor: queue backlog + membership -> spawn or drain workers, per model version.

Every ``interval_s`` (0.5 s by default), and at once when a watch on the
membership or policy prefix fires, the elected leader reads, for each model version, the
queue's ready count and the in-flight count its workers report (so busy
workers are never mistaken for idle ones), the live workers from etcd and the
policy (model config, overridden by ``/<ns>/policies/<model>``). It asks the
:class:`~actors.policy.Recommender` for a worker count and acts through a
launcher; scale-down drains the idlest workers. Standbys wait for the
leader key (see :mod:`runtime.election`). The ``kubernetes`` launcher is
declarative instead: the decided count becomes the replicas of the model's
Deployment (see :mod:`actors.kube`); ``none`` only records decisions (KEDA
reads them from the edge). While etcd does not answer, nothing is done and
the pause is logged once, with its reason.

Each version keeps a floor of workers from the registry (:func:`~inferq.runtime.routing.worker_floors`):
stable's version the policy's ``min_workers``, a version that must open a traffic
gate at least one, any other none. After scaling, the leader does the registry's
duties (:mod:`inferq.actors.keeper`): bindings, holds, removals, auto-rollback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from inferq.actors.kube import KubernetesLauncher, deployment_name, open_in_cluster
from inferq.actors.keeper import RegistryKeeper
from inferq.actors.launcher import AgentLauncher, Launcher, LocalLauncher, drain
from inferq.actors.launches import LaunchBook, counted
from inferq.actors.policy import Recommender
from inferq.broker.connection import BrokerConnection
from inferq.broker.topology import Topology
from inferq.errors import ConfigError, CoordinationError, InferqError
from inferq.runtime.actor import Actor
from inferq.runtime.catalog import read_models
from inferq.runtime.coordination import ETCD_ERRORS, get_json_prefix, get_records, keys, open_etcd, translated
from inferq.runtime.election import LeaderElection
from inferq.runtime.metrics import gauge, open_endpoint
from inferq.runtime.records import Decision, ModelRecord, WorkerRecord
from inferq.runtime.routing import worker_floors
from inferq.settings import ScalingPolicy, Settings

log = logging.getLogger("inferq.autoscaler")

LAUNCHERS = ("local", "agent", "kubernetes", "none")
RECORD_REFRESH_S = 15.0  # an unchanged decision is written again this often: a stale `at` means nobody decides


class Autoscaler(Actor):
    """Scales shard workers; only the elected leader acts."""

    def __init__(self, settings: Settings, launcher: str = "local") -> None:
        self.identity = f"{settings.node}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        super().__init__(f"autoscaler:{self.identity}")
        self.settings = settings
        self.topology = Topology(settings.namespace, settings.broker.replicas)
        self.keys = keys(settings.namespace)
        self._launcher_kind = launcher
        self._recommenders: dict[tuple[str, str], Recommender] = {}
        self._policies: dict[str, ScalingPolicy] = {}  # last good policy per model: a bad override keeps it
        self._bad_overrides: dict[str, Any] = {}
        self.launches = LaunchBook()
        self._draining: dict[str, float] = {}
        self._connection: BrokerConnection | None = None
        self._etcd: Any = None
        self.election: LeaderElection | None = None
        self.launcher: Launcher | KubernetesLauncher | None = None  # None: the "none" launcher
        self.decisions: dict[tuple[str, str], Decision] = {}
        self._written: dict[tuple[str, str], float] = {}  # when each decision was last written to etcd
        self.failed_rounds = 0
        self.paused_since: float | None = None  # while etcd does not answer: scaling stops (see _paused)
        self.paused_reason = ""
        self._leading = False
        self._changed = asyncio.Event()
        self.keeper: RegistryKeeper | None = None
        self.registry = CollectorRegistry()  # this process's own (never prometheus-client's global one)
        self.registry.register(AutoscalerCollector(self))

    async def on_start(self) -> None:
        s = self.settings
        if self._launcher_kind not in LAUNCHERS:
            raise ConfigError(f"unknown launcher {self._launcher_kind!r} ({', '.join(LAUNCHERS)})")
        endpoint = await open_endpoint(self.registry, s.metrics)
        if endpoint is not None:
            self.on_stop(endpoint.aclose)
        self._connection = await self.own(BrokerConnection.open(s.broker, self.name))
        await self.topology.declare_shared(self._connection.publisher, s.jobs)
        self._etcd = open_etcd(s.etcd)
        self.on_stop(self._etcd.close)
        self.election = LeaderElection(self._etcd, self.keys.leader, self.identity, s.etcd.lease_ttl_s, s.etcd.timeout_s)
        self.on_stop(self.election.aclose)
        if self._launcher_kind == "agent":
            self.launcher = AgentLauncher(s, self._connection, self._etcd, lambda: self.election.token)
        elif self._launcher_kind == "kubernetes":
            deployment_name(s.autoscaler.kube_deployment, "m", "1")  # a bad template fails the start, not each tick
            self.launcher = await open_in_cluster(s.autoscaler.kube_deployment, Path(s.autoscaler.kube_service_account),
                                                  s.etcd.timeout_s * 2)
        elif self._launcher_kind == "local":
            self.launcher = LocalLauncher(s, s.state_dir / "logs")
        if self.launcher is not None:
            self.on_stop(self.launcher.aclose)
        self.keeper = await self.own(RegistryKeeper.open(s, self._connection, self._etcd, self.election, self.identity))
        self.spawn(self._loop(), "loop")
        for prefix in (self.keys.workers, self.keys.policies, self.keys.models, self.keys.removals):
            self.spawn(self._watch(prefix), f"watch:{prefix}")

    async def _loop(self) -> None:
        interval = self.settings.autoscaler.interval_s
        while True:
            if await self.election.campaign():
                self._resumed()
                if not self._leading and isinstance(self.launcher, KubernetesLauncher):
                    self.launcher.forget()  # a new term: send every replica count again
                self._leading = True
                await self._guarded_tick()
                await self._pause(interval)
            else:
                self._leading = False
                self._paused(self.election.last_error)
                await asyncio.sleep(min(interval, self.settings.etcd.lease_ttl_s / 4))

    def _paused(self, error: str | None) -> None:
        """Say once, clearly, that scaling stops while etcd does not answer (a standby's wait is no pause)."""
        if error is None:
            if self.paused_since is not None and self.election.token is None:
                self._resumed()  # etcd answers again, and another candidate leads now
            return
        if self.paused_since is None:
            self.paused_since = time.monotonic()
            self.paused_reason = f"etcd does not answer ({error}); it may have lost its quorum"
            log.warning("scaling paused: %s. No worker is started or drained until it answers; workers keep serving",
                        self.paused_reason)

    def _resumed(self) -> None:
        if self.paused_since is not None:
            log.warning("scaling resumed: etcd answers again after %.1fs", time.monotonic() - self.paused_since)
            self.paused_since, self.paused_reason = None, ""
            self.decisions.clear()  # every decision is written afresh: those in etcd date from before the pause

    async def _guarded_tick(self) -> None:
        """One round; whatever goes wrong in it is logged and counted, and the next round comes."""
        try:
            await self.tick()
        except InferqError as exc:
            log.warning("round skipped: %s", exc)
        except Exception:  # the autoscaler must never die of its inputs: the stack depends on it
            self.failed_rounds += 1
            log.exception("round %d failed unexpectedly; going on", self.failed_rounds)

    async def _pause(self, interval: float) -> None:
        """Until the next tick, or sooner when membership or a policy changes.

        Workers rewrite their records (stats) every second, so a change wakes the
        loop no more often than five times an interval.
        """
        await asyncio.sleep(interval / 5)
        try:
            await asyncio.wait_for(self._changed.wait(), interval * 4 / 5)
        except TimeoutError:
            pass
        self._changed.clear()

    async def _watch(self, prefix: str) -> None:
        """Wake the loop on every change under ``prefix``.

        Each tick reads the state afresh, so a broken or compacted watch loses
        nothing: it is opened again and the next tick resyncs.
        """
        while True:
            try:
                watch = await asyncio.wait_for(self._etcd.watch_prefix(prefix.encode()), self.settings.etcd.timeout_s)
                async for _ in watch:
                    self._changed.set()
            except ETCD_ERRORS as exc:
                log.debug("watch on %s ended (%r); opening it again", prefix, exc)
            self._changed.set()
            await asyncio.sleep(1.0)

    async def tick(self) -> None:
        """One round of decisions over every model version."""
        timeout = self.settings.etcd.timeout_s
        # A pipeline has no workers of its own: each of its stages is a model scaled on its own backlog.
        models = {n: r for n, r in (await read_models(self._etcd, self.settings.namespace, timeout)).items() if not r.pipeline}
        overrides = await get_json_prefix(self._etcd, self.keys.policies, timeout)
        workers = list((await get_records(self._etcd, self.keys.workers, WorkerRecord.from_json, timeout)).values())
        self._note_exits()
        only = {m.strip() for m in self.settings.autoscaler.models.split(",") if m.strip()}
        for name, record in models.items():
            if only and name not in only:
                continue
            policy = self._policy(record, overrides.get(name))
            floors = worker_floors(record, policy.min_workers)
            for version in record.versions:
                # Stable keeps the policy's floor, a version that must warm up for traffic one, the rest drain when idle.
                pinned = replace(policy, min_workers=min(floors[version], policy.max_workers))
                members = [w for w in workers if w.model == name and w.version == version]
                await self._scale(record, version, pinned, members)
        await self.keeper.tick(models, workers, only)

    def _note_exits(self) -> None:
        for gone in self.launcher.reap() if self.launcher is not None else ():
            if gone.returncode != 0:
                reason = f"worker exited with status {gone.returncode}: {gone.last_line or 'no output'}"
                log.warning("%s:%s %s", gone.model, gone.version, reason)
                self.launches.failed((gone.model, gone.version), reason, time.monotonic())

    def _policy(self, record: ModelRecord, override: Any) -> ScalingPolicy:
        """Defaults, then the model's ``[scaling]``, then the etcd override; a bad layer keeps what came before."""
        base = self.settings.autoscaler.policy()
        try:
            base = base.merged(record.scaling)
        except ConfigError as exc:
            log.warning("model %s: bad [scaling] in its config, using the defaults: %s", record.name, exc)
        try:
            policy = base.merged(override)
        except ConfigError as exc:
            policy = self._policies.get(record.name, base)
            if self._bad_overrides.get(record.name) != override:  # once per bad value, not every tick
                log.warning("model %s: ignoring the policy override %r (%s); keeping %s", record.name, override, exc, policy)
            self._bad_overrides[record.name] = override
            return policy
        self._bad_overrides.pop(record.name, None)
        if self._policies.get(record.name, policy) != policy:
            self.launches.forget(record.name)  # an operator acted on the model: a version given up on may start now
        self._policies[record.name] = policy
        return policy

    async def _scale(self, record: ModelRecord, version: str, policy: ScalingPolicy, members: list[WorkerRecord]) -> None:
        key = (record.name, version)
        counts = await self._backlog_counts(record.name, version)
        if counts is None:
            return
        now = time.monotonic()
        live, present = counted(members, self._draining)  # warming workers are coming: counted, never drained
        backlog = counts[0] + sum(w.stats.inflight for w in members)
        current = self.launches.current(key, present, now)
        desired, reason = self._recommenders.setdefault(key, Recommender()).decide(policy, now, backlog, current)
        held = self.launches.held(key, now) if desired > current else None
        decision = Decision(record.name, version, backlog, current, desired, held or reason, consumers=counts[1])
        await self._record(key, decision)
        if self.launcher is None:
            return  # decisions only: KEDA (or an operator) acts on them
        if isinstance(self.launcher, KubernetesLauncher):
            await self._set_replicas(record, version, desired)
        elif desired > current and held is None:
            await self._spawn(key, record, desired - current, present)
        elif desired < current:
            await self._drain(live, current - desired)

    async def _backlog_counts(self, model: str, version: str) -> tuple[int, int] | None:
        """(ready jobs in both priority queues, consumers of the normal one); None if unknown."""
        normal = await self._connection.queue_counts(self.topology.model_queue(model, version))
        high = await self._connection.queue_counts(self.topology.high_queue(model, version))
        if normal is None:
            return None
        return normal[0] + (high[0] if high else 0), normal[1]

    async def _set_replicas(self, record: ModelRecord, version: str, desired: int) -> None:
        """The kubernetes launcher: the Deployment gets ``desired`` replicas; Kubernetes starts and stops the pods."""
        if "{version}" not in self.launcher.template and version != record.default_version:
            return  # one Deployment per model: it runs the default version only
        if not await self.election.confirm():
            return
        try:
            await self.launcher.scale_to(record.name, version, desired)
        except InferqError as exc:
            log.warning("cannot scale %s:%s to %d: %s", record.name, version, desired, exc)
            self.launches.failed((record.name, version), str(exc), time.monotonic())

    async def _spawn(self, key: tuple[str, str], record: ModelRecord, count: int, present: int) -> None:
        started = 0
        for _ in range(count):
            if not await self.election.confirm():  # fencing: checked right before each act
                break
            try:
                await self.launcher.spawn(key[0], key[1], list(record.require_providers), dict(record.require))
                started += 1
            except InferqError as exc:
                log.warning("cannot start a worker for %s:%s: %s", key[0], key[1], exc)
                self.launches.failed(key, str(exc), time.monotonic())
                break
        if started:
            self.launches.launched(key, present, started, time.monotonic())

    async def _drain(self, live: list[WorkerRecord], count: int) -> None:
        # Idle workers first, then the least busy; the youngest among equals.
        ranked = sorted(live, key=lambda w: (w.stats.inflight, -w.started_at))
        now = time.monotonic()
        self._draining = {k: t for k, t in self._draining.items() if now - t < self.launches.grace_s}
        for worker in ranked[:count]:
            if not await self.election.confirm():
                return
            try:
                await drain(self._connection, self.topology, worker.worker_id)
                self._draining[worker.worker_id] = now
                log.info("draining worker %s", worker.worker_id)
            except InferqError as exc:
                log.warning("cannot drain %s: %s", worker.worker_id, exc)

    async def _record(self, key: tuple[str, str], decision: Decision) -> None:
        """Write a changed decision to etcd, and an unchanged one every RECORD_REFRESH_S (its ``at`` shows it is live)."""
        previous = self.decisions.get(key)
        self.decisions[key] = decision
        same = previous is not None and (previous.desired, previous.current, previous.reason) == (
            decision.desired, decision.current, decision.reason)
        if same and time.time() - self._written.get(key, 0.0) < RECORD_REFRESH_S:
            return
        if not same:
            log.info("%s:%s backlog=%d workers=%d consumers=%d desired=%d (%s)", *key, decision.backlog, decision.current,
                     decision.consumers, decision.desired, decision.reason)
        doc = replace(decision, leader=self.identity, at=time.time())
        try:
            async with translated("recording a decision"):
                await asyncio.wait_for(self._etcd.put(f"{self.keys.decisions}{key[0]}.{key[1]}".encode(), doc.to_json().encode()),
                                       self.settings.etcd.timeout_s)
            self._written[key] = doc.at
        except CoordinationError as exc:
            log.warning("%s", exc)


class AutoscalerCollector:
    """The autoscaler's gauges, from the decisions it keeps (explainability: inputs, reason, cooldown)."""

    def __init__(self, scaler: Autoscaler) -> None:
        self._scaler = scaler

    def collect(self) -> Any:
        a = self._scaler
        rows = sorted(a.decisions.items())
        labels = [{"model": m, "version": v} for (m, v), _ in rows]
        yield gauge("inferq_autoscaler_leader", "1 while this autoscaler is the elected leader (only it acts)",
                    [({"autoscaler": a.identity}, int(a._leading))])
        yield gauge("inferq_autoscaler_paused", "1 while scaling is paused (etcd does not answer)", [({}, int(a.paused_since is not None))])
        yield gauge("inferq_autoscaler_failed_rounds", "rounds that failed on an unexpected error (logged; the next round came)",
                    [({}, a.failed_rounds)], "counter")
        yield gauge("inferq_autoscaler_desired_workers", "workers the last decision asked for", [(lab, d.desired) for lab, (_, d) in zip(labels, rows)])
        yield gauge("inferq_autoscaler_current_workers", "workers the last decision counted", [(lab, d.current) for lab, (_, d) in zip(labels, rows)])
        yield gauge("inferq_autoscaler_backlog", "backlog (queued plus in flight) of the last decision", [(lab, d.backlog) for lab, (_, d) in zip(labels, rows)])
        yield gauge("inferq_autoscaler_cooldown_remaining_seconds", "seconds a held decision waits for its stabilization window",
                    [(lab, round(a._recommenders[k].cooldown_s, 3)) for lab, (k, _) in zip(labels, rows) if k in a._recommenders])
        yield gauge("inferq_autoscaler_decision", "the reason of the last decision (value 1)",
                    [({**lab, "reason": d.reason}, 1) for lab, (_, d) in zip(labels, rows)], "info")
