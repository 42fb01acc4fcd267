"""Rendering: golden files for the bundled templates, template errors, and hostile input."""

import os
import re
import subprocess
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import templates_source
from edge.routing.grammars import GRAMMARS
from edge.routing.maps import ROUTER_MAPS
from edge.routing.model import Instance, instances_from_health, route_name
from edge.routing.render import LANDING_MAX_BYTES, Listeners, TemplateError, render
from edge.routing.table import RouteTable, TagRules, build_table
from edge.tls.certs import self_signed
from edge.tls.stage import CertPaths
from tests.support.procs import require

GOLDEN = Path(__file__).parent / "golden"
TEMPLATES = templates_source.load(templates_source.bundled())
LISTENERS = Listeners(":80", "127.0.0.1:8404", "/run/haproxy-consul/haproxy.sock", ("t2.example.com",))


def sample_table() -> RouteTable:
    def i(sid, service, port, cport, healthy=True, tags=()):
        return Instance(service, "node1", sid, "10.0.0.7", port, cport, healthy, tags)
    services = {
        "nginx": (i("t2:web1:80", "nginx", 32768, 80), i("t2:web2:80", "nginx", 32769, 80, healthy=False),
                  i("t2:web3:80", "nginx", 32770, 80, tags=("edge.host=www.example.org",))),
        "whoami": (i("who", "whoami", 8080, 8080),),
    }
    return build_table(services)


@pytest.mark.parametrize("name, listeners", [
    ("domains", LISTENERS),
    ("no-domain", Listeners("127.0.0.1:8080", "127.0.0.1:8404", "/tmp/s/haproxy.sock", ())),
    ("https", Listeners(":80", "127.0.0.1:8404", "/run/haproxy-consul/haproxy.sock", ("t2.example.com",),
                        https=CertPaths(Path("/run/haproxy-consul/certs")).https(":443", True, 31536000))),
    ("behind-proxy", Listeners(":80", "127.0.0.1:8404", "/run/haproxy-consul/haproxy.sock", ("t2.example.com",),
                               trusted_proxies=("10.0.0.0/8", "2001:db8::/32"), proxy_protocol=True)),
])
def test_golden(name, listeners):
    rendered = render(sample_table(), listeners, TEMPLATES)
    for file_name, text in rendered.files:
        golden = GOLDEN / f"{name}.{file_name}"
        if os.environ.get("UPDATE_GOLDEN"):
            golden.write_text(text)
        assert text == golden.read_text(), f"{golden} differs (UPDATE_GOLDEN=1 rewrites it after review)"


def test_maps_route_exact_hosts_and_every_domain():
    listeners = Listeners(":80", ":8404", "/s", ("a.example", "b.example"))
    rendered = render(sample_table(), listeners, TEMPLATES)
    assert rendered["hosts.map"].splitlines() == [
        "www.example.org be_nginx-80",
        "nginx-80.a.example be_nginx-80",
        "nginx-80.b.example be_nginx-80",
        "whoami-8080.a.example be_whoami-8080",
        "whoami-8080.b.example be_whoami-8080",
    ]
    assert rendered["routes.map"] == ""


def test_landing_page_counts_are_live_haproxy_expressions():
    landing = render(sample_table(), LISTENERS, TEMPLATES)["landing.lf"]
    assert 'href="http://nginx-80.t2.example.com%[var(txn.port_suffix)]/"' in landing
    assert "%[nbsrv(be_nginx-80)]" in landing
    assert "%[nbsrv(be_whoami-8080)]" in landing


def test_landing_page_fits_haproxy_buffer_with_many_routes():
    services = {f"svc{i}": (Instance(f"svc{i}", "n", f"s{i}", "10.0.0.1", 8000, 80, True),) for i in range(3000)}
    table = build_table(services)
    landing = render(table, LISTENERS, TEMPLATES)["landing.lf"]
    assert len(landing.encode()) <= LANDING_MAX_BYTES
    shown = landing.count("<tr><td>")
    assert 10 < shown < 3000
    assert f"and {3000 - shown} more" in landing
    assert "This edge routes 3000 route(s)" in landing


@pytest.mark.parametrize("templates, message", [
    ({"haproxy.cfg.j2": "x"}, "missing template"),
    ({**TEMPLATES, "haproxy.cfg.j2": "{{ no_such_variable }}"}, "UndefinedError"),
    ({**TEMPLATES, "haproxy.cfg.j2": "{% for %}"}, "TemplateSyntaxError"),
])
def test_template_errors_are_typed(templates, message):
    with pytest.raises(TemplateError, match=message):
        render(sample_table(), LISTENERS, templates)


# --- hostile Consul data ----------------------------------------------------------------------
nasty_text = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["web", "web\nbackend evil", "a b", 'q"uote', "#hash", "ünï", "x" * 300, "-x", "web-80",
                     "  ", "\r\n", "%[env(HOME)]", "${HOME}"]),
)
# Router tags of every grammar, with hostile values and with good ones (so routers do render).
ROUTER_TAGS = ["edge.host=", "edge.route=", "edge.route=a.example.com/", "edge.tcp=", "edge.sni=", "urlprefix-",
               "urlprefix-/x redirect=301,", "traefik.http.routers.r.rule=", "edge.route=/x redirect=301,https://",
               "traefik.http.middlewares.m.redirectregex.replacement=", "edge.sticky=", "edge.expose="]
GOOD_TAGS = ["edge.route=a.example.com/api strip", "edge.route=/static", "edge.route=*.example.com/ exact",
             "urlprefix-/foo/bar strip=/foo", "urlprefix-/r redirect=302,https://b.example.com$path",
             "traefik.http.routers.r.rule=Host(`t.example.com`) && PathPrefix(`/t`)", "traefik.enable=true",
             "traefik.http.routers.r.middlewares=s", "traefik.http.middlewares.s.redirectscheme.scheme=https",
             "edge.tcp=6379 allow=127.0.0.1", "edge.sni=db.example.com deny=10.0.0.0/8", "edge.sni=*.pass.example.com",
             "edge.route=/a weight=30 auth=u:$6$saltsalt$hashhash", "edge.sticky=S", "edge.proto=https"]
raw_port = st.one_of(st.integers(-5, 70000), st.sampled_from([0, 70000, "80", "x", None, True]))
raw_entry = st.fixed_dictionaries({
    "Node": st.fixed_dictionaries({"Node": nasty_text, "Address": st.sampled_from(["10.0.0.1", "", "::1", "bad\n"])}),
    "Service": st.fixed_dictionaries({
        "ID": nasty_text,
        "Service": nasty_text,
        "Address": st.one_of(st.sampled_from(["", "10.1.2.3", "0.0.0.0", "host.example", "1.2.3.4 backup"]),
                             nasty_text),
        "Port": raw_port,
        "Tags": st.lists(st.one_of(nasty_text, st.tuples(st.sampled_from(ROUTER_TAGS), nasty_text).map("".join),
                                   st.sampled_from(GOOD_TAGS)), max_size=4),
        "Meta": st.dictionaries(st.sampled_from(["container_port", "x"]), st.one_of(nasty_text, raw_port.map(str))),
    }),
    "Checks": st.lists(st.fixed_dictionaries({"Status": st.sampled_from(["passing", "warning", "critical"])}),
                       max_size=2),
})

SAFE_LINE = re.compile(r"^[\x20-\x7e]*$")
SAFE_VALUE = re.compile(r"^[A-Za-z0-9._~!*+,=:@/|-]+$")
SERVER_PARAMS = (r"( weight \d+| cookie s\d+| maxconn \d+| proto h2| ssl verify none| alpn h2| send-proxy"
                 r"| ssl verify required ca-file @system-ca sni var\(txn\.host\))*")
SERVER_LINE = re.compile(r"^    server s\d+ (\d+\.\d+\.\d+\.\d+|[0-9a-f:]+):\d+" + SERVER_PARAMS + "( disabled)?$")
BACKEND_LINE = re.compile(r"^backend (be_[a-z0-9_-]+|tcp_[a-z0-9_-]+ from tcp_streams)$")


def hostile_table(data, https: bool = False) -> tuple[RouteTable, dict]:
    services = {}
    for name, entries in data.items():
        instances, _ = instances_from_health(name, entries)
        services[name] = instances
    return build_table(services, rules=TagRules(tuple(GRAMMARS), True, frozenset({80, 443}), https)), services


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(nasty_text, st.lists(raw_entry, max_size=3), max_size=4))
def test_hostile_data_never_injects_configuration(data):
    table, _ = hostile_table(data)
    rendered = render(table, LISTENERS, TEMPLATES)
    config = rendered["haproxy.cfg"]
    for line in config.splitlines():
        assert SAFE_LINE.match(line), repr(line)
        if line.startswith("    server "):
            assert SERVER_LINE.match(line), repr(line)
        if line.startswith("backend ") and line not in ("backend landing", "backend admin_stats",
                                                        "backend tls_terminate from tcp_streams"):
            assert BACKEND_LINE.match(line), repr(line)
    for line in rendered["hosts.map"].splitlines():
        key, value = line.split(" ")
        assert re.fullmatch(r"[a-z0-9_.-]+", key) and re.fullmatch(r"be_[a-z0-9_-]+", value)
    for name in ROUTER_MAPS:
        for line in (rendered[name] if name in dict(rendered.files) else "").splitlines():
            key, value = line.split(" ")
            assert re.fullmatch(r"[A-Za-z0-9._~!*+,=:@/-]+", key) and SAFE_VALUE.match(value), line
    assert config.count("\nbackend be_") == len(table.routes)
    # Everything that survived validation still routes: each healthy instance of an exposed
    # service holds a slot of its route (one per node and ID), and each slot is a server line.
    for instances in hostile_table(data)[1].values():
        for inst in (i for i in instances if i.healthy):
            route = table.get(route_name(inst.service, inst.container_port))
            if route is None:
                assert not table.readings[inst.service].vhosts, inst      # opted out
                continue
            assert inst.key in {s.key for s in route.servers}, inst
    for route in table.routes:
        section = config.split(f"\nbackend {route.backend}\n")[1].split("\nbackend ")[0]
        for server in route.servers:
            assert re.search(rf"^    server s\d+ {re.escape(server.address)}:{server.port}{SERVER_PARAMS}$", section,
                             re.M), server


# --- pages: nothing from Consul becomes markup ---------------------------------------------------
class _Markup(HTMLParser):
    """Every tag and attribute of a page, to compare with what the bundled templates write."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, tuple[tuple[str, str | None], ...]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, tuple(attrs)))


PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "table", "tr", "th", "td", "a", "code"}
ROUTER_HREF = re.compile(r"^http://[a-z0-9_.-]+%\[var\(txn\.port_suffix\)\]/[A-Za-z0-9._~!*+,=:@/-]*$")
HREF = re.compile(r"^http://[a-z0-9_.-]+(%\[var\(txn\.page_host\)\])?%\[var\(txn\.port_suffix\)\]/$")


def page_markup(html: str) -> list[tuple[str, tuple]]:
    parser = _Markup()
    parser.feed(html)
    return parser.tags


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(nasty_text, st.lists(raw_entry, max_size=3), max_size=4), st.booleans())
def test_hostile_consul_strings_never_become_markup_on_the_landing_or_503_pages(data, with_domain):
    table, _ = hostile_table(data)
    listeners = LISTENERS if with_domain else Listeners(":80", ":8404", "/s", ())
    rendered = render(table, listeners, TEMPLATES)
    for tag, attrs in page_markup(rendered["landing.lf"]):
        assert tag in PAGE_TAGS, tag
        for name, value in attrs:
            assert name in {"lang", "charset", "href", "class", "data-route"}, name
            if name == "href":
                assert HREF.match(value) or ROUTER_HREF.match(value), value
            if name == "data-route":
                assert re.fullmatch(r"[a-z0-9_-]+", value), value
    for line in rendered["haproxy.cfg"].splitlines():
        if line.strip().startswith("http-error status 503"):
            page = line.split(' string "', 1)[1].rsplit('"', 1)[0]
            assert [t for t, _ in page_markup(page)] == ["title", "h1", "p"], page


HAPROXY_CHECK_DIR = Path(f"/tmp/hostile-routers-{os.getpid()}")
CERTS = HAPROXY_CHECK_DIR / "certs"
HTTPS = Listeners(":80", "127.0.0.1:8404", f"{HAPROXY_CHECK_DIR}/haproxy.sock", ("t2.example.com",),
                  https=CertPaths(CERTS).https(":443", True, 0))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(nasty_text, st.lists(raw_entry, min_size=1, max_size=3), min_size=1, max_size=4),
       st.booleans())
def test_hostile_tags_of_every_grammar_render_what_haproxy_accepts(data, https):
    table, _ = hostile_table(data, https)
    rendered = render(table, HTTPS if https else LISTENERS, TEMPLATES)
    CERTS.mkdir(parents=True, exist_ok=True)
    if not (CERTS / "default.pem").exists():
        (CERTS / "default.pem").write_text(self_signed("default", datetime.now(UTC)))
        for name in ("crt-list", "acme-challenges.map", "tls-hosts.map"):
            (CERTS / name).write_text("")
    for name, text in rendered.files:
        (HAPROXY_CHECK_DIR / name).write_text(text)
    result = subprocess.run([require("haproxy"), "-c", "-q", "-C", str(HAPROXY_CHECK_DIR),
                             "-f", str(HAPROXY_CHECK_DIR / "haproxy.cfg")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + rendered["haproxy.cfg"]
