"""Priority classes: a high job starts before every normal job of its model version still waiting."""

from __future__ import annotations

import datetime

from tests.conftest import sample
from tests.support import assert_each_ended_once, ledger_events
from tests.test_edge import poll, v2_input


def started(doc: dict) -> datetime.datetime:
    return datetime.datetime.fromisoformat(doc["started_at"].replace("Z", "+00:00"))


async def test_high_jobs_start_before_the_normal_backlog_that_was_waiting(synced, spawn_worker, spawn_edge, http, amqp) -> None:
    edge = await spawn_edge()
    backlog = [await amqp.submit("slow", {"x": sample("mlp", seed=i)}) for i in range(200)]  # bulk work over AMQP
    urgent = []
    for i in range(5):
        body = {"inputs": [v2_input(sample("mlp", seed=1000 + i))], "priority": "high"}
        async with http.post(f"{edge.url}/v1/models/slow/jobs", json=body) as resp:
            assert resp.status == 202, await resp.text()
            urgent.append((await resp.json())["job_id"])
    await spawn_worker("slow")
    high = [await poll(http, edge, j, wait=60) for j in urgent]
    # A job published by routing key straight to its version's queue is in the ledger only once it starts,
    # so the backlog is awaited through its replies before the edge is asked for its documents.
    await amqp.wait_results(backlog, timeout=120)
    normal = [await poll(http, edge, j) for j in backlog]
    last_high = max(started(d) for d in high)
    ahead = sum(1 for d in normal if started(d) < last_high)
    assert ahead <= 0.1 * len(backlog), f"{ahead} of {len(backlog)} waiting normal jobs started before the high ones"
    final = assert_each_ended_once(await ledger_events(synced), backlog + urgent)
    assert set(final.values()) == {"succeeded"}


async def test_priority_is_validated_and_a_normal_only_tenant_cannot_ask_for_high(spawn_edge, http) -> None:
    edge = await spawn_edge()
    body = {"inputs": [v2_input(sample("mlp"))], "priority": "urgent"}
    async with http.post(f"{edge.url}/v1/models/mlp/jobs", json=body) as resp:
        assert resp.status == 422 and "priority" in (await resp.json())["error"]["message"]
