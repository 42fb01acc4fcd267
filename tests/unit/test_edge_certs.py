"""edge.tls.certs: bundles parsed as HAProxy needs them (chain in order), names matched, the served set ordered."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from edge.tls.certs import CertError, CertSet, covers, parse_bundle
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


# --- the plan: what HAProxy loads and the commands that get it there ------------------------------
from edge.tls.certs import (  # noqa: E402 - grouped with the tests that use them
    cert_plan,
    challenges,
    crt_list,
    file_name,
    file_text,
    map_commands,
    name_in_file,
    self_signed,
    serving,
    tls_hosts,
)


def test_file_names_are_safe_distinct_and_stable():
    names = ["kv/*.a.example", "kv/_wildcard_.a.example", "kv/a b/../x", "dir/x.pem", "kv/x.pem"]
    files = [file_name(n) for n in names]
    assert len(set(files)) == len(files)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+\.pem", f) and ".." not in f for f in files), files
    assert file_name("kv/*.a.example") == file_name("kv/*.a.example")
    c = parse_bundle("kv/*.a.example", CA.bundle(["*.a.example"]))
    assert name_in_file(file_text(c)) == "kv/*.a.example" and parse_bundle("x", file_text(c)).pem == c.pem


def test_serving_drops_expired_and_shadowed_certificates():
    old = parse_bundle("kv/site", CA.bundle(["a.example"], days=10))
    new = parse_bundle("dir/site", CA.bundle(["a.example"], days=20))
    both = parse_bundle("kv/both", CA.bundle(["a.example", "b.example"], days=5))
    now = dt.datetime.now(dt.UTC)
    expired = parse_bundle("kv/gone", CA.bundle(["c.example"], days=1, not_before=now - dt.timedelta(days=3)))
    chosen = serving(CertSet((old, new, both, expired)), now)
    assert set(chosen.values()) == {new, both}       # old is best for no name; both still is for b.example
    assert set(chosen) == {file_name("dir/site"), file_name("kv/both")}


def test_cert_plan_adds_replaces_then_removes_and_writes_files_first():
    a1 = parse_bundle("kv/a", CA.bundle(["a.example"]))
    a2 = parse_bundle("kv/a", CA.bundle(["a.example"], days=40))
    b = parse_bundle("kv/b", CA.bundle(["b.example"]))
    c = parse_bundle("kv/c", CA.bundle(["c.example"]))
    fa, fb, fc = (file_name(x.name) for x in (a1, b, c))
    plan = cert_plan({fa: a1, fb: b}, {fa: a2, fc: c}, "/s/certs", "/s/certs/crt-list")
    commands = [cmd for cmd, _ in plan.commands]
    replace_a = [f"set ssl cert /s/certs/{fa}", f"commit ssl cert /s/certs/{fa}"]
    add_c = [f"new ssl cert /s/certs/{fc}", f"set ssl cert /s/certs/{fc}", f"commit ssl cert /s/certs/{fc}",
             f"add ssl crt-list /s/certs/crt-list /s/certs/{fc}"]
    remove_b = [f"del ssl crt-list /s/certs/crt-list /s/certs/{fb}", f"del ssl cert /s/certs/{fb}"]
    assert commands in (replace_a + add_c + remove_b, add_c + replace_a + remove_b)   # removals last
    payloads = dict(plan.commands)
    assert payloads[f"set ssl cert /s/certs/{fa}"] == a2.pem and payloads[f"set ssl cert /s/certs/{fc}"] == c.pem
    assert dict(plan.writes) == {fa: file_text(a2), fc: file_text(c)} and plan.removes == (fb,)
    assert sorted(line[0] for line in plan.changes) == ["+", "-", "~"] and plan.changes[-1].startswith("-")
    assert "PRIVATE" not in " ".join(plan.changes)
    assert cert_plan({fa: a1}, {fa: a1}, "/d", "/d/l").empty
    assert crt_list("/s/certs", {fc: c, fa: a2}) == "".join(f"/s/certs/{f}\n" for f in sorted((fa, fc)))


@pytest.mark.parametrize(("live", "desired", "commands"), [
    ({}, {"t1": "t1.x"}, ("add map /m t1 t1.x",)),
    ({"t1": "t1.x"}, {"t1": "t1.y"}, ("set map /m t1 t1.y",)),
    ({"t1": "t1.x", "t2": "t2.x"}, {"t2": "t2.x"}, ("del map /m t1",)),
    ({"t1": "t1.x"}, {"t1": "t1.x"}, ()),
])
def test_map_commands(live, desired, commands):
    assert map_commands("/m", live, desired) == commands


@pytest.mark.parametrize(("raw", "good"), [
    ({"abc_DEF-1": "abc_DEF-1.thumb_print-2"}, {"abc_DEF-1": "abc_DEF-1.thumb_print-2"}),
    ({"abc": "other.thumb"}, {}),                                  # the key authorization names another token
    ({"abc": "abc.thumb\nadd map x y z"}, {}),                     # no newline reaches a map or a command
    ({"a b": "a b.x"}, {}),
    ({"abc": "abc.x y"}, {}),
    ({"abc": "abc.thumb "}, {"abc": "abc.thumb"}),
])
def test_challenges_only_pass_base64url_shapes(raw, good):
    assert challenges(raw)[0] == good
    assert len(challenges(raw)[1]) == len(raw) - len(good)


def test_tls_hosts_are_the_routed_hosts_a_served_certificate_covers():
    wild = parse_bundle("kv/w", CA.bundle(["*.apps.example"]))
    one = parse_bundle("kv/o", CA.bundle(["www.other.example"]))
    served = {file_name(c.name): c for c in (wild, one)}
    hosts = ["nginx-80.apps.example", "www.other.example", "x.y.apps.example", "plain.example"]
    assert tls_hosts(hosts, served) == {"nginx-80.apps.example", "www.other.example"}


def test_the_default_certificate_is_self_signed_and_parses():
    now = dt.datetime.now(dt.UTC)
    c = parse_bundle("default", self_signed("haproxy-consul.invalid", now))
    assert c.names == ("haproxy-consul.invalid",) and (c.not_after - now).days > 3000
