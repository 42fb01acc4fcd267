"""The edge against a real Consul agent and a real HAProxy: routing rules and live churn.

Every test runs in both watch modes (`--consul-api internal` and `public`) on every supported
HAProxy (tests/integration/conftest.py); per mode and release, one Consul agent and one edge
serve the whole module, and each test uses its own service names.
"""

import re

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
    proc = EdgeProcess(consul.url, domains=(DOMAIN,), extra=("--consul-api", consul.watch_mode),
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

    def make(name):
        made.append(Backend(name))
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
    logged(edge, "edge.host tag 'bad host' is not a host name")


def test_slots_grow_when_full(consul, edge, backends):
    names = {f"wide-{i}" for i in range(6)}
    for i, name in enumerate(sorted(names)):
        register(consul, "wide", f"wide-{i}", backends(name))
    answers(edge, f"wide-80.{DOMAIN}", names, timeout=15)
    backend = config_text(edge).split("\nbackend be_wide-80\n")[1].split("\nbackend ")[0]
    assert len(re.findall(r"server s\d+ \S+", backend)) == 8


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
