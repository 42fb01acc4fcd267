"""The Consul shell: one long-poll for the whole catalog, one fetch per changed service.

`/v1/internal/ui/services` (what Consul's own UI lists) answers a blocking query with a summary
of every service: tags, nodes, instance and check counts. A service whose summary changed is
refetched with `/v1/health/service/<name>`; the others are not. So one long-poll serves any
number of services and a change costs one small request, not a refetch of the catalog. The one
change a summary cannot show (an instance re-registered in place with a new address or port,
no count or check changing) is detected by the index moving with nothing to attribute it to,
and answered by refetching everything, logged as such.

Index rules as consul-template's `watch/view.go`: the same index means nothing new, a lower one
(a restarted agent) resets to 0; errors back off exponentially (capped at 2 s: the agent is
normally local) and reset on success. After an outage everything is resynced, since a
restarted agent can come back at the very index we last saw.
A failed fetch keeps the last good data for that service and is retried; nothing here ever
publishes an empty catalog because of an error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import quote

from edge.model import (
    EXCLUDED_SERVICES,
    Instance,
    Problem,
    ServiceSummary,
    instances_from_health,
    instances_from_node_dump,
    routable_service,
    summaries_from_ui,
)
from haproxy_consul.consul_api import ConsulError, ConsulHTTP, ConsulSettings

log = logging.getLogger("edge.watch")

UI_SERVICES = "/v1/internal/ui/services"
UI_NODES = "/v1/internal/ui/nodes"
CONSUL_ERRORS = (ConsulError,)


@dataclass(frozen=True)
class Snapshot:
    """Every routable service's instances at one Consul index, plus what was skipped."""

    services: Mapping[str, tuple[Instance, ...]] = field(default_factory=lambda: MappingProxyType({}))
    problems: tuple[Problem, ...] = ()
    index: int = 0


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

    def __str__(self) -> str:
        return (f"long_polls={self.long_polls} fetches={self.fetches} dumps={self.dumps} "
                f"full_refreshes={self.full_refreshes} errors={self.errors}")


class ConsulWatcher:
    def __init__(self, consul: ConsulSettings, datacenter: str | None,
                 publish: Callable[[Snapshot], None], stop: threading.Event,
                 wait: float = 30.0, workers: int = 8):
        self.address = consul.address
        self.http = ConsulHTTP(consul, datacenter, timeout=10.0)
        self.publish = publish
        self.stop = stop
        self.wait = wait
        self.stats = Stats()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="consul-fetch")
        self._summaries: dict[str, ServiceSummary] = {}
        self._services: dict[str, tuple[Instance, ...]] = {}
        self._problems: dict[str, tuple[Problem, ...]] = {}
        self._retry: set[str] = set()
        self._skipped: set[str] = set()

    # --- Consul calls ------------------------------------------------------------------------
    def _summaries_at(self, index: int, wait: float) -> tuple[int, dict[str, ServiceSummary]]:
        self.stats.long_polls += 1
        params = [("index", str(index)), ("wait", f"{wait:g}s")] if index else []
        answer = self.http.get(UI_SERVICES, params, wait=wait if index else None)
        return answer.index, summaries_from_ui(answer.body)

    def _dump(self) -> dict[str, list[dict]]:
        """Every node with its services and checks in one answer, grouped as health entries."""
        self.stats.dumps += 1
        return instances_from_node_dump(self.http.get(UI_NODES).body)

    def _fetch(self, name: str) -> tuple[tuple[Instance, ...], tuple[Problem, ...]]:
        self.stats.fetches += 1
        return instances_from_health(name, self.http.get(f"/v1/health/service/{quote(name, safe='')}").body)

    # --- one round ---------------------------------------------------------------------------
    def sync_once(self) -> Snapshot:
        """Full fetch of everything now (cold start, `--once`, `routes`); raises on any error."""
        index, summaries = self._summaries_at(0, self.wait)
        self._apply(summaries, set(summaries), strict=True, full=True)
        return self.snapshot(index)

    def _apply(self, summaries: dict[str, ServiceSummary], changed: set[str], strict: bool,
               full: bool = False) -> None:
        """Fetch `changed` routable services and fold them in; what failed is retried next round.
        `full`: every service, from one node dump instead of one request per service."""
        routable = {n for n in summaries if routable_service(n)}
        for name in sorted(set(summaries) - routable - self._skipped):
            if name.lower() in EXCLUDED_SERVICES:
                log.debug("service %r is reserved: never routed", name)
            else:
                log.warning("skipping service %r: its name cannot be a route (allowed: a-z 0-9 - _, "
                            "at most 63 characters)", name)
        self._skipped = set(summaries) - routable
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
                return
        results = dict(zip(todo, self._pool.map(self._fetch_safely, todo), strict=True))
        failed = {name for name, result in results.items() if isinstance(result, Exception)}
        if failed and strict:
            raise next(r for r in results.values() if isinstance(r, Exception))
        for name in failed:
            log.warning("could not fetch service %r, keeping its last known instances: %s", name, results[name])
        self._store({n: r for n, r in results.items() if n not in failed}, routable, summaries)
        self._retry = failed

    def _store(self, results: dict, routable: set[str], summaries: dict[str, ServiceSummary]) -> None:
        for name, (instances, problems) in results.items():
            # Keep the very same tuple when nothing changed: the control loop compares by identity first.
            if self._services.get(name) != instances:
                self._services[name] = instances
            self._problems[name] = problems
        for name in set(self._services) - routable:
            del self._services[name]
            self._problems.pop(name, None)
        self._summaries = summaries

    def _fetch_safely(self, name: str):
        try:
            return self._fetch(name)
        except CONSUL_ERRORS as exc:
            return exc

    def snapshot(self, index: int) -> Snapshot:
        problems = tuple(sorted(p for ps in self._problems.values() for p in ps))
        return Snapshot(MappingProxyType(dict(self._services)), problems, index)

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        """Thread body: cold start, then long-poll until `stop` is set."""
        backoff = Backoff()
        index = 0
        failing = False
        while not self.stop.is_set():
            try:
                if index == 0 or failing:
                    # Cold start, or back from an outage: a restarted agent may even be at the
                    # very index we saw last, so trust nothing and fetch every service.
                    snapshot = self.sync_once()
                    index = snapshot.index
                    log.info("consul%s: %d routable services at index %d (%s)", " answers again" if failing else "",
                             len(snapshot.services), index, self.stats)
                    self.publish(snapshot)
                else:
                    index = self._poll(index, backoff)
                failing = False
                if not self._retry:
                    backoff.reset()
            except CONSUL_ERRORS as exc:
                self.stats.errors += 1
                delay = backoff.next()
                if not failing:
                    log.error("consul at %s failed: %s; serving the last known state, retrying", self.address, exc)
                else:
                    log.debug("consul still failing (%s); next try in %.2fs", exc, delay)
                failing = True
                self.stop.wait(delay)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _poll(self, index: int, backoff: Backoff) -> int:
        # With fetches to retry, do not block long: come back after the backoff delay.
        wait = backoff.next() if self._retry else self.wait
        new_index, summaries = self._summaries_at(index, wait)
        if new_index <= 0:
            new_index = 1
        if new_index < index:
            log.info("consul index went back from %d to %d (agent restarted?): full refresh", index, new_index)
            self._apply(summaries, set(summaries), strict=False, full=True)
            self.publish(self.snapshot(new_index))
            return new_index
        if new_index == index and not self._retry:
            return index
        changed = {n for n, s in summaries.items() if self._summaries.get(n) != s}
        removed = set(self._summaries) - set(summaries)
        if new_index != index and not changed and not removed:
            self.stats.full_refreshes += 1
            log.info("catalog changed at index %d with no service summary changed "
                     "(an instance re-registered in place?): refreshing all services", new_index)
            changed = set(summaries)
        if changed or removed or self._retry:
            self._apply(summaries, changed, strict=False, full=changed == set(summaries) and len(changed) > 1)
            self.publish(self.snapshot(new_index))
            log.debug("index %d: %d changed, %d removed (%s)", new_index, len(changed), len(removed), self.stats)
        return new_index

