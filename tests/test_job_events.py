"""A job's event stream (SSE, read with a real HTTP client and the SDK) and the listing of jobs."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from inferq.client.events import read_events
from inferq.client.http import AsyncClient
from inferq.client.sync import Client
from inferq.edge.auth import create_key
from inferq.runtime.coordination import open_etcd
from tests.conftest import sample
from tests.test_cli_client import cli
from tests.test_edge import poll, submit, v2_input


async def events_of(http: aiohttp.ClientSession, url: str, headers: dict | None = None) -> list[tuple[str, str, dict]]:
    """(event, id, document) of every event of a stream, read until the server closes it."""
    async with http.get(url, headers=headers or {}) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        return [(e.event, e.id, json.loads(e.data)) async for e in read_events(resp)]


async def test_the_event_stream_sends_the_current_state_then_each_change_and_closes_after_the_final_one(
        spawn_worker, spawn_edge, http) -> None:
    edge, other = await spawn_edge(), await spawn_edge()
    job_id = (await submit(http, edge, "slow", sample("mlp")))["job_id"]
    reading = asyncio.ensure_future(events_of(http, f"{other.url}/v1/jobs/{job_id}/events"))  # any edge serves it
    await spawn_worker("slow")
    events = await asyncio.wait_for(reading, 60)
    assert [e for e, _, _ in events] == ["queued", "running", "succeeded"]
    assert events[-1][2]["outputs"] and all(doc["job_id"] == job_id for _, _, doc in events)
    running_id = events[1][1]
    resumed = await events_of(http, f"{edge.url}/v1/jobs/{job_id}/events", {"Last-Event-ID": running_id})
    assert [(e, i) for e, i, _ in resumed] == [("succeeded", events[2][1])]
    again = await events_of(http, f"{edge.url}/v1/jobs/{job_id}/events")  # already final: one event, then the close
    assert [e for e, _, _ in again] == ["succeeded"]


async def test_a_waiting_job_s_stream_sends_heartbeat_comments(spawn_edge, http) -> None:
    edge = await spawn_edge(env={"INFERQ_EDGE_EVENTS_HEARTBEAT_S": "0.2"})
    job_id = (await submit(http, edge, "unserved", sample("mlp")))["job_id"]
    async with http.get(f"{edge.url}/v1/jobs/{job_id}/events") as resp:
        lines = [await resp.content.readline() for _ in range(5)]
    assert lines[0] == b"event: queued\n" and b": heartbeat\n" in lines[4:]


async def test_the_sdk_follows_a_job_s_events_and_unknown_jobs_are_404(spawn_worker, spawn_edge, http) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge()
    async with AsyncClient(edge.url, format="json") as client:
        job = await client.submit("mlp", {"x": sample("mlp")})
        statuses = [doc.status.value async for doc in job.events()]
    assert statuses[-1] == "succeeded" and statuses == sorted(set(statuses), key=statuses.index)
    async with http.get(f"{edge.url}/v1/jobs/nosuchjob/events") as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"


async def test_paging_newest_first_while_jobs_arrive_neither_skips_nor_repeats_a_job(spawn_edge, http) -> None:
    edge = await spawn_edge()
    before = [(await submit(http, edge, "unserved", sample("mlp", seed=i)))["job_id"] for i in range(12)]
    arriving: list[str] = []
    paging = asyncio.Event()

    async def keep_submitting() -> None:  # concurrent submits for as long as the client pages
        while not paging.is_set():
            arriving.append((await submit(http, edge, "unserved", sample("mlp")))["job_id"])

    submitter = asyncio.ensure_future(keep_submitting())
    seen, after, pages = [], None, 0
    try:
        while True:
            params = {"model": "unserved", "limit": "5", **({"after": after} if after else {})}
            async with http.get(f"{edge.url}/v1/jobs", params=params) as resp:
                assert resp.status == 200, await resp.text()
                page = await resp.json()
            pages += 1
            seen += [j["job_id"] for j in page["jobs"]]
            assert all("outputs" not in j and j["model"] == "unserved" for j in page["jobs"])
            if pages == 1:
                first_page_done = len(arriving)
            await asyncio.sleep(0.05)  # let submits land between pages
            after = page["next"]
            if after is None:
                break
    finally:
        paging.set()
        await submitter
    assert len(seen) == len(set(seen)), "a job was listed twice"
    assert [j for j in seen if j in before] == before[::-1], "newest first, none skipped"
    late = set(arriving[first_page_done + 1:])  # submitted after the first page was answered
    assert late and not late & set(seen), "a job submitted while paging showed up on a later page"


async def test_listing_filters_by_status_counts_by_status_and_refuses_bad_queries(spawn_edge, http) -> None:
    edge = await spawn_edge()
    job_id = (await submit(http, edge, "unserved", sample("mlp")))["job_id"]
    async with http.delete(f"{edge.url}/v1/jobs/{job_id}") as resp:
        assert resp.status == 200
    async with http.get(f"{edge.url}/v1/jobs", params={"model": "unserved", "status": "cancelled"}) as resp:
        listed = await resp.json()
    assert job_id in [j["job_id"] for j in listed["jobs"]] and {j["status"] for j in listed["jobs"]} == {"cancelled"}
    async with http.get(f"{edge.url}/v1/jobs/stats", params={"model": "unserved"}) as resp:
        assert resp.status == 200  # not taken for a job called "stats"
        counts = (await resp.json())["counts"]
    assert counts["cancelled"] >= 1 and counts["total"] == sum(v for k, v in counts.items() if k != "total")
    for params in ({"limit": "1001"}, {"limit": "0"}, {"status": "done"}, {"after": "not-a-cursor"}):
        async with http.get(f"{edge.url}/v1/jobs", params=params) as resp:
            assert resp.status == 400, params
            assert "error" in await resp.json()
    assert (await poll(http, edge, job_id, wait=0))["status"] == "cancelled"


async def test_listing_and_streams_are_scoped_to_the_caller_s_tenant(synced, spawn_edge, http) -> None:
    edge = await spawn_edge(env={"INFERQ_EDGE_AUTH": "true"})
    async with open_etcd(synced.etcd) as etcd:
        acme, globex = [{"Authorization": f"Bearer {await create_key(etcd, synced.namespace, t, 0, 0, 5)}"}
                        for t in ("acme-list", "globex-list")]
    body = {"inputs": [v2_input(sample("mlp"))]}
    mine = []
    for _ in range(2):
        async with http.post(f"{edge.url}/v1/models/unserved/jobs", json=body, headers=acme) as resp:
            mine.append((await resp.json())["job_id"])
    async with http.post(f"{edge.url}/v1/models/unserved/jobs", json=body, headers=globex) as resp:
        theirs = (await resp.json())["job_id"]
    async with http.get(f"{edge.url}/v1/jobs", params={"limit": "1000"}, headers=acme) as resp:
        listed = [j["job_id"] for j in (await resp.json())["jobs"]]
    assert listed == mine[::-1] and theirs not in listed
    async with http.get(f"{edge.url}/v1/jobs/stats", headers=globex) as resp:
        assert (await resp.json())["counts"]["total"] == 1
    async with http.get(f"{edge.url}/v1/jobs/{mine[0]}/events", headers=globex) as resp:
        assert resp.status == 404
    async with http.get(f"{edge.url}/v1/jobs") as resp:
        assert resp.status == 401


async def test_the_cli_watches_a_job_to_its_end_and_lists_jobs(spawn_worker, spawn_edge, http) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge()
    job_id = (await submit(http, edge, "mlp", sample("mlp")))["job_id"]
    watched = await cli("jobs", "watch", job_id, "--url", edge.url)
    assert watched.returncode == 0, watched.stderr
    assert any(line.split()[1:2] == ["succeeded"] for line in watched.stdout.splitlines())
    assert json.loads(watched.stdout[watched.stdout.index("{"):])["status"] == "succeeded"
    listed = await cli("jobs", "list", "--model", "mlp", "--limit", "3", "--url", edge.url)
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert rows[0].startswith("JOB") and 2 <= len(rows) <= 4 and job_id in rows[1]  # newest first, at most 3
    stats = await cli("jobs", "list", "--model", "mlp", "--stats", "--url", edge.url)
    assert json.loads(stats.stdout)["succeeded"] >= 1


async def test_the_blocking_sdk_follows_events_and_lists_jobs(spawn_worker, spawn_edge) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge()

    def use() -> tuple[list[str], list[str], dict[str, int]]:
        with Client(edge.url) as client:
            job = client.submit("mlp", {"x": sample("mlp")})
            statuses = [doc.status.value for doc in job.events()]
            jobs, _ = client.list_jobs("mlp", limit=5)
            return statuses, [j["job_id"] for j in jobs if j["job_id"] == job.id], client.job_stats("mlp")

    statuses, listed, counts = await asyncio.to_thread(use)
    assert statuses[-1] == "succeeded" and len(listed) == 1 and counts["succeeded"] >= 1
