"""etcd membership: a lease-backed record that comes back when its lease is lost."""

from __future__ import annotations

import json
import uuid

from runtime.coordination import open_etcd
from runtime.membership import MembershipLease
from tests.support import wait_until


async def test_lost_lease_is_registered_again(synced) -> None:
    key = f"/{synced.namespace}/workers/lease-{uuid.uuid4().hex[:6]}"
    async with open_etcd(synced.etcd) as client:
        lease = await MembershipLease.acquire(client, key, {"state": "ready"}, ttl_s=2)
        try:
            assert json.loads((await client.get(key.encode())).value) == {"state": "ready"}
            await client.revoke_lease(lease._lease.id)  # what an etcd outage longer than the TTL does
            assert await client.get(key.encode()) is None

            async def back() -> bool:
                return await client.get(key.encode()) is not None

            await wait_until(back, 10, "the record to be registered again")
            assert lease.registrations == 2
            await lease.update(state="draining")
            assert json.loads((await client.get(key.encode())).value)["state"] == "draining"
        finally:
            await lease.aclose()
        assert await client.get(key.encode()) is None
