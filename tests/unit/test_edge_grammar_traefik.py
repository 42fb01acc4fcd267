"""Traefik's Consul Catalog tags and rule language, table-driven: documentation examples and refusals."""

import pytest

from edge.routing.grammars import traefik
from edge.routing.grammars.traefik_rule import Match, read_rule
from edge.routing.routers import Refused
from tests.unit.grammar_cases import options, routes, warnings

HASH = "$2y$05$5TYb/9rlrVH4TvRDtP2HJOAAbgNQaBlIfsFpi2T8.YmDdUmR4kTK."


@pytest.mark.parametrize("rule, expected", [
    ("Host(`example.com`)", [Match("example.com")]),
    ("Host(`Example.COM`)", [Match("example.com")]),
    ("HostHeader(`example.com`)", [Match("example.com")]),
    ("Host(`a.example.com`, `b.example.com`)", [Match("a.example.com"), Match("b.example.com")]),
    ("PathPrefix(`/api`)", [Match("", "/api")]),
    ("Path(`/health`)", [Match("", "/health", True)]),
    ("Host(`a.com`) && PathPrefix(`/api`)", [Match("a.com", "/api")]),
    ("Host(`a.com`) && (PathPrefix(`/x`) || Path(`/y`))", [Match("a.com", "/x"), Match("a.com", "/y", True)]),
    ("(Host(`a.com`) || Host(`b.com`)) && PathPrefix(`/p`)", [Match("a.com", "/p"), Match("b.com", "/p")]),
    ("Host(\"a.com\")", [Match("a.com")]),
    ("PathPrefix(`/a`) && PathPrefix(`/a/b`)", [Match("", "/a/b")]),        # the intersection
    ("PathPrefix(`/a`) && Path(`/a/b`)", [Match("", "/a/b", True)]),
    ("Host(`a.example.com`) && HostRegexp(`{sub:[^.]+}.example.com`)", [Match("a.example.com")]),
    ("HostRegexp(`{subdomain:[^.]+}.example.com`)", [Match("*.example.com")]),
    ("HostRegexp(`{subdomain}.example.com`)", [Match("*.example.com")]),
    ("HostRegexp(`^[^.]+\\.example\\.com$`)", [Match("*.example.com")]),
])
def test_rules(rule, expected):
    reading = read_rule(rule)
    assert list(reading.matches) == expected and reading.notes == ()


@pytest.mark.parametrize("rule, notes", [
    ("HostRegexp(`^.+\\.example\\.com$`)", "matches one label under example.com here, not several"),
    ("Host(`a.com`) && Host(`b.com`) || PathPrefix(`/x`)", "can never match; left out"),
])
def test_rules_read_with_a_note(rule, notes):
    reading = read_rule(rule)
    assert reading.matches and notes in " ".join(reading.notes)


@pytest.mark.parametrize("rule, refusal", [
    ("", "empty rule"),
    ("!Host(`a.com`)", "negation (!) cannot be expressed"),
    ("Host(`a.com`) && Method(`GET`)", "method() cannot be expressed"),
    ("Headers(`X`, `y`)", "headers() cannot be expressed"),
    ("ClientIP(`10.0.0.0/8`)", "clientip() cannot be expressed"),
    ("PathRegexp(`^/a`)", "pathregexp() cannot be expressed"),
    ("Path(`/user/{id:[0-9]+}`)", "is not usable"),
    ("Host(`a.com`", "does not parse"),
    ("Host(`a.com`) &&", "does not parse"),
    ("Host(`a.com`) Host(`b.com`)", "unexpected name"),
    ("Host(`*.a.com`)", "is not a host name"),
    ("HostRegexp(`{sub:[a-z]+}.example.com`)", "narrower than any label"),
    ("HostRegexp(`example.*`)", "is not one label under a literal domain"),
    ("Host(`a.com`) && Host(`b.com`)", "can never match"),
    ("Host(`a`,`b`,`c`,`d`,`e`,`f`) && PathPrefix(`/1`,`/2`,`/3`,`/4`,`/5`,`/6`)", "more than 32"),
])
def test_rules_refused(rule, refusal):
    with pytest.raises(Refused, match=None) as info:
        read_rule(rule)
    assert refusal in str(info.value)


DOC = [  # Traefik's Consul Catalog documentation: a custom port, a router, middlewares
    "traefik.enable=true",
    "traefik.http.routers.my-service.rule=Host(`example.com`)",
    "traefik.http.routers.my-service.service=my-service",
    "traefik.http.services.my-service.loadbalancer.server.port=12345",
]


@pytest.mark.parametrize("tags, expected, backend", [
    (DOC, ["example.com"], {"port": 12345}),
    (["traefik.http.routers.myrouter.rule=Host(`example.com`)",
      "traefik.http.routers.myrouter.tls=true", "traefik.http.routers.myrouter.tls.certresolver=myresolver"],
     ["example.com"], {}),
    (["traefik.http.routers.r.rule=Host(`a.com`) && PathPrefix(`/foobar`)", "traefik.http.routers.r.middlewares=sp",
      "traefik.http.middlewares.sp.stripprefix.prefixes=/foobar,/fiibar"], ["a.com/foobar strip=/foobar"], {}),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.http.routers.r.middlewares=ip@consulcatalog",
      "traefik.http.middlewares.ip.ipallowlist.sourcerange=127.0.0.1/32, 192.168.1.7"],
     ["a.com allow=127.0.0.1/32,192.168.1.7/32"], {}),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.http.routers.r.middlewares=ip",
      "traefik.http.middlewares.ip.ipwhitelist.sourcerange=10.0.0.0/8"], ["a.com allow=10.0.0.0/8"], {}),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.http.routers.r.middlewares=auth",
      f"traefik.http.middlewares.auth.basicauth.users=test:{HASH}"], ["a.com auth=test"], {}),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.http.routers.r.middlewares=tohttps",
      "traefik.http.middlewares.tohttps.redirectscheme.scheme=https",
      "traefik.http.middlewares.tohttps.redirectscheme.permanent=true"],
     ["a.com redirect=301,https://<host>+path when http"], {}),
    (["traefik.http.routers.r.rule=Host(`example.com`)", "traefik.http.routers.r.middlewares=www",
      "traefik.http.middlewares.www.redirectregex.regex=^https?://example\\.com/(.*)",
      "traefik.http.middlewares.www.redirectregex.replacement=https://www.example.com/${1}",
      "traefik.http.middlewares.www.redirectregex.permanent=true"],
     ["example.com redirect=301,https://www.example.com+path"], {}),
    (["traefik.http.routers.r.rule=Host(`localhost`)", "traefik.http.routers.r.middlewares=m",
      "traefik.http.middlewares.m.redirectregex.regex=^http://localhost/(.*)",
      "traefik.http.middlewares.m.redirectregex.replacement=http://mydomain/${1}"],
     ["localhost redirect=302,http://mydomain+path when http"], {}),
    (["traefik.http.routers.r.rule=Host(`a.com`)",
      "traefik.http.services.s.loadbalancer.sticky.cookie=true",
      "traefik.http.services.s.loadbalancer.sticky.cookie.name=mycookie"], ["a.com"], {"sticky": "mycookie"}),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.http.services.s.loadbalancer.server.scheme=h2c"],
     ["a.com"], {"protocol": "h2c"}),
    (["traefik.tcp.routers.db.rule=HostSNI(`db.example.com`)", "traefik.tcp.routers.db.tls.passthrough=true"],
     ["sni db.example.com"], {}),
    (["Traefik.HTTP.Routers.R.Rule=Host(`a.com`)"], ["a.com"], {}),                  # keys are case-insensitive
    (["traefik.http.routers.a.rule=Host(`a.com`)", "traefik.http.routers.a.service=api",
      "traefik.http.services.api.loadbalancer.server.port=9000",
      "traefik.http.services.admin.loadbalancer.server.port=9001"], ["a.com"], {"port": 9000}),
])
def test_documented_tag_sets(tags, expected, backend):
    parsed = traefik.parse("svc", tags)
    assert routes(parsed) == expected
    assert options(parsed) == backend
    assert warnings(parsed) == []


def test_enable_is_exposure():
    assert traefik.parse("svc", ["traefik.enable=true"]).expose is True
    assert traefik.parse("svc", ["traefik.enable=false"]).expose is False
    assert traefik.parse("svc", []).expose is None


@pytest.mark.parametrize("tags, warning", [
    (["traefik.http.routers.r.entrypoints=web"], "router r refused: no rule"),
    (["traefik.http.routers.r.rule=Host(`a.com`) && Method(`GET`)"], "method() cannot be expressed"),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.http.routers.r.middlewares=x@file"],
     "middleware 'x@file' is not defined in this service's tags"),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.http.routers.r.middlewares=h",
      "traefik.http.middlewares.h.headers.customrequestheaders.x=1"], "middleware h (headers"),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.http.routers.r.middlewares=a",
      "traefik.http.middlewares.a.basicauth.users=test:$apr1$H6uskkkW$IgXLP6ewTrSuBkTrqE8wj/"],
     "clear passwords and $apr1$/{SHA} are refused"),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.http.routers.r.middlewares=a",
      "traefik.http.middlewares.a.basicauth.usersfile=/etc/htpasswd"], "middleware a (basicauth: usersfile)"),
    (["traefik.http.routers.r.rule=PathPrefix(`/a`)", "traefik.http.routers.r.middlewares=s",
      "traefik.http.middlewares.s.stripprefix.prefixes=/a/b"], "applies to some requests of '/a' only"),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.http.routers.r.middlewares=m",
      "traefik.http.middlewares.m.redirectregex.regex=^https?://a\\.com/old/(.*)",
      "traefik.http.middlewares.m.redirectregex.replacement=https://b.com/${1}"], "is not ^scheme://a.com/(.*)"),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.http.routers.r.middlewares=m",
      "traefik.http.middlewares.m.redirectregex.regex=^https?://a\\.com/(.*)",
      "traefik.http.middlewares.m.redirectregex.replacement=https://b.com/new/${1}"], "is not scheme://host/"),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.http.routers.r.service=other"],
     "service 'other' is not defined"),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.http.services.s1.loadbalancer.server.port=1",
      "traefik.http.services.s2.loadbalancer.server.port=2"], "several services are defined and the router names none"),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.http.routers.r.ruleSyntax=v2",
      "traefik.http.routers.r.observability.accesslogs=false"], "observability.accesslogs cannot be honoured"),
    (["traefik.tcp.routers.t.rule=HostSNI(`db.a.com`)"], "only tls.passthrough=true TCP routers"),
    (["traefik.tcp.routers.t.rule=HostSNI(`*`)", "traefik.tcp.routers.t.tls.passthrough=true"],
     "would take every name"),
])
def test_refused_routers(tags, warning):
    parsed = traefik.parse("svc", tags)
    assert parsed.routers == ()
    assert any(warning in w and w.startswith("'svc': tag ") for w in warnings(parsed)), warnings(parsed)


@pytest.mark.parametrize("tags, warning", [
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.http.routers.r.entrypoints=websecure"],
     "entrypoints of router r is not honoured"),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.http.routers.r.priority=10"], "priority of router r"),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.http.services.s.loadbalancer.healthcheck.path=/h"],
     "loadbalancer.healthcheck.path is not honoured; ignored"),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.frobnicate=1"], "not a key the edge reads; ignored"),
    (["traefik.http.routers.r.rule=Host(`a.com`)", "traefik.enable=maybe"], "not true or false; ignored"),
])
def test_ignored_keys_keep_the_router(tags, warning):
    parsed = traefik.parse("svc", tags)
    assert routes(parsed) == ["a.com"]
    assert any(warning in w for w in warnings(parsed)), warnings(parsed)


def test_one_consul_service_is_one_backend_a_router_to_a_differently_set_up_service_is_refused():
    parsed = traefik.parse("svc", [
        "traefik.http.routers.a.rule=Host(`a.com`)", "traefik.http.routers.a.service=api",
        "traefik.http.routers.b.rule=Host(`b.com`)", "traefik.http.routers.b.service=admin",
        "traefik.http.services.api.loadbalancer.server.port=9000",
        "traefik.http.services.admin.loadbalancer.server.port=9001"])
    assert routes(parsed) == ["a.com"] and options(parsed) == {"port": 9000}
    assert any("router b refused: service admin is set up differently from api" in w for w in warnings(parsed))
