"""The Consul shell: long-polls that say what changed, one fetch per changed service.

Two ways to learn what changed (`--consul-api`):
- internal: `/v1/internal/ui/services` (what Consul's own UI lists) answers a blocking query with a
  summary of every service (tags, nodes, instance and check counts); a service whose summary
  changed is refetched with `/v1/health/service/<name>`. Full syncs read `/v1/internal/ui/nodes`.
- public: only documented endpoints. `/v1/catalog/services` (names and tags),
  `/v1/health/state/any?filter=Status != "passing"` (checks that are not passing) and
  `/v1/catalog/nodes` (addresses), three long-polls per edge. A check whose status changes names
  its service (or node); an output-only update (TTL notes, `check_update_interval` syncs) changes
  nothing we read, and a node meta change nothing either. Full syncs read
  `/v1/catalog/node-services/<node>` per node.
- auto (default): internal while it answers in the shape we expect; on 403/404 or another shape
  it falls back to public, logged once.

A services write that no answer attributes (an instance re-registered in place, service meta)
is found by a sweep: a read of every service that compares per-instance data, logged and counted
as a full refresh. In internal mode the ui index also moves for check and node writes; a cheap read of
`/v1/catalog/services` (whose index is the services table's) tells them apart, so those never
cost a full refresh: every services write up to an attributed answer counts as explained
(`_accounted`), and only a services index beyond it is a write no answer explained. Two services
writes in one answer can hide an in-place change behind an attributed one: such windows get a
verification sweep, rate-limited so bursts coalesce. A sweep never holds back a change: the
answer's own change is published first, the read of every service runs beside the loop (which
goes on publishing what the answers attribute), and the services that read finds different are
fetched again, each on its own, when it is back.

What is kept must stay comparable with the next answer: a full sync keeps summaries and a dump
of the same catalog index, and a fetch that saw a write beyond the answers folded in is fetched
again with the next answer (else a service that changed back would look unchanged).

Reads are `?stale` by default (any server answers; `--consistency`). Index rules as
consul-template's `watch/view.go`, with what consul-template lacks for stale reads
(`edge.consul.freshness`): the same index means nothing new; an index below what the endpoint
already answered, a server without a leader or an `X-Consul-LastContact` over `--max-stale`
means the server is behind (a restarted one replaying its log): the answer is read again from
the leader and never applied as it is, and reads other than long-polls go to the leader until
the server has caught up. Only a leader below it too means Consul's state went back: a full
sync. Errors back off exponentially (capped at 2 s) and a full sync follows an outage; the
long-polls then start from what it read, never from 0. A snapshot that would remove every
route, or more than half, is published only once an independent read through the public API
confirms it (`edge.consul.safety`); nothing here publishes an empty catalog because of an error
or an ACL filter.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import quote

from edge.consul.freshness import Clocks, behind, proves_caught_up
from edge.consul.safety import PublicView, judge, needs_confirmation, start_problem
from edge.metrics import NoMetrics
from edge.routing.model import (
    EXCLUDED_SERVICES,
    CheckState,
    Instance,
    Problem,
    ServiceSummary,
    ShapeError,
    changed_checks,
    changed_nodes,
    changed_summaries,
    entries_from_node_services,
    instances_from_health,
    instances_from_node_dump,
    node_addresses,
    nonpassing_checks,
    routable_service,
    services_from_catalog,
    summaries_from_ui_raw,
)
from haproxy_consul.consul_api import (
    Answer,
    ConsulDenied,
    ConsulError,
    ConsulHTTP,
    ConsulRefused,
    ConsulSettings,
    ConsulUnavailable,
)

log = logging.getLogger("edge.watch")

UI_SERVICES = "/v1/internal/ui/services"
UI_NODES = "/v1/internal/ui/nodes"
CATALOG_SERVICES = "/v1/catalog/services"
CATALOG_NODES = "/v1/catalog/nodes"
NONPASSING = "/v1/health/state/any"
NONPASSING_FILTER = ("filter", 'Status != "passing"')
CONSUL_ERRORS = (ConsulError, ShapeError)
VERIFY_MIN_INTERVAL = 2.0      # seconds between verification sweeps at least...
VERIFY_COST_FACTOR = 10.0      # ...and at least this many times what the last sweep took
SYNC_READS = 3                 # dumps a full sync reads at most to match its summaries' index


_serials = itertools.count(1)


@dataclass(frozen=True)
class Snapshot:
    """Every routable service's instances at one Consul index, plus what was skipped.
    `seen_at`: when the answer that led to it arrived (time.monotonic), for the edge's metrics.
    `changed`: the services whose instances differ from the snapshot numbered `after` (the one
    its source built before it), so the control loop need not compare every service; None when
    the source does not know (a full sync, a reset): then it compares them all."""

    services: Mapping[str, tuple[Instance, ...]] = field(default_factory=lambda: MappingProxyType({}))
    problems: tuple[Problem, ...] = ()
    index: int = 0
    seen_at: float = 0.0
    full: bool = False         # from a full sync (cold start, after an outage)
    changed: frozenset[str] | None = field(default=None, compare=False)
    after: int = field(default=0, compare=False)
    serial: int = field(default_factory=lambda: next(_serials), compare=False)


class Changes:
    """What a source changed in its services since its last snapshot: every write to them is
    `touch`ed (or `lost`, when they are rebuilt), and `snapshot` builds the next one with it."""

    def __init__(self):
        self.names: set[str] | None = None       # None: not known (nothing built yet, a reset)
        self.last = 0                            # the serial of the last snapshot built

    def touch(self, name: str) -> None:
        if self.names is not None:
            self.names.add(name)

    def lost(self) -> None:
        self.names = None

    def snapshot(self, services: Mapping[str, tuple[Instance, ...]], problems: tuple[Problem, ...], index: int,
                 seen_at: float, full: bool = False) -> Snapshot:
        changed = None if full or self.names is None else frozenset(self.names)
        snapshot = Snapshot(MappingProxyType(dict(services)), problems, index, seen_at, full, changed, self.last)
        self.names, self.last = set(), snapshot.serial
        return snapshot


class Backoff:
    """Capped exponential delays; `reset()` after a success."""

    def __init__(self, first: float = 0.25, cap: float = 2.0):
        self.first, self.cap, self.current = first, cap, 0.0

    def next(self) -> float:
        self.current = min(self.cap, self.current * 2 if self.current else self.first)
        return self.current

    def reset(self) -> None:
        self.current = 0.0


@dataclass
class Stats:
    """Counters for logs and benchmarks: how much we asked Consul (printed as `key=value`)."""

    long_polls: int = 0
    fetches: int = 0
    dumps: int = 0
    full_refreshes: int = 0
    errors: int = 0
    stale_retries: int = 0

    def __str__(self) -> str:
        return (f"long_polls={self.long_polls} fetches={self.fetches} dumps={self.dumps} "
                f"full_refreshes={self.full_refreshes} errors={self.errors} stale_retries={self.stale_retries}")


def endpoint(path: str) -> str:
    """A path as a metric label: per-service paths collapse to one label."""
    for prefix in ("/v1/health/service/", "/v1/catalog/node-services/"):
        if path.startswith(prefix):
            return prefix + "<name>"
    return path


class Reader:
    """Reads in the consistency mode, never handing on an answer that is behind what was seen
    (`edge.consul.freshness`): such an answer is read again from the leader (consistent), and
    reads that are not long-polls go to the leader until the server has shown it is caught up.

    `at_least`: an index the answer must reach beside its own endpoint's (a dump read after the
    summaries it completes)."""

    def __init__(self, http: ConsulHTTP, consistency: str, max_stale: float, stats: Stats, metrics,
                 address: object = ""):
        self.http, self.consistency, self.max_stale_ms = http, consistency, max_stale * 1000
        self.stats, self.metrics, self.address = stats, metrics, address
        self.clocks = Clocks()
        self.trusted = False          # earned: at start and after every outage, the leader answers

    def read(self, path: str, params=(), index: int = 0, wait: float | None = None, raw: bool = False,
             at_least: int = 0) -> Answer:
        mode = self.consistency
        if mode == "stale" and not index and not self.trusted:
            mode = "default"          # the leader's state, without a leadership check per read
        answer = self._get(path, params, index, wait, mode, raw)
        floor = self.clocks.floor(path)
        reason = None if mode == "consistent" else behind(
            answer.index, max(floor, at_least), answer.known_leader, answer.last_contact_ms, self.max_stale_ms)
        if reason is not None:
            # Consul's documented pattern for stale reads: ask the leader now.
            self.stats.stale_retries += 1
            self.metrics.stale_retry()
            if self.trusted:
                log.info("consul at %s answered %s from behind (%s): reading from the leader until it has "
                         "caught up", self.address, path, reason)
                self.trusted = False
            else:
                log.debug("%s answered from behind (%s): read again from the leader", path, reason)
            answer = self._get(path, params, 0, None, "consistent", raw)
        elif index and mode == "stale" and not self.trusted and proves_caught_up(
                answer.index, self.clocks.highest(), answer.last_contact_ms):
            log.info("consul at %s has caught up (index %d): stale reads again", self.address, answer.index)
            self.trusted = True
        if answer.index < floor:
            log.warning("consul's leader answers %s at index %d, below %d already seen: Consul's state went back "
                        "(a cluster rebuilt, a snapshot restored); starting over from it", path, answer.index, floor)
            self.clocks.clear()
        self.clocks.advance(path, answer.index)
        return answer

    def side_read(self, path: str) -> Answer:
        """A consistent read beside the watch (the ACL guard's confirmations): its index is neither
        checked nor remembered, so the leader being ahead of the server the watch reads is no news."""
        return self._get(path, (), 0, None, "consistent", False)

    def _get(self, path: str, params, index: int, wait: float | None, mode: str, raw: bool) -> Answer:
        query = list(params) + ([("index", str(index)), ("wait", f"{wait:g}s")] if index else [])
        if mode != "default":
            query.append((mode, ""))
        try:
            return self.http.get(path, query, wait=wait if index else None, raw=raw)
        except ConsulUnavailable:
            self.trusted = False      # the server may be restarting: it will replay its log
            raise


@dataclass
class Update:
    """The newest answer of one long-poll (latest wins), or its failure."""

    value: object = None
    index: int = 0
    reset: bool = False            # the index went back at the leader too: Consul's state was rebuilt
    error: Exception | None = None
    seen_at: float = 0.0


def reset_by(updates: Mapping[str, Update], stats: Stats, metrics) -> bool:
    """The pollers' newest answers, checked before anything is folded in: the first failure is
    raised (the caller's loop backs off and syncs in full after it); True when an index went
    back at the leader too (Consul's state was rebuilt): a full sync, logged and counted."""
    for name, u in updates.items():
        if u.error is not None:
            raise u.error
        if u.reset:
            log.info("consul index of %s went back to %d at the leader too: full refresh", name, u.index)
            stats.full_refreshes += 1
            metrics.full_refresh("index reset")
            return True
    return False


class Poller:
    """One long-poll loop in its own thread; hands its newest answer to the watcher's inbox. It
    starts from `start`, the index of what the watcher already holds from this endpoint (never 0
    after a full sync: a server still replaying its log then waits until it has passed it)."""

    def __init__(self, name: str, path: str, params: tuple, parse: Callable[[object], object], raw: bool,
                 reader: Reader, wait: float, post: Callable[[str, Update], None], stop: threading.Event,
                 stats: Stats, start: int = 0):
        self.name, self.path, self.params, self.parse, self.raw = name, path, params, parse, raw
        self.reader, self.wait, self.post, self.stop, self.stats = reader, wait, post, stop, stats
        self.done = threading.Event()          # the watcher retired this poller (mode switch)
        self.index = start
        self.thread = threading.Thread(target=self.run, name=f"consul-{name}", daemon=True)

    def run(self) -> None:
        backoff = Backoff()
        while not self.stop.is_set() and not self.done.is_set():
            try:
                self.stats.long_polls += 1
                answer = self.reader.read(self.path, self.params, self.index, self.wait, raw=self.raw)
                value, index = self.parse(answer.body), answer.index
                # Not held through the next long-poll: a node's or the summary's body is MBs at 10,000 services.
                del answer
                backoff.reset()
            except CONSUL_ERRORS as exc:
                if self.done.is_set():
                    return
                self.post(self.name, Update(error=exc, index=self.index))
                if isinstance(exc, (ShapeError, ConsulRefused)) and not isinstance(exc, ConsulDenied):
                    return          # this endpoint will not work: the watcher decides what next
                self.stop.wait(backoff.next())
                continue
            new = max(index, 1)
            if new == self.index:
                continue
            reset = new < self.index
            self.index = new
            self.post(self.name, Update(value, new, reset, seen_at=time.monotonic()))


class ConsulWatcher:
    def __init__(self, consul: ConsulSettings, datacenter: str | None,
                 publish: Callable[[Snapshot], None], stop: threading.Event,
                 wait: float = 30.0, workers: int = 8, api: str = "auto", consistency: str = "stale",
                 max_stale: float = 10.0, metrics=None):
        self.address = consul.address
        self.has_token = bool(consul.token or consul.token_file)
        self.metrics = metrics or NoMetrics()
        self.stats = Stats()
        self.http = ConsulHTTP(consul, datacenter, timeout=10.0,
                               on_request=lambda path, outcome: self.metrics.consul_request(endpoint(path), outcome))
        self.reader = Reader(self.http, consistency, max_stale, self.stats, self.metrics, consul.address)
        self.publish_to = publish
        self.stop = stop
        self.wait = wait
        self.api = api                       # what was asked for: auto, internal or public
        self.mode = "public" if api == "public" else "internal"
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="consul-fetch")
        self._summaries: dict[str, ServiceSummary] = {}
        self._checks: dict[tuple[str, str], CheckState] = {}
        self._nodes: dict[str, str] = {}
        self._folded: dict[str, int] = {}    # long-poll name -> index of the answer folded in
        self._accounted = 0                  # internal mode: every services write up to here is explained
        self._ahead: set[str] = set()        # fetched ahead of the answers folded in: fetched again
        self._services: dict[str, tuple[Instance, ...]] = {}
        self._changes = Changes()
        self._problems: dict[str, tuple[Problem, ...]] = {}
        self._retry: set[str] = set()
        self._skipped: set[str] = set()
        self._routable: set[str] | None = None   # routable names of `_routable_of` (a cache)
        self._routable_of: set[str] = set()
        self._flat_problems: tuple[Problem, ...] | None = None
        # inbox from the pollers
        self._lock = threading.Lock()
        self._inbox: dict[str, Update] = {}
        self._wake = threading.Event()
        self._pollers: list[Poller] = []
        # the ACL guard
        self._published: Snapshot | None = None
        self._held_cause: str | None = None
        self._start_problem: str | None = None
        self._verify_due: float | None = None   # a sweep is due then...
        self._verify_reason = "verify"          # ...because of this (the full refresh metric's label)
        self._verifying: object | None = None   # the sweep whose read is under way
        self._last_sweep_s = 0.0
        self._last_verify = 0.0
        self._spawn: Callable[[Callable[[], None]], None] = \
            lambda read: threading.Thread(target=read, name="consul-verify", daemon=True).start()

    # --- Consul reads ------------------------------------------------------------------------
    def _summaries_now(self, at_least: int = 0) -> tuple[int, dict[str, ServiceSummary]]:
        """The services list in the current mode, read now (no blocking)."""
        if self.mode == "internal":
            answer = self.reader.read(UI_SERVICES, raw=True, at_least=at_least)
            return answer.index, summaries_from_ui_raw(answer.body)
        answer = self.reader.read(CATALOG_SERVICES)
        return answer.index, services_from_catalog(answer.body)

    def _dump(self, at_least: int, keep: bool = True) -> tuple[int, dict[str, list[dict]]]:
        """Every local node with its services and checks, grouped as health entries, and the
        catalog index it was read at (internal mode: at least `at_least`, the summaries' index;
        public mode: 0, its reads each have their own table's index). `keep`: the nodes and checks
        read become the watcher's (a full sync); a verification, read beside the loop, keeps none."""
        self.stats.dumps += 1
        if self.mode == "internal":
            answer = self.reader.read(UI_NODES, at_least=at_least)
            if keep:
                self._nodes = node_addresses(answer.body)
            return answer.index, instances_from_node_dump(answer.body)
        nodes = self.reader.read(CATALOG_NODES)
        checks = self.reader.read(NONPASSING, (NONPASSING_FILTER,))
        addresses, nonpassing = node_addresses(nodes.body), nonpassing_checks(checks.body)
        if keep:
            self._nodes, self._checks = addresses, nonpassing
            self._folded.update(nodes=nodes.index, checks=checks.index)
        answers = dict(zip(addresses, self._pool.map(
            lambda n: self.reader.read(f"/v1/catalog/node-services/{quote(n, safe='')}").body, addresses),
            strict=True))
        return 0, entries_from_node_services(answers, nonpassing)

    def _fetch(self, name: str) -> tuple[tuple[Instance, ...], tuple[Problem, ...], int]:
        self.stats.fetches += 1
        answer = self.reader.read(f"/v1/health/service/{quote(name, safe='')}")
        return (*instances_from_health(name, answer.body), answer.index)

    def _services_table_index(self) -> int:
        """Internal mode: the index of the last services write (the summary's index also moves for
        check and node writes); a non-blocking catalog read tells."""
        return self.reader.read(CATALOG_SERVICES).index

    # --- one full sync -------------------------------------------------------------------------
    def sync_once(self) -> Snapshot:
        """Full fetch of everything now (cold start, `--once`, `routes`); raises on any error.
        In auto mode an internal API that refuses or answers in another shape falls back here."""
        try:
            return self._sync(strict=True)
        except (ShapeError, ConsulRefused) as exc:
            if not self._fallback(exc):
                raise
            return self._sync(strict=True)

    def _sync(self, strict: bool, reason: str = "") -> Snapshot:
        """Every service from one dump. In internal mode the summaries kept must describe the very
        instances kept (one catalog index): the next answer's summaries are compared with them,
        and a service that changed between the two reads and back later would look unchanged.
        So they are read again until both agree, a bounded number of times (under constant writes
        the last pair is kept)."""
        t0 = time.monotonic()
        self._verifying = None              # a sweep under way: this reads more than it would
        index, summaries = self._summaries_now()
        dump = None
        try:
            for _ in range(SYNC_READS):
                dumped_at, dump = self._dump(at_least=index)
                if self.mode == "public" or dumped_at == index:
                    break
                index, summaries = self._summaries_now(at_least=dumped_at)
                if index == dumped_at:
                    break
        except CONSUL_ERRORS:
            if strict:
                raise
        self._folded["services"] = self._accounted = index
        self._apply(summaries, set(summaries), strict=strict, dump=dump)
        self._last_sweep_s = time.monotonic() - t0
        if reason:
            self.stats.full_refreshes += 1
            self.metrics.full_refresh(reason)
        return self.snapshot(index, t0, full=True)

    def _fallback(self, exc: Exception) -> bool:
        """auto: leave the internal API for the public one (logged once). False: no fallback."""
        if self.api != "auto" or self.mode != "internal":
            return False
        if isinstance(exc, ConsulRefused) and (exc.status not in (403, 404) or "acl not found" in str(exc).lower()):
            return False     # an unknown token fails everywhere: not the internal API's fault
        log.warning("the internal API (%s) cannot be used here (%s): watching through the public API only",
                    UI_SERVICES, exc)
        self.mode = "public"
        self._summaries = {}
        return True

    def _apply(self, summaries: dict[str, ServiceSummary], changed: set[str], strict: bool,
               dump: dict[str, list[dict]] | None = None) -> set[int]:
        """Fetch `changed` routable services and fold them in; what failed is retried next round.
        `dump`: every service's entries, read at once, instead of one request per service. Returns
        the per-service indexes the fetches answered with.

        A fetch answering at an index above every answer folded in saw a write those answers do
        not show yet: a summary kept from before it could later equal the summary after a change
        back, hiding it. Such a service is fetched again with the next answer."""
        routable = self._routable_names(summaries)
        todo = sorted((changed | self._retry) & routable)
        if dump is not None:
            # A service registered after the summaries were read is fetched on its own next round.
            results = {name: instances_from_health(name, dump[name]) for name in todo if name in dump}
            self._retry = {name for name in todo if name not in dump}
            self._store(results, routable, summaries)
            return set()
        # One service (the usual change) is fetched right here: a hand-off to the pool costs more.
        fetched = map(self._fetch_safely, todo) if len(todo) == 1 else self._pool.map(self._fetch_safely, todo)
        results = dict(zip(todo, fetched, strict=True))
        failed = {name for name, result in results.items() if isinstance(result, Exception)}
        if failed and strict:
            raise next(r for r in results.values() if isinstance(r, Exception))
        for name in failed:
            log.warning("could not fetch service %r, keeping its last known instances: %s", name, results[name])
        fetched_ok = {n: r for n, r in results.items() if n not in failed}
        self._store({n: r[:2] for n, r in fetched_ok.items()}, routable, summaries)
        self._retry = failed
        known = max(self._folded.values(), default=0)
        self._ahead = {n for n, r in fetched_ok.items() if r[2] > known}
        if self._ahead:
            log.debug("fetched %s at an index above %d, the newest answer folded in: fetched again with the next",
                      sorted(self._ahead), known)
        return {r[2] for r in fetched_ok.values()}

    def _routable_names(self, summaries: dict[str, ServiceSummary]) -> set[str]:
        """The names that can be routes, worked out again only when the set of names changed: at
        10,000 services that check would be a good part of a change's cost otherwise."""
        if self._routable is not None and summaries.keys() == self._routable_of:
            return self._routable
        known = self._routable or set()
        names = set(summaries)
        routable = {n for n in names if n in known or (n not in self._skipped and routable_service(n))}
        for name in sorted(names - routable - self._skipped):
            if name.lower() in EXCLUDED_SERVICES:
                log.debug("service %r is reserved: never routed", name)
            else:
                log.warning("skipping service %r: its name cannot be a route (allowed: a-z 0-9 - _, "
                            "at most 63 characters)", name)
        self._skipped = names - routable
        self._routable, self._routable_of = routable, names
        return routable

    def _store(self, results: dict, routable: set[str], summaries: dict[str, ServiceSummary]) -> None:
        for name, (instances, problems) in results.items():
            # Keep the very same tuple when nothing changed: the control loop compares by identity first.
            if self._services.get(name) != instances:
                self._services[name] = instances
                self._changes.touch(name)
            if self._problems.get(name, ()) != problems:
                self._problems[name] = problems
                self._flat_problems = None
        if len(self._services) > len(routable) or summaries.keys() != self._summaries.keys():
            for name in set(self._services) - routable:
                del self._services[name]
                self._changes.touch(name)
                if self._problems.pop(name, None):
                    self._flat_problems = None
        self._summaries = summaries

    def _fetch_safely(self, name: str):
        try:
            return self._fetch(name)
        except CONSUL_ERRORS as exc:
            return exc

    def snapshot(self, index: int, seen_at: float = 0.0, full: bool = False) -> Snapshot:
        if self._flat_problems is None:
            self._flat_problems = tuple(sorted(p for ps in self._problems.values() for p in ps))
        return self._changes.snapshot(self._services, self._flat_problems, index, seen_at or time.monotonic(), full)

    # --- the ACL guard -------------------------------------------------------------------------
    def publish(self, snapshot: Snapshot) -> bool:
        """Hand a snapshot on unless it would remove most routes (or, first of all, show none)
        without the public API agreeing; then keep serving and say why."""
        before = self._published
        old = {n for n, insts in (before.services.items() if before else ()) if insts}
        new = {n for n, insts in snapshot.services.items() if insts}
        suspicious = not new if before is None else needs_confirmation(len(old), len(new))
        if suspicious:
            verdict = judge(old - new, self._public_view(old - new))
            if not verdict.confirmed:
                if verdict.cause != self._held_cause and not (before is None and self._start_problem):
                    if before is None:
                        log.error("Consul shows no routable service and its answers look filtered by ACLs; "
                                  "HAProxy keeps the routes it serves: %s", verdict.cause)
                    else:
                        log.error("Consul's answer would remove %d of %d services with instances; not applied, "
                                  "the edge keeps serving them: %s", len(old - new), len(old), verdict.cause)
                self._held_cause = verdict.cause
                return False
            if before is not None:
                log.warning("Consul's answer removes %d of %d services with instances; confirmed through the "
                            "public API, applying it", len(old - new), len(old))
        if self._held_cause is not None:
            log.info("Consul's answers look complete again; applying them")
            self._held_cause = None
        self._published = snapshot
        self.publish_to(snapshot)
        return True

    def _public_view(self, removed: set[str]) -> PublicView:
        """An independent, consistent read through the documented API."""
        try:
            nodes = self.reader.side_read(CATALOG_NODES)
            services = self.reader.side_read(CATALOG_SERVICES)
            names = frozenset(services.body) if isinstance(services.body, dict) else frozenset()
            filtered = nodes.filtered_by_acls or services.filtered_by_acls
            invisible = []
            for name in sorted(removed & names)[:3]:
                health = self.reader.side_read(f"/v1/health/service/{quote(name, safe='')}")
                filtered = filtered or health.filtered_by_acls
                if not health.body:
                    invisible.append(name)
            return PublicView(self.has_token, len(nodes.body or ()), names, filtered, tuple(invisible))
        except CONSUL_ERRORS as exc:
            log.debug("public confirmation read failed: %s", exc)
            return PublicView(self.has_token, 0, frozenset(), True)

    def check_acl(self) -> str | None:
        """At start: one line when ACLs are on and the token cannot read (None when all is well)."""
        try:
            self.http.get("/v1/acl/token/self")
            acl = "on"
        except ConsulDenied as exc:
            # Without a token Consul 1.8 answers "ACL not found" too (the anonymous token may not
            # read itself): only a configured token can be unknown.
            acl = "unknown-token" if self.has_token and "not found" in str(exc).lower() else "on"
        except ConsulRefused:
            acl = "off"              # 401 "ACL support disabled"
        except ConsulError as exc:
            log.debug("ACL probe failed: %s", exc)
            return None
        if acl != "on":
            return start_problem(acl, self.has_token, 1, 1)
        try:
            nodes = self.reader.side_read(CATALOG_NODES).body or ()
            services = self.reader.side_read(CATALOG_SERVICES).body or {}
        except CONSUL_ERRORS as exc:
            return f"Consul ACLs are on and the edge cannot read the catalog: {exc}"
        return start_problem(acl, self.has_token, len(nodes), len(services))

    # --- the loop ----------------------------------------------------------------------------
    def _post(self, name: str, update: Update) -> None:
        with self._lock:
            self._inbox[name] = update
        self._wake.set()

    def wake(self) -> None:
        """Come round now: after `stop` was set, `run` returns instead of waiting for a long-poll
        (the fleet stops and replaces its readers)."""
        self._wake.set()

    def poller_specs(self) -> list[tuple[str, str, tuple, Callable[[object], object], bool]]:
        """(name, path, params, parse, raw) of each long-poll in the current mode: one in internal
        mode, three in public mode, whatever the number of services."""
        if self.mode == "internal":
            return [("services", UI_SERVICES, (), summaries_from_ui_raw, True)]
        return [("services", CATALOG_SERVICES, (), services_from_catalog, False),
                ("checks", NONPASSING, (NONPASSING_FILTER,), nonpassing_checks, False),
                ("nodes", CATALOG_NODES, (), node_addresses, False)]

    def _start_pollers(self) -> None:
        for p in self._pollers:
            p.done.set()
        self._pollers = [Poller(name, path, params, parse, raw, self.reader, self.wait, self._post, self.stop,
                                self.stats, self._folded.get(name, 0))
                         for name, path, params, parse, raw in self.poller_specs()]
        with self._lock:
            self._inbox.clear()
        for p in self._pollers:
            p.thread.start()

    def run(self) -> None:
        """Thread body: cold start, then follow the long-polls until `stop` is set."""
        backoff = Backoff()
        failing, synced = False, False
        problem = self.check_acl()
        if problem:
            log.error("%s", problem)
            self._start_problem = problem    # said once: the cold hold below need not repeat it
        while not self.stop.is_set():
            try:
                if not synced:
                    # Cold start, or back from an outage: a restarted agent may even be at the
                    # very index we saw last, so trust nothing and fetch every service.
                    snapshot = self.sync_once()
                    log.info("consul%s: %d routable services at index %d via the %s API (%s)",
                             " answers again" if failing else "", len(snapshot.services), snapshot.index,
                             self.mode, self.stats)
                    self.publish(snapshot)
                    self._start_pollers()
                    synced, failing = True, False
                    backoff.reset()
                    continue
                self._wake.wait(self._timeout())
                self._wake.clear()
                if self.stop.is_set():
                    break
                with self._lock:
                    updates, self._inbox = self._inbox, {}
                synced = self._round(updates)
                if synced and failing:
                    failing = False
                if not self._retry:
                    backoff.reset()
            except CONSUL_ERRORS as exc:
                if isinstance(exc, (ShapeError, ConsulRefused)) and self._fallback(exc):
                    synced = False
                    continue
                self.stats.errors += 1
                delay = backoff.next()
                if not failing:
                    log.error("consul at %s failed: %s; serving the last known state, retrying", self.address,
                              self._explain(exc))
                else:
                    log.debug("consul still failing (%s); next try in %.2fs", exc, delay)
                failing, synced = True, False
                for p in self._pollers:
                    p.done.set()
                self.stop.wait(delay)
        for p in self._pollers:
            p.done.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _explain(self, exc: Exception) -> str:
        if isinstance(exc, ConsulDenied):
            if "not found" in str(exc).lower():
                return f"{exc} (Consul does not know the token: revoked or mistyped)"
            return f"{exc} (an ACL denies the edge's token this read)"
        return str(exc)

    def _timeout(self) -> float | None:
        if self._retry:
            return 0.5
        if self._verify_due is not None and self._verifying is None:
            return max(0.0, self._verify_due - time.monotonic())
        if self._held_cause is not None:
            return 10.0          # look again at a held answer now and then
        return None

    def _round(self, updates: dict[str, Update]) -> bool:
        """Fold the pollers' newest answers (and a sweep's read) in; False when a full sync is
        needed (outage, reset)."""
        verification = updates.pop("verify", None)
        if reset_by(updates, self.stats, self.metrics):
            return False
        found = self._verified(verification) if verification is not None else set()
        now = time.monotonic()
        if not updates and self._held_cause is not None:
            return self._sweep("acl recheck", now)     # a fixed token changes no index: look again
        seen_at = min((u.seen_at for u in updates.values()), default=now)
        changed: set[str] = set()
        if updates:
            changed, self._ahead = self._ahead, set()
        removed: set[str] = set()
        summaries = self._summaries
        services_moved = False
        window = (0, 0)
        if "services" in updates:
            u = updates["services"]
            summaries = u.value
            named, removed = changed_summaries(self._summaries, summaries)
            changed |= named
            window = (self._folded.get("services", 0), u.index)
            services_moved = self.mode == "public" and window[0] != window[1]
        for name, u in updates.items():
            self._folded[name] = u.index
        if "checks" in updates:
            services, nodes = changed_checks(self._checks, updates["checks"].value)
            self._checks = updates["checks"].value
            changed |= services | self._on_nodes(nodes)
        if "nodes" in updates:
            new_nodes = updates["nodes"].value
            changed |= self._on_nodes(changed_nodes(self._nodes, new_nodes))
            self._nodes = new_nodes
        services_index = window[1]
        if self.mode == "internal" and "services" in updates and not changed and not removed:
            # The ui index moves for check and node writes too: is there a services write that no
            # answer explained? (A health flip that went back, a check's output, a node's meta: no.)
            services_index = self._services_table_index()
            services_moved = services_index > self._accounted
            if not services_moved:
                self._accounted = window[1]
                new_nodes = node_addresses(self.reader.read(CATALOG_NODES).body)
                changed |= self._on_nodes(changed_nodes(self._nodes, new_nodes))
                self._nodes = new_nodes
        changed = {n for n in changed if n in summaries}
        if services_moved and not changed and not removed:
            # Now, or as soon as a read under way is back (it may have read before this write); the
            # write counts as explained from here, by the sweep due (else each check write's answer
            # until then would find it again).
            log.info("services changed at index %d with nothing to attribute it to (an instance re-registered "
                     "in place, or service meta): sweeping every service", services_index)
            self._verify_due, self._verify_reason = now, "unattributed"
            self._accounted = max(self._accounted, services_index)
        changed |= found & summaries.keys()
        if changed or removed or self._retry:
            indexes = self._apply(summaries, changed, strict=False)
            self.publish(self.snapshot(window[1] or max(self._folded.values(), default=0), seen_at))
            log.debug("%d changed, %d removed, published %.1f ms after the answer arrived (%s)", len(changed),
                      len(removed), (time.monotonic() - seen_at) * 1000, self.stats)
            if (changed or removed) and window[0]:
                self._check_window(window, indexes)
        else:
            self._summaries = summaries
        if self._verify_due_now():
            self._start_verify()            # after the publish: what this answer attributed is out already
        return True

    def _check_window(self, window: tuple[int, int], indexes: set[int]) -> None:
        """An attributed answer may hide an in-place change of another service when it spans
        several writes. Internal mode: one write is the attributed one, and every services write
        up to the answer is explained; over several, the services table's index tells whether a
        services write other than the fetched services' own is left (check and node writes move
        the summary's index too). Public mode: the services long-poll's own window tells. Such an
        answer gets a verification sweep."""
        if self.mode == "internal":
            if window[1] - window[0] > 1:
                try:
                    services_index = self._services_table_index()
                except CONSUL_ERRORS:
                    return
                if services_index > self._accounted + 1 or (services_index > self._accounted
                                                            and services_index not in indexes):
                    self._schedule_verify()
                    return
            self._accounted = window[1]
        elif window[1] - window[0] > 1:
            self._schedule_verify()

    def _on_nodes(self, nodes: set[str]) -> set[str]:
        """Services with an instance on one of `nodes`."""
        if not nodes:
            return set()
        return {name for name, insts in self._services.items() if any(i.node in nodes for i in insts)}

    def _schedule_verify(self, reason: str = "verify") -> None:
        """Another services write may hide in this answer: sweep soon, at a bounded rate."""
        if self._verify_due is None:
            interval = max(VERIFY_MIN_INTERVAL, VERIFY_COST_FACTOR * self._last_sweep_s)
            self._verify_due, self._verify_reason = max(time.monotonic(), self._last_verify + interval), reason

    def _verify_due_now(self) -> bool:
        return self._verify_due is not None and self._verifying is None and time.monotonic() >= self._verify_due

    def _start_verify(self) -> None:
        """Sweep: read every service beside the loop (`_spawn`); the result comes back through the inbox."""
        token, reason = object(), self._verify_reason
        self._verifying, self._verify_due, self._last_verify = token, None, time.monotonic()
        at_least = self._folded.get("services", 0) if self.mode == "internal" else 0

        def read() -> None:
            try:
                index, dump = self._dump(at_least, keep=False)
                found = {name: instances_from_health(name, entries) for name, entries in dump.items()}
                update = Update((token, reason, found), index, seen_at=time.monotonic())
            except CONSUL_ERRORS as exc:
                update = Update((token, reason, None), error=exc, seen_at=time.monotonic())
            except RuntimeError:
                if not self.stop.is_set():
                    raise
                return                      # the watcher stopped and shut its fetch pool down
            self._post("verify", update)
        self._spawn(read)

    def _verified(self, u: Update) -> set[str]:
        """A sweep's read is back: the routable services whose instances differ from it, to be
        fetched again now. A fetch is newer than both the read and whatever was folded in
        meanwhile, so nothing goes back to an older state; every services write up to the read's
        index is then accounted for."""
        token, reason, found = u.value
        if token is not self._verifying:
            return set()                    # a full sync came in between
        self._verifying = None
        self._last_sweep_s = u.seen_at - self._last_verify
        if u.error is not None:
            log.info("a sweep's read of every service failed (%s); trying again", u.error)
            self._schedule_verify(reason)
            return set()
        self.stats.full_refreshes += 1
        self.metrics.full_refresh(reason)
        differ = {name for name in self._routable_names(self._summaries)
                  if found.get(name, ((), ())) != (self._services.get(name, ()), self._problems.get(name, ()))}
        self._accounted = max(self._accounted, u.index)
        if differ:
            log.info("a sweep (%s) read every service in %.1f s and found %d that changed unseen (%s): fetching "
                     "them again", reason, self._last_sweep_s, len(differ), ", ".join(sorted(differ)[:5]))
        else:
            log.debug("a sweep (%s) read every service in %.1f s and found nothing unseen", reason,
                      self._last_sweep_s)
        return differ

    def _sweep(self, reason: str, seen_at: float) -> bool:
        """A full sync in the loop (the ACL recheck: what a filtered answer hid comes back)."""
        self._verify_due = None
        self._last_verify = time.monotonic()
        snapshot = self._sync(strict=False, reason=reason)
        self.publish(Snapshot(snapshot.services, snapshot.problems, snapshot.index, seen_at))
        return True
