"""The fleet (`--fleet`): one edge reads the catalog and publishes the route table to Consul KV;
every other edge follows it with one long-poll on one key, whatever the number of services.

Roles of a member (one per edge), decided by `edge.consul.fleetplan.next_move` after each read of
head:
- follower: long-polls `P/head` (stale reads); applies the delta head carries, or reads the shards
  whose version moved; hands the control loop the same `Snapshot` the watcher does.
- publisher: holds head's lock through a Consul session (TTL 10 s, lock-delay 0: every write is
  fenced by the lock itself, see `edge.consul.fleetstore`). Its reader (per node or the summary:
  `make_reader`) feeds its own control loop and the writer, which coalesces (at most one write
  per MIN_WRITE_INTERVAL), writes the changed shards and head, and rewrites head every BEAT
  seconds when there is nothing to write. It skips those beats while its reader keeps failing,
  so the fleet replaces it.
- fallback: no live publisher for FALLBACK_AFTER seconds (none elected, KV unreadable or denied,
  a head of another format): the member reads the catalog itself, as an edge without `--fleet`,
  and goes back to following once a publisher publishes again.

A head unchanged for SILENCE seconds (no write, no beat) means the publisher is gone: once a
consistent read agrees, a follower destroys its session (deposes it) and the members race for the
lock; the winner reads head and shards consistently and continues the chain. Every snapshot,
from KV or from a reader, passes one ACL guard (`make_guard`: the watcher's, with its history)
before the control loop sees it, so a mass removal is confirmed through the public API first.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from edge.consul.fleetplan import (
    BEAT,
    MIN_WRITE_INTERVAL,
    SHARDS,
    SILENCE,
    Following,
    FormatError,
    Head,
    Published,
    View,
    adopt,
    applied,
    beat,
    decode_head,
    encode_head,
    follow,
    next_move,
    plan_write,
    settle,
    shard_of,
    taken,
)
from edge.consul.fleetstore import SESSION_TTL, HeadRead, Store
from edge.consul.kv import KVDenied, KVUnavailable
from edge.consul.watch import CONSUL_ERRORS, Backoff, Changes, Snapshot
from edge.routing.model import Instance, Problem

log = logging.getLogger("edge.fleet")

ERRORS = (*CONSUL_ERRORS, KVUnavailable, FormatError)
RENEW = SESSION_TTL / 3        # session renewals, seconds apart
DENIED_PAUSE = 60.0            # after Consul refused a write (ACL), this long before trying again
ACQUIRE_PAUSE = 1.0            # between two attempts to take the lock


@dataclass
class FleetStats:
    """Counters for logs and benchmarks (printed as `key=value`)."""

    head_reads: int = 0
    shard_reads: int = 0
    writes: int = 0
    beats: int = 0
    elections: int = 0
    deposals: int = 0
    fallbacks: int = 0

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in vars(self).items())


class Member:
    def __init__(self, store: Store, deliver: Callable[[Snapshot], None], stop: threading.Event,
                 make_reader: Callable[[Callable[[Snapshot], None], threading.Event, bool], object],
                 make_guard: Callable[[Callable[[Snapshot], None]], object], name: str):
        self.store, self.deliver, self.stop, self.make_reader, self.name = store, deliver, stop, make_reader, name
        self.guard = make_guard(self._accepted)
        self.stats = FleetStats()
        self.role = "follower"
        self._lock = threading.Lock()          # guard, role and the writer's pending snapshot
        # what head looks like to us
        now = time.monotonic()
        self._index = 0
        self._head: Head | None = None
        self._modify = 0
        self._holder = ""
        self._changed_at = now                  # head last changed (as we saw it)
        self._live_at = now                     # head last usable, held and moving
        # following
        self._following: Following | None = None
        self._services: dict[str, tuple[Instance, ...]] = {}
        self._changes = Changes()
        self._names: list[set[str]] = [set() for _ in range(SHARDS)]
        self._problems: tuple[Problem, ...] = ()
        # publishing and reading
        self._session = ""
        self._pending: Snapshot | None = None
        self._writer_stop = threading.Event()
        self._writer_wake = threading.Event()
        self._lost = threading.Event()
        self._reader: object | None = None
        self._reader_stop: threading.Event | None = None
        self._generation = 0
        self._denied_until = 0.0
        self._next_acquire = 0.0
        self._next_depose = 0.0
        self._logged_format: str | None = None
        self._dirty = True          # the control loop has not seen our KV state (start, back from fallback)
        self._fell_back_from: tuple[str, int, int] | None = None   # head as it was when we fell back

    # --- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        problem = self.guard.check_acl()
        if problem:
            log.error("%s", problem)
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                self.stats.head_reads += 1
                read = self.store.head(self._index, SILENCE if self._index else None)
                backoff.reset()
                self._observe(read)
                if read.value is None:
                    self.stop.wait(1.0)   # a missing key answers at once: look again in a second
            except ERRORS as exc:
                delay = backoff.next()
                log.debug("fleet: reading %s failed (%s); again in %.2fs", self.store.head_key, exc, delay)
                self._decide(time.monotonic())
                self.stop.wait(delay)
        self._shutdown()

    def _observe(self, read: HeadRead) -> None:
        if read.index and read.index < self._index:
            log.info("fleet: the index of %s went back to %d (a restarted server?): reading it again",
                     self.store.head_key, read.index)
            self._index = 0
        else:
            self._index = read.index
        if (read.modify_index, read.session) != (self._modify, self._holder):
            self._modify, self._holder, self._changed_at = read.modify_index, read.session, read.seen_at
        self._head = None
        if read.value is not None:
            try:
                self._head = decode_head(read.value)
                self._logged_format = None
            except FormatError as exc:
                if str(exc) != self._logged_format:
                    log.warning("fleet: %s cannot be read by this edge (%s); following no publisher",
                                self.store.head_key, exc)
                    self._logged_format = str(exc)
        if self._head is not None and self._holder and read.seen_at - self._changed_at < SILENCE:
            self._live_at = read.seen_at
        if self.role == "follower" and self._head is not None and self._head.seq > 0 and self._holder:
            # An unlocked head has no publisher: this edge takes the lock or reads the catalog itself
            # next (`_decide`), and either way reading every shard now would be for nothing.
            self._apply(self._head, read.seen_at)
        self._decide(read.seen_at)

    def _decide(self, now: float) -> None:
        if self._lost.is_set() and self.role == "publisher":
            self._step_down("its writes were refused: the lock is not ours any more")
            return
        head = self._head
        newer = head is not None and head.ready and head.seq > 0 and \
            (head.chain, head.seq, head.beat) != self._fell_back_from
        view = View(self.role, head is not None, bool(self._holder), bool(self._session) and
                    self._holder == self._session, now - self._changed_at, now - self._live_at, newer,
                    now >= self._denied_until)
        move = next_move(view)
        if move == "acquire" and now >= self._next_acquire:
            self._acquire()
        elif move == "depose" and now >= self._next_depose:
            self._depose(now)
        elif move == "step-down":
            self._step_down("another session holds the lock")
        elif move == "fallback":
            self.stats.fallbacks += 1
            log.warning("fleet: no live publisher for %.0f s: reading the catalog ourselves until one publishes",
                        now - self._live_at)
            self.role = "fallback"
            self._fell_back_from = (head.chain, head.seq, head.beat) if head is not None else None
            self._start_reader()
        elif move == "follow":
            log.info("fleet: a publisher (%s) publishes again: following it", head.publisher)
            self._stop_reader()
            self.role, self._dirty = "follower", True
            if head.seq > 0:
                self._apply(head, now)

    # --- following ----------------------------------------------------------------------------------
    def _apply(self, head: Head, seen_at: float) -> None:
        step = follow(self._following, head)
        if step.kind == "stale":
            if not self._really_older(head):
                return
            step = follow(None, head)
        if step.kind == "same" and not self._dirty:
            return
        try:
            if step.kind == "delta":
                for name, instances in head.delta.items():
                    self._set(name, instances)
            elif step.kind != "same":
                usable = self._read_shards(head, step.shards)
                problems = self._read_problems(head) if step.problems else ()
                if usable is None or problems is None:
                    return
                for k, shard in usable.items():
                    for name in self._names[k] - shard.services.keys():
                        self._set(name, None)
                    for name, instances in shard.services.items():
                        self._set(name, instances)
                if step.problems and problems != self._problems:
                    self._problems, self._dirty = problems, True
                self._following = applied(self._following, head, step, usable)
        except ERRORS as exc:
            log.warning("fleet: could not read the publication at seq %d (%s); keeping the routes we have",
                        head.seq, exc)
            return
        if step.kind == "delta":
            self._following = applied(self._following, head, step, {})
        if self._dirty:
            self._dirty = False
            self._guarded(self._changes.snapshot(self._services, self._problems, head.index, seen_at,
                                                 full=step.kind == "full"))

    def _really_older(self, head: Head) -> bool:
        """A head older than what we applied: a lagging server (ignored), unless the leader says
        the same (KV went back, e.g. restored from a snapshot: read everything again)."""
        try:
            read = self.store.head(consistency="consistent")
            current = decode_head(read.value) if read.value is not None else None
        except ERRORS as exc:
            log.debug("fleet: could not check a stale head: %s", exc)
            return False
        if current is None or follow(self._following, current).kind != "stale":
            log.debug("fleet: head seq %d is older than the %d applied (a lagging server): ignored", head.seq,
                      self._following.seq)
            return False
        log.warning("fleet: the publication went back from seq %d to %d: reading it all again",
                    self._following.seq, current.seq)
        self._following = None
        return True

    def _read_shards(self, head: Head, numbers: tuple[int, ...]):
        """The usable shards for head, read stale and, for those behind, once more consistently;
        None (and nothing applied) while some are still behind."""
        wanted = tuple(k for k in numbers if head.versions[k])
        self.stats.shard_reads += len(wanted)
        late, usable = settle(head, numbers, self.store.shards(wanted))
        if late:
            self.stats.shard_reads += len(late)
            again, more = settle(head, late, self.store.shards(late, consistency="consistent"))
            usable.update(more)
            if again:
                log.warning("fleet: shards %s are behind head seq %d; trying again at the next head", again,
                            head.seq)
                return None
        return usable

    def _read_problems(self, head: Head) -> tuple[Problem, ...] | None:
        """The problems head names (stale, then consistently when behind); None while behind."""
        if not head.problems_version:
            return ()
        for consistency in (None, "consistent"):
            found = self.store.problems(consistency=consistency)
            if found is not None and found[0] == head.chain and found[1] >= head.problems_version:
                return found[2]
        log.warning("fleet: the problems list is behind head seq %d; trying again at the next head", head.seq)
        return None

    def _set(self, name: str, instances: tuple[Instance, ...] | None) -> None:
        """One service as KV says it; the same tuple stays when nothing changed (the control loop
        compares by identity first)."""
        current = self._services.get(name)
        if instances is None:
            if current is not None:
                del self._services[name]
                self._names[shard_of(name)].discard(name)
                self._changes.touch(name)
                self._dirty = True
        elif current is None or current != instances:
            self._services[name] = instances
            self._names[shard_of(name)].add(name)
            self._changes.touch(name)
            self._dirty = True

    # --- snapshots to the control loop ------------------------------------------------------------
    def _guarded(self, snapshot: Snapshot) -> None:
        with self._lock:
            self.guard.publish(snapshot)

    def _accepted(self, snapshot: Snapshot) -> None:
        """Past the guard: to our control loop, and to the writer when we publish."""
        self.deliver(snapshot)
        if self.role == "publisher":
            self._pending = snapshot
            self._writer_wake.set()

    def _from_reader(self, generation: int, snapshot: Snapshot) -> None:
        with self._lock:
            if generation != self._generation:
                return        # a reader we stopped: what it says is not ours to pass on
            self.guard.publish(snapshot)

    def _start_reader(self) -> None:
        with self._lock:
            self._generation += 1
            generation = self._generation
        stop = threading.Event()
        self._reader_stop = stop
        self._reader = self.make_reader(lambda s: self._from_reader(generation, s), stop, self.role == "publisher")
        threading.Thread(target=self._reader.run, name="fleet-reader", daemon=True).start()

    def _stop_reader(self) -> None:
        with self._lock:
            self._generation += 1
        if self._reader_stop is not None:
            self._reader_stop.set()
            self._reader.wake()
        self._reader_stop = None

    # --- elections ------------------------------------------------------------------------------------
    def _acquire(self) -> None:
        """Take head's lock (keeping head as it is), then continue the chain KV holds."""
        self._next_acquire = time.monotonic() + ACQUIRE_PAUSE + random.uniform(0, ACQUIRE_PAUSE)
        if self.stop.wait(random.uniform(0, 0.2)):      # let one of many candidates win first
            return
        session = ""
        try:
            read = self.store.head(consistency="consistent")
            if read.session:
                self._observe(read)
                return
            try:
                current = decode_head(read.value) if read.value is not None else None
            except FormatError:
                current = None          # another format's head, nobody holding it: a new chain
            value = encode_head(taken(current, self.name, uuid.uuid4().hex))
            session = self.store.session(f"haproxy-consul edge publisher {self.name}")
            if not self.store.acquire(session, value, read.modify_index):
                self.store.destroy(session)
                return
            published = self._adopt()
        except KVDenied as exc:
            self._denied_until = time.monotonic() + DENIED_PAUSE
            log.warning("fleet: Consul refuses this edge's writes to %s (%s): following, or reading the "
                        "catalog ourselves, without publishing", self.store.prefix, exc)
            return
        except ERRORS as exc:
            log.info("fleet: could not take the publisher's lock (%s)", exc)
            if session:
                self._forget(session)
            return
        self.stats.elections += 1
        self._stop_reader()
        with self._lock:
            self.role, self._session, self._pending = "publisher", session, None
        self._holder, self._changed_at = session, time.monotonic()   # ours, whatever a stale read says next
        # What we followed is the reader's to say now; held twice it would double our memory at 10,000 services.
        self._services, self._names, self._problems = {}, [set() for _ in range(SHARDS)], ()
        self._changes.lost()
        self._following, self._dirty = None, True
        self._lost.clear()
        log.info("fleet: this edge publishes the route table to %s (chain %s, from seq %d)", self.store.prefix,
                 published.head.chain[:8], published.head.seq)
        self._writer_stop = threading.Event()
        threading.Thread(target=self._writer, args=(session, published, self._writer_stop), name="fleet-writer",
                         daemon=True).start()
        self._start_reader()

    def _adopt(self) -> Published:
        read = self.store.head(consistency="consistent")
        try:
            head = decode_head(read.value) if read.value is not None else None
        except FormatError:
            head = None
        shards, problems = {}, None
        if head is not None and head.seq > 0:
            try:
                shards = self.store.shards(range(SHARDS), consistency="consistent")
                problems = self.store.problems(consistency="consistent") if head.problems_version else None
            except FormatError as exc:
                log.warning("fleet: the shards in %s cannot be read (%s): starting a new chain", self.store.prefix,
                            exc)
        return adopt(head, shards, problems, head.chain if head is not None and head.seq == 0 else uuid.uuid4().hex)

    def _depose(self, now: float) -> None:
        self._next_depose = now + SILENCE / 2
        try:
            read = self.store.head(consistency="consistent")
            if read.session and (read.modify_index, read.session) == (self._modify, self._holder):
                self.store.destroy(read.session)
                self.stats.deposals += 1
                log.warning("fleet: the publisher (%s) wrote nothing for %.0f s: its session is destroyed, "
                            "the fleet elects another", self._head.publisher if self._head else "?",
                            now - self._changed_at)
            else:
                self._observe(read)
        except KVDenied as exc:
            self._denied_until = time.monotonic() + DENIED_PAUSE
            log.warning("fleet: Consul refuses to let this edge depose a silent publisher (%s)", exc)
        except ERRORS as exc:
            log.debug("fleet: could not depose the publisher: %s", exc)

    def _step_down(self, why: str) -> None:
        log.warning("fleet: this edge stops publishing: %s", why)
        self._stop_reader()
        self._writer_stop.set()
        with self._lock:
            self.role, self._pending = "follower", None
        if self._session:
            self._forget(self._session)
        self._session, self._following, self._dirty = "", None, True
        self._lost.clear()

    def _forget(self, session: str) -> None:
        try:
            self.store.destroy(session)
        except ERRORS as exc:
            log.debug("fleet: could not destroy session %s: %s", session, exc)

    def _shutdown(self) -> None:
        self._stop_reader()
        if self.role == "publisher":
            self._writer_stop.set()
            self._forget(self._session)      # the lock goes now: another edge takes over at once
            log.info("fleet: stopped publishing")

    # --- the publisher's writer ------------------------------------------------------------------------
    def _writer(self, session: str, published: Published, stop: threading.Event) -> None:
        """Coalesced writes, beats and renewals until the lock is lost or `stop` is set; `published`
        is what KV holds, as only this thread knows it."""
        force, backoff = True, Backoff()
        last_write = last_beat = last_renew = time.monotonic()
        errors_seen, failing_since = self._reader_errors(), None
        while not stop.is_set() and not self.stop.is_set():
            now, snapshot = time.monotonic(), None
            self._writer_wake.wait(max(0.0, min(last_beat + BEAT, last_renew + RENEW) - now))
            self._writer_wake.clear()
            if stop.is_set() or self.stop.is_set():
                return
            try:
                now = time.monotonic()
                if now - last_renew >= RENEW:
                    if not self.store.renew(session):
                        return self._lose("the session expired")
                    last_renew = now
                if now - last_write < MIN_WRITE_INTERVAL:
                    stop.wait(last_write + MIN_WRITE_INTERVAL - now)   # coalesce: the newest snapshot wins
                with self._lock:
                    snapshot, self._pending = self._pending, None
                if snapshot is not None:
                    planned = plan_write(published, snapshot.services, snapshot.problems, snapshot.index,
                                         self.name, force)
                    if planned is not None:
                        if not self.store.publish(session, planned[1]):
                            return self._lose("a write was refused")
                        published, force = planned[0], False
                        self.stats.writes += 1
                        last_write = last_beat = time.monotonic()
                        log.debug("fleet: seq %d written (%d service(s), %d shard(s)) %.1f ms after Consul's answer",
                                  published.head.seq, len(published.head.delta or ()), len(planned[1].shards),
                                  (last_write - snapshot.seen_at) * 1000)
                elif time.monotonic() - last_beat >= BEAT:
                    errors = self._reader_errors()
                    failing_since = (failing_since or now) if errors > errors_seen else None
                    errors_seen = errors
                    if failing_since is not None and now - failing_since >= SILENCE:
                        log.warning("fleet: this edge's catalog reads keep failing: no more beats, the fleet "
                                    "elects another publisher")
                        self._denied_until = time.monotonic() + DENIED_PAUSE
                        return
                    published, head = beat(published, self.name)
                    if not self.store.beat(session, head):
                        return self._lose("a beat was refused")
                    self.stats.beats += 1
                    last_beat = time.monotonic()
                backoff.reset()
            except ERRORS as exc:
                with self._lock:
                    if self._pending is None:
                        self._pending = snapshot
                log.warning("fleet: writing to %s failed (%s); trying again", self.store.prefix, exc)
                stop.wait(backoff.next())

    def _lose(self, why: str) -> None:
        log.warning("fleet: %s: the publisher's lock is lost", why)
        self._lost.set()

    def _reader_errors(self) -> int:
        stats = getattr(self._reader, "stats", None)
        return getattr(stats, "errors", 0)
