"""Rendering routers from tags: golden files per grammar (each passes `haproxy -c`), the lookup
order in maps, and that a table without routers renders as it always did."""

import os
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge import templates_source
from edge.routing.grammars import GRAMMARS
from edge.routing.maps import PATHS_MAP, ROUTERS_MAP, router_id
from edge.routing.model import Instance
from edge.routing.render import Listeners, render
from edge.routing.table import TagRules, build_table
from edge.tls.certs import self_signed
from edge.tls.stage import CertPaths
from tests.support.procs import require

GOLDEN = Path(__file__).parent / "golden"
HASH = "$2y$05$5TYb/9rlrVH4TvRDtP2HJOAAbgNQaBlIfsFpi2T8.YmDdUmR4kTK."
TEMPLATES = templates_source.load(templates_source.bundled())
LISTENERS = Listeners(":80", "127.0.0.1:8404", "/run/haproxy-consul/haproxy.sock", ("t2.example.com",))

TAGS = {
    "edge": {
        "shop": ("edge.route=shop.example.org/api strip", "edge.route=shop.example.org/health exact",
                 "edge.route=*.apps.example.org/", "edge.route=/static", "edge.sticky=SHOP", "edge.maxconn=50",
                 "edge.timeout-server=30s", "edge.timeout-connect=2s", "edge.weight=5"),
        "canary": ("edge.route=shop.example.org/api strip weight=10", "edge.proto=h2c"),
        "admin": ("edge.route=admin.example.org/ allow=10.0.0.0/8 deny=10.9.0.0/16 auth=alice:" + HASH,
                  "edge.proto=https", "edge.tls-verify=false"),
        "web": ("edge.host=www.example.org", "edge.route=example.org/ redirect=301,https://www.example.org$path",
                "edge.proto=h2"),
    },
    "fabio": {   # fabio's quickstart
        "shop": ("urlprefix-/css", "urlprefix-i.com/static", "urlprefix-/foo/bar strip=/foo host=shop.internal"),
        "web": ("urlprefix-mysite.com/", "urlprefix-/path redirect=301,https://www.google.com/"),
    },
    "traefik": {   # Traefik's Consul Catalog and middleware documentation
        "shop": ("traefik.http.routers.shop.rule=Host(`example.com`) && PathPrefix(`/shop`)",
                 "traefik.http.routers.shop.middlewares=strip",
                 "traefik.http.middlewares.strip.stripprefix.prefixes=/shop"),
        "web": ("traefik.enable=true", "traefik.http.routers.web.rule=Host(`example.com`)",
                "traefik.http.routers.web.middlewares=tohttps",
                "traefik.http.middlewares.tohttps.redirectscheme.scheme=https",
                "traefik.http.middlewares.tohttps.redirectscheme.permanent=true"),
    },
}


def table_for(grammar: str):
    services = {name: (Instance(name, "node1", f"{name}-1", "10.0.0.7", 31000 + i, 80, True, tuple(sorted(tags))),)
                for i, (name, tags) in enumerate(sorted(TAGS[grammar].items()))}
    return build_table(services, rules=TagRules(tuple(GRAMMARS), True))


def haproxy_check(rendered, where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.files:
        (where / name).write_text(text)
    result = subprocess.run([require("haproxy"), "-c", "-q", "-C", str(where), "-f", str(where / "haproxy.cfg")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("grammar", sorted(TAGS))
def test_golden_per_grammar(grammar, tmp_path):
    table = table_for(grammar)
    assert not table.problems, table.problems
    rendered = render(table, LISTENERS, TEMPLATES)
    for file_name, text in rendered.files:
        golden = GOLDEN / f"routers-{grammar}.{file_name}"
        if os.environ.get("UPDATE_GOLDEN"):
            golden.write_text(text)
        assert text == golden.read_text(), f"{golden} differs (UPDATE_GOLDEN=1 rewrites it after review)"
    haproxy_check(rendered, tmp_path)


def test_routers_are_keyed_by_match_and_bound_to_backends_through_a_map():
    rendered = render(table_for("edge"), LISTENERS, TEMPLATES)
    paths = dict(line.split(" ") for line in rendered[PATHS_MAP].splitlines())
    backends = dict(line.split(" ") for line in rendered[ROUTERS_MAP].splitlines())
    assert {k: backends[v] for k, v in paths.items()} == {
        "shop.example.org/api": "be_canary-80", "*.apps.example.org/": "be_shop-80", "/static": "be_shop-80",
        "example.org/": "be_web-80", "admin.example.org/": "be_admin-80"}   # /api: the first part of a split
    assert "be_shop-80" not in rendered["haproxy.cfg"].split("frontend http")[1].split("\nbackend ")[0], \
        "no backend is named by a frontend rule of its own"
    assert "www.example.org be_web-80" in rendered["hosts.map"]          # edge.host stays in the host map


def test_no_router_no_router_lines_and_no_router_maps():
    services = {"web": (Instance("web", "n", "w1", "10.0.0.1", 8080, 80, True),)}
    rendered = render(build_table(services), LISTENERS, TEMPLATES)
    assert "txn.router" not in rendered["haproxy.cfg"]
    assert [name for name, _ in rendered.files] == ["haproxy.cfg", "hosts.map", "landing.lf", "routes.map"]


def test_router_ids_are_stable_and_safe():
    (router, *_) = table_for("edge").routers
    assert router_id(router) == router_id(table_for("edge").routers[0])
    assert re.fullmatch(r"r[0-9a-f]{12}", router_id(router))


def test_landing_page_lists_routes_by_path():
    landing = render(table_for("edge"), LISTENERS, TEMPLATES)["landing.lf"]
    assert '<a href="http://shop.example.org%[var(txn.port_suffix)]/api">shop.example.org/api</a>' in landing
    assert "<td>*.apps.example.org</td><td>shop-80</td>" in landing   # a wildcard is no link
    assert "<td>*/static</td>" in landing


def test_edge_routes_lists_every_router_backend_options_and_origin():
    from edge.cli import format_routes
    text = format_routes(table_for("edge"), ("t2.example.com",))
    assert text.startswith("VHOST ")                                    # the vhosts first, as before
    lines = text.split("\n\nROUTER")[1].splitlines()
    assert any(re.fullmatch(r"shop\.example\.org/api\s+be_shop-80\s+strip=/api sticky=SHOP connect_timeout=2000 "
                            r"server_timeout=30000 maxconn=50\s+"
                            r"edge 'edge\.route=shop\.example\.org/api strip' of shop", line) for line in lines), lines
    assert any(re.match(r"shop\.example\.org/api\s+be_canary-80\s+strip=/api share=10% protocol=h2c ", line)
               for line in lines), lines
    assert any(line.startswith("www.example.org ") and "edge.host=www.example.org" in line for line in lines)
    assert text.endswith("8 router(s)\n")


def test_https_and_acme_cover_every_host_a_router_names():
    from edge.routing.render import served_hosts
    hosts = served_hosts(table_for("edge"), ("t2.example.com",))
    assert set(hosts) == {"www.example.org", "shop-80.t2.example.com", "web-80.t2.example.com", "shop.example.org",
                          "example.org", "admin.example.org", "admin-80.t2.example.com", "canary-80.t2.example.com"}
    # the wildcard and the any-host routes name no one host


STREAMS = {"redis": ("edge.tcp=6379 allow=10.0.0.0/8",), "db": ("edge.sni=db.example.org deny=10.9.0.0/16",),
           "pass": ("traefik.tcp.routers.p.rule=HostSNI(`*.pass.example.org`)",
                    "traefik.tcp.routers.p.tls.passthrough=true"),
           "web": ("edge.host=www.example.org",)}


def test_golden_tcp_and_sni_passthrough(tmp_path):
    listeners = Listeners(":80", "127.0.0.1:8404", "/run/haproxy-consul/haproxy.sock", ("t2.example.com",),
                          https=CertPaths(Path("/run/haproxy-consul/certs")).https(":443", True, 0))
    services = {name: (Instance(name, "node1", f"{name}-1", "10.0.0.7", 32000 + i, 80, True, tuple(sorted(tags))),)
                for i, (name, tags) in enumerate(sorted(STREAMS.items()))}
    table = build_table(services, rules=TagRules(tuple(GRAMMARS), True, frozenset({80, 443, 8404}), True))
    assert not table.problems, table.problems
    rendered = render(table, listeners, TEMPLATES)
    for file_name, text in rendered.files:
        golden = GOLDEN / f"streams.{file_name}"
        if os.environ.get("UPDATE_GOLDEN"):
            golden.write_text(text)
        assert text == golden.read_text(), f"{golden} differs (UPDATE_GOLDEN=1 rewrites it after review)"
    check = tmp_path / "certs"
    check.mkdir()
    config = rendered["haproxy.cfg"].replace("/run/haproxy-consul/certs", str(check))
    rendered = type(rendered)(tuple((n, config if n == "haproxy.cfg" else t) for n, t in rendered.files))
    (check / "default.pem").write_text(self_signed("default", datetime.now(UTC)))
    for name in ("crt-list", "acme-challenges.map", "tls-hosts.map"):
        (check / name).write_text("")
    haproxy_check(rendered, tmp_path / "cfg")


def test_sni_passthrough_behind_a_load_balancer_speaking_the_proxy_protocol(tmp_path):
    """--proxy-protocol: the TLS port takes the balancer's header, and the local hop passes the
    client it names on to the terminating side."""
    from dataclasses import replace
    listeners = replace(Listeners(":80", "127.0.0.1:8404", f"{tmp_path}/haproxy.sock", ("t2.example.com",),
                                  https=CertPaths(tmp_path / "certs").https(":443", True, 0)), proxy_protocol=True)
    services = {"db": (Instance("db", "n", "db-1", "10.0.0.7", 32000, 80, True, ("edge.sni=db.example.org",)),)}
    config = render(build_table(services, rules=TagRules(("edge",), True, frozenset({80, 443}), True)), listeners,
                    TEMPLATES)["haproxy.cfg"]
    assert "frontend tls from tcp_streams\n    bind :443 accept-proxy\n" in config
    assert f"    bind unix@{tmp_path}/tls.sock accept-proxy ssl crt" in config
    assert f"    server edge unix@{tmp_path}/tls.sock send-proxy-v2" in config


@pytest.mark.parametrize("tags, https, problem", [
    (("edge.tcp=80",), True, "port 80 is one of the edge's own listeners; router refused"),
    (("edge.sni=db.example.org",), False, "SNI passthrough needs the HTTPS port (--https-bind); router refused"),
])
def test_streams_the_edge_cannot_listen_for(tags, https, problem):
    services = {"x": (Instance("x", "n", "x-1", "10.0.0.1", 5000, 80, True, tags),)}
    table = build_table(services, rules=TagRules(("edge",), True, frozenset({80, 443}), https))
    assert table.routers == () and any(problem in str(p) for p in table.problems), table.problems
