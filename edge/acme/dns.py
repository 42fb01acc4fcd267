"""DNS-01 through RFC 2136: add and delete `_acme-challenge.<domain>` TXT records, signed with TSIG.

Used by the ACME issuer (`edge.acme.issuer`) for wildcard names, which only DNS-01 can prove.
The authoritative server (BIND 9 or anything speaking RFC 2136) must allow updates signed with
the key read from `--acme-dns-tsig-key-file`, written in BIND's own format, as `tsig-keygen`
prints it:

    key "acme" {
        algorithm hmac-sha256;
        secret "base64…";
    };

The zone to update is found by asking that same server for the SOA above the record name, so no
zone needs configuring. dnspython builds, signs and sends the messages; nothing here writes DNS
wire format. The secret is never logged (`TsigKey`'s repr hides it).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.resolver
import dns.tsig
import dns.update

log = logging.getLogger("edge.acme")

KEY_BLOCK = re.compile(r'key\s+"?([A-Za-z0-9._-]+)"?\s*\{(.*?)\}\s*;', re.DOTALL)
ALGORITHM = re.compile(r"algorithm\s+\"?([A-Za-z0-9-]+)\"?\s*;")
SECRET = re.compile(r'secret\s+"([A-Za-z0-9+/=\s]+)"\s*;')
TXT_TTL = 60


class DnsUpdateError(Exception):
    """The DNS server could not be reached, or refused or failed the update."""


@dataclass(frozen=True)
class TsigKey:
    name: str
    algorithm: str
    secret: str = field(repr=False)


def parse_key_file(text: str) -> TsigKey:
    """The first `key "name" { algorithm …; secret "…"; };` block of a BIND key file."""
    text = re.sub(r"(#|//)[^\n]*", "", text)
    m = KEY_BLOCK.search(text)
    if m is None:
        raise ValueError('no `key "NAME" { algorithm …; secret "…"; };` block in it')
    body = m.group(2)
    alg, secret = ALGORITHM.search(body), SECRET.search(body)
    if alg is None or secret is None:
        raise ValueError(f"key {m.group(1)!r} needs both `algorithm` and `secret`")
    key = TsigKey(name=m.group(1), algorithm=alg.group(1).lower(), secret="".join(secret.group(1).split()))
    try:
        # Signs nothing: only checks now, not at the first update, that dnspython knows the
        # algorithm and the secret decodes to something.
        tsig = dns.tsig.Key(key.name, key.secret, key.algorithm)
        dns.tsig.get_context(tsig)
    except (dns.exception.DNSException, ValueError, NotImplementedError) as exc:
        raise ValueError(f"key {key.name!r}: {exc}") from None
    if not tsig.secret:
        raise ValueError(f"key {key.name!r}: empty secret")
    return key


def load_key_file(path: Path) -> TsigKey:
    try:
        return parse_key_file(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def challenge_name(domain: str) -> str:
    """The TXT record DNS-01 reads for `domain` (a wildcard `*.x` is proved at `x`)."""
    base = domain[2:] if domain.startswith("*.") else domain
    return f"_acme-challenge.{base}."


class Rfc2136:
    """Adds and deletes TXT records on one server with one TSIG key (TCP, so answers are whole)."""

    def __init__(self, host: str, port: int, key: TsigKey, timeout: float = 5.0):
        self.host, self.port, self.timeout = host, port, timeout
        self._key = dns.tsig.Key(key.name, key.secret, key.algorithm)

    def zone_for(self, fqdn: str) -> dns.name.Name:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        try:
            return dns.resolver.zone_for_name(fqdn, tcp=True, resolver=resolver, lifetime=self.timeout)
        except dns.exception.DNSException as exc:
            raise DnsUpdateError(f"no zone for {fqdn} on {self.host}:{self.port}: {exc}") from exc

    def _send(self, what: str, fqdn: str, build) -> None:
        zone = self.zone_for(fqdn)
        update = dns.update.UpdateMessage(zone, keyring=self._key, keyname=self._key.name,
                                          keyalgorithm=self._key.algorithm)
        build(update, dns.name.from_text(fqdn))
        try:
            answer = dns.query.tcp(update, self.host, port=self.port, timeout=self.timeout)
        except (dns.exception.DNSException, OSError) as exc:
            raise DnsUpdateError(f"{what} {fqdn} at {self.host}:{self.port}: {exc}") from exc
        rcode = answer.rcode()
        if rcode != dns.rcode.NOERROR:
            raise DnsUpdateError(f"{what} {fqdn} at {self.host}:{self.port}: {dns.rcode.to_text(rcode)}")
        log.debug("DNS %s %s in zone %s", what, fqdn, zone)

    def add_txt(self, fqdn: str, value: str, ttl: int = TXT_TTL) -> None:
        self._send("add TXT", fqdn, lambda u, name: u.add(name, ttl, "TXT", _quoted(value)))

    def delete_txt(self, fqdn: str, value: str) -> None:
        self._send("delete TXT", fqdn, lambda u, name: u.delete(name, "TXT", _quoted(value)))


def _quoted(value: str) -> str:
    """TXT rdata text: the key authorization digest is base64url, so quoting is all it needs."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise ValueError("a DNS-01 validation value is base64url text")
    return f'"{value}"'
