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
is found by a sweep: a full sync that compares per-instance data, logged and counted as a full
refresh. In internal mode the ui index also moves for check and node writes; a cheap read of
`/v1/catalog/services` (whose index is the services table's) tells them apart, so those never
cost a full refresh. Two services writes in one answer can hide an in-place change behind an
attributed one: such windows get a verification sweep, rate-limited so bursts coalesce.

Reads are `?stale` by default (any server answers; `--consistency`), and an answer whose
`X-Consul-LastContact` exceeds `--max-stale` is read again consistently. Index rules as
consul-template's `watch/view.go`: the same index means nothing new, a lower one (a restarted
agent) means a full sync; errors back off exponentially (capped at 2 s) and a full sync follows
an outage. A snapshot that would remove every route, or more than half, is published only once
an independent read through the public API confirms it (`edge.consul.safety`); nothing here publishes
an empty catalog because of an error or an ACL filter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import quote

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
from haproxy_consul.consul_api import Answer, ConsulDenied, ConsulError, ConsulHTTP, ConsulRefused, ConsulSettings

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


@dataclass(frozen=True)
class Snapshot:
    """Every routable service's instances at one Consul index, plus what was skipped.
    `seen_at`: when the answer that led to it arrived (time.monotonic), for the edge's metrics."""

    services: Mapping[str, tuple[Instance, ...]] = field(default_factory=lambda: MappingProxyType({}))
    problems: tuple[Problem, ...] = ()
    index: int = 0
    seen_at: float = 0.0


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
    """Reads with the consistency mode; an answer older than `max_stale` is read again consistently."""

    def __init__(self, http: ConsulHTTP, consistency: str, max_stale: float, stats: Stats, metrics):
        self.http, self.consistency, self.max_stale_ms = http, consistency, max_stale * 1000
        self.stats, self.metrics = stats, metrics

    def read(self, path: str, params=(), index: int = 0, wait: float | None = None,
             consistency: str | None = None, raw: bool = False) -> Answer:
        mode = consistency or self.consistency
        query = list(params) + ([("index", str(index)), ("wait", f"{wait:g}s")] if index else [])
        if mode != "default":
            query.append((mode, ""))
        answer = self.http.get(path, query, wait=wait if index else None, raw=raw)
        if mode == "stale" and (answer.last_contact_ms > self.max_stale_ms or not answer.known_leader):
            # Consul's documented pattern: too stale (or no leader known), ask the leader now.
            self.stats.stale_retries += 1
            self.metrics.stale_retry()
            log.debug("%s: answer %d ms stale (max %d): read again consistently", path, answer.last_contact_ms,
                      self.max_stale_ms)
            answer = self.http.get(path, [*params, ("consistent", "")], raw=raw)
        return answer


@dataclass
class Update:
    """The newest answer of one long-poll (latest wins), or its failure."""

    value: object = None
    index: int = 0
    reset: bool = False            # the index went back: a restarted agent
    error: Exception | None = None
    seen_at: float = 0.0


class Poller:
    """One long-poll loop in its own thread; hands its newest answer to the watcher's inbox."""

    def __init__(self, name: str, path: str, params: tuple, parse: Callable[[object], object], raw: bool,
                 reader: Reader, wait: float, post: Callable[[str, Update], None], stop: threading.Event,
                 stats: Stats):
        self.name, self.path, self.params, self.parse, self.raw = name, path, params, parse, raw
        self.reader, self.wait, self.post, self.stop, self.stats = reader, wait, post, stop, stats
        self.done = threading.Event()          # the watcher retired this poller (mode switch)
        self.index = 0
        self.thread = threading.Thread(target=self.run, name=f"consul-{name}", daemon=True)

    def run(self) -> None:
        backoff = Backoff()
        while not self.stop.is_set() and not self.done.is_set():
            try:
                self.stats.long_polls += 1
                answer = self.reader.read(self.path, self.params, self.index, self.wait, raw=self.raw)
                value = self.parse(answer.body)
                backoff.reset()
            except CONSUL_ERRORS as exc:
                if self.done.is_set():
                    return
                self.post(self.name, Update(error=exc, index=self.index))
                if isinstance(exc, (ShapeError, ConsulRefused)) and not isinstance(exc, ConsulDenied):
                    return          # this endpoint will not work: the watcher decides what next
                self.stop.wait(backoff.next())
                continue
            new = max(answer.index, 1)
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
        self.reader = Reader(self.http, consistency, max_stale, self.stats, self.metrics)
        self.publish_to = publish
        self.stop = stop
        self.wait = wait
        self.api = api                       # what was asked for: auto, internal or public
        self.mode = "public" if api == "public" else "internal"
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="consul-fetch")
        self._summaries: dict[str, ServiceSummary] = {}
        self._checks: dict[tuple[str, str], CheckState] = {}
        self._nodes: dict[str, str] = {}
        self._services_index = 0             # the services table's index when last known
        self._ui_index = 0                   # internal mode: the summary's index (all tables)
        self._services: dict[str, tuple[Instance, ...]] = {}
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
        self._verify_due: float | None = None
        self._last_sweep_s = 0.0
        self._last_verify = 0.0

    # --- Consul reads ------------------------------------------------------------------------
    def _summaries_now(self) -> tuple[int, dict[str, ServiceSummary]]:
        """The services list in the current mode, read now (no blocking)."""
        if self.mode == "internal":
            answer = self.reader.read(UI_SERVICES, raw=True)
            return answer.index, summaries_from_ui_raw(answer.body)
        answer = self.reader.read(CATALOG_SERVICES)
        self._services_index = answer.index
        return answer.index, services_from_catalog(answer.body)

    def _dump(self) -> dict[str, list[dict]]:
        """Every local node with its services and checks, grouped as health entries."""
        self.stats.dumps += 1
        if self.mode == "internal":
            return instances_from_node_dump(self.reader.read(UI_NODES).body)
        nodes = node_addresses(self.reader.read(CATALOG_NODES).body)
        checks = nonpassing_checks(self.reader.read(NONPASSING, (NONPASSING_FILTER,)).body)
        answers = dict(zip(nodes, self._pool.map(
            lambda n: self.reader.read(f"/v1/catalog/node-services/{quote(n, safe='')}").body, nodes), strict=True))
        self._nodes, self._checks = nodes, checks
        return entries_from_node_services(answers, checks)

    def _fetch(self, name: str) -> tuple[tuple[Instance, ...], tuple[Problem, ...], int]:
        self.stats.fetches += 1
        answer = self.reader.read(f"/v1/health/service/{quote(name, safe='')}")
        return (*instances_from_health(name, answer.body), answer.index)

    def _services_table_index(self) -> int:
        """The index of the last services write: the public long-poll knows it; in internal mode
        (whose index also moves for check and node writes) a non-blocking catalog read tells."""
        if self.mode == "public":
            return self._services_index
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
        t0 = time.monotonic()
        index, summaries = self._summaries_now()
        if self.mode == "internal":
            self._ui_index = index
            self._services_index = self._services_table_index()
            self._nodes = node_addresses(self.reader.read(CATALOG_NODES).body)
        self._apply(summaries, set(summaries), strict=strict, full=True)
        self._last_sweep_s = time.monotonic() - t0
        if reason:
            self.stats.full_refreshes += 1
            self.metrics.full_refresh(reason)
        return self.snapshot(index, t0)

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
               full: bool = False) -> set[str]:
        """Fetch `changed` routable services and fold them in; what failed is retried next round.
        `full`: every service, from one dump instead of one request per service. Returns the
        per-service indexes the fetches answered with."""
        routable = self._routable_names(summaries)
        todo = sorted((changed | self._retry) & routable)
        if full:
            try:
                dump = self._dump()
            except CONSUL_ERRORS:
                if strict:
                    raise
                dump = None
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
        self._store({n: r[:2] for n, r in results.items() if n not in failed}, routable, summaries)
        self._retry = failed
        return {r[2] for n, r in results.items() if n not in failed}

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
            if self._problems.get(name, ()) != problems:
                self._problems[name] = problems
                self._flat_problems = None
        if len(self._services) > len(routable) or summaries.keys() != self._summaries.keys():
            for name in set(self._services) - routable:
                del self._services[name]
                if self._problems.pop(name, None):
                    self._flat_problems = None
        self._summaries = summaries

    def _fetch_safely(self, name: str):
        try:
            return self._fetch(name)
        except CONSUL_ERRORS as exc:
            return exc

    def snapshot(self, index: int, seen_at: float = 0.0) -> Snapshot:
        if self._flat_problems is None:
            self._flat_problems = tuple(sorted(p for ps in self._problems.values() for p in ps))
        return Snapshot(MappingProxyType(dict(self._services)), self._flat_problems, index,
                        seen_at or time.monotonic())

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
            nodes = self.reader.read(CATALOG_NODES, consistency="consistent")
            services = self.reader.read(CATALOG_SERVICES, consistency="consistent")
            names = frozenset(services.body) if isinstance(services.body, dict) else frozenset()
            filtered = nodes.filtered_by_acls or services.filtered_by_acls
            invisible = []
            for name in sorted(removed & names)[:3]:
                health = self.reader.read(f"/v1/health/service/{quote(name, safe='')}", consistency="consistent")
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
            nodes = self.reader.read(CATALOG_NODES, consistency="consistent").body or ()
            services = self.reader.read(CATALOG_SERVICES, consistency="consistent").body or {}
        except CONSUL_ERRORS as exc:
            return f"Consul ACLs are on and the edge cannot read the catalog: {exc}"
        return start_problem(acl, self.has_token, len(nodes), len(services))

    # --- the loop ----------------------------------------------------------------------------
    def _post(self, name: str, update: Update) -> None:
        with self._lock:
            self._inbox[name] = update
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
                                self.stats) for name, path, params, parse, raw in self.poller_specs()]
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
        if self._verify_due is not None:
            return max(0.0, self._verify_due - time.monotonic())
        if self._held_cause is not None:
            return 10.0          # look again at a held answer now and then
        return None

    def _round(self, updates: dict[str, Update]) -> bool:
        """Fold the pollers' newest answers in; False when a full sync is needed (outage, reset)."""
        for name, u in updates.items():
            if u.error is not None:
                raise u.error
            if u.reset:
                log.info("consul index of %s went back to %d (agent restarted?): full refresh", name, u.index)
                self.stats.full_refreshes += 1
                self.metrics.full_refresh("index reset")
                return False
        now = time.monotonic()
        if not updates and self._held_cause is not None:
            return self._sweep("acl recheck", now)     # a fixed token changes no index: look again
        seen_at = min((u.seen_at for u in updates.values()), default=now)
        changed: set[str] = set()
        removed: set[str] = set()
        summaries = self._summaries
        services_moved = False
        window = (0, 0)
        if "services" in updates:
            u = updates["services"]
            summaries = u.value
            changed, removed = changed_summaries(self._summaries, summaries)
            if self.mode == "public":
                window = (self._services_index, u.index)
                self._services_index = u.index
                services_moved = window[0] != window[1]
            else:
                window = (self._ui_index, u.index)
                self._ui_index = u.index
        if "checks" in updates:
            services, nodes = changed_checks(self._checks, updates["checks"].value)
            self._checks = updates["checks"].value
            changed |= services | self._on_nodes(nodes)
        if "nodes" in updates:
            new_nodes = updates["nodes"].value
            changed |= self._on_nodes(changed_nodes(self._nodes, new_nodes))
            self._nodes = new_nodes
        if self.mode == "internal" and "services" in updates and not changed and not removed:
            # The ui index moves for check and node writes too: was it the services table?
            before = self._services_index
            self._services_index = self._services_table_index()
            services_moved = self._services_index != before
            if not services_moved:
                new_nodes = node_addresses(self.reader.read(CATALOG_NODES).body)
                changed |= self._on_nodes(changed_nodes(self._nodes, new_nodes))
                self._nodes = new_nodes
        changed = {n for n in changed if n in summaries}
        if services_moved and not changed and not removed:
            log.info("services changed at index %d with nothing to attribute it to (an instance re-registered "
                     "in place, or service meta): sweeping every service", self._services_index)
            return self._sweep("unattributed", seen_at)
        if not (changed or removed or self._retry or self._verify_due_now()):
            self._summaries = summaries
            return True
        indexes = self._apply(summaries, changed, strict=False)
        if self._verify_due_now():
            return self._sweep("verify", seen_at)
        self.publish(self.snapshot(window[1] or self._services_index, seen_at))
        log.debug("%d changed, %d removed, published %.1f ms after the answer arrived (%s)", len(changed),
                  len(removed), (time.monotonic() - seen_at) * 1000, self.stats)
        if (changed or removed) and window[1] - window[0] > 1 and window[0]:
            self._check_window(window, indexes)
        return True

    def _check_window(self, window: tuple[int, int], indexes: set[int]) -> None:
        """Several writes in one answer: an attributed one may hide an in-place change of another
        service. Internal mode asks the services table's index first (check and node writes move
        the ui index too); a window with more than its own services write gets a verification."""
        if self.mode == "internal":
            before = self._services_index
            try:
                self._services_index = self._services_table_index()
            except CONSUL_ERRORS:
                return
            window = (before, self._services_index)
            if window[1] - window[0] <= 1 and (window[1] == window[0] or window[1] in indexes):
                return
        self._schedule_verify()

    def _on_nodes(self, nodes: set[str]) -> set[str]:
        """Services with an instance on one of `nodes`."""
        if not nodes:
            return set()
        return {name for name, insts in self._services.items() if any(i.node in nodes for i in insts)}

    def _schedule_verify(self) -> None:
        """Another services write may hide in this answer: sweep soon, at a bounded rate."""
        if self._verify_due is None:
            interval = max(VERIFY_MIN_INTERVAL, VERIFY_COST_FACTOR * self._last_sweep_s)
            self._verify_due = max(time.monotonic(), self._last_verify + interval)

    def _verify_due_now(self) -> bool:
        return self._verify_due is not None and time.monotonic() >= self._verify_due

    def _sweep(self, reason: str, seen_at: float) -> bool:
        self._verify_due = None
        self._last_verify = time.monotonic()
        snapshot = self._sync(strict=False, reason=reason)
        self.publish(Snapshot(snapshot.services, snapshot.problems, snapshot.index, seen_at))
        return True
