"""The route table: which hosts and routers go to which healthy servers, in stable server slots.

`build_table(services, previous)` reads every service's tags through the chosen grammars
(`edge.routing.grammars`), groups instances into routes (backends) by route name, filters the
healthy ones and places each in a server slot. An instance keeps its slot for as long as it
stays healthy, so a change moves as few slots as possible and can be applied through HAProxy's
runtime API; a backend's slot count only grows (doubling) when it is full. A route exists when
its service is exposed (its zero-config vhost, `vhost`) or a router sends traffic to it.

`update_table(previous, services, changed)` gives the same result when only the services named
in `changed` differ, touching only their routes: the work per change does not grow with the
number of services. Routers are resolved per match across all services (two claiming one
match): a change to a service's routers resolves again only the matches it claims or claimed,
and rebuilds only the routes whose routers moved.

A table made by update_table or `with_routes` knows which of its routes may differ from the
table it came from (`changed_since`; every other route is the very same object), and carries
forward the indexes that one had built (routes by service, by spare, by exact host). So the
stages after it (edge.routing.spares, edge.routing.dynamic, edge.routing.plan) look at the
routes a change touched and not at the whole table: at 10,000 routes a change costs them
about a millisecond, spent in copies of the indexes at C speed (bench/per_change.py). Pure: no I/O.
"""

from __future__ import annotations

import bisect
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

from edge.routing.grammars import DEFAULT, ServiceRouting, read_service
from edge.routing.model import Instance, Problem, route_name
from edge.routing.routers import SNI, TCP, BackendOptions, Router, resolve

MIN_SLOTS = 4
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


@dataclass(frozen=True)
class TagRules:
    """Which tag grammars are read (`--tag-grammar`), which services get vhosts (`--expose`), the
    edge's own ports (no TCP router may take them) and whether it has an HTTPS port (for SNI)."""

    grammars: tuple[str, ...] = DEFAULT
    expose_all: bool = True
    reserved_ports: frozenset[int] = frozenset()
    https: bool = False


DEFAULT_RULES = TagRules()
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
        return _derived(self, changes, frozenset(), _changed(self, changes), self.routers, self.problems,
                        self.readings, self.claims, self.resolved, self.refused)


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


def _derived(previous: RouteTable, changed: Mapping[str, Route | None], rematched: frozenset[tuple],
             made: tuple[dict[str, Route], tuple[Route, ...]], *fields) -> RouteTable:
    """The table of the routes `made` (`_changed(previous, changed)`) and the other `fields`, which
    differs from `previous` in the `changed` routes and the routers of the `rematched` matches
    only: `previous`'s indexes and what it was derived from are carried forward instead of being
    built again."""
    by_name, routes = made
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


def _group(services: Mapping[str, tuple[Instance, ...]], names: Iterable[str], readings: Mapping[str, ServiceRouting],
           only: set[str] | None = None) -> dict[str, list[Instance]]:
    """Instances by route name, of the services that are exposed or routed to."""
    members: dict[str, list[Instance]] = defaultdict(list)
    for service in names:
        reading = readings[service]
        routed = {r.backend for r in reading.routers}
        for inst in services.get(service, ()):
            name = route_name(inst.service, inst.container_port)
            if name is not None and (only is None or name in only) and (reading.vhosts or name in routed):
                members[name].append(inst)
    return members


def _route(name: str, insts: list[Instance], hosts: tuple[str, ...], old: Route | None, min_slots: int,
           readings: Mapping[str, ServiceRouting], tcp: bool = False) -> Route:
    services = tuple(sorted({i.service for i in insts}))
    options = readings[services[0]].options_of(name)
    weights = {key: w for s in services for key, w in readings[s].weights}
    # A port from the tags (Traefik's `loadbalancer.server.port`) replaces the registered one. In
    # order, so that the outcome never depends on how the members were gathered.
    healthy = {i.key: Server(i.address, options.port or i.port, i.node, i.service_id, weights.get(i.key))
               for i in sorted(insts) if i.healthy}
    return Route(name=name, hosts=hosts, slots=place(healthy, old.slots if old else (), min_slots),
                 instances=len(insts), services=services, vhost=any(readings[s].vhosts for s in services),
                 options=options, tcp=tcp, spare=old.spare if old else 0, dynamic=old.dynamic if old else False)


def _read(services: Mapping[str, tuple[Instance, ...]], names: Iterable[str], rules: TagRules
          ) -> dict[str, ServiceRouting]:
    return {s: read_service(s, services.get(s, ()), rules.grammars, rules.expose_all) for s in names}


def build_table(services: Mapping[str, tuple[Instance, ...]], previous: RouteTable | None = None,
                min_slots: int = MIN_SLOTS, rules: TagRules = DEFAULT_RULES) -> RouteTable:
    """The whole table, reading every service's tags."""
    previous = previous or RouteTable()
    readings = _read(services, services, rules)
    members = _group(services, sorted(services), readings)
    usable, refused = _listenable((r for s in sorted(readings) for r in readings[s].routers), rules)
    claims: dict[tuple, tuple[Router, ...]] = defaultdict(tuple)
    for router in usable:
        claims[router.match] += (router,)
    resolved = {m: resolve(claims[m]) for m in claims}
    hosts, tcp = _bindings(resolved, set(members))
    routes = tuple(_route(name, members[name], hosts.get(name, ()), previous.get(name), min_slots, readings,
                          name in tcp) for name in sorted(members))
    return _table(routes, readings, dict(claims), resolved, refused)


def _table(routes: tuple[Route, ...], readings: Mapping[str, ServiceRouting],
           claims: Mapping[tuple, tuple[Router, ...]], resolved: Mapping[tuple, Resolution],
           refused: Mapping[str, tuple[Problem, ...]]) -> RouteTable:
    matches = sorted(resolved)
    problems = (tuple(p for s in sorted(readings) for p in readings[s].problems)
                + tuple(p for m in matches for p in resolved[m][1])
                + tuple(p for s in sorted(refused) for p in refused[s]))
    return RouteTable(routes, tuple(r for m in matches for r in resolved[m][0]), problems, readings, claims, resolved,
                      refused)


def _bindings(resolved: Mapping[tuple, Resolution], backends: set[str]) -> tuple[dict[str, tuple[str, ...]], set[str]]:
    """For these backends: the whole hosts routed to them (a match with one plain router: the host
    map), and which of them have TCP or SNI routers (a TCP backend)."""
    hosts: dict[str, list[str]] = defaultdict(list)
    tcp = set()
    for winners, _ in resolved.values():
        for router in winners:
            if router.backend in backends:
                if router.kind in (TCP, SNI):
                    tcp.add(router.backend)
                elif len(winners) == 1 and router.plain_host:
                    hosts[router.backend].append(router.host)
    return {b: tuple(sorted(h)) for b, h in hosts.items()}, tcp


def _listenable(routers: Iterable[Router], rules: TagRules) -> tuple[list[Router], dict[str, tuple[Problem, ...]]]:
    """TCP routers on a port of the edge's own, and SNI routers without an HTTPS port, are refused
    (the problems by service)."""
    out, problems = [], defaultdict(tuple)
    for router in routers:
        service = router.origin.service
        if router.kind == TCP and router.port in rules.reserved_ports:
            problems[service] += (Problem(service, f"{router.origin.tag!r}: port {router.port} is one of the edge's "
                                                   "own listeners; router refused"),)
        elif router.kind == SNI and not rules.https:
            problems[service] += (Problem(service, f"{router.origin.tag!r}: SNI passthrough needs the HTTPS port "
                                                   "(--https-bind); router refused"),)
        else:
            out.append(router)
    return out, dict(problems)


def _same_routing(old: ServiceRouting | None, new: ServiceRouting | None) -> bool:
    """Whether a service's tags say the same as before (only its instances moved): then no
    router, host or option changes, and only its routes' slots need work (the fast path)."""
    if old is None or new is None:
        plain = [r for r in (old, new) if r is not None]
        return all(not r.routers and not r.options and not r.weights for r in plain)
    return (old.vhosts, old.routers, old.options, old.weights) == (new.vhosts, new.routers, new.options, new.weights)


def update_table(previous: RouteTable, services: Mapping[str, tuple[Instance, ...]], changed: set[str],
                 min_slots: int = MIN_SLOTS, rules: TagRules = DEFAULT_RULES) -> RouteTable:
    """`build_table(services, previous)`, computed from the routes of the `changed` services only."""
    if not changed:
        return previous
    fresh = _read(services, changed & set(services), rules)
    readings = dict(previous.readings)     # a copy at C speed: the work per change stays small
    for gone in changed - fresh.keys():
        readings.pop(gone, None)
    readings.update(fresh)
    same = all(_same_routing(previous.readings.get(s), fresh.get(s)) for s in changed)
    claims, resolved, refused = previous.claims, previous.resolved, previous.refused
    touched: set[str] = set()         # backends whose routers changed
    rematched: set[tuple] = set()     # matches resolved again
    if not same:                      # re-resolve only the matches the changed services' routers claim(ed)
        old = [r for s in changed if (rd := previous.readings.get(s)) for r in rd.routers]
        new, new_refused = _listenable((r for s in sorted(fresh) for r in fresh[s].routers), rules)
        claims, resolved = dict(claims), dict(resolved)
        refused = {s: p for s, p in refused.items() if s not in changed} | new_refused
        for router in old:
            claims[router.match] = tuple(r for r in claims.get(router.match, ()) if r != router)
        for router in new:
            claims[router.match] = claims.get(router.match, ()) + (router,)
        rematched = {r.match for r in old} | {r.match for r in new}
        for match in rematched:
            touched |= {r.backend for r in resolved.get(match, ((), ()))[0]}
            if claims[match]:
                resolved[match] = resolve(claims[match])
                touched |= {r.backend for r in resolved[match][0]}
            else:
                claims.pop(match)
                resolved.pop(match, None)
    affected = {name for s in changed for name in previous.routes_of(s)}
    new_members = _group(services, sorted(fresh), readings)
    affected |= set(new_members) | {name for name in touched if previous.get(name) is not None}
    contributors = {s for name in affected if (r := previous.get(name)) for s in r.services} - changed
    members = _group(services, sorted(contributors), readings, only=affected)
    for name, insts in new_members.items():
        members[name].extend(insts)
    # the matches with a router to a touched backend: those resolved again, the others as before
    bound = rematched | {m for name in touched for m in previous.matches_to(name)}
    hosts, tcp = _bindings({m: resolved[m] for m in bound if m in resolved}, touched) if touched else ({}, set())
    routes: dict[str, Route | None] = {}
    for name in affected:
        old_route = previous.get(name)
        if not members.get(name):
            routes[name] = None
        elif name in touched:
            routes[name] = _route(name, members[name], hosts.get(name, ()), old_route, min_slots, readings,
                                  name in tcp)
        else:                         # its routers are as they were: so are its hosts and TCP backend
            routes[name] = _route(name, members[name], old_route.hosts if old_route else (), old_route, min_slots,
                                  readings, old_route.tcp if old_route else False)
    if not same:
        routers = _rerouted(previous.routers, resolved, rematched)
        # what the changed services and the matches resolved again said before, said afresh below
        stale = [p for s in changed if (rd := previous.readings.get(s)) for p in rd.problems]
        stale += [p for s in changed for p in previous.refused.get(s, ())]
        stale += [p for m in rematched for p in previous.resolved.get(m, ((), ()))[1]]
        problems = _without(previous.problems, stale)
        problems += tuple(p for m in sorted(rematched) if m in resolved for p in resolved[m][1])
    else:
        routers = previous.routers
        problems = tuple(p for p in previous.problems if p.subject not in changed)
    problems += tuple(p for s in sorted(fresh) for p in fresh[s].problems + refused.get(s, ()))
    return _derived(previous, routes, frozenset(rematched), _changed(previous, routes), routers, problems, readings,
                    claims, resolved, refused)


def _rerouted(routers: tuple[Router, ...], resolved: Mapping[tuple, Resolution], matches: set[tuple]
              ) -> tuple[Router, ...]:
    """`routers` (in match order, as `_table` lists them) with those of `matches` as `resolved`
    has them now: a binary search per match, not a walk through every router."""
    out = list(routers)
    for match in sorted(matches):
        low = bisect.bisect_left(out, match, key=_match)
        high = bisect.bisect_right(out, match, key=_match, lo=low)
        out[low:high] = resolved.get(match, ((), ()))[0]
    return tuple(out)


def _match(router: Router) -> tuple:
    return router.match


def _without(problems: tuple[Problem, ...], stale: Iterable[Problem]) -> tuple[Problem, ...]:
    """`problems` less one of each of `stale` (they are listed once per source)."""
    left = Counter(stale)
    out = []
    for problem in problems:
        if left[problem]:
            left[problem] -= 1
        else:
            out.append(problem)
    return tuple(out)


def place(servers: Mapping[tuple[str, str], Server], old: tuple[Server | None, ...],
          min_slots: int) -> tuple[Server | None, ...]:
    """Servers into slots: each keeps its old slot; newcomers take the lowest free ones."""
    capacity = max(len(old), min_slots)
    while capacity < len(servers):
        capacity *= 2
    slots: list[Server | None] = [None] * capacity
    placed = set()
    for i, prev in enumerate(old):
        if prev is not None and prev.key in servers:
            slots[i] = servers[prev.key]
            placed.add(prev.key)
    free = (i for i, s in enumerate(slots) if s is None)
    for key in sorted(servers):
        if key not in placed:
            slots[next(free)] = servers[key]
    return tuple(slots)
