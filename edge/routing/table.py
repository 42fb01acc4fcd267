"""The route table: which vhost goes to which healthy servers, in stable server slots.

`build_table(services, previous)` groups instances into routes by their route name, filters
the healthy ones and places each in a server slot. An instance keeps its slot for as long as it
stays healthy, so a change moves as few slots as possible and can be applied through HAProxy's
runtime API; a backend's slot count only grows (doubling) when it is full.

`update_table(previous, services, changed)` gives the same result when only the services named
in `changed` differ, touching only their routes: the work per change does not grow with the
number of services. Exact hosts (`edge.host` tags) are resolved across all routes, so a change
that involves them takes the full path. Pure: no I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from edge.routing.model import Instance, Problem, edge_hosts, route_name

MIN_SLOTS = 4


@dataclass(frozen=True, order=True)
class Server:
    """A healthy instance placed in a backend slot."""

    address: str
    port: int
    node: str
    service_id: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.node, self.service_id)

    def __str__(self) -> str:
        return f"{self.address}:{self.port} ({self.service_id}@{self.node})"


@dataclass(frozen=True)
class Route:
    """One vhost `<name>.<domain>` (plus exact hosts from tags) and its backend's slots."""

    name: str
    hosts: tuple[str, ...]
    slots: tuple[Server | None, ...]
    instances: int
    services: tuple[str, ...] = ()   # the Consul services whose instances make up this route

    @property
    def backend(self) -> str:
        return f"be_{self.name}"

    @property
    def servers(self) -> tuple[Server, ...]:
        return tuple(sorted(s for s in self.slots if s is not None))

    @property
    def healthy(self) -> int:
        return sum(s is not None for s in self.slots)


@dataclass(frozen=True)
class RouteTable:
    routes: tuple[Route, ...] = ()
    problems: tuple[Problem, ...] = field(default=(), compare=False)  # host claims in conflict
    _by_name: dict[str, Route] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {r.name: r for r in self.routes})

    def get(self, name: str) -> Route | None:
        return self._by_name.get(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.routes)


def _group(services: Mapping[str, tuple[Instance, ...]], names: Iterable[str],
           only: set[str] | None = None) -> dict[str, list[Instance]]:
    members: dict[str, list[Instance]] = defaultdict(list)
    for service in names:
        for inst in services.get(service, ()):
            name = route_name(inst.service, inst.container_port)
            if name is not None and (only is None or name in only):
                members[name].append(inst)
    return members


def _route(name: str, insts: list[Instance], hosts: tuple[str, ...], old: Route | None, min_slots: int) -> Route:
    healthy = {i.key: Server(i.address, i.port, i.node, i.service_id) for i in insts if i.healthy}
    return Route(name=name, hosts=hosts, slots=place(healthy, old.slots if old else (), min_slots),
                 instances=len(insts), services=tuple(sorted({i.service for i in insts})))


def build_table(services: Mapping[str, tuple[Instance, ...]], previous: RouteTable | None = None,
                min_slots: int = MIN_SLOTS) -> RouteTable:
    previous = previous or RouteTable()
    members = _group(services, sorted(services))
    claims: dict[str, set[str]] = defaultdict(set)
    for name, insts in members.items():
        for inst in insts:
            for host in edge_hosts(inst.tags)[0]:
                claims[host].add(name)
    owner: dict[str, list[str]] = defaultdict(list)
    problems = []
    for host, names in sorted(claims.items()):
        winner = min(names)
        owner[winner].append(host)
        if len(names) > 1:
            problems.append(Problem(host, f"claimed by routes {sorted(names)}; {winner} keeps it"))
    routes = tuple(_route(name, members[name], tuple(sorted(owner.get(name, ()))), previous.get(name), min_slots)
                   for name in sorted(members))
    return RouteTable(routes, tuple(problems))


def update_table(previous: RouteTable, services: Mapping[str, tuple[Instance, ...]], changed: set[str],
                 min_slots: int = MIN_SLOTS) -> RouteTable:
    """`build_table(services, previous)`, computed from the routes of the `changed` services only."""
    if not changed:
        return previous
    affected = {r.name for r in previous.routes if not changed.isdisjoint(r.services)}
    fresh = _group(services, changed)
    affected |= set(fresh)
    contributors = {s for name in affected if (r := previous.get(name)) for s in r.services} | changed
    # Grouped in build_table's order (services sorted by name): where two instances of a route
    # share a slot key (node, service ID), the same one wins on both paths.
    members = _group(services, sorted(contributors), only=affected)
    old_hosts = any(previous.get(name) and previous.get(name).hosts for name in affected)
    new_hosts = any(edge_hosts(i.tags)[0] for insts in members.values() for i in insts)
    if old_hosts or new_hosts:
        return build_table(services, previous, min_slots)  # host claims are resolved across routes
    by_name = dict(previous._by_name)
    for name in affected:
        if members.get(name):
            by_name[name] = _route(name, members[name], (), previous.get(name), min_slots)
        else:
            by_name.pop(name, None)
    return RouteTable(tuple(by_name[n] for n in sorted(by_name)), previous.problems)


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
