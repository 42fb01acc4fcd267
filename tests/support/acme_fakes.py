"""A fake of the ACME side for unit tests of the issuer (no network).

`FakeAcme` has the issuer's `Acme` interface: it signs each CSR with a test CA
(`tests.support.tlsgen`), records each `issue` call, and can be made to fail one name
(`OrderFailed`), be down (`AcmeUnavailable`) or hold an order open until a gate opens.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from edge.acme.client import AcmeUnavailable, OrderFailed, Stopped
from tests.support.tlsgen import CA, cert_pem, make_ca


class FakeAcme:
    def __init__(self, ca: CA | None = None, validity: timedelta = timedelta(days=90)):
        self.ca = ca or make_ca("fake ACME CA")
        self.validity = validity
        self.calls: list[str] = []
        self.prepares = 0
        self.failing: dict[str, str] = {}           # name -> error message
        self.down = False
        self.gate: threading.Event | None = None    # when set: issue() waits for it to open
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def prepare(self) -> None:
        self.prepares += 1
        if self.down:
            raise AcmeUnavailable("connection refused (fake)")

    def issue(self, name: str, csr_pem: bytes) -> str:
        with self._lock:
            self.calls.append(name)
        self.entered.set()
        if self.gate is not None and not self.gate.wait(10):
            raise Stopped()
        if self.down:
            raise AcmeUnavailable("connection refused (fake)")
        if name in self.failing:
            raise OrderFailed(self.failing[name])
        csr = x509.load_pem_x509_csr(csr_pem)
        names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [name]
        now = datetime.now(UTC)
        leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.ca.cert.subject)
                .public_key(csr.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + self.validity)
                .add_extension(names, critical=False)
                .sign(self.ca.key, hashes.SHA256()))
        return cert_pem(leaf) + self.ca.pem
