"""Route table (grouping, health, stable slots, host claims) and plans (runtime vs reload)."""

import pytest

from edge.routing.model import Instance
from edge.routing.plan import ServedSlot, make_plan, reconcile
from edge.routing.table import RouteTable, build_table


def inst(sid, port=8000, service="web", cport=80, healthy=True, node="n1", address="10.0.0.1", tags=()):
    return Instance(service=service, node=node, service_id=sid, address=address, port=port,
                    container_port=cport, healthy=healthy, tags=tuple(sorted(tags)))


def table(*instances, previous=None, min_slots=4):
    services = {}
    for i in instances:
        services.setdefault(i.service, []).append(i)
    t = build_table({k: tuple(sorted(v)) for k, v in services.items()}, previous, min_slots)
    return t, t.problems


def slots(t, name="web-80"):
    return [None if s is None else s.service_id for s in t.get(name).slots]


def test_routes_group_by_route_name_and_merge_services_with_the_same_name():
    t, _ = table(inst("a"), inst("b", service="web-80", cport=80), inst("c", cport=443))
    assert t.names == ("web-443", "web-80")
    assert sorted(s.service_id for s in t.get("web-80").servers) == ["a", "b"]


def test_unhealthy_instances_count_but_get_no_slot():
    t, _ = table(inst("a"), inst("b", healthy=False))
    route = t.get("web-80")
    assert (route.healthy, route.instances) == (1, 2)
    assert slots(t) == ["a", None, None, None]


def test_route_with_no_healthy_instance_still_exists():
    t, _ = table(inst("a", healthy=False))
    assert t.get("web-80").healthy == 0


@pytest.mark.parametrize("before, after, expected", [
    (["a", "b", "c"], ["a", "c"], ["a", None, "c", None]),          # removal frees its slot only
    (["a", "c"], ["a", "b", "c"], ["a", "c", "b", None]),           # newcomer takes the lowest free
    (["a", "b", "c", "d"], ["b", "c", "d", "e"], ["e", "b", "c", "d"]),
    (["a", "b", "c", "d"], ["a", "b", "c", "d", "e"], ["a", "b", "c", "d", "e", None, None, None]),  # doubles
    (["a"] + list("bcdefgh"), ["a"], ["a"] + [None] * 7),           # never shrinks while the route lives
])
def test_slots_are_stable(before, after, expected):
    old, _ = table(*(inst(s) for s in before))
    new, _ = table(*(inst(s) for s in after), previous=old)
    assert slots(new) == expected


def test_moved_instance_keeps_its_slot_with_the_new_address():
    old, _ = table(inst("a"), inst("b"))
    new, _ = table(inst("a"), inst("b", port=9999), previous=old)
    assert new.get("web-80").slots[1].port == 9999


def test_host_tag_conflict_goes_to_the_lowest_route_and_is_reported():
    t, problems = table(inst("a", tags=("edge.host=www.x.org",)),
                        inst("b", service="api", tags=("edge.host=www.x.org", "edge.host=bad host")))
    assert t.get("api-80").hosts == ("www.x.org",)
    assert t.get("web-80").hosts == ()
    assert [str(p) for p in problems] == [
        "'api': tag 'edge.host=bad host': router refused: 'bad host' is not a host name",
        "'www.x.org': claimed by routes ['api-80', 'web-80']; api-80 keeps it"]


# --- plans ------------------------------------------------------------------------------------
def plan_between(before, after, **kw):
    old, _ = table(*before, **kw)
    new, _ = table(*after, previous=old, **kw)
    return make_plan(old, new)


def test_first_plan_is_a_reload():
    t, _ = table(inst("a"))
    plan = make_plan(None, t)
    assert plan.reload and plan.reasons == ("initial sync",)


def test_identical_tables_plan_nothing():
    plan = plan_between([inst("a")], [inst("a")])
    assert plan.empty


@pytest.mark.parametrize("before, after, commands", [
    ([inst("a")], [inst("a"), inst("b", port=8001)],
     ["set server be_web-80/s2 addr 10.0.0.1 port 8001", "set server be_web-80/s2 state ready"]),
    ([inst("a"), inst("b")], [inst("a")], ["set server be_web-80/s2 state maint"]),
    ([inst("a"), inst("b")], [inst("a"), inst("b", healthy=False)], ["set server be_web-80/s2 state maint"]),
    ([inst("a")], [inst("a", port=9000)], ["set server be_web-80/s1 addr 10.0.0.1 port 9000"]),
    ([inst("a"), inst("b")], [inst("c", port=7000), inst("b")],    # a leaves and c arrives: same slot
     ["set server be_web-80/s1 addr 10.0.0.1 port 7000", "set server be_web-80/s1 state ready"]),
])
def test_churn_is_runtime_commands(before, after, commands):
    plan = plan_between(before, after)
    assert not plan.reload
    assert list(plan.commands) == commands
    assert plan.changes


@pytest.mark.parametrize("before, after, reason", [
    ([inst("a")], [inst("a"), inst("x", service="api")], "vhost added: api-80"),
    ([inst("a"), inst("x", service="api")], [inst("a")], "vhost removed: api-80"),
    ([inst("a")], [inst("a", tags=("edge.host=w.org",))], "hosts of web-80 changed"),
    ([inst(s) for s in "abcd"], [inst(s) for s in "abcde"], "web-80 grew from 4 to 8 slots"),
])
def test_structure_changes_reload_with_a_reason(before, after, reason):
    plan = plan_between(before, after)
    assert plan.reload
    assert any(r.startswith(reason) for r in plan.reasons), plan.reasons
    assert plan.commands == ()


def served(t, **overrides):
    """HAProxy's slots exactly as table `t` says, with some slots replaced: name -> (addr, port, ready)."""
    out = []
    for route in t.routes:
        for i, s in enumerate(route.slots):
            name = f"{route.backend}/s{i + 1}"
            addr, port, ready = overrides.get(name, ("0.0.0.0", 0, False) if s is None else (s.address, s.port, True))
            out.append(ServedSlot(route.backend, f"s{i + 1}", addr, port, ready))
    return out


@pytest.mark.parametrize("overrides, commands", [
    ({}, ()),                                                                   # HAProxy serves the table
    ({"be_web-80/s2": ("10.0.0.1", 8002, False)},                                # lost its `state ready`
     ("set server be_web-80/s2 addr 10.0.0.1 port 8002", "set server be_web-80/s2 state ready")),
    ({"be_web-80/s1": ("10.0.0.1", 7999, True)},                                 # an older address
     ("set server be_web-80/s1 addr 10.0.0.1 port 8001",)),
    ({"be_web-80/s3": ("10.0.0.1", 8003, True)},                                 # a free slot still serving
     ("set server be_web-80/s3 state maint",)),
    ({"be_web-80/s4": ("10.0.0.9", 9, False)},                                   # a free slot's old address: fine
     ()),
])
def test_reconcile_puts_back_what_haproxy_serves(overrides, commands):
    t, _ = table(inst("a", 8001), inst("b", 8002))
    plan = reconcile(t, served(t, **overrides))
    assert (plan.reasons, plan.commands) == ((), commands)
    assert len(plan.changes) == (1 if commands else 0)


def test_reconcile_reloads_when_backends_differ():
    t, _ = table(inst("a", 8001), inst("b", 8002, service="api"))
    web_only, _ = table(inst("a", 8001))
    plan = reconcile(t, served(web_only) + [ServedSlot("landing", "x", "1.2.3.4", 1, True)])
    assert plan.reasons == ("HAProxy has no backend be_api-80",)
    bigger, _ = table(*(inst(s, 8000 + i) for i, s in enumerate("abcde")))
    api = [slot for slot in served(t) if slot.backend == "be_api-80"]
    assert reconcile(t, served(bigger) + api).reasons == (
        "be_web-80 has 8 server slots in HAProxy, 4 in the table",)
    assert reconcile(web_only, served(t)).reasons == ("HAProxy still has backend be_api-80",)


def test_empty_table_is_a_valid_table():
    assert RouteTable().names == ()
    assert make_plan(RouteTable(), RouteTable()).empty


# --- incremental updates ----------------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edge.routing.table import TagRules, update_table  # noqa: E402

instance_st = st.builds(
    inst,
    sid=st.sampled_from(["a", "b", "c", "d", "e"]),
    port=st.integers(8000, 8003),
    service=st.sampled_from(["web", "api", "web-80", "db"]),
    cport=st.sampled_from([80, 443]),
    healthy=st.booleans(),
    node=st.sampled_from(["n1", "n2"]),
    tags=st.sampled_from([(), (), (), ("edge.host=w.org",), ("edge.host=a.org",), ("edge.route=w.org/api strip",),
                          ("edge.route=/x", "edge.sticky"), ("edge.expose=false",), ("edge.expose=true",),
                          ("edge.weight=3",), ("edge.tcp=6379",), ("edge.route=/x weight=20",),
                          ("edge.route=w.org/",), ("edge.tcp=80",)]),
)


def as_services(instances):
    services = {}
    for i in instances:
        services.setdefault(i.service, {})[i.key] = i
    return {k: tuple(sorted(v.values())) for k, v in services.items()}


@settings(max_examples=400, deadline=None)
@given(st.lists(instance_st, max_size=12), st.lists(instance_st, max_size=12), st.integers(1, 4), st.booleans())
def test_update_table_equals_a_full_build(before, after, min_slots, expose_all):
    rules = TagRules(expose_all=expose_all, reserved_ports=frozenset({80}))
    old_services, new_services = as_services(before), as_services(after)
    old = build_table(old_services, None, min_slots, rules)
    changed = {n for n in old_services.keys() | new_services.keys() if old_services.get(n) != new_services.get(n)}
    old.routes_of("")                      # the service index built, so update_table carries it forward
    updated = update_table(old, new_services, changed, min_slots, rules)
    full = build_table(new_services, old, min_slots, rules)
    assert updated == full
    assert list(updated.by_name) == list(full.by_name) == sorted(full.by_name)
    assert updated._by_service is not None   # carried, not rebuilt
    assert {s: updated.routes_of(s) for s in old_services.keys() | new_services.keys()} == \
        {s: full.routes_of(s) for s in old_services.keys() | new_services.keys()}
    assert sorted(map(str, updated.problems)) == sorted(map(str, full.problems))


def test_update_table_breaks_a_slot_key_tie_as_a_full_build_does():
    # Two services of one route with the same service ID on the same node (one slot key): the
    # incremental path must keep the one a full build keeps, whichever service changed.
    before = {"web": (inst("a", healthy=False),), "web-80": (inst("a", port=8001, service="web-80", node="n2"),)}
    after = {"web": (inst("a", healthy=False), inst("a", node="n2")), "web-80": before["web-80"]}
    old = build_table(before, None, 1)
    new = update_table(old, after, {"web"}, 1)
    assert new == build_table(after, old, 1)
    assert [(s.address, s.port) for s in new.get("web-80").servers] == [("10.0.0.1", 8001)]


def test_update_table_reuses_untouched_routes():
    old, _ = table(inst("a"), inst("x", service="api"))
    services = {"web": (inst("a"), inst("b", port=8001)), "api": (inst("x", service="api"),)}
    new = update_table(old, services, {"web"})
    assert new.get("api-80") is old.get("api-80")
    assert slots(new) == ["a", "b", None, None]
