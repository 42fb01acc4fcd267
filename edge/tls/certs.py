"""Certificates as frozen values: parse a PEM bundle, match names, hold the set the edge serves.

Every certificate source (a directory, Consul KV, the ACME issuer's results in KV) hands its
bundles to `parse_bundle`, which checks them the way HAProxy would need them (a leaf, its
chain, one unencrypted RSA or ECDSA key that matches the leaf) and normalises the text to
leaf, chain in order (each certificate followed by the one that issued it), key: the exact text
written to disk and sent through the runtime API. A bundle that fails raises `CertError` naming
the problem and the fix; the caller logs it with the bundle's name and
keeps every other certificate. Expired certificates parse (their dates are visible): serving or
replacing them is the caller's decision.

`CertSet` is what the edge serves: sorted, frozen, `==` means "same certificates". Names are
chosen by the source and prefixed by it (`dir/…`, `kv/…`), so two sources never collide.

Below that, the plan (as `edge.routing.plan` is for routes): which certificates HAProxy should load
(`serving`), the runtime commands and files that get it there from what it has (`cert_plan`,
`crt_list`), the HTTP-01 challenge map and the map of hosts that get the HTTPS redirect
(`challenges`, `tls_hosts`, `map_commands`), and the self-signed default certificate.
Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

MAX_BUNDLE_BYTES = 256 * 1024
PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


class CertError(ValueError):
    """A PEM bundle HAProxy could not serve."""


@dataclass(frozen=True, order=True)
class Certificate:
    name: str                                   # source-qualified: "dir/example.com", "kv/nginx-80.a.example"
    names: tuple[str, ...]                      # lower-cased DNS names it is valid for (SANs, else the CN)
    not_before: datetime
    not_after: datetime
    fingerprint: str                            # sha256 of the leaf, hex
    pem: str = field(repr=False, compare=True)  # leaf, chain, key: what HAProxy loads

    @property
    def lifetime(self) -> float:
        return (self.not_after - self.not_before).total_seconds()

    def covers(self, host: str) -> bool:
        return any(covers(pattern, host) for pattern in self.names)

    def describe(self) -> str:
        """For logs: never the key, only what identifies the certificate."""
        return (f"{self.name} ({', '.join(self.names[:4])}{' …' if len(self.names) > 4 else ''}; "
                f"valid until {self.not_after:%Y-%m-%d %H:%M} UTC; sha256 {self.fingerprint[:16]})")


def covers(pattern: str, host: str) -> bool:
    """Whether a certificate name matches a host: exactly, or `*.rest` for one more label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern == host:
        return True
    if pattern.startswith("*."):
        label, _, rest = host.partition(".")
        return bool(label) and rest == pattern[2:]
    return False


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(sorted({n for n in names if n}))


def _public(obj) -> bytes:
    return obj.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _issued(child: x509.Certificate, parent: x509.Certificate) -> bool:
    if child.issuer != parent.subject:
        return False
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _ordered_chain(leaf: x509.Certificate, others: list[tuple[x509.Certificate, str]]) -> list[tuple]:
    """The other certificates of a bundle from the leaf's issuer up, each followed by its own issuer
    (the order TLS requires, whatever order the bundle had), or CertError naming one that is not
    part of that chain."""
    chain, rest, current = [], list(others), leaf
    while rest:
        parent = next((c for c in rest if _issued(current, c[0])), None)
        if parent is None:
            break
        chain.append(parent)
        rest.remove(parent)
        current = parent[0]
    if rest:
        raise CertError(f"the certificate {rest[0][0].subject.rfc4514_string()} in it is not in the leaf's chain "
                        f"(the next one up would be {current.issuer.rfc4514_string()}); remove it, or add the "
                        f"missing certificates between them")
    return chain


def parse_bundle(name: str, text: str) -> Certificate:
    """PEM text (certificates and one private key, any order) → a Certificate, or CertError."""
    if len(text.encode(errors="replace")) > MAX_BUNDLE_BYTES:
        raise CertError(f"larger than {MAX_BUNDLE_BYTES // 1024} kB")
    blocks = [(m.group(1), m.group(0)) for m in PEM_BLOCK.finditer(text)]
    certs, keys, seen = [], [], set()
    for kind, block in blocks:
        if kind == "CERTIFICATE":
            try:
                cert = x509.load_pem_x509_certificate(block.encode())
            except ValueError as exc:
                raise CertError(f"a CERTIFICATE block does not parse: {exc}") from None
            der = cert.public_bytes(serialization.Encoding.DER)
            if der not in seen:                     # the same certificate twice: once is enough
                seen.add(der)
                certs.append((cert, block))
        elif kind == "ENCRYPTED PRIVATE KEY" or (kind.endswith("PRIVATE KEY") and "ENCRYPTED" in block):
            raise CertError("the private key is encrypted; HAProxy needs it unencrypted")
        elif kind.endswith("PRIVATE KEY"):
            try:
                keys.append((serialization.load_pem_private_key(block.encode(), password=None), block))
            except (ValueError, TypeError) as exc:
                raise CertError(f"the private key does not parse: {exc}") from None
    if not certs:
        raise CertError("no certificate in it")
    if len(keys) != 1:
        raise CertError("no private key in it" if not keys else f"{len(keys)} private keys in it; expected one")
    key, key_pem = keys[0]
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise CertError(f"{type(key).__name__.lstrip('_')} keys are not supported; use RSA or ECDSA")
    leaf_at = next((i for i, (c, _) in enumerate(certs) if _public(c) == _public(key)), None)
    if leaf_at is None:
        raise CertError("the private key does not match any certificate in it")
    leaf, leaf_pem = certs[leaf_at]
    names = _names(leaf)
    if not names:
        raise CertError("the certificate names no DNS host (no SAN, no CN)")
    chain = _ordered_chain(leaf, [c for i, c in enumerate(certs) if i != leaf_at])
    pem = "\n".join([leaf_pem, *(block for _, block in chain), key_pem]) + "\n"
    return Certificate(
        name=name,
        names=names,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        fingerprint=hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
        pem=pem,
    )


@dataclass(frozen=True)
class CertSet:
    """The certificates one source (or all of them) offers, sorted by name."""

    certs: tuple[Certificate, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "certs", tuple(sorted(self.certs)))

    def get(self, name: str) -> Certificate | None:
        return next((c for c in self.certs if c.name == name), None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.certs)

    def covering(self, host: str, now: datetime | None = None) -> Certificate | None:
        """The certificate HAProxy should present for `host`: an exact name before a wildcard,
        then the one valid longest. With `now`, certificates not valid at `now` are left out."""
        fits = [c for c in self.certs if c.covers(host) and (now is None or c.not_before <= now < c.not_after)]
        if not fits:
            return None
        return max(fits, key=lambda c: (host.lower().rstrip(".") in c.names, c.not_after, c.name))

    def __or__(self, other: CertSet) -> CertSet:
        return CertSet(self.certs + other.certs)


# --- what HAProxy loads, and how to get there from what it has ----------------------------------
SAFE_FILE = re.compile(r"[^A-Za-z0-9._-]+")
TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")                  # RFC 8555 tokens: base64url
KEY_AUTHORIZATION = re.compile(r"^[A-Za-z0-9_-]{1,256}\.[A-Za-z0-9_-]{1,128}$")


def file_name(name: str) -> str:
    """A state-dir file name for a certificate name: readable, safe, distinct (a hash keeps
    `kv/*.a.example` and `kv/_.a.example` apart)."""
    safe = re.sub(r"\.{2,}", ".", SAFE_FILE.sub("_", name.replace("*", "_wildcard_"))).strip("._")[:100]
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}.pem"


FILE_HEADER = "# haproxy-consul certificate "


def file_text(cert: Certificate) -> str:
    """A certificate file in the state dir: its name on a comment line (HAProxy reads only the
    PEM blocks), so a restart knows again where each file came from."""
    return f"{FILE_HEADER}{cert.name}\n{cert.pem}"


def name_in_file(text: str) -> str | None:
    first = text.split("\n", 1)[0]
    return first[len(FILE_HEADER):].strip() or None if first.startswith(FILE_HEADER) else None


def serving(certs: CertSet, now: datetime) -> dict[str, Certificate]:
    """File name → certificate, for every certificate valid now that is the best one for at least
    one of its names: a renewed or replaced certificate shadows the old one instead of both being
    loaded (HAProxy would pick either)."""
    chosen = {}
    for cert in certs.certs:
        if cert.not_before <= now < cert.not_after and any(certs.covering(n, now) is cert for n in cert.names):
            chosen[file_name(cert.name)] = cert
    return chosen


@dataclass(frozen=True)
class CertPlan:
    """Live certificates → desired ones: files to write and remove, runtime commands, the crt-list."""

    writes: tuple[tuple[str, str], ...] = ()             # (file name, file text)
    removes: tuple[str, ...] = ()                        # file names
    commands: tuple[tuple[str, str], ...] = ()           # (runtime command, payload or "")
    changes: tuple[str, ...] = ()                        # one readable line per certificate, for the log

    @property
    def empty(self) -> bool:
        return not self.writes and not self.removes


def crt_list(directory: str, files: Mapping[str, Certificate]) -> str:
    """The crt-list file: one certificate file per line; HAProxy takes the names from each
    certificate (no SNI filter), exact names before wildcards."""
    return "".join(f"{directory}/{f}\n" for f in sorted(files))


def cert_plan(live: Mapping[str, Certificate], desired: Mapping[str, Certificate], directory: str,
              crt_list_path: str) -> CertPlan:
    """Runtime commands that make HAProxy serve `desired`, new and replaced certificates first
    so no name goes without one in between."""
    writes, commands, changes = [], [], []
    for f, cert in sorted(desired.items()):
        old = live.get(f)
        if old is not None and old.pem == cert.pem:
            continue
        path = f"{directory}/{f}"
        writes.append((f, file_text(cert)))
        if old is None:
            commands += [(f"new ssl cert {path}", ""), (f"set ssl cert {path}", cert.pem),
                         (f"commit ssl cert {path}", ""), (f"add ssl crt-list {crt_list_path} {path}", "")]
            changes.append(f"+ {cert.describe()}")
        else:
            commands += [(f"set ssl cert {path}", cert.pem), (f"commit ssl cert {path}", "")]
            changes.append(f"~ {cert.describe()}")
    removes = tuple(sorted(set(live) - set(desired)))
    for f in removes:
        path = f"{directory}/{f}"
        commands += [(f"del ssl crt-list {crt_list_path} {path}", ""), (f"del ssl cert {path}", "")]
        changes.append(f"- {live[f].describe()}")
    return CertPlan(tuple(writes), removes, tuple(commands), tuple(changes))


def map_text(entries: Mapping[str, str]) -> str:
    return "".join(f"{k} {v}\n" for k, v in sorted(entries.items()))


def map_commands(path: str, live: Mapping[str, str], desired: Mapping[str, str]) -> tuple[str, ...]:
    """Runtime commands turning the map `path` from `live` into `desired` (values without spaces)."""
    commands = [f"del map {path} {k}" for k in sorted(set(live) - set(desired))]
    for key, value in sorted(desired.items()):
        if key not in live:
            commands.append(f"add map {path} {key} {value}")
        elif live[key] != value:
            commands.append(f"set map {path} {key} {value}")
    return tuple(commands)


def challenges(raw: Mapping[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """HTTP-01 token → key authorization from KV (token → value), and what was refused. Anyone
    who can write the prefix can put anything there: only base64url shapes reach HAProxy."""
    good, bad = {}, []
    for token, value in sorted(raw.items()):
        value = value.strip()
        if TOKEN.match(token) and KEY_AUTHORIZATION.match(value) and value.startswith(token + "."):
            good[token] = value
        else:
            bad.append(token)
    return good, tuple(bad)


def tls_hosts(hosts: Iterable[str], served: Mapping[str, Certificate]) -> frozenset[str]:
    """Of the routed host names, those a served certificate covers: they get the HTTPS redirect."""
    certs = CertSet(tuple(served.values()))
    return frozenset(h for h in hosts if certs.covering(h) is not None)


def self_signed(common_name: str, now: datetime) -> str:
    """A bundle for names the edge has no certificate for: self-signed, ECDSA P-256, ten years."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM).decode()
            + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode())
