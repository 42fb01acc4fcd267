"""The supervisor's lease handling against a recording fake etcd."""

import threading

import pytest

from bootstrap.etcd import EtcdUnavailable
from bootstrap.settings import parse
from bootstrap.supervise import DataDirUnwritable, Supervisor


class FakeEtcd:
    def __init__(self):
        self.calls = []
        self.kv = {}
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
        self.kv[key] = value

    def get(self, key):
        return self.kv.get(key)

    def keepalive(self, lease):
        self.calls.append(("keepalive", lease))
        return self.ttl_left

    def revoke(self, lease):
        self.calls.append(("revoke", lease))

    def get_prefix(self, prefix):
        return {}


def supervisor(etcd, stop=None, data_dir="/nonexistent/never-created"):
    s = parse(["--machine-id", "m1", "--advertise", "10.0.0.1", "--ttl", "3", "--data-dir", str(data_dir)], {})
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
    sup.keepalive(Ticks(1))
    assert [c[0] for c in etcd.calls] == ["grant", "put", "keepalive", "grant", "put"]
    assert sup.lease == "lease4"


class Ticks:
    """A `done` event that lets the keeper loop run n times, without sleeping."""

    def __init__(self, n):
        self.n = n

    def wait(self, delay):
        self.n -= 1
        return self.n < 0


@pytest.mark.parametrize("kv, rewritten", [
    ({"/consul.io/bootstrap/machines/m1": '{"address": "10.0.0.1", "expect": 3}'}, False),   # intact
    ({}, True),                                     # a second run on this machine revoked its lease on exit
    ({"/consul.io/bootstrap/machines/m1": "10.9.9.9"}, True),                                # changed by hand
])
def test_keeper_puts_the_announcement_back_when_it_is_gone(kv, rewritten):
    etcd = FakeEtcd()
    sup = supervisor(etcd)
    sup.announce()
    etcd.kv = dict(kv)
    etcd.calls.clear()
    sup.keepalive(Ticks(1))
    puts = [c for c in etcd.calls if c[0] == "put"]
    assert puts == ([("put", "/consul.io/bootstrap/machines/m1", "lease1")] if rewritten else [])
    assert etcd.kv["/consul.io/bootstrap/machines/m1"] == '{"address": "10.0.0.1", "expect": 3}' or not rewritten


def test_stop_before_etcd_answers_starts_nothing(tmp_path):
    etcd = FakeEtcd()
    etcd.down = 10**6
    stop = threading.Event()
    stop.set()
    assert supervisor(etcd, stop, tmp_path / "data").run() == 0
    assert etcd.calls == []


def test_an_unwritable_data_dir_is_refused_before_anything_is_announced(tmp_path):
    blocker = tmp_path / "file"          # a path no user can make a directory of (file modes do not stop root)
    blocker.write_text("")
    etcd = FakeEtcd()
    with pytest.raises(DataDirUnwritable, match=r"-v consul-data:.* or run the container with --user root"):
        supervisor(etcd, data_dir=blocker / "data").run()
    assert etcd.calls == []
