"""The per-node Consul shell: the fleet's reader while the catalog has at most `max_nodes` nodes.

Long-polls, all documented API: `/v1/catalog/nodes` (which nodes, their addresses),
`/v1/health/state/critical` and `/v1/health/state/warning` (every check that is not passing;
Consul serves these from its index of checks by status, so their cost follows the failing checks,
not all of them), and `/v1/catalog/node-services/<node>` for each node. A registration wakes only
the long-poll of its node, whose answer is that node's services: a change costs the size of one
node (a host's containers), whatever the size of the catalog. At most `max_nodes` + 3 long-polls;
with more nodes `run` returns and `CatalogReader` reads through the summary watcher instead.

Same rules as `edge.consul.watch` (whose Reader, Poller and Snapshot it uses): stale reads by
default, the same index means nothing new, a lower one a full sync, errors back off and a full
sync follows an outage, nothing is emptied by an error. No ACL guard here: the fleet member
passes every snapshot through its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from urllib.parse import quote

from edge.consul.nodeview import by_node, changed_services, instances, node_rows_raw
from edge.consul.watch import (
    CONSUL_ERRORS,
    Backoff,
    Changes,
    Poller,
    Reader,
    Snapshot,
    Stats,
    Update,
    endpoint,
    reset_by,
)
from edge.metrics import NoMetrics
from edge.routing.model import (
    EXCLUDED_SERVICES,
    Instance,
    Problem,
    changed_checks,
    node_addresses,
    nonpassing_checks,
)
from edge.routing.model import routable_service as routable
from haproxy_consul.consul_api import ConsulHTTP, ConsulSettings

log = logging.getLogger("edge.watch")

NODES = "/v1/catalog/nodes"
CRITICAL = "/v1/health/state/critical"
WARNING = "/v1/health/state/warning"
MAX_NODES = 64


def node_path(node: str) -> str:
    return f"/v1/catalog/node-services/{quote(node, safe='')}"


class TooManyNodes(Exception):
    """More nodes than long-polls we allow ourselves."""


class NodesWatcher:
    def __init__(self, consul: ConsulSettings, datacenter: str | None, publish: Callable[[Snapshot], None],
                 stop: threading.Event, wait: float = 30.0, consistency: str = "stale", max_stale: float = 10.0,
                 max_nodes: int = MAX_NODES, metrics=None):
        self.metrics = metrics or NoMetrics()
        self.stats = Stats()
        http = ConsulHTTP(consul, datacenter, timeout=10.0,
                          on_request=lambda path, outcome: self.metrics.consul_request(endpoint(path), outcome))
        self.reader = Reader(http, consistency, max_stale, self.stats, self.metrics)
        self.publish, self.stop, self.wait, self.max_nodes = publish, stop, wait, max_nodes
        self.address = consul.address
        self._addresses: dict[str, str] = {}                   # node -> address
        self._rows: dict[str, dict[str, tuple]] = {}           # node -> service ID -> row
        self._placed: dict[str, dict[str, list[tuple]]] = {}   # service -> node -> rows
        self._checks: dict[tuple[str, str], object] = {}       # (node, check) -> state, not passing
        self._failing: dict[str, list] = {}                    # node -> its non-passing checks
        self._services: dict[str, tuple[Instance, ...]] = {}
        self._changes = Changes()
        self._problems: dict[str, tuple[Problem, ...]] = {}
        self._flat_problems: tuple[Problem, ...] | None = None
        self._skipped: set[str] = set()
        self._lock = threading.Lock()
        self._inbox: dict[str, Update] = {}
        self._wake = threading.Event()
        self._pollers: dict[str, Poller] = {}

    # --- reads ------------------------------------------------------------------------------------
    def _node(self, node: str) -> tuple[int, tuple[str | None, dict[str, tuple]]]:
        """(index, (address, rows)) of one node: parsed where it was read, so no answer waits whole."""
        answer = self.reader.read(node_path(node), raw=True)
        return answer.index, node_rows_raw(answer.body)

    def _nonpassing(self) -> tuple[dict, int, int]:
        critical = self.reader.read(CRITICAL)
        warning = self.reader.read(WARNING)
        return {**nonpassing_checks(warning.body), **nonpassing_checks(critical.body)}, critical.index, warning.index

    def sync(self) -> tuple[Snapshot, dict[str, int]]:
        """Everything now: the nodes, the failing checks and every node's services. Returns the
        snapshot and the index each long-poll starts from."""
        t0 = time.monotonic()
        self.stats.dumps += 1
        answer = self.reader.read(NODES)
        addresses = node_addresses(answer.body)
        if len(addresses) > self.max_nodes:
            raise TooManyNodes(f"{len(addresses)} nodes, more than {self.max_nodes}")
        checks, critical_index, warning_index = self._nonpassing()
        # One node after the other on this thread's connection: a pool would keep its own
        # connections to the agent open for good, and hold several large answers at once.
        bodies = {node: self._node(node) for node in addresses}
        self._addresses, self._rows, self._placed = addresses, {}, {}
        for node, (_, (_, rows)) in bodies.items():
            self._place(node, rows)
        self._set_checks(checks)
        self._services, self._problems, self._flat_problems = {}, {}, None
        self._changes.lost()
        self._rebuild(set(self._placed))
        indexes = {"nodes": answer.index, "critical": critical_index, "warning": warning_index,
                   **{f"node:{n}": index for n, (index, _) in bodies.items()}}
        return self.snapshot(max(indexes.values(), default=0), t0, full=True), indexes

    # --- state -------------------------------------------------------------------------------------
    def _place(self, node: str, rows: dict[str, tuple]) -> set[str]:
        """A node's new rows; returns the services whose instances on it changed."""
        old = self._rows.get(node, {})
        changed = changed_services(old, rows)
        grouped: dict[str, list[tuple]] = {}
        for row in rows.values():
            if row[0] in changed:
                grouped.setdefault(row[0], []).append(row)
        for name in changed:
            placed = self._placed.setdefault(name, {})
            mine = grouped.get(name)
            if mine:
                placed[node] = mine
            else:
                placed.pop(node, None)
                if not placed:
                    del self._placed[name]
        if rows:
            self._rows[node] = rows
        else:
            self._rows.pop(node, None)
        return changed

    def _set_checks(self, checks: dict) -> None:
        self._checks, self._failing = checks, by_node(checks)

    def _rebuild(self, names: set[str]) -> None:
        for name in sorted(names):
            if not self._routable(name):
                continue
            placed = self._placed.get(name)
            if not placed:
                self._services.pop(name, None)
                self._changes.touch(name)
                if self._problems.pop(name, None):
                    self._flat_problems = None
                continue
            found, problems = instances(name, ((n, self._addresses.get(n, ""), rows) for n, rows in placed.items()),
                                        self._failing)
            if self._services.get(name) != found:
                self._services[name] = found
                self._changes.touch(name)
            if self._problems.get(name, ()) != problems:
                self._problems[name] = problems
                self._flat_problems = None

    def _routable(self, name: str) -> bool:
        if name in self._skipped:
            return False
        if routable(name):
            return True
        self._skipped.add(name)
        if name.lower() in EXCLUDED_SERVICES:
            log.debug("service %r is reserved: never routed", name)
        else:
            log.warning("skipping service %r: its name cannot be a route (allowed: a-z 0-9 - _, at most 63 "
                        "characters)", name)
        return False

    def snapshot(self, index: int, seen_at: float, full: bool = False) -> Snapshot:
        if self._flat_problems is None:
            self._flat_problems = tuple(sorted(p for ps in self._problems.values() for p in ps))
        return self._changes.snapshot(self._services, self._flat_problems, index, seen_at, full)

    # --- the loop ---------------------------------------------------------------------------------
    def _post(self, name: str, update: Update) -> None:
        with self._lock:
            self._inbox[name] = update
        self._wake.set()

    def wake(self) -> None:
        """Come round now (after `stop` was set: to end)."""
        self._wake.set()

    def _poll(self, name: str, path: str, parse, raw: bool, index: int) -> None:
        poller = Poller(name, path, (), parse, raw, self.reader, self.wait, self._post, self.stop, self.stats,
                        start=index)
        self._pollers[name] = poller
        poller.thread.start()

    def _start(self, indexes: dict[str, int]) -> None:
        self._retire(list(self._pollers))
        with self._lock:
            self._inbox.clear()
        self._poll("nodes", NODES, node_addresses, False, indexes["nodes"])
        self._poll("critical", CRITICAL, nonpassing_checks, False, indexes["critical"])
        self._poll("warning", WARNING, nonpassing_checks, False, indexes["warning"])
        for node in self._addresses:
            self._poll(f"node:{node}", node_path(node), node_rows_raw, True, indexes.get(f"node:{node}", 0))

    def _retire(self, names) -> None:
        for name in names:
            poller = self._pollers.pop(name, None)
            if poller is not None:
                poller.done.set()

    def run(self) -> None:
        """Thread body: full sync, then the long-polls, until `stop` or more than `max_nodes` nodes."""
        backoff, synced, failing = Backoff(), False, False
        try:
            while not self.stop.is_set():
                try:
                    if not synced:
                        snapshot, indexes = self.sync()
                        log.info("consul%s: %d routable services on %d nodes at index %d, read per node (%s)",
                                 " answers again" if failing else "", len(snapshot.services), len(self._addresses),
                                 snapshot.index, self.stats)
                        self.publish(snapshot)
                        self._start(indexes)
                        synced, failing = True, False
                        backoff.reset()
                        continue
                    self._wake.wait()
                    self._wake.clear()
                    if self.stop.is_set():
                        break
                    with self._lock:
                        updates, self._inbox = self._inbox, {}
                    synced = self._round(updates)
                except CONSUL_ERRORS as exc:
                    self.stats.errors += 1
                    delay = backoff.next()
                    if not failing:
                        log.error("consul at %s failed: %s; serving the last known state, retrying", self.address,
                                  exc)
                    failing, synced = True, False
                    self._retire(list(self._pollers))
                    self.stop.wait(delay)
        except TooManyNodes as exc:
            log.warning("consul: %s: reading through the catalog summary instead of per node", exc)
        finally:
            self._retire(list(self._pollers))

    def _round(self, updates: dict[str, Update]) -> bool:
        """Fold the long-polls' newest answers in and publish; False when a full sync is needed."""
        if reset_by(updates, self.stats, self.metrics):
            return False
        seen_at = min((u.seen_at for u in updates.values()), default=time.monotonic())
        changed: set[str] = set()
        if "nodes" in updates:
            changed |= self._on_nodes(updates["nodes"].value)
        kinds = {kind for kind in ("critical", "warning") if kind in updates}
        if kinds:
            # Each answer lists the checks in its status: a check that moved between them is in the
            # newer answer under the same key, and gone from the older one's next answer.
            checks = {key: state for key, state in self._checks.items() if state.status not in kinds}
            for kind in sorted(kinds, reverse=True):
                checks.update(updates[kind].value)
            changed |= self._on_checks(checks)
        for name, u in updates.items():
            if name.startswith("node:") and name[5:] in self._addresses:
                address, rows = u.value
                if address is not None and address != self._addresses[name[5:]]:
                    self._addresses[name[5:]] = address
                    changed |= {s for s, placed in self._placed.items() if name[5:] in placed}
                changed |= self._place(name[5:], rows)
        if not changed:
            return True
        self._rebuild(changed)
        self.publish(self.snapshot(max(u.index for u in updates.values()), seen_at))
        log.debug("%d service(s) changed, published %.1f ms after the answer arrived (%s)", len(changed),
                  (time.monotonic() - seen_at) * 1000, self.stats)
        return True

    def _on_nodes(self, addresses: dict[str, str]) -> set[str]:
        if len(addresses) > self.max_nodes:
            raise TooManyNodes(f"{len(addresses)} nodes, more than {self.max_nodes}")
        changed = set()
        for node in set(self._addresses) - set(addresses):
            self._retire([f"node:{node}"])
            changed |= self._place(node, {})
        for node, address in addresses.items():
            if node not in self._addresses:
                self._poll(f"node:{node}", node_path(node), node_rows_raw, True, 0)
            elif self._addresses[node] != address:
                changed |= {s for s, placed in self._placed.items() if node in placed}
        self._addresses = dict(addresses)
        return changed

    def _on_checks(self, checks: dict) -> set[str]:
        services, nodes = changed_checks(self._checks, checks)
        self._set_checks(checks)
        if nodes:
            services |= {s for s, placed in self._placed.items() if not nodes.isdisjoint(placed)}
        return services


class CatalogReader:
    """The fleet's reader: per node (`NodesWatcher`) while the catalog has at most `max_nodes`
    nodes, else the summary watcher (`edge.consul.watch.ConsulWatcher`, as `--consul-api` says)."""

    def __init__(self, per_node: Callable[[], NodesWatcher] | None, summary: Callable[[], object],
                 stop: threading.Event):
        self.per_node, self.summary, self.stop = per_node, summary, stop
        self.current: object | None = None

    @property
    def stats(self):
        return getattr(self.current, "stats", Stats())

    def wake(self) -> None:
        """After `stop` was set: let the current reader see it now."""
        if self.current is not None:
            self.current.wake()

    def run(self) -> None:
        if self.per_node is not None:
            self.current = self.per_node()
            self.current.run()
        if not self.stop.is_set():
            self.current = self.summary()
            self.current.run()
