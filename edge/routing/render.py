"""Render: route table + listener settings → the files HAProxy loads, as text, never to disk.

Templates come in as a name → source mapping (read from disk by `edge.templates_source`), so
rendering is pure and a template can only see the finished table: it cannot query Consul or
the file system. Host maps are data, not configuration, and are generated here directly;
`edge.routing.views` shapes backends and routers for the templates.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import jinja2
from markupsafe import Markup

from edge.routing.maps import (
    HOSTS_MAP,
    REDIRECT_CODES,
    ROUTES_MAP,
    SPARES_MAP,
    STRIP_BITS,
    map_text,
    mapped,
    router_maps,
    vhosts,
)
from edge.routing.maps import host_maps as host_entries
from edge.routing.model import Instance
from edge.routing.routers import SPLIT_PARTS
from edge.routing.spares import NO_POOL, SparePool
from edge.routing.table import Route, RouteTable, build_table
from edge.routing.views import (
    SNI_MAP,
    RouterMaps,
    RouterView,
    access_rules,
    backend_lines,
    router_views,
    slots,
    sni_entries,
    sni_view,
    tcp_listeners,
    tcp_slots,
)

CONFIG_TEMPLATE = "haproxy.cfg.j2"
LANDING_TEMPLATE = "landing.html.j2"
REQUIRED_TEMPLATES = (CONFIG_TEMPLATE, LANDING_TEMPLATE)

# File names as the configuration refers to them: HAProxy runs with `-C <state dir>` (and is
# checked with `-C <staging dir>`), so relative names point at the set being loaded.
CONFIG_FILE = "haproxy.cfg"
LANDING_FILE = "landing.lf"


# HAProxy loads the landing page into one buffer (tune.bufsize, 16 kB) with the response
# headers: a larger page is refused by `haproxy -c`. Past this size, the page lists as many
# routes as fit and says how many more there are.
LANDING_MAX_BYTES = 12000
LANDING_ROUTERS = 20      # routes by path listed at most (`edge routes` lists them all)


# Who sees the landing page's list of routes when no route matches: loopback and the private
# ranges (RFC 1918, RFC 4193). Everyone else gets a plain 404 that names nothing.
PRIVATE_NETWORKS = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
PLAIN_404 = "<!doctype html><title>404 Not Found</title><h1>404 Not Found</h1>"


class TemplateError(Exception):
    """A template is missing, does not parse, or fails while rendering."""


@dataclass(frozen=True)
class Https:
    """The TLS listener: certificate files are the certificate stage's (absolute paths), so a
    configuration staged elsewhere for `haproxy -c` refers to the live ones."""

    bind: str                   # `ADDR:PORT`
    default_cert: str           # self-signed, for names without a certificate
    crt_list: str
    challenges_map: str         # ACME HTTP-01 token → key authorization
    tls_hosts_map: str          # hosts that have a certificate: plain HTTP redirects there
    redirect: bool = True
    hsts: int = 0               # Strict-Transport-Security max-age; 0: none

    @property
    def port_suffix(self) -> str:
        """What a redirect appends to the host: nothing on 443."""
        port = self.bind.rsplit(":", 1)[1]
        return "" if port == "443" else f":{port}"


@dataclass(frozen=True)
class ConsulUi:
    """Consul's web UI shown read-only on `bind`, in front of Consul's HTTP API at `server`
    (`IP:PORT`, plain HTTP). The template lets only GET/HEAD of the UI and of READ_PATHS through."""

    bind: str
    server: str

    # What Consul's UI (1.8) reads to list services, nodes, checks, sessions and intentions.
    # Never KV (certificates' private keys live there), ACLs, agent, operator, snapshot, events.
    READ_PATHS = ("/ui/", "/v1/catalog/", "/v1/health/", "/v1/internal/ui/", "/v1/coordinate/", "/v1/status/",
                  "/v1/session/", "/v1/discovery-chain/", "/v1/connect/intentions")


@dataclass(frozen=True)
class Listeners:
    """What the rendered configuration needs to know of the settings."""

    bind: str               # `ADDR:PORT` as HAProxy reads it (`:80` = every address)
    admin_bind: str
    runtime_socket: str     # absolute path of the runtime API socket
    domains: tuple[str, ...]
    timeout_tunnel: int = 3600      # seconds an upgraded (WebSocket) connection may stay idle
    hard_stop_after: int = 3600     # seconds an old worker may keep long-lived connections
    max_reloads: int = 25           # reloads an old worker may outlive before it is stopped
    https: Https | None = None      # None: plain HTTP only
    metrics_socket: str = ""  # the edge's own metrics (edge.metrics), proxied at /edge/metrics
    trusted_proxies: tuple[str, ...] = ()   # networks whose forwarding headers are kept
    proxy_protocol: bool = False    # the HTTP and HTTPS listeners take a PROXY protocol header first
    landing_list_from: tuple[str, ...] = PRIVATE_NETWORKS   # client networks shown the route list; () nobody
    plain_404: str = PLAIN_404      # what every other client gets for an unknown host
    consul_ui: ConsulUi | None = None   # None: no Consul UI listener
    spares: SparePool = NO_POOL     # the spare backends every configuration declares (--spare-backends)


@dataclass(frozen=True)
class Rendered:
    """The rendered file set, by file name. Equal renders mean equal configurations."""

    files: tuple[tuple[str, str], ...]

    def __getitem__(self, name: str) -> str:
        return dict(self.files)[name]


def healthy_count(route: Route) -> Markup:
    """For the landing page: HAProxy fills in the live count of usable servers per request."""
    return Markup(f"%[nbsrv({route.backend})]")


def spare_route(backend: str) -> Markup:
    """For the landing page: the route that took spare `backend` live, from spares.map per request
    (`-` while it is free); anything but `a-z 0-9 - _` is dropped, so nothing becomes markup."""
    return Markup(f'%[str({backend}),map_str({SPARES_MAP},-),regsub("[^a-z0-9_-]","",g)]')


def spare_count(backend: str) -> Markup:
    return Markup(f"%[nbsrv({backend})]")


# The most a `spare_route` adds to the page beyond its own text: a route name's 63 characters.
SPARE_ROUTE_BYTES = 63


def environment(templates: Mapping[str, str]) -> jinja2.Environment:
    missing = [name for name in REQUIRED_TEMPLATES if name not in templates]
    if missing:
        raise TemplateError(f"missing template(s): {', '.join(missing)}")
    return _environment(tuple(sorted(templates.items())))


@functools.lru_cache(maxsize=4)
def _environment(templates: tuple[tuple[str, str], ...]) -> jinja2.Environment:
    """One environment per set of templates: compiling them costs a third of a render at 10,000
    routes. Rendering from one environment on two threads is safe (Jinja2's own cache locks)."""
    env = jinja2.Environment(
        loader=jinja2.DictLoader(dict(templates)),
        undefined=jinja2.StrictUndefined,
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(slots=slots, tcp_slots=tcp_slots, backend_lines=backend_lines, healthy_count=healthy_count,
                       spare_route=spare_route, spare_count=spare_count,
                       request_host=Markup("%[var(txn.page_host)]"), port_suffix=Markup("%[var(txn.port_suffix)]"))
    return env


def served_hosts(table: RouteTable, domains: tuple[str, ...]) -> tuple[str, ...]:
    """Every exact host the table serves over HTTP, what HTTPS and ACME cover: the vhosts and the
    hosts HTTP routers name (a wildcard names no one host)."""
    hosts = dict.fromkeys(vhosts(table, domains))
    hosts.update(dict.fromkeys(r.host for r in mapped(table.routers) if r.host and not r.host.startswith("*.")))
    return tuple(hosts)


def host_maps(table: RouteTable, domains: tuple[str, ...]) -> tuple[str, str]:
    """(hosts.map, routes.map): exact host → backend, and (without domains) route → backend."""
    maps = host_entries(table, domains)
    hosts, routes = ("".join(f"{k} {v}\n" for k, v in maps[name].items()) for name in (HOSTS_MAP, ROUTES_MAP))
    return hosts, routes


def _landing(template: jinja2.Template, context: dict, routes: tuple[Route, ...], routers: list[RouterView]) -> str:
    """The landing page with as many routers (at most LANDING_ROUTERS, in half the page) and then
    routes as fit in LANDING_MAX_BYTES (binary searches)."""

    def page(shown: int, shown_routers: int) -> str:
        return template.render({**context, "routes": routes[:shown], "total_routes": len(routes),
                                "hidden_routes": len(routes) - shown, "http_routers": routers[:shown_routers],
                                "hidden_routers": len(routers) - shown_routers})

    def most(high: int, fits) -> int:
        if fits(high):
            return high
        low = 0  # fits(low), not fits(high)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    def size(text: str) -> int:      # as served: a spare's row holds its route's name, at most
        return len(text.encode()) + text.count(f"map_str({SPARES_MAP}") * SPARE_ROUTE_BYTES

    shown_routers = most(min(len(routers), LANDING_ROUTERS),
                         lambda k: size(page(0, k)) <= LANDING_MAX_BYTES // 2)
    # A route's row takes well over 40 bytes, so no more than this many can fit.
    shown = most(min(len(routes), LANDING_MAX_BYTES // 40),
                 lambda k: size(page(k, shown_routers)) <= LANDING_MAX_BYTES)
    return page(shown, shown_routers)


def free_spares(table: RouteTable, pool: SparePool) -> list[Route]:
    """The spare backends no route occupies, as empty routes (every slot free) for the template."""
    return [Route(name=f"spare_{k}", hosts=(), slots=(None,) * pool.slots, instances=0, vhost=False, spare=k)
            for k in pool.free(table)]


def validate(listeners: Listeners, templates: Mapping[str, str]) -> None:
    """Render an empty table and a representative one (a route with servers, a free slot, an
    exact host, HTTP routers with access rules, a TCP router), so a template error shows at start,
    not at the first route; raises TemplateError."""
    sample = build_table({"example": (
        Instance("example", "node", "example-1", "127.0.0.1", 8080, 80, True,
                 ("edge.host=www.example.org", "edge.route=www.example.org/api strip",
                  "edge.route=example.org/ redirect=301,https://www.example.org$path", "edge.tcp=6390",
                  "edge.route=admin.example.org/ allow=127.0.0.1 auth=admin:$6$saltsalt$8Edw2rjMVq0K")),
        Instance("example", "node", "example-2", "127.0.0.1", 8081, 80, False),
    )})
    render(RouteTable(), listeners, templates)
    render(sample, listeners, templates)


def render(table: RouteTable, listeners: Listeners, templates: Mapping[str, str]) -> Rendered:
    env = environment(templates)
    context = {
        "routes": table.routes,
        "listeners": listeners,
        "domains": listeners.domains,
        "hosts_map": HOSTS_MAP,
        "routes_map": ROUTES_MAP,
        "landing_file": LANDING_FILE,
        "router_maps": RouterMaps() if mapped(table.routers) else None,
        "strip_bits": STRIP_BITS,
        "redirect_codes": REDIRECT_CODES,
        "split_parts": range(1, SPLIT_PARTS + 1),
        "access": access_rules(table),
        "tcp_routes": [r for r in table.routes if r.tcp],
        "tcp_listeners": tcp_listeners(table, listeners.bind),
        "sni": sni_view(table, listeners.https is not None, listeners.runtime_socket),
        "spares": free_spares(table, listeners.spares),
        "spares_map": SPARES_MAP,
        "pool": [listeners.spares.backend(k) for k in range(1, listeners.spares.size + 1)],
    }
    try:
        config = env.get_template(CONFIG_TEMPLATE).render(context)
        landing = _landing(env.get_template(LANDING_TEMPLATE), context,
                           tuple(r for r in table.routes if not r.retired and not r.spare), router_views(table))
    except jinja2.TemplateError as exc:
        where = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
        raise TemplateError(f"{type(exc).__name__}{where}: {exc}") from exc
    hosts, routes = host_maps(table, listeners.domains)
    maps = router_maps(table.routers, table.backend_of) if context["router_maps"] else {}
    if listeners.spares.size:
        maps[SPARES_MAP] = host_entries(table, listeners.domains)[SPARES_MAP]
    if context["sni"]:
        maps[SNI_MAP] = sni_entries(table)
    return Rendered(files=(
        (CONFIG_FILE, config),
        (HOSTS_MAP, hosts),
        (LANDING_FILE, landing),
        (ROUTES_MAP, routes),
        *((name, map_text(entries)) for name, entries in sorted(maps.items())),
    ))
