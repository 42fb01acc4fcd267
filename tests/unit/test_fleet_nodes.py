"""The per-node reader: its pure rules as tables, and the watcher against a fake Consul catalog —
what each kind of write costs (which node is read again) and what is published."""

from __future__ import annotations

import json
import threading
import time

import pytest

from edge.consul.nodes import CRITICAL, NODES, WARNING, NodesWatcher, TooManyNodes, node_path
from edge.consul.nodeview import by_node, changed_services, instances, node_rows, node_rows_raw
from edge.consul.watch import Update
from edge.routing.model import CheckState
from haproxy_consul.consul_api import Answer, ConsulSettings, ConsulUnavailable, parse_address


def svc(sid, name, port, address="", kind="", tags=(), cport="80", peer=""):
    out = {"ID": sid, "Service": name, "Port": port, "Address": address, "Tags": list(tags),
           "Meta": {"container_port": cport} if cport else {}}
    if kind:
        out["Kind"] = kind
    if peer:
        out["PeerName"] = peer
    return out


# --- the pure rules ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, address, ids", [
    ({"Node": {"Node": "n1", "Address": "10.0.0.1"}, "Services": [svc("a", "web", 80)]}, "10.0.0.1", ["a"]),
    ({"Node": {"Node": "n1", "Address": "10.0.0.1"},
      "Services": [svc("p", "web-proxy", 1, kind="connect-proxy"), svc("q", "web", 2, peer="other"), {"ID": 3}]},
     "10.0.0.1", []),
    ({"Node": None, "Services": None}, None, []),                              # the node is gone
    ({"Node": {"Node": "n1", "PeerName": "x"}, "Services": [svc("a", "web", 80)]}, None, []),
    ([], None, []),
])
def test_node_rows(body, address, ids):
    got_address, rows = node_rows(body)
    assert got_address == address and sorted(rows) == ids


@pytest.mark.parametrize("body", [
    {"Node": {"Node": "n1", "Address": "10.0.0.1"}, "Services": [svc("a", "web", 80, tags=("b", "a", "b")),
                                                                svc("p", "x", 1, kind="connect-proxy")]},
    {"Node": {"Node": "n1", "Address": "10.0.0.1"}, "Services": [{**svc("a", "web", 80), "Port": "80"}]},  # odd type
    {"Node": {"Node": "n1", "Address": "10.0.0.1"}, "Services": [{**svc("a", "web", 80), "Meta": {"x": 1}}]},
    {"Node": None, "Services": None},
])
def test_the_typed_decoding_of_a_node_answer_says_what_the_tolerant_one_says(body):
    assert node_rows_raw(json.dumps(body).encode()) == node_rows(body)


def test_changed_services_names_both_sides_of_a_change():
    old = node_rows({"Node": {"Node": "n"}, "Services": [svc("a", "web", 80), svc("b", "api", 81)]})[1]
    new = node_rows({"Node": {"Node": "n"}, "Services": [svc("a", "web", 80, tags=("x",)), svc("c", "db", 82)]})[1]
    assert changed_services(old, new) == {"web", "api", "db"}
    assert changed_services(old, dict(old)) == set()


@pytest.mark.parametrize("checks, healthy", [
    ({}, [True, True]),
    ({("n1", "ttl-a"): CheckState("critical", "a", "web")}, [False, True]),
    ({("n1", "serfHealth"): CheckState("critical", "", "")}, [False, True]),     # the node: all its instances
    ({("n2", "ttl-b"): CheckState("warning", "b", "web")}, [True, False]),
    ({("n2", "ttl-x"): CheckState("critical", "x", "other")}, [True, True]),
])
def test_instances_are_healthy_unless_a_check_of_theirs_or_their_node_fails(checks, healthy):
    placements = [("n1", "10.0.0.1", node_rows({"Node": {"Node": "n1"}, "Services": [svc("a", "web", 8001)]})[1]
                   .values()),
                  ("n2", "10.0.0.2", node_rows({"Node": {"Node": "n2"}, "Services": [
                      svc("b", "web", 8002, address="10.9.9.9")]})[1].values())]
    found, problems = instances("web", placements, by_node(checks))
    assert [i.healthy for i in found] == healthy and not problems
    assert [i.address for i in found] == ["10.0.0.1", "10.9.9.9"]      # the node's address when none of its own


def test_the_service_meta_the_edge_grammar_reads_reaches_the_instances_and_changes_them():
    def rows(meta):
        body = {"Node": {"Node": "n1"}, "Services": [{**svc("a", "web", 8001), "Meta": meta}]}
        assert node_rows_raw(json.dumps(body).encode()) == node_rows(body)
        return node_rows(body)[1]

    routed = rows({"container_port": "80", "edge-route": "www.example.org/api", "owner": "team-a"})
    found, problems = instances("web", [("n1", "10.0.0.1", routed.values())], {})
    assert not problems and found[0].meta == (("edge-route", "www.example.org/api"),)   # only edge- keys kept
    assert found[0].container_port == 80
    assert changed_services(rows({"container_port": "80"}), routed) == {"web"}
    assert changed_services(rows({"container_port": "80", "owner": "b"}), rows({"container_port": "80"})) == set()


# --- the watcher ------------------------------------------------------------------------------------------------
class FakeCatalog:
    """Nodes, their services and non-passing checks, with an index per node as Consul 1.8 keeps them."""

    def __init__(self):
        self.raft = 10
        self.nodes: dict[str, str] = {}
        self.services: dict[str, dict[str, dict]] = {}
        self.node_index: dict[str, int] = {}
        self.checks: dict[tuple[str, str], dict] = {}
        self.nodes_index = self.checks_index = 10
        self.requests: list[str] = []
        self.down = False

    def _bump(self) -> int:
        self.raft += 1
        return self.raft

    def node(self, name, address):
        self.nodes[name] = address
        self.services.setdefault(name, {})
        self.nodes_index = self.node_index[name] = self._bump()

    def drop_node(self, name):
        del self.nodes[name]
        self.services.pop(name)
        self.nodes_index = self.node_index[name] = self._bump()

    def register(self, node, sid, name, port, address=""):
        self.services[node][sid] = svc(sid, name, port, address)
        self.node_index[node] = self._bump()

    def deregister(self, node, sid):
        del self.services[node][sid]
        self.node_index[node] = self._bump()

    def check(self, node, cid, status, sid="", name=""):
        if status == "passing":
            self.checks.pop((node, cid), None)
        else:
            self.checks[(node, cid)] = {"Node": node, "CheckID": cid, "Status": status, "ServiceID": sid,
                                        "ServiceName": name}
        self.checks_index = self._bump()

    def get(self, path, params=(), wait=None, raw=False) -> Answer:
        self.requests.append(path)
        if self.down:
            raise ConsulUnavailable("connection refused")
        if path == NODES:
            body, index = [{"Node": n, "Address": a} for n, a in self.nodes.items()], self.nodes_index
        elif path in (CRITICAL, WARNING):
            status = path.rsplit("/", 1)[1]
            body, index = [c for c in self.checks.values() if c["Status"] == status], self.checks_index
        elif path.startswith("/v1/catalog/node-services/"):
            n = path.rsplit("/", 1)[1]
            body = ({"Node": {"Node": n, "Address": self.nodes[n]}, "Services": list(self.services[n].values())}
                    if n in self.nodes else {"Node": None, "Services": None})
            index = self.node_index.get(n, self.raft)
        else:
            raise AssertionError(f"unexpected read {path}")
        return Answer(json.dumps(body).encode() if raw else body, index)


def make(max_nodes=64):
    catalog = FakeCatalog()
    catalog.node("n1", "10.0.0.1")
    catalog.node("n2", "10.0.0.2")
    catalog.register("n1", "consul", "consul", 8300)
    catalog.register("n1", "web-1", "web", 8001)
    catalog.register("n2", "web-2", "web", 8002)
    catalog.register("n1", "api-1", "api", 9001)
    published = []
    w = NodesWatcher(ConsulSettings(parse_address("127.0.0.1:1")), None, published.append, threading.Event(),
                     max_nodes=max_nodes)
    w.reader.http = catalog
    snapshot, indexes = w.sync()
    published.append(snapshot)
    w.published, w.polled = published, indexes
    catalog.requests.clear()
    return w, catalog


def round_(w):
    """One round, as the long-polls would have posted now: every one whose index moved."""
    c = w.reader.http
    specs = [("nodes", NODES), ("critical", CRITICAL), ("warning", WARNING)] + [
        (f"node:{n}", node_path(n)) for n in c.nodes]
    updates = {}
    for name, path in specs:
        answer = c.get(path, raw=name.startswith("node:"))
        if answer.index != w.polled.get(name, 0):
            value = node_rows_raw(answer.body) if name.startswith("node:") else answer.body
            parse = {"nodes": lambda b: {x["Node"]: x["Address"] for x in b}}.get(name)
            if name in ("critical", "warning"):
                from edge.routing.model import nonpassing_checks
                value = nonpassing_checks(value)
            updates[name] = Update(parse(value) if parse else value, answer.index, seen_at=time.monotonic())
            w.polled[name] = answer.index
    c.requests.clear()
    return w._round(updates)


def ports(w):
    return {n: sorted(i.port for i in insts if i.healthy) for n, insts in w.published[-1].services.items()}


def test_cold_sync_reads_each_node_once():
    w, _ = make()
    assert ports(w) == {"web": [8001, 8002], "api": [9001]}          # consul is never routed


@pytest.mark.parametrize("write, expected", [
    (lambda c: c.register("n2", "api-2", "api", 9002), {"web": [8001, 8002], "api": [9001, 9002]}),
    (lambda c: c.deregister("n1", "api-1"), {"web": [8001, 8002]}),
    (lambda c: c.register("n1", "api-1", "api", 9999), {"web": [8001, 8002], "api": [9999]}),   # in place
    (lambda c: c.check("n1", "ttl-web-1", "critical", "web-1", "web"), {"web": [8002], "api": [9001]}),
    (lambda c: c.check("n2", "serfHealth", "critical"), {"web": [8001], "api": [9001]}),
    (lambda c: c.drop_node("n2"), {"web": [8001], "api": [9001]}),
])
def test_each_write_is_attributed_without_a_sweep(write, expected):
    w, catalog = make()
    write(catalog)
    assert round_(w)
    assert ports(w) == expected
    assert w.stats.dumps == 1, "no full read"


def test_a_registration_rebuilds_only_the_services_its_node_answer_changed():
    w, catalog = make()
    before = w.published[-1]
    rebuilt = []
    real = w._rebuild
    w._rebuild = lambda names: rebuilt.append(sorted(names)) or real(names)
    catalog.register("n2", "db-1", "db", 5432)
    round_(w)
    assert rebuilt == [["db"]]
    assert w.published[-1].services["web"] is before.services["web"], "an unchanged service keeps its tuple"


def test_a_check_moving_from_warning_to_critical_stays_failing():
    w, catalog = make()
    catalog.check("n1", "ttl-web-1", "warning", "web-1", "web")
    round_(w)
    catalog.check("n1", "ttl-web-1", "critical", "web-1", "web")
    round_(w)
    assert ports(w)["web"] == [8002]
    catalog.check("n1", "ttl-web-1", "passing", "web-1", "web")
    round_(w)
    assert ports(w)["web"] == [8001, 8002]


def test_a_new_node_gets_its_long_poll():
    w, catalog = make()
    started = []
    w._poll = lambda name, path, parse, raw, index: started.append((name, index))
    catalog.node("n3", "10.0.0.3")
    round_(w)
    assert started == [("node:n3", 0)]


def test_a_node_address_change_moves_instances_without_their_own():
    w, catalog = make()
    catalog.nodes["n2"] = "10.0.0.9"
    catalog.nodes_index = catalog._bump()
    round_(w)
    assert sorted(i.address for i in w.published[-1].services["web"]) == ["10.0.0.1", "10.0.0.9"]


def test_too_many_nodes_hands_over_to_the_summary():
    with pytest.raises(TooManyNodes):
        make(max_nodes=1)
    w, catalog = make(max_nodes=2)
    catalog.node("n3", "10.0.0.3")
    with pytest.raises(TooManyNodes):
        round_(w)


def test_an_outage_publishes_nothing_and_an_index_reset_asks_for_a_full_sync():
    w, catalog = make()
    catalog.down = True
    with pytest.raises(ConsulUnavailable):
        w.sync()
    assert len(w.published) == 1
    assert w._round({"nodes": Update({}, 3, reset=True)}) is False


def test_long_polls_are_the_nodes_plus_three_and_stop_with_the_reader():
    w, catalog = make()
    stop_after = threading.Event()
    w.stop = stop_after
    thread = threading.Thread(target=w.run)
    catalog.get = lambda path, params=(), wait=None, raw=False: FakeCatalog.get(catalog, path, params, wait, raw) \
        if not params or "index" not in dict(params) else (time.sleep(0.05) or FakeCatalog.get(
            catalog, path, (), wait, raw))
    thread.start()
    time.sleep(0.5)
    assert sorted(w._pollers) == ["critical", "node:n1", "node:n2", "nodes", "warning"]
    stop_after.set()
    w.wake()
    thread.join(5)
    assert not thread.is_alive()
