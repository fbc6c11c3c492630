"""The broker-SIGKILL soak (``make soak``): a RabbitMQ node of the test's own killed again and again under load.

Issue 22's measure: 9 SIGKILLs in 180 s at 30 jobs/s, and not one healthy job may
end failed. Each run counts every accepted job's final states in the ledger.
Knobs: INFERQ_SOAK_KILLS, INFERQ_SOAK_SECONDS, INFERQ_SOAK_RATE, INFERQ_SOAK_RUNS.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time

import aiohttp
import pytest

from tests.conftest import sample
from tests.support import assert_each_ended_once, ledger_events
from tests.test_edge import poll, v2_input

pytestmark = [pytest.mark.soak, pytest.mark.timeout(3600)]

KILLS = int(os.environ.get("INFERQ_SOAK_KILLS", "9"))
SECONDS = float(os.environ.get("INFERQ_SOAK_SECONDS", "180"))
RATE = float(os.environ.get("INFERQ_SOAK_RATE", "30"))
RUNS = int(os.environ.get("INFERQ_SOAK_RUNS", "5"))


class Load:
    """Open-loop HTTP submissions at ``rate`` jobs/s; remembers what was accepted and how the rest was refused."""

    def __init__(self, http: aiohttp.ClientSession, url: str, rate: float) -> None:
        self.http, self.url, self.rate = http, url, rate
        self.accepted: list[str] = []
        self.refused: collections.Counter[str] = collections.Counter()
        self.outage_s = 0.0

    async def one(self) -> None:
        try:
            async with self.http.post(f"{self.url}/v1/models/mlp/jobs", json={"inputs": [v2_input(sample("mlp"))]}) as resp:
                body = await resp.json()
                if resp.status == 202:
                    self.accepted.append(body["job_id"])
                else:
                    assert resp.status in (429, 503), body
                    self.refused[str(resp.status)] += 1
        except aiohttp.ClientError as exc:
            self.refused[type(exc).__name__] += 1

    async def run(self, seconds: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        for i in range(int(seconds * self.rate)):
            await asyncio.sleep(max(0.0, start + i / self.rate - time.monotonic()))
            task = asyncio.create_task(self.one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)


@pytest.mark.parametrize("run", range(RUNS))
async def test_a_broker_node_sigkilled_again_and_again_under_load_fails_no_healthy_job(
        run, synced, own_broker, spawn_worker, spawn_edge, http) -> None:
    env = {"INFERQ_BROKER_URL": own_broker.url, "INFERQ_BROKER_PUBLISH_TIMEOUT_S": "3", "INFERQ_BROKER_HEARTBEAT_S": "5"}
    await spawn_worker("mlp", env=env)
    edge = await spawn_edge(env=env)
    await asyncio.sleep(2)  # RabbitMQ 3.10 can lose a quorum queue's leader if killed within ~1 s of declaring it
    load = Load(http, edge.url, RATE)
    traffic = asyncio.create_task(load.run(SECONDS))
    for _ in range(KILLS):
        await asyncio.sleep(SECONDS / (KILLS + 1))
        await asyncio.to_thread(own_broker.kill)
        await own_broker.arestart()
    await traffic
    for job in load.accepted:
        await poll(http, edge, job, wait=120)
    final = assert_each_ended_once(await ledger_events(synced, own_broker.url), load.accepted)
    failed = {j: s for j, s in final.items() if s != "succeeded"}
    print(f"\nsoak run {run}: {KILLS} kills in {SECONDS:.0f}s, {len(load.accepted)} accepted, refused {dict(load.refused)}, "
          f"{len(failed)} not succeeded")
    assert not failed, failed
