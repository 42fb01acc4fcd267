"""Fleet members against an in-memory KV with Consul's lock rules, with timings shrunk: who
publishes, what followers receive, and what happens when the publisher dies, is partitioned, or
nobody may publish. The real Consul cluster is tests/integration/test_fleet.py's."""

from __future__ import annotations

import itertools
import threading
import time
from types import MappingProxyType

import pytest

from edge.consul import fleet, fleetplan
from edge.consul.fleet import Member
from edge.consul.fleetplan import SHARDS, Head, decode_head, decode_shard, encode_head, encode_shard
from edge.consul.fleetstore import HeadRead
from edge.consul.kv import KVDenied
from edge.consul.watch import Snapshot, Stats
from edge.routing.model import Instance
from haproxy_consul.consul_api import ConsulUnavailable
from tests.support.procs import wait_until


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    for module, values in ((fleetplan, {"BEAT": 0.1, "SILENCE": 0.4, "FALLBACK_AFTER": 0.8}),
                           (fleet, {"BEAT": 0.1, "SILENCE": 0.4, "RENEW": 0.2, "ACQUIRE_PAUSE": 0.05,
                                    "DENIED_PAUSE": 5.0, "MIN_WRITE_INTERVAL": 0.01})):
        for name, value in values.items():
            monkeypatch.setattr(module, name, value)


class KV:
    """One Consul KV: keys with ModifyIndex, locks held by sessions, sessions; blocking head reads."""

    def __init__(self):
        self.cond = threading.Condition()
        self.index = itertools.count(2)
        self.keys: dict[str, tuple[int, bytes, str]] = {}     # key -> (ModifyIndex, value, session)
        self.sessions: set[str] = set()
        self.writes: list[tuple[str, str]] = []               # (session, key) of every write
        self.refuse: set[str] = set()                         # member names whose writes are denied

    def set(self, key: str, value: bytes, session: str = "", writer: str = "") -> None:
        with self.cond:
            self.keys[key] = (next(self.index), value, session)
            self.writes.append((writer, key))
            self.cond.notify_all()

    def destroy(self, session: str) -> None:
        with self.cond:
            self.sessions.discard(session)
            for key, (_, value, holder) in list(self.keys.items()):
                if holder == session:
                    self.keys[key] = (next(self.index), value, "")
            self.cond.notify_all()


class Store:
    """One member's view of the KV (`down`: every call fails, as for a dead or partitioned edge)."""

    head_key, prefix = "f/head", "f"

    def __init__(self, kv: KV, name: str):
        self.kv, self.name, self.down = kv, name, False

    def _up(self):
        if self.down:
            raise ConsulUnavailable("partitioned")

    def head(self, index=0, wait=None, consistency=None) -> HeadRead:
        self._up()
        with self.kv.cond:
            if index:
                self.kv.cond.wait_for(lambda: self.down or self.kv.keys.get(self.head_key, (0,))[0] != index,
                                      timeout=wait)
            self._up()
            entry = self.kv.keys.get(self.head_key)
        if entry is None:
            return HeadRead(0, seen_at=time.monotonic())
        return HeadRead(entry[0], entry[1], entry[2], entry[0], time.monotonic())

    def shards(self, numbers, consistency=None):
        self._up()
        return {k: decode_shard(k, self.kv.keys[f"f/shard/{k}"][1]) for k in numbers if f"f/shard/{k}" in self.kv.keys}

    def problems(self, consistency=None):
        self._up()
        return None

    def session(self, name):
        self._up()
        if self.name in self.kv.refuse:
            raise KVDenied("permission denied")
        sid = f"{self.name}-{time.monotonic_ns()}"
        self.kv.sessions.add(sid)
        return sid

    def renew(self, session):
        self._up()
        return session in self.kv.sessions

    def destroy(self, session):
        self._up()
        self.kv.destroy(session)

    def _holds(self, session: str) -> bool:
        holder = self.kv.keys.get(self.head_key, (0, b"", ""))[2]
        return session in self.kv.sessions and holder in ("", session)

    def acquire(self, session, value, modify_index):
        self._up()
        with self.kv.cond:
            if self.kv.keys.get(self.head_key, (0,))[0] != modify_index or not self._holds(session):
                return False
            self.kv.set(self.head_key, value, session, self.name)
            return True

    def beat(self, session, head):
        self._up()
        with self.kv.cond:
            if not self._holds(session):
                return False
            self.kv.set(self.head_key, encode_head(head), session, self.name)
            return True

    def publish(self, session, write):
        self._up()
        with self.kv.cond:
            if not self._holds(session):
                return False
            for k, shard in write.shards.items():
                self.kv.set(f"f/shard/{k}", encode_shard(shard), writer=self.name)
            self.kv.set(self.head_key, encode_head(write.head), session, self.name)
            return True


class Catalog:
    """What every member's catalog reader sees; `set` is a change in Consul."""

    def __init__(self, services):
        self.cond = threading.Condition()
        self.services, self.version = services, 0

    def set(self, services):
        with self.cond:
            self.services, self.version = services, self.version + 1
            self.cond.notify_all()


class Reader:
    def __init__(self, catalog: Catalog, publish, stop: threading.Event):
        self.catalog, self.publish, self.stop, self.stats = catalog, publish, stop, Stats()

    def run(self):
        seen = -1
        while not self.stop.is_set():
            with self.catalog.cond:
                self.catalog.cond.wait_for(lambda s=seen: self.catalog.version != s or self.stop.is_set(), timeout=1)
                seen, services = self.catalog.version, self.catalog.services
            if not self.stop.is_set():
                self.publish(Snapshot(MappingProxyType(services), (), seen + 100, time.monotonic()))

    def wake(self):
        with self.catalog.cond:
            self.catalog.cond.notify_all()


class Guard:
    def __init__(self, accepted):
        self.accepted, self.seen = accepted, 0

    def check_acl(self):
        return None

    def publish(self, snapshot):
        self.seen += 1
        self.accepted(snapshot)
        return True


class Edge:
    """One edge: its member, and every snapshot its control loop received."""

    def __init__(self, kv: KV, catalog: Catalog, name: str):
        self.store, self.stop, self.snapshots = Store(kv, name), threading.Event(), []
        self.readers: list[tuple[Reader, bool]] = []

        def make_reader(publish, stop, publishing):
            reader = Reader(catalog, publish, stop)
            self.readers.append((reader, publishing))
            return reader
        self.member = Member(self.store, self.snapshots.append, self.stop, make_reader, Guard, name)
        self.thread = threading.Thread(target=self.member.run, daemon=True)

    def start(self) -> Edge:
        self.thread.start()
        return self

    def has(self, services) -> bool:
        return bool(self.snapshots) and dict(self.snapshots[-1].services) == services

    def kill(self):
        """As kill -9: nothing reaches Consul any more, the session is not destroyed."""
        self.store.down = True
        self.stop.set()
        with self.store.kv.cond:
            self.store.kv.cond.notify_all()


def catalog_of(*names: str, port: int = 80) -> dict[str, tuple[Instance, ...]]:
    return {n: (Instance(n, "node1", f"{n}-1", "10.0.0.1", port, 80, True),) for n in names}


def fleet_of(n: int, services) -> tuple[KV, Catalog, list[Edge]]:
    kv, catalog = KV(), Catalog(services)
    edges = [Edge(kv, catalog, f"e{i}") for i in range(n)]
    for e in edges:
        e.start()
    return kv, catalog, edges


def publisher(edges) -> Edge:
    return wait_until(lambda: next((e for e in edges if e.member.role == "publisher"), None), 5, what="a publisher")


def never_lost(edge: Edge) -> bool:
    """No snapshot after the first complete one dropped a service (the catalog here only grows)."""
    sizes = [len(s.services) for s in edge.snapshots]
    return all(b >= a for a, b in zip(sizes, sizes[1:], strict=False))


def test_one_edge_publishes_and_the_others_follow_one_key(monkeypatch):
    for module in (fleet, fleetplan):                     # no beat between the write and the reads here
        monkeypatch.setattr(module, "BEAT", 30.0)
        monkeypatch.setattr(module, "SILENCE", 90.0)
    kv, catalog, edges = fleet_of(3, catalog_of("web", "api"))
    try:
        pub = publisher(edges)
        for e in edges:
            wait_until(lambda e=e: e.has(catalog_of("web", "api")), 5, what="the table at every edge")
        assert [r[1] for r in pub.readers] == [True], "only the publisher reads the catalog, as publisher"
        assert all(not e.readers for e in edges if e is not pub)
        reads = {id(e): e.member.stats.shard_reads for e in edges}
        catalog.set(catalog_of("web", "api", "db"))
        for e in edges:
            wait_until(lambda e=e: e.has(catalog_of("web", "api", "db")), 5, what="the change at every edge")
        assert {id(e): e.member.stats.shard_reads for e in edges} == reads, "a change is head's delta, no shard"
        head = decode_head(kv.keys["f/head"][1])
        assert head.publisher == pub.member.name and head.ready and head.seq >= 2
        assert all(e.member.guard.seen == len(e.snapshots) for e in edges), "every snapshot passed the guard"
    finally:
        for e in edges:
            e.stop.set()


def test_a_killed_publisher_is_deposed_and_the_chain_goes_on_without_losing_a_route():
    kv, catalog, edges = fleet_of(3, catalog_of("web", "api"))
    try:
        first = publisher(edges)
        for e in edges:
            wait_until(lambda e=e: e.has(catalog_of("web", "api")), 5, what="the table at every edge")
        chain = decode_head(kv.keys["f/head"][1]).chain
        first.kill()
        catalog.set(catalog_of("web", "api", "db"))
        rest = [e for e in edges if e is not first]
        for e in rest:
            wait_until(lambda e=e: e.has(catalog_of("web", "api", "db")), 10, what="the change after the kill")
        second = publisher(rest)
        assert second.member.stats.elections == 1
        assert sum(e.member.stats.deposals for e in rest) >= 1
        assert decode_head(kv.keys["f/head"][1]).chain == chain, "the new publisher continued the chain"
        assert all(never_lost(e) for e in rest)
    finally:
        for e in edges:
            e.stop.set()


def test_a_partitioned_publisher_cannot_write_once_deposed_and_follows_when_healed():
    kv, catalog, edges = fleet_of(3, catalog_of("web"))
    try:
        first = publisher(edges)
        for e in edges:
            wait_until(lambda e=e: e.has(catalog_of("web")), 5, what="the table at every edge")
        first.store.down = True                  # partitioned: alive, believes it holds the lock
        with kv.cond:
            kv.cond.notify_all()
        rest = [e for e in edges if e is not first]
        second = publisher(rest)
        catalog.set(catalog_of("web", "api"))
        for e in rest:
            wait_until(lambda e=e: e.has(catalog_of("web", "api")), 10, what="the change at the others")
        deposed_at = len(kv.writes)
        first.store.down = False                 # healed
        wait_until(lambda: first.member.role == "follower", 10, what="the old publisher stepping down")
        wait_until(lambda: first.has(catalog_of("web", "api")), 10, what="the healed edge converging")
        assert not [w for w in kv.writes[deposed_at:] if w[0] == first.member.name], "no write after deposal"
        assert second.member.role == "publisher" and never_lost(first)
    finally:
        for e in edges:
            e.stop.set()


def test_without_a_publisher_an_edge_reads_the_catalog_itself_and_comes_back():
    kv, catalog = KV(), Catalog(catalog_of("web"))
    kv.refuse.add("e0")                          # e0's token may not write KV
    lone = Edge(kv, catalog, "e0").start()
    try:
        wait_until(lambda: lone.member.role == "fallback", 5, what="the fallback")
        wait_until(lambda: lone.has(catalog_of("web")), 5, what="the table from the edge's own reads")
        assert lone.readers and lone.readers[0][1] is False, "a fallback reader, not a publisher's"
        other = Edge(kv, catalog, "e1").start()
        wait_until(lambda: other.member.role == "publisher", 5, what="a publisher")
        wait_until(lambda: lone.member.role == "follower", 5, what="back to following")
        catalog.set(catalog_of("web", "api"))
        wait_until(lambda: lone.has(catalog_of("web", "api")), 5, what="changes through KV again")
        assert lone.readers[0][0].stop.is_set(), "the fallback reader stopped"
        other.stop.set()
    finally:
        lone.stop.set()


def test_a_head_this_edge_cannot_read_never_empties_its_table():
    kv, catalog = KV(), Catalog(catalog_of("web"))
    kv.sessions.add("newer")
    kv.set("f/head", b'{"f": 99, "future": true}', "newer", "newer")      # a newer edge's live head

    def beating():
        while not edge.stop.is_set():
            kv.set("f/head", b'{"f": 99, "future": true}', "newer", "newer")
            time.sleep(0.05)
    edge = Edge(kv, catalog, "e0").start()
    threading.Thread(target=beating, daemon=True).start()
    try:
        wait_until(lambda: edge.member.role == "fallback", 5, what="the fallback")
        assert edge.member.stats.deposals == 0, "a live publisher of another format is not deposed"
        wait_until(lambda: edge.has(catalog_of("web")), 5, what="the table from the edge's own reads")
        assert all(s.services for s in edge.snapshots)
    finally:
        edge.stop.set()


def test_a_stale_head_is_ignored_unless_the_leader_agrees():
    kv, catalog, edges = fleet_of(1, catalog_of("web"))
    try:
        (edge,) = edges
        publisher(edges)
        wait_until(lambda: edge.has(catalog_of("web")), 5, what="the table")
        follower = Member(Store(kv, "f"), [].append, threading.Event(), None, Guard, "f")
        head = decode_head(kv.keys["f/head"][1])
        follower._apply(head, time.monotonic())
        assert follower._following.seq == head.seq
        older = Head(head.chain, head.seq - 1, versions=(head.seq - 1,) * SHARDS)
        follower._apply(older, time.monotonic())
        assert follower._following.seq == head.seq, "a lagging server's head is not applied"
    finally:
        edge.stop.set()


def test_a_publisher_whose_reads_keep_failing_stops_beating_and_is_replaced():
    kv, catalog, edges = fleet_of(2, catalog_of("web"))
    try:
        first = publisher(edges)
        for e in edges:
            wait_until(lambda e=e: e.has(catalog_of("web")), 5, what="the table at every edge")
        reader = first.readers[-1][0]

        def failing():
            while first.member.role == "publisher":
                reader.stats.errors += 1
                time.sleep(0.05)
        threading.Thread(target=failing, daemon=True).start()
        (other,) = [e for e in edges if e is not first]
        wait_until(lambda: other.member.role == "publisher", 10, what="another publisher")
        wait_until(lambda: first.member.role == "follower", 10, what="the failing one stepping down")
    finally:
        for e in edges:
            e.stop.set()
