"""Naming rules and the conversion of raw Consul JSON into instances (table-driven)."""

import pytest

from edge.routing.model import (
    container_port,
    instances_from_health,
    instances_from_node_dump,
    routable_service,
    route_name,
    summaries_from_ui,
    valid_address,
    valid_host,
)


@pytest.mark.parametrize("service_id, meta, port, expected", [
    ("web-1", {"container_port": "80"}, 32768, 80),             # our registrator's meta wins
    ("t2.harbur.io:silly_wright:6379", {}, 32769, 6379),        # gliderlabs ID host:container:port
    ("t2:silly:6379", {"container_port": "8080"}, 1, 8080),     # meta over ID
    ("web-1", {}, 8080, 8080),                                  # registered port as last resort
    ("a:b:notaport", {}, 9000, 9000),
    ("a:b:70000", {}, 9000, 9000),                              # out of range ignored
    ("a:b:0", {}, 9000, 9000),
    ("x", {"container_port": "garbage"}, 81, 81),
    ("x", {"container_port": "99999"}, 81, 81),
    ("a:b:6379:udp", {}, 5353, 5353),                           # last field not numeric
])
def test_container_port(service_id, meta, port, expected):
    assert container_port(service_id, meta, port) == expected


@pytest.mark.parametrize("service, port, expected", [
    ("nginx", 80, "nginx-80"),
    ("nginx-80", 80, "nginx-80"),          # registrator's multi-port names are not suffixed twice
    ("nginx-443", 80, "nginx-443-80"),
    ("Nginx", 80, "nginx-80"),             # hosts are case-insensitive
    ("my_app", 8080, "my_app-8080"),
    ("has space", 80, None),
    ("new\nline", 80, None),
    ('quote"d', 80, None),
    ("hash#tag", 80, None),
    ("dotted.name", 80, None),             # would be two labels
    ("ünïcode", 80, None),
    ("-leading", 80, None),
    ("a" * 60, 80, "a" * 60 + "-80"),      # 63 characters: the longest label
    ("a" * 61, 80, None),                  # 64: too long for a label
    ("", 80, None),
])
def test_route_name(service, port, expected):
    assert route_name(service, port) == expected


@pytest.mark.parametrize("name, ok", [
    ("nginx", True), ("consul", False), ("Consul", False), ("x y", False), ("a" * 300, False), ("a_b-c", True),
])
def test_routable_service(name, ok):
    assert routable_service(name) is ok


@pytest.mark.parametrize("value, expected", [
    ("10.0.0.1", "10.0.0.1"), ("::1", "::1"), ("0.0.0.0", None), ("::", None), ("224.0.0.1", None),
    ("example.com", None), ("1.2.3.4\nserver evil", None), ("", None), (None, None), (5, None),
])
def test_valid_address(value, expected):
    assert valid_address(value) == expected


@pytest.mark.parametrize("value, expected", [
    ("WWW.Example.org", "www.example.org"), ("www.example.org.", "www.example.org"), ("a b.org", None),
    ("x.org\nbackend evil", None), ("host:80", None), ("", None), ("a" * 64 + ".org", None),
    ("_srv.x.org", "_srv.x.org"),
])
def test_valid_host(value, expected):
    assert valid_host(value) == expected


def entry(sid="web-1", port=8080, address="10.0.0.5", node="n1", node_addr="10.0.0.1", checks=("passing",),
          tags=(), meta=None):
    return {
        "Node": {"Node": node, "Address": node_addr},
        "Service": {"ID": sid, "Service": "web", "Address": address, "Port": port, "Tags": list(tags),
                    "Meta": meta or {}},
        "Checks": [{"Status": s} for s in checks],
    }


@pytest.mark.parametrize("raw, healthy, address, problem", [
    (entry(), True, "10.0.0.5", None),
    (entry(address=""), True, "10.0.0.1", None),                        # node address when empty
    (entry(checks=("passing", "warning")), False, "10.0.0.5", None),      # warning is not passing
    (entry(checks=("passing", "critical")), False, "10.0.0.5", None),     # e.g. node or maintenance check
    (entry(checks=()), True, "10.0.0.5", None),                           # no checks: healthy
    (entry(port=0), None, None, "port 0"),
    (entry(port=70000), None, None, "port 70000"),
    (entry(port="80"), True, "10.0.0.5", None),
    (entry(address="evil\nserver x 1.2.3.4:80"), None, None, "address"),
    ({"Node": "x", "Service": None}, None, None, "malformed"),
])
def test_instances_from_health(raw, healthy, address, problem):
    instances, problems = instances_from_health("web", [raw])
    if problem is None:
        assert problems == ()
        assert [(i.healthy, i.address) for i in instances] == [(healthy, address)]
    else:
        assert instances == ()
        assert problem in problems[0].reason or problem in str(problems[0])


def test_unroutable_name_and_port_combination_is_skipped_and_reported():
    raw = entry(port=8080)
    instances, problems = instances_from_health("a" * 60, [raw])
    assert instances == ()
    assert "route name for port 8080" in problems[0].reason


def test_node_dump_gives_what_the_health_endpoint_gives():
    nodes = [{
        "Node": "n1", "Address": "10.0.0.1",
        "Services": [{"ID": "w1", "Service": "web", "Address": "", "Port": 81, "Tags": ["t"],
                      "Meta": {"container_port": "80"}},
                     {"ID": "p", "Service": "web-proxy", "Kind": "connect-proxy", "Port": 1},
                     "junk"],
        "Checks": [{"CheckID": "serfHealth", "ServiceID": "", "Status": "passing"},
                   {"CheckID": "c1", "ServiceID": "w1", "Status": "critical"},
                   {"CheckID": "c2", "ServiceID": "other", "Status": "passing"}],
    }, "junk"]
    grouped = instances_from_node_dump(nodes)
    assert list(grouped) == ["web"]
    from_dump, _ = instances_from_health("web", grouped["web"])
    from_health, _ = instances_from_health("web", [{
        "Node": {"Node": "n1", "Address": "10.0.0.1"},
        "Service": {"ID": "w1", "Service": "web", "Address": "", "Port": 81, "Tags": ["t"],
                    "Meta": {"container_port": "80"}},
        "Checks": [{"Status": "passing"}, {"Status": "critical"}],
    }])
    assert from_dump == from_health
    assert from_dump[0].healthy is False and from_dump[0].address == "10.0.0.1"


def test_instances_are_sorted_with_sorted_tags():
    raws = [entry(sid="b", tags=("z", "a", "a")), entry(sid="a")]
    instances, _ = instances_from_health("web", raws)
    assert [i.service_id for i in instances] == ["a", "b"]
    assert instances[1].tags == ("a", "z")


def test_garbage_health_response_gives_nothing():
    assert instances_from_health("web", {"not": "a list"}) == ((), ())


def test_summaries_ignore_garbage_rows_and_gateways():
    rows = [
        {"Name": "web", "Tags": ["b", "a"], "Nodes": ["n2", "n1"], "InstanceCount": 2, "ChecksPassing": 3,
         "ChecksWarning": 0, "ChecksCritical": True},
        {"Name": "gw", "Kind": "mesh-gateway"},
        {"Name": 5},
        "junk",
    ]
    summaries = summaries_from_ui(rows)
    assert list(summaries) == ["web"]
    web = summaries["web"]
    assert (web.tags, web.nodes, web.instances, web.passing, web.critical) == (("a", "b"), ("n1", "n2"), 2, 3, 0)


def test_instances_keep_the_edge_meta_keys_only():
    meta = {"container_port": "80", "edge-route-api": "/api strip", "edge-host": "a.org", "version": "2", "edge-x": 1}
    (instance,), _ = instances_from_health("web", [entry(meta=meta)])
    assert instance.meta == (("edge-host", "a.org"), ("edge-route-api", "/api strip"))
