"""Certificates as frozen values: parse a PEM bundle, match names, hold the set a source offers.

Every certificate source (a directory, Consul KV, the ACME issuer's results in KV) hands its
bundles to `parse_bundle`, which checks them the way HAProxy would need them (a leaf, its
chain, one unencrypted RSA or ECDSA key that matches the leaf) and normalises the text to
leaf, chain in order (each certificate followed by the one that issued it), key: the exact text
written to disk and sent through the runtime API. A bundle that fails raises `CertError` naming
the problem and the fix; the caller logs it with the bundle's name and keeps every other
certificate. Expired certificates parse (their dates are visible): serving or replacing them is
the caller's decision (`edge.tls.plan`).

`CertSet` is what a source offers: sorted, frozen, `==` means "same certificates", and the names
it refused to parse. Names are chosen by the source and prefixed by it (`dir/…`, `kv/…`), so two
sources never collide. `candidates(host)` goes through an index by DNS name built once per set: a
host is covered by the certificates naming it and by those naming `*.` + its parent, nothing else.
Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

MAX_BUNDLE_BYTES = 256 * 1024
PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


class CertError(ValueError):
    """A PEM bundle HAProxy could not serve."""


@dataclass(frozen=True)
class Certificate:
    name: str                                   # source-qualified: "dir/example.com", "kv/nginx-80.a.example"
    names: tuple[str, ...]                      # lower-cased DNS names it is valid for (SANs, else the CN)
    not_before: datetime
    not_after: datetime
    fingerprint: str                            # sha256 of the leaf, hex
    pem: str = field(repr=False, compare=True)  # leaf, chain, key: what HAProxy loads
    ocsp_url: str | None = None                 # the leaf's OCSP responder, when its issuer is in the chain

    @cached_property
    def file(self) -> str:
        """Its file name in the state dir (computed once: a hash and a regex per certificate add up)."""
        return file_name(self.name)

    def covers(self, host: str) -> bool:
        return any(covers(pattern, host) for pattern in self.names)

    def describe(self) -> str:
        """For logs: never the key, only what identifies the certificate."""
        return (f"{self.name} ({', '.join(self.names[:4])}{' …' if len(self.names) > 4 else ''}; "
                f"valid until {self.not_after:%Y-%m-%d %H:%M} UTC; sha256 {self.fingerprint[:16]})")


def normal(host: str) -> str:
    return host.lower().rstrip(".")


def covers(pattern: str, host: str) -> bool:
    """Whether a certificate name matches a host: exactly, or `*.rest` for one more label."""
    pattern, host = normal(pattern), normal(host)
    return pattern == host or (pattern.startswith("*.") and wildcard_of(host) == pattern)


def wildcard_of(host: str) -> str | None:
    """The one wildcard name that covers `host` (normalised) besides the host itself: `*.` + its
    parent, or None when it has no parent."""
    label, _, rest = host.partition(".")
    return f"*.{rest}" if label and rest else None


def within(name: str, suffixes: tuple[str, ...]) -> bool:
    """Whether a DNS name is one of `suffixes` or under one. A wildcard `*.X` is judged by X."""
    base = name[2:] if name.startswith("*.") else name
    return any(base == s or base.endswith("." + s) for s in suffixes)


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [normal(n) for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [normal(str(a.value)) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
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


def _ocsp_url(cert: x509.Certificate) -> str | None:
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return None
    return next((d.access_location.value for d in aia
                 if d.access_method == AuthorityInformationAccessOID.OCSP
                 and isinstance(d.access_location, x509.UniformResourceIdentifier)
                 and d.access_location.value.startswith(("http://", "https://"))), None)


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
        ocsp_url=_ocsp_url(leaf) if chain else None,
    )


def _key(cert: Certificate) -> tuple[str, str]:
    return cert.name, cert.fingerprint


@dataclass(frozen=True)
class CertSet:
    """The certificates one source (or all of them) offers, sorted by name, and the names of the
    bundles it refused (they did not parse)."""

    certs: tuple[Certificate, ...] = ()
    refused: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "certs", tuple(sorted(self.certs, key=_key)))
        object.__setattr__(self, "refused", tuple(sorted(self.refused)))

    @cached_property
    def _by_name(self) -> dict[str, list[Certificate]]:
        """DNS name → the certificates naming it (built on first use; the set never changes)."""
        index: dict[str, list[Certificate]] = {}
        for cert in self.certs:
            for n in cert.names:
                index.setdefault(n, []).append(cert)
        return index

    def candidates(self, host: str) -> list[Certificate]:
        """Every certificate that covers `host` (any validity), from the index."""
        host = normal(host)
        wild = wildcard_of(host)
        found = self._by_name.get(host, [])
        return found + self._by_name.get(wild, []) if wild and wild != host else list(found)

    def __or__(self, other: CertSet) -> CertSet:
        return CertSet(self.certs + other.certs, self.refused + other.refused)


# --- certificate files in the state dir ----------------------------------------------------------
SAFE_FILE = re.compile(r"[^A-Za-z0-9._-]+")
FILE_HEADER = "# haproxy-consul certificate "


def file_name(name: str) -> str:
    """A state-dir file name for a certificate name: readable, safe, distinct (a hash keeps
    `kv/*.a.example` and `kv/_.a.example` apart)."""
    safe = re.sub(r"\.{2,}", ".", SAFE_FILE.sub("_", name.replace("*", "_wildcard_"))).strip("._")[:100]
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}.pem"


def file_text(cert: Certificate) -> str:
    """A certificate file in the state dir: its name on a comment line (HAProxy reads only the
    PEM blocks), so a restart knows again where each file came from."""
    return f"{FILE_HEADER}{cert.name}\n{cert.pem}"


def name_in_file(text: str) -> str | None:
    first = text.split("\n", 1)[0]
    return first[len(FILE_HEADER):].strip() or None if first.startswith(FILE_HEADER) else None


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
