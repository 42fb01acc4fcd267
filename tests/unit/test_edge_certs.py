"""edge.certs: bundles parsed as HAProxy needs them, names matched, the served set ordered."""

from __future__ import annotations

import datetime as dt

import pytest

from edge.certs import CertError, CertSet, covers, parse_bundle
from tests.support.tlsgen import make_ca

CA = make_ca()


@pytest.mark.parametrize(("pattern", "host", "expected"), [
    ("a.example.com", "a.example.com", True),
    ("a.example.com", "A.Example.COM.", True),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "example.com", False),          # a wildcard needs one label
    ("*.example.com", "a.b.example.com", False),      # ... and only one
    ("*.example.com", ".example.com", False),
    ("a.example.com", "b.example.com", False),
    ("*.example.com", "a.example.org", False),
])
def test_covers(pattern, host, expected):
    assert covers(pattern, host) is expected


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_bundle_in_any_order_is_normalised_leaf_chain_key(kind):
    cert, key = CA.issue(["b.example.com", "A.example.com"], kind=kind)
    c = parse_bundle("dir/x", key + CA.pem + cert)       # key first, chain before the leaf
    assert c.names == ("a.example.com", "b.example.com")
    assert c.pem.index(cert.strip()) < c.pem.index(CA.pem.strip()) < c.pem.index(key.strip())
    assert len(c.fingerprint) == 64 and c.not_before < c.not_after
    assert "PRIVATE KEY" not in repr(c) and "PRIVATE" not in c.describe()
    assert parse_bundle("dir/x", c.pem) == c            # normalising is idempotent


def test_common_name_when_no_san():
    cert, key = CA.issue(["legacy.example.com"], with_san=False)
    assert parse_bundle("dir/l", cert + key).names == ("legacy.example.com",)


def test_expired_certificates_parse_with_their_dates():
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    c = parse_bundle("kv/old", CA.bundle(["old.example.com"], days=1, not_before=past))
    assert c.not_after < dt.datetime.now(dt.UTC)


def _other_key():
    return CA.issue(["x.example.com"])[1]


@pytest.mark.parametrize(("text", "message"), [
    ("", "no certificate"),
    ("not a pem at all", "no certificate"),
    ("{cert}", "no private key"),
    ("{cert}{key}{other}", "2 private keys"),
    ("{cert}{other}", "does not match"),
    ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n{key}", "does not parse"),
    ("{cert}-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n", "encrypted"),
    ("{cert}-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "does not parse"),
    ("x" * 300_000, "larger than"),
])
def test_bad_bundles_say_why(text, message):
    cert, key = CA.issue(["a.example.com"])
    text = text.replace("{cert}", cert).replace("{key}", key).replace("{other}", _other_key())
    with pytest.raises(CertError, match=message):
        parse_bundle("dir/bad", text)


def test_ed25519_keys_are_refused():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from tests.support.tlsgen import key_pem
    cert, _ = CA.issue(["a.example.com"])
    with pytest.raises(CertError):
        parse_bundle("dir/ed", cert + key_pem(ed25519.Ed25519PrivateKey.generate()))


def test_set_picks_exact_before_wildcard_then_longest_valid():
    now = dt.datetime.now(dt.UTC)
    wild = parse_bundle("kv/wild", CA.bundle(["*.apps.example.com"], days=90))
    exact = parse_bundle("kv/exact", CA.bundle(["nginx-80.apps.example.com"], days=10))
    exact_longer = parse_bundle("dir/exact2", CA.bundle(["nginx-80.apps.example.com"], days=20))
    expired = parse_bundle("dir/expired", CA.bundle(["nginx-80.apps.example.com"], days=1,
                                                    not_before=now - dt.timedelta(days=5)))
    certs = CertSet((wild, exact, expired)) | CertSet((exact_longer,))
    assert certs.names == ("dir/exact2", "dir/expired", "kv/exact", "kv/wild")   # sorted
    assert certs.covering("nginx-80.apps.example.com", now) is exact_longer
    assert certs.covering("other-1.apps.example.com", now) is wild
    assert certs.covering("apps.example.com", now) is None
    assert CertSet((expired,)).covering("nginx-80.apps.example.com", now) is None
    assert certs.get("kv/exact") is exact and certs.get("nope") is None
    assert CertSet((exact, wild)) == CertSet((wild, exact))
