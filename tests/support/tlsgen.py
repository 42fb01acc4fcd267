"""Test certificates made with `cryptography`: a CA, leaves signed by it, bundles as PEM text."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID


def _key(kind: str):
    return rsa.generate_private_key(65537, 2048) if kind == "rsa" else ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class CA:
    key: object
    cert: x509.Certificate

    @property
    def pem(self) -> str:
        return cert_pem(self.cert)

    def issue(self, names: list[str], days: float = 30, kind: str = "ec", not_before: dt.datetime | None = None,
              with_san: bool = True, ocsp_url: str | None = None) -> tuple[str, str]:
        """(certificate PEM, key PEM) for `names`, signed by this CA; with `ocsp_url`, its AIA
        names that OCSP responder."""
        key = _key(kind)
        start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                   .issuer_name(self.cert.subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start)
                   .not_valid_after(start + dt.timedelta(days=days)))
        if with_san:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        if ocsp_url:
            builder = builder.add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url))]), False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert_pem(cert), key_pem(key)

    def bundle(self, names: list[str], **kwargs) -> str:
        """Leaf, this CA as the chain, key: a bundle the edge serves."""
        cert, key = self.issue(names, **kwargs)
        return cert + self.pem + key


    @property
    def key_pem(self) -> str:
        return key_pem(self.key)

    def intermediate(self, name: str) -> CA:
        """A CA signed by this one."""
        return make_ca(name, parent=self)


def make_ca(name: str = "haproxy-consul test CA", parent: CA | None = None) -> CA:
    key = _key("ec")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(subject)
            .issuer_name(parent.cert.subject if parent else subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(parent.key if parent else key, hashes.SHA256()))
    return CA(key, cert)
