"""The cluster suite's tools: inferq processes on a local cluster, steady load, and the ledger's count of final states.

A :class:`ClusterStack` runs real ``inferq edge``/``worker``/``autoscaler``
processes against one :class:`~inferq.runtime.cluster.LocalCluster`, each with
its own order of broker URLs and etcd endpoints (so a test decides which node a
process talks to first). :class:`SteadyLoad` submits jobs at a fixed rate and
records every answer. :func:`read_ledger` reads ``<ns>.jobs`` from its first
offset with a plain aio-pika consumer; :func:`account` checks that every
accepted job reached exactly one final state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aio_pika
import numpy as np

from inferq.broker.messages import TERMINAL, JobEvent, unpack_events
from inferq.runtime.cluster import LocalCluster
from inferq.runtime.coordination import get_records, keys, open_etcd
from inferq.runtime.loader import sync_repository
from inferq.runtime.records import Decision, WorkerRecord
from inferq.runtime.services import free_port
from inferq.settings import BrokerSettings, EtcdSettings, JobSettings, Settings
from tests.support import Process, wait_until

MARKER = "x-cluster-test-marker"


def rotated(items: Iterable[str], first: int) -> tuple[str, ...]:
    """``items`` starting at index ``first`` (the order a process tries them in)."""
    items = tuple(items)
    return items[first:] + items[:first]


@dataclass
class Edge:
    process: Process
    port: int
    grpc_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ClusterStack:
    """inferq processes of one namespace on ``cluster``; :meth:`aclose` stops them all."""

    def __init__(self, cluster: LocalCluster, repository: Path, logs: Path, lease_ttl_s: int = 10) -> None:
        self.cluster = cluster
        self.logs = logs
        self.settings = Settings(
            namespace=f"c{uuid.uuid4().hex[:8]}",
            model_repository=repository,
            state_dir=logs / "state",
            broker=BrokerSettings(urls=tuple(cluster.spec.broker_urls), replicas=len(cluster.rabbit),
                                  reconnect_interval_s=0.5, reconnect_max_interval_s=2.0),
            etcd=EtcdSettings(endpoints=tuple(cluster.spec.etcd_endpoints), lease_ttl_s=lease_ttl_s, timeout_s=3.0),
            jobs=JobSettings(ttl_s=900),
        )
        self.processes: list[Process] = []

    def settings_for(self, broker_first: int = 0, etcd_first: int = 0) -> Settings:
        """These settings with the broker URLs and etcd endpoints tried from the given index."""
        s = self.settings
        return dataclasses.replace(
            s, broker=dataclasses.replace(s.broker, urls=rotated(s.broker.urls, broker_first)),
            etcd=dataclasses.replace(s.etcd, endpoints=rotated(s.etcd.endpoints, etcd_first)))

    async def sync(self) -> None:
        """Declare the namespace's queues (through node 1, so their leaders start there) and publish the models."""
        await sync_repository(self.settings)

    def _spawn(self, args: list[str], name: str, broker_first: int, etcd_first: int,
               env: dict[str, str] | None = None) -> Process:
        proc = Process(args, self.settings_for(broker_first, etcd_first), self.logs / f"{name}-{len(self.processes)}.log", env)
        self.processes.append(proc)
        return proc

    async def edge(self, broker_first: int = 0, etcd_first: int = 0, grpc: bool = False) -> Edge:
        """An ``inferq edge`` that answers /v2/health/ready (its v2 gRPC endpoint on a free port if ``grpc``)."""
        port, grpc_port = free_port(), free_port() if grpc else 0
        args = ["edge", "--port", str(port), "--grpc-port", str(grpc_port)]
        edge = Edge(self._spawn(args, "edge", broker_first, etcd_first), port, grpc_port)
        await wait_until(lambda: self._ready(edge), 60, "the edge to be ready", interval=0.2)
        return edge

    async def _ready(self, edge: Edge) -> bool:
        assert edge.process.alive(), edge.process.output()[-3000:]
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{edge.url}/v2/health/ready", timeout=aiohttp.ClientTimeout(total=3)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def worker(self, model: str = "mlp", broker_first: int = 0, etcd_first: int = 0) -> Process:
        """An ``inferq worker``, registered in etcd."""
        proc = self._spawn(["worker", "--model", model], f"worker-{model}", broker_first, etcd_first)

        async def registered() -> bool:
            assert proc.alive(), proc.output()[-3000:]
            return any(w.pid == proc.pid for w in await self.workers(model))

        await wait_until(registered, 60, f"worker {model} to register", interval=0.2)
        return proc

    def autoscaler(self, models: str, broker_first: int = 0, etcd_first: int = 0, **env: str) -> Process:
        """An ``inferq autoscaler`` scaling only ``models`` (its workers are its own children)."""
        defaults = {"INFERQ_AUTOSCALER_MODELS": models, "INFERQ_AUTOSCALER_INTERVAL_S": "0.5"}
        return self._spawn(["autoscaler"], "autoscaler", broker_first, etcd_first, {**defaults, **env})

    async def leases(self, prefix: str) -> dict[str, int]:
        """Key (below the namespace) -> the id of the lease it is attached to."""
        root = keys(self.settings.namespace).root
        async with open_etcd(self.settings.etcd) as client:
            found = await client.get_prefix(f"{root}/{prefix}".encode())
        return {kv.key.decode()[len(root) + 1:]: kv.lease for kv in found}

    async def decisions(self) -> dict[str, Decision]:
        """The autoscaler's last decisions in etcd."""
        async with open_etcd(self.settings.etcd) as client:
            return await get_records(client, keys(self.settings.namespace).decisions, Decision.from_json, 3)

    async def workers(self, model: str | None = None) -> list[WorkerRecord]:
        """Membership records in the cluster's etcd."""
        async with open_etcd(self.settings.etcd) as client:
            records = await get_records(client, keys(self.settings.namespace).workers, WorkerRecord.from_json, 3)
        return [r for r in records.values() if model is None or r.model == model]

    async def aclose(self) -> None:
        await asyncio.gather(*(p.stop(timeout=30) for p in self.processes))


@dataclass(frozen=True)
class Answer:
    """One submission: when it was sent and answered, the HTTP status (0: no answer) and the job id if accepted."""

    sent: float
    answered: float
    status: int
    job_id: str | None = None
    code: str = ""


@dataclass
class SteadyLoad:
    """Submits ``count`` jobs to an edge at ``rate`` per second (an open loop: a slow answer delays no other).

    With ``min_accepted``, it goes on past ``count`` at the same rate until that
    many were accepted (202), or ``max_count`` were sent.
    """

    edge_url: str
    count: int = 1000
    rate: float = 60.0
    model: str = "mlp"
    min_accepted: int = 0
    max_count: int = 0
    answers: list[Answer] = field(default_factory=list)
    _task: asyncio.Task | None = None

    def start(self) -> SteadyLoad:
        self._task = asyncio.create_task(self._run(), name="steady-load")
        return self

    @property
    def sent(self) -> int:
        return len(self.answers)

    async def wait(self, timeout: float = 300) -> list[Answer]:
        await asyncio.wait_for(asyncio.shield(self._task), timeout)
        return self.answers

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        x = np.random.default_rng(7).standard_normal((1, 256)).astype(np.float32)
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": x.ravel().tolist()}]})
        start = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=200)) as http:
            pending = set()
            i = 0
            while self._more(i):
                i += 1
                delay = start + i / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(self._one(http, body))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*pending)

    def _more(self, sent: int) -> bool:
        if sent < self.count:
            return True
        return sent < self.max_count and len(self.accepted()) < self.min_accepted

    async def _one(self, http: aiohttp.ClientSession, body: str) -> None:
        sent = time.monotonic()
        try:
            async with http.post(f"{self.edge_url}/v1/models/{self.model}/jobs", data=body,
                                 headers={"Content-Type": "application/json"}) as resp:
                doc = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.answers.append(Answer(sent, time.monotonic(), 0, code=type(exc).__name__))
            return
        job_id = doc.get("job_id") if status == 202 else None
        code = "" if status == 202 else (doc.get("error") or {}).get("code", "")
        self.answers.append(Answer(sent, time.monotonic(), status, job_id, code))

    def accepted(self) -> list[str]:
        return [a.job_id for a in self.answers if a.status == 202]


@dataclass(frozen=True)
class Window:
    """How submissions fared around a fault at ``fault_at`` (monotonic seconds)."""

    rejected: int  # answers other than 202 (503 while the broker is away, or no answer)
    window_s: float  # from the first refused submission being sent to the last one being answered (0: none)
    gap_s: float  # the longest time after the fault without a 202 being answered
    max_latency_s: float  # the slowest 202
    codes: dict[str, int]

    def describe(self) -> str:
        return (f"{self.rejected} refused ({self.codes}), 503 window {self.window_s:.2f}s, "
                f"longest gap without an acceptance {self.gap_s:.2f}s, slowest 202 {self.max_latency_s:.2f}s")


def window(answers: list[Answer], fault_at: float) -> Window:
    """The figures of :class:`Window` from a load's answers."""
    refused = [a for a in answers if a.status != 202]
    codes: dict[str, int] = defaultdict(int)
    for a in refused:
        codes[f"{a.status} {a.code}".strip()] += 1
    ok = sorted(a.answered for a in answers if a.status == 202)
    after = [fault_at] + [t for t in ok if t >= fault_at]
    gap = max((b - a for a, b in zip(after, after[1:])), default=0.0)
    span = (max(a.answered for a in refused) - min(a.sent for a in refused)) if refused else 0.0
    slowest = max((a.answered - a.sent for a in answers if a.status == 202), default=0.0)
    return Window(len(refused), span, gap, slowest, dict(codes))


async def read_ledger(url: str, stream: str, timeout: float = 60) -> list[JobEvent]:
    """Every event in ``stream``, read from its first offset up to a marker this call appends."""
    marker = uuid.uuid4().hex
    events: list[JobEvent] = []
    seen = asyncio.Event()
    async with await aio_pika.connect(url, timeout=10) as connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=500)
        queue = await channel.declare_queue(stream, passive=True)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if (message.headers or {}).get(MARKER) == marker:
                seen.set()
            elif not (message.headers or {}).get(MARKER) and not (message.headers or {}).get("x-inferq-marker"):
                events.extend(unpack_events(message.body)[0])
            await message.ack()

        await queue.consume(on_message, arguments={"x-stream-offset": "first"})
        confirming = await connection.channel(publisher_confirms=True)
        await confirming.default_exchange.publish(aio_pika.Message(b"", headers={MARKER: marker}), routing_key=stream)
        await asyncio.wait_for(seen.wait(), timeout)
    return events


@dataclass(frozen=True)
class Accounting:
    """Final states per accepted job, as the ledger tells."""

    accepted: int
    finals: dict[str, list[str]]  # job id -> its final statuses in ledger order
    missing: list[str]  # accepted, no final state
    conflicting: dict[str, list[str]]  # more than one distinct final state
    repeated: int  # jobs whose (one) final state was written more than once

    @property
    def first_finals(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for statuses in self.finals.values():
            counts[statuses[0]] += 1
        return dict(counts)

    def describe(self) -> str:
        return (f"{self.accepted} accepted: first final states {self.first_finals}, {len(self.missing)} without one, "
                f"{len(self.conflicting)} conflicting, {self.repeated} written twice")


def account(events: list[JobEvent], accepted: Iterable[str]) -> Accounting:
    """Check the ledger's events against the ids of the accepted jobs."""
    accepted = list(accepted)
    finals: dict[str, list[str]] = defaultdict(list)
    for event in events:
        if event.status in TERMINAL:
            finals[event.job_id].append(event.status.value)
    mine = {j: finals[j] for j in accepted if finals.get(j)}
    missing = [j for j in accepted if not finals.get(j)]
    conflicting = {j: s for j, s in mine.items() if len(set(s)) > 1}
    repeated = sum(1 for s in mine.values() if len(s) > 1 and len(set(s)) == 1)
    return Accounting(len(accepted), mine, missing, conflicting, repeated)


async def settled_accounting(cluster: LocalCluster, stack: ClusterStack, accepted: list[str],
                             timeout: float = 240) -> Accounting:
    """The accounting once every accepted job has a final state in the ledger (or ``timeout`` passed)."""
    stream = f"{stack.settings.namespace}.jobs"
    result: list[Accounting] = []

    async def all_final() -> bool:
        url = next(n.url for n in cluster.rabbit if n.running())
        try:
            result[:] = [account(await read_ledger(url, stream), accepted)]
        except (aio_pika.exceptions.AMQPError, OSError, TimeoutError):
            return False
        return not result[0].missing

    try:
        await wait_until(all_final, timeout, "every accepted job to reach a final state", interval=2)
    except AssertionError:
        if not result:
            raise
    return result[0]


def report(name: str, **figures: Any) -> None:
    """One line of figures for the test log (run with -s to see it; `make test-cluster` does)."""
    text = ", ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\n[cluster figures] {name}: {text}", flush=True)
