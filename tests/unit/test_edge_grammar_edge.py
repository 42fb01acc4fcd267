"""The edge's own tag grammar (`edge.` tags and `edge-` meta), table-driven, refusals included."""

import pytest

from edge.routing.grammars import edge
from edge.routing.routers import Router
from tests.unit.grammar_cases import options, routes, warnings

HASH = "$2y$05$5TYb/9rlrVH4TvRDtP2HJOAAbgNQaBlIfsFpi2T8.YmDdUmR4kTK."


@pytest.mark.parametrize("tag, expected", [
    ("edge.host=www.example.org", ["www.example.org"]),
    ("edge.host=WWW.Example.org.", ["www.example.org"]),
    ("edge.route=api.example.com/v1", ["api.example.com/v1"]),
    ("edge.route=/static", ["*/static"]),
    ("edge.route=*.example.com/", ["*.example.com"]),
    ("edge.route=example.com/ redirect=301,https://www.example.com$path",
     ["example.com redirect=301,https://www.example.com+path"]),
    ("edge.route=example.com/old redirect=302,https://new.example.com/here",
     ["example.com/old redirect=302,https://new.example.com/here"]),
    ("edge.route=a.example.com/api strip", ["a.example.com/api strip=/api"]),
    ("edge.route=a.example.com/api/v1 strip=/api", ["a.example.com/api/v1 strip=/api"]),
    ("edge.route=a.example.com/health exact", ["a.example.com/health (exact)"]),
    ("edge.route=a.example.com/ allow=127.0.0.1,10.0.0.0/8 deny=10.1.2.3",
     ["a.example.com allow=10.0.0.0/8,127.0.0.1/32 deny=10.1.2.3/32"]),
    (f"edge.route=a.example.com/admin auth=alice:{HASH}", ["a.example.com/admin auth=alice"]),
    ("edge.route=a.example.com/ weight=5", ["a.example.com share=5%"]),
    ("edge.route=a.example.com/ weight=2.5", ["a.example.com share=2.5%"]),
    ("edge.tcp=6379", ["tcp :6379"]),
    ("edge.tcp=6379 allow=127.0.0.1", ["tcp :6379 allow=127.0.0.1/32"]),
    ("edge.sni=db.example.com", ["sni db.example.com"]),
    ("edge.sni=*.db.example.com", ["sni *.db.example.com"]),
    ("urlprefix-/x", []),                     # not ours
    ("edgy.host=x.example.com", []),
])
def test_routers(tag, expected):
    parsed = edge.parse("web", [tag])
    assert routes(parsed) == expected
    assert warnings(parsed) == []


@pytest.mark.parametrize("tag, warning", [
    ("edge.host=bad host", "router refused: 'bad host' is not a host name"),
    ("edge.host=*.example.com", "is not a host name"),          # edge.host stays exact, as before
    ("edge.route=example.com", "has no path"),
    ("edge.route=", "empty value"),
    ("edge.route=bad_host!/x", "is not a host name"),
    ("edge.route=*.com/", "not a wildcard host"),
    ("edge.route=a.example.com/x y", "unknown option 'y'"),
    ("edge.route=a.example.com/a;b", "path '/a;b' is not usable"),
    ("edge.route=a.example.com/%2e", "is not usable"),
    ("edge.route=a.example.com/" + "x" * 250, "is not usable"),
    ("edge.route=a.example.com/x\nbackend evil", "unknown option"),
    ("edge.route=a.example.com/ allow=10.0.0.0/33", "is not an address or a network"),
    ("edge.route=a.example.com/ allow=", "is not an address"),
    ("edge.route=a.example.com/ auth=alice:secret", "clear passwords and $apr1$/{SHA} are refused"),
    ("edge.route=a.example.com/ auth=alice:$apr1$H6uskkkW$IgXLP6ewTrSuBkTrqE8wj/", "is not a crypt(3) hash"),
    (f"edge.route=a.example.com/ auth=al ice:{HASH}", "the password of 'al' is not a crypt(3) hash"),
    (f"edge.route=a.example.com/ auth=alice:{HASH},alice:{HASH}", "a user is named twice"),
    ("edge.route=a.example.com/ redirect=200,https://x.example.com", "code '200' is not a whole number"),
    ("edge.route=a.example.com/ redirect=301,javascript:alert(1)", "is not http(s)://host"),
    ("edge.route=a.example.com/ redirect=301,https://x.example.com/a b", "unknown option"),
    ("edge.route=a.example.com/ redirect=301,https://x.example.com/a;b", "is not usable"),
    ("edge.route=a.example.com/ weight=0", "is not a percentage above 0"),
    ("edge.route=a.example.com/ weight=101", "is not a percentage"),
    ("edge.route=a.example.com/a strip=/a/b", "applies to some requests of '/a' only"),
    ("edge.tcp=0", "port '0' is not 1-65535"),
    ("edge.tcp=6379 strip", "does not apply to edge.tcp"),
    ("edge.sni=db.example.com auth=a:b", "does not apply to edge.sni"),
    ("edge.proto=h3", "ignored: protocol 'h3' is not one of"),
    ("edge.sticky=bad;cookie", "is not usable"),
    ("edge.timeout-server=forever", "is not a duration"),
    ("edge.timeout-server=0s", "is not between 1 ms and 24 h"),
    ("edge.maxconn=-1", "is not a whole number"),
    ("edge.weight=300", "is not a whole number from 0 to 256"),
    ("edge.expose=maybe", "is not true or false"),
    ("edge.frobnicate=1", "unknown edge key 'frobnicate'"),
])
def test_refusals_name_service_tag_and_what(tag, warning):
    parsed = edge.parse("web", [tag])
    (message,) = warnings(parsed)
    assert message.startswith(f"'web': tag {tag!r}: ")
    assert warning in message
    assert all(r.kind != "http" or r.path.startswith("/") for r in parsed.routers)


def test_a_strip_that_never_applies_is_ignored_with_a_warning():
    parsed = edge.parse("web", ["edge.route=a.example.com/x strip=/y"])
    assert routes(parsed) == ["a.example.com/x"]
    assert "strip '/y' never applies to '/x'; ignored" in warnings(parsed)[0]


@pytest.mark.parametrize("tag, expected", [
    ("edge.proto=h2c", {"protocol": "h2c"}),
    ("edge.proto=https", {"protocol": "https"}),
    ("edge.tls-verify=false", {"verify": False}),
    ("edge.sticky", {"sticky": "edge_sticky"}),
    ("edge.sticky=SRV", {"sticky": "SRV"}),
    ("edge.timeout-connect=500ms", {"connect_timeout": 500}),
    ("edge.timeout-server=2m", {"server_timeout": 120000}),
    ("edge.timeout-server=30", {"server_timeout": 30000}),
    ("edge.maxconn=100", {"maxconn": 100}),
    ("edge.proxy-protocol=true", {"send_proxy": True}),
])
def test_backend_options(tag, expected):
    parsed = edge.parse("web", [tag])
    assert options(parsed) == expected and warnings(parsed) == []


def test_server_weight_and_exposure():
    assert edge.parse("web", ["edge.weight=10"]).weight == 10
    assert edge.parse("web", ["edge.expose=true"]).expose is True
    assert edge.parse("web", ["edge.expose=false", "edge.expose=true"]).expose is False   # an opt-out wins
    assert edge.parse("web", []).expose is None


def test_meta_keys_read_as_tags_several_routes_by_suffix():
    parsed = edge.parse("web", [], [("edge-route-api", "a.example.com/api strip"), ("edge-route-web", "/"),
                                    ("edge-host", "www.example.org"), ("edge-sticky", "S"), ("other", "x")])
    assert routes(parsed) == ["*", "a.example.com/api strip=/api", "www.example.org"]
    assert options(parsed) == {"sticky": "S"}
    assert {r.origin.tag for r in parsed.routers} >= {"meta edge-route-api=a.example.com/api strip"}


def test_routers_carry_their_origin_and_no_backend_yet():
    (router,) = edge.parse("web", ["edge.route=/x"]).routers
    assert router == Router("http", path="/x", origin=router.origin)
    assert (router.origin.grammar, router.origin.service, router.origin.tag) == ("edge", "web", "edge.route=/x")
