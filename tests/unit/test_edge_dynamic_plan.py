"""A new vhost gets its own backend live on HAProxy 3.4 (edge.routing.dynamic + the plan), a removed
one's backend is deleted; 2.6–3.3 keep the spare backends. Sequences of changes are played on a
model of HAProxy (backends, published or not, servers, host maps): after every live step it
routes exactly as the files rendered for the new table say, and no map entry ever points at a
backend that is missing, unpublished or has no ready server while the route has instances."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edge.routing.dynamic import forget, kept_backends, loaded, mark
from edge.routing.maps import SPARES_MAP, host_maps
from edge.routing.plan import make_plan, reconcile, runtime_part
from edge.routing.render import Listeners
from edge.routing.spares import SparePool, assign, release, retire
from tests.unit.test_edge_growth_plan import RELEASES, build, declared, inst, routing, run, served

DOMAINS = ("t.example",)
POOL = SparePool(4, 4)
LISTENERS = Listeners(":80", "127.0.0.1:8404", "/run/haproxy-consul/haproxy.sock", DOMAINS, spares=POOL)
V34 = replace(RELEASES["3.4"], commands=RELEASES["3.4"].commands | {"del backend", "unpublish backend"},
              wait_conditions=frozenset({"srv-removable", "be-removable"}))


class HAProxyModel:
    """Backends (servers, published) and host maps, as HAProxy applies the runtime commands."""

    def __init__(self, table, referenced=()):
        self.servers = declared(table, LISTENERS)
        self.published = set(self.servers)
        self.maps = host_maps(table, DOMAINS)
        self.referenced = set(referenced)     # backends the loaded configuration names (landing page)
        self.attached: set[str] = set()       # servers a client's connection is still attached to

    def apply(self, commands):
        """Every command in order; False at the first one HAProxy refuses (the rest not sent)."""
        for command in commands:
            words = command.split()
            if words[:2] == ["add", "backend"]:
                assert words[2] not in self.servers and words[3:] == ["from", "routes"], command
                self.servers[words[2]] = {}
            elif words[1:2] == ["backend"] and words[0] in ("publish", "unpublish"):
                (self.published.add if words[0] == "publish" else self.published.discard)(words[2])
            elif words[:1] == ["wait"]:
                backend = words[3].split("/")[0]
                if backend in self.referenced or words[3] in self.attached:
                    return False
                if words[2] == "be-removable" and self.servers[backend] and words[1] != "1ms":
                    return False
            elif words[:2] == ["del", "server"]:
                backend, name = words[2].split("/")
                assert not self.servers[backend][name][2], f"{command}: server not in maintenance"
                del self.servers[backend][name]
            elif words[:2] == ["del", "backend"]:
                assert words[2] not in self.published and not self.servers[words[2]], command
                del self.servers[words[2]]
            elif words[1:2] == ["map"]:
                entries = self.maps[words[2]]
                if words[0] == "del":
                    entries.pop(words[3])
                else:
                    entries[words[3]] = words[4]
                self.check_maps()
            else:
                self.servers = run(self.servers, [command])
        return True

    def check_maps(self):
        for name, entries in self.maps.items():
            if name == SPARES_MAP:      # spare → the route it serves: names for pages, not routing
                continue
            for backend in entries.values():
                assert backend in self.servers and backend in self.published, f"a map entry points at {backend}"


def step(live, instances, caps, haproxy):
    """The control loop's step: spares or dynamic backends, the plan, the commands, the deletions."""
    desired = build(*instances, previous=live)
    desired = assign(live, mark(live, retire(live, desired, POOL), caps, POOL), POOL)
    plan = make_plan(live, desired, DOMAINS, POOL, caps)
    if plan.reload:
        return release(desired), plan
    assert haproxy.apply(plan.commands)
    for name, commands in plan.deletions:
        if haproxy.apply(commands):
            desired = forget(desired, name)
    assert routing(haproxy.servers) == routing(declared(desired, LISTENERS)), plan
    assert haproxy.maps == host_maps(desired, DOMAINS)
    assert reconcile(desired, served(haproxy.servers), POOL).empty
    return desired, plan


A, B, C = inst("a", "web"), inst("b", "api", port=9000), inst("c", "api", port=9001)


def test_a_new_vhost_gets_its_own_backend_filled_and_published_before_its_map_entry():
    live = build(A)
    haproxy = HAProxyModel(live)
    desired, plan = step(live, (A, B), V34, haproxy)
    assert not plan.reload and desired.get("api-80").dynamic and desired.get("api-80").backend == "be_api-80"
    assert list(plan.commands) == [
        "add backend be_api-80 from routes",
        *(f"add server be_api-80/s{i} 0.0.0.0:0" for i in (1, 2, 3, 4)),
        "set server be_api-80/s1 addr 10.0.0.1 port 9000",
        "set server be_api-80/s1 state ready",
        "publish backend be_api-80",
        "add map hosts.map api-80.t.example be_api-80",
    ]
    assert plan.deletions == ()
    assert "be_spare" not in " ".join(plan.commands)


def test_a_removed_vhost_leaves_the_maps_then_its_backend_is_deleted():
    live = build(A)
    haproxy = HAProxyModel(live)
    live, _ = step(live, (A, B, C), V34, haproxy)
    desired, plan = step(live, (A,), V34, haproxy)
    assert list(plan.commands) == ["del map hosts.map api-80.t.example", "set server be_api-80/s1 state maint",
                                   "set server be_api-80/s2 state maint"]
    ((name, commands),) = plan.deletions
    assert name == "api-80" and list(commands) == [
        "unpublish backend be_api-80", "wait 1ms be-removable be_api-80",
        *(f"wait 500ms srv-removable be_api-80/s{i}" for i in (1, 2, 3, 4)),
        *(f"del server be_api-80/s{i}" for i in (1, 2, 3, 4)),
        "wait 500ms be-removable be_api-80", "del backend be_api-80"]
    assert desired.get("api-80") is None and "be_api-80" not in haproxy.servers


def test_a_backend_the_configuration_names_is_kept_retired_and_filled_again_when_its_route_returns():
    live = build(A)
    haproxy = HAProxyModel(live)
    live, _ = step(live, (A, B), V34, haproxy)
    haproxy.referenced.add("be_api-80")           # HAProxy reloaded from the files behind the edge's back
    gone, plan = step(live, (A,), V34, haproxy)
    assert gone.get("api-80").retired and "be_api-80" in haproxy.servers and "be_api-80" not in haproxy.published
    back, plan = step(gone, (A, B), V34, haproxy)
    assert "publish backend be_api-80" in plan.commands and not back.get("api-80").retired
    assert plan.commands.index("publish backend be_api-80") < plan.commands.index(
        "add map hosts.map api-80.t.example be_api-80")


def test_a_server_a_client_still_holds_keeps_the_backend_whole_until_a_later_try():
    live = build(A)
    haproxy = HAProxyModel(live)
    live, _ = step(live, (A, B, C), V34, haproxy)
    haproxy.attached.add("be_api-80/s2")
    gone, _ = step(live, (A,), V34, haproxy)          # nothing deleted: HAProxy still as the files say
    assert gone.get("api-80").retired and len(haproxy.servers["be_api-80"]) == 4
    haproxy.attached.clear()
    ((name, commands),) = kept_backends(gone, V34)
    assert name == "api-80" and haproxy.apply(commands) and "be_api-80" not in haproxy.servers
    assert routing(haproxy.servers) == routing(declared(forget(gone, name), LISTENERS))


@pytest.mark.parametrize("sequence", [
    # new, grown past its slots, shrunk, removed, back again
    [(A,), (A, B), (A, B, C, *(inst(s, "api", port=9002 + i) for i, s in enumerate("def"))), (A, B), (A,), (A, C)],
    # several new and removed in one change, beside a route on its own backend that leaves too
    [(A,), (A, B, inst("x", "cdn", port=9100)), (B,), (B, A)],
    # registered with its check critical, then passing
    [(A,), (A, replace(B, healthy=False)), (A, B), (A,)],
])
def test_every_live_step_leaves_haproxy_as_the_files_say(sequence):
    live = build(*sequence[0])
    haproxy = HAProxyModel(live)
    for instances in sequence[1:]:
        live, plan = step(live, instances, V34, haproxy)
        assert not plan.reload, plan.reasons


@pytest.mark.parametrize("release", ["2.6", "3.0", "3.2"])
def test_before_3_4_a_new_vhost_takes_a_spare(release):
    live = build(A)
    desired, plan = step(live, (A, B), RELEASES[release], HAProxyModel(live))
    assert desired.get("api-80").backend == "be_spare_1" and not desired.get("api-80").dynamic
    assert not any(c.startswith("add backend") for c in plan.commands)


@pytest.mark.parametrize("tags", [("edge.sticky=SID",), ("edge.tcp=7000",), ("edge.timeout-server=5s",)])
def test_a_new_vhost_whose_backend_has_its_own_lines_is_a_reload(tags):
    live = build(A)
    _, plan = step(live, (A, replace(B, tags=tags)), V34, HAProxyModel(live))
    assert plan.reasons[0] == "vhost added: api-80", plan.reasons


def test_with_no_live_vhost_changes_a_new_vhost_is_a_reload_on_3_4_too():
    live = build(A)
    desired = build(A, B, previous=live)
    assert mark(live, desired, V34, SparePool(0)) is desired
    assert make_plan(live, desired, DOMAINS, SparePool(0), V34).reasons == ("vhost added: api-80",)


def test_while_a_reload_waits_a_route_keeps_the_backend_added_live():
    live = build(A)
    live, _ = step(live, (A, B), V34, HAProxyModel(live))
    wanted = release(build(A, C, inst("z", "zz"), previous=live))     # a reload pending: flags cleared
    partial = runtime_part(live, wanted)
    assert partial.get("api-80").dynamic and partial.get("zz-80") is None


def test_a_reload_or_a_restart_loads_every_backend_from_the_files():
    live = build(A)
    desired, _ = step(live, (A, B), V34, HAProxyModel(live))
    assert not release(desired).get("api-80").dynamic and not loaded(desired).get("api-80").dynamic
    assert loaded(live) is live
