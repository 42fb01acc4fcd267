"""edge.tls.ocsp: which OCSP responses may be stapled (a table of good and bad ones, built with
`cryptography`), when they are refreshed, and the stapler's thread against a fake responder."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp as x509_ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.tls import ocsp
from edge.tls.certs import parse_bundle
from tests.support.procs import wait_until
from tests.support.tlsgen import make_ca

CA = make_ca("ocsp unit CA")
OTHER = make_ca("another CA")
URL = "http://127.0.0.1:9/ocsp"
NOW = dt.datetime.now(dt.UTC)


def leaf(days: float = 30):
    cert, key = CA.issue(["o.example"], ocsp_url=URL, days=days)
    return parse_bundle("kv/o", cert + CA.pem + key), x509.load_pem_x509_certificate(cert.encode())


def delegate(ca, eku=True):
    """A responder certificate `ca` signs (for OCSP when `eku`), and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ocsp")]))
               .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=30)))
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), False)
    return builder.sign(ca.key, hashes.SHA256()), key


def response(subject, *, status=x509_ocsp.OCSPCertStatus.GOOD, this=-1.0, nxt: float | None = 4.0,
             issuer=CA, signer=None) -> bytes:
    """A DER response for `subject`; times in hours from now; `signer`: (certificate, key), default the CA."""
    signer_cert, signer_key = signer or (CA.cert, CA.key)
    builder = x509_ocsp.OCSPResponseBuilder().add_response(
        cert=subject, issuer=issuer.cert, algorithm=hashes.SHA1(), cert_status=status,
        this_update=NOW + dt.timedelta(hours=this),
        next_update=None if nxt is None else NOW + dt.timedelta(hours=nxt),
        revocation_time=NOW - dt.timedelta(hours=2) if status == x509_ocsp.OCSPCertStatus.REVOKED else None,
        revocation_reason=None).responder_id(x509_ocsp.OCSPResponderEncoding.HASH, signer_cert)
    if signer_cert is not CA.cert:
        builder = builder.certificates([signer_cert])
    return builder.sign(signer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def another():
    """A certificate of the same CA for the same name: another serial."""
    return x509.load_pem_x509_certificate(CA.issue(["o.example"])[0].encode())


@pytest.mark.parametrize(("case", "error"), [
    ("good", None),
    ("good, no next update", None),
    ("good, signed by a delegated responder", None),
    ("revoked", "revoked at"),
    ("unknown", "does not know"),
    ("another certificate", "answers for another certificate"),
    ("signed by another CA", "signed by neither"),
    ("a delegate without the OCSP usage", "signed by neither"),
    ("expired", "not current"),
    ("from the future", "not current"),
    ("garbage", "not an OCSP response"),
    ("try later", "TRY_LATER"),
])
def test_what_may_be_stapled(case, error):
    cert, x = leaf()
    der = {
        "good": lambda: response(x),
        "good, no next update": lambda: response(x, nxt=None),
        "good, signed by a delegated responder": lambda: response(x, signer=delegate(CA)),
        "revoked": lambda: response(x, status=x509_ocsp.OCSPCertStatus.REVOKED),
        "unknown": lambda: response(x, status=x509_ocsp.OCSPCertStatus.UNKNOWN),
        "another certificate": lambda: response(another()),
        "signed by another CA": lambda: response(x, signer=(OTHER.cert, OTHER.key)),
        "a delegate without the OCSP usage": lambda: response(x, signer=delegate(CA, eku=False)),
        "expired": lambda: response(x, this=-10, nxt=-1),
        "from the future": lambda: response(x, this=2),
        "garbage": lambda: b"\x30\x03\x02\x01\x00",
        "try later": lambda: x509_ocsp.OCSPResponseBuilder.build_unsuccessful(
            x509_ocsp.OCSPResponseStatus.TRY_LATER).public_bytes(serialization.Encoding.DER),
    }[case]()
    if error is None:
        answer = ocsp.check(cert, der, NOW)
        assert answer.this_update <= NOW
    else:
        with pytest.raises(ocsp.OcspError, match=error):
            ocsp.check(cert, der, NOW)


def test_the_request_names_the_certificate_and_its_issuer():
    cert, x = leaf()
    req = x509_ocsp.load_der_ocsp_request(ocsp.request(cert))
    assert req.serial_number == x.serial_number and isinstance(req.hash_algorithm, hashes.SHA1)
    with pytest.raises(ocsp.OcspError, match="no issuer"):
        ocsp.request(parse_bundle("kv/lone", cert.pem.split("-----END CERTIFICATE-----")[0]
                                  + "-----END CERTIFICATE-----\n" + cert.pem.split("-----END CERTIFICATE-----")[-1]))


@pytest.mark.parametrize(("this", "nxt", "seconds"), [
    (-1, 4, 5400),               # halfway from 1 h ago to 4 h on: 1.5 h from now
    (-3, 1, ocsp.MIN_REFRESH),   # halfway is past: not sooner than the minimum
    (-1, None, ocsp.NO_NEXT_UPDATE),
])
def test_a_response_is_refreshed_halfway_through_its_validity(this, nxt, seconds):
    answer = ocsp.Answer(NOW + dt.timedelta(hours=this), None if nxt is None else NOW + dt.timedelta(hours=nxt))
    assert answer.refresh_in(NOW) == pytest.approx(seconds, abs=1)


def test_the_stapler_fetches_in_the_background_backs_off_and_forgets_what_is_no_longer_served(caplog):
    caplog.set_level(logging.INFO, "edge.certs")
    cert, x = leaf()
    calls, published, stop = [], [], threading.Event()
    answers = [ocsp.Unreachable("connection refused"), ocsp.Unreachable("connection refused"), response(x)]

    def fetch(url, body):
        calls.append(url)
        answer = answers.pop(0) if answers else response(x)
        if isinstance(answer, Exception):
            raise answer
        return answer
    stapler = ocsp.Stapler(lambda f, c, der: published.append((f, c, der)), stop, lambda: NOW, fetch)
    retries = []
    # Retries at once (the delays asked for are recorded), refreshes when asked.
    stapler._again = lambda f, c, delay, _real=stapler._again: retries.append(delay) or _real(
        f, c, 0.0 if delay < ocsp.MIN_REFRESH else delay)
    thread = threading.Thread(target=stapler.run, daemon=True)
    thread.start()
    try:
        stapler.serve({cert.file: cert, "plain.pem": parse_bundle("kv/p", CA.bundle(["p.example"]))})
        wait_until(lambda: published, 5, what="a staple")
        assert published[0][:2] == (cert.file, cert) and calls[:3] == [URL, URL, URL]
        assert retries[:3] == [ocsp.RETRY_FIRST, 2 * ocsp.RETRY_FIRST, pytest.approx(5400, abs=5)]
        assert len([r for r in caplog.records if "connection refused" in r.getMessage()]) == 1   # once per outage
        assert any("answers again" in r.getMessage() for r in caplog.records)
        assert len(calls) == 3 and len(published) == 1           # the next fetch is the refresh, 1.5 h on
        stapler.serve({cert.file: None})                           # no longer served: never fetched again
        time.sleep(0.2)
        assert not stapler._certs and len(calls) == 3
    finally:
        stop.set()
        stapler._wake.set()
        thread.join(5)


def test_a_response_known_from_the_last_run_is_not_fetched_again_until_due():
    cert, x = leaf()
    calls, stop = [], threading.Event()
    stapler = ocsp.Stapler(lambda *a: None, stop, lambda: NOW, lambda url, body: calls.append(url) or response(x))
    stapler.serve({cert.file: cert}, known={cert.file: response(x)})
    assert stapler._next() == (cert.file, cert)
    stapler._staple(cert.file, cert)
    assert calls == [] and stapler._queue[0][0] > ocsp.time.monotonic() + 3000
