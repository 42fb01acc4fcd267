"""The Consul watcher's rules, against a scripted fake Consul: what is fetched, what published."""

import threading

import pytest

from edge.model import ServiceSummary
from edge.watch import ConsulWatcher
from haproxy_consul.consul_api import ConsulSettings, ConsulUnavailable, parse_address


def summary(name, instances=1, passing=1):
    return ServiceSummary(name, (), ("n1",), instances, passing, 0, 0)


def health(name, port):
    return [{"Node": {"Node": "n1", "Address": "10.0.0.1"},
             "Service": {"ID": f"{name}-{port}", "Service": name, "Address": "", "Port": port, "Tags": [], "Meta": {}},
             "Checks": [{"Status": "passing"}]}]


class FakeWatcher(ConsulWatcher):
    """Answers from `catalog` (index, summaries) and `data` (name → port); records fetches."""

    def __init__(self):
        self.published = []
        super().__init__(ConsulSettings(parse_address("127.0.0.1:1")), None, self.published.append, threading.Event())
        self.catalog = (0, {})
        self.data = {}
        self.fetched = []
        self.failing = set()
        self.dump_fails = False

    def _summaries_at(self, index, wait):
        return self.catalog

    def _dump(self):
        self.stats.dumps += 1
        if self.dump_fails:
            raise ConsulUnavailable("boom")
        return {name: health(name, port) for name, port in self.data.items()}

    def _fetch(self, name):
        self.fetched.append(name)
        if name in self.failing:
            raise ConsulUnavailable("boom")
        from edge.model import instances_from_health
        return instances_from_health(name, health(name, self.data[name]))


def ports(snapshot):
    return {name: [i.port for i in insts] for name, insts in snapshot.services.items()}


@pytest.fixture
def w():
    watcher = FakeWatcher()
    watcher.data = {"web": 80, "api": 81}
    watcher.catalog = (10, {"web": summary("web"), "api": summary("api"), "consul": summary("consul"),
                            "bad name": summary("bad name")})
    snap = watcher.sync_once()
    assert ports(snap) == {"web": [80], "api": [81]}       # consul and bad names are never routed
    assert watcher.fetched == [] and watcher.stats.dumps == 1   # a full sync is one node dump
    return watcher


def test_a_changed_summary_fetches_only_that_service(w):
    w.data["web"] = 90
    w.catalog = (11, {**w.catalog[1], "web": summary("web", instances=2)})
    assert w._poll(10, backoff_stub()) == 11
    assert w.fetched == ["web"]
    assert ports(w.published[-1]) == {"web": [90], "api": [81]}


def test_same_index_means_nothing_new(w):
    assert w._poll(10, backoff_stub()) == 10
    assert w.fetched == [] and w.published == []


def test_index_moved_with_nothing_to_attribute_refreshes_everything(w):
    w.data["api"] = 99                                    # re-registered in place: same counts
    w.catalog = (12, w.catalog[1])
    w._poll(10, backoff_stub())
    assert w.fetched == [] and w.stats.dumps == 2
    assert w.stats.full_refreshes == 1
    assert ports(w.published[-1])["api"] == [99]


def test_index_going_back_resets_with_a_full_refresh(w):
    w.catalog = (3, w.catalog[1])
    assert w._poll(10, backoff_stub()) == 3
    assert w.stats.dumps == 2


def test_removed_service_is_dropped(w):
    w.catalog = (11, {k: v for k, v in w.catalog[1].items() if k != "api"})
    w._poll(10, backoff_stub())
    assert ports(w.published[-1]) == {"web": [80]}
    assert w.fetched == []


def test_failed_fetch_keeps_last_known_instances_and_retries(w):
    w.failing = {"web"}
    w.data["web"] = 90
    w.catalog = (11, {**w.catalog[1], "web": summary("web", instances=2)})
    w._poll(10, backoff_stub())
    assert ports(w.published[-1])["web"] == [80]         # the last good data, not nothing
    w.failing = set()
    w.fetched.clear()
    w._poll(11, backoff_stub())                           # same index, but a retry is due
    assert w.fetched == ["web"]
    assert ports(w.published[-1])["web"] == [90]


def test_unchanged_services_keep_their_tuples_across_a_full_refresh(w):
    before = dict(w._services)
    w.catalog = (12, w.catalog[1])
    w._poll(10, backoff_stub())
    assert all(w._services[n] is before[n] for n in before)   # identity: the control loop's cheap diff


def test_failed_dump_in_a_refresh_falls_back_to_fetches(w):
    w.dump_fails = True
    w.catalog = (3, w.catalog[1])
    w._poll(10, backoff_stub())
    assert sorted(w.fetched) == ["api", "web"]


def test_cold_start_failure_publishes_nothing():
    watcher = FakeWatcher()
    watcher.data = {"web": 80}
    watcher.dump_fails = True
    watcher.catalog = (5, {"web": summary("web")})
    with pytest.raises(ConsulUnavailable):
        watcher.sync_once()
    assert watcher.published == []


def backoff_stub():
    from edge.watch import Backoff
    return Backoff(first=0.0, cap=0.0)


def test_backoff_doubles_to_its_cap_and_resets():
    from edge.watch import Backoff
    b = Backoff(first=0.25, cap=2.0)
    assert [b.next() for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    b.reset()
    assert b.next() == 0.25
