"""The route table as a value: server slots, routes (backends) and the table of them.

`RouteTable` is what every stage after the model passes on (edge.routing.table builds it from
Consul's services; the spares, dynamic, plan and render stages read it). It is frozen; what it
derives (routes by name, by service, by spare, by exact host; routers by route; values other
modules compute from it, `derived`) is built on first use and kept with it. A table made from
another by `with_routes` or edge.routing.table's `update_table` (`derive`) knows which routes
and which matches' routers may differ from that one (`changed_since`, `rerouted_since`; held
by a weak reference, so no table keeps its predecessors alive) and carries that one's indexes
forward, updated for the change: the stages after it look at what a change touched, not at
the whole table. Pure: no I/O.
"""

from __future__ import annotations

import bisect
import weakref
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeVar

from edge.routing.model import Problem
from edge.routing.routers import BackendOptions, Router

if TYPE_CHECKING:
    from edge.routing.grammars import ServiceRouting

T = TypeVar("T")


def slot_name(index: int) -> str:
    """HAProxy's name of a backend's server slot: `s1`, `s2`, …"""
    return f"s{index + 1}"


@dataclass(frozen=True, order=True)
class Server:
    """A healthy instance placed in a backend slot."""

    address: str
    port: int
    node: str
    service_id: str
    weight: int | None = None     # from the instance's tags (0-256); None: HAProxy's default, 1

    @property
    def key(self) -> tuple[str, str]:
        return (self.node, self.service_id)

    def __str__(self) -> str:
        weight = "" if self.weight is None else f" weight {self.weight}"
        return f"{self.address}:{self.port} ({self.service_id}@{self.node}){weight}"


@dataclass(frozen=True)
class Route:
    """One backend: the vhost `<name>.<domain>` when exposed, exact hosts from tags, and its slots."""

    name: str
    hosts: tuple[str, ...]
    slots: tuple[Server | None, ...]
    instances: int
    services: tuple[str, ...] = ()   # the Consul services whose instances make up this route
    vhost: bool = True               # `<name>.<domain>` routes here (exposure, `--expose`)
    options: BackendOptions = BackendOptions()
    tcp: bool = False                # TCP or SNI routers send here: a TCP backend beside the HTTP one
    spare: int = 0                   # K: served live by the spare backend be_spare_K (edge.routing.spares)
    retired: bool = False            # removed live: its backend stays, empty and unmapped, until a reload
    dynamic: bool = False            # its backend was added live (`add backend`, edge.routing.dynamic)

    @property
    def backend(self) -> str:
        return f"be_spare_{self.spare}" if self.spare else f"be_{self.name}"

    @property
    def tcp_backend(self) -> str:
        return f"tcp_{self.name}"

    @property
    def backends(self) -> tuple[str, ...]:
        """Every HAProxy backend holding this route's slots (updated together)."""
        return (self.backend, self.tcp_backend) if self.tcp else (self.backend,)

    @property
    def servers(self) -> tuple[Server, ...]:
        return tuple(sorted(s for s in self.slots if s is not None))

    @property
    def healthy(self) -> int:
        return sum(s is not None for s in self.slots)


Resolution = tuple[tuple[Router, ...], tuple[Problem, ...]]   # the routers that apply to a match, and conflicts


@dataclass(frozen=True)
class RouteTable:
    routes: tuple[Route, ...] = ()
    routers: tuple[Router, ...] = ()  # every router that applies (resolved), whole hosts included
    problems: tuple[Problem, ...] = field(default=(), compare=False)  # tags refused, claims in conflict
    readings: Mapping[str, ServiceRouting] = field(default_factory=dict, compare=False, repr=False)
    # What the next change starts from: routers by match (claims) and each match's resolution.
    claims: Mapping[tuple, tuple[Router, ...]] = field(default_factory=dict, compare=False, repr=False)
    resolved: Mapping[tuple, Resolution] = field(default_factory=dict, compare=False, repr=False)
    refused: Mapping[str, tuple[Problem, ...]] = field(default_factory=dict, compare=False, repr=False)
    # Derived, never passed in (so `replace()` rebuilds them): routes by name, and the indexes of
    # INDEXES (each built on first use, then carried forward by update_table and `with_routes`).
    _by_name: dict[str, Route] | None = field(default=None, init=False, compare=False, repr=False)
    _by_service: dict[str, tuple[str, ...]] | None = field(default=None, init=False, compare=False, repr=False)
    _by_spare: dict[int, tuple[str, ...]] | None = field(default=None, init=False, compare=False, repr=False)
    _by_host: dict[str, tuple[str, ...]] | None = field(default=None, init=False, compare=False, repr=False)
    _by_backend: dict[str, tuple[tuple, ...]] | None = field(default=None, init=False, compare=False, repr=False)
    # The tables this one was derived from (held weakly) and, for each, the names of the routes
    # that may differ from it and the matches whose routers may: `changed_since`, `rerouted_since`.
    _since: tuple[tuple[weakref.ref, frozenset[str], frozenset[tuple]], ...] = field(
        default=(), init=False, compare=False, repr=False)
    _kept: dict = field(default_factory=dict, init=False, compare=False, repr=False)   # `derived`

    def _named(self) -> dict[str, Route]:
        if self._by_name is None:
            object.__setattr__(self, "_by_name", {r.name: r for r in self.routes})
        return self._by_name

    def _index(self, attr: str) -> dict:
        index = getattr(self, attr)
        if index is None:
            index = _build_index(self.routes, INDEXES[attr])
            object.__setattr__(self, attr, index)
        return index

    def get(self, name: str) -> Route | None:
        return self._named().get(name)

    def backend_of(self, name: str) -> str:
        """The HTTP backend serving route `name`: its own, or the spare it occupies."""
        route = self._named().get(name)
        return route.backend if route is not None else f"be_{name}"

    @property
    def by_name(self) -> Mapping[str, Route]:
        """The routes by name, in the table's (sorted) order; read only. Built per call: for
        comparing whole tables (`get` looks one up)."""
        return MappingProxyType({r.name: r for r in self.routes})

    def routes_of(self, service: str) -> tuple[str, ...]:
        """The names of the routes `service`'s instances are in (an index built on first use and
        carried forward by update_table, so a change costs the changed services, not the table)."""
        return self._index("_by_service").get(service, ())

    def with_host(self, host: str) -> tuple[str, ...]:
        """The names of the routes that have `host` among their exact hosts, in table order."""
        return self._index("_by_host").get(host, ())

    @property
    def spares(self) -> dict[int, str]:
        """Spare K → the route occupying it (edge.routing.spares); the last by name should two."""
        return {k: names[-1] for k, names in self._index("_by_spare").items()}

    def derived(self, key: Hashable, make: Callable[[], T]) -> T:
        """The value `make` computes from this table, computed once and kept with it (the table is
        frozen: it never goes stale); `key` names it. Another stage may `keep` it for a table it
        derived at less cost."""
        if key not in self._kept:
            self._kept[key] = make()
        return self._kept[key]

    def keep(self, key: Hashable, value: object) -> None:
        """What `derived(key, …)` of this table gives, computed by the caller from another table's."""
        self._kept[key] = value

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.routes)

    def changed_since(self, other: RouteTable | None) -> frozenset[str] | None:
        """The names of the routes that may differ from `other`'s, when this table was derived from
        `other` (update_table, `with_routes`, in as many steps as SINCE keeps): every other name
        has the very same Route object (or none) in both. None when not known: compare them all."""
        if other is self:
            return frozenset()
        return next((names for base, names, _ in self._since if base() is other), None)

    def rerouted_since(self, other: RouteTable | None) -> frozenset[tuple] | None:
        """The matches whose routers (`resolved`) may differ from `other`'s, as `changed_since`."""
        if other is self:
            return frozenset()
        return next((matches for base, _, matches in self._since if base() is other), None)

    def matches_to(self, name: str) -> tuple[tuple, ...]:
        """The matches with a router to route `name` (an index built on first use, carried forward)."""
        if self._by_backend is None:
            index: dict[str, dict[tuple, None]] = defaultdict(dict)
            for router in self.routers:
                index[router.backend][router.match] = None
            object.__setattr__(self, "_by_backend", {b: tuple(m) for b, m in index.items()})
        return self._by_backend.get(name, ())

    def with_routes(self, routes: Iterable[Route] = (), removed: Iterable[str] = ()) -> RouteTable:
        """This table with `routes` in (replacing those of the same name, new names in name order)
        and the routes named in `removed` out; routers, readings and problems as they are. Costs
        the routes changed, plus copies of the indexes at C speed."""
        changes: dict[str, Route | None] = {r.name: r for r in routes} | dict.fromkeys(removed)
        if not changes:
            return self
        return derive(self, changes, frozenset(), self.routers, self.problems, self.readings, self.claims,
                      self.resolved, self.refused)


SINCE = 4     # how many tables back `changed_since` knows (the control loop needs one: the live table)
INDEXES: dict[str, Callable[[Route], Iterable]] = {
    "_by_service": lambda r: r.services,
    "_by_spare": lambda r: (r.spare,) if r.spare else (),
    "_by_host": lambda r: r.hosts,
}


def _build_index(routes: Iterable[Route], keys: Callable[[Route], Iterable]) -> dict:
    """Key → the names of the routes having it, in table order."""
    index: dict = defaultdict(list)
    for route in routes:
        for key in dict.fromkeys(keys(route)):
            index[key].append(route.name)
    return {k: tuple(n) for k, n in index.items()}


def _reindex(index: dict | None, changed: Iterable[str], before: Callable[[str], Route | None],
             after: Callable[[str], Route | None], keys: Callable[[Route], Iterable]) -> dict | None:
    """`index` (None: never built) with the routes named in `changed` moved from their keys in
    the previous table (`before`) to those in the new one (`after`)."""
    if index is None:
        return None
    index = dict(index)
    for name in changed:
        old, new = before(name), after(name)
        if old is new:
            continue
        dropped = set(keys(old)) if old is not None else set()
        gained = set(keys(new)) if new is not None else set()
        for key in dropped - gained:
            names = tuple(n for n in index[key] if n != name)
            if names:
                index[key] = names
            else:
                del index[key]
        for key in gained - dropped:
            index[key] = tuple(sorted((*index.get(key, ()), name)))
    return index


def _changed(previous: RouteTable, changes: Mapping[str, Route | None]) -> tuple[dict[str, Route], tuple[Route, ...]]:
    """`previous`'s routes with `changes` made (None: removed): by name (for lookups, in no
    particular order) and in name order. Copies at C speed, and a binary search per change."""
    by_name = dict(previous._named())
    routes = list(previous.routes)
    for name, route in changes.items():
        i = bisect.bisect_left(routes, name, key=_name)
        there = i < len(routes) and routes[i].name == name
        if route is None:
            by_name.pop(name, None)
            if there:
                del routes[i]
        elif there:
            by_name[name] = routes[i] = route
        else:
            by_name[name] = route
            routes.insert(i, route)
    if len(routes) != len(by_name):      # `previous` was not in name order: sort it whole
        routes = sorted(by_name.values(), key=_name)
    return by_name, tuple(routes)


def _name(route: Route) -> str:
    return route.name


def derive(previous: RouteTable, changed: Mapping[str, Route | None], rematched: frozenset[tuple],
           *fields) -> RouteTable:
    """`previous` with the `changed` routes (None: removed) and the other `fields` (routers,
    problems, readings, claims, resolved, refused), which differ from `previous`'s in the routers
    of the `rematched` matches only: `previous`'s indexes and what it was derived from are
    carried forward, updated for the change, instead of being built again."""
    by_name, routes = _changed(previous, changed)
    table = RouteTable(routes, *fields)
    object.__setattr__(table, "_by_name", by_name)
    for attr, keys in INDEXES.items():
        object.__setattr__(table, attr, _reindex(getattr(previous, attr), changed, previous.get, by_name.get, keys))
    object.__setattr__(table, "_by_backend", _rebackend(previous, table, rematched))
    names = frozenset(changed)
    since = ((weakref.ref(previous), names, rematched),) + tuple(
        (base, old | names, matches | rematched) for base, old, matches in previous._since)
    object.__setattr__(table, "_since", since[:SINCE])
    return table


def _rebackend(previous: RouteTable, table: RouteTable, rematched: frozenset[tuple]
               ) -> dict[str, tuple[tuple, ...]] | None:
    """`previous`'s route → matches index (None: never built) with the `rematched` matches' routers
    as `table` resolves them."""
    if previous._by_backend is None or not rematched:
        return previous._by_backend
    index = dict(previous._by_backend)
    for match in rematched:
        for router in previous.resolved.get(match, ((), ()))[0]:
            if match in index.get(router.backend, ()):
                index[router.backend] = tuple(m for m in index[router.backend] if m != match)
        for router in table.resolved.get(match, ((), ()))[0]:
            if match not in index.get(router.backend, ()):
                index[router.backend] = (*index.get(router.backend, ()), match)
    return {b: m for b, m in index.items() if m}
