"""Routers and backends taken together: exposure, option merging, conflicts between services,
and hostile tags through every grammar (nothing unsafe comes out)."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.routing.grammars import GRAMMARS, read_service
from edge.routing.model import Instance
from edge.routing.routers import (
    HASH_RE,
    HTTP,
    PATH_RE,
    SNI,
    TCP,
    BackendOptions,
    Origin,
    Refused,
    Router,
    cidrs,
    duration_ms,
    resolve,
)

ALL = tuple(GRAMMARS)


def inst(service, sid, tags=(), cport=80, meta=()):
    return Instance(service, "n1", sid, "10.0.0.1", 20000 + len(sid), cport, True, tuple(sorted(tags)), meta)


def test_routers_get_their_instance_route_as_backend():
    routing = read_service("api", [inst("api", "a1", ["edge.route=/v1"]), inst("api", "a2", ["edge.route=/v1"],
                                                                                cport=8080)])
    assert sorted((r.backend, r.path) for r in routing.routers) == [("api-80", "/v1"), ("api-8080", "/v1")]


@pytest.mark.parametrize("tags, expose_all, vhosts, routers", [
    ((), True, True, 0),                                   # today's default: every service
    ((), False, False, 0),                                 # --expose tagged: not without opting in
    (("edge.expose=true",), False, True, 0),
    (("traefik.enable=true",), False, True, 0),
    (("edge.route=/x",), False, False, 1),                 # a router is explicit: routed, no vhost
    (("edge.expose=false", "edge.route=/x"), True, False, 0),   # opted out: nothing at all
    (("traefik.enable=false", "urlprefix-/x"), True, False, 0),
])
def test_exposure(tags, expose_all, vhosts, routers):
    routing = read_service("svc", [inst("svc", "s1", tags)], ALL, expose_all)
    assert routing.vhosts is vhosts and len(routing.routers) == routers


def test_an_opt_out_on_any_instance_wins():
    routing = read_service("svc", [inst("svc", "s1", ["edge.expose=true"]), inst("svc", "s2", ["edge.expose=false"])])
    assert not routing.vhosts and routing.routers == ()


def test_grammars_not_chosen_are_not_read():
    tags = ["urlprefix-/f", "traefik.http.routers.r.rule=PathPrefix(`/t`)", "edge.route=/e"]
    assert [r.path for r in read_service("svc", [inst("svc", "s1", tags)]).routers] == ["/e"]
    assert sorted(r.path for r in read_service("svc", [inst("svc", "s1", tags)], ALL).routers) == ["/e", "/f", "/t"]


def test_backend_options_merge_and_a_disagreement_is_settled_and_logged():
    routing = read_service("svc", [inst("svc", "s1", ["edge.sticky=A", "edge.maxconn=5"]),
                                   inst("svc", "s2", ["edge.sticky=B", "edge.maxconn=5"])])
    assert routing.options_of("svc-80") == BackendOptions(sticky="A", maxconn=5)
    (problem,) = routing.problems
    assert "backend svc-80: sticky is set differently by" in str(problem) and "'A'" in str(problem)
    assert routing.options_of("other-80") == BackendOptions()


def test_server_weights_per_instance():
    routing = read_service("svc", [inst("svc", "s1", ["edge.weight=10"]), inst("svc", "s2")])
    assert routing.weights == ((("n1", "s1"), 10),)


def router(backend, path="/", share=0, **kw):
    return Router(HTTP, backend=backend, host="a.example.com", path=path, share=share,
                  origin=Origin("edge", backend.split("-")[0], f"edge.route=a.example.com{path}"), **kw)


def test_two_services_on_one_match_lowest_backend_wins_logged():
    winners, problems = resolve([router("b-80"), router("a-80"), router("c-80", path="/c")])
    assert [(r.backend, r.path) for r in winners] == [("a-80", "/"), ("c-80", "/c")]
    (problem,) = problems
    assert str(problem) == "'a.example.com': claimed by routes ['a-80', 'b-80']; a-80 keeps it"
    assert resolve([router("a-80"), router("b-80")]) == resolve([router("b-80"), router("a-80")])


def test_weights_split_a_match_between_services():
    winners, problems = resolve([router("old-80"), router("new-80", share=50)])
    assert sorted((r.backend, r.share) for r in winners) == [("new-80", 50), ("old-80", 0)] and problems == ()


def test_a_split_needs_routers_that_agree_on_everything_else():
    winners, problems = resolve([router("old-80"), router("new-80", share=50, allow=("10.0.0.0/8",))])
    assert [r.backend for r in winners] == ["new-80"]
    assert "a weighted split needs routers that differ in backend and weight only" in str(problems[0])


def test_one_backend_two_grammars_first_origin_applies():
    a = Router(HTTP, backend="s-80", host="a.example.com", origin=Origin("edge", "s", "edge.host=a.example.com"))
    b = Router(HTTP, backend="s-80", host="a.example.com", strip="", allow=("10.0.0.0/8",),
               origin=Origin("fabio", "s", "urlprefix-a.example.com/ allow=10.0.0.0/8"))
    winners, problems = resolve([b, a])
    assert winners == (a,) and "routers disagree" in str(problems[0])
    assert resolve([a, a]) == ((a,), ())


@pytest.mark.parametrize("text, expected", [
    ("10.0.0.1", ("10.0.0.1/32",)), ("10.0.0.5/8", ("10.0.0.0/8",)), ("ip:::1", ("::1/128",)),
    ("1.2.3.4, 1.2.3.4", ("1.2.3.4/32",)),
])
def test_cidrs(text, expected):
    assert cidrs(text) == expected


@pytest.mark.parametrize("text, ms", [("1ms", 1), ("30s", 30000), ("2m", 120000), ("1h", 3600000), ("5", 5000)])
def test_durations(text, ms):
    assert duration_ms(text) == ms


@pytest.mark.parametrize("text", ["", "-1s", "1d", "1.5s", "25h", "0"])
def test_bad_durations(text):
    with pytest.raises(Refused):
        duration_ms(text)


# --- hostile tags: whatever a grammar accepts is safe in haproxy.cfg and in maps ------------------
SAFE = re.compile(r"^[A-Za-z0-9._~!*+,=:@/$-]*$")
pieces = st.sampled_from([
    "edge.route=", "edge.host=", "edge.tcp=", "edge.sni=", "urlprefix-", "traefik.http.routers.r.rule=",
    "traefik.http.routers.r.middlewares=m", "traefik.http.middlewares.m.stripprefix.prefixes=",
    "traefik.http.middlewares.m.basicauth.users=", "traefik.http.middlewares.m.redirectregex.regex=",
    "traefik.http.middlewares.m.redirectregex.replacement=", "traefik.tcp.routers.t.rule=",
    "traefik.tcp.routers.t.tls.passthrough=true", "Host(`", "PathPrefix(`", "`)", " && ", " || ", "/",
    "a.example.com", "*.example.com", " strip", " exact", " redirect=301,", "https://x.example.com", "$path",
    " allow=", "10.0.0.0/8", " auth=", "u:$6$saltsalt$hash.hash", "\n", " ", "\"", "'", "#", ";", "%", "\\",
    "{", "}", "backend x", " weight=", "0.5", ":6379", " proto=tcp", "${1}", "^https?://", "(.*)",
])
hostile_tag = st.one_of(st.lists(pieces, max_size=8).map("".join), st.text(max_size=60))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile_tag, max_size=8), st.lists(st.tuples(st.sampled_from(["edge-route", "edge-host", "x"]),
                                                             st.text(max_size=30)), max_size=3))
def test_hostile_tags_never_yield_an_unsafe_value(tags, meta):
    routing = read_service("svc", [inst("svc", "s1", tags, meta=tuple(meta))], ALL)
    for r in routing.routers:
        assert r.kind in (HTTP, TCP, SNI)
        assert r.backend == "svc-80"
        assert r.host == "" or re.fullmatch(r"(\*\.)?[a-z0-9_.-]+", r.host), r.host
        assert PATH_RE.match(r.path) and (not r.strip or (PATH_RE.match(r.strip) and r.path.startswith(r.strip)))
        assert 0 <= r.port < 65536 and 0 <= r.share <= 1000
        for cidr in r.allow + r.deny:
            assert re.fullmatch(r"[0-9a-f.:/]+", cidr), cidr
        for cred in r.users:
            assert re.fullmatch(r"[A-Za-z0-9._-]+", cred.user) and HASH_RE.match(cred.hash)
        if r.redirect:
            assert SAFE.match(r.redirect.location) and r.redirect.code in (301, 302, 303, 307, 308)
    for _, options in routing.options:
        assert options.protocol in ("h1", "h2c", "https", "h2")
        assert re.fullmatch(r"[A-Za-z0-9_-]*", options.sticky)
    for problem in routing.problems:
        assert problem.subject == "svc"
