"""The rules of tenant isolation over AMQP, without processes: whose job a message is, what a copy keeps, who may read what."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aio_pika
import aiormq
import pytest
from pamqp import commands, header

from inferq.broker.admin import ROUTING_KEY_PATTERN, service_permissions, tenant_permissions
from inferq.broker.handback import copy_of
from inferq.broker.identity import (
    PUBLISHER_HEADER, Publisher, Verdict, broker_user, broker_vhost, carried, check_tenant_name, may_reply, publisher_of,
)
from inferq.broker.messages import TENANT_HEADER
from inferq.errors import CodecError, ConfigError
from inferq.runtime.records import BrokerUserRecord, MeterRecord
from inferq.runtime.tenancy import Tenancy, bucket_size, decide, refill

SERVICE = "inferq-svc"
NS = "prod"


def delivery(user_id: str | None = None, headers: dict[str, Any] | None = None, reply_to: str | None = None,
             redelivered: bool = False) -> aio_pika.abc.AbstractIncomingMessage:
    """A real aio-pika incoming message, as a consumer would get it."""
    props = aiormq.spec.Basic.Properties(user_id=user_id, headers=headers or {}, reply_to=reply_to, message_id="job-1",
                                         content_type="application/msgpack")
    deliver = commands.Basic.Deliver(consumer_tag="c", delivery_tag=1, redelivered=redelivered, exchange="", routing_key="q")
    return aio_pika.IncomingMessage(aiormq.abc.DeliveredMessage(
        delivery=deliver, header=header.ContentHeader(properties=props, body_size=0), body=b"", channel=None), no_ack=True)


def redelivered_copy(message: aio_pika.Message) -> aio_pika.abc.AbstractIncomingMessage:
    """What a consumer gets when ``message`` (a worker's copy) comes back from its queue."""
    return delivery(message.user_id, dict(message.headers), message.reply_to)


ACME = BrokerUserRecord("prod-acme", "acme", rate_per_s=5, burst=10)


def test_the_tenant_header_holds_only_when_inferqs_service_user_published_the_job() -> None:
    assert publisher_of(delivery(SERVICE, {TENANT_HEADER: "acme"}), SERVICE) == Publisher(SERVICE, service=True, tenant="acme")
    spoofed = publisher_of(delivery("prod-evil", {TENANT_HEADER: "acme"}), SERVICE)
    assert not spoofed.service and spoofed.user == "prod-evil"
    assert decide(spoofed, BrokerUserRecord("prod-evil", "evil"), None, NS).tenant == "evil", "the header is ignored"


def test_a_job_without_user_id_or_from_an_unmapped_user_is_unauthenticated_and_gets_no_reply() -> None:
    for publisher, record in ((publisher_of(delivery(None, {TENANT_HEADER: "acme"}), SERVICE), None),
                              (publisher_of(delivery("stranger"), SERVICE), None)):
        verdict = decide(publisher, record, "prod.replies.acme.q", NS)
        assert verdict.error["code"] == "unauthenticated" and verdict.tenant is None and not verdict.reply


def test_a_publisher_header_counts_only_on_a_copy_published_by_the_service_user() -> None:
    forged = publisher_of(delivery("prod-evil", {PUBLISHER_HEADER: "prod-acme", TENANT_HEADER: "acme"}), SERVICE)
    assert forged.user == "prod-evil" and not forged.copy
    copy = publisher_of(delivery(SERVICE, {PUBLISHER_HEADER: "prod-acme", TENANT_HEADER: "evil"}), SERVICE)
    assert copy == Publisher("prod-acme", copy=True, tenant="evil")
    assert decide(copy, ACME, None, NS).tenant == "acme", "a copy is judged as its original publisher's job"


def test_a_workers_copy_of_a_tenants_job_keeps_its_publisher_and_cannot_launder_a_forged_one() -> None:
    original = delivery("prod-evil", {PUBLISHER_HEADER: SERVICE, TENANT_HEADER: "acme", "x-inferq-starts": 1}, "prod.replies.evil.q")
    copy = copy_of(original, {"x-inferq-retries": 1}, 5.0, SERVICE)
    assert copy.user_id == SERVICE and copy.headers[PUBLISHER_HEADER] == "prod-evil"
    assert copy.headers["x-inferq-starts"] == 1 and copy.headers["x-inferq-retries"] == 1 and copy.reply_to == "prod.replies.evil.q"
    again = copy_of(redelivered_copy(copy), {}, 5.0, SERVICE)  # a copy of the copy
    judged = publisher_of(redelivered_copy(again), SERVICE)
    assert judged.user == "prod-evil" and not judged.service


def test_a_copy_of_inferqs_own_job_stays_inferqs_with_its_tenant() -> None:
    copy = copy_of(delivery(SERVICE, {TENANT_HEADER: "acme"}), {}, None, SERVICE)
    assert PUBLISHER_HEADER not in copy.headers
    assert publisher_of(redelivered_copy(copy), SERVICE) == Publisher(SERVICE, service=True, tenant="acme")
    assert carried(delivery(None), SERVICE) == {PUBLISHER_HEADER: ""}, "a job with no user_id stays nobody's"
    assert publisher_of(delivery(SERVICE, {PUBLISHER_HEADER: "", TENANT_HEADER: "acme"}), SERVICE).user is None


def test_reply_to_must_be_one_of_the_tenants_own_reply_queues() -> None:
    publisher = Publisher("prod-acme")
    assert decide(publisher, ACME, "prod.replies.acme.7f3a", NS).error is None
    for queue in ("prod.replies.evil.7f3a", "prod.replies.acme.", "amq.gen-abc", "prod.jobs", "prod.model.mlp.1",
                  "prod.replies.acme", "staging.replies.acme.x"):
        verdict = decide(publisher, ACME, queue, NS)
        assert verdict.error["code"] == "forbidden" and verdict.tenant == "acme" and not verdict.reply, queue
    assert not may_reply("prod.replies.ab.x", NS, "a") and may_reply("prod.replies.a.b", NS, "a")


def test_tenant_names_that_would_blur_queue_prefixes_or_regexes_are_refused() -> None:
    assert check_tenant_name("acme-2_x") == "acme-2_x"
    for bad in ("a.b", "Acme", "a*", "", "-a", "a" * 64, "a/b"):
        with pytest.raises(ConfigError):
            check_tenant_name(bad)


def test_a_tenants_permissions_reach_only_its_requests_and_reply_queues() -> None:
    permissions, topic = tenant_permissions("t1-x", "acme")

    def can(regex: str, name: str) -> bool:
        return re.search(regex, name) is not None  # RabbitMQ matches the regex against the whole name, unanchored

    assert can(permissions.write, "t1-x.requests")
    for name in ("amq.default", "t1-x.control", "t1-x.jobs", "t1-x.model.mlp.1", "t1-x.requestsX", "t1-x.cancels"):
        assert not can(permissions.write, name), name
    for name in ("t1-x.replies.acme.q1",):
        assert can(permissions.read, name) and can(permissions.configure, name)
    for name in ("t1-x.jobs", "t1-x.cancels", "t1-x.dead", "t1-x.model.mlp.1", "t1-x.replies.evil.q", "amq.gen-x",
                 "t1-x.replies.acme.", "t1-x.replies.acmeX.q"):
        assert not can(permissions.read, name) and not can(permissions.configure, name), name
    assert topic.exchange == "t1-x.requests" and topic.read == "^$"
    assert all(can(ROUTING_KEY_PATTERN, k) for k in ("mlp", "mlp.2", "my_model-x.10"))
    assert not any(can(ROUTING_KEY_PATTERN, k) for k in ("mlp.v2", "a.b.c", "#", "mlp.*", ""))


def test_the_service_permissions_cover_its_namespace_only() -> None:
    service = service_permissions("inferq")
    for name in ("inferq.jobs", "inferq.model.mlp.1", "inferq.control", "amq.gen-Xy", "amq_3ff6101d"):
        assert re.search(service.read, name) and re.search(service.configure, name) and re.search(service.write, name)
    assert re.search(service.write, "amq.default") and not re.search(service.read, "amq.default")
    assert not re.search(service.read, "staging.jobs") and not re.search(service.write, "inferqx.jobs")


def test_broker_user_and_vhost_come_from_the_amqp_url() -> None:
    assert broker_user("amqp://svc%2Dx:pw@mq:5672/") == "svc-x"
    assert broker_user("amqp://mq:5672/") is None and broker_user("amqps://mq/?auth=EXTERNAL&cafile=x") is None
    assert broker_vhost("amqp://u:p@mq/") == "/" and broker_vhost("amqp://u:p@mq") == "/"
    assert broker_vhost("amqp://u:p@mq/%2F") == "/" and broker_vhost("amqp://u:p@mq/prod") == "prod"


def test_the_meter_refills_at_the_rate_up_to_the_burst_and_never_backwards() -> None:
    assert refill(None, 100.0, 2.0, 5) == 5.0
    assert refill(MeterRecord(1.0, 100.0), 101.0, 2.0, 5) == 3.0
    assert refill(MeterRecord(1.0, 100.0), 200.0, 2.0, 5) == 5.0
    assert refill(MeterRecord(1.0, 100.0), 90.0, 2.0, 5) == 1.0, "a clock behind the writer's adds nothing"
    assert bucket_size(2.5, 0) == 3 and bucket_size(2.5, 10) == 10 and bucket_size(0.2, 0) == 1


def test_broker_user_records_round_trip_and_refuse_malformed_documents() -> None:
    assert BrokerUserRecord.from_json(ACME.to_json()) == ACME
    assert MeterRecord.from_json(MeterRecord(2.5, 10.0).to_json()) == MeterRecord(2.5, 10.0)
    for bad in ('{"user": "x"}', '{"user": 1, "tenant": "a"}', "[]", "nope"):
        with pytest.raises(CodecError):
            BrokerUserRecord.from_json(bad)


def test_with_auth_off_every_job_keeps_the_tenant_of_its_header() -> None:
    tenancy = Tenancy(False, NS, SERVICE)
    message = delivery("anyone", {TENANT_HEADER: "acme"}, "amq.gen-q")
    verdicts = asyncio.run(tenancy.judge([message]))
    assert verdicts[id(message)].tenant == "acme" and verdicts[id(message)].error is None and verdicts[id(message)].reply


async def test_while_etcd_is_unreachable_an_unseen_users_job_waits_and_inferqs_own_jobs_go_on() -> None:
    from inferq.runtime.coordination import open_etcd
    from inferq.runtime.services import free_port
    from inferq.runtime.tenancy import BrokerUsers, Meter
    from inferq.settings import EtcdSettings

    async with open_etcd(EtcdSettings(port=free_port(), timeout_s=0.5)) as nowhere:  # nothing listens there
        tenancy = Tenancy(True, NS, SERVICE, BrokerUsers(nowhere, "/prod/brokerusers/", 0.5), Meter(nowhere, NS, 0.5))
        tenants_job, own_job = delivery("prod-acme", reply_to="prod.replies.acme.q"), delivery(SERVICE, {TENANT_HEADER: "acme"})
        started = asyncio.get_running_loop().time()
        verdicts = await tenancy.judge([tenants_job, delivery("prod-acme"), own_job])
        assert asyncio.get_running_loop().time() - started < 2, "one timeout for the batch, not one per job"
    assert verdicts[id(tenants_job)].later and not verdicts[id(tenants_job)].reply and verdicts[id(tenants_job)].error is None
    assert verdicts[id(own_job)] == Verdict("acme")
