"""edge.tls.certs: bundles parsed as HAProxy needs them (chain in order), names matched through the index."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from edge.tls.certs import CertError, CertSet, covers, file_name, file_text, name_in_file, parse_bundle, self_signed
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


def test_a_set_is_sorted_and_equal_whatever_order_it_was_given_in():
    wild = parse_bundle("kv/wild", CA.bundle(["*.apps.example.com"]))
    exact = parse_bundle("kv/exact", CA.bundle(["nginx-80.apps.example.com"]))
    other = parse_bundle("dir/other", CA.bundle(["nginx-80.apps.example.com"]))
    certs = CertSet((wild, exact), refused=("kv/b", "kv/a")) | CertSet((other,))
    assert [c.name for c in certs.certs] == ["dir/other", "kv/exact", "kv/wild"] and certs.refused == ("kv/a", "kv/b")
    assert CertSet((exact, wild)) == CertSet((wild, exact)) != CertSet((wild,))


@pytest.mark.parametrize("host", [
    "a.example", "A.Example.", "b.a.example", "x.b.a.example", "*.a.example", "*.b.a.example", "example",
    "a", ".a.example", "c.example", "z.a.example", "*.example", "*",
])
def test_the_index_finds_exactly_the_certificates_that_cover_a_host(host):
    certs = CertSet(tuple(parse_bundle(f"kv/{i}", CA.bundle(names)) for i, names in enumerate([
        ["a.example"], ["*.a.example"], ["b.a.example", "c.example"], ["*.b.a.example"], ["*.example"],
        ["example", "a"], ["*.a.example", "a.example"],
    ])))
    assert sorted(c.name for c in certs.candidates(host)) == sorted(c.name for c in certs.certs if c.covers(host))


ROOT = make_ca("chain root")
INTER = ROOT.intermediate("chain intermediate")
OTHER = make_ca("unrelated CA")


@pytest.mark.parametrize("order", ["leaf inter root", "root inter leaf", "inter root leaf", "root leaf inter",
                                   "leaf root inter", "leaf inter inter root"])
def test_a_chain_in_any_order_is_served_leaf_first_then_each_issuer(order):
    cert, key = INTER.issue(["chain.example"])
    blocks = {"leaf": cert, "inter": INTER.pem, "root": ROOT.pem}
    c = parse_bundle("dir/chain", "".join(blocks[b] for b in order.split()) + key)
    assert [b.strip() for b in re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", c.pem, re.S)] \
        == [cert.strip(), INTER.pem.strip(), ROOT.pem.strip()]


@pytest.mark.parametrize(("extra", "message"), [
    ("{other}", "CN=unrelated CA in it is not in the leaf's chain"),             # a stray certificate
    ("{root}", "CN=chain root in it is not in the leaf's chain (the next one up would be CN=chain intermediate)"),
])
def test_a_certificate_outside_the_chain_is_refused_with_the_fix(extra, message):
    cert, key = INTER.issue(["chain.example"])
    text = cert + ("" if "root" in extra else INTER.pem) + extra.format(other=OTHER.pem, root=ROOT.pem) + key
    with pytest.raises(CertError, match=re.escape(message)):
        parse_bundle("dir/chain", text)


def test_the_ocsp_responder_is_known_when_its_issuer_is_in_the_bundle():
    cert, key = CA.issue(["o.example"], ocsp_url="http://127.0.0.1:9/ocsp")
    assert parse_bundle("kv/o", cert + CA.pem + key).ocsp_url == "http://127.0.0.1:9/ocsp"
    assert parse_bundle("kv/o", cert + key).ocsp_url is None          # no issuer: no request can be built
    assert parse_bundle("kv/p", CA.bundle(["p.example"])).ocsp_url is None


def test_file_names_are_safe_distinct_and_stable():
    names = ["kv/*.a.example", "kv/_wildcard_.a.example", "kv/a b/../x", "dir/x.pem", "kv/x.pem"]
    files = [file_name(n) for n in names]
    assert len(set(files)) == len(files)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+\.pem", f) and ".." not in f for f in files), files
    assert file_name("kv/*.a.example") == file_name("kv/*.a.example")
    c = parse_bundle("kv/*.a.example", CA.bundle(["*.a.example"]))
    assert c.file == file_name(c.name)
    assert name_in_file(file_text(c)) == "kv/*.a.example" and parse_bundle("x", file_text(c)).pem == c.pem


def test_the_default_certificate_is_self_signed_and_parses():
    now = dt.datetime.now(dt.UTC)
    c = parse_bundle("default", self_signed("haproxy-consul.invalid", now))
    assert c.names == ("haproxy-consul.invalid",) and (c.not_after - now).days > 3000
