"""The edge's settings: one frozen value built from (argv, environ). Flags win over environment."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edge.acme import settings as acme_settings
from edge.acme.settings import AcmeSettings
from edge.routing.grammars import GRAMMARS
from edge.routing.model import valid_host
from edge.routing.render import PRIVATE_NETWORKS
from haproxy_consul import consul_api
from haproxy_consul.consul_api import ConsulSettings
from haproxy_consul.options import EnvParser, host_port, truthy


@dataclass(frozen=True)
class Settings:
    consul: ConsulSettings = field(default_factory=ConsulSettings)   # address, TLS and token
    datacenter: str | None = None
    domains: tuple[str, ...] = ()
    bind: str = ":80"
    admin_bind: str = "127.0.0.1:8404"
    state_dir: Path = Path("/run/haproxy-consul")
    templates: Path | None = None
    haproxy: str = "haproxy"
    once: bool = False
    dry_run: bool = False
    command: str = "run"          # "run" or "routes"
    min_slots: int = 4
    spare_backends: int = 32      # empty backends a new vhost takes live (edge.routing.spares)
    consul_wait: float = 30.0
    log_level: str = "INFO"
    apply: str = "runtime"        # "runtime" (default) or "reload" (the consul-template baseline)
    timeout_tunnel: int = 3600
    hard_stop_after: int = 3600
    worker_max_reloads: int = 25
    handover_timeout: float = 10.0
    https_bind: str | None = None  # None: no TLS listener
    certs: Path | None = None
    certs_kv: str = "haproxy-consul/certs"
    cert_suffixes: tuple[str, ...] = ()   # a served certificate's names are under these; (): any name
    ocsp_stapling: bool = True            # fetch and staple OCSP responses for certificates that name a responder
    https_redirect: bool = True
    hsts: int = 0
    acme: AcmeSettings | None = None
    consul_api: str = "auto"      # how changes are watched: auto, internal or public (edge.consul.watch)
    consistency: str = "stale"    # Consul read consistency: stale, default or consistent
    max_stale: float = 10.0       # a stale answer older than this is read again consistently
    trusted_proxies: tuple[str, ...] = ()  # networks whose forwarding headers are kept (README)
    proxy_protocol: bool = False  # the listeners take a PROXY protocol header first
    tag_grammars: tuple[str, ...] = ("edge",)   # which routing tags are read: edge, fabio, traefik
    expose: str = "all"           # all: every service gets its zero-config vhosts; tagged: opted-in ones only
    reconcile_every: float = 10.0  # seconds between comparisons of HAProxy's servers with the table
    landing_list_from: tuple[str, ...] = PRIVATE_NETWORKS   # who sees the route list on an unknown host
    consul_ui_bind: str | None = None   # Consul's web UI, read-only, on this ADDR:PORT
    fleet: bool = False           # one edge reads the catalog, publishes to KV, the others follow it
    fleet_prefix: str = "haproxy-consul/fleet"
    max_node_watches: int = 64    # the fleet's reader reads per node up to this many nodes (0: never)

    @property
    def consul_ui_server(self) -> str:
        """Consul's HTTP address as an HAProxy `server` line reads it."""
        host = self.consul.address.host
        return f"{'[' + host + ']' if ':' in host else host}:{self.consul.address.port}"


def haproxy_bind(value: str) -> str:
    """Validate `ADDR:PORT` / `:PORT` and return it as HAProxy's `bind` reads it."""
    host, port = host_port(value)
    return f"{host}:{port}"


def domain(value: str) -> str:
    host = valid_host(value.lstrip("."))
    if host is None:
        raise ValueError(f"{value!r} is not a domain name")
    return host


def networks(values: Sequence[str]) -> tuple[str, ...]:
    """CIDRs (or bare addresses) as HAProxy's `src` reads them; `none` alone: nobody."""
    if [v.lower() for v in values] == ["none"]:
        return ()
    out = []
    for value in values:
        try:
            out.append(str(ipaddress.ip_network(value, strict=False)))
        except ValueError:
            raise ValueError(f"{value!r} is not a network (CIDR like 10.0.0.0/8, or an address)") from None
    return tuple(dict.fromkeys(out))


def parser(environ: Mapping[str, str]) -> EnvParser:
    p = EnvParser(prog="haproxy-consul edge", environ=environ,
                  description="Route <service>-<port>.<domain> to every healthy Consul instance through "
                              "HAProxy. `haproxy-consul edge routes` prints the route table.")
    consul_api.add_options(p)
    p.option("--datacenter", env="CONSUL_DATACENTER", help="Consul datacenter (default: the agent's)")
    p.listing("--domain", env="EDGE_DOMAIN", help="serve <route>.<domain>; none: <route>.<anything>")
    p.option("--bind", env="EDGE_BIND", default=":80", help="HTTP listener ADDR:PORT")
    p.option("--admin-bind", env="EDGE_ADMIN_BIND", default="127.0.0.1:8404",
             help="stats page, /metrics (Prometheus) and /healthz listener")
    p.option("--state-dir", env="EDGE_STATE_DIR", default="/run/haproxy-consul",
             help="haproxy.cfg, maps, sockets (mode 0600) and pid file")
    p.option("--templates", env="EDGE_TEMPLATES", help="directory of Jinja2 templates replacing the bundled ones")
    p.option("--haproxy", env="EDGE_HAPROXY", default="haproxy", help="HAProxy binary")
    p.option("--min-slots", env="EDGE_MIN_SLOTS", default=4, type=int,
             help="server slots per backend before it has to grow (doubling, live with add server)")
    p.option("--spare-backends", env="EDGE_SPARE_BACKENDS", default=32, type=int,
             help="empty backends declared in every configuration, so that a new vhost with default options "
                  "is served without a reload on HAProxy 2.6-3.3 (each has --min-slots servers in maintenance; "
                  "3.4 adds the vhost's own backend and keeps them as its fallback); refilled at every reload; "
                  "0: every new or removed vhost is a reload")
    p.option("--consul-wait", env="EDGE_CONSUL_WAIT", default=30.0, type=float,
             help="seconds a blocking query waits for a change")
    p.option("--log-level", env="EDGE_LOG_LEVEL", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    p.option("--apply", env="EDGE_APPLY", default="runtime", choices=("runtime", "reload"),
             help="runtime: instance changes through the runtime API, reloads only for new/removed vhosts; "
                  "reload: every change is a validated reload (a consul-template setup, for comparison)")
    p.option("--timeout-tunnel", env="EDGE_TIMEOUT_TUNNEL", default=3600, type=int,
             help="seconds an upgraded connection (WebSocket) may stay idle")
    p.option("--hard-stop-after", env="EDGE_HARD_STOP_AFTER", default=3600, type=int,
             help="seconds an old HAProxy worker keeps long-lived connections (WebSocket, SSE, downloads) "
                  "after a reload")
    p.option("--worker-max-reloads", env="EDGE_WORKER_MAX_RELOADS", default=25, type=int,
             help="an old worker still draining after this many reloads is stopped (bounds their memory)")
    p.option("--handover-timeout", env="EDGE_HANDOVER_TIMEOUT", default=10.0, type=float,
             help="on SIGTERM, leave HAProxy serving this long for a new edge on the same state dir to "
                  "adopt (0: stop HAProxy with the edge, as in a container)")
    p.option("--https-bind", env="EDGE_HTTPS_BIND",
             help="TLS listener ADDR:PORT (default: none, or :443 once a certificate source is configured)")
    p.option("--certs", env="EDGE_CERTS", help="directory of PEM certificates (chain + key, or name.crt + "
             "name.key), picked by SNI; changes apply live")
    p.option("--certs-kv", env="EDGE_CERTS_KV", help="Consul KV prefix of certificates every edge serves and "
             "ACME writes to (default haproxy-consul/certs once HTTPS is on)")
    p.add_argument("--certs-any-name", action=argparse.BooleanOptionalAction,
                   default=truthy(environ.get("EDGE_CERTS_ANY_NAME", "0")),
                   help="serve certificates from --certs and --certs-kv whatever names they carry; by default a "
                        "certificate with a name outside every --domain and --acme-allow is refused "
                        "[env EDGE_CERTS_ANY_NAME]")
    p.add_argument("--ocsp-stapling", action=argparse.BooleanOptionalAction,
                   default=truthy(environ.get("EDGE_OCSP_STAPLING", "1")),
                   help="staple OCSP responses, fetched in the background from the responder each certificate "
                        "names (its AIA), to HTTPS handshakes [env EDGE_OCSP_STAPLING]")
    p.add_argument("--https-redirect", action=argparse.BooleanOptionalAction,
                   default=truthy(environ.get("EDGE_HTTPS_REDIRECT", "1")),
                   help="plain HTTP to a host that has a certificate gets 308 to HTTPS "
                        "(except ACME challenges) [env EDGE_HTTPS_REDIRECT]")
    p.option("--hsts", env="EDGE_HSTS", default=0, type=int,
             help="Strict-Transport-Security max-age on HTTPS answers, seconds (0: none)")
    acme_settings.add_options(p)
    p.option("--consul-api", env="EDGE_CONSUL_API", default="auto", choices=("auto", "internal", "public"),
             help="internal: Consul's UI summary (/v1/internal/ui/*); public: documented endpoints only; "
                  "auto: internal while it answers as expected, else public")
    p.option("--consistency", env="EDGE_CONSUL_CONSISTENCY", default="stale",
             choices=("stale", "default", "consistent"),
             help="Consul read mode: stale lets any server answer (spreads a fleet's reads)")
    p.option("--max-stale", env="EDGE_CONSUL_MAX_STALE", default=10.0, type=float,
             help="seconds: a stale answer whose X-Consul-LastContact is older is read again consistently")
    p.listing("--trusted-proxies", env="EDGE_TRUSTED_PROXIES",
              help="addresses or CIDRs of proxies in front of the edge (a load balancer) whose X-Forwarded-* "
                   "and X-Real-IP are kept; anyone else's are replaced (default: nobody's)")
    p.flag("--proxy-protocol", env="EDGE_PROXY_PROTOCOL",
           help="connections to the HTTP and HTTPS listeners start with a PROXY protocol header (from a load "
                "balancer); the client address it gives is the one the edge forwards")
    p.option("--tag-grammar", env="EDGE_TAG_GRAMMAR", default="edge",
             help="routing tags read, comma-separated: edge (edge.route=, edge.host=, ...), fabio (urlprefix-), "
                  "traefik (traefik.http.routers..., Consul Catalog)")
    p.option("--expose", env="EDGE_EXPOSE", default="all", choices=("all", "tagged"),
             help="all: every service gets its <service>-<port> vhosts (unless tagged edge.expose=false); "
                  "tagged: only services tagged edge.expose=true or traefik.enable=true (routers from tags "
                  "always apply)")
    p.option("--reconcile-every", env="EDGE_RECONCILE_EVERY", default=10.0, type=float,
             help="seconds between checks that HAProxy serves the applied table (differences are put back)")
    p.listing("--landing-list-from", env="EDGE_LANDING_LIST_FROM",
              help="client networks (CIDR) whose request for an unknown host gets the landing page listing "
                   "every route; everyone else gets a plain 404; `none`: nobody "
                   f"[default: loopback and private ranges, {','.join(PRIVATE_NETWORKS)}]")
    p.option("--consul-ui-bind", env="EDGE_CONSUL_UI_BIND",
             help="ADDR:PORT where Consul's web UI is shown read-only (its pages and the reads they make; "
                  "no writes, KV, ACLs or agent endpoints), proxied to --consul, which must be http://IP:PORT "
                  "with -ui on the agent [default: none]")
    p.flag("--fleet", env="EDGE_FLEET",
           help="one edge of the fleet reads the catalog and publishes the route table to Consul KV, every other "
                "edge follows it with one long-poll (needs key:write on --fleet-prefix and session:write)")
    p.option("--fleet-prefix", env="EDGE_FLEET_PREFIX", default="haproxy-consul/fleet",
             help="Consul KV prefix of the fleet's published route table")
    p.option("--max-node-watches", env="EDGE_MAX_NODE_WATCHES", default=64, type=int,
             help="with --fleet, the edge that reads the catalog does so per node up to this many nodes (one "
                  "long-poll each), beyond through --consul-api's summary (0: always the summary)")
    p.add_argument("--once", action="store_true", help="sync once, apply, exit")
    p.add_argument("--dry-run", action="store_true",
                   help="print the rendered haproxy.cfg and exit (with --once: for the current Consul state)")
    return p


def parse(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    args_in = list(argv)
    command = "run"
    if args_in and args_in[0] == "routes":
        command, args_in = "routes", args_in[1:]
    p = parser(environ)
    args = p.parse_args(args_in)
    try:
        domains = tuple(sorted({domain(d) for d in p.resolve_listing(args.domain, "EDGE_DOMAIN")}))
        bind, admin_bind = haproxy_bind(args.bind), haproxy_bind(args.admin_bind)
        listed = p.resolve_listing(args.landing_list_from, "EDGE_LANDING_LIST_FROM")
        landing_list_from = networks(listed) if listed else PRIVATE_NETWORKS
    except ValueError as exc:
        p.error(str(exc))
    if args.min_slots < 1:
        p.error("--min-slots must be at least 1")
    if not 0 <= args.spare_backends <= 10000:
        p.error("--spare-backends must be between 0 and 10000")
    if args.apply not in ("runtime", "reload"):  # argparse does not check env-provided defaults
        p.error(f"--apply/EDGE_APPLY must be runtime or reload, not {args.apply!r}")
    if args.consul_wait <= 0:
        p.error("--consul-wait must be positive")
    for option, value in (("--timeout-tunnel", args.timeout_tunnel), ("--hard-stop-after", args.hard_stop_after),
                          ("--worker-max-reloads", args.worker_max_reloads)):
        if value < 1:
            p.error(f"{option} must be at least 1")
    if args.handover_timeout < 0:
        p.error("--handover-timeout must not be negative")
    if args.hsts < 0:
        p.error("--hsts must not be negative")
    certs_kv = (args.certs_kv or "haproxy-consul/certs").strip("/")
    if not certs_kv:
        p.error("--certs-kv must name a prefix")
    acme = acme_settings.from_args(args, p, domains, certs_kv)
    cert_suffixes = () if args.certs_any_name else tuple(sorted(set(domains)
                                                                | set(acme_settings.allowed_suffixes(args, p))))
    https_on = bool(args.https_bind or args.certs or args.certs_kv or acme)
    try:
        https_bind = haproxy_bind(args.https_bind or ":443") if https_on else None
    except ValueError as exc:
        p.error(f"--https-bind: {exc}")
    if args.certs and not Path(args.certs).is_dir():
        p.error(f"--certs {args.certs}: not a directory")
    for name, value, allowed in (("--consul-api/EDGE_CONSUL_API", args.consul_api, ("auto", "internal", "public")),
                                 ("--consistency/EDGE_CONSUL_CONSISTENCY", args.consistency,
                                  ("stale", "default", "consistent"))):
        if value not in allowed:  # argparse does not check env-provided defaults
            p.error(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    if args.max_stale <= 0:
        p.error("--max-stale must be positive")
    try:
        trusted_proxies = networks(p.resolve_listing(args.trusted_proxies, "EDGE_TRUSTED_PROXIES"))
    except ValueError as exc:
        p.error(f"--trusted-proxies: {exc}")
    grammars = tuple(dict.fromkeys(g.strip().lower() for g in args.tag_grammar.split(",") if g.strip()))
    if not grammars or any(g not in GRAMMARS for g in grammars):
        p.error(f"--tag-grammar/EDGE_TAG_GRAMMAR: comma-separated {', '.join(GRAMMARS)}, not {args.tag_grammar!r}")
    if args.expose not in ("all", "tagged"):  # argparse does not check env-provided defaults
        p.error(f"--expose/EDGE_EXPOSE must be all or tagged, not {args.expose!r}")
    if args.reconcile_every <= 0:
        p.error("--reconcile-every must be positive")
    consul = consul_api.from_args(p, args, args_in)
    consul_ui_bind = None
    if args.consul_ui_bind:
        try:
            consul_ui_bind = haproxy_bind(args.consul_ui_bind)
        except ValueError as exc:
            p.error(f"--consul-ui-bind: {exc}")
        if consul_ui_bind.rsplit(":", 1)[0].strip("[]") in ("", "0.0.0.0", "::", "*"):
            p.error(f"--consul-ui-bind {args.consul_ui_bind}: give the host's address on the private network "
                    "(e.g. $HOST_IP:8500), never every address: the UI lists the cluster to whoever reaches it")
        try:
            ipaddress.ip_address(consul.address.host)
        except ValueError:
            p.error(f"--consul-ui-bind proxies to Consul at an IP address, not {consul.address.host!r}")
        if consul.address.scheme != "http":
            p.error("--consul-ui-bind proxies to Consul's plain HTTP listener (its loopback one); "
                    f"--consul is {consul.address}")
    fleet_prefix = args.fleet_prefix.strip("/")
    if not fleet_prefix:
        p.error("--fleet-prefix must name a prefix")
    if not 0 <= args.max_node_watches <= 150:
        p.error("--max-node-watches must be 0-150 (Consul allows 200 connections per client by default)")
    return Settings(
        consul=consul,
        datacenter=args.datacenter or None,
        domains=domains,
        bind=bind,
        admin_bind=admin_bind,
        state_dir=Path(args.state_dir).absolute(),
        templates=Path(args.templates).absolute() if args.templates else None,
        haproxy=args.haproxy,
        once=args.once,
        dry_run=args.dry_run,
        command=command,
        min_slots=args.min_slots,
        spare_backends=args.spare_backends,
        consul_wait=args.consul_wait,
        log_level=args.log_level,
        apply=args.apply,
        timeout_tunnel=args.timeout_tunnel,
        hard_stop_after=args.hard_stop_after,
        worker_max_reloads=args.worker_max_reloads,
        handover_timeout=args.handover_timeout,
        https_bind=https_bind,
        certs=Path(args.certs).absolute() if args.certs else None,
        certs_kv=certs_kv,
        cert_suffixes=cert_suffixes,
        ocsp_stapling=args.ocsp_stapling,
        https_redirect=args.https_redirect,
        hsts=args.hsts,
        acme=acme,
        consul_api=args.consul_api,
        consistency=args.consistency,
        max_stale=args.max_stale,
        trusted_proxies=trusted_proxies,
        proxy_protocol=args.proxy_protocol,
        tag_grammars=grammars,
        expose=args.expose,
        reconcile_every=args.reconcile_every,
        landing_list_from=landing_list_from,
        consul_ui_bind=consul_ui_bind,
        fleet=args.fleet,
        fleet_prefix=fleet_prefix,
        max_node_watches=args.max_node_watches,
    )
