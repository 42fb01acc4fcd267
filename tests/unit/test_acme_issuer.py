"""The issuer against a fake KV and a fake ACME side: locks, caps, backoff, outages, renewal."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from edge.acme.issuer import AcmeSettings, Issuer
from edge.tls.certs import CertSet, parse_bundle
from tests.support.acme_fakes import FakeAcme
from tests.support.fake_kv import FakeKV
from tests.support.procs import wait_until
from tests.support.tlsgen import make_ca

P = "haproxy-consul/certs"
A, B, C = "a.apps.example.com", "b.apps.example.com", "c.apps.example.com"


class KV(FakeKV):
    """The shared fake KV, also recording reads, with short accessors for assertions."""

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def get(self, key):
        self.reads.append(("get", key))
        return super().get(key)

    def list(self, prefix, index=0, wait=None):
        self.reads.append(("list", prefix))
        return super().list(prefix, index, wait)

    def value(self, key):
        found = self.data.get(key)
        return found[1] if found else None

    def requests(self):
        return self.reads + self.writes


def settings(**overrides) -> AcmeSettings:
    base = dict(directory="https://acme.invalid/dir", suffixes=("apps.example.com",), prefix=P,
                backoff_first=0.3, backoff_max=5.0, lock_retry=0.2, outage_retry_max=0.5)
    return AcmeSettings(**{**base, **overrides})


@contextlib.contextmanager
def running(kv, acme, **overrides):
    stop = threading.Event()
    issuer = Issuer(kv, settings(**overrides), stop, acme=acme)
    thread = threading.Thread(target=issuer.run, daemon=True)
    thread.start()
    try:
        yield issuer
    finally:
        stop.set()
        if acme.gate is not None:
            acme.gate.set()
        thread.join(5)
        assert not thread.is_alive(), "the issuer did not stop within 5 s"


def stored(kv, name):
    value = kv.value(f"{P}/{name}")
    return None if value is None else parse_bundle(f"kv/{name}", value)


def test_a_wanted_name_is_ordered_once_and_stored_with_its_key():
    kv, acme = KV(), FakeAcme()
    with running(kv, acme) as issuer:
        issuer.want({A}, CertSet())
        cert = wait_until(lambda: stored(kv, A), 5, what="certificate in KV")
        time.sleep(0.3)   # rounds after the order must not order again
    assert cert.names == (A,) and "PRIVATE KEY" in cert.pem
    assert acme.calls == [A]
    assert f"{P}/_acme/locks/{A}" not in kv.locks and not kv.sessions   # lock released, key kept
    assert json.loads(kv.value(f"{P}/_acme/locks/{A}"))["holder"]
    assert len(json.loads(kv.value(f"{P}/_acme/orders"))["times"]) == 1
    assert kv.value(f"{P}/_acme/state/{A}") is None
    assert (issuer.stats.orders, issuer.stats.issued, issuer.stats.failed) == (1, 1, 0)


def test_covered_names_cost_no_order_and_no_consul_request():
    kv, acme = KV(), FakeAcme()
    wildcard = parse_bundle("dir/wild", make_ca().bundle(["*.apps.example.com"], days=90))
    with running(kv, acme) as issuer:
        issuer.want({A, B}, CertSet((wildcard,)))
        time.sleep(0.5)
    assert acme.calls == [] and kv.requests() == [] and not kv.sessions


def test_names_outside_the_configured_domains_are_refused_and_logged_once(caplog):
    kv, acme = KV(), FakeAcme()
    hostile = {"evil.com", "a.apps.example.com.evil.net", "x.apps.example.com\nHost: evil.com"}
    with caplog.at_level(logging.INFO, "edge.acme"), running(kv, acme) as issuer:
        issuer.want(hostile | {A}, CertSet())
        wait_until(lambda: stored(kv, A), 5, what="the allowed name")
        issuer.want(hostile | {A}, CertSet())
        time.sleep(0.3)
    assert acme.calls == [A]
    refusals = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
    assert len(refusals) == 3, refusals
    assert not any("evil" in k for _, k in kv.requests())


def test_two_issuers_one_order_the_other_waits_and_takes_the_result_from_kv():
    kv = KV()
    acme1, acme2 = FakeAcme(), FakeAcme()
    acme1.gate = threading.Event()
    acme2.gate = acme1.gate
    with running(kv, acme1) as one, running(kv, acme2) as two:
        one.want({A}, CertSet())
        assert acme1.entered.wait(5)
        two.want({A}, CertSet())
        wait_until(lambda: two.stats.left_to_others >= 1, 5, what="the second edge to find the lock taken")
        assert acme2.calls == []
        acme1.gate.set()
        wait_until(lambda: stored(kv, A), 5, what="certificate in KV")
        wait_until(lambda: two.covered(A) is not None, 5, what="the second edge to count on the first's result")
        time.sleep(0.3)
    assert acme1.calls == [A] and acme2.calls == []
    assert len(json.loads(kv.value(f"{P}/_acme/orders"))["times"]) == 1


def test_one_failing_name_backs_off_fleet_wide_and_never_blocks_the_others(caplog):
    kv, acme = KV(), FakeAcme()
    acme.failing[B] = "urn:ietf:params:acme:error:connection :: connection refused"
    with caplog.at_level(logging.INFO, "edge.acme"), running(kv, acme) as issuer:
        issuer.want({A, B, C}, CertSet())
        wait_until(lambda: stored(kv, A) and stored(kv, C), 5, what="the healthy names")
        wait_until(lambda: acme.calls.count(B) >= 3, 10, what="retries of the failing name")
        state = json.loads(kv.value(f"{P}/_acme/state/{B}"))
    assert state["failures"] >= 2 and "connection refused" in state["error"]
    assert acme.calls.count(A) == 1 and acme.calls.count(C) == 1
    # retries spaced by the doubling backoff (0.3 s, 0.6 s, …), not back to back
    failures = [r.created for r in caplog.records if "order failed" in r.getMessage()]
    assert failures[2] - failures[1] >= 0.5
    assert issuer.stats.failed >= 2


def test_another_edges_backoff_in_kv_is_respected():
    kv, acme = KV(), FakeAcme()
    retry_at = datetime.now(UTC) + timedelta(hours=1)
    kv.put(f"{P}/_acme/state/{A}", json.dumps({"failures": 3, "retry_at": retry_at.isoformat(), "error": "x"}))
    with running(kv, acme) as issuer:
        issuer.want({A, B}, CertSet())
        wait_until(lambda: stored(kv, B), 5, what="the other name")
        time.sleep(0.3)
    assert acme.calls == [B]


def test_the_hourly_cap_holds_fleet_wide():
    kv, acme = KV(), FakeAcme()
    earlier = datetime.now(UTC) - timedelta(minutes=30)
    kv.put(f"{P}/_acme/orders", json.dumps({"times": [earlier.isoformat()]}))   # another edge's order
    with running(kv, acme, max_orders_per_hour=3) as issuer:
        issuer.want({A, B, C}, CertSet())
        wait_until(lambda: len(acme.calls) == 2, 5, what="two orders")
        time.sleep(0.5)
    assert sorted(acme.calls) == [A, B]          # new names in name order; C waits for a slot
    assert len(json.loads(kv.value(f"{P}/_acme/orders"))["times"]) == 3
    assert stored(kv, C) is None


def test_consul_down_is_logged_once_and_the_order_happens_when_it_is_back(caplog):
    kv, acme = KV(), FakeAcme()
    kv.down = True
    with caplog.at_level(logging.INFO, "edge.acme"), running(kv, acme) as issuer:
        issuer.want({A}, CertSet())
        time.sleep(1.0)                      # a few retries
        kv.down = False
        wait_until(lambda: stored(kv, A), 5, what="certificate in KV")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Consul unavailable" in m for m in messages) == 1
    assert sum("Consul available again" in m for m in messages) == 1
    assert acme.calls == [A]


def test_acme_down_costs_no_hourly_slot_and_no_backoff(caplog):
    kv, acme = KV(), FakeAcme()
    acme.down = True
    with caplog.at_level(logging.INFO, "edge.acme"), running(kv, acme) as issuer:
        issuer.want({A}, CertSet())
        wait_until(lambda: acme.prepares >= 3, 5, what="a few attempts")
        assert kv.value(f"{P}/_acme/orders") is None
        assert kv.value(f"{P}/_acme/state/{A}") is None
        acme.down = False
        wait_until(lambda: stored(kv, A), 5, what="certificate in KV")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m for m in messages) == 1
    assert sum("available again" in m for m in messages) == 1


def test_a_certificate_issued_while_consul_went_down_is_stored_later_not_ordered_again():
    kv, acme = KV(), FakeAcme()
    acme.gate = threading.Event()
    with running(kv, acme) as issuer:
        issuer.want({A}, CertSet())
        assert acme.entered.wait(5)
        kv.down = True
        acme.gate.set()
        time.sleep(0.5)
        assert kv.value(f"{P}/{A}") is None
        kv.down = False
        wait_until(lambda: stored(kv, A), 5, what="certificate in KV")
        time.sleep(0.3)
    assert acme.calls == [A]


def test_renewal_when_a_third_of_the_lifetime_remains():
    kv, acme, ca = KV(), FakeAcme(), make_ca()
    now = datetime.now(UTC)
    old = parse_bundle(f"kv/{A}", ca.bundle([A], days=90, not_before=now - timedelta(days=70)))
    fresh = parse_bundle(f"kv/{B}", ca.bundle([B], days=90, not_before=now - timedelta(days=10)))
    kv.put(f"{P}/{A}", old.pem)
    with running(kv, acme) as issuer:
        issuer.want({A, B}, CertSet((old, fresh)))
        wait_until(lambda: stored(kv, A).fingerprint != old.fingerprint, 5, what="a renewed certificate")
    assert stored(kv, A).not_after > old.not_after + timedelta(days=60)
    assert acme.calls == [A]


def test_stop_is_prompt_even_with_an_order_in_flight():
    kv, acme = KV(), FakeAcme()
    acme.gate = threading.Event()
    stop = threading.Event()
    issuer = Issuer(kv, settings(), stop, acme=acme)
    thread = threading.Thread(target=issuer.run, daemon=True)
    thread.start()
    issuer.want({A}, CertSet())
    assert acme.entered.wait(5)
    started = time.monotonic()
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - started < 2
    acme.gate.set()


def test_no_private_key_reaches_the_log(caplog):
    kv, acme = KV(), FakeAcme()
    acme.failing[B] = "nope"
    with caplog.at_level(logging.DEBUG), running(kv, acme) as issuer:
        issuer.want({A, B}, CertSet())
        cert = wait_until(lambda: stored(kv, A), 5, what="certificate in KV")
        wait_until(lambda: issuer.stats.failed >= 1, 5, what="the failing name")
    key_lines = [line for line in cert.pem.splitlines() if line and "-----" not in line][-3:]
    text = caplog.text
    assert "PRIVATE KEY" not in text
    assert not any(line in text for line in key_lines)


@pytest.mark.parametrize("value", ["not json", json.dumps({"times": "x"}), json.dumps([1]),
                                   json.dumps({"times": [datetime.now().isoformat()]})])   # no time zone
def test_a_garbled_order_count_is_treated_as_empty(value):
    kv, acme = KV(), FakeAcme()
    kv.put(f"{P}/_acme/orders", value)
    with running(kv, acme) as issuer:
        issuer.want({A}, CertSet())
        wait_until(lambda: stored(kv, A), 5, what="certificate in KV")
    assert len(json.loads(kv.value(f"{P}/_acme/orders"))["times"]) == 1
