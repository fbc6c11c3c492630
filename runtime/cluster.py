"""A local cluster on this one machine: N RabbitMQ nodes joined with ``join_cluster`` and an N-member etcd.

``inferq services --cluster 3`` starts one under ``<state_dir>/cluster`` on
fixed ports (:meth:`ClusterSpec.local`) and leaves it running; ``--cluster-stop``
stops it and removes its data. Tests build the same thing on free ports
(:meth:`ClusterSpec.ephemeral`) in a temporary folder, tied to the test
session (see :mod:`inferq.runtime.daemon`). ``cluster.json`` in the folder
records the spec, so a later process finds the nodes again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from inferq.errors import ServiceError
from inferq.runtime.etcdnode import EtcdMember, EtcdMemberSpec
from inferq.runtime.rabbitnode import NodeSpec, RabbitNode
from inferq.runtime.services import reachable

log = logging.getLogger("inferq.cluster")

SPEC_FILE = "cluster.json"


@dataclass(frozen=True)
class ClusterSpec:
    """Names and ports of every RabbitMQ node and etcd member, and the etcd cluster token."""

    rabbit: tuple[NodeSpec, ...]
    etcd: tuple[EtcdMemberSpec, ...]
    token: str

    @classmethod
    def local(cls, size: int = 3) -> ClusterSpec:
        """The fixed ports of ``inferq services --cluster``: AMQP 5673.., etcd clients 12379, 12389, .."""
        rabbit = tuple(NodeSpec(f"inferq-c{i + 1}", 5673 + i, 25673 + i) for i in range(size))
        etcd = tuple(EtcdMemberSpec(f"etcd-{i + 1}", 12379 + 10 * i, 12380 + 10 * i) for i in range(size))
        return cls(rabbit, etcd, "inferq-local")

    @classmethod
    def ephemeral(cls, size: int = 3) -> ClusterSpec:
        """Random node names on free ports (tests)."""
        prefix = f"inferq-k{secrets.token_hex(3)}-"
        rabbit = tuple(NodeSpec.ephemeral(f"{prefix}{i + 1}-") for i in range(size))
        etcd = tuple(EtcdMemberSpec.ephemeral(f"etcd-{i + 1}") for i in range(size))
        return cls(rabbit, etcd, f"inferq-{secrets.token_hex(4)}")

    @property
    def broker_urls(self) -> list[str]:
        return [n.url for n in self.rabbit]

    @property
    def etcd_endpoints(self) -> list[str]:
        return [m.endpoint for m in self.etcd]

    def ports(self) -> list[int]:
        return [p for n in self.rabbit for p in (n.port, n.dist_port)] + [
            p for m in self.etcd for p in (m.client_port, m.peer_port)]

    def to_json(self) -> str:
        return json.dumps({"rabbit": [json.loads(n.to_json()) for n in self.rabbit],
                           "etcd": [json.loads(m.to_json()) for m in self.etcd], "token": self.token}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ClusterSpec:
        data = json.loads(text)
        return cls(tuple(NodeSpec(**n) for n in data["rabbit"]),
                   tuple(EtcdMemberSpec(**m) for m in data["etcd"]), data["token"])


class LocalCluster:
    """The nodes and members of one :class:`ClusterSpec` under ``root`` (rabbit-N/, etcd-N/, home/)."""

    def __init__(self, spec: ClusterSpec, root: Path, watch_parent: bool = True, adopt: bool = False) -> None:
        self.spec = spec
        self.root = Path(root).resolve()
        home = self.root / "home"  # one Erlang cookie for every node, or they cannot join
        peers = list(spec.etcd)
        if adopt:
            self.rabbit = [RabbitNode.adopt(n, self.root / f"rabbit-{i + 1}", home) for i, n in enumerate(spec.rabbit)]
            self.etcd = [EtcdMember.adopt(m, self.root / f"etcd-{i + 1}", peers, spec.token) for i, m in enumerate(peers)]
        else:
            self.rabbit = [RabbitNode(n, self.root / f"rabbit-{i + 1}", home, watch_parent) for i, n in enumerate(spec.rabbit)]
            self.etcd = [EtcdMember(m, self.root / f"etcd-{i + 1}", peers, spec.token, watch_parent)
                         for i, m in enumerate(peers)]

    @classmethod
    def find(cls, root: Path) -> LocalCluster | None:
        """The cluster that another process started under ``root``, if its spec file is there."""
        path = Path(root) / SPEC_FILE
        return cls(ClusterSpec.from_json(path.read_text()), root, adopt=True) if path.exists() else None

    def running(self) -> list[str]:
        """Names of the nodes and members whose process is up."""
        return [n.spec.node for n in self.rabbit if n.running()] + [m.spec.name for m in self.etcd if m.running()]

    def start(self, timeout: float = 180.0) -> None:
        """Start every node and member, join the RabbitMQ nodes to the first, wait for etcd's quorum."""
        fresh = self.launch()
        self._settle_or_stop(fresh, timeout)

    async def astart(self, timeout: float = 180.0) -> None:
        """:meth:`start` without blocking the loop; the processes are launched from the loop's thread."""
        fresh = self.launch()
        await asyncio.to_thread(self._settle_or_stop, fresh, timeout)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    def launch(self) -> bool:
        """Start every process and return at once; True when the cluster is new (its nodes must join)."""
        taken = [p for p in self.spec.ports() if reachable("127.0.0.1", p)]
        if taken:
            raise ServiceError(f"ports {taken} are already in use (another local cluster? `inferq services --cluster-stop`)")
        fresh = not (self.root / "rabbit-1" / "mnesia").exists()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / SPEC_FILE).write_text(self.spec.to_json())  # written first: a failed start can still be stopped
        try:
            for part in [*self.etcd, *self.rabbit]:
                part.launch()  # all at once: restarted nodes and etcd members wait for their peers
        except BaseException:
            self.stop()
            raise
        return fresh

    def _settle_or_stop(self, fresh: bool, timeout: float) -> None:
        try:
            self._each(lambda n: n.wait_ready(timeout), self.rabbit)
            if fresh:
                for node in self.rabbit[1:]:
                    node.join_cluster(self.rabbit[0])
            self._each(lambda m: m.wait_ready(timeout), self.etcd)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node and member that runs (each is SIGKILLed if it does not stop in time)."""
        self._each(lambda n: n.stop(), self.rabbit)
        self._each(lambda m: m.stop(), self.etcd)

    def remove(self) -> None:
        """Stop everything and delete the cluster's folder."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def running_rabbit_nodes(self) -> list[str]:
        """The cluster's running nodes as the first running node reports them."""
        node = next(n for n in self.rabbit if n.running())
        return sorted(json.loads(node.ctl("cluster_status", "--formatter", "json"))["running_nodes"])

    def heal(self, timeout: float = 180.0) -> list[str]:
        """Start every node and member that is down, and wait until all run together; returns what was started."""
        down = [n for n in self.rabbit if not n.running()] + [m for m in self.etcd if not m.running()]
        for part in down:
            part.launch()
        self._each(lambda n: n.wait_ready(timeout), [n for n in self.rabbit if n in down])
        self._each(lambda m: m.wait_ready(timeout), self.etcd)
        everyone = sorted(n.spec.node for n in self.rabbit)
        deadline = time.monotonic() + timeout
        while self.running_rabbit_nodes() != everyone:  # a paused (minority) node rejoins on its own
            if time.monotonic() > deadline:
                raise ServiceError(f"RabbitMQ nodes running: {self.running_rabbit_nodes()}, expected {everyone}")
            time.sleep(0.5)
        return [getattr(p.spec, "node", None) or p.spec.name for p in down]

    def queue_leader(self, queue: str) -> RabbitNode:
        """The node holding the leader of quorum queue or stream ``queue`` (asked of a running node)."""
        node = next(n for n in self.rabbit if n.running())
        rows = json.loads(node.ctl("list_queues", "name", "leader", "--formatter", "json"))
        leader = next(r["leader"] for r in rows if r["name"] == queue)
        return next(n for n in self.rabbit if n.spec.node == leader)

    def queue_members(self, queue: str) -> list[str]:
        """The nodes that hold a replica of ``queue``."""
        node = next(n for n in self.rabbit if n.running())
        rows = json.loads(node.ctl("list_queues", "name", "members", "--formatter", "json"))
        return sorted(next(r["members"] for r in rows if r["name"] == queue))

    def etcd_leader(self) -> EtcdMember:
        """The member that leads the etcd cluster now."""
        for member in self.etcd:
            status = member.status()
            if status is not None and status.get("leader") == status.get("header", {}).get("member_id"):
                return member
        raise ServiceError("no etcd member reports itself as leader")

    def describe(self) -> str:
        """What a user would put in their settings to use this cluster."""
        urls = ", ".join(f'"{u}"' for u in self.spec.broker_urls)
        endpoints = ", ".join(f'"{e}"' for e in self.spec.etcd_endpoints)
        return "\n".join([
            f"rabbitmq nodes: {', '.join(n.node for n in self.spec.rabbit)}",
            f"broker urls:    {', '.join(self.spec.broker_urls)}",
            f"etcd endpoints: {', '.join(self.spec.etcd_endpoints)}",
            f"data:           {self.root}",
            "settings for it (TOML):",
            f"  [broker]\n  urls = [{urls}]\n  replicas = {len(self.spec.rabbit)}",
            f"  [etcd]\n  endpoints = [{endpoints}]",
        ])

    @staticmethod
    def _each(action, parts: list) -> None:
        # In parallel: booting or stopping a node is mostly waiting.
        with ThreadPoolExecutor(max_workers=len(parts) or 1) as pool:
            for future in [pool.submit(action, p) for p in parts]:
                future.result()


def start_local(state_dir: Path, size: int = 3) -> tuple[LocalCluster, str]:
    """``inferq services --cluster N``: start the local cluster, or report the one that runs."""
    if size < 1:
        raise ServiceError(f"a cluster needs at least one node, not {size}")
    root = Path(state_dir) / "cluster"
    found = LocalCluster.find(root)
    if found is not None and found.running():
        if len(found.running()) < len(found.rabbit) + len(found.etcd):
            raise ServiceError(f"the local cluster in {root} is partly running: `inferq services --cluster-stop` first")
        return found, "running"
    if found is not None and len(found.spec.rabbit) != size:
        raise ServiceError(f"{root} holds a {len(found.spec.rabbit)}-node cluster: `inferq services --cluster-stop` first")
    cluster = LocalCluster(found.spec if found else ClusterSpec.local(size), root, watch_parent=False)
    cluster.start()
    return cluster, "started"


def stop_local(state_dir: Path) -> str:
    """``inferq services --cluster-stop``: stop the local cluster and remove its data."""
    root = Path(state_dir) / "cluster"
    found = LocalCluster.find(root)
    if found is None:
        return f"no local cluster in {root}"
    found.remove()
    return f"stopped and removed the local cluster in {root}"
