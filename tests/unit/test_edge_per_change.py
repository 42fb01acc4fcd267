"""A change costs its routes, not the table: update_table and `with_routes` say which routes may
differ from the table they came from (`changed_since`), and retire, mark, assign and make_plan
look at those only. The fast path equals the full computation (the same stage on a copy of the
table that cannot say: `replace(table)`), over random sequences of changes, pools, releases and
domains; and per change no stage reads a route the change did not touch."""

from __future__ import annotations

import gc
from dataclasses import replace
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.haproxy.capabilities import Capabilities
from edge.routing import maps
from edge.routing.dynamic import forget, mark
from edge.routing.maps import host_maps, map_sizes
from edge.routing.plan import make_plan
from edge.routing.spares import SparePool, assign, retire
from edge.routing.table import Route, RouteTable, TagRules, build_table, update_table
from tests.unit.test_edge_table_plan import as_services, inst

MAPS = frozenset({"prepare map", "add map", "commit map", "add server", "del server"})
RELEASES = (
    Capabilities("unknown"),
    Capabilities("2.6.12", (2, 6), MAPS),
    Capabilities("3.4.7", (3, 4), MAPS | {"add backend", "publish backend", "del backend", "unpublish backend"},
                 wait_conditions=frozenset({"srv-removable", "be-removable"})),
)
RULES = TagRules(reserved_ports=frozenset({80}))

instance_st = st.builds(
    inst,
    sid=st.sampled_from(["a", "b", "c"]),
    port=st.integers(8000, 8002),
    service=st.sampled_from(["web", "api", "db", "cdn", "web-80"]),
    healthy=st.booleans(),
    tags=st.sampled_from([(), (), (), (), ("edge.host=w.org",), ("edge.host=api-80.t.example",), ("edge.sticky",),
                          ("edge.expose=false",), ("edge.route=/x",), ("edge.route=/y strip",),
                          ("edge.route=/x weight=20",), ("edge.tcp=6379",)]),
)


def stages(live: RouteTable, desired: RouteTable, pool: SparePool, caps: Capabilities, domains: tuple[str, ...]):
    """The control loop's stages (edge.control `step`), each checked against the full computation:
    the same stage on a copy of its input that does not know what changed."""
    for stage in (lambda d: retire(live, d, pool), lambda d: mark(live, d, caps, pool),
                  lambda d: assign(live, d, pool)):
        fast, full = stage(desired), stage(replace(desired))
        assert fast == full and fast.names == full.names
        desired = fast
    plan = make_plan(live, desired, domains, pool, caps)
    assert plan == make_plan(live, replace(desired), domains, pool, caps)
    return desired


def indexes(table: RouteTable):
    hosts = {h for r in table.routes for h in r.hosts} | {"w.org", "nowhere.org"}
    services = {s for r in table.routes for s in r.services} | {"web", "gone"}
    routes = {r.backend for r in table.routers} | {"nowhere-80"}
    return (table.spares, {h: table.with_host(h) for h in hosts}, {s: table.routes_of(s) for s in services},
            {n: set(table.matches_to(n)) for n in routes})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(instance_st, max_size=8), min_size=2, max_size=5), st.integers(0, 3),
       st.sampled_from(RELEASES), st.sampled_from([(), ("t.example",), ("t.example", "u.example")]),
       st.sampled_from([0, 4, maps.SWAP_MAX_ENTRIES]))
def test_every_stage_on_what_changed_equals_the_full_computation(steps, spares, caps, domains, swap_max):
    with patch.object(maps, "SWAP_MAX_ENTRIES", swap_max):   # small maps swapped or not, as large ones
        changes(steps, spares, caps, domains)


def changes(steps, spares, caps, domains):
    pool = SparePool(spares, 2)
    services = as_services(steps[0])
    live = build_table(services, None, 2, RULES)
    live.routes_of(""), live.spares, live.with_host(""), live.matches_to("")   # built, to be carried forward
    for instances in steps[1:]:
        new = as_services(instances)
        changed = {n for n in services.keys() | new.keys() if services.get(n) != new.get(n)}
        desired = update_table(live, new, changed, 2, RULES)
        table = stages(live, desired, pool, caps, domains)
        # every route (and match) that differs is among those said to have changed; the indexes carried
        # forward are those a copy builds afresh; so are the host maps of the changed routes
        assert {n for n in {*live.names, *table.names} if live.get(n) is not table.get(n)} <= \
            table.changed_since(live)
        winners = {m: (live.resolved.get(m, ((), ()))[0], table.resolved.get(m, ((), ()))[0])
                   for m in live.resolved.keys() | table.resolved.keys()}
        assert {m for m, (old, new) in winners.items() if old != new} <= table.rerouted_since(live)
        assert indexes(table) == indexes(replace(table))
        scope = [r for n in table.changed_since(live) for r in (live.get(n), table.get(n)) if r is not None]
        keys = {"hosts.map": {h for r in scope for h in (*r.hosts, *(f"{r.name}.{d}" for d in domains))},
                "routes.map": {r.name for r in scope}, "spares.map": {f"be_spare_{r.spare}" for r in scope}}
        # the maps' sizes make_plan kept with the table are those of its whole maps
        assert map_sizes(table, domains) == map_sizes(replace(table), domains)
        for t in (live, table):
            assert host_maps(t, domains, scope) == {m: {k: v for k, v in entries.items() if k in keys[m]}
                                                    for m, entries in host_maps(t, domains).items()}
        live, services = table, new


@pytest.mark.parametrize("domains, tags, swapped", [
    (("t.example",), ("edge.host=new.example.org",), False),      # 2 entries of 601: plain commands
    (("t.example", "u.example"), (), False),
    (("t.example",), tuple(f"edge.host=h{i}.example.org" for i in range(160)), True),   # a fifth or more: swapped
])
def test_a_new_vhost_in_a_large_host_map_is_planned_as_with_the_whole_maps(domains, tags, swapped):
    services = {f"s{i:03}": (inst("a", service=f"s{i:03}"),) for i in range(600)}
    live = build_table(services)
    new = {**services, "new": (inst("a", service="new", tags=tags),)}
    pool, caps = SparePool(4, 4), RELEASES[1]
    desired = assign(live, retire(live, update_table(live, new, {"new"}), pool), pool)
    plan = make_plan(live, desired, domains, pool, caps)
    assert plan == make_plan(live, replace(desired), domains, pool, caps) and not plan.reload
    assert ("prepare map hosts.map" in plan.commands) == swapped


def test_a_route_taking_a_spare_moves_the_routers_to_it_without_being_resolved_again():
    # A route new on a spare while the routers to it stay (the same objects): their map entries
    # follow the route's backend all the same.
    built = build_table(as_services([inst("a", tags=("edge.route=/x",)), inst("b", service="api")]))
    live = built.with_routes(removed=["web-80"])
    desired = live.with_routes([replace(built.get("web-80"), spare=1)])
    pool, domains = SparePool(2, 4), ("t.example",)
    assert desired.routers is live.routers and desired.rerouted_since(live) == frozenset()
    plan = make_plan(live, desired, domains, pool, RELEASES[1])
    assert plan == make_plan(live, replace(desired), domains, pool, RELEASES[1])
    assert "set map routers.map" in " ".join(plan.commands)


def test_changed_since_knows_only_the_tables_it_came_from():
    a = build_table(as_services([inst("a"), inst("b", service="api")]))
    b = update_table(a, as_services([inst("a", port=8001), inst("b", service="api")]), {"web"})
    c = b.with_routes(removed=["api-80"])
    assert b.changed_since(a) == {"web-80"}
    assert c.changed_since(b) == {"api-80"} and c.changed_since(a) == {"web-80", "api-80"}
    assert c.changed_since(c) == frozenset()
    assert a.changed_since(b) is None and replace(c).changed_since(a) is None
    assert forget(c, "web-80").names == ()


def test_a_table_does_not_keep_the_one_it_came_from_alive():
    a = build_table(as_services([inst("a")]))
    b = update_table(a, as_services([inst("a", port=8001)]), {"web"})
    base = b._since[0][0]
    del a
    gc.collect()
    assert base() is None and b.changed_since(RouteTable()) is None


READS: dict[str, int] = {}


class Counted(Route):
    """A route that counts the reads of its fields, by route name."""

    def __getattribute__(self, field):
        if not field.startswith("__"):
            name = super().__getattribute__("name")
            READS[name] = READS.get(name, 0) + 1
        return super().__getattribute__(field)


def test_a_change_reads_no_route_it_did_not_touch():
    # The defect: every stage walked every route of the live and the desired table, so a change
    # cost the control loop O(routes): 0.3-0.6 s at 10,000 routes (docs/performance.md, section
    # 11). Now a few binary searches read route names (O(log routes)), nothing else.
    services = {f"s{i:03}": (inst("a", service=f"s{i:03}", port=8000 + i),) for i in range(500)}
    built = build_table(services)
    live = RouteTable(tuple(Counted(**{f: getattr(r, f) for f in Route.__dataclass_fields__}) for r in built.routes),
                      built.routers, built.problems, built.readings, built.claims, built.resolved, built.refused)
    live.get(""), live.routes_of(""), live.spares, live.with_host("")   # the indexes, built once (then carried)
    map_sizes(live, ("t.example",))
    pool, caps = SparePool(4, 4), RELEASES[2]
    removed = {k: v for k, v in services.items() if k != "s009"}
    for new, changed in (({**services, "s007": (inst("b", service="s007"),)}, {"s007"}),
                         ({**services, "new": (inst("a", service="new"),)}, {"new"}), (removed, {"s009"})):
        READS.clear()
        desired = update_table(live, new, changed)
        plan = make_plan(live, assign(live, mark(live, retire(live, desired, pool), caps, pool), pool),
                         ("t.example",), pool, caps)
        assert plan.commands and not plan.reload
        untouched = sum(n for name, n in READS.items() if name not in {"s007-80", "s009-80"})
        assert untouched <= 100, untouched
