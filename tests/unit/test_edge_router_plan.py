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
