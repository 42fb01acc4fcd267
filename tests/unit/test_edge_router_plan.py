"""Routers in the table and the plan: a new path route is map commands, not a reload."""

import pytest

from edge.routing.grammars import GRAMMARS
from edge.routing.maps import router_id
from edge.routing.model import Instance
from edge.routing.plan import make_plan
from edge.routing.routers import HTTP, Router
from edge.routing.table import TagRules, build_table, update_table

ALL = TagRules(tuple(GRAMMARS), True)


def services(**tags_by_service):
    return {name: (Instance(name, "n1", f"{name}-1", "10.0.0.1", 8000 + i, 80, True, tuple(sorted(tags))),)
            for i, (name, tags) in enumerate(sorted(tags_by_service.items()))}


def plan(before, after, rules=ALL):
    old = build_table(before, rules=rules)
    return make_plan(old, update_table(old, after, set(before) | set(after), rules=rules))


def rid(host="", path="/", exact=False):
    return router_id(Router(HTTP, host=host, path=path, exact=exact))


def test_a_new_path_route_to_an_existing_backend_is_map_commands():
    p = plan(services(api=["edge.route=/x"], web=[]),
             services(api=["edge.route=/x", "edge.route=a.example.com/v1 strip"], web=[]))
    assert not p.reload
    r = rid("a.example.com", "/v1")
    assert list(p.commands) == [f"add map routers.map {r} be_api-80", f"add map strip.map {r} 3",
                                f"add map paths.map a.example.com/v1 {r}"]
    assert p.changes == ("+ router a.example.com/v1 -> api-80",)


def test_a_route_moved_to_another_backend_and_one_removed():
    p = plan(services(api=["edge.route=/x", "edge.route=/y exact"], web=[]), services(api=[], web=["edge.route=/x"]))
    r, y = rid("", "/x"), rid("", "/y", exact=True)
    assert list(p.commands) == [f"set map routers.map {r} be_web-80", "del map paths_exact.map /y",
                                f"del map routers.map {y}"]
    assert not p.reload


def test_a_redirect_route_is_map_data():
    p = plan(services(web=["edge.route=/x"]), services(web=["edge.route=/x", "urlprefix-a.example.com/ "
                                                                             "redirect=301,https://b.example.com$path"]))
    r = rid("a.example.com")
    assert f"add map redirects.map {r} 301||https://b.example.com|||p" in p.commands and not p.reload


@pytest.mark.parametrize("before, after, reason", [
    (services(web=[]), services(web=["edge.route=/x"]), "the first HTTP router (the frontend gains its lookups)"),
    (services(web=["edge.route=/x"]), services(web=[]), "no HTTP router left (the frontend drops its lookups)"),
    (services(web=["edge.route=/x"]), services(web=["edge.route=/x"], api=["edge.route=/y"]), "vhost added: api-80"),
    (services(web=[]), services(web=["edge.host=w.example.com"]), "hosts of web-80 changed"),
    (services(web=[]), services(web=["edge.sticky=S"]), "options of web-80 changed: sticky=S"),
    (services(web=[]), services(web=["edge.expose=false"]), "vhost removed: web-80"),
])
def test_what_the_runtime_cannot_do_is_a_reload_with_a_reason(before, after, reason):
    p = plan(before, after)
    assert p.reload and any(r.startswith(reason) for r in p.reasons), p.reasons


def test_expose_tagged_routes_only_opted_in_services_and_routers():
    rules = TagRules(("edge",), False)
    table = build_table(services(plain=[], optin=["edge.expose=true"], routed=["edge.route=/r"]), rules=rules)
    assert table.names == ("optin-80", "routed-80")
    assert table.get("optin-80").vhost and not table.get("routed-80").vhost


def test_a_whole_host_router_is_a_host_map_entry_as_edge_host_always_was():
    table = build_table(services(web=["urlprefix-www.example.com/", "edge.host=w2.example.com"]), rules=ALL)
    assert table.get("web-80").hosts == ("w2.example.com", "www.example.com")


def test_access_rules_are_configuration_a_reload_with_the_router_named():
    p = plan(services(web=["edge.route=/x"]), services(web=["edge.route=/x allow=127.0.0.1"]))
    assert p.reload and p.reasons == ("access rules (allow, deny, basic auth) changed: */x",)


def test_a_weighted_split_is_map_data_and_its_weights_change_live():
    before = services(old=["edge.route=/c"], new=["edge.route=/c weight=10"])
    after = services(old=["edge.route=/c"], new=["edge.route=/c weight=50"])
    p = plan(before, after)
    assert not p.reload
    assert list(p.commands) == [f"set map splits.map {rid('', '/c')} 500|be_new-80|1000|be_old-80|1000|be_old-80|"
                                "1000|be_old-80"]


def test_server_weights_change_live_and_a_freed_slot_gets_the_default_back():
    p = plan(services(web=["edge.route=/x", "edge.weight=10"]), services(web=["edge.route=/x", "edge.weight=20"]))
    assert list(p.commands) == ["set server be_web-80/s1 weight 20"] and not p.reload
    old = build_table(services(web=["edge.weight=10"]), rules=ALL)
    p = make_plan(old, update_table(old, {"web": ()} | services(x=[]), {"web", "x"}, rules=ALL))
    assert p.reload   # the route goes: a reload (its slot with it)


@pytest.mark.parametrize("shares, value", [
    ((100, 0), "100|be_a-80|1000|be_b-80"),             # permille
    ((0, 0, 500), "250|be_a-80|500|be_b-80|1000|be_c-80"),
    ((600, 600), "500|be_a-80|1000|be_b-80"),          # more than the whole: scaled, as fabio does
    ((100, 300), "250|be_a-80|1000|be_b-80"),          # less, and no one takes the rest: scaled too
])
def test_split_values(shares, value):
    from edge.routing.maps import split_value
    parts = [Router(HTTP, backend=f"{n}-80", path="/", share=s) for n, s in zip("abc", shares, strict=False)]
    assert split_value(parts).startswith(value)


def test_a_whole_host_split_between_services_is_routed_by_the_maps():
    table = build_table(services(stable=["edge.route=w.example.org/"], canary=["edge.route=w.example.org/ weight=20"]),
                        rules=ALL)
    assert table.get("stable-80").hosts == () and len(table.routers) == 2
    from edge.routing.maps import SPLITS_MAP, router_maps
    assert router_maps(table.routers)[SPLITS_MAP] == {
        rid("w.example.org"): "200|be_canary-80|1000|be_stable-80|1000|be_stable-80|1000|be_stable-80"}


def test_a_tcp_route_is_a_reload_and_its_slots_change_in_both_backends_live():
    rules = TagRules(("edge",), True, frozenset({80}), False)
    before = {"redis": (Instance("redis", "n1", "r1", "10.0.0.1", 7000, 6379, True, ("edge.tcp=6379",)),)}
    after = {"redis": before["redis"] + (Instance("redis", "n1", "r2", "10.0.0.2", 7001, 6379, True,
                                                  ("edge.tcp=6379",)),)}
    old = build_table({}, rules=rules)
    first = make_plan(old, update_table(old, before, {"redis"}, rules=rules))
    assert "TCP/SNI router added: tcp :6379" in first.reasons
    table = build_table(before, rules=rules)
    p = make_plan(table, update_table(table, after, {"redis"}, rules=rules))
    assert not p.reload
    assert list(p.commands) == ["set server be_redis-6379/s2 addr 10.0.0.2 port 7001",
                                "set server tcp_redis-6379/s2 addr 10.0.0.2 port 7001",
                                "set server be_redis-6379/s2 state ready", "set server tcp_redis-6379/s2 state ready"]
