"""bootstrap's settings: one frozen value from (argv, environ); arguments after `--` go to `consul agent`."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bootstrap.etcd import API_CHOICES
from bootstrap.plan import MACHINE_ID_RE, dns_address, http_address
from haproxy_consul import consul_api
from haproxy_consul.consul_api import ConsulSettings
from haproxy_consul.options import EnvParser


@dataclass(frozen=True)
class Settings:
    etcd: tuple[str, ...]
    etcd_api: str
    prefix: str
    machine_id: str
    advertise: str
    expect: int
    datacenter: str | None
    data_dir: Path
    consul: str
    ttl: int
    wait_timeout: float
    dns_resolved: bool
    resolved_dir: Path
    dns_target: tuple[str, int] | None    # where the agent answers DNS: what the drop-in names
    dry_run: bool
    agent_args: tuple[str, ...]
    log_level: str = "INFO"
    # How `consul leave` reaches the agent (TLS, token: passed to it as variables, never in argv);
    # without an explicit address, the one the agent arguments set.
    client: ConsulSettings | None = None


def read_machine_id(value: str) -> str:
    """`--machine-id` names a file holding the ID (like /etc/machine-id), or is the ID itself."""
    path = Path(value)
    text = path.read_text().strip() if value.startswith("/") or path.is_file() else value.strip()
    if not MACHINE_ID_RE.match(text):
        raise ValueError(f"machine id {text[:40]!r} (from {value}) must be 1-128 of A-Z a-z 0-9 _ . -")
    return text


def parse(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    args_in = list(argv)
    extra: list[str] = []
    if "--" in args_in:
        cut = args_in.index("--")
        args_in, extra = args_in[:cut], args_in[cut + 1:]
    p = EnvParser(prog="haproxy-consul bootstrap", environ=environ,
                  description="Announce this Consul server in etcd, wait for the others, then run "
                              "`consul agent -server` in the foreground. Arguments after `--` go to consul agent.")
    p.listing("--etcd", env="ETCD_ENDPOINTS", help="etcd client URL(s) [default http://127.0.0.1:2379]")
    p.option("--etcd-api", env="BOOTSTRAP_ETCD_API", default="auto", choices=API_CHOICES,
             help="v3 (etcd >= 3), v2 (the keys API of etcd2, or etcd 3 with --enable-v2), or auto: asks /version")
    p.option("--prefix", env="BOOTSTRAP_PREFIX", default="/consul.io/bootstrap", help="etcd key prefix")
    p.option("--machine-id", env="BOOTSTRAP_MACHINE_ID", default="/etc/machine-id", help="ID, or a file holding it")
    p.option("--advertise", env="BOOTSTRAP_ADVERTISE", help="this server's address (required)")
    p.option("--expect", env="BOOTSTRAP_EXPECT", default=3, type=int, help="number of servers expected")
    p.option("--datacenter", env="CONSUL_DATACENTER", help="Consul datacenter")
    p.option("--data-dir", env="BOOTSTRAP_DATA_DIR", default="/var/lib/consul", help="the agent's data dir")
    p.option("--consul", env="BOOTSTRAP_CONSUL", default="consul", help="the consul binary")
    p.option("--ttl", env="BOOTSTRAP_TTL", default=30, type=int, help="lease of the announcement, seconds")
    p.option("--wait-timeout", env="BOOTSTRAP_WAIT_TIMEOUT", default=120.0, type=float,
             help="seconds to wait for --expect servers before starting anyway")
    p.flag("--dns-resolved", env="BOOTSTRAP_DNS_RESOLVED", help="send .consul DNS queries to this agent "
           "through a systemd-resolved drop-in (removed before the agent leaves)")
    p.option("--resolved-dir", env="BOOTSTRAP_RESOLVED_DIR", default="/run/systemd/resolved.conf.d",
             help="where the drop-in goes (under /run: a reboot never keeps it)")
    p.option("--dns-port", env="BOOTSTRAP_DNS_PORT", type=int,
             help="the agent's DNS port, for the drop-in [default: the agent's -dns-port, else 8600]")
    p.add_argument("--dry-run", action="store_true", help="print the agent command it would run, touch nothing")
    p.option("--log-level", env="BOOTSTRAP_LOG_LEVEL", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    consul_api.add_options(p, address_flag="--consul-http-addr", address_default=None)
    args = p.parse_args(args_in)
    explicit = bool(args.consul_addr)
    if not explicit:
        args.consul_addr = http_address(extra)
    client = consul_api.from_args(p, args, args_in)
    try:
        machine_id = read_machine_id(args.machine_id)
        if not args.advertise:
            raise ValueError("--advertise (or BOOTSTRAP_ADVERTISE) is required: this server's address")
        advertise = str(ipaddress.ip_address(args.advertise))
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    if args.expect < 1:
        p.error(f"--expect must be at least 1, not {args.expect}")
    if args.etcd_api not in API_CHOICES:
        p.error(f"--etcd-api must be one of {', '.join(API_CHOICES)}, not {args.etcd_api!r}")
    if args.ttl < 2:
        p.error("--ttl must be at least 2 seconds")
    if not args.prefix.startswith("/"):
        p.error("--prefix must start with /")
    try:
        dns_target = dns_address(extra)
    except ValueError as exc:
        p.error(str(exc))
    if dns_target and args.dns_port is not None:
        dns_target = (dns_target[0], args.dns_port)
    if args.dns_resolved and dns_target is None:
        p.error("--dns-resolved needs the agent's DNS interface, which -dns-port=-1 turns off")
    etcd = p.resolve_listing(args.etcd, "ETCD_ENDPOINTS")
    if args.etcd is not None and not etcd:          # `--etcd "$ETCD_ENDPOINTS"` with the variable unset
        p.error("--etcd names no URL (is ETCD_ENDPOINTS set?)")
    return Settings(
        etcd=etcd or ("http://127.0.0.1:2379",), etcd_api=args.etcd_api,
        prefix=args.prefix.rstrip("/"), machine_id=machine_id, advertise=advertise, expect=args.expect,
        datacenter=args.datacenter or None, data_dir=Path(args.data_dir).absolute(), consul=args.consul,
        ttl=args.ttl, wait_timeout=args.wait_timeout, dns_resolved=args.dns_resolved,
        resolved_dir=Path(args.resolved_dir), dns_target=dns_target, dry_run=args.dry_run,
        agent_args=tuple(extra), log_level=args.log_level, client=client)
