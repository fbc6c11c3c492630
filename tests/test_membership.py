"""etcd membership: a lease-backed record that comes back when its lease is lost."""

from __future__ import annotations

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
