"""Spare backends (edge.routing.spares + the plan): a new vhost with default options is filled into
a free spare and only then mapped; a removed one leaves the maps first; an empty pool, options
that are not the defaults or a failed step are a reload; the files name the route a spare serves."""

from dataclasses import replace

import pytest

from edge.haproxy.capabilities import Capabilities
from edge.routing.maps import host_maps
from edge.routing.model import Instance
from edge.routing.plan import ServedSlot, make_plan, reconcile, runtime_part
from edge.routing.render import Listeners, render
from edge.routing.spares import SparePool, assign, release, retire
from edge.routing.table import build_table

DOMAINS = ("t.example",)
POOL = SparePool(2, 4)
ATOMIC_MAPS = Capabilities("2.6.12", (2, 6), frozenset({"prepare map", "add map", "commit map"}))


def inst(sid, service="web", port=8000, address="10.0.0.1", tags=()):
    return Instance(service=service, node="n1", service_id=sid, address=address, port=port, container_port=80,
                    healthy=True, tags=tuple(tags))


def build(*instances, previous=None):
    services = {}
    for i in instances:
        services.setdefault(i.service, []).append(i)
    return build_table({k: tuple(v) for k, v in services.items()}, previous)


def step(live, desired, pool=POOL, domains=DOMAINS):
    """What the control loop does: spares assigned, then the plan."""
    desired = assign(live, retire(live, desired, pool), pool)
    return desired, make_plan(live, desired, domains, pool)


BASE = build(inst("a"))


@pytest.mark.parametrize("new, domains, commands", [
    # address before ready, servers before the map entry that sends traffic there
    ([inst("b", service="api", port=9000)], DOMAINS, [
        "set server be_spare_1/s1 addr 10.0.0.1 port 9000",
        "set server be_spare_1/s1 state ready",
        "add map spares.map be_spare_1 api-80",
        "add map hosts.map api-80.t.example be_spare_1",
    ]),
    # without domains the route name map points at it too
    ([inst("b", service="api", port=9000)], (), [
        "set server be_spare_1/s1 addr 10.0.0.1 port 9000",
        "set server be_spare_1/s1 state ready",
        "add map spares.map be_spare_1 api-80",
        "add map routes.map api-80 be_spare_1",
    ]),
    # an exact host from a tag goes to the spare too; two instances fill two slots
    ([inst("b", service="api", port=9000, tags=("edge.host=api.example.org",)),
      inst("c", service="api", port=9001, tags=("edge.host=api.example.org",))], DOMAINS, [
        "set server be_spare_1/s1 addr 10.0.0.1 port 9000",
        "set server be_spare_1/s1 state ready",
        "set server be_spare_1/s2 addr 10.0.0.1 port 9001",
        "set server be_spare_1/s2 state ready",
        "add map spares.map be_spare_1 api-80",
        "add map hosts.map api-80.t.example be_spare_1",
        "add map hosts.map api.example.org be_spare_1",
    ]),
    # two new vhosts: two spares, all servers before any map entry
    ([inst("b", service="api", port=9000), inst("c", service="cdn", port=9100)], DOMAINS, [
        "set server be_spare_1/s1 addr 10.0.0.1 port 9000",
        "set server be_spare_1/s1 state ready",
        "set server be_spare_2/s1 addr 10.0.0.1 port 9100",
        "set server be_spare_2/s1 state ready",
        "add map spares.map be_spare_1 api-80",
        "add map spares.map be_spare_2 cdn-80",
        "add map hosts.map api-80.t.example be_spare_1",
        "add map hosts.map cdn-80.t.example be_spare_2",
    ]),
])
def test_new_vhost_fills_a_spare_then_maps_it(new, domains, commands):
    desired, plan = step(BASE, build(inst("a"), *new, previous=BASE), domains=domains)
    assert not plan.reload, plan.reasons
    assert list(plan.commands) == commands
    assert desired.get("web-80").spare == 0


def test_a_new_router_on_a_spare_is_mapped_to_the_spare_after_its_servers():
    live = build(inst("a", tags=("edge.route=/old",)))
    desired, plan = step(live, build(inst("a", tags=("edge.route=/old",)),
                                     inst("b", service="api", port=9000, tags=("edge.route=/api",)), previous=live))
    assert not plan.reload, plan.reasons
    cmds = list(plan.commands)
    assert cmds[:2] == ["set server be_spare_1/s1 addr 10.0.0.1 port 9000", "set server be_spare_1/s1 state ready"]
    assert any(c.startswith("add map routers.map ") and c.endswith(" be_spare_1") for c in cmds[2:])
    assert [c.split()[2] for c in cmds[2:]] == ["spares.map", "routers.map", "paths.map", "hosts.map"]


@pytest.mark.parametrize("new, reason", [
    ([inst(s, service=s, port=9000 + i) for i, s in enumerate(("api", "cdn", "db"))],
     "spare backends exhausted (2 in use): db-80"),
    ([inst("b", service="api", tags=("edge.sticky=SID",))], "vhost added: api-80"),     # options not the defaults
    ([inst(s, service="api", port=9000 + i) for i, s in enumerate("bcdef")], "vhost added: api-80"),  # 8 slots
])
def test_a_new_vhost_a_spare_cannot_take_is_a_reload(new, reason):
    desired, plan = step(BASE, build(inst("a"), *new, previous=BASE))
    assert plan.reload and reason in plan.reasons, plan.reasons
    assert release(desired).get("web-80").backend == "be_web-80"
    assert all(r.spare == 0 for r in release(desired).routes)


def test_no_pool_means_every_new_or_removed_vhost_is_a_reload():
    _, plan = step(BASE, build(inst("a"), inst("b", service="api"), previous=BASE), pool=SparePool(0))
    assert plan.reasons == ("vhost added: api-80",)
    _, plan = step(BASE, build(inst("b", service="api")), pool=SparePool(0))
    assert plan.reasons == ("vhost added: api-80", "vhost removed: web-80")


def test_a_removed_route_on_its_own_backend_leaves_the_maps_then_stays_empty_until_a_reload():
    live = build(inst("a", tags=("edge.host=www.example.org", "edge.weight=2")), inst("b", service="api", port=9000))
    desired, plan = step(live, build(inst("b", service="api", port=9000)))       # a full build: no web-80
    assert not plan.reload, plan.reasons
    assert list(plan.commands) == [
        "del map hosts.map web-80.t.example",
        "del map hosts.map www.example.org",
        "set server be_web-80/s1 state maint",
        "set server be_web-80/s1 weight 1",
    ]
    gone = desired.get("web-80")
    assert gone.retired and gone.backend == "be_web-80" and not gone.vhost and gone.slots == (None,) * 4
    config = render(desired, LISTENERS, TEMPLATES)
    assert "backend be_web-80\n    # Route web-80 was removed live" in config["haproxy.cfg"]
    assert "web-80" not in config["hosts.map"] and "web-80" not in config["landing.lf"]
    # kept through the next changes, also a full build; dropped by a reload
    again, plan = step(desired, build(inst("b", service="api", port=9000), inst("c", service="api", port=9001)))
    assert again.get("web-80").retired and not plan.reload
    assert release(again).get("web-80") is None


def test_a_retired_route_that_comes_back_is_filled_into_its_own_backend_then_mapped():
    live = build(inst("a"), inst("b", service="api", port=9000))
    gone, _ = step(live, build(inst("b", service="api", port=9000), previous=live))
    back, plan = step(gone, build(inst("a", port=8100), inst("b", service="api", port=9000), previous=gone))
    assert not plan.reload, plan.reasons
    assert list(plan.commands) == ["set server be_web-80/s1 addr 10.0.0.1 port 8100",
                                   "set server be_web-80/s1 state ready",
                                   "add map hosts.map web-80.t.example be_web-80"]
    assert not back.get("web-80").retired
    # with other options it needs its backend rendered again: a reload
    _, plan = step(gone, build(inst("a", tags=("edge.sticky=S",)), inst("b", service="api", port=9000),
                               previous=gone))
    assert plan.reasons == ("vhost added: web-80",)


@pytest.mark.parametrize("tags", [("edge.timeout-server=5s",), ("edge.tcp=7000",)])
def test_a_removed_route_with_its_own_options_or_a_tcp_backend_is_a_reload(tags):
    live = build(inst("a", tags=tags), inst("b", service="api", port=9000))
    _, plan = step(live, build(inst("b", service="api", port=9000), previous=live))
    assert plan.reasons[0] == "vhost removed: web-80", plan.reasons


def test_removal_leaves_the_maps_first_then_empties_the_spare():
    live, _ = step(BASE, build(inst("a"), inst("b", service="api", port=9000, tags=("edge.weight=3",)),
                               previous=BASE))
    assert live.get("api-80").backend == "be_spare_1"
    desired, plan = step(live, build(inst("a"), previous=live))
    assert not plan.reload, plan.reasons
    assert list(plan.commands) == [
        "del map hosts.map api-80.t.example",
        "del map spares.map be_spare_1",
        "set server be_spare_1/s1 state maint",
        "set server be_spare_1/s1 weight 1",
    ]
    assert POOL.free(desired) == (1, 2)


def test_a_spare_freed_in_the_same_change_is_not_taken_again_before_it_is_emptied():
    live, _ = step(BASE, build(inst("a"), inst("b", service="api", port=9000), previous=BASE))
    desired, plan = step(live, build(inst("a"), inst("c", service="cdn", port=9100), previous=live))
    assert not plan.reload
    assert desired.get("cdn-80").backend == "be_spare_2"
    assert plan.commands.index("add map hosts.map cdn-80.t.example be_spare_2") < \
        plan.commands.index("del map hosts.map api-80.t.example") < \
        plan.commands.index("set server be_spare_1/s1 state maint")


def test_a_route_keeps_its_spare_through_instance_churn():
    live, _ = step(BASE, build(inst("a"), inst("b", service="api", port=9000), previous=BASE))
    desired, plan = step(live, build(inst("a"), inst("b", service="api", port=9000),
                                     inst("c", service="api", port=9001), previous=live))
    assert desired.get("api-80").spare == 1
    assert list(plan.commands) == ["set server be_spare_1/s2 addr 10.0.0.1 port 9001",
                                   "set server be_spare_1/s2 state ready"]


def test_a_spare_route_whose_options_change_reloads_onto_its_own_backend():
    live, _ = step(BASE, build(inst("a"), inst("b", service="api"), previous=BASE))
    desired, plan = step(live, build(inst("a"), inst("b", service="api", tags=("edge.timeout-server=5s",)),
                                     previous=live))
    assert plan.reload
    assert release(desired).get("api-80").backend == "be_api-80"


def test_while_a_reload_waits_a_spare_route_keeps_its_spare():
    live, _ = step(BASE, build(inst("a"), inst("b", service="api", port=9000), previous=BASE))
    wanted = release(build(inst("a"), inst("b", service="api", port=9001), inst("z", service="zz"), previous=live))
    partial = runtime_part(live, wanted)
    plan = make_plan(live, partial, DOMAINS, POOL)
    assert list(plan.commands) == ["set server be_spare_1/s1 addr 10.0.0.1 port 9001"]


def test_reconcile_knows_the_free_spares_and_puts_a_ready_slot_back_in_maintenance():
    live, _ = step(BASE, build(inst("a"), inst("b", service="api", port=9000), previous=BASE))

    def slot(backend, name, address="0.0.0.0", port=0, ready=False):
        return ServedSlot(backend, name, address, port, ready)
    served = [slot("be_web-80", "s1", "10.0.0.1", 8000, True), *(slot("be_web-80", f"s{i}") for i in (2, 3, 4)),
              slot("be_spare_1", "s1", "10.0.0.1", 9000, True), *(slot("be_spare_1", f"s{i}") for i in (2, 3, 4)),
              slot("be_spare_2", "s1", "10.0.0.9", 1, True), *(slot("be_spare_2", f"s{i}") for i in (2, 3, 4))]
    plan = reconcile(live, served, POOL)
    assert not plan.reload, plan.reasons
    assert plan.commands == ("set server be_spare_2/s1 state maint",)
    assert reconcile(live, served[:8], POOL).reasons == ("HAProxy has no backend be_spare_2",)


def test_reconcile_puts_back_the_maps_a_failed_step_left_in_haproxy():
    """A live step HAProxy applied whole while the edge saw it fail (and its fallback reload failed):
    the edge still has `BASE`, HAProxy maps api-80 to be_spare_1 and serves it there. Map entries
    first, then the spare's slots."""
    _, plan = step(BASE, build(inst("a"), inst("b", service="api", port=9000), previous=BASE))
    assert plan.commands[-1] == "add map hosts.map api-80.t.example be_spare_1"

    def slots(backend, *ready):
        return [ServedSlot(backend, f"s{i + 1}", *(ready[i] if i < len(ready) else ("0.0.0.0", 0, False)))
                for i in range(4)]
    served = slots("be_web-80", ("10.0.0.1", 8000, True)) + slots("be_spare_1", ("10.0.0.1", 9000, True)) + \
        slots("be_spare_2")
    haproxy = {"hosts.map": {"web-80.t.example": "be_web-80", "api-80.t.example": "be_spare_1",
                             "old-80.t.example": "be_web-80"}}
    plan = reconcile(BASE, served, POOL, haproxy, DOMAINS)
    assert not plan.reload, plan.reasons
    assert plan.commands == ("del map hosts.map api-80.t.example", "del map hosts.map old-80.t.example",
                             "set server be_spare_1/s1 state maint")
    haproxy["hosts.map"] = {"web-80.t.example": "be_spare_2"}
    assert reconcile(BASE, served, POOL, haproxy, DOMAINS).commands == (
        "set map hosts.map web-80.t.example be_web-80", "set server be_spare_1/s1 state maint")
    assert reconcile(BASE, served, POOL, {"hosts.map": None}, DOMAINS).reasons == ("HAProxy has no map hosts.map",)
    # spares.map only names routes on pages: a template of one's own may not load it
    taken, _ = step(BASE, build(inst("a"), inst("b", service="api", port=9000), previous=BASE))
    haproxy = {"hosts.map": {"web-80.t.example": "be_web-80", "api-80.t.example": "be_spare_1"}, "spares.map": None}
    assert reconcile(taken, served, POOL, haproxy, DOMAINS) == reconcile(taken, served, POOL)
    haproxy["spares.map"] = {}
    assert reconcile(taken, served, POOL, haproxy, DOMAINS).commands == ("add map spares.map be_spare_1 api-80",)
    assert reconcile(BASE, served, POOL, {"hosts.map": {"web-80.t.example": "be_web-80"}}, DOMAINS).commands == (
        "set server be_spare_1/s1 state maint",)


LISTENERS = Listeners(":80", "127.0.0.1:8404", "/run/haproxy-consul/haproxy.sock", DOMAINS, spares=POOL)
FREE_SPARE = "    description spare backend, free at the last reload"
TEMPLATES = {name: open(f"templates/{name}").read() for name in ("haproxy.cfg.j2", "landing.html.j2")}


def test_the_files_written_after_a_live_change_declare_what_haproxy_runs():
    live, _ = step(BASE, build(inst("a"), inst("b", service="api", port=9000), previous=BASE))
    files = render(live, LISTENERS, TEMPLATES)
    config = files["haproxy.cfg"]
    spare = config.split("backend be_spare_1\n", 1)[1].split("\n\n", 1)[0]
    assert "description route api-80" in spare
    assert "server s1 10.0.0.1:9000" in spare and "server s2 0.0.0.0:0 disabled" in spare
    assert "backend be_spare_2\n" + FREE_SPARE in config
    assert "backend be_api-80" not in config
    assert "api-80.t.example be_spare_1\n" in files["hosts.map"]
    # a reload for any other reason: the route on its own backend, both spares free again
    config = render(release(live), LISTENERS, TEMPLATES)["haproxy.cfg"]
    assert "backend be_api-80\n" in config and "backend be_spare_1\n" + FREE_SPARE in config


def sick(sid, **kw):
    """An instance registered with its health check still critical (or failing now)."""
    return replace(inst(sid, **kw), healthy=False)


def applied_maps(table, commands, domains=DOMAINS):
    """HAProxy's host maps after `commands` (the map ones) on the maps `table` was rendered with."""
    maps = {name: dict(entries) for name, entries in host_maps(table, domains).items()}
    for command in commands:
        words = command.split()
        if words[1:2] == ["map"] and words[2] in maps:
            if words[0] == "del":
                maps[words[2]].pop(words[3])
            else:
                maps[words[2]][words[3]] = words[4]
    return maps


@pytest.mark.parametrize("sequence", [
    # the edge's initial sync had no route; the service registers with its HTTP check critical,
    # and a second later the check passes (issue 16: the vhost answered the landing page for good)
    [(), (sick("b", service="api", port=9000),), (inst("b", service="api", port=9000),)],
    # the same beside a route that exists
    [(inst("a"),), (inst("a"), sick("b", service="api", port=9000)), (inst("a"), inst("b", service="api", port=9000))],
    # a route on a spare whose instance fails, then is deregistered: the map entry leaves too,
    # before the spare is free for another route
    [(inst("a"),), (inst("a"), inst("b", service="api", port=9000)), (inst("a"), sick("b", service="api", port=9000)),
     (inst("a"),), (inst("a"), inst("c", service="cdn", port=9100))],
    # a route on its own backend whose instance fails, then is deregistered (retired), then comes
    # back with its check critical, then passes
    [(inst("a"), inst("b", service="api", port=9000)), (inst("a"), sick("b", service="api", port=9000)),
     (inst("a"),), (inst("a"), sick("b", service="api", port=9000)), (inst("a"), inst("b", service="api", port=9000))],
])
def test_vhosts_without_a_healthy_instance_are_mapped_and_unmapped_live_too(sequence):
    """Every live change leaves HAProxy's host maps as the files would render them, whether or not
    the route taking or leaving a backend has a healthy instance at that moment."""
    live = build(*sequence[0])
    for instances in sequence[1:]:
        desired, plan = step(live, build(*instances, previous=live))
        assert not plan.reload, plan.reasons
        assert applied_maps(live, plan.commands) == host_maps(desired, DOMAINS), (instances, plan)
        live = desired


def test_a_new_vhost_with_no_healthy_instance_yet_is_mapped_to_its_spare_then_filled():
    empty = build()
    waiting, plan = step(empty, build(sick("b", service="api", port=9000), previous=empty))
    assert waiting.get("api-80").backend == "be_spare_1"
    assert list(plan.commands) == ["add map spares.map be_spare_1 api-80",      # its 503 page names it...
                                   "add map hosts.map api-80.t.example be_spare_1"]   # ...until it is filled
    ready, plan = step(waiting, build(inst("b", service="api", port=9000), previous=waiting))
    assert list(plan.commands) == ["set server be_spare_1/s1 addr 10.0.0.1 port 9000",
                                   "set server be_spare_1/s1 state ready"]


# --- atomic map swaps (edge.routing.maps.swapped) ------------------------------------------------
def many(n):
    return {f"h{i}.t.example": "be_web-80" for i in range(n)}


@pytest.mark.parametrize("old, new, atomic, commands", [
    # one entry changes: a plain command, with or without `prepare map`
    ({"a": "be_1"}, {"a": "be_1", "b": "be_2"}, True, ["add map hosts.map b be_2"]),
    ({"a": "be_1", "b": "be_2"}, {"a": "be_1"}, True, ["del map hosts.map b"]),
    # two or more: one swap of the whole map (the removed entry is simply not in the new version)
    ({"a": "be_1", "c": "be_3"}, {"a": "be_1", "b": "be_2", "d": "be_2"}, True, [
        "prepare map hosts.map", "add map @next hosts.map a be_1", "add map @next hosts.map b be_2",
        "add map @next hosts.map d be_2", "commit map @next hosts.map"]),
    ({"a": "be_1", "c": "be_3"}, {"a": "be_1", "b": "be_2", "d": "be_2"}, False, [
        "add map hosts.map b be_2", "add map hosts.map d be_2", "del map hosts.map c"]),
    # to an empty map: a swap with nothing added
    ({"a": "be_1", "b": "be_2"}, {}, True, ["prepare map hosts.map", "commit map @next hosts.map"]),
])
def test_several_entries_of_a_map_change_in_one_swap(old, new, atomic, commands):
    from edge.routing.maps import map_commands
    assert map_commands({"hosts.map": old}, {"hosts.map": new}, atomic) == commands


def test_a_map_past_the_swap_limit_changes_entry_by_entry():
    from edge.routing.maps import SWAP_MAX_ENTRIES, map_commands
    old = many(SWAP_MAX_ENTRIES)
    new = {**old, "x.t.example": "be_x", "y.t.example": "be_y"}
    assert map_commands({"hosts.map": old}, {"hosts.map": new}, True) == [
        "add map hosts.map x.t.example be_x", "add map hosts.map y.t.example be_y"]
    del new["h0.t.example"], new["h1.t.example"]          # back to the limit: a swap
    assert map_commands({"hosts.map": old}, {"hosts.map": new}, True)[0] == "prepare map hosts.map"
    big = many(10 * SWAP_MAX_ENTRIES)
    fifth = {k: "be_spare_1" for k in list(big)[:2 * SWAP_MAX_ENTRIES]}     # a fifth of a large map
    assert map_commands({"hosts.map": big}, {"hosts.map": {**big, **fifth}}, True)[0] == "prepare map hosts.map"
    fifth.popitem()
    assert map_commands({"hosts.map": big}, {"hosts.map": {**big, **fifth}}, True)[0].startswith("set map")


def test_a_swap_of_the_path_map_comes_after_what_its_keys_point_at_and_before_that_goes():
    from edge.routing.maps import map_commands
    live = {"routers.map": {"r1": "be_1", "r2": "be_2"}, "paths.map": {"/a": "r1", "/b": "r2"}}
    desired = {"routers.map": {"r1": "be_1", "r3": "be_3"}, "paths.map": {"/a": "r1", "/c": "r3"}}
    assert map_commands(live, desired, True) == [
        "add map routers.map r3 be_3",
        "prepare map paths.map", "add map @next paths.map /a r1", "add map @next paths.map /c r3",
        "commit map @next paths.map",
        "del map routers.map r2"]


def test_a_new_vhost_with_two_hosts_on_a_spare_is_filled_then_swapped_into_the_host_map():
    live = build(inst("a"))
    desired = assign(live, build(inst("a"), inst("b", service="api", port=9000, tags=("edge.host=api.example.org",)),
                                 previous=live), POOL)
    plan = make_plan(live, desired, DOMAINS, POOL, ATOMIC_MAPS)
    assert list(plan.commands) == [
        "set server be_spare_1/s1 addr 10.0.0.1 port 9000", "set server be_spare_1/s1 state ready",
        "add map spares.map be_spare_1 api-80",
        "prepare map hosts.map", "add map @next hosts.map api-80.t.example be_spare_1",
        "add map @next hosts.map api.example.org be_spare_1", "add map @next hosts.map web-80.t.example be_web-80",
        "commit map @next hosts.map"]


def test_pages_name_the_route_a_spare_took_live_from_the_spares_map():
    """HAProxy reads the landing page and the 503 pages at load: a route that takes a spare live is
    named on them through spares.map, looked up per request."""
    live, plan = step(BASE, build(inst("a"), inst("b", service="api", port=9000), previous=BASE))
    assert "add map spares.map be_spare_1 api-80" in plan.commands
    files = render(live, LISTENERS, TEMPLATES)
    assert files["spares.map"] == "be_spare_1 api-80\n"
    landing = files["landing.lf"]
    for k in (1, 2):           # a row per spare, hidden while it is free ("-")
        assert (f'<tr data-route="%[str(be_spare_{k}),map_str(spares.map,-),regsub("[^a-z0-9_-]","",g)]">'
                in landing)
        assert f"%[nbsrv(be_spare_{k})]" in landing
    assert "api-80.t.example" not in landing       # its row is the spare's, not a static one
    assert 'tr[data-route="-"] { display: none; }' in landing
    config = files["haproxy.cfg"]
    assert ("backend be_spare_2\n" + FREE_SPARE in config)
    assert "lf-string \"<!doctype html><title>503 %[str(be_spare_2),map_str(spares.map,)]</title>" in config
    assert "spares.map" not in render(BASE, Listeners(":80", "127.0.0.1:8404", "/s", DOMAINS), TEMPLATES).files[0][1]
