"""Webhook signatures: Standard Webhooks headers, and a tenant's secrets in etcd across a rotation."""

from __future__ import annotations

import time
import uuid

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from inferq.edge.webhooks import sign
from inferq.runtime.coordination import keys, open_etcd
from inferq.runtime.signing import ROTATION_S, TenantSecrets, new_secret

BODY = '{"job_id": "j1", "status": "succeeded"}'


def test_a_signature_verifies_with_standardwebhooks_and_not_with_another_secret() -> None:
    secret = new_secret()
    headers = sign([secret], "msg_j1_completed", time.time(), BODY)
    assert headers["webhook-id"] == "msg_j1_completed" and headers["webhook-signature"].startswith("v1,")
    Webhook(secret).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace("succeeded", "failed"), headers)


async def test_during_a_rotation_both_of_a_tenant_s_secrets_sign(settings) -> None:
    tenant = f"acme-{uuid.uuid4().hex[:6]}"
    async with open_etcd(settings.etcd) as etcd:
        try:
            store = TenantSecrets(etcd, settings.namespace, settings.etcd.timeout_s)
            first = await store.ensure(tenant)
            assert (await store.ensure(tenant)).current == first.current  # shown again, not replaced
            rotated = await store.ensure(tenant, rotate=True)
            assert rotated.current != first.current and rotated.previous == first.current
            headers = sign(rotated.signing(time.time()), "msg_j1_completed", time.time(), BODY)
            Webhook(first.current).verify(BODY, headers)  # a receiver not yet switched
            Webhook(rotated.current).verify(BODY, headers)  # one already switched
            assert rotated.signing(time.time() + ROTATION_S + 1) == [rotated.current]
            assert (await TenantSecrets(etcd, settings.namespace, settings.etcd.timeout_s).get(tenant)) == rotated
        finally:
            await etcd.delete_prefix(f"{keys(settings.namespace).root}/webhooksecrets/".encode())
