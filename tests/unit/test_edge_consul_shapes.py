"""Parsing of Consul's answers as the versions the edge meets shape them.

The 1.8 fixtures are recorded from Consul 1.8.7 (Debian's `consul`, the one the integration tests
run). The 1.9, 1.14 and 1.17 ones are built from the fields Consul's source defines for those
versions (agent/ui_endpoint.go `ServiceSummary` / `ServiceListingSummary`, agent/structs
`NodeDump`, `CheckServiceNode`, `HealthCheck`) and its API documentation: in 1.9 `ProxyFor` became
`ConnectedWithProxy` and empty lists became null; from 1.13/1.14 cluster peering adds one summary
row per peer (`PeerName`) and the node dump carries the peers' nodes; 1.17 de-duplicates `Nodes`.
Entries with a `PeerName` are a peer's, never a local service.
"""

from __future__ import annotations

import json

import pytest

from edge.routing.model import (
    ShapeError,
    instances_from_health,
    instances_from_node_dump,
    nonpassing_checks,
    services_from_catalog,
    summaries_from_ui,
    summaries_from_ui_raw,
)

# --- /v1/internal/ui/services -------------------------------------------------------------------
UI_SERVICES_1_8 = [   # recorded, Consul 1.8.7: Nodes once per instance, Tags null when empty
    {"Name": "consul", "Tags": None, "Nodes": ["exp"], "InstanceCount": 1, "ChecksPassing": 1, "ChecksWarning": 0,
     "ChecksCritical": 0, "ExternalSources": None, "GatewayConfig": {}},
    {"Name": "web", "Tags": ["v1"], "Nodes": ["n1", "n1", "n2"], "InstanceCount": 3, "ChecksPassing": 5,
     "ChecksWarning": 0, "ChecksCritical": 1, "ExternalSources": None, "GatewayConfig": {}},
    {"Kind": "connect-proxy", "Name": "web-sidecar-proxy", "Tags": None, "Nodes": ["n1"], "InstanceCount": 1,
     "ProxyFor": ["web"], "ChecksPassing": 1, "ChecksWarning": 0, "ChecksCritical": 0, "ExternalSources": None,
     "GatewayConfig": {}},
]
UI_SERVICES_1_9 = [   # ServiceListingSummary: Datacenter, ConnectedWithProxy/Gateway
    {"Name": "consul", "Datacenter": "dc1", "Tags": None, "Nodes": ["s1"], "ExternalSources": None,
     "InstanceCount": 1, "ChecksPassing": 1, "ChecksWarning": 0, "ChecksCritical": 0, "GatewayConfig": {},
     "ConnectedWithProxy": False, "ConnectedWithGateway": False},
    {"Name": "web", "Datacenter": "dc1", "Tags": ["v1"], "Nodes": ["n1", "n1", "n2"], "ExternalSources": None,
     "InstanceCount": 3, "ChecksPassing": 5, "ChecksWarning": 0, "ChecksCritical": 1, "GatewayConfig": {},
     "ConnectedWithProxy": True, "ConnectedWithGateway": False},
]
UI_SERVICES_1_14 = [  # peering: the same Name once per peer, told apart by PeerName
    {"Name": "web", "Datacenter": "dc1", "Tags": ["v1"], "Nodes": ["n1", "n1", "n2"], "ExternalSources": None,
     "InstanceCount": 3, "ChecksPassing": 5, "ChecksWarning": 0, "ChecksCritical": 1, "GatewayConfig": {},
     "TransparentProxy": False, "ConnectNative": False, "ConnectedWithProxy": False, "ConnectedWithGateway": False},
    {"Name": "web", "Datacenter": "dc2", "Tags": None, "Nodes": ["far-1"], "ExternalSources": None,
     "InstanceCount": 7, "ChecksPassing": 7, "ChecksWarning": 0, "ChecksCritical": 0, "GatewayConfig": {},
     "TransparentProxy": False, "ConnectNative": False, "PeerName": "dc2-peer", "ConnectedWithProxy": False,
     "ConnectedWithGateway": False},
    {"Name": "billing", "Datacenter": "dc2", "Tags": None, "Nodes": ["far-2"], "ExternalSources": None,
     "InstanceCount": 1, "ChecksPassing": 1, "ChecksWarning": 0, "ChecksCritical": 0, "GatewayConfig": {},
     "PeerName": "dc2-peer", "ConnectedWithProxy": False, "ConnectedWithGateway": False},
]
UI_SERVICES_1_17 = [  # Nodes de-duplicated
    {"Name": "web", "Datacenter": "dc1", "Tags": ["v1"], "Nodes": ["n1", "n2"], "ExternalSources": None,
     "InstanceCount": 3, "ChecksPassing": 5, "ChecksWarning": 0, "ChecksCritical": 1, "GatewayConfig": {},
     "TransparentProxy": False, "ConnectNative": False, "ConnectedWithProxy": False, "ConnectedWithGateway": False},
    {"Name": "web", "Datacenter": "dc2", "Tags": None, "Nodes": ["far-1"], "ExternalSources": None,
     "InstanceCount": 7, "ChecksPassing": 7, "ChecksWarning": 0, "ChecksCritical": 0, "GatewayConfig": {},
     "PeerName": "dc2-peer", "ConnectedWithProxy": False, "ConnectedWithGateway": False},
]


@pytest.mark.parametrize("version, rows", [
    ("1.8", UI_SERVICES_1_8), ("1.9", UI_SERVICES_1_9), ("1.14", UI_SERVICES_1_14), ("1.17", UI_SERVICES_1_17),
])
def test_ui_summary_of_the_local_web_is_the_same_in_every_version(version, rows):
    web = summaries_from_ui(rows)["web"]
    assert (web.tags, web.nodes, web.instances, web.passing, web.critical) == (("v1",), ("n1", "n2"), 3, 5, 1)
    assert "billing" not in summaries_from_ui(rows), "a peer's service is not local"
    assert "web-sidecar-proxy" not in summaries_from_ui(rows)


def test_a_peer_row_never_replaces_the_local_one_whatever_the_order():
    assert summaries_from_ui(list(reversed(UI_SERVICES_1_14)))["web"].instances == 3


# --- /v1/internal/ui/nodes ----------------------------------------------------------------------
def node(name, address, services, checks, **extra):
    return {"ID": f"id-{name}", "Node": name, "Address": address, "Datacenter": "dc1",
            "TaggedAddresses": {"lan": address, "wan": address}, "Meta": {"consul-network-segment": ""},
            "Services": services, "Checks": checks, **extra}


WEB_1 = {"ID": "web-1", "Service": "web", "Tags": ["v1"], "Address": "", "Meta": {"container_port": "80"},
         "Port": 8080, "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False,
         "Proxy": {"MeshGateway": {}, "Expose": {}}, "Connect": {}, "CreateIndex": 13, "ModifyIndex": 15}
SERF = {"Node": "n1", "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing", "Notes": "",
        "Output": "Agent alive and reachable", "ServiceID": "", "ServiceName": "", "ServiceTags": None, "Type": "",
        "Definition": {}, "CreateIndex": 10, "ModifyIndex": 10}
UI_NODES_1_8 = [node("n1", "10.0.0.1", [WEB_1], [SERF])]          # recorded shape, Consul 1.8.7
UI_NODES_1_14 = UI_NODES_1_8 + [                                  # the dump includes the peers' nodes
    node("far-1", "192.0.2.7", [{**WEB_1, "ID": "web-far", "Port": 9999, "PeerName": "dc2-peer"}],
         [{**SERF, "Node": "far-1", "PeerName": "dc2-peer"}], PeerName="dc2-peer"),
]


@pytest.mark.parametrize("version, dump", [("1.8", UI_NODES_1_8), ("1.14", UI_NODES_1_14), ("1.17", UI_NODES_1_14)])
def test_node_dump_never_mixes_in_a_peers_instances(version, dump):
    instances, _ = instances_from_health("web", instances_from_node_dump(dump)["web"])
    assert [(i.node, i.address, i.port) for i in instances] == [("n1", "10.0.0.1", 8080)]


# --- /v1/health/service/<name> --------------------------------------------------------------------
HEALTH_1_8 = [{"Node": {"ID": "id-n1", "Node": "n1", "Address": "10.0.0.1", "Datacenter": "dc1",
                        "TaggedAddresses": {"lan": "10.0.0.1"}, "Meta": {}, "CreateIndex": 10, "ModifyIndex": 12},
               "Service": WEB_1, "Checks": [SERF]}]
HEALTH_1_14 = HEALTH_1_8 + [   # with ?peer=..., or through a proxy that merged answers: all tagged
    {"Node": {**HEALTH_1_8[0]["Node"], "Node": "far-1", "PeerName": "dc2-peer"},
     "Service": {**WEB_1, "ID": "web-far", "PeerName": "dc2-peer"}, "Checks": [{**SERF, "PeerName": "dc2-peer"}]}]
HEALTH_1_17 = [{**e, "Service": {**e["Service"], "Locality": None}} for e in HEALTH_1_14]


@pytest.mark.parametrize("version, entries", [("1.8", HEALTH_1_8), ("1.14", HEALTH_1_14), ("1.17", HEALTH_1_17)])
def test_health_entries_of_a_peer_are_skipped(version, entries):
    instances, problems = instances_from_health("web", entries)
    assert [i.service_id for i in instances] == ["web-1"] and problems == ()


# --- documented endpoints (the public watch) --------------------------------------------------------
def test_catalog_services_1_8_names_and_tags():
    summaries = services_from_catalog({"consul": [], "web": ["v2", "v1", "v1"], "db": None})
    assert sorted(summaries) == ["consul", "db", "web"] and summaries["web"].tags == ("v1", "v2")


def test_nonpassing_checks_skip_peers_and_keep_status_only():
    body = [{**SERF, "CheckID": "c1", "Status": "critical", "ServiceID": "web-1", "ServiceName": "web",
             "Output": "boom"},
            {**SERF, "Node": "far-1", "Status": "critical", "PeerName": "dc2-peer"}]
    checks = nonpassing_checks(body)
    assert list(checks) == [("n1", "c1")] and checks[("n1", "c1")].status == "critical"


@pytest.mark.parametrize("version, rows", [
    ("1.8", UI_SERVICES_1_8), ("1.9", UI_SERVICES_1_9), ("1.14", UI_SERVICES_1_14), ("1.17", UI_SERVICES_1_17),
])
def test_the_fast_decoder_sees_what_the_tolerant_one_sees(version, rows):
    fast = summaries_from_ui_raw(json.dumps(rows).encode())
    assert set(fast) == set(summaries_from_ui(rows))
    assert (fast["web"].instances, fast["web"].passing, fast["web"].critical) == (3, 5, 1)


@pytest.mark.parametrize("raw, expected", [
    (b'[{"Name": "web", "InstanceCount": 1, "Nodes": ["n1"]}, "junk", {"Name": 5}]', ["web"]),  # tolerant path
    (b'[{"Name": "web", "InstanceCount": true, "Nodes": ["n1"]}]', ["web"]),
])
def test_garbage_rows_take_the_tolerant_path(raw, expected):
    assert list(summaries_from_ui_raw(raw)) == expected


@pytest.mark.parametrize("raw", [b'{"Services": []}', b'[{"Name": "web", "Instances": 2}]', b"not json"])
def test_an_unknown_shape_is_a_shape_error(raw):
    with pytest.raises(ShapeError):
        summaries_from_ui_raw(raw)
