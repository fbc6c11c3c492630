"""The autoscaler actor: queue backlog + membership -> spawn or drain workers, per model version.

Every ``interval_s`` (0.5 s by default), and at once when a watch on the
membership or policy prefix fires, the elected leader reads, for each model version, the
queue's ready count and the in-flight count its workers report (so busy
workers are never mistaken for idle ones), the live workers from etcd and the
policy (model config, overridden by ``/<ns>/policies/<model>``). It asks the
:class:`~actors.policy.Recommender` for a worker count and acts through a
launcher; scale-down drains the idlest workers. Standbys wait for the
leader key (see :mod:`runtime.election`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from actors.launcher import AgentLauncher, Launcher, LocalLauncher, drain
from actors.policy import Decision, Recommender, ScalingPolicy
from broker.connection import BrokerConnection
from broker.topology import Topology
from runtime.actor import Actor
from runtime.catalog import read_models
from runtime.coordination import ETCD_ERRORS, get_json_prefix, keys, open_etcd, translated
from runtime.election import LeaderElection
from runtime.errors import ConfigError, CoordinationError, InferqError
from runtime.settings import Settings

log = logging.getLogger("inferq.autoscaler")

SPAWN_GRACE_S = 30.0


@dataclass
class _Expectation:
    """Workers asked for but not registered yet, so a slow start is not mistaken for a missing worker."""

    count: int
    deadline: float


class Autoscaler(Actor):
    """Scales shard workers; only the elected leader acts."""

    def __init__(self, settings: Settings, launcher: str = "local") -> None:
        self.identity = f"{settings.node}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        super().__init__(f"autoscaler:{self.identity}")
        self.settings = settings
        self.topology = Topology(settings.namespace)
        self.keys = keys(settings.namespace)
        self._launcher_kind = launcher
        self._recommenders: dict[tuple[str, str], Recommender] = {}
        self._expected: dict[tuple[str, str], _Expectation] = {}
        self._draining: dict[str, float] = {}
        self._connection: BrokerConnection | None = None
        self._etcd: Any = None
        self.election: LeaderElection | None = None
        self.launcher: Launcher | None = None
        self.decisions: dict[tuple[str, str], Decision] = {}
        self._changed = asyncio.Event()

    async def on_start(self) -> None:
        s = self.settings
        self._connection = await BrokerConnection.open(s.broker, self.name)
        await self.topology.declare_shared(self._connection.publisher, s.jobs.ttl_s)
        self._etcd = open_etcd(s.etcd)
        self.election = LeaderElection(self._etcd, self.keys.leader, self.identity, s.etcd.lease_ttl_s, s.etcd.timeout_s)
        if self._launcher_kind == "agent":
            self.launcher = AgentLauncher(s, self._connection, self._etcd)
        elif self._launcher_kind == "local":
            self.launcher = LocalLauncher(s, s.state_dir / "logs")
        else:
            raise ConfigError(f"unknown launcher {self._launcher_kind!r} (local or agent)")
        self.spawn(self._loop(), "loop")
        for prefix in (self.keys.workers, self.keys.policies):
            self.spawn(self._watch(prefix), f"watch:{prefix}")

    async def _loop(self) -> None:
        interval = self.settings.autoscaler.interval_s
        while True:
            if await self.election.campaign():
                try:
                    await self.tick()
                except InferqError as exc:
                    log.warning("tick skipped: %s", exc)
                await self._pause(interval)
            else:
                await asyncio.sleep(min(interval, self.settings.etcd.lease_ttl_s / 4))

    async def _pause(self, interval: float) -> None:
        """Until the next tick, or sooner when membership or a policy changes.

        Workers rewrite their records (stats) every second, so a change wakes the
        loop no more often than five times an interval.
        """
        await asyncio.sleep(interval / 5)
        try:
            async with asyncio.timeout(interval * 4 / 5):
                await self._changed.wait()
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
        models = await read_models(self._etcd, self.settings.namespace, timeout)
        overrides = await get_json_prefix(self._etcd, self.keys.policies, timeout)
        workers = list((await get_json_prefix(self._etcd, self.keys.workers, timeout)).values())
        only = {m.strip() for m in self.settings.autoscaler.models.split(",") if m.strip()}
        for name, record in models.items():
            if only and name not in only:
                continue
            for version in record["versions"]:
                policy = self._policy(record, overrides.get(name), version)
                members = [w for w in workers if w.get("model") == name and w.get("version") == version]
                await self._scale(record, version, policy, members)

    def _policy(self, record: dict[str, Any], override: Any, version: str) -> ScalingPolicy:
        base = self.settings.autoscaler.policy()
        try:
            policy = base.merged(record.get("scaling")).merged(override if isinstance(override, dict) else None)
        except ConfigError as exc:
            log.warning("model %s: bad scaling policy, using the defaults: %s", record["name"], exc)
            policy = base
        # Only the default version keeps a floor of workers; older versions drain to zero when idle.
        return policy if version == record["default_version"] else replace(policy, min_workers=0)

    async def _scale(self, record: dict[str, Any], version: str, policy: ScalingPolicy, members: list[dict[str, Any]]) -> None:
        model = record["name"]
        key = (model, version)
        counts = await self._connection.queue_counts(self.topology.model_queue(model, version))
        if counts is None:
            return
        live = [w for w in members if w.get("state") == "ready" and w["worker_id"] not in self._draining]
        backlog = counts[0] + sum(int(w.get("stats", {}).get("inflight", 0)) for w in members)
        current = self._current(key, len(live))
        now = time.monotonic()
        desired, reason = self._recommenders.setdefault(key, Recommender()).decide(policy, now, backlog, current)
        decision = Decision(model, version, backlog, current, desired, reason, consumers=counts[1])
        await self._record(key, decision)
        if desired > current:
            await self._spawn(key, record, desired - current, len(live))
        elif desired < current:
            await self._drain(live, current - desired)

    def _current(self, key: tuple[str, str], live: int) -> int:
        expected = self._expected.get(key)
        if expected is None or live >= expected.count or time.monotonic() > expected.deadline:
            self._expected.pop(key, None)
            return live
        return expected.count

    async def _spawn(self, key: tuple[str, str], record: dict[str, Any], count: int, live: int) -> None:
        if not await self.election.confirm():
            return
        started = 0
        for _ in range(count):
            try:
                await self.launcher.spawn(key[0], key[1], list(record.get("require_providers", [])))
                started += 1
            except InferqError as exc:
                log.warning("cannot start a worker for %s:%s: %s", key[0], key[1], exc)
                break
        if started:
            prior = self._expected.get(key)
            self._expected[key] = _Expectation((prior.count if prior else live) + started, time.monotonic() + SPAWN_GRACE_S)

    async def _drain(self, live: list[dict[str, Any]], count: int) -> None:
        if not await self.election.confirm():
            return
        # Idle workers first, then the least busy; the youngest among equals.
        ranked = sorted(live, key=lambda w: (int(w.get("stats", {}).get("inflight", 0)), -float(w.get("started_at", 0))))
        now = time.monotonic()
        self._draining = {k: t for k, t in self._draining.items() if now - t < SPAWN_GRACE_S}
        for worker in ranked[:count]:
            try:
                await drain(self._connection, self.topology, worker["worker_id"])
                self._draining[worker["worker_id"]] = now
                log.info("draining worker %s", worker["worker_id"])
            except InferqError as exc:
                log.warning("cannot drain %s: %s", worker["worker_id"], exc)

    async def _record(self, key: tuple[str, str], decision: Decision) -> None:
        previous = self.decisions.get(key)
        self.decisions[key] = decision
        if previous is not None and (previous.desired, previous.current, previous.reason) == (decision.desired, decision.current, decision.reason):
            return
        log.info("%s:%s backlog=%d workers=%d consumers=%d desired=%d (%s)", *key, decision.backlog, decision.current,
                 decision.consumers, decision.desired, decision.reason)
        doc = dict(decision.to_dict(), leader=self.identity, at=time.time())
        try:
            async with translated("recording a decision"):
                await asyncio.wait_for(self._etcd.put(f"{self.keys.decisions}{key[0]}.{key[1]}".encode(), json.dumps(doc).encode()), self.settings.etcd.timeout_s)
        except CoordinationError as exc:
            log.warning("%s", exc)

    async def on_close(self) -> None:
        if self.launcher is not None:
            await self.launcher.aclose()
        if self.election is not None:
            await self.election.aclose()
        if self._connection is not None:
            await self._connection.aclose()
        if self._etcd is not None:
            await self._etcd.close()
