"""The edge against a real Consul agent and a real HAProxy: routing rules and live churn.

Every test runs in both watch modes (`--consul-api internal` and `public`) on every supported
HAProxy (tests/integration/conftest.py); per mode and release, one Consul agent and one edge
(reading every tag grammar) serve the whole module, and each test uses its own service names,
hosts and paths.
"""

import http.client
import re
from pathlib import Path

import pytest

from tests.integration.edge_helpers import (
    answers,
    config_text,
    deregister,
    logged,
    register,
    register_on_node,
    reloads,
    set_ttl,
    status_of,
)
from tests.support.edge import EdgeProcess
from tests.support.http import Backend
from tests.support.procs import consul_agent, wait_until

pytestmark = pytest.mark.integration
DOMAIN = "test.example"


@pytest.fixture(scope="module", params=["internal", "public"])
def consul(request, tmp_path_factory, haproxy):
    """A Consul per watch mode (every routing test runs against both) and per HAProxy release (what
    one release's run registered is not seen by the next)."""
    with consul_agent(tmp_path_factory.mktemp("consul")) as agent:
        agent.watch_mode = request.param
        yield agent


@pytest.fixture(scope="module")
def edge(consul, haproxy):
    proc = EdgeProcess(consul.url, domains=(DOMAIN,), extra=("--consul-api", consul.watch_mode,
                                                             "--tag-grammar", "edge,fabio,traefik"),
                       haproxy=haproxy.path).start()
    # Every test starts from an edge that has applied Consul's state once, so a test's first
    # vhost is its own "vhost added" reload, never folded into the initial sync (a test run alone).
    try:
        logged(proc, "because initial sync", 10)
        yield proc
    finally:
        proc.stop()
        print(proc.log()[-5000:])


@pytest.fixture
def backends():
    made = []

    def make(name, echo_path=False):
        made.append(Backend(name, echo_path=echo_path))
        return made[-1]
    yield make
    for b in made:
        b.close()


def test_the_edge_logs_once_what_its_haproxy_is_and_supports(edge, haproxy):
    logged(edge, f"HAProxy {haproxy.full}: add/del backend")
    lines = [line for line in edge.log().splitlines() if f"HAProxy {haproxy.full}: add/del backend" in line]
    assert len(lines) == 1, edge.log()[-3000:]
    assert ("add/del backend yes/yes" in lines[0]) == (haproxy.release >= (3, 4))


def test_balances_over_every_instance_across_nodes(consul, edge, backends):
    a, b = backends("rr-a"), backends("rr-b")
    register(consul, "rr", "rr-1", a)
    register_on_node(consul, "other-node", "rr", "rr-2", b)
    answers(edge, f"rr-80.{DOMAIN}", {"rr-a", "rr-b"})
    # Host matching ignores case and the port.
    assert edge.get(f"RR-80.Test.Example:{edge.port}")[0] == 200


@pytest.mark.parametrize("name, sid, cport, host", [
    ("redis", "t2.harbur.io:silly_wright:6379", None, "redis-6379"),   # gliderlabs ID gives the port
    ("multi-443", "m1", 443, "multi-443"),                             # not suffixed twice
])
def test_route_naming(consul, edge, backends, name, sid, cport, host):
    register(consul, name, sid, backends(name), cport=cport)
    answers(edge, f"{host}.{DOMAIN}", {name})


def test_registered_port_when_nothing_else_names_one(consul, edge, backends):
    b = backends("plain")
    register(consul, "plain", "plain-1", b, cport=None)
    answers(edge, f"plain-{b.port}.{DOMAIN}", {"plain"})


def test_instance_churn_is_applied_live_without_reload(consul, edge, backends):
    a, b = backends("churn-a"), backends("churn-b")
    register(consul, "churn", "churn-1", a, ttl=True)
    answers(edge, f"churn-80.{DOMAIN}", {"churn-a"})
    logged(edge, "vhost added: churn-80")
    before = reloads(edge.log())

    register(consul, "churn", "churn-2", b, ttl=True)                   # added
    answers(edge, f"churn-80.{DOMAIN}", {"churn-a", "churn-b"})
    # The file follows the live state (written right after the runtime commands).
    wait_until(lambda: f"server s2 127.0.0.1:{b.port}" in config_text(edge), 2, what="haproxy.cfg updated")

    set_ttl(consul, "churn-1", "critical")                              # health flip
    answers(edge, f"churn-80.{DOMAIN}", {"churn-b"})
    set_ttl(consul, "churn-1", "passing")
    answers(edge, f"churn-80.{DOMAIN}", {"churn-a", "churn-b"})

    consul.api("PUT", "/v1/agent/service/maintenance/churn-2?enable=true&reason=test")   # maintenance
    answers(edge, f"churn-80.{DOMAIN}", {"churn-a"})
    consul.api("PUT", "/v1/agent/service/maintenance/churn-2?enable=false")
    answers(edge, f"churn-80.{DOMAIN}", {"churn-a", "churn-b"})

    deregister(consul, "churn-1")                                        # removed
    answers(edge, f"churn-80.{DOMAIN}", {"churn-b"})
    wait_until(lambda: f"127.0.0.1:{a.port}" not in config_text(edge), 2, what="haproxy.cfg updated")

    c = backends("churn-c")                                              # same ID, new address: in place
    register(consul, "churn", "churn-2", c, ttl=True)
    answers(edge, f"churn-80.{DOMAIN}", {"churn-c"})

    assert reloads(edge.log()) == before, "instance churn must not reload HAProxy"
    assert "applied" in edge.log() and "live" in edge.log()


def test_no_healthy_instance_is_503_and_unknown_host_is_the_landing_page(consul, edge, backends):
    b = backends("sick")
    register(consul, "sick", "sick-1", b, ttl=True)
    answers(edge, f"sick-80.{DOMAIN}", {"sick"})
    set_ttl(consul, "sick-1", "critical")
    status_of(edge, f"sick-80.{DOMAIN}", 503)
    for _ in range(5):  # HAProxy 2.6.12 crashed on an lf-string 503 page: serve it repeatedly
        assert "No healthy instance of sick-80" in edge.get(f"sick-80.{DOMAIN}")[1]
    assert "Segmentation fault" not in edge.log() and "HAProxy exited" not in edge.log()

    status, page = edge.get(f"nope.{DOMAIN}")
    assert status == 404
    links = dict(re.findall(r'<a href="http://([^/"]+)/">[^<]+</a></td><td class="healthy" data-route="[^"]+">(\d+)<',
                            page))
    assert links[f"sick-80.{DOMAIN}"] == "0"
    set_ttl(consul, "sick-1", "passing")
    wait_until(lambda: 'data-route="sick-80">1<' in edge.get(f"nope.{DOMAIN}")[1], 10,
               what="landing page count to follow health")


def test_removing_the_last_instance_removes_the_vhost_with_a_reload(consul, edge, backends):
    register(consul, "gone", "gone-1", backends("gone"))
    answers(edge, f"gone-80.{DOMAIN}", {"gone"})
    logged(edge, "vhost added: gone-80")
    deregister(consul, "gone-1")
    status_of(edge, f"gone-80.{DOMAIN}", 404)
    logged(edge, "because vhost removed: gone-80")


def test_edge_host_tag_adds_an_exact_host(consul, edge, backends):
    register(consul, "tagged", "tagged-1", backends("tagged"), tags=("edge.host=www.tagged.org", "edge.host=bad host"))
    answers(edge, "www.tagged.org", {"tagged"})
    answers(edge, f"tagged-80.{DOMAIN}", {"tagged"})
    logged(edge, "'tagged': tag 'edge.host=bad host': router refused: 'bad host' is not a host name")


def test_slots_grow_when_full(consul, edge, backends):
    names = {f"wide-{i}" for i in range(6)}
    for i, name in enumerate(sorted(names)):
        register(consul, "wide", f"wide-{i}", backends(name))
    answers(edge, f"wide-80.{DOMAIN}", names, timeout=15)

    def slots() -> int:      # the file follows the live change once inputs are quiet (edge.haproxy.writer)
        backend = config_text(edge).split("\nbackend be_wide-80\n")[1].split("\nbackend ")[0]
        return len(re.findall(r"server s\d+ \S+", backend))
    wait_until(lambda: slots() == 8, 5, what="haproxy.cfg declaring 8 slots")


@pytest.mark.parametrize("bad_name", ["bad name", "evil\nbackend injected", 'q"uote', "hash#x", "ünïcode", "x" * 300])
def test_hostile_service_names_are_skipped_and_the_rest_still_routes(consul, edge, backends, bad_name):
    b = backends("fine")
    consul.api("PUT", "/v1/agent/service/register",
               {"Name": bad_name, "ID": f"hostile-{len(bad_name)}", "Address": "127.0.0.1", "Port": b.port})
    register(consul, "fine", "fine-1", b)
    answers(edge, f"fine-80.{DOMAIN}", {"fine"})
    logged(edge, f"skipping service {bad_name!r}")
    assert "injected" not in config_text(edge)
    assert edge.proc.poll() is None


def test_hostile_instance_data_is_skipped_per_instance(consul, edge, backends):
    b = backends("mixed")
    register(consul, "mixed", "mixed-ok", b)
    consul.api("PUT", "/v1/agent/service/register",
               {"Name": "mixed", "ID": "mixed-bad", "Address": "not an ip\nserver x 1.1.1.1:80", "Port": 1})
    answers(edge, f"mixed-80.{DOMAIN}", {"mixed"})
    wait_until(lambda: "mixed/mixed-bad" in edge.log() and "not a usable IP address" in edge.log(), 5,
               what="bad instance logged")
    assert "1.1.1.1" not in config_text(edge)


def test_without_a_domain_any_suffix_matches_the_first_label(consul, backends, haproxy):
    register(consul, "anydomain", "anydomain-1", backends("any"))
    edge = EdgeProcess(consul.url, domains=(), extra=("--consul-api", consul.watch_mode), haproxy=haproxy.path).start()
    try:
        answers(edge, "anydomain-80.t2.example.com", {"any"})
        answers(edge, f"ANYDOMAIN-80.localhost:{edge.port}", {"any"})
        assert edge.get("anydomain-80")[0] == 404          # `R.<anything>`: a bare label is not a vhost
        assert edge.get("other-80.t2.example.com")[0] == 404
    finally:
        edge.stop()


# --- routers from tags --------------------------------------------------------------------------
def fetch(edge, host: str, path: str) -> tuple[int, str, str]:
    """GET without following redirects: (status, body, Location)."""
    conn = http.client.HTTPConnection(edge.address, edge.port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": host, "Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace"), resp.getheader("Location") or ""
    finally:
        conn.close()


def serves(edge, host: str, path: str, body: str, timeout: float = 10.0) -> None:
    wait_until(lambda: fetch(edge, host, path)[:2] == (200, body), timeout,
               what=f"{host}{path} answering {body!r}")


def test_path_routes_share_a_host_longest_prefix_wins_and_strip(consul, edge, backends):
    site, api, v2 = backends("site", echo_path=True), backends("api", echo_path=True), backends("v2", echo_path=True)
    register(consul, "pathsite", "pathsite-1", site, tags=("edge.host=paths.example.org",))
    register(consul, "pathapi", "pathapi-1", api, tags=("edge.route=paths.example.org/api strip",))
    register(consul, "pathv2", "pathv2-1", v2, tags=("edge.route=paths.example.org/api/v2",))
    serves(edge, "paths.example.org", "/api/users?id=1", "api /users?id=1")     # stripped, query kept
    serves(edge, "paths.example.org", "/api", "api /")
    serves(edge, "paths.example.org", "/api/v2/x", "v2 /api/v2/x")             # the longer prefix, not stripped
    serves(edge, "paths.example.org", "/about", "site /about")                  # the host's own route
    serves(edge, "Paths.Example.ORG:80", "/api/x", "api /x")
    assert fetch(edge, "other.example.org", "/api/x")[0] == 404


def test_a_new_path_route_costs_no_reload(consul, edge, backends):
    live = backends("live", echo_path=True)
    first = reloads(edge.log())
    register(consul, "liveroute", "liveroute-1", live, tags=("edge.route=live.example.org/a",))
    serves(edge, "live.example.org", "/a/1", "live /a/1")
    wait_until(lambda: reloads(edge.log()) > first, 5, what="the reload that brought the backend logged")
    before = reloads(edge.log())
    register(consul, "liveroute", "liveroute-1", live, tags=("edge.route=live.example.org/a",
                                                             "edge.route=live.example.org/b strip"))
    serves(edge, "live.example.org", "/b/2", "live /2")
    assert reloads(edge.log()) == before, "a path route to a backend HAProxy has is a map entry, not a reload"
    logged(edge, "+ router live.example.org/b -> liveroute-80")
    wait_until(lambda: "live.example.org/b" in Path(edge.state_dir, "paths.map").read_text(), 3,
               what="paths.map on disk following the live map")


def test_a_redirect_route(consul, edge, backends):
    register(consul, "apex", "apex-1", backends("apex"),
             tags=("edge.route=apex.example.org/ redirect=301,https://www.apex.example.org$path",))
    wait_until(lambda: fetch(edge, "apex.example.org", "/a/b?c=1")[0] == 301, 10, what="redirect")
    assert fetch(edge, "apex.example.org", "/a/b?c=1")[2] == "https://www.apex.example.org/a/b?c=1"


def test_a_fabio_users_tags_route_as_fabio_documents(consul, edge, backends):
    """fabio's quickstart examples: path, host+path, host catch-all, strip, redirect."""
    css, static, mysite, foo = (backends(n, echo_path=True) for n in ("f-css", "f-static", "f-mysite", "f-foo"))
    register(consul, "fcss", "fcss-1", css, tags=("urlprefix-/fcss",))
    register(consul, "fstatic", "fstatic-1", static, tags=("urlprefix-i.example.net/static",))
    register(consul, "fmysite", "fmysite-1", mysite, tags=("urlprefix-mysite.example.net/",))
    register(consul, "ffoo", "ffoo-1", foo, tags=("urlprefix-/ffoo/bar strip=/ffoo",
                                                  "urlprefix-/fpath redirect=303,https://www.foo.example$path"))
    serves(edge, "anything.example.net", "/fcss/site.css", "f-css /fcss/site.css")
    serves(edge, "i.example.net", "/static/logo.png", "f-static /static/logo.png")
    serves(edge, "mysite.example.net", "/any/thing", "f-mysite /any/thing")
    serves(edge, "i.example.net", "/ffoo/bar/baz", "f-foo /bar/baz")
    assert fetch(edge, "x.example.net", "/fpath/q")[::2] == (303, "https://www.foo.example/fpath/q")


def test_a_traefik_users_tags_route_as_traefik_documents(consul, edge, backends):
    """Traefik's Consul Catalog examples: a rule, a custom port, stripprefix, basicauth refused."""
    real = backends("t-web", echo_path=True)
    register(consul, "tweb", "tweb-1", backends("wrong-port"), tags=(
        "traefik.http.routers.my-service.rule=Host(`traefik.example.net`) && PathPrefix(`/app`)",
        "traefik.http.routers.my-service.service=my-service",
        "traefik.http.routers.my-service.middlewares=strip",
        "traefik.http.middlewares.strip.stripprefix.prefixes=/app",
        f"traefik.http.services.my-service.loadbalancer.server.port={real.port}",
        "traefik.http.routers.admin.rule=Host(`traefik.example.net`) && PathPrefix(`/admin`)",
        "traefik.http.routers.admin.middlewares=auth",
        "traefik.http.middlewares.auth.basicauth.users=test:$apr1$H6uskkkW$IgXLP6ewTrSuBkTrqE8wj/"))
    serves(edge, "traefik.example.net", "/app/page", "t-web /page")
    logged(edge, "router admin refused")
    assert fetch(edge, "traefik.example.net", "/admin/x")[0] == 404, "a refused router is never open"


def test_expose_tagged_and_opt_out(consul, backends, haproxy):
    register(consul, "quiet", "quiet-1", backends("quiet"))
    register(consul, "loud", "loud-1", backends("loud"), tags=("edge.expose=true",))
    register(consul, "secret", "secret-1", backends("secret"), tags=("edge.expose=false", "edge.route=/secret"))
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), extra=("--consul-api", consul.watch_mode,
                                                             "--expose", "tagged"),
                       haproxy=haproxy.path).start()
    try:
        answers(edge, f"loud-80.{DOMAIN}", {"loud"})
        assert edge.get(f"quiet-80.{DOMAIN}")[0] == 404
        assert edge.get("any.example.org", "/secret")[0] == 404
    finally:
        edge.stop()
