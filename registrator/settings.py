"""The registrator's settings: one frozen value from (argv, environ). Flags win over environment."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from haproxy_consul import consul_api
from haproxy_consul.consul_api import ConsulSettings
from haproxy_consul.options import EnvParser


@dataclass(frozen=True)
class Settings:
    docker: str
    consul: ConsulSettings = field(default_factory=ConsulSettings)   # address, TLS and token
    hostname: str = ""
    ip: str | None = None
    internal: bool = False
    resync: float = 60.0
    tags: tuple[str, ...] = ()
    ttl: int | None = None
    ttl_refresh: float | None = None
    cleanup: bool = False
    log_level: str = "INFO"
    explicit: bool = False
    script_checks: bool = False
    drain: bool = True


def parse(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    p = EnvParser(prog="haproxy-consul registrator", environ=environ,
                  description="Register the published ports of this host's containers in the local Consul agent.")
    p.option("--docker", env="DOCKER_HOST", default="unix:///var/run/docker.sock", help="Docker Engine API")
    consul_api.add_options(p)
    p.option("--hostname", env="REGISTRATOR_HOSTNAME", default=socket.getfqdn(),
             help="this host's name: the first field of every service ID it registers")
    p.option("--ip", env="REGISTRATOR_IP", help="address to register for published ports "
             "(default: the binding's host IP if specific, else the agent's address)")
    p.flag("--internal", env="REGISTRATOR_INTERNAL", help="register container IPs and private ports")
    p.option("--resync", env="REGISTRATOR_RESYNC", default=60.0, type=float, help="full reconciliation period, s")
    p.listing("--tags", env="REGISTRATOR_TAGS", help="tags added to every service")
    p.option("--ttl", env="REGISTRATOR_TTL", type=int, help="add a TTL check of this many seconds to each service "
             "without another check; also the TTL of Docker health checks, 60 when unset")
    p.option("--ttl-refresh", env="REGISTRATOR_TTL_REFRESH", type=float,
             help="seconds between TTL passes and Docker health refreshes; ttl / 3 when unset")
    p.flag("--cleanup", env="REGISTRATOR_CLEANUP",
           help="on start, also remove this host's services whose container no longer exists at all; "
                "and, at every reconciliation, those registered under an older --hostname")
    p.flag("--explicit", env="REGISTRATOR_EXPLICIT",
           help="register only ports whose container sets SERVICE_NAME or SERVICE_<port>_NAME")
    p.flag("--script-checks", env="REGISTRATOR_SCRIPT_CHECKS",
           help="honour SERVICE_CHECK_SCRIPT (the Consul agent runs the container's command on its host)")
    p.flag("--no-drain", env="REGISTRATOR_NO_DRAIN",
           help="do not put a stopping container's services in maintenance before it exits")
    p.option("--log-level", env="REGISTRATOR_LOG_LEVEL", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    args = p.parse_args(list(argv))
    consul = consul_api.from_args(p, args, argv)
    if args.ip is not None and not args.ip.strip():     # `--ip "$HOST_IP"` with the variable unset
        p.error("--ip is empty (is HOST_IP set?); leave it out to register the agent's address")
    try:
        ip = str(ipaddress.ip_address(args.ip)) if args.ip else None
    except ValueError as exc:
        p.error(str(exc))
    hostname = args.hostname.strip()
    if not hostname or any(not ch.isprintable() or ch in ": " for ch in hostname):
        p.error(f"--hostname {args.hostname!r}: must be non-empty, printable, without ':' or spaces")
    if args.resync <= 0:
        p.error("--resync must be positive")
    if args.ttl is not None and args.ttl <= 0:
        p.error("--ttl must be positive")
    ttl_refresh = args.ttl_refresh or (args.ttl / 3 if args.ttl else None)
    if args.ttl and ttl_refresh >= args.ttl:
        p.error("--ttl-refresh must be shorter than --ttl")
    return Settings(docker=args.docker, consul=consul, hostname=hostname, ip=ip,
                    internal=args.internal, resync=args.resync,
                    tags=tuple(sorted(set(p.resolve_listing(args.tags, "REGISTRATOR_TAGS")))),
                    ttl=args.ttl, ttl_refresh=ttl_refresh, cleanup=args.cleanup, log_level=args.log_level,
                    explicit=args.explicit, script_checks=args.script_checks, drain=not args.no_drain)
