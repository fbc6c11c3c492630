"""etcd membership: a lease-backed record that comes back when its lease is lost."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

from inferq.runtime.coordination import open_etcd
from inferq.runtime.membership import MembershipLease
from inferq.runtime.records import WorkerRecord, WorkerState
from tests.support import wait_until


async def test_lost_lease_is_registered_again(synced) -> None:
    key = f"/{synced.namespace}/workers/lease-{uuid.uuid4().hex[:6]}"
    async with open_etcd(synced.etcd) as client:
        record = WorkerRecord("w1", "mlp", "1")
        lease = await MembershipLease.open(client, key, record, ttl_s=2)
        try:
            assert WorkerRecord.from_json((await client.get(key.encode())).value) == record
            await client.revoke_lease(lease._lease.id)  # what an etcd outage longer than the TTL does
            assert await client.get(key.encode()) is None

            async def back() -> bool:
                return await client.get(key.encode()) is not None

            await wait_until(back, 10, "the record to be registered again")
            assert lease.registrations == 2
            await lease.update(dataclasses.replace(record, state=WorkerState.DRAINING))
            assert WorkerRecord.from_json((await client.get(key.encode())).value).state is WorkerState.DRAINING
        finally:
            await lease.aclose()
        assert await client.get(key.encode()) is None


async def test_closing_a_lease_ends_its_keeper_even_when_the_keeper_drops_a_cancel(synced) -> None:
    # What wait_for on 3.11 does when a cancel races a refresh's reply (gh-86296): the keeper swallows one cancel.
    # Before, aclose waited on such a keeper for ever (a 180 s test timeout in a full run).
    key = f"/{synced.namespace}/workers/lease-{uuid.uuid4().hex[:6]}"
    async with open_etcd(synced.etcd) as client:
        lease = await MembershipLease.open(client, key, WorkerRecord("w1", "mlp", "1"), ttl_s=2)
        keeper, dropped = lease._task, asyncio.Event()

        async def deaf() -> None:
            while True:
                try:
                    await asyncio.sleep(0.2)
                except asyncio.CancelledError:
                    if dropped.is_set():
                        raise
                    dropped.set()

        lease._task = asyncio.create_task(deaf())
        keeper.cancel()
        await asyncio.wait_for(lease.aclose(), 10)
        assert dropped.is_set() and lease._task is None
        assert await client.get(key.encode()) is None
