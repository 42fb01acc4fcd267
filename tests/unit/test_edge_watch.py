"""The Consul watcher's rules against a fake Consul HTTP API: what is read, fetched and published,
per kind of write, in both watch modes."""

from __future__ import annotations

import copy
import json
import logging
import threading
import time

import pytest

from edge.consul.watch import (
    CATALOG_NODES,
    CATALOG_SERVICES,
    NONPASSING,
    UI_NODES,
    UI_SERVICES,
    Backoff,
    Changes,
    ConsulWatcher,
    Stats,
    Update,
    reset_by,
)
from edge.routing.model import Instance
from haproxy_consul.consul_api import Answer, ConsulRefused, ConsulSettings, ConsulUnavailable, parse_address


class FakeConsul:
    """A tiny catalog with Consul's index rules: every write takes the next raft index and moves
    the index of its table (services, checks, nodes); `/v1/health/service/<name>` answers with that
    service's own index. Records every request path. `lagging`: an older copy of the catalog that
    answers the stale reads, as a restarted server replaying its log does (the others go to the
    leader: this one)."""

    def __init__(self):
        self.raft = 10
        self.tables = {"services": 10, "checks": 10, "nodes": 10}
        self.service_index: dict[str, int] = {}
        self.nodes = {"n1": "10.0.0.1", "n2": "10.0.0.2"}
        self.instances: dict[tuple[str, str], dict] = {}     # (node, id) -> Service
        self.checks: dict[tuple[str, str], dict] = {}        # (node, check id) -> check
        self.requests: list[tuple[str, tuple]] = []
        self.refuse: dict[str, int] = {}
        self.shape: dict[str, object] = {}
        self.down = False
        self.last_contact = 0
        self.filtered = False
        self.hide_nodes = False                               # an ACL without node:read
        self.lagging: FakeConsul | None = None

    # --- writes, as agents make them ---
    def _write(self, table: str, service: str | None = None) -> None:
        self.raft += 1
        self.tables[table] = self.raft
        if service:
            self.service_index[service] = self.raft

    def register(self, node, sid, name, port, meta=None, address=""):
        self.instances[(node, sid)] = {"ID": sid, "Service": name, "Address": address, "Port": port, "Tags": [],
                                       "Meta": {"container_port": "80", **(meta or {})}, "ModifyIndex": self.raft + 1}
        self._write("services", name)

    def deregister(self, node, sid):
        name = self.instances.pop((node, sid))["Service"]
        self._write("services", name)

    def check(self, node, cid, status, sid="", output=""):
        name = self.instances[(node, sid)]["Service"] if sid else ""
        self.checks[(node, cid)] = {"Node": node, "CheckID": cid, "Status": status, "ServiceID": sid,
                                    "ServiceName": name, "Output": output, "ModifyIndex": self.raft + 1}
        self._write("checks", name or None)

    def node(self, name, address, meta=None):
        self.nodes[name] = address
        self._write("nodes")

    # --- reads ---
    def get(self, path, params=(), wait=None, raw=False) -> Answer:
        self.requests.append((path, tuple(params)))
        if self.down:
            raise ConsulUnavailable("connection refused")
        if path in self.refuse:
            raise ConsulRefused(self.refuse[path], path, "nope")
        state = self.lagging if self.lagging is not None and ("stale", "") in params else self
        body, index = state._body(path)
        body = self.shape.get(path, body)
        return Answer(json.dumps(body).encode() if raw else body, index, self.last_contact, True, self.filtered)

    def _names(self):
        return sorted({s["Service"] for s in self.instances.values()})

    def _entries(self, name):
        out = []
        for (node, sid), svc in sorted(self.instances.items()):
            if svc["Service"] != name or self.hide_nodes:
                continue
            checks = [c for (n, _), c in self.checks.items() if n == node and c["ServiceID"] in ("", sid)]
            out.append({"Node": {"Node": node, "Address": self.nodes[node]}, "Service": svc, "Checks": checks})
        return out

    def _body(self, path):
        everything = max(self.tables.values())
        if path == UI_SERVICES:
            rows = []
            for name in self._names():
                entries = self._entries(name)
                statuses = [c["Status"] for e in entries for c in e["Checks"]]
                rows.append({"Name": name, "Tags": None, "Nodes": [e["Node"]["Node"] for e in entries],
                             "InstanceCount": len(entries), "ChecksPassing": statuses.count("passing"),
                             "ChecksWarning": statuses.count("warning"), "ChecksCritical": statuses.count("critical")})
            return rows, everything
        if path == UI_NODES:
            return [{"Node": n, "Address": a, "Services": [s for (node, _), s in self.instances.items() if node == n],
                     "Checks": [c for (node, _), c in self.checks.items() if node == n]}
                    for n, a in self.nodes.items() if not self.hide_nodes], everything
        if path == CATALOG_SERVICES:
            return {n: [] for n in self._names()}, self.tables["services"]
        if path == CATALOG_NODES:
            return ([] if self.hide_nodes else [{"Node": n, "Address": a} for n, a in self.nodes.items()]), \
                self.tables["nodes"]
        if path == NONPASSING:
            return [c for c in self.checks.values() if c["Status"] != "passing"], self.tables["checks"]
        if path.startswith("/v1/catalog/node-services/"):
            n = path.rsplit("/", 1)[1]
            return {"Node": {"Node": n, "Address": self.nodes[n]},
                    "Services": [s for (node, _), s in self.instances.items() if node == n]}, everything
        if path.startswith("/v1/health/service/"):
            name = path.rsplit("/", 1)[1]
            return self._entries(name), self.service_index.get(name, self.tables["services"])
        if path == "/v1/acl/token/self":
            raise ConsulRefused(401, path, "ACL support disabled")
        raise AssertionError(f"unexpected read {path}")


def make(api="internal", consul=None, **kwargs):
    consul = consul or FakeConsul()
    published = []
    w = ConsulWatcher(ConsulSettings(parse_address("127.0.0.1:1")), None, published.append, threading.Event(),
                      api=api, **kwargs)
    w.http = w.reader.http = consul
    w.published = published
    w._last_polled = {}
    w._spawn = lambda read: read()          # a sweep reads at once; its result waits in the inbox
    return w, consul


def round_(w):
    """One round, as the pollers would have posted now: every long-poll whose index moved (a
    long-poll read through the watcher's reader, from the index it last answered), with whatever
    else is in the inbox; then the round of a sweep's read, if one came back (`make` has them
    read at once, in the loop's thread). Requests recorded: those of the rounds, not the polls."""
    with w._lock:
        updates, w._inbox = w._inbox, {}
    for name, path, params, parse, raw in w.poller_specs():
        last = w._last_polled.get(name, 0)
        answer = w.reader.read(path, params, index=last, wait=1.0, raw=raw)
        if answer.index != last:
            updates[name] = Update(parse(answer.body), answer.index, reset=answer.index < last,
                                   seen_at=time.monotonic())
            w._last_polled[name] = answer.index
    w.http.requests.clear()
    done = w._round(updates)
    with w._lock:
        swept, w._inbox = w._inbox, {}
    return w._round(swept) if done and swept else done


def synced(api="internal", **kwargs):
    w, consul = make(api, **kwargs)
    consul.register("n1", "consul", "consul", 8300)        # Consul's servers are always a service
    consul.register("n1", "web-1", "web", 8001)
    consul.register("n2", "web-2", "web", 8002)
    consul.register("n1", "api-1", "api", 9001)
    consul.check("n1", "ttl-web-1", "passing", sid="web-1")
    w.publish(w.sync_once())
    w._last_polled = {name: consul.get(path, params).index for name, path, params, _, _ in w.poller_specs()}
    consul.requests.clear()
    return w, consul


def ports(w):
    return {n: sorted(i.port for i in insts if i.healthy) for n, insts in w.published[-1].services.items()}


def fetched(consul):
    return sorted(p.rsplit("/", 1)[1] for p, _ in consul.requests if p.startswith("/v1/health/service/"))


MODES = ["internal", "public"]


@pytest.mark.parametrize("api", MODES)
def test_cold_sync_is_one_dump_not_one_request_per_service(api):
    w, consul = make(api)
    for i in range(5):
        consul.register("n1", f"s{i}", f"svc{i}", 8000 + i)
    w.publish(w.sync_once())
    assert len(w.published[-1].services) == 5
    assert fetched(consul) == []
    dump = [p for p, _ in consul.requests if p == UI_NODES or p.startswith("/v1/catalog/node-services/")]
    assert len(dump) == (1 if api == "internal" else len(consul.nodes))


@pytest.mark.parametrize("api", MODES)
@pytest.mark.parametrize("write, fetches, refreshes, expected", [
    # a health flip names its service: one fetch
    (lambda c: c.check("n1", "ttl-web-1", "critical", sid="web-1"), ["web"], 0, {"web": [8002], "api": [9001]}),
    # a TTL output update changes no status: nothing fetched, no full refresh
    (lambda c: c.check("n1", "ttl-web-1", "passing", sid="web-1", output="ok 2"), [], 0, None),
    # node meta: nothing either
    (lambda c: c.node("n2", "10.0.0.2", meta={"rack": "b"}), [], 0, None),
    # a node's new address matters to instances without their own: those services only
    (lambda c: c.node("n2", "10.0.0.9"), ["web"], 0, None),
    # a new service: that one only (public mode: the services index moved by 2, over the check
    # write before it too, and a window of two writes gets a verification, the first one at once)
    (lambda c: c.register("n2", "db-1", "db", 5432), ["db"], {"internal": 0, "public": 1},
     {"web": [8001, 8002], "api": [9001], "db": [5432]}),
    # an instance re-registered in place: nothing attributes it, so a sweep finds it
    (lambda c: c.register("n1", "api-1", "api", 9999), ["api"], 1, {"web": [8001, 8002], "api": [9999]}),
])
def test_what_each_kind_of_write_costs(api, write, fetches, refreshes, expected):
    w, consul = synced(api)
    before = len(w.published)
    write(consul)
    assert round_(w)
    assert fetched(consul) == fetches
    assert w.stats.full_refreshes == (refreshes if isinstance(refreshes, int) else refreshes[api])
    if expected is None and not fetches:
        assert len(w.published) == before, "nothing routable changed: nothing published"
    elif expected is not None:
        assert ports(w) == expected
    for old, new in zip(w.published, w.published[1:], strict=False):   # each says what changed, or not at all
        assert new.changed is None or new.after != old.serial or new.changed >= {
            n for n in old.services.keys() | new.services.keys() if old.services.get(n) != new.services.get(n)}


@pytest.mark.parametrize("write", [
    lambda c: c.check("n1", "ttl-web-1", "passing", sid="web-1", output="ok 2"),     # a TTL check's output
    lambda c: (c.check("n1", "ttl-web-1", "critical", sid="web-1"),                 # a flip and back within
               c.check("n1", "ttl-web-1", "passing", sid="web-1")),                 # one answer
    lambda c: c.node("n2", "10.0.0.2", meta={"rack": "b"}),                          # node meta
])
def test_check_and_node_writes_after_an_attributed_one_sweep_nothing(write):
    """Issue 20 item 8: every services write up to an attributed answer is explained, so a later
    answer the summaries do not explain is a check or node write, not a services one."""
    w, consul = synced("internal")
    consul.register("n2", "db-1", "db", 5432)               # a services write, attributed by its summary
    round_(w)
    write(consul)
    round_(w)
    assert w.stats.full_refreshes == 0 and fetched(consul) == []


def test_a_fetch_that_saw_a_later_write_is_fetched_again_with_the_next_answer():
    """A health flip between an answer and the fetch it asked for, then back before the next
    answer: that answer's summaries equal the kept ones, and only the second fetch sees it back."""
    w, consul = synced("internal")
    consul.check("n1", "ttl-api-1", "passing", sid="api-1")
    round_(w)
    consul.register("n2", "api-2", "api", 9002)
    real = consul.get

    def flip_first(path, params=(), wait=None, raw=False):
        if path.endswith("/api"):
            consul.get = real
            consul.check("n1", "ttl-api-1", "critical", sid="api-1")
        return real(path, params, wait, raw)
    consul.get = flip_first
    round_(w)
    assert ports(w)["api"] == [9002]
    consul.check("n1", "ttl-api-1", "passing", sid="api-1")
    round_(w)
    assert ports(w)["api"] == [9001, 9002] and w.stats.full_refreshes == 0


def test_a_new_instance_of_a_known_service_is_attributed_by_the_internal_summary():
    w, consul = synced("internal")
    consul.register("n2", "api-2", "api", 9002)
    round_(w)
    assert fetched(consul) == ["api"] and w.stats.full_refreshes == 0
    assert ports(w)["api"] == [9001, 9002]


def test_the_public_catalog_cannot_attribute_a_new_instance_so_it_sweeps():
    w, consul = synced("public")
    consul.register("n2", "api-2", "api", 9002)
    round_(w)
    assert w.stats.full_refreshes == 1 and ports(w)["api"] == [9001, 9002]


@pytest.mark.parametrize("api", MODES)
def test_removed_service_is_dropped_without_fetching(api):
    w, consul = synced(api)
    consul.deregister("n1", "api-1")
    round_(w)
    assert "api" not in w.published[-1].services and fetched(consul) == []


@pytest.mark.parametrize("api", MODES)
def test_two_writes_in_one_answer_get_a_verification_sweep(api):
    """An attributed write can hide an in-place change in the same answer: verified soon after."""
    w, consul = synced(api)
    consul.register("n1", "api-1", "api", 9999)            # in place: no summary shows it
    consul.register("n2", "db-1", "db", 5432)              # attributed
    round_(w)                                              # the first verification is due at once
    assert ports(w) == {"web": [8001, 8002], "api": [9999], "db": [5432]}
    assert w.stats.full_refreshes == 1 and fetched(consul) == ["api", "db"]
    consul.register("n1", "api-1", "api", 9998)            # the same again, at once:
    consul.register("n2", "cache-1", "cache", 6379)
    round_(w)
    assert ports(w)["api"] == [9999] and w._verify_due is not None   # rate-limited
    w._verify_due = time.monotonic()                       # rate limit elapsed
    round_(w)
    assert ports(w)["api"] == [9998] and w.stats.full_refreshes == 2


def test_a_verification_does_not_hold_back_a_change_fetched_meanwhile():
    """docs/performance.md section 11: one answer spanning two writes (a vhost removed and the next
    registered back to back) makes a verification due; the next vhost registered while it reads
    every service is published at once, not after it, and what the verification finds (an
    instance re-registered in place in that answer) is fetched when its read is back."""
    w, consul = synced("internal")
    events = []
    w.publish_to = lambda snapshot: (w.published.append(snapshot), events.append(("published", snapshot.services)))
    real = consul.get

    def get(path, params=(), wait=None, raw=False):
        if path == UI_NODES:
            events.append(("swept", {}))
        return real(path, params, wait, raw)
    consul.get = get
    reads = []
    w._spawn = reads.append                                 # the verification's read takes its time
    consul.register("n1", "api-1", "api", 9999)             # in place: no summary shows it
    consul.deregister("n2", "web-2")
    consul.register("n2", "nv0", "nv0", 8100)               # attributed
    round_(w)
    assert w.stats.full_refreshes == 0 and ports(w)["nv0"] == [8100]
    consul.register("n2", "nv1", "nv1", 8101)               # while the verification reads
    round_(w)
    first = next(i for i, (kind, services) in enumerate(events) if "nv1" in services)
    assert [kind for kind, _ in events[:first]] == ["published"], "nv1 waited for a sweep"
    reads.pop()()                                           # the verification's read is back
    round_(w)
    assert ports(w) == {"web": [8001], "api": [9999], "nv0": [8100], "nv1": [8101]}
    assert w.stats.full_refreshes == 1 and fetched(consul) == ["api"]


def test_a_write_nothing_attributes_while_a_sweep_reads_gets_another_sweep_after_it():
    """The read under way may have been made before that write: another sweep reads after it."""
    w, consul = synced("internal")
    reads = []
    w._spawn = reads.append
    consul.register("n1", "api-1", "api", 9999)             # in place: a sweep starts reading
    round_(w)
    reads.pop()()                                           # it has read...
    consul.register("n1", "web-1", "web", 8009)             # ...before this one, in place too
    round_(w)
    assert ports(w) == {"web": [8001, 8002], "api": [9999]} and len(reads) == 1
    reads.pop()()
    round_(w)
    assert ports(w) == {"web": [8002, 8009], "api": [9999]} and w.stats.full_refreshes == 2


def test_a_write_nothing_attributes_is_swept_once_though_answers_come_while_it_reads(caplog):
    caplog.set_level(logging.INFO, "edge.watch")
    w, consul = synced("internal")
    reads = []
    w._spawn = reads.append
    consul.register("n1", "api-1", "api", 9999)             # in place: a sweep starts reading
    round_(w)
    consul.check("n1", "ttl-web-1", "passing", sid="web-1", output="ok 2")   # the ui index moves again
    round_(w)
    assert caplog.text.count("sweeping every service") == 1 and len(reads) == 1 and w._verify_due is None
    reads.pop()()
    round_(w)
    assert ports(w)["api"] == [9999] and w.stats.full_refreshes == 1 and not reads


def test_a_sweep_read_before_a_full_sync_is_not_used():
    w, consul = synced("internal")
    reads = []
    w._spawn = reads.append
    consul.register("n1", "api-1", "api", 9999)
    round_(w)
    w.publish(w.sync_once())                                # an outage, say: everything read again
    reads.pop()()
    before = len(w.published)
    round_(w)
    assert len(w.published) == before and w.stats.full_refreshes == 0 and ports(w)["api"] == [9999]


@pytest.mark.parametrize("updates, outcome", [
    ({}, False),
    ({"services": Update({}, 12)}, False),
    ({"services": Update({}, 3, reset=True)}, True),                      # went back at the leader too
    ({"nodes": Update({}, 12), "checks": Update(error=ConsulUnavailable("refused"))}, ConsulUnavailable),
])
def test_what_the_pollers_answers_ask_for_before_anything_is_folded_in(updates, outcome):
    """One rule for both readers (this watcher and the per-node one): a failure is raised, an
    index that went back is a full sync, counted."""
    stats, refreshes = Stats(), []

    class Metrics:
        def full_refresh(self, reason):
            refreshes.append(reason)
    if outcome is ConsulUnavailable:
        with pytest.raises(ConsulUnavailable):
            reset_by(updates, stats, Metrics())
    else:
        assert reset_by(updates, stats, Metrics()) is outcome
        assert stats.full_refreshes == len(refreshes) == int(outcome) and refreshes in ([], ["index reset"])


def test_index_going_back_asks_for_a_full_sync():
    w, _ = synced()
    assert w._round({"services": Update({}, 3, reset=True)}) is False


def test_failed_fetch_keeps_last_known_instances_and_retries():
    w, consul = synced()
    consul.register("n2", "api-2", "api", 9002)
    real = consul.get

    def flaky(path, params=(), wait=None, raw=False):
        if path.endswith("/api"):
            raise ConsulUnavailable("boom")
        return real(path, params, wait, raw)
    consul.get = flaky
    round_(w)
    assert ports(w)["api"] == [9001]                       # the last good data, not nothing
    consul.get = real
    assert w._retry == {"api"}
    round_(w)                                              # nothing new, but a retry is due
    assert ports(w)["api"] == [9001, 9002]


def test_unchanged_services_keep_their_tuples_across_a_sweep():
    w, consul = synced()
    before = dict(w._services)
    consul.register("n1", "api-1", "api", 9999)
    round_(w)
    assert w.stats.full_refreshes == 1
    assert w._services["web"] is before["web"]             # identity: the control loop's cheap diff


def test_cold_start_failure_publishes_nothing():
    w, consul = make()
    consul.down = True
    with pytest.raises(ConsulUnavailable):
        w.sync_once()
    assert w.published == []


@pytest.mark.parametrize("refusal", [
    {"refuse": {UI_SERVICES: 404}},
    {"refuse": {UI_SERVICES: 403}},
    {"shape": {UI_SERVICES: {"Services": []}}},            # an answer of another shape
    {"shape": {UI_SERVICES: [{"Name": "web", "Instances": 2}]}},
])
def test_auto_falls_back_to_the_public_api_once(refusal, caplog):
    w, consul = make("auto")
    consul.register("n1", "web-1", "web", 8001)
    for key, value in refusal.items():
        setattr(consul, key, value)
    snapshot = w.sync_once()
    assert w.mode == "public" and list(snapshot.services) == ["web"]
    assert caplog.text.count("watching through the public API only") == 1


def test_internal_mode_does_not_fall_back():
    w, consul = make("internal")
    consul.refuse = {UI_SERVICES: 404}
    with pytest.raises(ConsulRefused):
        w.sync_once()


def modes(consul):
    """The consistency parameter of each request so far."""
    return [next((k for k, _ in params if k in ("stale", "consistent")), "default") for _, params in consul.requests]


def test_reads_go_to_the_leader_until_the_server_has_shown_it_caught_up():
    w, consul = make(max_stale=2.0)
    consul.register("n1", "web-1", "web", 8001)
    w.sync_once()                                          # nothing earned yet: the leader answers
    assert set(modes(consul)) == {"default"}
    consul.requests.clear()
    index = w.reader.clocks.floor(UI_SERVICES)
    w.reader.read(UI_SERVICES, index=index, wait=1.0, raw=True)   # a long-poll: stale, answered by...
    assert modes(consul) == ["stale"] and not w.reader.trusted    # ...the leader (last contact 0)
    consul.last_contact = 5                                # a follower's own state, as new as all seen
    w.reader.read(UI_SERVICES, index=index, wait=1.0, raw=True)
    assert w.reader.trusted
    consul.requests.clear()
    w.reader.read(CATALOG_SERVICES)
    assert modes(consul) == ["stale"]
    consul.requests.clear()
    consul.last_contact = 2500                             # too stale: read again from the leader
    w.reader.read(CATALOG_SERVICES)
    assert modes(consul) == ["stale", "consistent"]
    assert w.stats.stale_retries == 1 and not w.reader.trusted


def trusted(api="internal"):
    """Synced, and the server the watcher reads has shown it is caught up: stale reads."""
    w, consul = synced(api)
    consul.last_contact = 5
    for _, path, params, _, raw in w.poller_specs():
        w.reader.read(path, params, index=w.reader.clocks.floor(path), wait=1.0, raw=raw)
    assert w.reader.trusted
    consul.requests.clear()
    return w, consul


@pytest.mark.parametrize("api", MODES)
def test_a_server_answering_from_an_older_state_removes_nothing(api, caplog):
    """A restarted server replays its log: its stale answers come from before what was applied."""
    caplog.set_level(logging.INFO, "edge.watch")
    w, consul = trusted(api)
    older = copy.deepcopy(consul)                          # the state the restarted server is at
    consul.register("n2", "db-1", "db", 5432)
    round_(w)
    assert ports(w)["db"] == [5432]
    consul.lagging = older
    consul.register("n2", "api-2", "api", 9002)
    round_(w)
    assert ports(w) == {"web": [8001, 8002], "api": [9001, 9002], "db": [5432]}
    assert consul.requests and set(modes(consul)) == {"default"}      # what followed the polls: the leader
    assert not w.reader.trusted and w.stats.stale_retries >= 1
    assert "answered /v1/" in caplog.text and "reading from the leader" in caplog.text


@pytest.mark.parametrize("api", MODES)
def test_a_sweep_from_a_server_that_fell_behind_reads_the_leader(api):
    """No outage seen (an agent switching to another server): the summaries and the dump each
    answer below what was seen and are read again from the leader."""
    w, consul = trusted(api)
    older = copy.deepcopy(consul)
    consul.register("n2", "db-1", "db", 5432)
    round_(w)
    consul.lagging = older
    w._verify_due = time.monotonic()
    round_(w)
    assert ports(w) == {"web": [8001, 8002], "api": [9001], "db": [5432]}
    assert w.stats.stale_retries >= 1 and not w.reader.trusted


def test_after_an_outage_the_full_sync_reads_the_leader():
    w, consul = trusted()
    older = copy.deepcopy(consul)
    consul.register("n2", "db-1", "db", 5432)
    round_(w)
    consul.down = True
    with pytest.raises(ConsulUnavailable):
        w.sync_once()
    assert not w.reader.trusted
    consul.down, consul.lagging = False, older             # back, replaying its log
    consul.requests.clear()
    w.publish(w.sync_once())
    assert ports(w)["db"] == [5432]
    assert set(modes(consul)) == {"default"}


def test_pollers_start_from_what_the_full_sync_read():
    w, consul = synced("public")
    w._start_pollers()
    w.stop.set()
    starts = {p.name: p.index for p in w._pollers}
    assert starts == {"services": consul.tables["services"], "checks": consul.tables["checks"],
                      "nodes": consul.tables["nodes"]}


def test_an_index_gone_back_at_the_leader_too_is_a_reset(caplog):
    w, consul = trusted()
    rebuilt = FakeConsul()                                 # a new cluster: its indexes start over
    rebuilt.register("n1", "web-9", "web", 8009)
    w.http = w.reader.http = rebuilt
    assert round_(w) is False                              # a full sync follows
    assert "Consul's state went back" in caplog.text
    w.publish(w.sync_once())
    assert ports(w) == {"web": [8009]}


@pytest.mark.parametrize("consistency, param", [("consistent", ("consistent", "")), ("default", None)])
def test_consistency_modes(consistency, param):
    w, consul = make(consistency=consistency)
    w.reader.read(CATALOG_SERVICES)
    assert consul.requests == [(CATALOG_SERVICES, (param,) if param else ())]


def test_an_acl_filtered_empty_answer_keeps_the_routes(caplog):
    caplog.set_level(logging.INFO, "edge.watch")
    w, consul = synced()
    consul.hide_nodes = True                               # the token lost node:read...
    consul.node("n2", "10.0.0.2", meta={"rack": "c"})      # ...and the next write shows it
    round_(w)
    assert ports(w) == {"web": [8001, 8002], "api": [9001]}, "nothing removed"
    assert "node:read" in caplog.text and "ERROR" in caplog.text
    consul.hide_nodes = False
    consul.register("n1", "db-1", "db", 5432)
    round_(w)
    assert ports(w)["db"] == [5432] and "look complete again" in caplog.text


def test_a_confirmed_large_removal_is_applied(caplog):
    w, consul = synced()
    consul.deregister("n1", "web-1")
    consul.deregister("n2", "web-2")
    consul.deregister("n1", "api-1")
    round_(w)
    assert ports(w) == {}
    assert "confirmed through the public API" in caplog.text


def test_a_cold_start_with_a_filtered_catalog_publishes_nothing(caplog):
    w, consul = make()
    consul.register("n1", "web-1", "web", 8001)
    consul.hide_nodes = True
    w.publish(w.sync_once())
    assert w.published == [] and "node:read" in caplog.text


def test_backoff_doubles_to_its_cap_and_resets():
    b = Backoff(first=0.25, cap=2.0)
    assert [b.next() for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    b.reset()
    assert b.next() == 0.25


@pytest.mark.parametrize("api, polls", [("internal", 1), ("public", 3)])
def test_long_polls_per_edge_do_not_grow_with_services(api, polls):
    w, _ = make(api)
    w.mode = api
    assert len(w.poller_specs()) == polls


def test_a_sources_snapshots_say_what_changed_since_the_one_it_built_before():
    changes, services = Changes(), {"a": (), "b": ()}
    first = changes.snapshot(services, (), 1, 0.0)
    assert first.changed is None                               # nothing built before it
    services["a"] = (Instance("a", "n1", "a-1", "10.0.0.1", 8001, 80, True),)
    changes.touch("a")
    second = changes.snapshot(services, (), 2, 0.0)
    assert (second.changed, second.after) == ({"a"}, first.serial)
    assert changes.snapshot(services, (), 3, 0.0).changed == frozenset()
    changes.lost()                                             # rebuilt: not known
    assert changes.snapshot(services, (), 4, 0.0).changed is None
    assert changes.snapshot(services, (), 5, 0.0, full=True).changed is None
