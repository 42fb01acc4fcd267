"""The supervisor's lease handling against a recording fake etcd."""

import threading

from bootstrap.etcd import EtcdUnavailable
from bootstrap.settings import parse
from bootstrap.supervise import Supervisor


class FakeEtcd:
    def __init__(self):
        self.calls = []
        self.ttl_left = 5
        self.down = 0           # fail this many calls first

    def _maybe_down(self):
        if self.down:
            self.down -= 1
            raise EtcdUnavailable("connection refused")

    def grant(self, ttl):
        self._maybe_down()
        self.calls.append(("grant", ttl))
        return f"lease{len(self.calls)}"

    def put(self, key, value, lease=None):
        self.calls.append(("put", key, lease))

    def keepalive(self, lease):
        self.calls.append(("keepalive", lease))
        return self.ttl_left

    def revoke(self, lease):
        self.calls.append(("revoke", lease))

    def get_prefix(self, prefix):
        return {}


def supervisor(etcd, stop=None):
    s = parse(["--machine-id", "m1", "--advertise", "10.0.0.1", "--ttl", "3"], {})
    return Supervisor(s, etcd, stop or threading.Event())


def test_announce_retries_until_etcd_answers(monkeypatch):
    etcd = FakeEtcd()
    etcd.down = 2
    sup = supervisor(etcd)
    monkeypatch.setattr(sup.stop, "wait", lambda delay: False)   # no real sleeping
    assert sup.announce()
    assert etcd.calls[:2] == [("grant", 3), ("put", "/consul.io/bootstrap/machines/m1", "lease1")]


def test_expired_lease_is_granted_again_and_the_key_rewritten():
    etcd = FakeEtcd()
    sup = supervisor(etcd)
    sup.announce()
    etcd.ttl_left = 0                       # etcd lost it (an outage longer than the TTL)
    waits = iter([False, True])
    sup.stop.wait = lambda delay: next(waits)
    sup.keepalive()
    assert [c[0] for c in etcd.calls] == ["grant", "put", "keepalive", "grant", "put"]
    assert sup.lease == "lease4"


def test_stop_before_etcd_answers_starts_nothing():
    etcd = FakeEtcd()
    etcd.down = 10**6
    stop = threading.Event()
    stop.set()
    assert supervisor(etcd, stop).run() == 0
    assert etcd.calls == []
