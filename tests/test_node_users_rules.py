"""The rules of edge nodes' own broker users, without processes: their names, their URLs, and whose jobs they publish."""

from __future__ import annotations

import pytest

from inferq.broker.handback import copy_of
from inferq.broker.identity import PUBLISHER_HEADER, Publisher, ServiceUsers, is_node_user, node_user_name, publisher_of
from inferq.broker.messages import TENANT_HEADER
from inferq.errors import ConfigError
from inferq.edge.node_users import with_credentials
from inferq.runtime.jointoken import AgentConfig, AgentRecord
from inferq.runtime.tenancy import Tenancy
from inferq.settings import BrokerSettings, Settings, TenancySettings
from tests.test_tenancy_rules import NS, SERVICE, delivery, redelivered_copy

NODE = node_user_name(NS, "jetson-orin.1")


def test_a_node_user_is_namespaced_and_never_reads_as_a_tenant_user_or_another_namespaces_node() -> None:
    assert NODE == "prod.node.jetson-orin.1" and is_node_user(NS, NODE)
    assert not is_node_user(NS, "prod-node-x"), "a tenant user <ns>-<tenant> (no dot) is never a node's"
    assert not is_node_user(NS, "prodx.node.a") and not is_node_user("prodx", NODE)
    assert not is_node_user(NS, "prod.node.") and not is_node_user(NS, "prod.node.-x") and not is_node_user(NS, None)


def test_inferqs_own_users_are_the_named_ones_and_the_node_users_of_the_namespace() -> None:
    service = ServiceUsers.of((SERVICE, "", None), NS)
    assert SERVICE in service and NODE in service and "" not in service and None not in service
    assert "prod-acme" not in service and node_user_name("other", "n1") not in service
    assert ServiceUsers.of(SERVICE).names == {SERVICE} and NODE not in ServiceUsers.of(SERVICE), "no namespace: no nodes"


def test_a_job_a_node_hands_back_is_judged_as_the_original_publishers() -> None:
    service = ServiceUsers.of(SERVICE, NS)
    edge_job = delivery(SERVICE, {TENANT_HEADER: "acme"})
    by_node = redelivered_copy(copy_of(edge_job, {}, None, NODE))  # the node's copy names the edge's user as publisher
    assert by_node.user_id == NODE and by_node.headers[PUBLISHER_HEADER] == SERVICE
    assert publisher_of(by_node, service) == Publisher(NODE, service=True, tenant="acme"), "still inferq's own job"
    tenant_job = redelivered_copy(copy_of(delivery("prod-acme", {TENANT_HEADER: "evil"}), {}, None, NODE))
    assert publisher_of(tenant_job, service) == Publisher("prod-acme", copy=True, tenant="evil")
    again = redelivered_copy(copy_of(by_node, {}, None, SERVICE))  # handed back once more, by a cluster worker
    assert publisher_of(again, service) == Publisher(SERVICE, service=True, tenant="acme")
    assert publisher_of(delivery(NODE, {PUBLISHER_HEADER: ""}), service) == Publisher(None, copy=True)


async def test_a_nodes_tenancy_trusts_the_clusters_service_user_it_was_told_of() -> None:
    settings = Settings(namespace=NS, broker=BrokerSettings(url=f"amqp://{NODE}:pw@rabbit/"),
                        tenancy=TenancySettings(service_user=SERVICE))
    tenancy = await Tenancy.open(settings, None)  # auth off: no etcd is read
    assert SERVICE in tenancy.service_user and NODE in tenancy.service_user
    assert (await tenancy.identify(delivery(SERVICE, {TENANT_HEADER: "acme"}))).tenant == "acme"
    assert node_user_name(NS, "another") in tenancy.service_user and "prod-acme" not in tenancy.service_user


def test_node_credentials_replace_those_of_every_broker_url_and_keep_host_vhost_and_query() -> None:
    assert (with_credentials("amqps://svc:secret@rabbit-1:5671/prod%2Fvh?heartbeat=30", NODE, "p/w:@")
            == "amqps://prod.node.jetson-orin.1:p%2Fw%3A%40@rabbit-1:5671/prod%2Fvh?heartbeat=30")
    assert with_credentials("amqp://[::1]/", "u", "p") == "amqp://u:p@[::1]/"


def test_the_join_answer_tells_the_node_its_broker_user_and_the_clusters_service_user() -> None:
    answer = AgentConfig("n1", NS, ("amqp://prod.node.n1:pw@h/",), ("h:2379",), "http://edge", "iq_x",
                         broker_user="prod.node.n1", service_user=SERVICE, warnings=("w",))
    again = AgentConfig.from_json(answer.to_json())
    assert again == answer and again.settings_doc()["tenancy"] == {"service_user": SERVICE}
    old = AgentConfig.from_json('{"node": "n1", "namespace": "prod", "broker_urls": ["amqp://h/"], '
                                '"etcd_endpoints": [], "artifacts_url": "", "api_key": "k"}')
    assert (old.broker_user, old.service_user, old.warnings) == ("", "", ()), "an older edge's answer still reads"
    assert AgentRecord.from_json('{"node": "n1", "key_sha256": "ab", "joined_at": 1}').broker_user == ""


def test_node_users_is_auto_require_or_off() -> None:
    assert TenancySettings().node_users == "auto"
    with pytest.raises(ConfigError, match="auto, require or off"):
        TenancySettings(node_users="yes")
