"""The ACME issuer against the real pebble, pebble-challtestsrv, BIND 9 and Consul on loopback.

A loopback responder (`ChallengeResponder`) serves HTTP-01 tokens from Consul KV in place of the
edges' HAProxy. Most tests share one Consul, one pebble (default 5 % bad-nonce rejection) and one
responder, each with its own KV prefix and names; the outage, renewal, nonce and DNS-01 tests
start their own pebble (about 1 s) or Consul.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import urllib.parse

import pytest
from consul import Consul
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from edge.acme.issuer import AcmeSettings, DnsSettings, Issuer
from edge.consul.kv import ConsulKV
from edge.tls.certs import CertError, Certificate, CertSet, parse_bundle
from tests.support.bind import bind_server
from tests.support.pebble import ChallengeResponder, Pebble, pebble_server
from tests.support.procs import ConsulAgent, consul_per_module, free_ports, wait_until

pytestmark = pytest.mark.integration


# --- shared fixtures -----------------------------------------------------------------------------
consul = consul_per_module()


@pytest.fixture(scope="module")
def responder():
    with ChallengeResponder() as r:
        yield r


@pytest.fixture(scope="module")
def pebble(tmp_path_factory, responder):
    with pebble_server(tmp_path_factory.mktemp("pebble"), http_port=responder.port) as p:
        yield p


def kv_for(url: str) -> ConsulKV:
    """An edge's KV shell. (Built on py-consul directly, so the tests do not depend on how the
    programs assemble their Consul clients from settings.)"""
    parts = urllib.parse.urlsplit(url)
    return ConsulKV(lambda: Consul(host=parts.hostname, port=parts.port, connections_timeout=5))


def settings(pebble: Pebble, prefix: str, **overrides) -> AcmeSettings:
    base = dict(directory=pebble.directory, suffixes=("apps.example.com",), email="ops@example.com",
                ca_bundle=pebble.ca_bundle, prefix=prefix, http_propagation_wait=0.0, dns_propagation_wait=0.0,
                lock_retry=0.5, backoff_first=30.0, outage_retry_max=1.0)
    return AcmeSettings(**{**base, **overrides})


@contextlib.contextmanager
def running(kv: ConsulKV, s: AcmeSettings):
    stop = threading.Event()
    issuer = Issuer(kv, s, stop)
    thread = threading.Thread(target=issuer.run, daemon=True, name="issuer")
    thread.start()
    try:
        yield issuer
    finally:
        stop.set()
        thread.join(10)
        assert not thread.is_alive(), "the issuer did not stop within 10 s"


def stored(kv: ConsulKV, prefix: str, name: str) -> Certificate | None:
    found = kv.get(f"{prefix}/{name}")
    return None if found is None else parse_bundle(f"kv/{name}", found[1])


def kv_certs(kv: ConsulKV, prefix: str) -> CertSet:
    """What the edge's KV source would hand the control loop: every valid bundle, _acme/ left out."""
    _, entries = kv.list(prefix + "/")
    certs = []
    for key, value in entries.items():
        name = key[len(prefix) + 1:]
        if not name.startswith("_acme/"):
            with contextlib.suppress(CertError):
                certs.append(parse_bundle(f"kv/{name}", value))
    return CertSet(tuple(certs))


def verify(cert: Certificate, root_pem: str, host: str) -> None:
    """Raises unless the chain in the bundle leads from a leaf valid for `host` to pebble's root."""
    chain = x509.load_pem_x509_certificates(cert.pem.encode())
    root = x509.load_pem_x509_certificate(root_pem.encode())
    verifier = PolicyBuilder().store(Store([root])).build_server_verifier(x509.DNSName(host))
    verifier.verify(chain[0], chain[1:])


# --- tests ---------------------------------------------------------------------------------------
def test_names_are_issued_verified_stored_and_nothing_else_is_ordered(consul, responder, pebble, caplog):
    prefix = "t1/certs"
    responder.sources.append((consul.url, prefix))
    kv = kv_for(consul.url)
    names = {"nginx-80.apps.example.com", "whoami-8080.apps.example.com"}
    hostile = {"evil.example.net", "x.apps.example.com.evil.net", "apps.example.com..evil"}
    orders_before = pebble.orders()
    with caplog.at_level(logging.DEBUG), running(kv, settings(pebble, prefix)) as issuer:
        started = time.monotonic()
        issuer.want(names | hostile, CertSet())
        certs = wait_until(lambda: all(stored(kv, prefix, n) for n in names) and kv_certs(kv, prefix), 30,
                           what="both certificates in KV")
        elapsed = time.monotonic() - started
        # the control loop hands the KV set back: nothing more is ordered
        issuer.want(names | hostile, certs)
        time.sleep(0.5)
    print(f"\nFIGURE want() to two certificates in Consul KV with pebble: {elapsed:.2f} s")
    root = pebble.root_pem()
    for name in names:
        cert = stored(kv, prefix, name)
        assert cert.names == (name,)
        verify(cert, root, name)
    assert pebble.orders() - orders_before == 2
    assert "evil" not in pebble.log()
    account = json.loads(kv.get(f"{prefix}/_acme/account")[1])
    assert account["email"] == "ops@example.com" and account["key"]["kty"] == "EC"
    assert kv.list(f"{prefix}/_acme/challenges/")[1] == {}          # tokens cleaned up
    assert responder.answered >= 2
    # no private key material in any log line, the acme library's debug output included
    text = caplog.text
    assert "PRIVATE KEY" not in text and account["key"]["d"] not in text
    for name in names:
        key_body = stored(kv, prefix, name).pem.split("PRIVATE KEY-----")[1].split("-----END")[0]
        assert key_body.strip().splitlines()[0] not in text


def test_two_edges_at_once_make_exactly_one_order_per_name(consul, responder, pebble):
    prefix = "t2/certs"
    responder.sources.append((consul.url, prefix))
    names = {"a-80.apps.example.com", "b-80.apps.example.com", "c-80.apps.example.com"}
    kv1, kv2 = kv_for(consul.url), kv_for(consul.url)      # two edges: two clients, two issuers
    orders_before, issued_before = pebble.orders(), pebble.issued()
    with running(kv1, settings(pebble, prefix)) as one, running(kv2, settings(pebble, prefix)) as two:
        one.want(names, CertSet())
        two.want(names, CertSet())
        wait_until(lambda: all(one.covered(n) and two.covered(n) for n in names), 30,
                   what="both edges to count on a certificate for every name")
        for n in names:
            assert one.covered(n).fingerprint == two.covered(n).fingerprint
        both = one.stats.orders + two.stats.orders
    assert pebble.orders() - orders_before == len(names)
    assert pebble.issued() - issued_before == len(names)
    assert both == len(names)


def test_one_failing_name_backs_off_fleet_wide_and_the_others_are_issued(consul, responder, pebble):
    prefix = "t3/certs"
    responder.sources.append((consul.url, prefix))
    bad, good = "broken-80.apps.example.com", "fine-80.apps.example.com"
    pebble.add_a(bad, "127.0.0.2")         # nothing answers there: validation fails
    kv = kv_for(consul.url)
    orders_before = pebble.orders()
    with running(kv, settings(pebble, prefix, backoff_first=30.0)) as issuer:
        issuer.want({bad, good}, CertSet())
        wait_until(lambda: stored(kv, prefix, good), 30, what="the healthy name's certificate")
        state = wait_until(lambda: kv.get(f"{prefix}/_acme/state/{bad}"), 30, what="the failing name's backoff")
        time.sleep(1.5)                    # inside the 30 s backoff: no second order for it
    failure = json.loads(state[1])
    assert failure["failures"] == 1 and "127.0.0.2" in failure["error"]
    assert stored(kv, prefix, bad) is None
    assert pebble.orders() - orders_before == 2
    assert issuer.stats.failed == 1


def test_heavy_bad_nonce_rejection_is_survived(consul, tmp_path, caplog):
    """Pebble rejects half of the good nonces here (5 % by default): the library retries a
    rejected request once, and twice in a row (a quarter of all requests) is ours to retry."""
    prefix = "t4/certs"
    names = {f"n{i}.apps.example.com" for i in range(4)}
    with ChallengeResponder() as r, pebble_server(tmp_path / "pebble", http_port=r.port, nonce_reject=50) as p:
        r.sources.append((consul.url, prefix))
        kv = kv_for(consul.url)
        with caplog.at_level(logging.DEBUG, "edge.acme"), running(kv, settings(p, prefix)) as issuer:
            issuer.want(names, CertSet())
            wait_until(lambda: all(stored(kv, prefix, n) for n in names), 60, what="every certificate")
        assert "Configured to reject 50% of good nonces" in p.log()
    assert "badNonce twice in a row" in caplog.text


def test_acme_server_down_is_logged_once_then_orders_resume_even_after_a_ca_reset(consul, tmp_path, caplog):
    prefix = "t5/certs"
    with ChallengeResponder() as r:
        r.sources.append((consul.url, prefix))
        p = Pebble(tmp_path, http_port=r.port)
        try:
            p.start_dns()                  # DNS up, ACME server not started yet
            kv = kv_for(consul.url)
            with caplog.at_level(logging.INFO, "edge.acme"), running(kv, settings(p, prefix)) as issuer:
                issuer.want({"first.apps.example.com"}, CertSet())
                time.sleep(2.5)
                p.start()
                wait_until(lambda: stored(kv, prefix, "first.apps.example.com"), 30, what="the first certificate")
                # A reset CA (pebble restarted: accounts and roots forgotten) is an outage too.
                p.stop()
                p.start()
                issuer.want({"first.apps.example.com", "second.apps.example.com"}, kv_certs(kv, prefix))
                wait_until(lambda: stored(kv, prefix, "second.apps.example.com"), 30, what="the second certificate")
                verify(stored(kv, prefix, "second.apps.example.com"), p.root_pem(), "second.apps.example.com")
        finally:
            p.close()
    messages = [rec.getMessage() for rec in caplog.records]
    down = [m for m in messages if "ACME server" in m and "unavailable" in m]
    assert len(down) == 2, down            # one per outage: not started, then the reset account
    assert "ConnectionError" in down[0] and "accountDoesNotExist" in down[1]
    assert sum("ACME server" in m and "available again" in m for m in messages) == 2
    assert sum("account registered" in m for m in messages) == 2
    # Counted: the first order, and both attempts at the second (the one refused for the
    # forgotten account had reached the server). Not counted: attempts while it was down.
    assert len(json.loads(kv.get(f"{prefix}/_acme/orders")[1])["times"]) == 3


def test_consul_down_is_logged_once_and_the_order_happens_when_it_is_back(responder, pebble, tmp_path, caplog):
    prefix = "t6/certs"
    agent = ConsulAgent(workdir=tmp_path / "consul", http_port=free_ports(1)[0]).start()
    try:
        responder.sources.append((agent.url, prefix))
        kv = kv_for(agent.url)
        with caplog.at_level(logging.INFO, "edge.acme"), running(kv, settings(pebble, prefix)) as issuer:
            agent.kill()
            issuer.want({"later.apps.example.com"}, CertSet())
            time.sleep(2.5)
            agent.start()
            wait_until(lambda: stored(kv, prefix, "later.apps.example.com"), 40, what="the certificate")
    finally:
        agent.stop()
    messages = [rec.getMessage() for rec in caplog.records]
    assert sum("Consul unavailable" in m for m in messages) == 1
    assert sum("Consul available again" in m for m in messages) == 1


def test_renewal_when_a_third_of_a_short_lifetime_remains(consul, tmp_path):
    prefix = "t7/certs"
    name = "renew-80.apps.example.com"
    with ChallengeResponder() as r, pebble_server(tmp_path / "pebble", http_port=r.port, validity=9) as p:
        r.sources.append((consul.url, prefix))
        kv = kv_for(consul.url)
        with running(kv, settings(p, prefix)) as issuer:
            issuer.want({name}, CertSet())
            first = wait_until(lambda: stored(kv, prefix, name), 30, what="the first certificate")
            assert (first.not_after - first.not_before).total_seconds() <= 10
            issuer.want({name}, kv_certs(kv, prefix))      # as the control loop would
            renewed = wait_until(lambda: (c := stored(kv, prefix, name)) and c.fingerprint != first.fingerprint
                                 and c, 20, what="a renewed certificate")
        assert renewed.not_after > first.not_after
        # renewed once a third of the 9 s lifetime was left: 6 s after the first, not before
        assert (renewed.not_before - first.not_before).total_seconds() >= 5


def test_wildcard_by_dns01_through_bind_with_tsig(consul, tmp_path):
    prefix = "t8/certs"
    zone = "apps.example.com"
    with bind_server(tmp_path / "bind", zone) as bind, \
            pebble_server(tmp_path / "pebble", http_port=free_ports(1)[0], dns_server=("127.0.0.1", bind.port)) as p:
        kv = kv_for(consul.url)
        dns = DnsSettings("127.0.0.1", bind.port, bind.key_file)
        with running(kv, settings(p, prefix, dns=dns)) as issuer:
            started = time.monotonic()
            issuer.want({f"*.{zone}"}, CertSet())
            cert = wait_until(lambda: stored(kv, prefix, f"*.{zone}"), 30, what="the wildcard certificate")
            print(f"\nFIGURE want() to a DNS-01 wildcard certificate in KV: {time.monotonic() - started:.2f} s")
        assert cert.names == (f"*.{zone}",)
        verify(cert, p.root_pem(), f"anything.{zone}")
        assert bind.txt(f"_acme-challenge.{zone}.") == []        # the TXT record was removed
        log = bind.log()
    # the record went in signed with the TSIG key, pebble asked BIND for it, and it was removed
    assert f"key acme-test-key: updating zone '{zone}/IN': adding an RR at '_acme-challenge.{zone}' TXT" in log
    assert f"query: _acme-challenge.{zone} IN TXT" in log
    assert f"key acme-test-key: updating zone '{zone}/IN': deleting an RR at _acme-challenge.{zone} TXT" in log
