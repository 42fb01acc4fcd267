"""OCSP stapling: responses fetched in the background for every served certificate that names an
OCSP responder, handed to the certificate stage, which staples them in HAProxy.

Nothing here runs on a handshake or on the control loop: the `Stapler` thread asks the responder
named in each certificate's AIA (`Certificate.ocsp_url`, known only when the bundle carries the
issuer) and hands every good, checked response to `publish(file, certificate, der)`; the stage
writes it beside the certificate (`<file>.ocsp`, which HAProxy loads on a reload) and sends it
through the runtime API. A response is refreshed halfway through its validity; a failed fetch is
retried with capped exponential backoff, logged once per responder until it answers again. A
certificate without a staple is served as before (clients check on their own).

A response is stapled only when it answers for this certificate (serial and issuer), says
"good", is signed by the issuer or by a responder the issuer delegated to, and is current. A
revoked certificate is logged as an ERROR and not stapled.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from edge.tls.certs import Certificate

log = logging.getLogger("edge.certs")
PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL)
SKEW = timedelta(minutes=5)          # a responder's clock a little ahead of ours
MIN_REFRESH = 300.0                  # seconds: never ask one certificate's responder more often
NO_NEXT_UPDATE = 3600.0              # seconds: refresh of a response that names no next update
RETRY_FIRST, RETRY_MAX = 60.0, 3600.0
TIMEOUT = 10.0
MAX_RESPONSE = 64 * 1024


class OcspError(Exception):
    """No usable response: why, for the log."""


class Unreachable(OcspError):
    """The responder did not answer (logged once per responder until it does)."""


class Revoked(OcspError):
    """The responder says the certificate is revoked."""


@dataclass(frozen=True)
class Answer:
    this_update: datetime
    next_update: datetime | None

    def refresh_in(self, now: datetime) -> float:
        """Seconds until asking again: halfway to the next update (not sooner than MIN_REFRESH)."""
        if self.next_update is None:
            return NO_NEXT_UPDATE
        half = self.this_update + (self.next_update - self.this_update) / 2
        return max(MIN_REFRESH, (half - now).total_seconds())


def _leaf_and_issuer(cert: Certificate) -> tuple[x509.Certificate, x509.Certificate]:
    blocks = PEM_CERT.findall(cert.pem)
    if len(blocks) < 2:
        raise OcspError("the bundle has no issuer certificate")
    return x509.load_pem_x509_certificate(blocks[0].encode()), x509.load_pem_x509_certificate(blocks[1].encode())


def request(cert: Certificate) -> bytes:
    """The DER OCSP request for a certificate (SHA-1 certificate ID: what HAProxy matches)."""
    leaf, issuer = _leaf_and_issuer(cert)
    return (ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()
            .public_bytes(serialization.Encoding.DER))


def _key_hash(cert: x509.Certificate) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def _signer(response: ocsp.OCSPResponse, issuer: x509.Certificate) -> x509.Certificate:
    """The certificate whose key signed the response: the issuer, or a responder certificate the
    issuer signed for OCSP."""
    def named(c: x509.Certificate) -> bool:
        return (response.responder_name == c.subject if response.responder_name is not None
                else response.responder_key_hash == _key_hash(c))
    if named(issuer):
        return issuer
    for c in response.certificates:
        try:
            c.verify_directly_issued_by(issuer)
            usage = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            continue
        if named(c) and ExtendedKeyUsageOID.OCSP_SIGNING in usage:
            return c
    raise OcspError("signed by neither the issuer nor a responder it delegated to")


def _verify(response: ocsp.OCSPResponse, signer: x509.Certificate) -> None:
    key = signer.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(response.signature, response.tbs_response_bytes, padding.PKCS1v15(),
                       response.signature_hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(response.signature_hash_algorithm))
        else:
            raise OcspError(f"a {type(key).__name__} responder key is not supported")
    except InvalidSignature:
        raise OcspError("its signature does not verify") from None


def check(cert: Certificate, der: bytes, now: datetime) -> Answer:
    """A response as HAProxy may staple it for `cert`, or OcspError saying why not."""
    leaf, issuer = _leaf_and_issuer(cert)
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError as exc:
        raise OcspError(f"not an OCSP response: {exc}") from None
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OcspError(f"the responder answered {response.response_status.name}")
    if (response.serial_number != leaf.serial_number or not isinstance(response.hash_algorithm, hashes.SHA1)
            or response.issuer_key_hash != _key_hash(issuer)):
        raise OcspError("it answers for another certificate")
    _verify(response, _signer(response, issuer))
    if response.certificate_status == ocsp.OCSPCertStatus.REVOKED:
        raise Revoked(f"revoked at {response.revocation_time_utc:%Y-%m-%d %H:%M} UTC")
    if response.certificate_status != ocsp.OCSPCertStatus.GOOD:
        raise OcspError("the responder does not know the certificate")
    this, nxt = response.this_update_utc, response.next_update_utc
    if this > now + SKEW or (nxt is not None and nxt <= now):
        raise OcspError(f"not current (this update {this:%Y-%m-%d %H:%M}, next {nxt or '-'})")
    return Answer(this, nxt)


def fetch(url: str, body: bytes) -> bytes:
    """POST an OCSP request (RFC 6960 appendix A); the DER response."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/ocsp-request"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as answer:
            der = answer.read(MAX_RESPONSE + 1)
    except OSError as exc:                # URLError, HTTPError, timeouts
        raise Unreachable(f"{url}: {exc}") from None
    if len(der) > MAX_RESPONSE:
        raise OcspError(f"{url}: an answer larger than {MAX_RESPONSE // 1024} kB")
    return der


class Stapler:
    """The background thread (see the module's docstring). `serve` is called by the stage with
    each change of the served set; everything else happens on the thread."""

    def __init__(self, publish: Callable[[str, Certificate, bytes], None], stop: threading.Event,
                 clock: Callable[[], datetime], fetch: Callable[[str, bytes], bytes] = fetch):
        self.publish, self.stop, self.clock, self.fetch = publish, stop, clock, fetch
        self._certs: dict[str, Certificate] = {}                   # file → certificate to staple
        self._queue: list[tuple[float, int, str, Certificate]] = []  # (when, seq, file, certificate)
        self._failures: dict[str, int] = {}                        # file → failed fetches in a row
        self._failing: set[str] = set()                            # responders whose outage was logged
        self._known: dict[str, bytes] = {}                         # file → response from the last run
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def serve(self, changes: Mapping[str, Certificate | None], known: Mapping[str, bytes] | None = None) -> None:
        """File → certificate now served (None: no longer); `known`: responses already beside
        them (from the last run, HAProxy loaded them), refreshed when due rather than at once."""
        mono = time.monotonic()
        with self._lock:
            for f, cert in changes.items():
                self._failures.pop(f, None)
                self._known.pop(f, None)
                if cert is None or cert.ocsp_url is None:
                    self._certs.pop(f, None)
                    continue
                self._certs[f] = cert
                if known and f in known:
                    self._known[f] = known[f]
                heapq.heappush(self._queue, (mono, next(self._seq), f, cert))
        self._wake.set()

    def run(self) -> None:
        while not self.stop.is_set():
            job = self._next()
            if job is None:
                continue
            f, cert = job
            self._staple(f, cert)

    def _next(self) -> tuple[str, Certificate] | None:
        """The next certificate due, or None after waiting for one (or a change, or stop)."""
        with self._lock:
            while self._queue and self._certs.get(self._queue[0][2]) is not self._queue[0][3]:
                heapq.heappop(self._queue)                   # replaced or no longer served
            wait = self._queue[0][0] - time.monotonic() if self._queue else 3600.0
            if wait <= 0:
                _, _, f, cert = heapq.heappop(self._queue)
                return f, cert
            self._wake.clear()
        self._wake.wait(min(wait, 3600.0))
        return None

    def _staple(self, f: str, cert: Certificate) -> None:
        now = self.clock()
        with self._lock:
            known = self._known.pop(f, None)
        if known is not None:
            try:
                self._again(f, cert, check(cert, known, now).refresh_in(now))
                return                                       # still good: HAProxy loaded it with the file
            except OcspError:
                pass
        try:
            der = self.fetch(cert.ocsp_url, request(cert))
            answer = check(cert, der, now)
        except OcspError as exc:
            self._failed(f, cert, exc)
            return
        with self._lock:
            self._failures.pop(f, None)
            current = self._certs.get(f) is cert
            if cert.ocsp_url in self._failing:
                self._failing.discard(cert.ocsp_url)
                log.info("OCSP responder %s answers again", cert.ocsp_url)
        if current:
            self._again(f, cert, answer.refresh_in(now))
            self.publish(f, cert, der)
            log.debug("OCSP: a response for %s, good until %s", cert.name, answer.next_update or "-")

    def _again(self, f: str, cert: Certificate, delay: float) -> None:
        with self._lock:
            if self._certs.get(f) is cert:
                heapq.heappush(self._queue, (time.monotonic() + delay, next(self._seq), f, cert))

    def _failed(self, f: str, cert: Certificate, exc: OcspError) -> None:
        with self._lock:
            failures = self._failures[f] = self._failures.get(f, 0) + 1
            outage = isinstance(exc, Unreachable)
            first = cert.ocsp_url not in self._failing if outage else failures == 1
            if outage:
                self._failing.add(cert.ocsp_url)
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (failures - 1))
        self._again(f, cert, delay)
        if not first:
            log.debug("OCSP for %s: %s; retrying in %.0f s", cert.name, exc, delay)
        elif isinstance(exc, Revoked):
            log.error("OCSP: certificate %s is %s; not stapled", cert.describe(), exc)
        else:
            log.warning("OCSP for %s: %s; served without a staple, retrying%s", cert.describe(), exc,
                        " (the responder's outage is logged once)" if outage else "")
