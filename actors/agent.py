"""The edge-node agent: runs on a node (a server, a Jetson) and starts workers when told.

At start it proves its execution providers (a tiny model on each, output checked
against the CPU's: :mod:`inferq.runtime.proof`), reads the device's facts
(:mod:`inferq.runtime.device`), and registers ``/<ns>/nodes/<node>`` (lease-backed)
with both, its capacity and its cached models. It starts without the server side:
etcd is retried by its lease, the broker by a loop with backoff, and it never needs
a restart to reconnect (the gaps of k3s#1686 and k3s#10981). The node record then
shows ``disconnected_since`` and ``reconnected_at`` of the last outage.

It listens on the control exchange at ``agent.<node>`` for ``spawn`` commands (see
README, "Control commands"). Before a worker starts, its version's files are fetched
by SHA-256 from the edge into the node's model cache, verified (a bad download is
retried) and the cache trimmed to ``agent.cache_gb``; the worker loads from there.
Workers run under a :class:`~inferq.runtime.supervisor.Supervisor`: one that crashes
comes back with backoff, one that exits 0 (drained by the autoscaler) stays down, and
the node record reports the restarts and the last exit. SIGTERM drains the workers
before the agent exits; if the agent is killed they die with it (their lifeline).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from inferq.actors.launcher import worker_args, worker_env, worker_log_path, worker_suffix
from inferq.broker.connection import BrokerConnection
from inferq.broker.control import ControlListener, agent_key
from inferq.broker.topology import Topology
from inferq.errors import BrokerError, CodecError, CoordinationError, InferqError, NoCapacity, UnknownModel
from inferq.runtime.actor import Actor
from inferq.runtime.catalog import read_model
from inferq.runtime.coordination import keys, open_etcd
from inferq.runtime.device import DeviceFacts, read_facts
from inferq.runtime.election import Fence
from inferq.runtime.membership import MembershipLease
from inferq.runtime.metrics import advertised, gauge, open_endpoint
from inferq.runtime.modelcache import ModelCache
from inferq.runtime.proof import prove, proven
from inferq.runtime.records import NodeRecord, VersionRecord, load_json
from inferq.runtime.supervisor import ChildSpec, Supervisor
from inferq.runtime.variants import choose_variant, unfit
from inferq.runtime.versions import edge_base_url, file_map, local_file
from inferq.settings import Settings

log = logging.getLogger("inferq.agent")


@dataclass(frozen=True)
class DesiredWorkers:
    """The workers an agent runs, kept on disk so that a restarted agent (a reboot) starts them again."""

    versions: tuple[tuple[str, str], ...] = ()  # (model, version), one per worker

    def to_json(self) -> str:
        return json.dumps({"versions": [list(v) for v in self.versions]})

    @classmethod
    def from_json(cls, raw: str) -> DesiredWorkers:
        doc = load_json(raw, "desired workers")
        versions = doc.get("versions", [])
        if not isinstance(versions, list) or not all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)
                                                     for v in versions):
            raise CodecError("desired workers: versions must be [model, version] pairs")
        return cls(tuple((m, v) for m, v in versions))


class Agent(Actor):
    """One node's agent."""

    def __init__(self, settings: Settings, node: str, capacity: int) -> None:
        super().__init__(f"agent:{node}")
        self.settings = settings
        self.node = node
        self.capacity = capacity
        self.topology = Topology(settings.namespace, settings.broker.replicas)
        self.workers = Supervisor(self.name, ordered=False)  # all drain at once when the agent stops
        self.cache = ModelCache(settings.state_dir / "artifacts", int(settings.agent.cache_gb * 1024 ** 3),
                                settings.agent.fetch_attempts)
        self._env = worker_env(replace(settings, node=node))
        self._serial = itertools.count(1)
        self._uses: dict[str, str] = {}  # supervised worker name -> sha256 of the version it serves
        self._versions: dict[str, tuple[str, str]] = {}  # supervised worker name -> (model, version)
        self._desired = settings.state_dir / "agent" / f"{node}-workers.json"
        self._restored = False
        self._starting = 0
        self._fence = Fence()  # the highest leader token heard: an older leader's spawn is refused
        self._cached: tuple[str, ...] = ()
        self._etcd: Any = None
        self._connection: BrokerConnection | None = None
        self._control: ControlListener | None = None
        self._lease: MembershipLease | None = None
        self._record: NodeRecord | None = None
        self._outage = (0.0, 0.0)  # (disconnected_since, reconnected_at) of the last outage
        self.registry = CollectorRegistry()  # this process's own (never prometheus-client's global one)
        self.registry.register(NodeCollector(self))

    async def on_start(self) -> None:
        s = self.settings
        endpoint = await open_endpoint(self.registry, s.metrics)
        if endpoint is not None:
            self.on_stop(endpoint.aclose)
        proofs = await asyncio.to_thread(prove, s.agent.providers, s.state_dir / "trt")
        facts = await asyncio.to_thread(read_facts, s.agent.sysroot)
        self._cached = tuple(await asyncio.to_thread(self.cache.cached))
        self._record = NodeRecord(self.node, proven(proofs), self.capacity, 0, os.getpid(), time.time(), facts=facts,
                                  cached=self._cached, metrics=advertised(endpoint, s.metrics))
        self._etcd = etcd = open_etcd(s.etcd)  # lazy: nothing is dialled here
        self.on_stop(etcd.close)
        self.spawn(self._connect(), "connect")
        self.spawn(self._report(), "report")

    async def _connect(self) -> None:
        """Reach the broker, however long it takes, then register; from then on both reconnect by themselves.

        The node record appears once the agent listens for commands, so a placement never picks a deaf agent.
        """
        delay, s = 0.5, self.settings
        while True:
            try:
                connection = await BrokerConnection.open(s.broker, self.name)
            except BrokerError as exc:
                self._mark_lost()
                log.warning("broker unreachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, s.agent.connect_max_s)
                continue
            try:
                await self.topology.declare_shared(connection.publisher, s.jobs)
                self._control = await ControlListener.open(connection, self.topology.control, [agent_key(self.node)],
                                                           self._on_command)
            except BrokerError as exc:  # lost again between the connect and the declares, or refused: start over
                log.warning("could not subscribe to commands (%s); retrying in %.1fs", exc, delay)
                await connection.aclose()
                await asyncio.sleep(delay)
                delay = min(delay * 2, s.agent.connect_max_s)
                continue
            break
        self._connection = connection
        self.on_stop(connection.aclose)
        self.on_stop(self._control.aclose)
        log.info("agent %s connected to the broker", self.node)
        # Registers now if etcd answers, else keeps trying in the background while the agent runs.
        self._lease = await self.own(MembershipLease.open(self._etcd, keys(s.namespace).node(self.node),
                                                          self._record, s.etcd.lease_ttl_s, s.etcd.timeout_s))
        await self._restore()

    async def _restore(self) -> None:
        """Start again the workers this node ran before the agent last stopped without draining (killed, reboot)."""
        try:
            desired = DesiredWorkers.from_json(await asyncio.to_thread(self._desired.read_text))
        except FileNotFoundError:
            desired = DesiredWorkers()
        except (OSError, CodecError) as exc:
            log.warning("ignoring %s: %s", self._desired, exc)
            desired = DesiredWorkers()
        self._restored = True  # from now on the file follows the running workers
        for model, version in desired.versions[: max(0, self.capacity - self.workers.running - self._starting)]:
            log.info("starting %s:%s again, as before the agent's restart", model, version)
            self._starting += 1
            self.spawn(self._start_worker(model, version), f"restore {model}:{version}")

    async def _remember(self) -> None:
        """Write down the workers running now (not while stopping: a drain is no change of what the node should run)."""
        if self.state != "running" or not self._restored:
            return
        running = self.workers.pids()
        desired = DesiredWorkers(tuple(v for name, v in sorted(self._versions.items()) if name in running))
        await asyncio.to_thread(_write_atomically, self._desired, desired.to_json())

    async def on_close(self) -> None:
        """Drain the workers first, while the agent's connection and lease are still there (closed after this)."""
        await self.workers.aclose()

    def _connected(self) -> bool:
        broker = self._connection is not None and self._connection.connected
        return broker and self._lease is not None and self._lease.state == "registered"

    def _mark_lost(self) -> None:
        if self._outage[0] <= self._outage[1]:  # no outage under way: this one begins now
            self._outage = (time.time(), self._outage[1])

    def _state(self) -> tuple[Any, ...]:
        return self.workers.running, self.workers.restarts, self.workers.last_exit, self._cached, self._outage

    async def _report(self) -> None:
        reported: tuple[Any, ...] = ()
        while True:
            if self._connected():
                if self._outage[0] > self._outage[1]:
                    self._outage = (self._outage[0], time.time())
                    log.info("agent %s reconnected (disconnected since %.0f)", self.node, self._outage[0])
            elif self._lease is not None:  # before the first connect, only a failed try counts as an outage
                self._mark_lost()
            if self._state() != reported:
                reported = await self._publish_state()
                await self._remember()
            await asyncio.sleep(0.5)

    async def _publish_state(self) -> tuple[Any, ...]:
        state = running, restarts, last_exit, cached, (since, back) = self._state()
        if self._lease is None:  # not connected yet: the lease will carry the latest record when it opens
            self._record = dataclasses.replace(self._record, workers=running, restarts=restarts, last_exit=last_exit,
                                               cached=cached, disconnected_since=since, reconnected_at=back)
            return ()
        record = dataclasses.replace(self._lease.record, workers=running, restarts=restarts, last_exit=last_exit,
                                     cached=cached, disconnected_since=since, reconnected_at=back)
        try:
            await self._lease.update(record)  # kept for the next registration when etcd is away
        except CoordinationError as exc:
            log.warning("could not update the node record: %s", exc)
        return state

    async def _on_command(self, command: dict[str, Any]) -> None:
        if command["command"] != "spawn":
            log.warning("unknown agent command %r", command["command"])
            return
        if not self._fence.admit(command.get("fence")):
            log.warning("refusing spawn command %r: it comes from an older leader than one already heard (token %d)",
                        command, self._fence.highest)
            return
        model, version = command.get("model"), command.get("version")
        if not isinstance(model, str) or not isinstance(version, str) or self.workers.running + self._starting >= self.capacity:
            log.warning("refusing spawn command %r (capacity %d, running %d)", command, self.capacity, self.workers.running)
            return
        self._starting += 1  # counted now: the fetch may take long, and more commands may come meanwhile
        self.spawn(self._start_worker(model, version), f"start {model}:{version}")

    async def _start_worker(self, model: str, version: str) -> None:
        """Fetch the version into the cache, then start and supervise its worker; a failure is logged, not fatal."""
        try:
            sha256, variant = await self._fetch(model, version)
            suffix = worker_suffix()  # a restart keeps it (and the log file); the new pid still makes a new id
            shown = f"{model}:{version}" + (f" ({variant})" if variant else "")
            spec = ChildSpec(f"worker {shown} #{next(self._serial)}", tuple(worker_args(model, version, suffix, variant)),
                             self._env, worker_log_path(self.settings.state_dir / "logs", model, version, suffix),
                             permanent=False)
            await self.workers.add(spec)
            self._uses[spec.name] = sha256
            self._versions[spec.name] = (model, version)
            await self._trim_cache()
        except (InferqError, OSError) as exc:
            log.error("spawn of %s:%s failed: %s", model, version, exc)
        finally:
            self._starting -= 1
        await self._publish_state()

    async def _fetch(self, model: str, version: str) -> tuple[str, str]:
        """The files this node runs of a version, in the model cache (verified): (their SHA-256, the variant or "").

        The variant is the one whose device selector fits this node best (none: the default
        ``model.onnx``); a model whose ``require`` this node does not meet is refused.
        A repository-only model gives ("", "").
        """
        s = self.settings
        record, _ = await read_model(self._etcd, s.namespace, model, s.etcd.timeout_s)
        if record is None:
            return "", ""  # not in the registry: the worker serves it from the node's model repository, as before
        found: VersionRecord | None = record.versions.get(version)
        if found is None:
            raise UnknownModel(f"model {model!r} has no version {version!r} in the registry")
        me = self._lease.record if self._lease is not None else self._record
        why = unfit(me, record.require, record.require_providers)
        if why:
            raise NoCapacity(f"node {self.node} cannot run {model}: it {why}")
        chosen = choose_variant(found.variants, me)
        variant, sha256 = (chosen.name, chosen.sha256) if chosen is not None else ("", found.sha256)
        if not sha256:
            return "", variant
        if await asyncio.to_thread(local_file, s.model_repository, model, version, found, variant) is not None:
            return sha256, variant  # the node's repository has these very bytes: the worker loads them from there
        headers = {"Authorization": f"Bearer {s.registry.api_key}"} if s.registry.api_key else {}
        directory = await self.cache.ensure(edge_base_url(s), model, version, file_map(found, variant), headers,
                                            s.registry.fetch_timeout_s, variant)
        log.info("%s:%s%s is in the model cache at %s", model, version, f" (variant {variant})" if variant else "", directory)
        return sha256, variant

    async def _trim_cache(self) -> None:
        running = set(self.workers.pids())
        self._uses = {name: sha for name, sha in self._uses.items() if name in running}
        await asyncio.to_thread(self.cache.evict, set(self._uses.values()))
        self._cached = tuple(sorted(await asyncio.to_thread(self.cache.cached)))

    async def on_drain(self) -> None:
        """Take no more spawn commands: one arriving while the workers drain would outlive the agent."""
        if self._control is not None:
            await self._control.aclose()


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.new")
    temp.write_text(text)
    os.replace(temp, path)


class NodeCollector:
    """The node's gauges, from the record the agent keeps: capacity, workers, restarts, providers, device facts."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def collect(self) -> Any:
        a = self._agent
        node = {"node": a.node}
        record = a._lease.record if a._lease is not None else a._record
        providers = record.providers if record is not None else ()
        yield gauge("inferq_node_capacity", "most workers this node's agent runs at once", [(node, a.capacity)])
        yield gauge("inferq_node_workers", "workers the agent runs now", [(node, a.workers.running)])
        yield gauge("inferq_node_worker_restarts", "worker restarts after a crash", [(node, a.workers.restarts)], "counter")
        yield gauge("inferq_node_provider", "onnxruntime execution providers this node offers (value 1)",
                    [({**node, "provider": p}, 1) for p in providers])
        yield from _fact_gauges(node, record.facts if record is not None else None)


def _fact_gauges(node: dict[str, str], facts: DeviceFacts | None) -> Any:
    # Absent rather than 0 when a fact is unknown: a 0 would read as a node with no memory.
    yield gauge("inferq_node_device", "what the node is (value 1): kind, model, SoC, CUDA arch and L4T release",
                [({**node, "kind": facts.kind, "model": facts.model, "soc": facts.soc, "cuda_arch": facts.cuda_arch,
                   "l4t": facts.l4t}, 1)] if facts is not None else [], "info")
    yield gauge("inferq_node_memory_bytes", "the node's memory, shared with the GPU on a Jetson",
                [(node, facts.memory_bytes)] if facts is not None and facts.memory_bytes else [])
    yield gauge("inferq_node_power_mode", "the Jetson power mode nvpmodel reports (value 1)",
                [({**node, "mode": facts.power_mode}, 1)] if facts is not None and facts.power_mode else [])
