"""The ACME issuer's settings: a frozen value, and the edge's `--acme-*` options that build it.

`edge.settings` calls `add_options(parser)` while building its parser and
`from_args(args, parser, domains, prefix)` while building its `Settings`; the result is None
when no `--acme-directory` is given (ACME off). Bad values end in `parser.error` (exit 2) before
anything starts, including an unreadable TSIG key file.
"""

from __future__ import annotations

import argparse
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from edge.acme.dns import load_key_file
from edge.acme.plan import host_name
from haproxy_consul.options import EnvParser, host_port


@dataclass(frozen=True)
class DnsSettings:
    """Where DNS-01 records are written: an RFC 2136 server and its TSIG key file."""

    host: str
    port: int
    tsig_key_file: Path


@dataclass(frozen=True)
class AcmeSettings:
    directory: str                             # ACME directory URL
    suffixes: tuple[str, ...]                  # configured domains + --acme-allow: nothing else is ordered
    email: str | None = None
    ca_bundle: Path | None = None              # CA of the ACME server's own HTTPS (a private CA)
    prefix: str = "haproxy-consul/certs"       # --certs-kv
    dns: DnsSettings | None = None             # DNS-01 for wildcards
    max_orders_per_hour: int = 10              # fleet-wide (Let's Encrypt allows 300 new orders per 3 h)
    renew_fraction: float = 1 / 3              # renew when this much of the lifetime is left
    http_propagation_wait: float = 1.0         # s from a token in KV to every edge serving it
    dns_propagation_wait: float = 2.0          # s from a TXT update to the CA seeing it
    backoff_first: float = 300.0               # s after a name's first failed order, doubling
    backoff_max: float = 86400.0
    lock_ttl: int = 30                         # s; Consul's minimum is 10
    lock_retry: float = 5.0                    # s before looking again at a name another edge orders
    order_timeout: float = 120.0               # s for validation and issuance of one order
    outage_retry_max: float = 60.0             # s between retries while ACME or Consul is down
    workers: int = 4                           # orders in parallel


def add_options(p: EnvParser) -> None:
    p.option("--acme-directory", env="EDGE_ACME_DIRECTORY",
             help="ACME directory URL, e.g. https://acme-v02.api.letsencrypt.org/directory; unset: no ACME")
    p.option("--acme-email", env="EDGE_ACME_EMAIL", help="contact e-mail of the fleet's ACME account")
    p.option("--acme-ca-bundle", env="EDGE_ACME_CA_BUNDLE",
             help="CA file that signs the ACME server's own HTTPS (a private ACME server)")
    p.listing("--acme-allow", env="EDGE_ACME_ALLOW",
              help="suffix outside --domain whose edge.host names may get certificates (ordered, or served "
                   "from --certs and --certs-kv)")
    p.option("--acme-max-orders-per-hour", env="EDGE_ACME_MAX_ORDERS_PER_HOUR", default=10, type=int,
             help="new ACME orders per hour for the whole fleet")
    p.option("--acme-dns-rfc2136", env="EDGE_ACME_DNS_RFC2136",
             help="HOST:PORT of a DNS server taking RFC 2136 updates: wildcards are proved by DNS-01")
    p.option("--acme-dns-tsig-key-file", env="EDGE_ACME_DNS_TSIG_KEY_FILE",
             help='TSIG key for those updates, in BIND format (key "name" { algorithm …; secret "…"; };)')
    p.option("--acme-propagation-wait", env="EDGE_ACME_PROPAGATION_WAIT", default=1.0, type=float,
             help="seconds between publishing an HTTP-01 token in KV and asking the CA to check it")
    p.option("--acme-dns-propagation-wait", env="EDGE_ACME_DNS_PROPAGATION_WAIT", default=2.0, type=float,
             help="seconds between a DNS-01 TXT update and asking the CA to check it")


def allowed_suffixes(args: argparse.Namespace, p: EnvParser) -> tuple[str, ...]:
    """`--acme-allow`, checked: suffixes outside the domains whose names may have certificates."""
    allow = []
    for item in p.resolve_listing(args.acme_allow, "EDGE_ACME_ALLOW"):
        host = host_name(item.lstrip("."))
        if host is None or host.startswith("*."):
            p.error(f"--acme-allow {item!r} is not a domain name")
        allow.append(host)
    return tuple(sorted(set(allow)))


def from_args(args: argparse.Namespace, p: EnvParser, domains: tuple[str, ...], prefix: str) -> AcmeSettings | None:
    if not args.acme_directory:
        for flag in ("acme_dns_rfc2136", "acme_dns_tsig_key_file"):
            if getattr(args, flag):
                p.error(f"--{flag.replace('_', '-')} needs --acme-directory")
        return None
    url = urllib.parse.urlsplit(args.acme_directory)
    if url.scheme != "https" or not url.hostname:
        p.error(f"--acme-directory {args.acme_directory!r}: an https:// URL (RFC 8555 requires HTTPS)")
    suffixes = tuple(sorted(set(domains) | set(allowed_suffixes(args, p))))
    if not suffixes:
        p.error("ACME needs --domain or --acme-allow: it never orders a name outside them")
    if args.acme_email is not None and "@" not in args.acme_email:
        p.error(f"--acme-email {args.acme_email!r} is not an e-mail address")
    ca_bundle = Path(args.acme_ca_bundle).absolute() if args.acme_ca_bundle else None
    if ca_bundle is not None and not ca_bundle.is_file():
        p.error(f"--acme-ca-bundle {ca_bundle}: no such file")
    if args.acme_max_orders_per_hour < 1:
        p.error("--acme-max-orders-per-hour must be at least 1")
    if args.acme_propagation_wait < 0 or args.acme_dns_propagation_wait < 0:
        p.error("propagation waits cannot be negative")
    dns = None
    if bool(args.acme_dns_rfc2136) != bool(args.acme_dns_tsig_key_file):
        p.error("--acme-dns-rfc2136 and --acme-dns-tsig-key-file go together")
    if args.acme_dns_rfc2136:
        try:
            host, port = host_port(args.acme_dns_rfc2136)
            key_file = Path(args.acme_dns_tsig_key_file).absolute()
            load_key_file(key_file)
        except ValueError as exc:
            p.error(f"DNS-01: {exc}")
        if not host:
            p.error("--acme-dns-rfc2136 needs a host: HOST:PORT")
        dns = DnsSettings(host=host, port=port, tsig_key_file=key_file)
    return AcmeSettings(
        directory=args.acme_directory,
        suffixes=suffixes,
        email=args.acme_email or None,
        ca_bundle=ca_bundle,
        prefix=prefix.strip("/"),
        dns=dns,
        max_orders_per_hour=args.acme_max_orders_per_hour,
        http_propagation_wait=args.acme_propagation_wait,
        dns_propagation_wait=args.acme_dns_propagation_wait,
    )
