"""A full backend grows live (edge.routing.growth + the plan): `add server` for each new slot, in
every backend of the route, as the configuration renders it; then the slots fill like any free one.
Sequences of changes are played on a model of HAProxy's servers: after every live step it holds
exactly what the files rendered for the new table declare, so a reload would route the same."""

from __future__ import annotations

import re

import pytest

from edge.haproxy.capabilities import Capabilities
from edge.routing.model import Instance
from edge.routing.plan import ServedSlot, make_plan, reconcile
from edge.routing.render import Listeners, render
from edge.routing.spares import SparePool, assign, retire
from edge.routing.table import build_table

DOMAINS = ("t.example",)
LISTENERS = Listeners(":80", "127.0.0.1:8404", "/run/haproxy-consul/haproxy.sock", DOMAINS)
TEMPLATES = {name: open(f"templates/{name}").read() for name in ("haproxy.cfg.j2", "landing.html.j2")}
DYNAMIC = frozenset({"add server", "del server", "set server"})
RELEASES = {   # what the probes find, as far as growth goes
    "2.6": Capabilities("2.6.12", (2, 6), DYNAMIC, server_cookie=False),
    "3.0": Capabilities("3.0.11", (3, 0), DYNAMIC, server_cookie=True),
    "3.2": Capabilities("3.2.26", (3, 2), DYNAMIC, server_init_state=True, server_cookie=True),
    "3.4": Capabilities("3.4.7", (3, 4), DYNAMIC | {"add backend", "publish backend"}, server_init_state=True,
                        server_cookie=True),
}
UNPROBED = Capabilities("unknown")
NO_POOL = SparePool(0)


def inst(sid, service="web", port=None, tags=()):
    return Instance(service=service, node="n1", service_id=sid, address="10.0.0.1",
                    port=port or 8000 + ord(sid[0]) - ord("a"), container_port=80, healthy=True, tags=tuple(tags))


def build(*instances, previous=None):
    services: dict[str, list[Instance]] = {}
    for i in instances:
        services.setdefault(i.service, []).append(i)
    return build_table({k: tuple(v) for k, v in services.items()}, previous)


SERVER = re.compile(r"^    server (\S+) (\S+):(\d+)(.*?)( disabled)?$")


def declared(table, listeners=LISTENERS) -> dict[str, dict[str, tuple]]:
    """The servers the rendered haproxy.cfg declares: backend -> slot -> (address, port, ready,
    weight, other keywords)."""
    servers: dict[str, dict[str, tuple]] = {}
    backend = None
    for line in render(table, listeners, TEMPLATES)["haproxy.cfg"].splitlines():
        if line.startswith("backend "):
            backend = line.split()[1]
        elif (m := SERVER.match(line)) and backend and backend.startswith(("be_", "tcp_")):
            servers.setdefault(backend, {})[m.group(1)] = _server(m.group(2), int(m.group(3)), not m.group(5),
                                                                  m.group(4))
    return servers


def _server(address, port, ready, keywords):
    words = keywords.split()
    weight = int(words[words.index("weight") + 1]) if "weight" in words else 1
    if "weight" in words:
        del words[words.index("weight"):words.index("weight") + 2]
    return (address, port, ready, weight, tuple(words))


def run(servers, commands):
    """HAProxy's servers after the runtime commands (maps aside), as HAProxy applies them: a
    server added at runtime starts in maintenance; a command on a missing server fails."""
    servers = {b: dict(s) for b, s in servers.items()}
    for command in commands:
        words = command.split()
        if words[:2] == ["add", "server"]:
            backend, name = words[2].split("/")
            address, port = words[3].rsplit(":", 1)
            assert name not in servers[backend], f"{command}: Already exists"
            servers[backend][name] = _server(address, int(port), False, " ".join(words[4:]))
        elif words[:2] == ["set", "server"]:
            backend, name = words[2].split("/")
            address, port, ready, weight, keywords = servers[backend][name]     # KeyError: No such server
            if words[3] == "addr":
                address, port = words[4], int(words[6])
            elif words[3] == "state":
                assert words[4] != "ready" or address != "0.0.0.0", f"{command}: ready at its placeholder"
                ready = words[4] == "ready"
            elif words[3] == "weight":
                weight = int(words[4])
            servers[backend][name] = (address, port, ready, weight, keywords)
    return servers


def routing(servers):
    """What decides where traffic goes: a slot in maintenance keeps whatever address it had."""
    return {b: {n: (a, p, r, w, k) if r else (None, None, r, w, k) for n, (a, p, r, w, k) in slots.items()}
            for b, slots in servers.items()}


def served(servers):
    return [ServedSlot(b, n, a, p, r) for b, slots in servers.items() for n, (a, p, r, _, _) in slots.items()]


def play(sequence, caps, pool=NO_POOL, listeners=LISTENERS):
    """Each set of instances of `sequence` after the first, as the control loop plans it (until a
    reload); the plans."""
    live = build(*sequence[0])
    haproxy = declared(live, listeners)
    plans = []
    for instances in sequence[1:]:
        desired = build(*instances, previous=live)
        desired = assign(live, retire(live, desired, pool), pool)
        plan = make_plan(live, desired, DOMAINS, pool, caps)
        plans.append(plan)
        if plan.reload:
            return plans
        haproxy = run(haproxy, plan.commands)
        assert routing(haproxy) == routing(declared(desired, listeners)), plan.commands
        assert reconcile(desired, served(haproxy), pool).empty
        live = desired
    return plans


def grows(*tags, service="web"):
    """A route of one instance, then five (4 → 8 slots), then three, then eleven (8 → 16)."""
    return [[inst(s, service, tags=tags) for s in ids] for ids in ("a", "abcde", "ace", "abcdefghijk")]


@pytest.mark.parametrize("release", sorted(RELEASES))
@pytest.mark.parametrize("tags", [
    (),
    ("edge.weight=5",),
    ("edge.maxconn=10", "edge.timeout-server=5s"),
    ("edge.protocol=h2c",),
    ("edge.protocol=https",),
    ("edge.tcp=7000",),                    # a TCP backend beside the HTTP one: both grow
    ("edge.route=/api strip",),
])
def test_a_full_backend_grows_live_and_haproxy_then_holds_what_the_files_declare(release, tags):
    plans = play(grows(*tags), RELEASES[release])
    assert [p.reasons for p in plans] == [(), (), ()]
    backends = 2 if "edge.tcp=7000" in tags else 1
    assert [sum(c.startswith("add server") for c in p.commands) for p in plans] == [4 * backends, 0, 8 * backends]


def test_growth_adds_free_slots_then_fills_them_address_first():
    a, b = grows("edge.weight=5")[:2]
    (plan,) = play([a, b], RELEASES["3.0"])
    assert list(plan.commands) == [
        "add server be_web-80/s5 0.0.0.0:0",
        "add server be_web-80/s6 0.0.0.0:0",
        "add server be_web-80/s7 0.0.0.0:0",
        "add server be_web-80/s8 0.0.0.0:0",
        *(c for i, port in ((2, 8001), (3, 8002), (4, 8003), (5, 8004)) for c in (
            f"set server be_web-80/s{i} addr 10.0.0.1 port {port}",
            f"set server be_web-80/s{i} weight 5",
            f"set server be_web-80/s{i} state ready")),
    ]


@pytest.mark.parametrize("release, reason", [
    ("2.6", "web-80 grew from 4 to 8 slots (sticky: HAProxy 2.6.12 refuses `cookie` on a server added at runtime)"),
    ("3.0", None), ("3.2", None), ("3.4", None),
])
def test_a_sticky_backend_grows_live_where_add_server_takes_a_cookie(release, reason):
    plans = play(grows("edge.sticky=SID")[:2], RELEASES[release])
    assert plans[0].reasons == ((reason,) if reason else ())
    if reason is None:
        assert plans[0].commands[0] == "add server be_web-80/s5 0.0.0.0:0 cookie s5"


def test_until_haproxy_was_probed_growth_is_a_reload():
    (plan,) = play(grows()[:2], UNPROBED)
    assert plan.reasons == ("web-80 grew from 4 to 8 slots (this HAProxy cannot add servers at runtime)",)


@pytest.mark.parametrize("release", ["2.6", "3.0", "3.2"])
def test_a_route_on_a_spare_grows_the_spare_which_stays_out_of_the_pool_until_a_reload(release):
    pool = SparePool(2, 4)
    listeners = Listeners(":80", "127.0.0.1:8404", "/run/haproxy-consul/haproxy.sock", DOMAINS, spares=pool)
    other = inst("z", "other")
    grown = [other, *(inst(s) for s in "abcde")]
    plans = play([[other], [other, inst("a")], grown, [other], grown, [other], [other, inst("x", "new")]],
                 RELEASES[release], pool, listeners)
    assert [p.reasons for p in plans] == [()] * 6
    assert plans[1].commands[0] == "add server be_spare_1/s5 0.0.0.0:0"
    assert "be_spare_1 left empty until the next reload" in plans[2].changes[-1]     # retired on its grown spare
    assert plans[3].commands[-1] == "add map hosts.map web-80.t.example be_spare_1"  # back on it
    assert plans[5].commands[-1] == "add map hosts.map new-80.t.example be_spare_2"  # the pool's next spare


def test_shrinking_puts_slots_in_maintenance_and_keeps_them():
    plans = play(grows()[:3], RELEASES["2.6"])
    assert list(plans[1].commands) == ["set server be_web-80/s2 state maint", "set server be_web-80/s4 state maint"]
